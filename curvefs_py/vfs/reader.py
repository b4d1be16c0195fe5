"""Read path: chunk slice lists → visible segments → blocks, with sequential readahead.

A read of ``[off, off+size)`` is clamped to the file length, cut at chunk
boundaries, resolved against each chunk's slice list (``layout.overlay``:
newest slice on top, holes as zeros) and served from the ``ChunkStore``
(memory → disk cache → object store).  A handle whose reads continue where
the previous one ended is *sequential*; for it the blocks of the next
``readahead`` bytes are prefetched in the background (JuiceFS-style sessions,
simplified to one stream per handle).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from ..chunk.layout import chunk_ranges, overlay

if TYPE_CHECKING:
    from ..chunk.store import ChunkStore
    from ..types import Slice


class Reader:
    def __init__(self, chunks: "ChunkStore", chunk_size: int, block_size: int,
                 get_slices: Callable[[int, int], Awaitable[list["Slice"]]],
                 readahead: int = 32 << 20):
        self.chunks = chunks
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.get_slices = get_slices
        self.readahead = readahead

    async def read(self, ino: int, off: int, size: int, length: int) -> bytes:
        """Bytes ``[off, off+size)`` of a file of ``length`` bytes (short at EOF)."""
        end = min(off + size, length)
        if end <= off:
            return b""
        parts: list[tuple[int, int, int, int, int]] = []  # (dest, slice_id, size, off, len)
        out = bytearray(end - off)
        for chunk_idx, coff, n in chunk_ranges(off, end - off, self.chunk_size):
            slices = await self.get_slices(ino, chunk_idx)
            base = chunk_idx * self.chunk_size
            for seg in overlay(slices, coff, n):
                if seg.id:
                    parts.append((base + seg.pos - off, seg.id, seg.size, seg.off, seg.len))
        if len(parts) == 1:
            dest, sid, ssize, soff, slen = parts[0]
            data = await self.chunks.read(sid, ssize, soff, slen)
            if dest == 0 and slen == len(out):
                return data  # the common case: one slice covers the read, no extra copies
            out[dest:dest + slen] = data
        elif parts:
            async def one(dest, sid, ssize, soff, slen):
                out[dest:dest + slen] = await self.chunks.read(sid, ssize, soff, slen)

            try:
                async with trio.open_nursery() as nursery:
                    for p in parts:
                        nursery.start_soon(one, *p)
            except BaseExceptionGroup as group:
                # callers handle NoSuchKey/ObjectStoreError, not groups: raise the first
                first = group.exceptions[0]
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
        return bytes(out)

    async def readahead_from(self, ino: int, off: int, length: int) -> None:
        """Prefetch the blocks of ``[off, off+readahead)`` (clamped to EOF)."""
        end = min(off + self.readahead, length)
        if end <= off:
            return
        bs = self.block_size
        for chunk_idx, coff, n in chunk_ranges(off, end - off, self.chunk_size):
            slices = await self.get_slices(ino, chunk_idx)
            for seg in overlay(slices, coff, n):
                if not seg.id:
                    continue
                for b in seg.blocks(bs):
                    await self.chunks.prefetch(seg.id, seg.size, b)
