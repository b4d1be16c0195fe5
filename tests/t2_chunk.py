"""t2: the chunk layer (BlockCache + ChunkStore) over a real local object store.

The object store is the real ``FileStore`` (a local directory).  Tests that
need to count, slow down or fail GETs/PUTs wrap it in ``CountingStore`` (a
pass-through, not a mock of the code under test).
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

import pytest
import trio
import trio.testing

from curvefs_py import metrics, threads
from curvefs_py.chunk.cache import BlockCache
from curvefs_py.chunk.layout import block_key, slice_keys
from curvefs_py.chunk.store import ChunkStore
from curvefs_py.errors import NoSuchKey, ObjectStoreError
from curvefs_py.object.base import ObjectStore
from curvefs_py.object.file import FileStore

BS = 64 * 1024  # block size used by most tests
UUID = "0123-uuid"


class CountingStore(ObjectStore):
    """Pass-through wrapper that counts calls, and can delay or fail GETs."""

    description = "counting"

    def __init__(self, inner: ObjectStore, get_delay: float = 0.0):
        self.inner = inner
        self.get_delay = get_delay
        self.fail_get: Exception | None = None
        self.fail_put: Exception | None = None
        self.short_get = False
        self.gets: list[str] = []
        self.puts: list[str] = []
        self._lock = threading.Lock()

    def get(self, key, off=0, limit=-1):
        with self._lock:
            self.gets.append(key)
        if self.get_delay:
            time.sleep(self.get_delay)  # blocking: proves we are in a worker thread
        if self.fail_get is not None:
            raise self.fail_get
        data = self.inner.get(key, off, limit)
        return data[:-1] if self.short_get else data

    def put(self, key, data):
        with self._lock:
            self.puts.append(key)
        if self.fail_put is not None:
            raise self.fail_put
        self.inner.put(key, data)

    def delete(self, key):
        self.inner.delete(key)

    def head(self, key):
        return self.inner.head(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)


@pytest.fixture(autouse=True)
def _fresh_globals():
    metrics.reset()
    threads.reset()
    yield
    threads.configure(s3=20)
    threads.reset()


@pytest.fixture
def backend(tmp_path):
    store = FileStore(str(tmp_path / "bucket"), create=True)
    yield store
    store.close()


@pytest.fixture
def counting(backend):
    return CountingStore(backend)


def make_cache(tmp_path, disk=64 << 20, mem=64 << 20, name="cache") -> BlockCache:
    return BlockCache(str(tmp_path / name), disk, mem, UUID)


def payload(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


async def upload_slice(cs: ChunkStore, slice_id: int, data: bytes) -> None:
    for i in range(0, len(data), cs.block_size):
        await cs.upload_block(slice_id, i // cs.block_size, data[i:i + cs.block_size])


def stored_keys(store: ObjectStore) -> set[str]:
    return {o.key for o in store.list("chunks/")}


# ---------------------------------------------------------------------------- round trips

async def test_round_trip_across_block_boundaries(tmp_path, counting):
    data = payload(3 * BS + 17)
    writer = ChunkStore(counting, make_cache(tmp_path, name="w"), BS)
    await upload_slice(writer, 42, data)
    assert stored_keys(counting) == set(slice_keys(42, len(data), BS))
    assert block_key(42, 3, 17) in stored_keys(counting)

    # a second client with an empty cache reads everything from the object store
    reader = ChunkStore(counting, make_cache(tmp_path, name="r"), BS)
    ranges = [(0, len(data)), (0, 1), (BS - 1, 2), (BS - 5, BS + 10), (1, 3 * BS),
              (3 * BS, 17), (3 * BS + 16, 1), (2 * BS, BS), (100, 0)]
    for off, n in ranges:
        assert await reader.read(42, len(data), off, n) == data[off:off + n], (off, n)
    for i in range(4):
        assert await reader.read_block(42, len(data), i) == data[i * BS:(i + 1) * BS]
    assert len(counting.gets) == 4  # each block fetched once, then cached
    with pytest.raises(ValueError):
        await reader.read(42, len(data), len(data) - 1, 2)
    with pytest.raises(ValueError):
        await reader.read_block(42, len(data), 4)


async def test_read_after_write_hits_memory(tmp_path, counting):
    cs = ChunkStore(counting, make_cache(tmp_path), BS)
    data = payload(2 * BS, seed=3)
    await upload_slice(cs, 7, data)
    assert await cs.read(7, len(data), 10, BS) == data[10:10 + BS]
    assert counting.gets == []
    assert metrics.get("cache_mem_hits") == 2 and metrics.get("cache_misses") == 0


async def test_short_object_is_an_error(tmp_path, counting):
    cs = ChunkStore(counting, make_cache(tmp_path, name="w"), BS)
    await upload_slice(cs, 8, payload(BS))
    counting.short_get = True
    fresh = ChunkStore(counting, make_cache(tmp_path, name="r"), BS)
    with pytest.raises(ObjectStoreError):
        await fresh.read_block(8, BS, 0)
    assert fresh.cached_block(8, BS, 0) is None


async def test_missing_object_raises_plain_nosuchkey(tmp_path, counting):
    cs = ChunkStore(counting, make_cache(tmp_path), BS)
    # a multi-block read must raise NoSuchKey itself, not an ExceptionGroup
    with pytest.raises(NoSuchKey):
        await cs.read(999, 3 * BS, 0, 3 * BS)


async def test_failed_upload_leaves_no_cache_entry(tmp_path, counting):
    cache = make_cache(tmp_path)
    cs = ChunkStore(counting, cache, BS)
    counting.fail_put = ObjectStoreError(msg="boom")
    with pytest.raises(ObjectStoreError):
        await cs.upload_block(9, 0, payload(BS))
    key = block_key(9, 0, BS)
    assert cache.get_mem(key) is None
    assert cache.load_disk(key) is None
    assert not os.path.exists(os.path.join(cache.raw_dir, key))


# ---------------------------------------------------------------------------- single flight

async def test_single_flight_shares_one_get(tmp_path, backend):
    counting = CountingStore(backend, get_delay=0.2)
    await ChunkStore(counting, make_cache(tmp_path, name="w"), BS).upload_block(5, 0, payload(BS))
    cs = ChunkStore(counting, make_cache(tmp_path, name="r"), BS)
    results = []

    async def reader():
        results.append(await cs.read_block(5, BS, 0))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(reader)
    assert results == [payload(BS)] * 10
    assert counting.gets == [block_key(5, 0, BS)]
    assert metrics.get("chunk_singleflight_waits") == 9
    assert metrics.get("cache_misses") == 10  # waiters count what the flight found


async def test_single_flight_shares_the_error(tmp_path, backend):
    counting = CountingStore(backend, get_delay=0.1)
    counting.fail_get = ObjectStoreError(msg="down")
    cs = ChunkStore(counting, make_cache(tmp_path), BS)
    errors = []

    async def reader():
        try:
            await cs.read_block(6, BS, 0)
        except ObjectStoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert len(errors) == 5 and len(counting.gets) == 1
    counting.fail_get = None
    with pytest.raises(NoSuchKey):  # the failure was not cached: the next read retries
        await cs.read_block(6, BS, 0)
    assert len(counting.gets) == 2


async def test_cancelled_leader_does_not_cancel_waiters(tmp_path, counting):
    await ChunkStore(counting, make_cache(tmp_path, name="w"), BS).upload_block(4, 0, payload(BS))
    cs = ChunkStore(counting, make_cache(tmp_path, name="r"), BS)
    threads.configure(s3=1)
    s3 = threads.limiter(threads.S3)
    blocker = object()
    await s3.acquire_on_behalf_of(blocker)  # the leader will queue for the S3 limiter
    got = []

    async def follower():
        got.append(await cs.read_block(4, BS, 0))

    async with trio.open_nursery() as nursery:
        leader_scope = trio.CancelScope()

        async def leader():
            with leader_scope:
                await cs.read_block(4, BS, 0)

        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        s3.release_on_behalf_of(blocker)
    assert leader_scope.cancelled_caught
    assert got == [payload(BS)]
    assert len(counting.gets) == 1


# ---------------------------------------------------------------------------- memory tier

def test_memory_eviction_by_bytes(tmp_path):
    cache = make_cache(tmp_path, mem=3000)
    for i in range(3):
        cache.put_mem(f"k{i}", bytes(1000))
    assert cache.mem_bytes == 3000
    assert cache.get_mem("k0") is not None  # k0 is now the most recent
    cache.put_mem("k3", bytes(1500))  # evicts k1 and k2 (LRU), not k0
    assert cache.get_mem("k1") is None and cache.get_mem("k2") is None
    assert cache.get_mem("k0") is not None and cache.get_mem("k3") is not None
    assert cache.mem_bytes == 2500 == metrics.get("cache_mem_bytes")
    cache.put_mem("huge", bytes(3001))  # larger than the whole limit: not kept
    assert cache.get_mem("huge") is None and cache.mem_bytes == 2500
    cache.drop_mem("k0")
    assert cache.mem_bytes == 1500


# ---------------------------------------------------------------------------- disk tier

async def test_disk_cache_survives_remount(tmp_path, counting):
    data = payload(2 * BS + 100, seed=5)
    cs = ChunkStore(counting, make_cache(tmp_path), BS)
    await upload_slice(cs, 11, data)

    # "remount": a new BlockCache on the same directory, empty memory
    cache2 = make_cache(tmp_path)
    await threads.run_blocking(cache2.scan, limiter=threads.DISK)
    assert sorted(cache2.disk_keys()) == sorted(slice_keys(11, len(data), BS))
    assert cache2.disk_bytes == metrics.get("cache_disk_bytes") > len(data)
    counting.fail_get = ObjectStoreError(msg="object store must not be touched")
    cs2 = ChunkStore(counting, cache2, BS)
    assert await cs2.read(11, len(data), 0, len(data)) == data
    assert counting.gets == []
    assert metrics.get("cache_disk_hits") == 3
    assert await cs2.read_block(11, len(data), 0) == data[:BS]
    assert metrics.get("cache_mem_hits") == 1  # promoted to memory


def test_scan_wipes_tmp_and_wrong_sizes(tmp_path):
    cache = make_cache(tmp_path)
    good, bad = block_key(1, 0, 10), block_key(2, 0, 10)
    cache.save_disk(good, b"x" * 10)
    cache.save_disk(bad, b"y" * 10)
    with open(os.path.join(cache.raw_dir, bad), "r+b") as f:
        f.truncate(7)
    with open(os.path.join(cache.tmp_dir, "leftover"), "wb") as f:
        f.write(b"half a block")
    cache2 = make_cache(tmp_path)
    cache2.scan()
    assert cache2.disk_keys() == [good]
    assert not os.path.exists(os.path.join(cache.raw_dir, bad))
    assert os.listdir(cache2.tmp_dir) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend"])
async def test_corrupt_cache_file_is_a_miss(tmp_path, counting, damage):
    data = payload(BS, seed=9)
    cs = ChunkStore(counting, make_cache(tmp_path), BS)
    await cs.upload_block(12, 0, data)
    key = block_key(12, 0, BS)
    path = os.path.join(make_cache(tmp_path).raw_dir, key)

    cache2 = make_cache(tmp_path)
    cache2.scan()  # index the good file first, then damage it behind the cache's back
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(BS // 2)
        elif damage == "flip":
            f.seek(1234)
            b = f.read(1)
            f.seek(1234)
            f.write(bytes([b[0] ^ 0xFF]))
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"junk")
    assert await threads.run_blocking(cache2.load_disk, key, limiter=threads.DISK) is None
    assert not os.path.exists(path)
    assert cache2.disk_bytes == 0
    assert metrics.get("cache_disk_corrupt") == 1

    # through the store: falls back to the object store and re-caches a good copy
    cs2 = ChunkStore(counting, make_cache(tmp_path), BS)
    assert await cs2.read_block(12, BS, 0) == data
    assert len(counting.gets) == 1 and os.path.exists(path)
    assert make_cache(tmp_path).load_disk(key) == data


def test_disk_limit_evicts_lru(tmp_path):
    n = 1000
    probe = make_cache(tmp_path, name="probe")
    probe.save_disk(block_key(1, 0, n), bytes(n))
    per_file = probe.disk_bytes  # block + trailer
    cache = make_cache(tmp_path, disk=3 * per_file)
    keys = [block_key(100 + i, 0, n) for i in range(5)]
    for k in keys[:3]:
        cache.save_disk(k, payload(n))
    assert cache.load_disk(keys[0]) is not None  # keys[0] becomes most recent
    cache.save_disk(keys[3], payload(n))
    cache.save_disk(keys[4], payload(n))
    assert cache.disk_keys() == [keys[0], keys[3], keys[4]]
    assert cache.disk_bytes == 3 * per_file
    on_disk = {os.path.relpath(os.path.join(d, f), cache.raw_dir)
               for d, _, fs in os.walk(cache.raw_dir) for f in fs}
    assert on_disk == {keys[0], keys[3], keys[4]}
    assert metrics.get("cache_disk_evictions") == 2
    cache.save_disk(block_key(200, 0, 4 * n), bytes(4 * n))  # bigger than the limit: skipped
    assert block_key(200, 0, 4 * n) not in cache.disk_keys()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_cache_disk_does_not_fail_callers(tiny_tmpfs, backend, caplog):
    counting = CountingStore(backend)
    block = 128 * 1024
    cache = BlockCache(str(tiny_tmpfs), 100 << 20, 256 * 1024, UUID)  # limit >> 1 MiB disk
    cs = ChunkStore(counting, cache, block)
    data = payload(16 * block, seed=4)  # 2 MiB: cannot fit on the 1 MiB tmpfs
    with caplog.at_level(logging.WARNING, logger="curvefs_py.chunk.cache"):
        await upload_slice(cs, 21, data)
        assert await cs.read(21, len(data), 0, len(data)) == data
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "full" in warnings[0].getMessage()
    assert metrics.get("cache_disk_errors") >= 1
    assert 0 < cache.disk_limit_effective < 1 << 20
    assert cache.disk_bytes <= cache.disk_limit_effective
    # after settling, the most recent blocks are on the disk cache and readable from it
    assert cache.disk_keys()
    last = cache.disk_keys()[-1]
    assert cache.load_disk(last) is not None
    # and nothing under tmp/ is left behind
    assert os.listdir(cache.tmp_dir) == []


async def test_unwritable_cache_dir_does_not_fail_callers(tmp_path, counting, caplog):
    cache = make_cache(tmp_path)
    cache.scan()
    os.rename(cache.tmp_dir, cache.tmp_dir + ".gone")  # every cache write now fails (ENOENT)
    cs = ChunkStore(counting, cache, BS)
    with caplog.at_level(logging.WARNING, logger="curvefs_py.chunk.cache"):
        await upload_slice(cs, 22, payload(2 * BS))
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert metrics.get("cache_disk_errors") == 2
    assert cache.disk_bytes == 0 and cache.disk_limit_effective == 64 << 20


# ---------------------------------------------------------------------------- delete

async def test_delete_slice_removes_objects_and_cache(tmp_path, counting):
    data = payload(2 * BS + 5)
    cache = make_cache(tmp_path)
    cs = ChunkStore(counting, cache, BS)
    await upload_slice(cs, 31, data)
    await upload_slice(cs, 32, payload(BS))  # a neighbour that must survive
    keys = slice_keys(31, len(data), BS)
    await cs.delete_slice(31, len(data))
    assert stored_keys(counting) == {block_key(32, 0, BS)}
    for k in keys:
        assert cache.get_mem(k) is None and cache.load_disk(k) is None
        assert not os.path.exists(os.path.join(cache.raw_dir, k))
    assert cache.disk_keys() == [block_key(32, 0, BS)]
    await cs.delete_slice(31, len(data))  # idempotent
    await cs.delete_slice(33, 0)  # an empty slice has no blocks
    with pytest.raises(NoSuchKey):
        await cs.read_block(31, len(data), 0)


# ---------------------------------------------------------------------------- local-only reads, prefetch

async def test_cached_block_and_cached_or_disk(tmp_path, counting):
    cache = make_cache(tmp_path, mem=BS)  # memory holds one block
    cs = ChunkStore(counting, cache, BS)
    data = payload(2 * BS)
    await upload_slice(cs, 41, data)
    assert cs.cached_block(41, len(data), 0) is None  # evicted from memory by block 1
    assert cs.cached_block(41, len(data), 1) == data[BS:]
    assert await cs.cached_or_disk(41, len(data), 0) == data[:BS]
    assert cs.cached_block(41, len(data), 0) is None  # not promoted
    assert await cs.cached_or_disk(99, BS, 0) is None  # not local: no GET
    assert counting.gets == []
    assert metrics.get("cache_misses") == 0 and metrics.get("cache_disk_hits") == 0


async def test_prefetch_fills_cache_in_background(tmp_path, backend):
    counting = CountingStore(backend, get_delay=0.1)
    await upload_slice(ChunkStore(counting, make_cache(tmp_path, name="w"), BS), 51, payload(4 * BS))
    cs = ChunkStore(counting, make_cache(tmp_path, name="r"), BS, max_prefetch=2)
    await cs.prefetch(51, 4 * BS, 0)  # no nursery yet: dropped
    assert metrics.get("chunk_prefetch_dropped") == 1
    async with trio.open_nursery() as nursery:
        cs.start(nursery)
        t0 = trio.current_time()
        for i in range(4):
            await cs.prefetch(51, 4 * BS, i)  # returns at once; 2 run, 2 dropped
        await cs.prefetch(51, 4 * BS, 0)  # already in flight: ignored
        await cs.prefetch(51, 4 * BS, 9)  # past the end: ignored
        assert trio.current_time() - t0 < 0.05
        assert await cs.read_block(51, 4 * BS, 0) == payload(4 * BS)[:BS]  # joins the flight
    assert metrics.get("chunk_prefetch_blocks") == 2
    assert metrics.get("chunk_prefetch_dropped") == 3
    assert sorted(counting.gets) == sorted([block_key(51, 0, BS), block_key(51, 1, BS)])
    assert cs.cached_block(51, 4 * BS, 1) is not None


# ---------------------------------------------------------------------------- the loop keeps running

async def test_concurrent_reads_do_not_block_the_loop(tmp_path, backend):
    counting = CountingStore(backend, get_delay=0.25)
    data = payload(8 * BS, seed=2)
    await upload_slice(ChunkStore(counting, make_cache(tmp_path, name="w"), BS), 61, data)
    cs = ChunkStore(counting, make_cache(tmp_path, name="r"), BS)
    ticks = 0
    done = trio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        t0 = time.monotonic()
        got = await cs.read(61, len(data), 0, len(data))  # 8 blocks, fetched concurrently
        elapsed = time.monotonic() - t0
        done.set()
    assert got == data
    assert len(counting.gets) == 8
    assert elapsed < 8 * 0.25 / 2, elapsed  # concurrent, not one after another
    assert ticks >= 10, ticks  # the loop ticked all through the blocking GETs
