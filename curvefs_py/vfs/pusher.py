"""Kernel-cache pusher: fill the page cache with ``notify_store`` before readers ask.

What is pushed (DESIGN §5), always only bytes the daemon holds or has just
fetched, in *units* of one block-size window aligned in the file:

* on ``open`` for reading: whole files up to ``push_whole_max``, else the first
  ``push_head`` bytes — from the memory/disk cache only (never a GET);
* on a random READ that reached the daemon: the rest of the unit around it
  (so the next random reads in that unit are kernel hits); a sequential
  reader is served by the kernel's readahead (raised at mount) while the VFS
  prefetches its next blocks into the block cache; a unit pushed before and
  read again was evicted by the kernel: it is re-pushed (``pusher_repushed_bytes``) — pages an application dropped on
  purpose (fadvise DONTNEED, drop_caches) therefore come back only when read;
* ``warmup``: everything, fetched if needed.

Rules: never past EOF (``KernelNotifier.store`` clips to the length), whole
pages only, a per-mount byte budget (the BPF residency count when the probes
are loaded, else the bytes pushed since the kernel last dropped the file),
never for inodes open for writing, never from inside a request handler (the
pushes run as background tasks and ``notify_store`` in a worker thread).  A
write or truncate that overlaps a push (the per-inode generation changed
while the push ran) invalidates the inode's pages, so a push can never leave
stale data in the page cache.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, Optional, Set

import trio

from .. import metrics
from ..chunk.layout import chunk_ranges, overlay

if TYPE_CHECKING:
    from ..chunk.store import ChunkStore
    from ..types import Slice

log = logging.getLogger(__name__)


class Pusher:
    def __init__(self, notifier, chunks: "ChunkStore", chunk_size: int, block_size: int,
                 get_slices: Callable[[int, int], Awaitable[list["Slice"]]],
                 *, budget: int = 1 << 30, push_whole_max: int = 128 << 20,
                 push_head: int = 8 << 20, window: int = 16 << 20,
                 resident_bytes: Optional[Callable[[], Optional[int]]] = None):
        self.notifier = notifier
        self.chunks = chunks
        self.chunk_size = chunk_size
        self.unit = block_size
        self.get_slices = get_slices
        self.budget = budget
        self.push_whole_max = push_whole_max
        self.push_head = push_head
        self.window = window
        self.resident_bytes = resident_bytes  # BPF: bytes of this mount in the page cache
        self.pushed: Dict[int, Set[int]] = {}
        self.gen: Dict[int, int] = {}
        self._busy: Set[tuple[int, int]] = set()
        self.nursery: Optional[trio.Nursery] = None
        self.blocked: Callable[[int], bool] = lambda ino: False
        self._limit = trio.CapacityLimiter(4)

    @property
    def enabled(self) -> bool:
        return self.notifier is not None and self.nursery is not None and \
            getattr(self.notifier, "store_enabled", False) and self.budget > 0

    # ------------------------------------------------------ bookkeeping
    def changed(self, ino: int) -> None:
        """Data of ``ino`` changed (write, truncate): pushes in flight are void."""
        self.gen[ino] = self.gen.get(ino, 0) + 1

    def dropped(self, ino: int) -> None:
        """The kernel dropped (or will drop) every page of ``ino``."""
        self.pushed.pop(ino, None)
        self.changed(ino)

    def _pushed_total(self) -> int:
        if self.resident_bytes is not None:
            r = self.resident_bytes()
            if r is not None:
                return r
        return sum(len(s) for s in self.pushed.values()) * self.unit

    # ---------------------------------------------------------- triggers
    def on_open(self, ino: int, length: int, keep_cache: bool) -> None:
        if not keep_cache:
            self.dropped(ino)
        if not self.enabled or length == 0 or self.blocked(ino):
            return
        end = length if length <= self.push_whole_max else min(length, self.push_head)
        self._spawn(ino, 0, end, length, fetch=False, why="open")

    def on_read(self, ino: int, off: int, size: int, length: int, sequential: bool) -> None:
        """A READ reached the daemon.  Random reads: push the rest of the unit
        around it (and re-push an evicted unit).  Sequential readers are left
        to the kernel's own readahead (set to several blocks at mount), which
        already asks for the data ahead; the VFS prefetches their next blocks
        into the block cache instead — pushing the same pages as well only
        doubled the copying."""
        if not self.enabled or self.blocked(ino) or sequential:
            return
        u = off // self.unit
        done = self.pushed.get(ino)
        if done and u in done:
            done.discard(u)  # it was pushed and is being read from the daemon: evicted
            metrics.inc("pusher_evicted_reads")
            self._spawn(ino, u * self.unit, (u + 1) * self.unit, length, fetch=False, why="repush")
        else:
            self._spawn(ino, u * self.unit, (u + 1) * self.unit, length, fetch=False, why="read")

    async def warmup(self, ino: int, length: int, kernel: bool,
                     progress: Callable[[int], None] | None = None) -> int:
        """Fetch every block of the file into the block cache and (``kernel``)
        push it; returns bytes pushed.  Awaited by the warmup control request."""
        pushed = 0
        gen = self.gen.get(ino, 0)  # of ``length`` (see _spawn)
        for u in range((length + self.unit - 1) // self.unit):
            start = u * self.unit
            n = await self._push_unit(ino, u, length, fetch=True, store=kernel, force=True, gen=gen)
            pushed += n
            if progress:
                progress(min(self.unit, length - start))
        return pushed

    # ------------------------------------------------------------ workers
    def _spawn(self, ino: int, start: int, end: int, length: int, *, fetch: bool, why: str) -> None:
        end = min(end, length)
        if end <= start or self.nursery is None:
            return
        units = [u for u in range(start // self.unit, (end - 1) // self.unit + 1)
                 if (ino, u) not in self._busy and u not in self.pushed.get(ino, ())]
        if not units:
            return
        # the generation that goes with ``length``: a change after this (also one
        # while the task waits for its turn) voids the push, which would otherwise
        # store the new bytes clipped at the old length (a partial last page the
        # kernel zero-fills and keeps)
        gen = self.gen.get(ino, 0)
        for u in units:
            self._busy.add((ino, u))
            # one task per unit, at most 4 at a time: loading the next block
            # overlaps with storing the previous one
            self.nursery.start_soon(self._run, ino, u, length, fetch, why, gen)

    async def _run(self, ino: int, u: int, length: int, fetch: bool, why: str, gen: int) -> None:
        try:
            async with self._limit:
                if self._pushed_total() + self.unit > self.budget:
                    metrics.inc("pusher_budget_skips")
                    return
                n = await self._push_unit(ino, u, length, fetch=fetch, store=True, gen=gen)
                if n and why == "repush":
                    metrics.inc("pusher_repushed_bytes", n)
        except Exception as exc:  # a failed push only costs a later daemon read
            metrics.inc("pusher_errors")
            log.debug("push of inode %d failed: %s", ino, exc)
        finally:
            self._busy.discard((ino, u))

    async def _push_unit(self, ino: int, u: int, length: int, *, fetch: bool, store: bool,
                         gen: int, force: bool = False) -> int:
        """Push unit ``u`` of a file of ``length`` bytes, as of generation ``gen``."""
        if self.blocked(ino) and store:
            return 0
        start = u * self.unit
        end = min(start + self.unit, length)
        if end <= start:
            return 0
        data = await self._assemble(ino, start, end - start, fetch)
        if data is None or not store or not self.enabled:
            return 0
        if self.gen.get(ino, 0) != gen:
            return 0
        ok = await self.notifier.store(ino, start, data, length)
        if self.gen.get(ino, 0) != gen:
            # a write or truncate overlapped the push: the pushed pages may be stale
            self.dropped(ino)
            await self.notifier.invalidate_inode(ino)
            metrics.inc("pusher_races")
            return 0
        if ok:
            self.pushed.setdefault(ino, set()).add(u)
            metrics.inc("pusher_pushed_bytes", len(data))
            return len(data)
        return 0

    async def _assemble(self, ino: int, off: int, size: int, fetch: bool) -> Optional[bytes]:
        """File bytes [off, off+size) from held blocks (or fetched ones); None
        if something is not held locally and ``fetch`` is false."""
        out = bytearray(size)
        bs = self.unit
        for chunk_idx, coff, n in chunk_ranges(off, size, self.chunk_size):
            slices = await self.get_slices(ino, chunk_idx)
            base = chunk_idx * self.chunk_size
            segs = overlay(slices, coff, n)
            if len(segs) == 1 and n == size and segs[0].id and segs[0].off % bs == 0 \
                    and segs[0].len == min(bs, segs[0].size - segs[0].off):
                # the unit is exactly one whole block: hand it over without copying
                seg = segs[0]
                if fetch:
                    return await self.chunks.read_block(seg.id, seg.size, seg.off // bs)
                return await self.chunks.cached_or_disk(seg.id, seg.size, seg.off // bs)
            for seg in segs:
                if not seg.id:
                    continue
                dest = base + seg.pos - off
                pos = seg.off
                while pos < seg.off + seg.len:
                    b = pos // bs
                    if fetch:
                        blk = await self.chunks.read_block(seg.id, seg.size, b)
                    else:
                        blk = await self.chunks.cached_or_disk(seg.id, seg.size, b)
                        if blk is None:
                            return None
                    take = min((b + 1) * bs, seg.off + seg.len) - pos
                    out[dest:dest + take] = blk[pos - b * bs:pos - b * bs + take]
                    dest += take
                    pos += take
        return bytes(out)
