"""Open-file table: file handles, per-inode open counts (unlink-while-open), dir snapshots."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Dict, Optional

from ..types import DirEntry


@dataclass
class Handle:
    fh: int
    ino: int
    flags: int = 0
    #: directory handles: the listing snapshot taken at opendir / rewind
    entries: Optional[list[DirEntry]] = None
    #: virtual files: the rendered contents frozen at open
    content: Optional[bytes] = None
    #: sequential-read detection: end offset of the previous read
    last_end: int = -1
    seq_reads: int = 0
    #: backing id when opened with FOPEN_PASSTHROUGH (0: cached mode)
    backing: int = 0
    #: an O_APPEND handle opened while the kernel's size was stale (direct_io): its
    #: writes go to the end of file as the daemon knows it, not the kernel's offset
    append_at_eof: bool = False


class Handles:
    """Non-blocking bookkeeping; touched only from the trio thread, except
    ``is_open`` which engines call from worker threads (a dict read)."""

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self.by_fh: Dict[int, Handle] = {}
        self.open_count: Dict[int, int] = {}
        self.writable_count: Dict[int, int] = {}

    def new(self, ino: int, flags: int = 0, *, is_file: bool = True) -> Handle:
        h = Handle(next(self._next), ino, flags)
        self.by_fh[h.fh] = h
        if is_file:
            self.open_count[ino] = self.open_count.get(ino, 0) + 1
            if flags & (os.O_WRONLY | os.O_RDWR):
                self.writable_count[ino] = self.writable_count.get(ino, 0) + 1
        return h

    def get(self, fh: int) -> Handle:
        return self.by_fh[fh]

    def release(self, fh: int, *, is_file: bool = True) -> tuple[Handle, bool]:
        """Drop a handle; returns (handle, whether it was the inode's last open)."""
        h = self.by_fh.pop(fh)
        if not is_file:
            return h, False
        if h.flags & (os.O_WRONLY | os.O_RDWR):
            w = self.writable_count.get(h.ino, 0) - 1
            if w <= 0:
                self.writable_count.pop(h.ino, None)
            else:
                self.writable_count[h.ino] = w
        n = self.open_count.get(h.ino, 0) - 1
        if n <= 0:
            self.open_count.pop(h.ino, None)
            return h, True
        self.open_count[h.ino] = n
        return h, False

    def is_writable(self, ino: int) -> bool:
        return self.writable_count.get(ino, 0) > 0

    def is_open(self, ino: int) -> bool:
        return self.open_count.get(ino, 0) > 0
