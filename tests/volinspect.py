"""Look at a volume from outside the daemon: its sqlite metadata and its bucket.

For crash and garbage-collection tests ("other clients are simulated through meta or the
bucket", STYLE §6.3 rule 9).  Read-only: the metadata database is opened with
``mode=ro`` and objects are only listed.  Works for ``sqlite3://`` volumes on the
``file`` and ``s3`` stores.
"""
from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse

from curvefs_py.chunk.layout import slice_keys


def _db(meta_url: str) -> sqlite3.Connection:
    path = meta_url.split("://", 1)[1].split("?", 1)[0]
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def volume_format(meta_url: str) -> dict:
    with _db(meta_url) as db:
        (raw,) = db.execute("SELECT value FROM setting WHERE name = 'format'").fetchone()
    return json.loads(raw)


def live_keys(meta_url: str) -> set[str]:
    """Keys of every block object that a committed slice of a file names."""
    fmt = volume_format(meta_url)
    with _db(meta_url) as db:
        rows = db.execute("SELECT DISTINCT id, size FROM chunk WHERE id <> 0").fetchall()
    keys: set[str] = set()
    for sid, size in rows:
        keys.update(slice_keys(int(sid), int(size), fmt["block_size"]))
    return keys


def queued_keys(meta_url: str) -> set[str]:
    """Keys of slices queued for deletion (delslices: not yet deleted by a daemon)."""
    fmt = volume_format(meta_url)
    with _db(meta_url) as db:
        rows = db.execute("SELECT id, size FROM delslices").fetchall()
    keys: set[str] = set()
    for sid, size in rows:
        keys.update(slice_keys(int(sid), int(size), fmt["block_size"]))
    return keys


def s3_client(fmt: dict):
    import boto3
    from botocore.config import Config

    u = urllib.parse.urlsplit(fmt["bucket"])
    return boto3.client(
        "s3", endpoint_url=f"{u.scheme}://{u.netloc}", region_name=fmt.get("region") or "us-east-1",
        aws_access_key_id=fmt["access_key"], aws_secret_access_key=fmt["secret_key"], verify=False,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 3},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))


def object_keys(meta_url: str, prefix: str = "chunks/") -> set[str]:
    """Keys of the block objects in the volume's bucket (probe objects excluded)."""
    fmt = volume_format(meta_url)
    if fmt["storage"] == "file":
        root = fmt["bucket"]
        out = set()
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                if key.startswith(prefix):
                    out.add(key)
        return out
    bucket = urllib.parse.urlsplit(fmt["bucket"]).path.strip("/")
    client = s3_client(fmt)
    out = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update(obj["Key"] for obj in page.get("Contents") or [])
    return out


def dangling_keys(meta_url: str) -> set[str]:
    """Objects that committed metadata names but the bucket does not hold (must be empty)."""
    return live_keys(meta_url) - object_keys(meta_url)


def file_keys(meta_url: str, ino: int) -> list[str]:
    """Keys of the block objects one file's chunks name, in key order."""
    fmt = volume_format(meta_url)
    with _db(meta_url) as db:
        rows = db.execute("SELECT DISTINCT id, size FROM chunk WHERE ino = ? AND id <> 0", (ino,)).fetchall()
    return sorted(k for sid, size in rows for k in slice_keys(int(sid), int(size), fmt["block_size"]))


def open_volume_store(meta_url: str):
    """The volume's ObjectStore (the product's own client), to plant or remove objects."""
    from curvefs_py.object import open_store

    fmt = volume_format(meta_url)
    return open_store(fmt["storage"], fmt["bucket"], fmt["access_key"], fmt["secret_key"],
                      fmt.get("region") or "")
