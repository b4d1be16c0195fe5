"""``ObjectStore``: the blocking, idempotent interface to object storage.

Objects are immutable: a key is written once (``put``) and later deleted;
never rewritten with other bytes.  Every method is **blocking** and is called
from worker threads (``threads.run_blocking(..., limiter=S3)``); stores must
be thread-safe.  Failures are ``errors.ObjectStoreError`` subclasses:
``NoSuchKey`` for a missing object, ``NoSuchBucket``, ``AccessDenied``, and
plain ``ObjectStoreError`` for everything else after retries.
"""
from __future__ import annotations

import abc
from typing import Iterator, NamedTuple, Optional


#: the object that says which volume a bucket belongs to (``curvefs format`` writes
#: the volume's uuid into it): two volumes on one bucket would share object keys
VOLUME_MARKER = "curvefs.uuid"


class ObjectInfo(NamedTuple):
    """One listed object: ``mtime`` is seconds since the epoch of its upload (S3
    ``LastModified``, the file's mtime), what ``gc`` judges an unnamed object's age by."""

    key: str
    size: int
    mtime: float


class ObjectStore(abc.ABC):
    #: a short description for logs and ``.config`` (no secrets)
    description: str = ""

    @abc.abstractmethod
    def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        """Blocking. Bytes ``[off, off+limit)`` of an object (``limit < 0``: to the end)."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Blocking. Store an object durably (atomic: readers see all or nothing)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Blocking. Remove an object; a missing object is not an error."""

    @abc.abstractmethod
    def head(self, key: str) -> int:
        """Blocking. The object's size; NoSuchKey if missing."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Blocking. Every object under ``prefix``, in key order."""

    def list_partial(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Blocking. Leftovers of puts that never finished (a crash during one), which
        ``list`` leaves out; ``gc`` removes old ones.  None where puts are atomic (S3)."""
        return iter(())

    def delete_partial(self, key: str) -> None:
        """Blocking. Remove one leftover that ``list_partial`` gave."""
        raise NotImplementedError(f"{type(self).__name__} has no partial uploads")

    def check(self) -> None:
        """Blocking. Prove the store works: put, get and delete a probe object.
        Raises ObjectStoreError subclasses with a one-line message."""
        import os

        key = f"probe/{os.urandom(8).hex()}"
        self.put(key, b"curvefs probe")
        try:
            if self.get(key) != b"curvefs probe":
                from ..errors import ObjectStoreError

                raise ObjectStoreError(msg=f"{self.description}: probe object read back wrong")
        finally:
            self.delete(key)

    def claimed_by(self) -> Optional[str]:
        """Blocking. The uuid of the volume that claimed this bucket, or None."""
        from ..errors import NoSuchKey

        try:
            return self.get(VOLUME_MARKER).decode(errors="replace").strip()
        except NoSuchKey:
            return None

    def claim(self, volume_uuid: str) -> None:
        """Blocking. Mark the bucket as the volume's (``claimed_by``)."""
        self.put(VOLUME_MARKER, volume_uuid.encode() + b"\n")

    def is_empty(self) -> bool:
        """Blocking. Whether the bucket holds no object at all."""
        return next(iter(self.list()), None) is None

    def close(self) -> None:
        """Blocking. Release connections."""
