"""Plain data types shared by every layer (no behaviour, no imports of other layers)."""
from __future__ import annotations

import dataclasses
import stat
from dataclasses import dataclass
from typing import NewType, Optional

Ino = NewType("Ino", int)
Fh = NewType("Fh", int)

# File types, as stored in metadata (the S_IFMT bits of st_mode).
TYPE_FILE = stat.S_IFREG
TYPE_DIR = stat.S_IFDIR
TYPE_SYMLINK = stat.S_IFLNK
TYPE_FIFO = stat.S_IFIFO
TYPE_SOCK = stat.S_IFSOCK
TYPE_CHR = stat.S_IFCHR
TYPE_BLK = stat.S_IFBLK


@dataclass
class Attr:
    """Inode attributes, as the metadata engine stores them.

    ``mode`` holds type and permission bits (st_mode).  Times are integer
    nanoseconds since the epoch.  ``length`` is the file size in bytes (for a
    symlink, the target's length; for a directory 4096).
    """

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    length: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    #: Bumped whenever the file's data changes (write, truncate); the kernel
    #: page cache is kept across opens only while this is unchanged.
    data_version: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def copy(self, **changes) -> "Attr":
        return dataclasses.replace(self, **changes)


@dataclass
class SetAttr:
    """Which attributes a SETATTR changes: ``None`` means leave unchanged.

    ``atime_ns``/``mtime_ns`` may be the sentinel ``NOW`` (UTIME_NOW).
    """

    mode: Optional[int] = None  # permission bits only (07777)
    uid: Optional[int] = None
    gid: Optional[int] = None
    length: Optional[int] = None
    atime_ns: Optional[int] = None
    mtime_ns: Optional[int] = None
    ctime_ns: Optional[int] = None

    NOW = -1  # sentinel for UTIME_NOW


@dataclass(frozen=True)
class Slice:
    """One slice of a chunk: bytes ``[off, off+len)`` of slice object ``id``
    shown at chunk offset ``pos``.

    ``size`` is the total size of the slice object ``id`` (how many bytes were
    uploaded as blocks; the last block may be short).  ``id == 0`` is a hole:
    it reads as zeros and has no objects (used by truncate).
    Slices of a chunk are kept in commit order; later slices cover earlier ones.
    """

    pos: int
    id: int
    size: int
    off: int
    len: int


@dataclass
class DirEntry:
    name: bytes
    ino: int
    attr: Attr


@dataclass
class Format:
    """Volume settings, written once by ``curvefs format`` (``setting`` row)."""

    name: str
    uuid: str
    storage: str  # "file" | "s3"
    bucket: str  # directory path for "file", endpoint URL + bucket for "s3"
    block_size: int
    chunk_size: int
    capacity: int = 0  # bytes, 0 = unlimited
    inodes: int = 0  # 0 = unlimited
    access_key: str = ""
    secret_key: str = ""
    region: str = ""
    version: int = 1
    #: set while ``curvefs load`` fills a new database: mount, gc and fsck refuse it
    loading: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Format":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StatFs:
    total_space: int
    avail_space: int
    used_inodes: int
    avail_inodes: int


@dataclass
class Usage:
    used_space: int = 0
    used_inodes: int = 0
