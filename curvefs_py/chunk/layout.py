"""Pure functions of the data layout (DESIGN §3): no I/O, no state.

A file is cut into chunks of ``chunk_size`` bytes.  Each chunk holds an ordered
list of ``Slice``s (newest last).  A slice's bytes live in block objects of
``block_size`` bytes, keyed by slice id and block index; the last block of a
slice may be short.  ``overlay`` turns a chunk's slice list into the visible
segments of a byte range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..types import Slice


def block_key(slice_id: int, block_idx: int, block_len: int) -> str:
    """Object key of one block (JuiceFS layout: fan-out directories by id)."""
    return f"chunks/{slice_id // 1_000_000}/{slice_id // 1000}/{slice_id}_{block_idx}_{block_len}"


def block_len(slice_size: int, block_idx: int, block_size: int) -> int:
    """Length of block ``block_idx`` of a slice of ``slice_size`` bytes."""
    return max(0, min(block_size, slice_size - block_idx * block_size))


def block_count(slice_size: int, block_size: int) -> int:
    return (slice_size + block_size - 1) // block_size


def slice_keys(slice_id: int, slice_size: int, block_size: int) -> list[str]:
    """Every object key of a slice."""
    return [block_key(slice_id, i, block_len(slice_size, i, block_size))
            for i in range(block_count(slice_size, block_size))]


def chunk_ranges(offset: int, length: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """Split a file range into (chunk_idx, offset in chunk, length) pieces."""
    end = offset + length
    while offset < end:
        idx = offset // chunk_size
        coff = offset - idx * chunk_size
        n = min(chunk_size - coff, end - offset)
        yield idx, coff, n
        offset += n


@dataclass(frozen=True)
class Segment:
    """A visible piece of a chunk: ``len`` bytes at chunk offset ``pos``, taken
    from slice ``id`` (of size ``size``) at slice offset ``off``; ``id == 0``
    reads as zeros."""

    pos: int
    len: int
    id: int
    size: int
    off: int

    def blocks(self, block_size: int) -> range:
        """Indexes of the slice's blocks this segment reads from."""
        return range(self.off // block_size, (self.off + self.len - 1) // block_size + 1)


def overlay(slices: Sequence[Slice], start: int, length: int) -> list[Segment]:
    """The visible segments of chunk range ``[start, start+length)``, in order,
    covering it exactly (holes as id 0).  Later slices cover earlier ones."""
    end = start + length
    # intervals: list of (pos, end, slice) sorted, non-overlapping; start with one hole
    segs: list[tuple[int, int, Slice | None]] = [(start, end, None)]
    for s in slices:
        s_start, s_end = max(s.pos, start), min(s.pos + s.len, end)
        if s_start >= s_end:
            continue
        out = []
        for a, b, owner in segs:
            if b <= s_start or a >= s_end:
                out.append((a, b, owner))
                continue
            if a < s_start:
                out.append((a, s_start, owner))
            if b > s_end:
                out.append((s_end, b, owner))
        out.append((s_start, s_end, s))
        out.sort(key=lambda t: t[0])
        segs = out
    result = []
    for a, b, s in segs:
        if s is None or s.id == 0:
            result.append(Segment(a, b - a, 0, 0, 0))
        else:
            result.append(Segment(a, b - a, s.id, s.size, s.off + (a - s.pos)))
    return result
