#!/usr/bin/env python3
"""A tiny read-only pyfuse3 file system for kernel-side tests (t5_kernel_bpf).

It serves one regular file, ``/data``, of ``--size`` bytes whose byte at offset
``i`` is ``i % 251`` (so any read can be checked).  It has no dependency on
curvefs_py: the BPF counters are tested against a FUSE daemon we fully control,
and the number of requests that reach it is also counted here, in-process, and
can be dumped with SIGUSR1 into ``--counts`` as JSON (a cross-check for the
BPF counts).

Usage: ``python simplefs.py MOUNTPOINT [--size N] [--ino I] [--keep-cache]``.
Unmount with ``fusermount3 -u MOUNTPOINT``; the process then exits 0.
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import signal
import stat

import pyfuse3
import trio

FILE_NAME = b"data"


def pattern(off: int, size: int) -> bytes:
    """The file's content in ``[off, off+size)``."""
    return bytes((i % 251) for i in range(off, off + size))


class SimpleFS(pyfuse3.Operations):
    def __init__(self, size: int, file_ino: int, keep_cache: bool, timeout: float):
        super().__init__()
        self.size = size
        self.file_ino = file_ino
        self.keep_cache = keep_cache
        self.timeout = timeout
        self.counts: collections.Counter[str] = collections.Counter()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif ino == self.file_ino:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def getattr(self, inode, ctx=None):
        self.counts["GETATTR"] += 1
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        self.counts["LOOKUP"] += 1
        if parent_inode == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return self._attr(self.file_ino)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(self.file_ino), 1)

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        self.counts["OPEN"] += 1
        if inode != self.file_ino:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache)

    async def read(self, fh, off, size):
        self.counts["READ"] += 1
        self.counts["READ_bytes"] += max(0, min(size, self.size - off))
        if off >= self.size:
            return b""
        return pattern(off, min(size, self.size - off))

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--ino", type=int, default=2, help="inode number of /data")
    p.add_argument("--keep-cache", action="store_true")
    p.add_argument("--timeout", type=float, default=1.0, help="attr/entry timeout (s)")
    p.add_argument("--counts", help="write request counts here as JSON on SIGUSR1")
    args = p.parse_args(argv)

    fs = SimpleFS(args.size, args.ino, args.keep_cache, args.timeout)

    def dump(*_):
        if args.counts:
            tmp = args.counts + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(fs.counts), f)
            os.replace(tmp, args.counts)

    signal.signal(signal.SIGUSR1, dump)
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=simplefs", "ro"}
    pyfuse3.init(fs, args.mountpoint, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
