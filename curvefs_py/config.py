"""Parsing of user input: sizes, META_URLs, mount options (errors are QuietError, exit 3)."""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

from .errors import QuietError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | int, default_unit: str = "") -> int:
    """'4M', '512k', '10G', '1048576' → bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise QuietError(f"invalid size {text!r} (examples: 4M, 512K, 10G)", 3)
    unit = m.group(2) or default_unit
    return int(float(m.group(1)) * _UNITS[unit])


def check_meta_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("sqlite3", "sqlite"):
        path = sqlite_path(url)
        if not path:
            raise QuietError(f"invalid sqlite URL {url!r} (expected sqlite3:///path/to/vol.db)", 3)
        return url
    if parts.scheme in ("redis", "rediss", "postgres", "postgresql"):
        return url
    raise QuietError(f"unknown metadata URL scheme {parts.scheme!r} in {url!r} "
                     "(expected sqlite3://, redis:// or postgres://)", 3)


def redact(url: str) -> str:
    """A URL fit for messages and logs: the password replaced by ****."""
    return re.sub(r"://([^:/@]*):([^@]*)@", r"://\1:****@", url)


def sqlite_path(url: str) -> str:
    """The database file of a sqlite3:// URL ('sqlite3:///abs/x.db' → '/abs/x.db',
    'sqlite3://rel.db' → 'rel.db')."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    return rest.split("?", 1)[0]


@dataclass
class MountOptions:
    meta_url: str
    mountpoint: str
    cache_dir: str = "/var/cache/curvefs"
    cache_size: int = 10 << 30
    mem_cache_size: int = 256 << 20
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    negative_timeout: float = 0.0
    log_file: Optional[str] = None
    debug: bool = False
    no_bpf: bool = False
    max_uploads: int = 20
    readahead: int = 0  # 0: four blocks
    kernel_cache_budget: int = 1 << 30
    push_whole_max: int = 128 << 20
    io_timeout: float = 30.0  # retry deadline of one object request (s); also caps the read timeout
    extra: dict = field(default_factory=dict)


def refuse_unfinished_load(fmt, meta_url: str) -> None:
    """QuietError 5 for a volume that ``curvefs load`` has not finished filling: its
    tree is partial, so mounting it or collecting its "leaks" would do harm."""
    if getattr(fmt, "loading", False):
        raise QuietError(f"{redact(meta_url)} holds a volume that a `curvefs load` did not finish: "
                         "load the dump again into a new database", 5)


def refuse_foreign_bucket(store, fmt) -> None:
    """Blocking. Refuse a bucket another volume claimed (exit 5): the same object keys
    would name both volumes' data, and gc would take the other's objects for leaks.
    A bucket formatted before the marker existed has none and is accepted."""
    owner = store.claimed_by()
    if owner is not None and owner != fmt.uuid:
        raise QuietError(f"bucket {fmt.bucket} belongs to another volume ({owner}), "
                         f"not to {fmt.name} ({fmt.uuid})", 5)
