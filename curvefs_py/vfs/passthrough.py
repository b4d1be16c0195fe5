"""Whole-file images in the disk cache, handed to the kernel with FUSE passthrough.

Why: a read the daemon answers costs ~70 µs and ~2.5 ms per MiB in Python;
``notify_store`` can fill the page cache, but only as fast as the daemon can
copy.  Linux >= 6.9 can instead serve every read of an open file from a local
*backing file*, in the kernel (FOPEN_PASSTHROUGH).  A file's content is a
stack of slices over immutable blocks, so the backing file has to be built: an
*image* is the file's bytes at one ``data_version``, assembled from blocks the
block cache (or a local ``file`` store) already holds — never fetched for it.

``Images``: the image files, ``<cache>/<uuid>/images/<ino>-<version>-<length>``
(sparse: holes stay holes), LRU within ``limit`` bytes, built by ``build``
(temp file, fdatasync, rename; a crash leaves only temp files, swept at scan).
The name is the identity: data_version is persistent and bumped by every
content change on every client, so an image is current iff its name matches
the inode's attributes at open; it survives remounts.  A build needs the
chunks' slice lists: when a read-only handle closes, the ones its reads
fetched are used (no extra metadata calls; a file not read to the end is not
built); ``warmup`` reads them fresh.

Held images: the page cache of an image is what the kernel reads from, so a
page reclaimed while the file is idle costs the next reader a small synchronous
disk read (a 1 GiB sequential read fell from 7.8 to 1.3 GiB/s here).  Proactive
reclaim takes exactly those pages: DAMON ``pageout`` schemes page out what was
idle for a while, and are commonly filtered to *unmapped* file pages (this
machine runs one: 12 aggregation intervals idle; anon and mapped pages
excluded).  So the most recently used images, up to ``hold_limit`` bytes
(``--image-hold``), stay *mapped* in
the daemon (read-only, shared, populated with MADV_POPULATE_READ): their pages
count as in use, like a mapped executable's.  A hold is not a pin: under memory
pressure the kernel still unmaps and reclaims them (a pin would be mlock).
Holds end when the image is forgotten (deleted, evicted, changed) or pushed
out of the LRU, and with the daemon.

``Passthrough``: the kernel's io mode per inode.  The kernel lets an inode be
either in *cached* mode (page cache, the daemon's READs and pushes) or in
*passthrough* mode (one backing file), never both; an open that does not fit
the current mode fails with EIO.  So, with ``modes[ino]`` the inodes this
daemon put in passthrough mode (the kernel releases a file's io mode before it
sends RELEASE, so this view is always a superset of the kernel's):

* no handle open here, a read-only open, and a current image: register the
  image as backing file and reply FOPEN_PASSTHROUGH;
* ``ino`` in ``modes``: every open must be passthrough too.  A writer, or a
  reader after another client changed the file, gets FOPEN_PASSTHROUGH |
  FOPEN_DIRECT_IO: its reads and writes reach the daemon (current data),
  only its mmap uses the image.  Writes and truncates through the daemon are
  mirrored into the image, so the passthrough readers on this machine see
  them at once; such an image no longer matches its name and is unlinked at
  the first mirrored change (its open file lives on until the mode ends);
* otherwise cached mode, as without passthrough.  When the last handle of a
  file read through the daemon closes and all its blocks are local, its image
  is built for the next open.

Known limit: while an inode is in passthrough mode, a writable *shared mmap*
by a writer modifies the image only (the daemon never sees those stores); a
writer's read/write calls are not affected.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, Optional, Protocol

import trio

from .. import metrics, threads
from ..chunk.layout import overlay
from ..errors import ObjectStoreError

if TYPE_CHECKING:
    from ..chunk.layout import Segment
    from ..chunk.store import ChunkStore
    from ..types import Attr, Slice

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


class KernelBacking(Protocol):
    """What the VFS asks of the kernel's passthrough (``fuse/backing.py``)."""

    available: bool
    reason: str

    async def open(self, fd: int) -> int: ...

    async def close(self, bid: int) -> None: ...


def _pwrite_all(fd: int, data, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def default_hold_limit(image_cache_size: int) -> int:
    """A quarter of physical memory, at most the image cache."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        ram = 0
    return min(ram // 4, image_cache_size)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PAGE = os.sysconf("SC_PAGE_SIZE")
_POPULATE_STEP = 64 << 20  # between steps a populate sees whether its hold ended
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_POPULATE_READ = 22  # Linux >= 5.14; Python's mmap.madvise would hold the GIL


@dataclass
class _Held:
    """An image mapped into the daemon (libc calls: they release the GIL)."""
    addr: int
    length: int
    busy: bool = True    # being populated by a worker thread
    dead: bool = False   # released while busy: the populating thread unmaps it
    #: (offset, length) ranges not populated yet: all of it at first, the pages that
    #: were not resident when the mount's pass held it, none once populated
    missing: list = field(default_factory=list)

    @classmethod
    def map(cls, fd: int, length: int) -> "_Held":
        addr = _libc.mmap(None, length, 0x1, 0x1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, _MAP_FAILED):
            _raise_errno()
        return cls(addr, length, missing=[(0, length)])

    def populate(self, start: int, length: int) -> None:
        """Map pages (reading the missing ones: the call waits for the disk)."""
        if _libc.madvise(self.addr + start, length, _MADV_POPULATE_READ) != 0:
            _raise_errno()

    def resident(self) -> list[tuple[int, int]]:
        """The (offset, length) runs of pages now in the page cache (mincore)."""
        pages = (self.length + _PAGE - 1) // _PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(self.addr, self.length, vec) != 0:
            _raise_errno()
        return [(m.start() * _PAGE, min((m.end() - m.start()) * _PAGE, self.length - m.start() * _PAGE))
                for m in re.finditer(rb"[^\x00]+", bytes(vec))]

    def unmap(self) -> None:
        if _libc.munmap(self.addr, self.length) != 0:
            log.warning("munmap of a held image failed: %s", os.strerror(ctypes.get_errno()))


def _gaps(runs: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of [0, length) that sorted, disjoint ``runs`` leave."""
    gaps, pos = [], 0
    for start, n in runs:
        if start > pos:
            gaps.append((pos, start - pos))
        pos = start + n
    if pos < length:
        gaps.append((pos, length - pos))
    return gaps


def _touch(path: str) -> None:
    """The image's mtime records its last use: the LRU order of the next scan."""
    try:
        os.utime(path)
    except OSError:
        pass


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


class Images:
    """The image files of one volume in the local cache directory."""

    def __init__(self, root: str, limit: int, max_file: int, hold_limit: int = 0):
        self.dir = os.path.join(root, "images")
        self.limit = limit
        self.max_file = max_file
        self.hold_limit = hold_limit
        self._held: "OrderedDict[str, _Held]" = OrderedDict()  # name -> mapping, LRU first
        self._held_bytes = 0
        self._lock = threading.Lock()  # _files/_held membership between worker threads
        self._files: "OrderedDict[str, int]" = OrderedDict()  # name -> bytes on disk, LRU first
        self._bytes = 0
        self._scanned = False
        self._seq = 0
        self.building: set[int] = set()
        #: images whose page-cache events the BPF probe counts for a mount inode
        self.mapped: Dict[str, tuple[int, int]] = {}
        self.unmap: Optional[Callable[[int, int], None]] = None

    @staticmethod
    def name(ino: int, version: int, length: int) -> str:
        return f"{ino}-{version}-{length}"

    def eligible(self, attr: "Attr") -> bool:
        return attr.is_file and 0 < attr.length <= self.max_file and self.limit >= attr.length

    def scan(self) -> None:
        """Blocking. Index the images left by earlier mounts; drop temp files."""
        if self._scanned:
            return
        os.makedirs(self.dir, exist_ok=True)
        found = []
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name.startswith("tmp-") or e.name.startswith("."):
                    _unlink(e.path)
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue
                found.append((st.st_mtime, e.name, st.st_blocks * 512))
        with self._lock:
            for _, name, size in sorted(found):
                self._files[name] = size
                self._bytes += size
        self._scanned = True
        self._gauges()

    def lookup(self, attr: "Attr", touch: bool = True) -> Optional[str]:
        """Non-blocking. The current image of the file, if there is one (``touch``:
        a use, which moves it to the end of the eviction order)."""
        name = self.name(attr.ino, attr.data_version, attr.length)
        with self._lock:  # short: worker threads hold it for dict operations only
            if name not in self._files:
                return None
            if touch:
                self._files.move_to_end(name)
        return os.path.join(self.dir, name)

    def is_held(self, path: str) -> bool:
        """Non-blocking. Whether the image is mapped by this daemon (a hold)."""
        with self._lock:
            return os.path.basename(path) in self._held

    def forget(self, path: str, unmap: bool = True) -> None:
        """Blocking. Remove an image (open files of it stay valid); ``unmap``:
        stop counting its page-cache events (its inode number may be reused)."""
        name = os.path.basename(path)
        with self._lock:
            size = self._files.pop(name, None)
            if size is not None:
                self._bytes -= size
            gone = self._release(name)
        if gone is not None:
            gone.unmap()  # before the unlink: the mapping would keep the blocks allocated
        _unlink(path)
        if unmap:
            self.unmap_name(name)
        self._gauges()

    # ------------------------------------------------------------- holds
    def _release(self, name: str) -> Optional[_Held]:
        """Under _lock: end the hold of ``name``; the mapping to unmap now, if any."""
        h = self._held.pop(name, None)
        if h is None:
            return None
        self._held_bytes -= h.length
        if h.busy:
            h.dead = True
            return None
        return h

    def hold(self, path: str, resident_only: bool = False) -> bool:
        """Blocking. Keep the image mapped (see the module's doc); the least
        recently used holds end beyond ``hold_limit``.  ``resident_only`` (the
        mount's pass over the images of earlier mounts, most recent first): map
        only the pages now in the page cache (no disk reads), not at all if none
        is or the image does not fit beside the holds already taken, and as less
        recent than those.  False if not held."""
        name = os.path.basename(path)
        with self._lock:
            h = self._held.get(name)
            if h is not None:
                self._held.move_to_end(name)
                if resident_only or h.busy or not h.missing:
                    return True
                h.busy = True  # held at mount with its resident pages only: now the rest
            elif self.hold_limit <= 0 or name not in self._files:
                return False
        if h is not None:
            _touch(path)
            return self._populate(name, h, h.missing, [])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # forgotten meanwhile
            return False
        try:
            st = os.fstat(fd)
            if not 0 < st.st_size <= self.hold_limit or \
                    (resident_only and self._held_bytes + st.st_size > self.hold_limit):
                return False
            h = _Held.map(fd, st.st_size)
        except OSError as exc:
            log.debug("image %s not held: %s", name, exc)
            return False
        finally:
            os.close(fd)
        runs, rest = h.missing, []
        if resident_only:
            try:
                runs = h.resident()
            except OSError as exc:
                log.debug("image %s: mincore: %s", name, exc)
                runs = []
            if not runs:
                h.unmap()
                return False
            rest = _gaps(runs, h.length)
        ended = []
        with self._lock:
            # forgotten, held by a racing call, or forgotten and built again (same
            # name, another file: the one mapped here is unlinked)
            raced = name not in self._files or name in self._held or _inode(path) != st.st_ino
            if raced:
                h.busy = False
                ended.append(h)
            else:
                self._held[name] = h
                self._held_bytes += h.length
                if resident_only:
                    self._held.move_to_end(name, last=False)
                while self._held_bytes > self.hold_limit:
                    old = self._release(next(iter(self._held)))
                    if old is not None:
                        ended.append(old)
                    metrics.inc("image_hold_ends")
        for old in ended:
            old.unmap()
        self._gauges()
        if raced:
            return name in self._held
        if not resident_only:
            _touch(path)
        return self._populate(name, h, runs, rest)

    def _populate(self, name: str, h: _Held, runs: list[tuple[int, int]], rest: list) -> bool:
        """Populate ``runs`` of a held (busy) mapping in steps, then ``rest`` is what
        is missing; stop and unmap it if its hold ended meanwhile (its file may be
        unlinked).  Mapped pages are not walked again: 33 ms of CPU for 1 GiB,
        and a populate runs beside the reader that opened the file."""
        ok = True
        try:
            for start, length in runs:
                for off in range(start, start + length, _POPULATE_STEP):
                    if h.dead:
                        break
                    h.populate(off, min(_POPULATE_STEP, start + length - off))
        except OSError as exc:  # EIO, ENOMEM, EFAULT (truncated): the next open retries
            log.debug("image %s: populate: %s", name, exc)
            ok = False
        with self._lock:
            if ok:
                h.missing = rest
            h.busy = False
            dead = h.dead
        if dead:
            h.unmap()
            return False
        metrics.inc("image_holds")
        return True

    def hold_resident(self) -> int:
        """Blocking, at mount. Hold again, most recently used first, the images
        whose pages are still in the page cache (an earlier daemon held them, or
        they were read lately), as far as they are; no disk reads.  How many."""
        self.scan()
        n = 0
        for name in reversed(list(self._files)):
            if self._held_bytes >= self.hold_limit:
                break
            n += self.hold(os.path.join(self.dir, name), resident_only=True)
        return n

    def release_all(self) -> None:
        """Blocking. End every hold (unmount)."""
        with self._lock:
            ended = [self._release(name) for name in list(self._held)]
        for h in ended:
            if h is not None:
                h.unmap()
        self._gauges()

    def unmap_name(self, name: str) -> None:
        key = self.mapped.pop(name, None)
        if key is not None and self.unmap is not None:
            self.unmap(*key)

    def discard(self, ino: int) -> None:
        """Blocking. Remove every image of ``ino`` (the file is gone)."""
        if self._scanned:
            self._drop_others(ino, "")

    def _drop_others(self, ino: int, keep: str) -> None:
        prefix = f"{ino}-"
        for name in [n for n in list(self._files) if n.startswith(prefix) and n != keep]:
            self.forget(os.path.join(self.dir, name))

    @staticmethod
    def local_plan(length: int, chunks: "ChunkStore", chunk_size: int,
                   slices: Dict[int, list["Slice"]]) -> Optional[list[tuple[int, "Segment"]]]:
        """Non-blocking. The (chunk offset, segment) pieces of a file of ``length``
        bytes whose chunks hold ``slices``, or None if a block is not held locally."""
        plan = []
        for chunk_idx in range((length + chunk_size - 1) // chunk_size):
            base = chunk_idx * chunk_size
            for seg in overlay(slices[chunk_idx], 0, min(chunk_size, length - base)):
                if not seg.id:
                    continue
                if not all(chunks.is_local(seg.id, seg.size, b) for b in seg.blocks(chunks.block_size)):
                    metrics.inc("image_builds_not_local")
                    return None
                plan.append((base, seg))
        return plan

    def _make_room(self, need: int) -> None:
        while self._files and self._bytes + need > self.limit:
            name = next(iter(self._files))
            self.forget(os.path.join(self.dir, name))
            metrics.inc("image_evictions")

    def _gauges(self) -> None:
        metrics.set_gauge("image_bytes", self._bytes)
        metrics.set_gauge("image_files", len(self._files))
        metrics.set_gauge("image_held_bytes", self._held_bytes)
        metrics.set_gauge("image_held_files", len(self._held))

    async def build(self, attr: "Attr", chunks: "ChunkStore", chunk_size: int,
                    read_chunk: Callable[[int, int], Awaitable[list["Slice"]]]) -> bool:
        """Assemble the image of ``attr`` (its version and length) from locally
        held blocks; False (and nothing left behind) if one is not local."""
        ino, length = attr.ino, attr.length
        if ino in self.building or not self.eligible(attr):
            return False
        self.building.add(ino)
        fd = -1
        tmp = ""
        try:
            await threads.run_blocking(self.scan, limiter=threads.DISK)
            if self.lookup(attr) is not None:
                return True
            # the visible segments of every chunk, and whether all their blocks are
            # local, before any file is created (most files read once are not)
            slices = {idx: await read_chunk(ino, idx) for idx in range((length + chunk_size - 1) // chunk_size)}
            plan = self.local_plan(length, chunks, chunk_size, slices)
            if plan is None:
                return False
            bs = chunks.block_size
            self._seq += 1
            tmp = os.path.join(self.dir, f"tmp-{ino}-{os.getpid()}-{self._seq}")
            await threads.run_blocking(self._make_room, length, limiter=threads.DISK)
            fd = await threads.run_blocking(os.open, tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600,
                                            limiter=threads.DISK)
            await threads.run_blocking(os.ftruncate, fd, length, limiter=threads.DISK)
            for base, seg in plan:
                for b in seg.blocks(bs):
                    data = await chunks.cached_or_disk(seg.id, seg.size, b)
                    if data is None:  # evicted meanwhile
                        metrics.inc("image_builds_not_local")
                        return False
                    lo, hi = max(seg.off, b * bs), min(seg.off + seg.len, (b + 1) * bs)
                    piece = memoryview(data)[lo - b * bs:hi - b * bs]
                    await threads.run_blocking(_pwrite_all, fd, piece, base + seg.pos + lo - seg.off,
                                               limiter=threads.DISK)
            await threads.run_blocking(os.fdatasync, fd, limiter=threads.DISK)
            name = self.name(ino, attr.data_version, length)
            final = os.path.join(self.dir, name)
            await threads.run_blocking(os.rename, tmp, final, limiter=threads.DISK)
            tmp = ""
            st = await threads.run_blocking(os.fstat, fd, limiter=threads.DISK)
            with self._lock:
                self._files[name] = st.st_blocks * 512
                self._bytes += st.st_blocks * 512
            await threads.run_blocking(self._drop_others, ino, name, limiter=threads.DISK)
            self._gauges()
            # the file was just read to its end: the next open is likely soon
            await threads.run_blocking(self.hold, final, limiter=threads.HOLD)
            metrics.inc("image_builds")  # after the hold: a build is done when counted
            metrics.inc("image_built_bytes", length)
            return True
        except ObjectStoreError as exc:
            # a slice was replaced meanwhile (its blocks deleted by compaction or
            # another client): the next open builds from the new slices
            metrics.inc("image_builds_aborted")
            log.debug("image of inode %d not built: %s", ino, exc)
            return False
        except OSError as exc:
            metrics.inc("image_build_errors")
            if exc.errno == errno.ENOSPC:
                log.info("image of inode %d not built: cache disk full", ino)
            else:
                log.warning("image of inode %d not built: %s", ino, exc)
            return False
        finally:
            self.building.discard(ino)
            if fd >= 0 or tmp:
                with trio.CancelScope(shield=True):
                    await threads.run_blocking(_close_unlink, fd, tmp, limiter=threads.DISK)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def willneed(path: str) -> None:
    """Blocking. Start reading a file into the page cache (asynchronous readahead)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _open_paged_in(path: str):
    """Open an image for the kernel, and ask the kernel to read its missing pages
    now (asynchronous readahead, issued before the OPEN reply, so before the first
    read). The page cache of an idle image does not stay whole: reclaim (on this
    machine also DAMON's proactive pageout of pages idle for seconds) leaves holes,
    and each would cost the passthrough reader a small synchronous disk read.
    Resident pages cost little: under 1 ms for a whole 1 GiB image."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd, os.fstat(fd)
    except OSError:
        os.close(fd)
        raise


def _close_unlink(fd: int, path: str) -> None:
    if fd >= 0:
        os.close(fd)
    if path:
        _unlink(path)


@dataclass
class Mode:
    """An inode this daemon put in passthrough mode."""
    bid: int          # backing id in the kernel
    fd: int           # the image, open read-write (for mirrored writes)
    path: str
    version: int      # data_version the image holds (until dirty)
    handles: int = 0
    dirty: bool = False  # changed through this mount while in the mode
    mirrors: int = 0  # mirrored writes and truncates so far (``refresh`` checks it)
    refreshing: bool = False


#: bytes read and written per step of ``Passthrough.refresh``
REFRESH_PIECE = 4 << 20
#: larger files are not refreshed inside an OPEN (their mmap may show the older image)
REFRESH_MAX = 256 << 20


class Passthrough:
    def __init__(self, kernel: Optional[KernelBacking], images: Images):
        self.kernel = kernel
        self.images = images
        self.modes: Dict[int, Mode] = {}
        #: set by the VFS when the BPF probe is loaded: map(image dev, image ino, mount ino)
        self.map: Optional[Callable[[int, int, int], None]] = None
        self.nursery: Optional[trio.Nursery] = None  # set by the VFS: holds run after the reply

    @property
    def available(self) -> bool:
        return self.kernel is not None and self.kernel.available and self.images.max_file > 0

    @property
    def reason(self) -> str:
        if self.images.max_file <= 0:
            return "disabled (--passthrough-max 0)"
        if self.kernel is None:
            return "no kernel passthrough"
        return self.kernel.reason

    async def prepare(self, attr: "Attr", flags: int, open_here: int) -> None:
        """Before an open of ``attr.ino`` (``open_here`` handles already open):
        enter passthrough mode when this read-only open can use a current image."""
        ino = attr.ino
        if ino in self.modes or not self.available or flags & WRITE_FLAGS:
            return
        if open_here:
            metrics.inc("passthrough_skipped_open_cached")  # the kernel allows one io mode
            return
        path = self.images.lookup(attr)
        if path is None:
            metrics.inc("passthrough_skipped_no_image")
            return
        try:
            fd, st = await threads.run_blocking(_open_paged_in, path, limiter=threads.DISK)
        except OSError:  # evicted meanwhile
            return
        metrics.inc("passthrough_page_ins")
        name = os.path.basename(path)
        if self.map is not None and name not in self.images.mapped:
            try:
                self.map(st.st_dev, st.st_ino, ino)
                self.images.mapped[name] = (st.st_dev, st.st_ino)
            except Exception as exc:  # counters only
                log.debug("BPF backing map: %s", exc)
        try:
            bid = await self.kernel.open(fd)  # type: ignore[union-attr]
        except OSError as exc:
            await threads.run_blocking(os.close, fd, limiter=threads.DISK)
            metrics.inc("passthrough_errors")
            log.warning("inode %d: backing file refused: %s", ino, exc)
            return
        if ino in self.modes:  # another open raced us to it
            await self._retire(Mode(bid, fd, path, attr.data_version))
            return
        self.modes[ino] = Mode(bid, fd, path, attr.data_version)
        if self.nursery is not None and self.images.hold_limit > 0:
            self.nursery.start_soon(self._hold, path, name=f"hold {ino}")

    async def refresh(self, attr: "Attr", read: Callable[[int, int], Awaitable[bytes]]) -> bool:
        """Before an open of a file in passthrough mode whose image is of an older
        version (another client changed it): the new open must be passthrough too
        (the kernel allows one io mode), and its mmap maps the image, so rewrite the
        image in place with the current bytes (``read(off, size)``).  Other handles
        of the mode see them too, as they would see a local write's mirror."""
        m = self.modes.get(attr.ino)
        if m is None or m.version == attr.data_version or m.refreshing:
            return False
        if attr.length > REFRESH_MAX:  # not inside an OPEN: reads stay current (direct_io)
            metrics.inc("passthrough_refresh_skipped")
            return False
        await self._dirty(m)  # no longer the version its name says
        m.refreshing = True
        mirrors = m.mirrors
        fd = os.dup(m.fd)  # the mode may end meanwhile: its fd is closed then
        try:
            off = 0
            while off < attr.length:
                data = await read(off, min(REFRESH_PIECE, attr.length - off))
                if not data:
                    break
                await threads.run_blocking(_pwrite_all, fd, data, off, limiter=threads.DISK)
                off += len(data)
            await threads.run_blocking(os.ftruncate, fd, attr.length, limiter=threads.DISK)
        except Exception as exc:  # an optimisation for mmap: never fail the open for it
            log.debug("inode %d: image refresh failed: %s", attr.ino, exc)
            return False
        finally:
            os.close(fd)
            m.refreshing = False
        if m.mirrors != mirrors:
            return False  # a local write landed meanwhile: the image is of no one version
        m.version = attr.data_version
        metrics.inc("passthrough_refreshes")
        return True

    def committed(self, ino: int, version: int) -> None:
        """A write of ours committed as ``version``: an image it was mirrored into
        (the one of version - 1) holds that version now."""
        m = self.modes.get(ino)
        if m is not None and m.dirty and m.version == version - 1:
            m.version = version

    async def _hold(self, path: str) -> None:
        await threads.run_blocking(self.images.hold, path, limiter=threads.HOLD)

    def attach(self, attr: "Attr", flags: int, open_here: int) -> Optional[tuple[int, bool]]:
        """Synchronous, right before the OPEN reply: (backing id, direct_io) when
        this open must be passthrough, else None (cached mode)."""
        m = self.modes.get(attr.ino)
        if m is None:
            return None
        if m.handles == 0 and open_here:
            return None  # a cached open slipped in while prepare waited: not this time
        m.handles += 1
        direct = bool(flags & WRITE_FLAGS) or m.dirty or m.version != attr.data_version
        metrics.inc("passthrough_direct_opens" if direct else "passthrough_opens")
        return m.bid, direct

    async def detach(self, ino: int) -> bool:
        """A passthrough handle of ``ino`` was released; True if it was the
        last one and the image was changed while in the mode."""
        m = self.modes.get(ino)
        if m is None:
            return False
        m.handles -= 1
        if m.handles > 0:
            return False
        del self.modes[ino]
        await self._retire(m)
        return m.dirty

    async def drop_unused(self, ino: int) -> None:
        """Leave passthrough mode if no handle took it (an open failed late)."""
        m = self.modes.get(ino)
        if m is not None and m.handles == 0:
            del self.modes[ino]
            await self._retire(m)

    async def _retire(self, m: Mode) -> None:
        with trio.CancelScope(shield=True):
            await self.kernel.close(m.bid)  # type: ignore[union-attr]
            await threads.run_blocking(os.close, m.fd, limiter=threads.DISK)
            if m.dirty:  # unlinked at the first mirrored change: its inode is free now
                self.images.unmap_name(os.path.basename(m.path))

    async def _dirty(self, m: Mode) -> None:
        if not m.dirty:
            m.dirty = True
            await threads.run_blocking(self.images.forget, m.path, False, limiter=threads.DISK)

    async def mirror_write(self, ino: int, off: int, data: bytes) -> None:
        """A write through this mount: passthrough readers here see it at once."""
        m = self.modes.get(ino)
        if m is not None:
            m.mirrors += 1
            await self._dirty(m)
            await threads.run_blocking(_pwrite_all, m.fd, data, off, limiter=threads.DISK)
            metrics.inc("passthrough_mirrored_bytes", len(data))

    async def mirror_truncate(self, ino: int, length: int) -> None:
        m = self.modes.get(ino)
        if m is not None:
            m.mirrors += 1
            await self._dirty(m)
            await threads.run_blocking(os.ftruncate, m.fd, length, limiter=threads.DISK)

    async def close(self) -> None:
        for ino in list(self.modes):
            await self._retire(self.modes.pop(ino))
        await threads.run_blocking(self.images.release_all, limiter=threads.HOLD)
