"""``curvefs format META_URL NAME``: create a volume (proves the storage works first)."""
from __future__ import annotations

import errno
import os
import uuid

from ..config import (check_meta_url, parse_size, redact, refuse_foreign_bucket, refuse_unfinished_load,
                      sqlite_path)
from ..errors import FsError, ObjectStoreError, QuietError
from .. import CHUNK_SIZE


def register(sub) -> None:
    p = sub.add_parser("format", help="create a volume",
                       description="Create a volume: metadata in META_URL, data in --bucket.")
    p.add_argument("meta_url", metavar="META_URL", help="sqlite3:///path/vol.db, redis://host:port/db, postgres://user:pass@host/db")
    p.add_argument("name", metavar="NAME", help="volume name")
    p.add_argument("--storage", choices=["file", "s3"], default="file", help="object storage kind (default: file)")
    p.add_argument("--bucket", help="a directory for 'file' (default: beside a sqlite DB), or an endpoint URL with the bucket for 's3', e.g. http://127.0.0.1:9000/mybucket")
    p.add_argument("--access-key", default=None, help="S3 access key (default: $AWS_ACCESS_KEY_ID)")
    p.add_argument("--secret-key", default=None, help="S3 secret key (default: $AWS_SECRET_ACCESS_KEY)")
    p.add_argument("--region", default="", help="S3 region (default: us-east-1)")
    p.add_argument("--block-size", default="4M", help="size of one block object (default 4M; 64K–64M)")
    p.add_argument("--capacity", default="0", help="space limit, e.g. 100G (default: unlimited)")
    p.add_argument("--inodes", type=int, default=0, help="inode limit (default: unlimited)")
    p.add_argument("--force", action="store_true", help="overwrite the settings of an existing volume (data is kept)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..meta import open_engine
    from ..object import open_store
    from ..types import Format

    check_meta_url(args.meta_url)
    block_size = parse_size(args.block_size)
    if not (64 << 10) <= block_size <= (64 << 20) or block_size & (block_size - 1):
        raise QuietError("--block-size must be a power of two between 64K and 64M", 3)
    if args.inodes < 0:
        raise QuietError("--inodes must be >= 0 (0: unlimited)", 3)
    if not args.name or len(args.name) > 63 or "/" in args.name:
        raise QuietError(f"invalid volume name {args.name!r}", 3)
    bucket = args.bucket
    if args.storage == "file" and not bucket:
        if args.meta_url.startswith("sqlite"):
            bucket = os.path.join(os.path.dirname(os.path.abspath(sqlite_path(args.meta_url))), f"{args.name}-objects")
        else:
            raise QuietError("--bucket DIR is required for --storage file with a shared metadata engine", 3)
    if args.storage == "s3" and not bucket:
        raise QuietError("--bucket http://HOST:PORT/BUCKET is required for --storage s3", 3)
    if args.storage == "file":
        bucket = os.path.abspath(bucket)
    access_key = args.access_key if args.access_key is not None else os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret_key = args.secret_key if args.secret_key is not None else os.environ.get("AWS_SECRET_ACCESS_KEY", "")

    if args.meta_url.startswith("sqlite"):
        d = os.path.dirname(os.path.abspath(sqlite_path(args.meta_url)))
        if not os.path.isdir(d):
            raise QuietError(f"directory {d} for the metadata database does not exist", 3)
    engine = open_engine(args.meta_url)
    try:
        try:
            old = engine.load()
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise QuietError(f"cannot read metadata: {exc}", 4) from None
            old = None
        if old is not None:  # --force does not finish (or hide) an unfinished load
            refuse_unfinished_load(old, args.meta_url)
        if old is not None and not args.force:
            raise QuietError(f"{redact(args.meta_url)} already holds volume {old.name!r}; use --force to overwrite its settings", 5)
        fmt = Format(name=args.name, uuid=old.uuid if old else str(uuid.uuid4()), storage=args.storage,
                     bucket=bucket, block_size=old.block_size if old else block_size,
                     chunk_size=CHUNK_SIZE, capacity=parse_size(args.capacity, "g") if args.capacity != "0" else 0,
                     inodes=args.inodes, access_key=access_key, secret_key=secret_key, region=args.region)
        try:
            store = open_store(args.storage, bucket, access_key, secret_key, args.region, create=True)
            store.check()
            # a bucket is one volume's: the same object keys would name two volumes'
            # data (JuiceFS refuses a non-empty one too)
            refuse_foreign_bucket(store, fmt)
            if old is None and not store.is_empty():  # (a new uuid: any claim was refused above)
                raise QuietError(f"bucket {bucket} is not empty: pick another bucket, or empty it", 5)
        except ObjectStoreError as exc:
            raise QuietError(f"object storage: {exc}", 4) from None
        try:
            engine.init(fmt, force=args.force)
        except FsError as exc:
            raise QuietError(f"format failed: {exc}", 5 if exc.errno == errno.EEXIST else 4) from None
        try:  # after the volume exists: a failed format leaves no claim behind
            store.claim(fmt.uuid)
        except ObjectStoreError as exc:
            raise QuietError(f"object storage: {exc}", 4) from None
    finally:
        engine.close()
    print(f"volume {fmt.name} ({fmt.uuid}) formatted: metadata {redact(args.meta_url)}, data {fmt.storage}:{bucket}")
    return 0
