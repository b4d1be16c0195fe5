"""Open a volume's metadata engine and object store for the offline commands
(``status``, ``gc``, ``fsck``), with one-line errors."""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

from ..config import check_meta_url, redact, refuse_foreign_bucket, refuse_unfinished_load
from ..errors import FsError, ObjectStoreError, QuietError


def open_volume(meta_url: str, loading_ok: bool = False):
    """(engine, Format) of the volume in META_URL; QuietError 5 if it holds none, or
    one that a ``curvefs load`` has not finished filling (unless ``loading_ok``)."""
    from ..meta import open_engine

    check_meta_url(meta_url)
    engine = open_engine(meta_url)
    try:
        fmt = engine.load()
        if not loading_ok:
            refuse_unfinished_load(fmt, meta_url)
        return engine, fmt
    except FsError as exc:
        engine.close()
        if exc.errno == errno.ENOENT:
            raise QuietError(f"{redact(meta_url)} holds no volume", 5) from None
        raise QuietError(f"cannot read metadata: {exc}", 4) from None
    except BaseException:
        engine.close()
        raise


#: Offline commands give up retrying an unreachable object store after this many
#: seconds, before the retry log turns to warnings (object/retry.py WARN_AFTER_S):
#: they are idempotent, so running them again after an outage is the cure.  (One
#: slow response may still take the store's read timeout.)
OFFLINE_DEADLINE_S = 5.0


def open_volume_store(fmt):
    """The volume's object store, opened without writing to it (no probe object)."""
    from ..object import RetryPolicy, open_store

    try:
        store = open_store(fmt.storage, fmt.bucket, fmt.access_key, fmt.secret_key, fmt.region,
                           retry_policy=RetryPolicy(deadline=OFFLINE_DEADLINE_S))
        refuse_foreign_bucket(store, fmt)
        return store
    except ObjectStoreError as exc:
        raise QuietError(f"object storage: {exc}", 4) from None



@contextlib.contextmanager
def backend_errors() -> Iterator[None]:
    """Metadata and object-store failures of a command as one line (exit 4)."""
    try:
        yield
    except ObjectStoreError as exc:
        raise QuietError(f"object storage: {exc}", 4) from None
    except FsError as exc:
        raise QuietError(f"metadata: {exc}", 4) from None


@contextlib.contextmanager
def open_volume_and_store(meta_url: str) -> Iterator[tuple]:
    """(engine, Format, store) of META_URL, both closed at the end; backend failures
    inside become one line (``backend_errors``)."""
    engine, fmt = open_volume(meta_url)
    try:
        store = open_volume_store(fmt)
        try:
            with backend_errors():
                yield engine, fmt, store
        finally:
            store.close()
    finally:
        engine.close()


def mountpoint_of(path: str) -> str:
    """The curvefs mount that ``path`` is on (QuietError 6 if none)."""
    from ..fuse.mountinfo import FSTYPE, containing_mount

    mp, fstype = containing_mount(path)  # from mountinfo: no call into a (dead) mount
    if fstype != FSTYPE:
        raise QuietError(f"{mp} is not a curvefs mount", 6)
    try:
        os.stat(os.path.join(mp, ".control"))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise QuietError(f"the daemon of {mp} is gone: `curvefs umount {mp}` clears the mount", 6) from None
        raise QuietError(f"{mp}: {exc.strerror}", 6) from None
    return mp
