"""Hold a volume's bucket against its metadata: leaked objects (``gc``), missing ones (``fsck``).

DESIGN §3: a write uploads its blocks, then commits its slice, so a crash between the
two leaves objects that no chunk names (*leaks*), never a committed slice without
its objects.  A missing or short block object is therefore damage (a bucket edited
by hand, a lost S3 object); ``fsck`` names the files it breaks.

Safety against the clients that stay mounted meanwhile (JuiceFS ``gc`` does the same):
- An object that no chunk names may be an upload whose commit is on its way: only
  objects older than ``min_age`` (by their upload time) count as leaked.  A mounted
  client commits what it uploaded within seconds, also for a file kept open and
  written for hours (``mount --flush-interval``, 10 s), unless the metadata engine
  is unreachable for that long: ``min_age`` (1 h) must outlast such an outage.
- Just before deleting, the metadata is read again and every leak that a chunk or the
  delete queue now names is kept.  A slice queued for deletion is left to the
  mounted clients' background deleters.
- A block that seems missing is looked up again (HEAD) and its slice checked against
  a second read of the metadata: a file deleted or written while the bucket was
  listed is not reported.

Everything here is blocking (a command-line tool, not the daemon).
"""
from __future__ import annotations

import concurrent.futures
import errno
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from .. import ROOT_INODE
from ..chunk.layout import slice_keys
from ..errors import FsError, NoSuchKey
from ..meta.engine import Engine
from ..object.base import ObjectInfo, ObjectStore

#: ``chunks/{id // 10**6}/{id // 1000}/{id}_{block}_{len}`` (layout.block_key).
_BLOCK_KEY = re.compile(r"chunks/(\d+)/(\d+)/(\d+)_(\d+)_(\d+)")
#: A put's temporary file younger than this may belong to a put still running (the
#: file store writes, fsyncs and renames it): kept whatever --min-age says.
PARTIAL_MIN_AGE_S = 600.0
#: Queue reads: every pending delete at once.
_ALL = 1 << 62

Progress = Callable[[int, int], None]  # (objects listed, bytes listed)


@dataclass
class Audit:
    """What one pass over the bucket found."""

    started: float                      # time.time() when the metadata was read
    min_age: float
    slices: int = 0                     # distinct slices the metadata names
    files: int = 0                      # files with data
    listed: int = 0                     # objects under chunks/
    listed_bytes: int = 0
    named: int = 0                      # objects a chunk names, present with their length
    queued: int = 0                     # objects of slices in the delete queue
    queued_slices: int = 0
    young: int = 0                      # unnamed but newer than min_age: left alone
    foreign: int = 0                    # keys not in the block layout: left alone
    leaked: list[ObjectInfo] = field(default_factory=list)
    #: leftovers of puts that never finished (file store), older than min_age
    partial: list[ObjectInfo] = field(default_factory=list)
    #: damaged files: ino -> [(key, what is wrong)]
    broken: dict[int, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def leaked_bytes(self) -> int:
        return sum(o.size for o in self.leaked)

    @property
    def partial_bytes(self) -> int:
        return sum(o.size for o in self.partial)


def _named_keys(slices: Iterable[tuple[int, int, int]], block_size: int) -> dict[str, set[int]]:
    """Every block key of the slices -> the inodes whose chunks name it."""
    out: dict[str, set[int]] = {}
    for sid, size, ino in slices:
        for key in slice_keys(sid, size, block_size):
            out.setdefault(key, set()).add(ino)
    return out


def _queued_keys(engine: Engine, block_size: int) -> tuple[set[str], int]:
    pending = engine.pending_deletes(_ALL)
    return set(_named_keys(((sid, size, 0) for sid, size in pending), block_size)), len(pending)


def audit(engine: Engine, store: ObjectStore, block_size: int, min_age: float = 3600.0,
          progress: Optional[Progress] = None) -> Audit:
    """Blocking. List the bucket's block objects and sort them against the metadata.

    The chunks are read before the delete queue (a slice moves from the first to the
    second, never back) and both before the listing (an upload after that is young).
    """
    started = time.time()
    slices = engine.scan_slices()
    named = _named_keys(slices, block_size)
    queued, n_queued = _queued_keys(engine, block_size)
    a = Audit(started=started, min_age=min_age, slices=len({s for s, _, _ in slices}),
              files=len({ino for _, _, ino in slices}), queued_slices=n_queued)
    found: dict[str, int] = {}
    for obj in store.list("chunks/"):
        a.listed += 1
        a.listed_bytes += obj.size
        if progress is not None and a.listed % 1000 == 0:
            progress(a.listed, a.listed_bytes)
        if obj.key in named:
            found[obj.key] = obj.size
        elif obj.key in queued:
            a.queued += 1
        elif not _BLOCK_KEY.fullmatch(obj.key):
            a.foreign += 1
        elif _young(obj, started, min_age):
            a.young += 1
        else:
            a.leaked.append(obj)
    if progress is not None:
        progress(a.listed, a.listed_bytes)
    for obj in store.list_partial("chunks/"):  # never named by anything: age is all
        if _young(obj, started, max(min_age, PARTIAL_MIN_AGE_S)):
            a.young += 1
        else:
            a.partial.append(obj)

    suspects = {key: inos for key, inos in named.items() if found.get(key) != _key_len(key)}
    a.named = len(named) - len(suspects)
    if suspects:
        a.broken = _confirm_broken(engine, store, block_size, suspects)
    return a


def _young(obj: ObjectInfo, started: float, min_age: float) -> bool:
    """Uploaded less than ``min_age`` seconds before ``started`` (or at an unknown time)."""
    return obj.mtime <= 0 or obj.mtime > started - min_age


def _key_len(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def _confirm_broken(engine: Engine, store: ObjectStore, block_size: int,
                    suspects: dict[str, set[int]]) -> dict[int, list[tuple[str, str]]]:
    """The suspects still named by the metadata whose object is still missing or short."""
    still = _named_keys(engine.scan_slices(), block_size)
    broken: dict[int, list[tuple[str, str]]] = {}

    def check(key: str) -> Optional[str]:
        try:
            size = store.head(key)
        except NoSuchKey:
            return "missing"
        want = _key_len(key)
        return None if size == want else f"{size} bytes, not {want}"

    keys = [k for k in suspects if k in still]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = {k: p for k, p in zip(keys, pool.map(check, keys)) if p is not None}
    if problems:  # a slice deleted between the second read and the HEAD is no damage
        still = _named_keys(engine.scan_slices(), block_size)
    for key, problem in problems.items():
        for ino in sorted(still.get(key, ())):
            broken.setdefault(ino, []).append((key, problem))
    return broken


def collect(engine: Engine, store: ObjectStore, block_size: int, leaked: list[ObjectInfo],
            threads: int = 8, partial: Iterable[ObjectInfo] = ()) -> tuple[int, int, int]:
    """Blocking. Delete the leaked objects that the metadata still does not name, and
    the ``partial`` leftovers of unfinished puts.

    Returns (objects deleted, bytes deleted, objects kept because a chunk or the
    delete queue names them now)."""
    named = _named_keys(engine.scan_slices(), block_size)
    queued, _ = _queued_keys(engine, block_size)
    doomed = [o for o in leaked if o.key not in named and o.key not in queued]
    partial = list(partial)
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(lambda o: store.delete(o.key), doomed))
        list(pool.map(lambda o: store.delete_partial(o.key), partial))
    gone = doomed + partial
    return len(gone), sum(o.size for o in gone), len(leaked) - len(doomed)


def paths_of(engine: Engine, inos: Iterable[int]) -> dict[int, str]:
    """Blocking. A path of each inode, found by walking the tree from the root; an
    inode that no directory holds (deleted, still open somewhere) is left out."""
    want = set(inos)
    out: dict[int, str] = {}
    todo = [(ROOT_INODE, "")]
    while todo and len(out) < len(want):
        ino, path = todo.pop()
        try:
            entries = engine.readdir(ino)
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue  # removed while we walk
            raise
        for e in entries:  # (readdir gives no . and ..)
            p = f"{path}/{e.name.decode(errors='surrogateescape')}"
            if e.ino in want and e.ino not in out:
                out[e.ino] = p
            if e.attr.is_dir:
                todo.append((e.ino, p))
    return out
