"""``ChunkStore``: the async data path between the VFS and object storage.

Design notes
============

Units
    A slice (``slice_id``, ``slice_size``) is stored as block objects of
    ``block_size`` bytes, the last one possibly short; the key of block ``i``
    is ``layout.block_key(slice_id, i, len)``, so a key names its exact bytes.
    Objects are immutable, so nothing cached here is ever stale.  This module
    never imports ``meta``: it knows slices only by id and size.

Read path (``read_block``)
    memory (``BlockCache.get_mem``, on the loop) -> disk (``load_disk`` in a
    DISK worker) -> object store (``get`` in an S3 worker).  A block fetched
    from the object store is length-checked (a short object is an
    ``ObjectStoreError``), put in memory and written to the disk cache before
    the reader gets it; a disk hit is promoted to memory.

    Single-flight: one ``_Flight`` per object key in ``self._inflight``.  The
    first task to miss memory becomes the leader and does the disk/object
    fetch; later tasks wait on its ``trio.Event`` and take its bytes or its
    exception.  If the leader is *cancelled* (its reader went away, or the
    prefetch nursery closed) the waiters wake up without a result and retry,
    one of them becoming the new leader; a cancellation never leaks to another
    task.  Dangerous awaits: between the memory check and registering the
    flight there is no await, so two leaders for one key cannot exist.

Write path (``upload_block``)
    ``put`` in an S3 worker, concurrently with the write-through to the disk
    cache; memory is filled at once.  If the put fails, the cache entries are
    removed again and the error propagates (the writer must not commit the
    slice).  Durability order (blocks, then slice commit) is the writer's job.

Delete (``delete_slice``)
    Deletes every block object (missing is fine: idempotent), then drops
    the blocks from memory and disk.  A concurrent reader of a deleted slice
    may re-cache a block it fetched before the delete; that entry is dead
    weight until LRU eviction, never wrong data (ids are never reused).

Prefetch
    ``start(nursery)`` hands in the nursery that runs background prefetches
    (the daemon's main nursery; tests open their own).  ``prefetch`` returns
    at once: it skips blocks already in memory or in flight, and drops the
    request (``chunk_prefetch_dropped``) when ``max_prefetch`` prefetches are
    already running or no nursery was given.  Prefetch errors are logged at
    debug level and counted (``chunk_prefetch_errors``), never raised: the
    real read will retry and report.

Blocking work
    Every object-store and cache-file call goes through
    ``threads.run_blocking`` (``S3`` / ``DISK`` limiters); the only
    loop-thread work is the memory LRU and list bookkeeping.

Errors
    ``ObjectStoreError`` / ``NoSuchKey`` from the store propagate unchanged
    (the VFS maps them to EIO and sets failsafe for NoSuchKey).  Cache-disk
    failures never propagate (see ``cache.py``).

Metrics
    Each ``read_block`` counts exactly one of ``cache_mem_hits``,
    ``cache_disk_hits``, ``cache_misses`` (a task that joined another's flight
    counts what that flight found).  ``chunk_object_get`` / ``chunk_object_put``
    latency histograms, ``chunk_object_get_bytes``, ``chunk_object_put_bytes``,
    ``chunk_singleflight_waits``, ``chunk_prefetch_blocks``,
    ``chunk_prefetch_dropped``, ``chunk_prefetch_errors``,
    ``chunk_deleted_blocks``.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Awaitable, Callable, Sequence

import trio

from .. import metrics
from ..errors import ObjectStoreError
from ..object.base import ObjectStore
from ..threads import DISK, S3, run_blocking
from .cache import BlockCache
from .layout import block_count, block_key, block_len, slice_keys

log = logging.getLogger(__name__)

_MEM, _DISK, _OBJECT = "mem", "disk", "object"


class _Flight:
    """One in-progress fetch of a block; waiters read ``data``/``error``."""

    __slots__ = ("event", "data", "source", "error")

    def __init__(self):
        self.event = trio.Event()
        self.data: bytes | None = None
        self.source = _OBJECT
        self.error: BaseException | None = None


class ChunkStore:
    """Async block reads/writes/deletes over an ``ObjectStore`` and a ``BlockCache``."""

    def __init__(self, store: ObjectStore, cache: BlockCache, block_size: int,
                 max_prefetch: int = 8, local_store: bool = False):
        self.store = store
        self.cache = cache
        self.block_size = block_size
        self.max_prefetch = max_prefetch
        #: a local ``file`` store is as fast as the disk cache: blocks are not
        #: copied into the disk cache (neither uploads nor fetches), and the
        #: store itself counts as "held locally" for ``cached_or_disk``
        self.local_store = local_store
        self._inflight: dict[str, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._prefetch_keys: set[str] = set()  # scheduled or running prefetches

    def start(self, nursery: trio.Nursery) -> None:
        """Give the nursery that runs background prefetches (call once, at mount)."""
        self._nursery = nursery

    # ------------------------------------------------------------------ helpers
    def key(self, slice_id: int, slice_size: int, block_idx: int) -> str:
        """Object key of block ``block_idx`` of a slice."""
        n = block_len(slice_size, block_idx, self.block_size)
        if n <= 0 or block_idx < 0:
            raise ValueError(f"block {block_idx} is outside slice {slice_id} of {slice_size} bytes")
        return block_key(slice_id, block_idx, n)

    # ------------------------------------------------------------------ reads
    async def read_block(self, slice_id: int, slice_size: int, block_idx: int) -> bytes:
        """The whole block ``block_idx`` of a slice: memory -> disk -> object store."""
        key = self.key(slice_id, slice_size, block_idx)
        data, source = await self._get(key)
        metrics.inc({_MEM: "cache_mem_hits", _DISK: "cache_disk_hits",
                     _OBJECT: "cache_misses"}[source])
        return data

    async def read(self, slice_id: int, slice_size: int, off: int, length: int) -> bytes:
        """Bytes ``[off, off+length)`` of a slice; blocks are fetched concurrently."""
        if length <= 0:
            return b""
        if off < 0 or off + length > slice_size:
            raise ValueError(f"range {off}+{length} is outside slice {slice_id} of {slice_size} bytes")
        bs = self.block_size
        first, last = off // bs, (off + length - 1) // bs
        if first == last:
            data = await self.read_block(slice_id, slice_size, first)
            start = off - first * bs
            return data if start == 0 and length == len(data) else data[start:start + length]

        parts: list[bytes | None] = [None] * (last - first + 1)

        async def fetch(i: int) -> None:
            parts[i - first] = await self.read_block(slice_id, slice_size, i)

        await _gather([functools.partial(fetch, i) for i in range(first, last + 1)])
        views = [memoryview(p) for p in parts]  # type: ignore[arg-type]
        end = off + length - last * bs
        views[-1] = views[-1][:end]
        views[0] = views[0][off - first * bs:]
        return b"".join(views)

    def cached_block(self, slice_id: int, slice_size: int, block_idx: int) -> bytes | None:
        """Non-blocking. The block if it is in memory, else None."""
        return self.cache.get_mem(self.key(slice_id, slice_size, block_idx))

    async def cached_or_disk(self, slice_id: int, slice_size: int, block_idx: int) -> bytes | None:
        """The block if held locally (memory or disk cache), else None; never
        touches the object store, does not promote disk blocks to memory and
        does not count as a hit or miss (for the kernel-cache pusher)."""
        key = self.key(slice_id, slice_size, block_idx)
        data = self.cache.get_mem(key)
        if data is None:
            if self.local_store:
                return await self.read_block(slice_id, slice_size, block_idx)
            data = await run_blocking(self.cache.load_disk, key, limiter=DISK)
        return data

    def is_local(self, slice_id: int, slice_size: int, block_idx: int) -> bool:
        """Non-blocking. Whether the block is held locally (memory, disk cache or
        a local store), by the indexes only: a cheap check before a long job."""
        if self.local_store:
            return True
        key = self.key(slice_id, slice_size, block_idx)
        return self.cache.get_mem(key) is not None or self.cache.has_disk(key)

    async def prefetch(self, slice_id: int, slice_size: int, block_idx: int) -> None:
        """Start fetching a block into the caches in the background and return
        at once; dropped when too many prefetches run or no nursery was given."""
        if block_idx >= block_count(slice_size, self.block_size):
            return
        key = self.key(slice_id, slice_size, block_idx)
        if key in self._inflight or key in self._prefetch_keys or self.cache.get_mem(key) is not None:
            return
        if self._nursery is None or len(self._prefetch_keys) >= self.max_prefetch:
            metrics.inc("chunk_prefetch_dropped")
            return
        self._prefetch_keys.add(key)
        self._nursery.start_soon(self._prefetch_one, key, name=f"prefetch {key}")

    async def _prefetch_one(self, key: str) -> None:
        try:
            await self._get(key)
            metrics.inc("chunk_prefetch_blocks")
        except ObjectStoreError as exc:
            metrics.inc("chunk_prefetch_errors")
            log.debug("prefetch of %s failed: %s", key, exc)
        finally:
            self._prefetch_keys.discard(key)

    async def _get(self, key: str) -> tuple[bytes, str]:
        """(bytes, where they came from) with single-flight (see module notes)."""
        while True:
            data = self.cache.get_mem(key)
            if data is not None:
                return data, _MEM
            flight = self._inflight.get(key)
            if flight is None:
                break
            metrics.inc("chunk_singleflight_waits")
            await flight.event.wait()
            if flight.error is not None:
                raise flight.error
            if flight.data is not None:
                return flight.data, flight.source
            # the leader was cancelled: try again (maybe as the leader)

        flight = self._inflight[key] = _Flight()
        try:
            flight.data, flight.source = await self._fetch(key)
            return flight.data, flight.source
        except trio.Cancelled:
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.event.set()

    async def _fetch(self, key: str) -> tuple[bytes, str]:
        """Leader only: disk cache, else object store; fills the caches."""
        data = await run_blocking(self.cache.load_disk, key, limiter=DISK)
        if data is not None:
            self.cache.put_mem(key, data)
            return data, _DISK
        t0 = time.perf_counter()
        data = await run_blocking(self.store.get, key, limiter=S3)
        metrics.observe_us("chunk_object_get", (time.perf_counter() - t0) * 1e6)
        metrics.inc("chunk_object_get_bytes", len(data))
        want = int(key.rsplit("_", 1)[1])
        if len(data) != want:
            raise ObjectStoreError(msg=f"object {key} has {len(data)} bytes, expected {want}")
        self.cache.put_mem(key, data)
        if not self.local_store:
            await run_blocking(self.cache.save_disk, key, data, limiter=DISK)
        return data, _OBJECT

    # ------------------------------------------------------------------ writes
    async def upload_block(self, slice_id: int, block_idx: int, data: bytes) -> str:
        """Store block ``block_idx`` of a slice (key from ``len(data)``) in the
        object store and, write-through, in the memory and disk caches.
        Returns the key.  On a failed put the cache entries are dropped and the
        ``ObjectStoreError`` propagates."""
        if not 0 < len(data) <= self.block_size:
            raise ValueError(f"block of {len(data)} bytes (block size {self.block_size})")
        data = bytes(data)
        key = block_key(slice_id, block_idx, len(data))
        self.cache.put_mem(key, data)

        async def put() -> None:
            t0 = time.perf_counter()
            await run_blocking(self.store.put, key, data, limiter=S3)
            metrics.observe_us("chunk_object_put", (time.perf_counter() - t0) * 1e6)
            metrics.inc("chunk_object_put_bytes", len(data))

        async def save() -> None:
            await run_blocking(self.cache.save_disk, key, data, limiter=DISK)

        try:
            await _gather([put] if self.local_store else [put, save])
        except BaseException:
            with trio.CancelScope(shield=True):
                await run_blocking(self.cache.remove, key, limiter=DISK)
            raise
        return key

    async def delete_slice(self, slice_id: int, slice_size: int) -> None:
        """Delete every block object of a slice (idempotent) and drop the
        blocks from the caches."""
        keys = slice_keys(slice_id, slice_size, self.block_size)

        async def delete(key: str) -> None:
            await run_blocking(self.store.delete, key, limiter=S3)
            await run_blocking(self.cache.remove, key, limiter=DISK)

        await _gather([functools.partial(delete, key) for key in keys])
        metrics.inc("chunk_deleted_blocks", len(keys))


async def _gather(fns: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``fns`` concurrently; on the first failure cancel the rest and
    raise that exception itself (not wrapped in an ExceptionGroup), so callers
    see plain ``ObjectStoreError``s."""
    if len(fns) == 1:
        await fns[0]()
        return
    failed: list[Exception] = []

    async with trio.open_nursery() as nursery:
        async def run(fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except Exception as exc:
                failed.append(exc)
                nursery.cancel_scope.cancel()

        for fn in fns:
            nursery.start_soon(run, fn)
    if failed:
        raise failed[0]
