"""FUSE passthrough (Linux >= 6.9) through the ``ptshim`` library: backing files for opens.

A file opened with FOPEN_PASSTHROUGH is read, written and mmapped by the
kernel directly from a *backing file* the daemon registered, without a
round trip to the daemon.  libfuse 3.14 (Debian 12) cannot ask for it, so
``ptshim.c`` (built by scripts/setup.sh into ``_ptshim.so``) redirects
libfuse's ``writev`` to rewrite the FUSE_INIT reply and the OPEN replies the
daemon registered; see the C file for why that is exact.

``KernelBacking`` is what the VFS's ``Passthrough`` uses (``vfs/passthrough.py``):

* ``install()`` before the session reads FUSE_INIT (``pyfuse3.init`` mounts
  but does not read; ``pyfuse3.main`` does);
* ``await probe(path)`` once the loop runs: registers and drops a backing
  file; sets ``available`` / ``reason``;
* ``await open(fd)`` -> backing id, ``await close(id)`` (ioctls in a worker
  thread);
* ``expect(fh, id, direct_io)`` from the OPEN handler, after its last await.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os

from .. import metrics, threads

log = logging.getLogger(__name__)

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ptshim.so")
FOPEN_DIRECT_IO = 1


class KernelBacking:
    def __init__(self) -> None:
        self.available = False
        self.reason = "not started"
        self._lib = None

    def install(self) -> bool:
        """Load the shim and hook libfuse (call after pyfuse3.init, before main)."""
        if not os.path.exists(SHIM):
            self.reason = f"{SHIM} is not built (run scripts/setup.sh)"
            return False
        try:
            lib = ctypes.CDLL(SHIM)
        except OSError as exc:
            self.reason = f"cannot load {SHIM}: {exc}"
            return False
        lib.cfpt_expect.argtypes = [ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32]
        if lib.cfpt_install() <= 0:
            self.reason = "libfuse3's writev could not be hooked"
            return False
        self._lib = lib
        self.reason = "waiting for FUSE_INIT"
        return True

    @property
    def installed(self) -> bool:
        return self._lib is not None

    def init_state(self) -> int:
        """0: FUSE_INIT not answered yet, 1: passthrough requested in it, 2: not."""
        return self._lib.cfpt_init_state() if self._lib is not None else 2

    async def probe(self, path: str) -> bool:
        """After FUSE_INIT: can a backing file be registered?  Sets ``reason``."""
        if self._lib is None:
            return False
        state = self.init_state()
        if state != 1:
            self.reason = ("FUSE_INIT not seen yet" if state == 0
                           else "the first reply was not FUSE_INIT; passthrough not requested")
            return False
        fd = await threads.run_blocking(os.open, path, os.O_RDWR | os.O_CREAT, 0o600,
                                        limiter=threads.DISK)
        try:
            bid = await self.open(fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.reason = "the cache directory is on a stacked file system (overlayfs): it cannot back passthrough files"
            elif exc.errno == errno.EPERM:
                self.reason = "kernel refused FUSE passthrough (needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH, and root)"
            else:
                self.reason = f"kernel refused a backing file: {os.strerror(exc.errno or 0)}"
            return False
        finally:
            await threads.run_blocking(os.close, fd, limiter=threads.DISK)
        await self.close(bid)
        self.available = True
        self.reason = ""
        return True

    async def open(self, fd: int) -> int:
        """Register the open file ``fd`` as a backing file; its id.  The kernel
        keeps its own reference: ``fd`` may be closed afterwards."""
        bid = await threads.run_blocking(self._lib.cfpt_backing_open, fd, limiter=threads.DISK)
        if bid <= 0:
            raise OSError(-bid or errno.EIO, os.strerror(-bid or errno.EIO))
        metrics.inc("passthrough_backing_opens")
        return bid

    async def close(self, bid: int) -> None:
        res = await threads.run_blocking(self._lib.cfpt_backing_close, bid, limiter=threads.DISK)
        if res < 0:
            log.warning("closing backing file %d: %s", bid, os.strerror(-res))

    def expect(self, fh: int, bid: int, direct_io: bool) -> None:
        """The OPEN reply for ``fh`` (sent when the handler returns) gets
        FOPEN_PASSTHROUGH with backing ``bid``."""
        self._lib.cfpt_expect(fh, bid, FOPEN_DIRECT_IO if direct_io else 0)
