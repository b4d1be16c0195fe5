"""``curvefs load META_URL FILE``: a volume from a ``curvefs dump``, into a new database.

The volume keeps its name, uuid and bucket: its data is not copied.  Used to move
a volume to another engine (SQLite -> Redis or PostgreSQL) or to restore a backup
of its metadata.  META_URL must hold no volume yet.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import sys

from ..config import check_meta_url, redact, refuse_foreign_bucket
from ..errors import FsError, ObjectStoreError, QuietError
from .volume import backend_errors


def register(sub) -> None:
    p = sub.add_parser("load", help="create a volume from a dump",
                       description="Create the volume of a `curvefs dump` FILE in META_URL (which must hold "
                                   "no volume), with the same bucket: the data is not copied.")
    p.add_argument("meta_url", metavar="META_URL")
    p.add_argument("file", metavar="FILE", help="a file written by `curvefs dump` (- for stdin)")
    p.add_argument("--secret-key", default=None,
                   help="S3 secret key, for a dump without one (default: $AWS_SECRET_ACCESS_KEY)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..maint.dump import load, read_header
    from ..meta import open_engine
    from ..object import open_store

    check_meta_url(args.meta_url)
    try:
        src = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    except OSError as exc:
        raise QuietError(f"{args.file}: {exc.strerror}", 3) from None
    with src:
        fmt, next_slice_id = read_header(src)
        if not fmt.secret_key:
            secret = args.secret_key if args.secret_key is not None else os.environ.get("AWS_SECRET_ACCESS_KEY", "")
            fmt = dataclasses.replace(fmt, secret_key=secret)
        try:  # the bucket must be there: the data is not in the dump
            store = open_store(fmt.storage, fmt.bucket, fmt.access_key, fmt.secret_key, fmt.region)
            store.check()
            refuse_foreign_bucket(store, fmt)
            store.close()
        except ObjectStoreError as exc:
            raise QuietError(f"object storage of the dumped volume: {exc}", 4) from None
        engine = open_engine(args.meta_url)
        try:
            with backend_errors():
                try:
                    engine.load()
                except FsError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                else:
                    raise QuietError(f"{redact(args.meta_url)} already holds a volume: load into a new one", 5)
                end = load(engine, fmt, next_slice_id, src)
        finally:
            engine.close()
    print(f"loaded volume {fmt.name}: {end['inodes']} inodes, {end['entries']} entries, "
          f"{end['slices']} slices", file=sys.stderr)
    return 0
