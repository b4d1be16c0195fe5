"""``BlockCache``: block bytes held locally, in memory and on a cache disk.

Design notes (the cache protocol; see also ``chunk/store.py``)
================================================================

What is cached
    Whole block objects, keyed by their object key (``layout.block_key``).
    Objects are immutable and a key encodes the block length, so a cached
    entry can never be stale: it is either the block's exact bytes or it is
    absent.  There is no dirty state here; write-back staging (blocks not yet
    in object storage) is not part of this class.

Memory tier (non-blocking, loop thread)
    An LRU ``OrderedDict`` key -> ``bytes`` bounded by ``mem_limit_bytes``
    (sum of block lengths).  ``get_mem`` refreshes recency; ``put_mem`` evicts
    least recently used blocks until the new one fits.  A block larger than the
    whole limit is not kept.  Guarded by a lock so a worker thread may call it
    too, but the loop is the intended caller.

Disk tier (blocking: call through ``threads.run_blocking(..., limiter=DISK)``)
    Layout under ``cache_dir/<volume_uuid>/``::

        raw/<key>     one file per block: the block bytes, then a 4-byte
                      little-endian CRC-32 of them (the trailer)
        tmp/          files being written; wiped at start

    States of one key: absent -> (tmp file being written) -> present ->
    (evicted / removed) -> absent.  A file becomes visible under ``raw/`` only
    by ``rename`` of a complete tmp file, so a process crash never leaves a
    torn block under ``raw/``.  We do not fsync (the cache is disposable): after
    a power loss a file may come back short or with garbage.  Every read
    therefore checks the length (block length from the key + 4) and the CRC;
    a short or corrupt file counts as a miss and is deleted.

    The index (key -> size on disk, LRU order) lives in memory and is rebuilt
    at start by scanning ``raw/`` (``scan()``; done lazily by the first disk
    call if nobody called it), ordered by each file's last access or
    modification time, so the cache survives a remount.  Files whose size does
    not match their key are deleted during the scan.

    Size limit: the sum of file sizes is kept <= the *effective* limit, which
    starts at ``disk_limit_bytes``.  ``save_disk`` evicts least recently used
    files first.  If the cache file system is full anyway (``ENOSPC`` /
    ``EDQUOT``, e.g. it is shared with other data) the write is dropped, a
    warning is logged once, ``cache_disk_errors`` counts it, and the effective
    limit shrinks to 90% of what is currently used (then eviction runs), so
    the cache settles below what the disk can hold (it is not raised again
    until the next mount).  Other ``OSError``s on a
    cache write are counted and logged once per errno, never raised: the cache
    is an optimisation and a failing cache disk must not fail a read or write.

Locks and races
    One lock guards the disk index; file I/O happens outside it.
    ``save_disk`` indexes a key (reserving its space, evicting for it) *before*
    writing its file, and marks it pending until the rename is done:
    ``load_disk`` treats a pending key as a miss, so concurrent savers never
    overshoot the limit and a reader never drops a half-saved entry.  Two
    threads may race on one key (save vs. evict/remove): whoever loses leaves a
    file that is not indexed (harmless; found again by the next scan) or an
    index entry without a file (the next ``load_disk`` misses and drops it).
    Neither can return wrong bytes, because content is checked on every read.

Metrics (gauges, updated on every change)
    ``cache_mem_bytes``, ``cache_mem_blocks``, ``cache_disk_bytes``,
    ``cache_disk_blocks``, ``cache_disk_limit_bytes`` (effective limit);
    counters ``cache_disk_errors``, ``cache_disk_corrupt``,
    ``cache_mem_evictions``, ``cache_disk_evictions``.  Hit/miss counters
    (``cache_mem_hits``, ``cache_disk_hits``, ``cache_misses``) are counted by
    ``ChunkStore.read_block``, which knows what a read found in the end.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import OrderedDict

from .. import metrics

log = logging.getLogger(__name__)

_TRAILER = struct.Struct("<I")
#: errnos that mean "the cache file system is full"
_FULL = {errno.ENOSPC, errno.EDQUOT}


def _expected_len(key: str) -> int | None:
    """Block length encoded in a block key (``..._<idx>_<len>``), or None."""
    tail = key.rsplit("_", 1)
    if len(tail) == 2 and tail[1].isdigit():
        return int(tail[1])
    return None


class BlockCache:
    """Memory LRU + disk LRU of immutable block objects (see module notes)."""

    def __init__(self, cache_dir: str, disk_limit_bytes: int, mem_limit_bytes: int,
                 volume_uuid: str):
        self.root = os.path.join(cache_dir, volume_uuid)
        self.raw_dir = os.path.join(self.root, "raw")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.disk_limit = disk_limit_bytes
        self.mem_limit = mem_limit_bytes

        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_bytes = 0
        self._mem_lock = threading.Lock()

        self._disk: OrderedDict[str, int] = OrderedDict()  # key -> size on disk (LRU first)
        self._disk_bytes = 0
        self._disk_eff_limit = disk_limit_bytes
        self._pending: set[str] = set()  # indexed (space reserved) but still being written
        self._disk_lock = threading.Lock()
        self._scanned = False
        self._scan_lock = threading.Lock()
        self._warned: set[str] = set()
        self._tmp_seq = 0
        self._update_gauges()

    # ------------------------------------------------------------------ memory
    def get_mem(self, key: str) -> bytes | None:
        """Non-blocking. The block if held in memory (refreshes its recency)."""
        with self._mem_lock:
            data = self._mem.get(key)
            if data is not None:
                self._mem.move_to_end(key)
            return data

    def in_mem(self, key: str) -> bool:
        """Non-blocking. Whether the block is held in memory (its recency untouched)."""
        with self._mem_lock:
            return key in self._mem

    def put_mem(self, key: str, data: bytes) -> None:
        """Non-blocking. Keep ``data`` in memory, evicting LRU blocks to fit."""
        n = len(data)
        with self._mem_lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._mem_bytes -= len(old)
            if n > self.mem_limit:
                self._update_mem_gauges()
                return
            evicted = 0
            while self._mem and self._mem_bytes + n > self.mem_limit:
                _, victim = self._mem.popitem(last=False)
                self._mem_bytes -= len(victim)
                evicted += 1
            self._mem[key] = data
            self._mem_bytes += n
            self._update_mem_gauges()
        if evicted:
            metrics.inc("cache_mem_evictions", evicted)

    def drop_mem(self, key: str) -> None:
        """Non-blocking. Forget a block held in memory (if any)."""
        with self._mem_lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._mem_bytes -= len(old)
                self._update_mem_gauges()

    @property
    def mem_bytes(self) -> int:
        return self._mem_bytes

    # ------------------------------------------------------------------ disk
    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes

    @property
    def disk_limit_effective(self) -> int:
        return self._disk_eff_limit

    def has_disk(self, key: str) -> bool:
        """Non-blocking. Whether ``key`` is indexed on disk (False before the scan)."""
        with self._disk_lock:
            return key in self._disk and key not in self._pending

    def disk_keys(self) -> list[str]:
        """Non-blocking. Keys indexed on disk, least recently used first."""
        with self._disk_lock:
            return list(self._disk)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad cache key {key!r}")
        return os.path.join(self.raw_dir, key)

    def scan(self) -> None:
        """Blocking. Rebuild the disk index from ``raw/`` (once per instance):
        wipe ``tmp/``, delete files whose size does not match their key, and
        order the rest by last access/modification time."""
        with self._scan_lock:
            if self._scanned:
                return
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            os.makedirs(self.tmp_dir, exist_ok=True)
            os.makedirs(self.raw_dir, exist_ok=True)
            found: list[tuple[float, str, int]] = []
            for dirpath, _dirs, files in os.walk(self.raw_dir):
                for name in files:
                    path = os.path.join(dirpath, name)
                    key = os.path.relpath(path, self.raw_dir).replace(os.sep, "/")
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    want = _expected_len(key)
                    if want is None or st.st_size != want + _TRAILER.size:
                        metrics.inc("cache_disk_corrupt")
                        self._unlink(path)
                        continue
                    found.append((max(st.st_atime, st.st_mtime), key, st.st_size))
            found.sort()
            with self._disk_lock:
                for _, key, size in found:
                    if key not in self._disk:
                        self._disk[key] = size
                        self._disk_bytes += size
                victims = self._evict_locked(0)
                self._scanned = True
            self._unlink_keys(victims)
            self._update_gauges()
            log.debug("block cache %s: %d blocks, %d bytes on disk",
                      self.root, len(self._disk), self._disk_bytes)

    def load_disk(self, key: str) -> bytes | None:
        """Blocking. The block from the disk cache, or None (absent, being
        written, short or corrupt; a bad file is deleted).  Refreshes recency."""
        if not self._scanned:
            self.scan()
        with self._disk_lock:
            if key not in self._disk or key in self._pending:
                return None
            self._disk.move_to_end(key)
        path = self._path(key)
        want = _expected_len(key)
        try:
            with open(path, "rb") as f:
                if want is None:
                    raw = f.read()
                    data, tail = raw[:-_TRAILER.size], raw[-_TRAILER.size:]
                else:
                    data = f.read(want)
                    tail = f.read(_TRAILER.size + 1)
        except OSError:
            self._forget(key)
            return None
        if (len(tail) != _TRAILER.size or (want is not None and len(data) != want)
                or _TRAILER.unpack(tail)[0] != zlib.crc32(data)):
            metrics.inc("cache_disk_corrupt")
            log.debug("cache file %s is short or corrupt; dropped", path)
            self._forget(key)
            self._unlink(path)
            return None
        return data

    def save_disk(self, key: str, data: bytes) -> None:
        """Blocking. Store a block in the disk cache (tmp file + rename), evicting
        LRU files to stay under the limit.  Never raises for disk errors: a full
        disk shrinks the effective limit (see module notes)."""
        if not self._scanned:
            self.scan()
        size = len(data) + _TRAILER.size
        with self._disk_lock:
            if key in self._disk:
                self._disk.move_to_end(key)
                return
            if size > self._disk_eff_limit:
                return
            # reserve the space now so concurrent savers evict for each other
            victims = self._evict_locked(size)
            self._disk[key] = size
            self._disk_bytes += size
            self._pending.add(key)
            self._tmp_seq += 1
            tmp = os.path.join(self.tmp_dir, f"{os.getpid()}.{threading.get_ident()}.{self._tmp_seq}")
        self._unlink_keys(victims)
        path = self._path(key)
        try:
            self._write_file(tmp, path, data)
        except OSError as exc:
            self._unlink(tmp)
            self._forget(key)
            self._disk_error(exc)
            return
        finally:
            with self._disk_lock:
                self._pending.discard(key)
        self._update_gauges()

    def _write_file(self, tmp: str, path: str, data: bytes) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(_TRAILER.pack(zlib.crc32(data)))
        try:
            os.rename(tmp, path)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.rename(tmp, path)

    def remove(self, key: str) -> None:
        """Blocking. Drop a block from memory and disk (missing is fine)."""
        self.drop_mem(key)
        if not self._scanned:
            self.scan()
        self._forget(key)
        self._unlink(self._path(key))

    # ------------------------------------------------------------------ internals
    def _evict_locked(self, need: int) -> list[str]:
        """With the disk lock held: pop LRU keys until ``need`` more bytes fit."""
        victims = []
        while self._disk and self._disk_bytes + need > self._disk_eff_limit:
            key, size = self._disk.popitem(last=False)
            self._disk_bytes -= size
            victims.append(key)
        return victims

    def _unlink_keys(self, keys: list[str]) -> None:
        if keys:
            metrics.inc("cache_disk_evictions", len(keys))
        for key in keys:
            self._unlink(self._path(key))

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("cannot remove cache file %s: %s", path, exc)

    def _forget(self, key: str) -> None:
        with self._disk_lock:
            size = self._disk.pop(key, None)
            if size is not None:
                self._disk_bytes -= size
        self._update_gauges()

    def _disk_error(self, exc: OSError) -> None:
        metrics.inc("cache_disk_errors")
        if exc.errno in _FULL:
            with self._disk_lock:
                self._disk_eff_limit = min(self._disk_eff_limit, int(self._disk_bytes * 0.9))
                victims = self._evict_locked(0)
                limit = self._disk_eff_limit
                first = self._first_warning("full")
            self._unlink_keys(victims)
            self._update_gauges()
            if first:
                log.warning("cache disk %s is full (%s); disk cache limit lowered to %d bytes",
                            self.root, os.strerror(exc.errno), limit)
        else:
            with self._disk_lock:
                first = self._first_warning(f"errno{exc.errno}")
            if first:
                log.warning("cannot write cache file under %s: %s (block not cached)",
                            self.root, exc)

    def _first_warning(self, tag: str) -> bool:
        """With the disk lock held: True the first time ``tag`` is seen."""
        if tag in self._warned:
            return False
        self._warned.add(tag)
        return True

    def _update_mem_gauges(self) -> None:
        metrics.set_gauge("cache_mem_bytes", self._mem_bytes)
        metrics.set_gauge("cache_mem_blocks", len(self._mem))

    def _update_gauges(self) -> None:
        metrics.set_gauge("cache_disk_bytes", self._disk_bytes)
        metrics.set_gauge("cache_disk_blocks", len(self._disk))
        metrics.set_gauge("cache_disk_limit_bytes", self._disk_eff_limit)
