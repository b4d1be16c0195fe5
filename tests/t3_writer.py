"""The write path (vfs/writer.py) without a mount: a real SQLite engine, chunk store
and file object store; only the commit's timing is steered, by holding the engine
call until the test lets it through."""
from __future__ import annotations

import trio
import trio.testing

from curvefs_py import ROOT_INODE
from curvefs_py.chunk.cache import BlockCache
from curvefs_py.chunk.store import ChunkStore
from curvefs_py.errors import FsError, MetaError
from curvefs_py.meta import open_engine
from curvefs_py.object.file import FileStore
from curvefs_py.types import Format
from curvefs_py.vfs.writer import Writers

BS, CS = 4 << 20, 64 << 20


class Volume:
    def __init__(self, tmp_path):
        self.engine = open_engine(f"sqlite3://{tmp_path}/vol.db")
        self.engine.init(Format(name="w", uuid="00000000-0000-0000-0000-0000000000aa", storage="file",
                                bucket=str(tmp_path / "objects"), block_size=BS, chunk_size=CS))
        store = FileStore(str(tmp_path / "objects"), create=True)
        cache = BlockCache(str(tmp_path / "cache"), 1 << 30, 64 << 20, "w")
        self.chunks = ChunkStore(store, cache, BS, local_store=True)
        self.held = trio.Event()  # set: the next commit waits for ``release``
        self.release = trio.Event()
        self.fail_writes = 0  # commits that fail (a metadata outage), then pass
        self.fail_ids: set[int] = set()  # the n-th slice-id reservations that fail
        self.ids = 0
        self.writers = Writers(self.chunks, self.engine_call, self.new_id, BS, CS)

    async def engine_call(self, name: str, *args):
        if name == "write" and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        if name == "write" and self.fail_writes:
            self.fail_writes -= 1
            raise MetaError("metadata server unreachable")
        return getattr(self.engine, name)(*args)

    async def new_id(self) -> int:
        self.ids += 1
        if self.ids in self.fail_ids:
            raise MetaError("cannot reserve slice ids")
        return self.engine.next_slice_id()

    async def read(self, ino: int) -> bytes:
        out = bytearray(self.engine.getattr(ino).length)
        for s in self.engine.read_chunk(ino, 0):
            data = await self.chunks.read(s.id, s.size, s.off, s.len)
            out[s.pos:s.pos + s.len] = data
        return bytes(out)


async def test_a_write_waiting_on_a_flush_is_committed_by_the_next(tmp_path):
    """A write that waits for the lock of a flush which then retires the file's writer
    (clean) goes into a new writer, not into the retired one, where no flush would
    ever find it."""
    v = Volume(tmp_path)
    ino = v.engine.mknod(ROOT_INODE, b"f", 0o100644, 0, 0).ino
    async with trio.open_nursery() as nursery:
        v.writers.nursery = nursery
        await v.writers.write(ino, 0, b"a" * 10)
        nursery.start_soon(v.writers.flush, ino)
        await v.held.wait()  # the flush holds the writer's lock, in its commit
        nursery.start_soon(v.writers.write, ino, 10, b"b" * 10)
        await trio.testing.wait_all_tasks_blocked()  # the write waits for the lock
        v.release.set()
        await trio.testing.wait_all_tasks_blocked()
        await v.writers.flush(ino)
    assert v.engine.getattr(ino).length == 20
    assert await v.read(ino) == b"a" * 10 + b"b" * 10


async def test_a_steady_writer_commits_within_the_flush_interval(tmp_path):
    """A writer busy all the time (its lock never free for the background committer)
    commits at the end of the write that finds its oldest unflushed byte too old."""
    v = Volume(tmp_path)
    v.release.set()
    v.writers.flush_interval = 0.05
    ino = v.engine.mknod(ROOT_INODE, b"f", 0o100644, 0, 0).ino
    async with trio.open_nursery() as nursery:
        v.writers.nursery = nursery
        await v.writers.write(ino, 0, b"a" * 10)
        await v.writers.write(ino, 10, b"b" * 10)
        assert v.engine.getattr(ino).length == 0  # within the interval: buffered
        await trio.sleep(0.06)
        await v.writers.write(ino, 20, b"c" * 10)
        assert v.engine.getattr(ino).length == 30
        assert await v.read(ino) == b"a" * 10 + b"b" * 10 + b"c" * 10
        assert v.writers.dirty_length(ino) is None


async def test_an_append_after_a_failed_commit_starts_a_new_slice(tmp_path):
    """A commit that fails after the upload leaves the slice's partial last block
    uploaded (its buffer gone); an append at the slice's end must not go into that
    block (it raised TypeError: EIO to the application) and both writes commit."""
    v = Volume(tmp_path)
    v.release.set()
    ino = v.engine.mknod(ROOT_INODE, b"f", 0o100644, 0, 0).ino
    async with trio.open_nursery() as nursery:
        v.writers.nursery = nursery
        await v.writers.write(ino, 0, b"a" * 1000)
        v.fail_writes = 1
        try:
            await v.writers.flush(ino, report=True)
            raise AssertionError("the commit did not fail")
        except FsError:
            pass
        await v.writers.write(ino, 1000, b"b" * 1000)
        await v.writers.flush(ino, report=True)
    assert await v.read(ino) == b"a" * 1000 + b"b" * 1000


async def test_an_append_while_its_block_uploads_is_not_lost(tmp_path):
    """A flush that fails while a partial block is still uploading (here the next
    slice's id cannot be reserved) lets go of the lock; an append at the slice's end
    then must not go into the uploading block's buffer (the upload carried the old
    bytes, and the next commit named a block object that was never written)."""
    v = Volume(tmp_path)
    v.release.set()
    ino = v.engine.mknod(ROOT_INODE, b"f", 0o100644, 0, 0).ino
    uploading, go = trio.Event(), trio.Event()
    real = v.chunks.upload_block

    async def held_upload(sid, b, data):
        uploading.set()
        await go.wait()
        return await real(sid, b, data)

    v.chunks.upload_block = held_upload
    async with trio.open_nursery() as nursery:
        v.writers.nursery = nursery
        await v.writers.write(ino, 0, b"a" * 1000)  # chunk 0: a partial block
        await v.writers.write(ino, CS, b"c" * 10)  # chunk 1: a second slice
        v.fail_ids = {2}  # chunk 0's slice gets its id, chunk 1's does not
        try:
            await v.writers.flush(ino, report=True)
            raise AssertionError("the flush did not fail")
        except FsError:
            pass
        await uploading.wait()  # chunk 0's block is still on its way
        await v.writers.write(ino, 1000, b"b" * 1000)
        go.set()
        await v.writers.flush(ino, report=True)
    assert v.engine.getattr(ino).length == CS + 10
    assert (await v.read(ino))[:2000] == b"a" * 1000 + b"b" * 1000
