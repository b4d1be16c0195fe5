"""Write path: buffer → upload blocks → commit slices, in that order (DESIGN §3).

Protocol (one ``FileWriter`` per inode with unflushed data):

* ``write(off, data)`` cuts the range at chunk boundaries.  Each piece goes into
  the newest open ``SliceWriter`` of its chunk when it continues or overwrites
  that slice's buffered (not yet uploading) bytes; otherwise a new slice starts.
  Only the newest slice of a chunk is ever extended, so commit order (creation
  order) equals "newer covers older".
* A block of a slice is uploaded as soon as it is full and the writer has moved
  past it; the upload runs as a background task, bounded by a semaphore that
  the write path acquires (backpressure: at most ``max_uploads`` blocks of
  memory in flight).  A block's bytes are freed only after its PUT succeeded,
  so a failed upload is retried by the next flush.
* ``flush()`` (FLUSH on every close, FSYNC, a read or truncate of the inode,
  buffer pressure) uploads the remaining (partial) blocks, waits for all
  uploads, and only then commits every slice in one engine transaction.  So a
  crash can leak objects (reclaimed by gc) but metadata never points at a
  missing object.  Once flush returns, the data is durable.
* ``commit_idle()`` flushes every file whose oldest unflushed write is older
  than ``flush_interval`` (the VFS calls it every quarter of that): the writes
  of a file kept open are committed within seconds, as in JuiceFS, so they are
  visible to other clients, and an uploaded block is never left unnamed for
  long (``gc`` takes objects unnamed for ``--min-age`` for leaks).  A failure
  there is kept and raised by the next flush of the file (its fsync or close),
  as the kernel reports writeback errors.
* Dangerous awaits: everything between ``async with self.lock`` boundaries;
  ``write`` may await the upload semaphore while holding the inode lock, which
  is fine because uploads never take the lock.
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import trio

from .. import metrics
from ..chunk.layout import chunk_ranges
from ..errors import FsError
from ..types import Attr, Slice

if TYPE_CHECKING:
    from ..chunk.store import ChunkStore

log = logging.getLogger(__name__)

BUFFERED, UPLOADING, UPLOADED = 0, 1, 2


@dataclass
class _Block:
    data: Optional[bytearray]
    state: int = BUFFERED


@dataclass
class SliceWriter:
    chunk_idx: int
    pos: int  # offset of the slice in its chunk
    block_size: int
    id: int = 0
    len: int = 0
    blocks: Dict[int, _Block] = field(default_factory=dict)
    pending: int = 0
    error: Optional[BaseException] = None
    idle: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self):
        self.idle.set()

    def can_take(self, coff: int, n: int) -> bool:
        """Whether bytes [coff, coff+n) of the chunk can go into this slice."""
        rel = coff - self.pos
        if rel < 0 or rel > self.len:
            return False
        bs = self.block_size
        # every block the bytes touch, including the partial last block an append
        # at the slice's end goes into: one uploading (or uploaded, its buffer gone)
        # must not change under its upload
        for b in range(rel // bs, (rel + n - 1) // bs + 1):
            blk = self.blocks.get(b)
            if blk is not None and blk.state != BUFFERED:
                return False
        return True

    def put(self, coff: int, data: memoryview) -> None:
        rel = coff - self.pos
        bs = self.block_size
        i = 0
        while i < len(data):
            b, boff = divmod(rel + i, bs)
            n = min(bs - boff, len(data) - i)
            blk = self.blocks.get(b)
            if blk is None:
                blk = self.blocks[b] = _Block(bytearray())
            buf = blk.data
            if len(buf) < boff:
                buf.extend(bytes(boff - len(buf)))
            buf[boff:boff + n] = data[i:i + n]
            i += n
        self.len = max(self.len, rel + len(data))

    def full_blocks_behind(self, rel_end: int) -> List[int]:
        """Buffered blocks that are complete and lie wholly before ``rel_end``."""
        bs = self.block_size
        return [b for b, blk in self.blocks.items()
                if blk.state == BUFFERED and (b + 1) * bs <= rel_end and len(blk.data) == bs]

    def buffered_bytes(self) -> int:
        return sum(len(b.data) for b in self.blocks.values() if b.data is not None)


class FileWriter:
    def __init__(self, ino: int, block_size: int, chunk_size: int):
        self.ino = ino
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.lock = trio.Lock()
        self.slices: List[SliceWriter] = []
        self.length = 0  # highest end offset written since the last commit
        self.mtime_ns = 0
        self.dirty_since = 0.0  # trio clock of the first write since the last commit
        #: a failed background commit (commit_idle), raised by the next flush
        self.error: Optional[FsError] = None

    @property
    def dirty(self) -> bool:
        return bool(self.slices)

    def buffered_bytes(self) -> int:
        return sum(s.buffered_bytes() for s in self.slices)


class Writers:
    """All file writers of a mount, plus the upload workers they feed."""

    def __init__(self, chunks: "ChunkStore", engine_call, new_slice_id, block_size: int,
                 chunk_size: int, *, max_uploads: int = 32, max_slices: int = 1000,
                 max_buffer: int = 256 << 20, on_commit: Callable[[Attr], None] | None = None,
                 delete_later: Callable[[int, int], None] | None = None,
                 on_slices: Callable[[int, list], None] | None = None):
        self.chunks = chunks
        self._engine_call = engine_call  # async (fn_name, *args) -> result
        self._new_slice_id = new_slice_id  # async () -> int
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.by_ino: Dict[int, FileWriter] = {}
        self._upload_sem = trio.Semaphore(max_uploads)
        self.max_slices = max_slices
        self.max_buffer = max_buffer
        self.on_commit = on_commit
        self.delete_later = delete_later
        self.on_slices = on_slices
        self.nursery: Optional[trio.Nursery] = None
        #: seconds after which a file's writes are committed without a flush (0: never)
        self.flush_interval = 0.0

    def get(self, ino: int) -> Optional[FileWriter]:
        return self.by_ino.get(ino)

    def dirty_length(self, ino: int) -> Optional[tuple[int, int]]:
        """(length, mtime_ns) of unflushed writes of ``ino``, or None."""
        fw = self.by_ino.get(ino)
        if fw is None or not fw.dirty:
            return None
        return fw.length, fw.mtime_ns

    async def write(self, ino: int, off: int, data: bytes) -> int:
        while True:
            fw = self.by_ino.get(ino)
            if fw is None:
                fw = self.by_ino[ino] = FileWriter(ino, self.block_size, self.chunk_size)
            async with fw.lock:
                if fw.error is not None:
                    # earlier writes were dropped (ENOSPC, the file gone): say so now,
                    # as JuiceFS does; the flush of a writable handle says it again
                    raise fw.error
                # a flush that held the lock may have retired this writer meanwhile:
                # bytes put into it now would never be committed
                if self.by_ino.get(ino) is fw:
                    await self._write_locked(fw, off, data)
                    return len(data)

    async def _write_locked(self, fw: FileWriter, off: int, data: bytes) -> None:
        mv = memoryview(data)
        if not fw.dirty:
            fw.dirty_since = trio.current_time()
        done = 0
        for chunk_idx, coff, n in chunk_ranges(off, len(data), self.chunk_size):
            piece = mv[done:done + n]
            done += n
            sw = None
            for cand in reversed(fw.slices):
                if cand.chunk_idx == chunk_idx:
                    sw = cand
                    break
            if sw is None or not sw.can_take(coff, n):
                sw = SliceWriter(chunk_idx, coff, self.block_size)
                fw.slices.append(sw)
            sw.put(coff, piece)
            for b in sw.full_blocks_behind(coff + n - sw.pos):
                await self._start_upload(sw, b)
        fw.length = max(fw.length, off + len(data))
        fw.mtime_ns = time.time_ns()
        pressure = (len(fw.slices) > self.max_slices
                    or fw.buffered_bytes() > self.max_buffer)
        if pressure:
            await self._flush_locked(fw)
        elif self._due(fw):
            await self._timed_commit(fw)  # a steady writer holds the lock commit_idle skips

    async def _start_upload(self, sw: SliceWriter, b: int) -> None:
        if not sw.id:
            sw.id = await self._new_slice_id()
        blk = sw.blocks[b]
        await self._upload_sem.acquire()
        blk.state = UPLOADING
        sw.pending += 1
        sw.idle = trio.Event() if sw.idle.is_set() else sw.idle
        assert self.nursery is not None, "Writers.nursery not set"
        self.nursery.start_soon(self._upload, sw, b, bytes(blk.data), name=f"upload-{sw.id}-{b}")

    async def _upload(self, sw: SliceWriter, b: int, data: bytes) -> None:
        blk = sw.blocks[b]
        try:
            await self.chunks.upload_block(sw.id, b, data)
        except Exception as exc:  # retried by the next flush
            log.warning("upload of slice %d block %d failed: %s", sw.id, b, exc)
            sw.error = exc
            blk.state = BUFFERED
        else:
            blk.state = UPLOADED
            blk.data = None
        finally:
            self._upload_sem.release()
            sw.pending -= 1
            if sw.pending == 0:
                sw.idle.set()

    async def flush(self, ino: int, report: bool = False) -> None:
        """Make every write of ``ino`` durable (blocks uploaded, slices committed).
        ``report``: the caller is a handle open for writing (its FLUSH, FSYNC or
        RELEASE), which also gets the error of a failed background commit."""
        fw = self.by_ino.get(ino)
        if fw is None:
            return
        async with fw.lock:
            err = fw.error if report else None
            if err is not None:
                fw.error = None
            try:
                await self._flush_locked(fw)
            except BaseException as exc:
                if report and fw.error is exc:
                    fw.error = None  # writes dropped by this flush: reported by this raise
                if err is not None and fw.error is None:
                    fw.error = err  # not reported yet: the next one says it
                raise
            if not fw.dirty and fw.error is None and self.by_ino.get(ino) is fw:
                del self.by_ino[ino]
            if err is not None:
                raise err

    def forget_error(self, ino: int) -> None:
        """The file's last handle closed: a kept error has nobody left to hear it (the
        writer's close reported what it could), and must not fail a later writer."""
        fw = self.by_ino.get(ino)
        if fw is not None and fw.error is not None:
            fw.error = None
            if not fw.dirty:
                del self.by_ino[ino]

    def _due(self, fw: FileWriter) -> bool:
        """Whether ``fw``'s oldest unflushed write is older than ``flush_interval``."""
        return (bool(self.flush_interval) and fw.dirty
                and trio.current_time() - fw.dirty_since >= self.flush_interval)

    async def commit_idle(self) -> None:
        """Flush the files whose oldest unflushed write is older than ``flush_interval``
        seconds, but for those a write or flush is busy with (``write`` then commits
        at its end); a failure is kept for the file's next flush by a writer."""
        for fw in [fw for fw in self.by_ino.values() if self._due(fw)]:
            if fw.lock.locked():
                continue
            async with fw.lock:
                await self._timed_commit(fw)

    async def _timed_commit(self, fw: FileWriter) -> None:
        """A commit that no caller waits for (``fw.lock`` held): its failure is logged
        and kept — retried later if the writes are still buffered, else (dropped:
        ENOSPC, the file gone) raised by the next flush of a writable handle."""
        try:
            await self._flush_locked(fw)
        except FsError as exc:
            if fw.dirty:
                log.warning("committing the writes of inode %d failed (retried): %s", fw.ino, exc)
                fw.dirty_since = trio.current_time()
            else:
                log.warning("the writes of inode %d were lost (reported at its close): %s", fw.ino, exc)
        else:
            metrics.inc("vfs_idle_commits")

    async def _flush_locked(self, fw: FileWriter) -> None:
        if not fw.dirty:
            return
        with metrics.timer("vfs_flush"):
            for sw in fw.slices:
                sw.error = None
                for b, blk in sorted(sw.blocks.items()):
                    if blk.state == BUFFERED:
                        await self._start_upload(sw, b)
            for sw in fw.slices:
                await sw.idle.wait()
            errors = [sw.error for sw in fw.slices if sw.error is not None]
            if errors:
                raise FsError(errno.EIO, f"upload failed: {errors[0]}")
            slices = [(sw.chunk_idx, Slice(sw.pos, sw.id, sw.len, 0, sw.len)) for sw in fw.slices]
            try:
                attr = await self._engine_call("write", fw.ino, slices, fw.length, fw.mtime_ns)
            except FsError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOSPC):
                    # nothing was committed: the objects are garbage now, and the
                    # writes are lost whoever flushed (a reader, a truncate, the
                    # flush interval): the next flush of a writable handle says so
                    for _, s in slices:
                        if self.delete_later:
                            self.delete_later(s.id, s.size)
                    fw.slices.clear()
                    fw.length = 0
                    fw.error = exc
                raise
            fw.slices.clear()
            fw.length = 0
            if self.on_commit:
                self.on_commit(attr)
            if self.on_slices:
                self.on_slices(fw.ino, [idx for idx, _ in slices])

    async def flush_all(self) -> None:
        for ino in list(self.by_ino):
            try:
                await self.flush(ino)
            except FsError as exc:
                log.error("flushing inode %d failed: %s", ino, exc)
