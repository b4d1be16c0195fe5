"""Background compaction of fragmented chunks (DESIGN §3).

Every write adds a slice; random small writes therefore leave a chunk with
many slices, which makes reads (the overlay) and commits slower.  When a chunk
holds more than ``threshold`` slices, the compactor reads the chunk's visible
bytes (holes inside the range as zeros), uploads them as one new slice and
commits it with ``Engine.write(..., expect_version=v, expect_rows=rows)``: the
commit happens only if no write landed and no other compaction replaced the
chunk's rows since the bytes were read (else EAGAIN and the new objects are
deleted), so compaction never covers newer data, on any client.
The new slice hides all the old ones, which the engine's own rule then drops
and queues for deletion in the same transaction.  The file reads the same, so
the commit leaves its data_version and times alone: kernel pages, passthrough
images and attribute caches of it stay valid, here and on other clients.

Triggers: a commit that added slices to a chunk (counted per chunk, checked
every ``threshold // 4`` commits), and a read that found a long slice list.
Compaction is skipped while the inode has unflushed local writes.
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Dict, Set

import trio

from .. import metrics
from ..chunk.layout import overlay
from ..errors import FsError, NoSuchKey
from ..types import Slice

if TYPE_CHECKING:
    from .vfs import VFS

log = logging.getLogger(__name__)


class Compactor:
    def __init__(self, vfs: "VFS", threshold: int = 64):
        self.vfs = vfs
        self.threshold = threshold
        self._commits: Dict[tuple[int, int], int] = {}
        self._busy: Set[tuple[int, int]] = set()
        self._limit = trio.CapacityLimiter(1)

    def committed(self, ino: int, chunk_idxs) -> None:
        for idx in set(chunk_idxs):
            key = (ino, idx)
            n = self._commits.get(key, 0) + 1
            if n >= max(1, self.threshold // 4):
                self._commits.pop(key, None)
                self._spawn(key, check=True)
            else:
                self._commits[key] = n

    def seen(self, ino: int, chunk_idx: int, nslices: int) -> None:
        if nslices > self.threshold:
            self._spawn((ino, chunk_idx), check=False)

    def _spawn(self, key: tuple[int, int], check: bool) -> None:
        nursery = self.vfs._nursery
        if nursery is None or key in self._busy or self.threshold <= 0:
            return
        self._busy.add(key)
        nursery.start_soon(self._run, key, check, name=f"compact-{key[0]}-{key[1]}")

    async def _run(self, key: tuple[int, int], check: bool) -> None:
        try:
            async with self._limit:
                await self.compact(*key, check=check)
        except Exception as exc:  # compaction is an optimisation: never fatal
            if isinstance(exc, FsError) and exc.errno == errno.ENOENT:
                metrics.inc("compact_conflicts")  # the file was deleted meanwhile: nothing to do
            else:
                metrics.inc("compact_errors")
                log.warning("compaction of inode %d chunk %d failed: %s", key[0], key[1], exc)
        finally:
            self._busy.discard(key)

    async def compact(self, ino: int, idx: int, check: bool = False) -> bool:
        """Compact one chunk now; True if a new slice was committed."""
        vfs = self.vfs
        if vfs.writers.get(ino) is not None:
            return False
        attr = await vfs._meta(vfs.engine.getattr, ino)
        slices = await vfs._meta(vfs.engine.read_chunk, ino, idx)
        if len(slices) <= (self.threshold if check else 1):
            return False
        cs = vfs.fmt.chunk_size
        end = min(cs, attr.length - idx * cs)
        if end <= 0:
            return False
        segs = [s for s in overlay(slices, 0, end) if s.id]
        if not segs:
            return False
        first, last = segs[0].pos, segs[-1].pos + segs[-1].len
        data = bytearray(last - first)
        try:
            for seg in segs:
                part = await vfs.chunks.read(seg.id, seg.size, seg.off, seg.len)
                data[seg.pos - first:seg.pos - first + seg.len] = part
        except NoSuchKey:
            # another client committed (or compacted) meanwhile and the slices we
            # read are gone: nothing to do, that commit made a new list anyway
            metrics.inc("compact_conflicts")
            return False
        new_id = await vfs._new_slice_id()
        bs = vfs.fmt.block_size
        async with trio.open_nursery() as n:
            for b in range(0, len(data), bs):
                n.start_soon(vfs.chunks.upload_block, new_id, b // bs, bytes(data[b:b + bs]))
        new = Slice(first, new_id, len(data), 0, len(data))
        try:
            committed = await vfs._meta(vfs.engine.write, ino, [(idx, new)], 0, attr.mtime_ns,
                                        attr.data_version, slices)
        except FsError as exc:
            vfs._delete_later(new_id, len(data))
            if exc.errno in (errno.EAGAIN, errno.ENOENT):
                metrics.inc("compact_conflicts")
                return False
            raise
        metrics.inc("compact_chunks")
        metrics.inc("compact_slices_replaced", len(slices))
        vfs._on_rewrite(committed)
        return True
