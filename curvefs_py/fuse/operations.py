"""pyfuse3 adapter: decode a request, call the VFS, map errors to errno (the only FUSEError site).

Every handler runs inside ``_guard``: ``FsError`` becomes its errno, any other
exception is logged with its traceback, counted in ``fuse_ops_errors_<op>``
and answered with EIO — an exception escaping a handler would end the mount.
Each handler also counts ``fuse_ops_<op>`` with its latency (``metrics``).
"""
from __future__ import annotations

import errno
import functools
import logging
import time
from typing import TYPE_CHECKING

import pyfuse3

from .. import metrics
from ..errors import FsError
from ..types import Attr, SetAttr

if TYPE_CHECKING:
    from ..vfs.vfs import VFS

log = logging.getLogger(__name__)


def _guard(fn):
    name = fn.__name__
    mname = f"fuse_op_{name}"
    iname = f"fuse_internal_{name}"

    @functools.wraps(fn)
    async def wrapper(self, *args):
        t0 = time.perf_counter()
        # requests for .stats/.config/.control are counted apart, so that reading
        # the counters does not show up in them (stats subtracts them from BPF's)
        internal = self.vfs.is_internal_request(name, args)
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            metrics.inc(f"fuse_ops_errors_{name}")
            code = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
            if code in (errno.EIO, errno.ENOSPC) or (code == errno.EROFS and not self.vfs.read_only):
                log.warning("%s%r: %s", name, args[:2], exc)  # (on a --read-only mount EROFS is the answer)
            raise pyfuse3.FUSEError(code) from None
        except OSError as exc:
            metrics.inc(f"fuse_ops_errors_{name}")
            log.warning("%s%r: %s", name, args[:2], exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            metrics.inc(f"fuse_ops_errors_{name}")
            log.exception("%s%r failed unexpectedly", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if internal:
                metrics.inc(iname + "_count")
            else:
                metrics.observe_us(mname, (time.perf_counter() - t0) * 1e6)

    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, vfs: "VFS", *, attr_timeout: float = 1.0, entry_timeout: float = 1.0,
                 negative_timeout: float = 0.0, backing=None):
        super().__init__()
        self.vfs = vfs
        self.backing = backing  # fuse/backing.py: FUSE passthrough of open files
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.negative_timeout = negative_timeout

    def _entry(self, attr: Attr, to_cache: bool = True) -> pyfuse3.EntryAttributes:
        """The reply for ``attr``; ``to_cache``: the kernel caches it (not readdir's)."""
        if to_cache:
            self.vfs.told_kernel(attr)
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.length
        e.st_blksize = 4096
        e.st_blocks = (attr.length + 511) // 512 if not attr.is_dir else 8
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    # ---------------------------------------------------------- namespace
    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry(await self.vfs.lookup(parent_inode, name))
        except FsError as exc:
            if exc.errno == errno.ENOENT and self.negative_timeout > 0:
                e = pyfuse3.EntryAttributes()
                e.st_ino = 0  # a negative entry, cached for entry_timeout
                e.entry_timeout = self.negative_timeout
                return e
            raise

    @_guard
    async def forget(self, inode_list):
        return None  # inodes live in the metadata engine; nothing held per lookup

    @_guard
    async def getattr(self, inode, ctx=None):
        return self._entry(await self.vfs.getattr(inode))

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        ch = SetAttr()
        if fields.update_mode:
            ch.mode = attr.st_mode & 0o7777
        if fields.update_uid:
            ch.uid = attr.st_uid
        if fields.update_gid:
            ch.gid = attr.st_gid
        if fields.update_size:
            ch.length = attr.st_size
        if fields.update_atime:
            ch.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            ch.mtime_ns = attr.st_mtime_ns
        if getattr(fields, "update_ctime", False):
            ch.ctime_ns = attr.st_ctime_ns
        return self._entry(await self.vfs.setattr(inode, ch))

    @_guard
    async def readlink(self, inode, ctx):
        return await self.vfs.readlink(inode)

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(await self.vfs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(await self.vfs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(await self.vfs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        await self.vfs.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        await self.vfs.rmdir(parent_inode, name)

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(await self.vfs.link(inode, new_parent_inode, new_name))

    # -------------------------------------------------------------- files
    @_guard
    async def open(self, inode, flags, ctx):
        fh, keep, direct, backing = await self.vfs.open(inode, flags)
        if backing:
            # the shim gives this fh's OPEN reply FOPEN_PASSTHROUGH; pyfuse3
            # sends the reply as soon as we return, with no await in between
            self.backing.expect(fh, backing, direct)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=direct)

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, attr = await self.vfs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(attr)

    @_guard
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    @_guard
    async def write(self, fh, off, buf):
        return await self.vfs.write(fh, off, buf)

    @_guard
    async def flush(self, fh):
        await self.vfs.flush(fh)

    @_guard
    async def fsync(self, fh, datasync):
        await self.vfs.fsync(fh, datasync)

    @_guard
    async def release(self, fh):
        await self.vfs.release(fh)

    # -------------------------------------------------------- directories
    @_guard
    async def opendir(self, inode, ctx):
        return await self.vfs.opendir(inode)

    @_guard
    async def readdir(self, fh, start_id, token):
        for next_id, entry in await self.vfs.readdir(fh, start_id):
            # readdirplus: the kernel caches these attributes too
            if not pyfuse3.readdir_reply(token, entry.name, self._entry(entry.attr, False), next_id):
                break
            self.vfs.told_kernel(entry.attr)

    @_guard
    async def releasedir(self, fh):
        await self.vfs.releasedir(fh)

    @_guard
    async def fsyncdir(self, fh, datasync):
        return None  # every metadata change is committed when its request returns

    # --------------------------------------------------------------- misc
    @_guard
    async def statfs(self, ctx):
        sf = await self.vfs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = sf.total_space // 4096
        s.f_bfree = sf.avail_space // 4096
        s.f_bavail = sf.avail_space // 4096
        s.f_files = sf.used_inodes + sf.avail_inodes
        s.f_ffree = sf.avail_inodes
        s.f_favail = sf.avail_inodes
        s.f_namemax = 255
        return s

    @_guard
    async def setxattr(self, inode, name, value, ctx):
        await self.vfs.setxattr(inode, name, value)

    @_guard
    async def getxattr(self, inode, name, ctx):
        return await self.vfs.getxattr(inode, name)

    @_guard
    async def listxattr(self, inode, ctx):
        return await self.vfs.listxattr(inode)

    @_guard
    async def removexattr(self, inode, name, ctx):
        await self.vfs.removexattr(inode, name)

    @_guard
    async def access(self, inode, mode, ctx):
        gids = [ctx.gid]
        try:
            gids += pyfuse3.get_sup_groups(ctx.pid)
        except Exception:
            pass
        return await self.vfs.access(inode, mode, ctx.uid, gids)
