"""Error types shared by every layer, and the one table that maps them to errnos.

Layers raise ``FsError`` subclasses (or ``FsError(errno)`` directly); only
``fuse/operations.py`` turns them into ``pyfuse3.FUSEError``.  The CLI raises
``QuietError``, which becomes one line on stderr and a fixed exit code.
"""
from __future__ import annotations

import errno as _errno


class FsError(Exception):
    """A file-system level failure that maps to one errno."""

    errno: int = _errno.EIO

    def __init__(self, errno: int | str | None = None, msg: str = ""):
        # ``MetaError("text")``: a subclass raised with just a message keeps its
        # class errno (the errno must be an int: it goes to the kernel as is)
        if isinstance(errno, str):
            errno, msg = None, msg or errno
        if errno is not None:
            self.errno = int(errno)
        super().__init__(msg or _errno.errorcode.get(self.errno, str(self.errno)))


class ObjectStoreError(FsError):
    """The object store failed (after retries); the caller sees EIO."""

    errno = _errno.EIO


class NoSuchKey(ObjectStoreError):
    """An object that metadata points to is missing. Sets failsafe: mutations get EROFS."""

    errno = _errno.EIO


class NoSuchBucket(ObjectStoreError):
    errno = _errno.EIO


class AccessDenied(ObjectStoreError):
    errno = _errno.EACCES


class MetaError(FsError):
    """The metadata engine failed (after retries)."""

    errno = _errno.EIO


class TxConflict(MetaError):
    """A transaction lost a race; the engine retries it (bounded) before giving up."""

    errno = _errno.EAGAIN


class CacheFull(FsError):
    """The local cache disk is full; writes fall back to memory or fail with ENOSPC."""

    errno = _errno.ENOSPC


class QuietError(Exception):
    """An error for the user: printed as one line, exits with ``exitcode``.

    Exit codes (documented in README.md):
      1  generic failure            2  usage error (argparse)
      3  bad META_URL / storage URL 4  storage unreachable / missing bucket / bad credentials
      5  volume exists (format without --force) or not formatted (mount)
      6  mountpoint missing, not a directory, or busy
      7  mount failed to start (FUSE init)
    """

    def __init__(self, msg: str, exitcode: int = 1):
        super().__init__(msg)
        self.exitcode = exitcode


#: Errnos of the ``FsError`` classes, one table (as mountpoint-s3's ToErrno).
#: NoSuchKey is EIO (data that metadata promises is gone: the file system is damaged),
#: AccessDenied from the object store is EACCES only at format/mount time; while
#: mounted every object-store failure is EIO for the caller.
ERRNO = {
    FsError: _errno.EIO,
    ObjectStoreError: _errno.EIO,
    NoSuchKey: _errno.EIO,
    NoSuchBucket: _errno.EIO,
    AccessDenied: _errno.EACCES,
    MetaError: _errno.EIO,
    TxConflict: _errno.EAGAIN,
    CacheFull: _errno.ENOSPC,
}
