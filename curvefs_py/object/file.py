"""``FileStore``: objects as files under a local directory (the embedded default).

Key ``a/b/c`` is the file ``ROOT/a/b/c``: the ``/`` in block keys
(``chunks/<id/1e6>/<id/1e3>/<id>_<idx>_<len>``) becomes fan-out directories.

* **put** is atomic and durable: the bytes go to a hidden temporary file in the
  target directory (``.tmp-<random>``), which is fsynced, renamed over the key,
  and then the directory is fsynced.  Readers see the old state or the whole
  new object, never a prefix; after ``put`` returns, a crash keeps the object.
  Directories created on the way are fsynced into their parents.
* **get** reads a range with ``pread``; past the end it returns the bytes that
  exist (``b""`` beyond EOF), as an S3 ranged GET does short of the 416.
* **delete** is idempotent and prunes fan-out directories left empty (a
  concurrent ``put`` that loses its directory to the pruning creates it again).
  Deletes are not fsynced: a delete lost in a crash leaks an object that
  ``gc`` finds, it never loses data.
* **list** walks the tree lazily in key order (codepoint order of the keys, which
  is the UTF-8 byte order S3 uses), skipping temporary files.

Keys must be relative paths of non-empty components other than ``.``, ``..``
and ``.tmp-*`` (a ``ValueError`` otherwise: a bug in the caller).  A key cannot
be both an object and the prefix of another (``a`` and ``a/b``): the second put
fails with ``ObjectStoreError``; curvefs keys never collide that way.

There are no retries: local I/O errors are not temporary.  ``OSError``s become
``NoSuchKey`` (missing), ``AccessDenied`` (EACCES/EPERM) or ``ObjectStoreError``
with a one-line message.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Iterator

from .. import metrics
from ..errors import AccessDenied, NoSuchBucket, NoSuchKey, ObjectStoreError
from .base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
#: how often a put re-creates a directory that a concurrent delete pruned
_DIR_RACE_TRIES = 10


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore(ObjectStore):
    """Objects in a local directory (see the module docstring)."""

    def __init__(self, root_dir: str, *, create: bool = False):
        root = os.path.abspath(os.path.expanduser(root_dir))
        if not os.path.isdir(root):
            if os.path.exists(root):
                raise ObjectStoreError(msg=f"object directory {root} is not a directory")
            if not create:
                raise NoSuchBucket(msg=f"object directory {root} does not exist")
            try:
                self._makedirs(root)
            except OSError as exc:
                raise self._os_error(exc, "create", root) from None
        self.root = root
        self.description = f"file {root}"

    # ----------------------------------------------------------------------------- helpers

    def _path(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError(f"invalid object key {key!r}")
        parts = key.split("/")
        for part in parts:
            if (not part or part in (".", "..") or part.startswith(TMP_PREFIX) or "\0" in part
                    or len(part.encode("utf-8", "surrogateescape")) > 255):
                raise ValueError(f"invalid object key {key!r}")
        return os.path.join(self.root, *parts)

    @staticmethod
    def _makedirs(path: str) -> None:
        """mkdir -p, fsyncing each new directory into its parent."""
        missing = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
                continue
            _fsync_dir(os.path.dirname(d))

    def _os_error(self, exc: OSError, op: str, key: str) -> ObjectStoreError:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return AccessDenied(msg=f"{op} {key} in {self.root}: {exc.strerror}")
        return ObjectStoreError(msg=f"{op} {key} in {self.root}: {exc.strerror or exc}")

    # ------------------------------------------------------------------------------- API

    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        """Blocking. Bytes ``[off, off+limit)`` of the object (``limit < 0``: to the end)."""
        path = self._path(key)
        t0 = time.perf_counter()
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            metrics.inc("object_errors")
            raise NoSuchKey(msg=f"object {key} not found in {self.root}") from None
        except OSError as exc:
            metrics.inc("object_errors")
            raise self._os_error(exc, "GET", key) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                metrics.inc("object_errors")
                raise NoSuchKey(msg=f"object {key} not found in {self.root}")
            end = st.st_size if limit < 0 else min(st.st_size, off + limit)
            parts = []
            pos = off
            while pos < end:
                buf = os.pread(fd, end - pos, pos)
                if not buf:
                    break
                parts.append(buf)
                pos += len(buf)
        except OSError as exc:
            metrics.inc("object_errors")
            raise self._os_error(exc, "GET", key) from None
        finally:
            os.close(fd)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        metrics.observe_us("object_get", (time.perf_counter() - t0) * 1e6)
        metrics.inc("object_get_bytes", len(data))
        return data

    def put(self, key: str, data: bytes) -> None:
        """Blocking. Write the object atomically and durably (tmp + fsync + rename + fsync dir)."""
        path = self._path(key)
        dirname = os.path.dirname(path)
        t0 = time.perf_counter()
        try:
            for i in range(_DIR_RACE_TRIES):
                tmp = os.path.join(dirname, f"{TMP_PREFIX}{os.urandom(8).hex()}")
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileNotFoundError:
                    if i == _DIR_RACE_TRIES - 1:
                        raise
                    try:
                        self._makedirs(dirname)  # new fan-out dir, or pruned by a delete
                    except (FileNotFoundError, FileExistsError):
                        pass  # a delete pruned a directory between our mkdirs: go round again
                    continue
                break
            try:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(dirname)
        except (IsADirectoryError, NotADirectoryError):
            metrics.inc("object_errors")
            raise ObjectStoreError(
                msg=f"PUT {key} in {self.root}: key collides with another key's directory") from None
        except OSError as exc:
            metrics.inc("object_errors")
            raise self._os_error(exc, "PUT", key) from None
        metrics.observe_us("object_put", (time.perf_counter() - t0) * 1e6)
        metrics.inc("object_put_bytes", len(data))

    def delete(self, key: str) -> None:
        """Blocking. Remove the object if it exists; prune empty fan-out directories."""
        path = self._path(key)
        t0 = time.perf_counter()
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # no such object: deleting is idempotent
        except OSError as exc:
            if exc.errno == errno.EPERM and os.path.isdir(path):
                pass  # Linux says EPERM for unlink(directory): no such object either
            else:
                metrics.inc("object_errors")
                raise self._os_error(exc, "DELETE", key) from None
        else:
            self._prune(os.path.dirname(path))
        metrics.observe_us("object_delete", (time.perf_counter() - t0) * 1e6)

    def head(self, key: str) -> int:
        """Blocking. Size of the object; NoSuchKey if missing."""
        path = self._path(key)
        t0 = time.perf_counter()
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as exc:
            metrics.inc("object_errors")
            raise self._os_error(exc, "HEAD", key) from None
        if st is None or not stat.S_ISREG(st.st_mode):
            metrics.inc("object_errors")
            raise NoSuchKey(msg=f"object {key} not found in {self.root}")
        metrics.observe_us("object_head", (time.perf_counter() - t0) * 1e6)
        return st.st_size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Blocking. Every object whose key starts with ``prefix``, in key order."""
        return self._list(prefix, partial=False)

    def list_partial(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Blocking. The temporary files of puts that never finished (a crash between
        write and rename), under directories whose keys start with ``prefix``."""
        return self._list(prefix, partial=True)

    def _list(self, prefix: str, partial: bool) -> Iterator[ObjectInfo]:
        base, sep, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *base.split("/")) if base else self.root
        return self._walk(start, base + sep, prefix, partial)

    def delete_partial(self, key: str) -> None:
        """Blocking. Remove a temporary file that ``list_partial`` gave."""
        parent, _, name = key.rpartition("/")
        if not name.startswith(TMP_PREFIX) or "/" in name:
            raise ValueError(f"not a partial upload: {key!r}")
        path = os.path.join(self._path(parent), name) if parent else os.path.join(self.root, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            metrics.inc("object_errors")
            raise self._os_error(exc, "DELETE", key) from None
        self._prune(os.path.dirname(path))

    def _prune(self, d: str) -> None:
        """Remove the fan-out directories an unlink left empty, up to the root."""
        while d != self.root and d.startswith(self.root + os.sep):
            try:
                os.rmdir(d)
            except OSError:
                break  # not empty (or gone already): stop pruning
            d = os.path.dirname(d)

    def _walk(self, dirpath: str, keyprefix: str, prefix: str, partial: bool) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(dirpath) as it:
                entries = []
                for e in it:
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if not is_dir and e.name.startswith(TMP_PREFIX) != partial:
                        continue  # a put's temporary file, or (partial) an object
                    # a directory sorts as "name/": every key below it starts with that
                    entries.append((keyprefix + e.name + ("/" if is_dir else ""), is_dir, e))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            metrics.inc("object_errors")
            raise self._os_error(exc, "LIST", keyprefix or "/") from None
        metrics.inc("object_list_count")
        entries.sort(key=lambda t: t[0])
        for name, is_dir, e in entries:
            if is_dir:
                if name.startswith(prefix) or prefix.startswith(name):
                    yield from self._walk(e.path, name, prefix, partial)
            elif name.startswith(prefix):
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we walked
                if stat.S_ISREG(st.st_mode):
                    yield ObjectInfo(name, st.st_size, st.st_mtime)
