"""KernelNotifier: the daemon's side of the kernel caches (pyfuse3 notify calls), off the loop.

Rules (pyfuse3 docstrings, STYLE §6.3 rule 6):
* ``invalidate_inode`` may block (writeback caching): it runs in a worker thread.
* ``invalidate_entry`` blocks while a related request is pending: it runs in
  a worker thread of its own limiter, never inside a request handler and
  never while holding a lock a request needs (pyfuse3's ``_async`` variant
  would log every ENOENT — an entry the kernel does not hold — as an error).
* ``notify_store`` fills the page cache and *extends the file past EOF*: the
  caller passes the file length and we never store past it; only whole pages
  (except a file's last page); if the kernel answers ENOSYS the notifier turns
  ``store`` off for good.  A partial failure counts as not cached.
"""
from __future__ import annotations

import errno
import logging

import pyfuse3

from .. import metrics, threads

log = logging.getLogger(__name__)

PAGE = 4096


class KernelNotifier:
    def __init__(self, budget_bytes: int = 1 << 30):
        self.store_enabled = True
        self.store_disabled_reason = ""
        self.budget_bytes = budget_bytes

    async def invalidate_inode(self, ino: int, attr_only: bool = False) -> None:
        def call():
            try:
                pyfuse3.invalidate_inode(ino, attr_only)
            except OSError as exc:  # ENOENT: the kernel does not know the inode
                if exc.errno != errno.ENOENT:
                    log.warning("invalidate_inode(%d): %s", ino, exc)
        await threads.run_blocking(call, limiter=threads.INVAL)
        metrics.inc("kernel_invalidate_inode")

    async def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Drop a (maybe) cached entry.  Runs ``invalidate_entry`` in a worker
        thread: it may wait for a related pending request, which the loop keeps
        serving meanwhile; ENOENT (the kernel does not hold it) is normal."""
        def call():
            try:
                pyfuse3.invalidate_entry(parent, name)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("invalidate_entry(%d, %r): %s", parent, name, exc)
        await threads.run_blocking(call, limiter=threads.INVAL)
        metrics.inc("kernel_invalidate_entry")

    async def store(self, ino: int, off: int, data: bytes, length: int) -> bool:
        """Push ``data`` at ``off`` into the page cache of ``ino`` (file length
        ``length``): clipped to EOF and to page boundaries. True if stored."""
        if not self.store_enabled:
            return False
        if off % PAGE:
            skip = PAGE - off % PAGE
            off, data = off + skip, data[skip:]
        end = min(off + len(data), length)
        if end < length:
            end -= end % PAGE  # whole pages only, except the file's last page
        if end <= off:
            return False
        data = data[:end - off]

        def call():
            pyfuse3.notify_store(ino, off, data)

        try:
            await threads.run_blocking(call, limiter=threads.PUSH)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                self.store_enabled = False
                self.store_disabled_reason = "kernel does not support FUSE_NOTIFY_STORE"
                log.warning("notify_store unsupported: pushing into the page cache is off")
            else:
                metrics.inc("kernel_push_errors")
                log.debug("notify_store(%d, %d, %d): %s", ino, off, len(data), exc)
            return False
        metrics.inc("kernel_pushed_bytes", len(data))
        return True
