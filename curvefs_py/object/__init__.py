"""Object storage: ``open_store`` picks the ``ObjectStore`` for a ``--storage`` name.

``file``: ``bucket`` is a local directory (or ``file:///path``) -> ``FileStore``.
``s3``: ``bucket`` is a storage URL (``http://HOST:PORT/BUCKET``, ``https://...``,
``s3://BUCKET``) -> ``S3Store``; boto3 is imported only then.
"""
from __future__ import annotations

from ..errors import QuietError
from .base import ObjectInfo, ObjectStore
from .retry import RetryPolicy

__all__ = ["ObjectInfo", "ObjectStore", "RetryPolicy", "open_store", "STORAGES"]

STORAGES = ("file", "s3")


def open_store(storage: str, bucket: str, access_key: str = "", secret_key: str = "",
               region: str = "", create: bool = False, **opts) -> ObjectStore:
    """Blocking. Open the object store; does not probe it (call ``store.check()``).

    ``create`` (format): a missing ``file`` directory is created; S3 buckets are
    never created.  ``opts`` are ``S3Store`` keyword arguments (``max_pool``,
    ``connect_timeout``, ``read_timeout``, ``retry_policy``, ``check_policy``);
    the file store ignores them.

    Raises ``QuietError(msg, 3)`` for an unknown storage or a malformed URL, and
    ``ObjectStoreError`` subclasses (e.g. ``NoSuchBucket`` for a missing
    directory without ``create``) with one-line messages.
    """
    if storage == "file":
        from .file import FileStore

        path = bucket[len("file://"):] if bucket.startswith("file://") else bucket
        if not path:
            raise QuietError("no object directory given: use --bucket /path/to/dir", 3)
        return FileStore(path, create=create)
    if storage == "s3":
        from .s3 import S3Store

        try:
            return S3Store(bucket, access_key, secret_key, region, **opts)
        except ValueError as exc:
            raise QuietError(str(exc), 3) from None
    raise QuietError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}", 3)
