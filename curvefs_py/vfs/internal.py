"""Virtual files at a reserved inode range: ``.stats`` and ``.config`` in the root.

They are found by ``lookup`` in the root directory (not listed by readdir, as
JuiceFS does), read-only, and served with ``direct_io`` so every read shows
the snapshot taken at ``open``.  ``curvefs stats`` reads ``MOUNTPOINT/.stats``
and needs no privileges.
"""
from __future__ import annotations

import json
import stat
import time
from typing import Callable, Dict

from .. import INTERNAL_INODE_BASE, metrics
from ..types import Attr

STATS_INO = INTERNAL_INODE_BASE + 1
CONFIG_INO = INTERNAL_INODE_BASE + 2

NAMES = {b".stats": STATS_INO, b".config": CONFIG_INO}


def is_internal(ino: int) -> bool:
    return ino >= INTERNAL_INODE_BASE


class InternalFiles:
    def __init__(self, config: Callable[[], Dict]):
        self._config = config
        self._start_ns = time.time_ns()

    def render(self, ino: int) -> bytes:
        if ino == STATS_INO:
            return metrics.render_text().encode()
        if ino == CONFIG_INO:
            return (json.dumps(self._config(), indent=2, sort_keys=True) + "\n").encode()
        raise KeyError(ino)

    def attr(self, ino: int) -> Attr:
        now = time.time_ns()
        return Attr(ino=ino, mode=stat.S_IFREG | 0o444, nlink=1, uid=0, gid=0,
                    length=len(self.render(ino)), atime_ns=now, mtime_ns=now,
                    ctime_ns=self._start_ns)
