"""VFS: file-system operations in FS terms (inodes, names as bytes, ``FsError``).

The layer between the FUSE adapter and the metadata engine / chunk store.  It
owns the open-file table, the writers (write path), the reader (read path),
the per-open-file caches (attributes and chunk slice lists, refreshed at
every ``open`` for close-to-open consistency), the background deleter and the
session heartbeat.  It never imports pyfuse3: kernel-cache calls go through
an injected ``KernelNotifier`` (``None`` in tests that drive the VFS directly).

Every engine call runs in a worker thread (``threads.run_blocking`` with the
``META`` limiter); every data call goes through the async ``ChunkStore``.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from typing import TYPE_CHECKING, Any, Dict, Optional, Protocol

import trio

from .. import ROOT_INODE, metrics, threads
from ..chunk.layout import overlay
from ..errors import FsError, NoSuchKey
from ..types import Attr, DirEntry, Format, SetAttr, Slice, StatFs
from .compactor import Compactor
from .handles import Handles
from .internal import CONTROL_INO, NAMES as INTERNAL_NAMES, InternalFiles, is_internal
from .passthrough import Images, KernelBacking, Passthrough, default_hold_limit, willneed
from .pusher import Pusher
from .reader import Reader
from .writer import Writers

if TYPE_CHECKING:
    from ..chunk.store import ChunkStore
    from ..meta.engine import Engine

log = logging.getLogger(__name__)

STALE = -1  # kernel_versions: the kernel may hold pages of an older data version
#: the writes of a file kept open are committed within this many seconds (writer.py)
FLUSH_INTERVAL_S = 10.0
#: ``info`` lists at most this many block objects one by one (it counts them all)
INFO_MAX_OBJECTS = 100_000


class KernelNotifier(Protocol):
    """What the VFS may ask of the kernel (implemented in fuse/notifier.py)."""

    async def invalidate_inode(self, ino: int, attr_only: bool = False) -> None: ...

    async def invalidate_entry(self, parent: int, name: bytes) -> None: ...

    async def store(self, ino: int, off: int, data: bytes, length: int) -> bool: ...


class VFS:
    def __init__(self, engine: "Engine", chunks: "ChunkStore", fmt: Format, *,
                 notifier: Optional[KernelNotifier] = None, options: Optional[Dict[str, Any]] = None,
                 backing: Optional[KernelBacking] = None):
        self.engine = engine
        self.chunks = chunks
        self.fmt = fmt
        self.notifier = notifier
        self.options = dict(options or {})
        self.handles = Handles()
        self.failsafe = False
        #: --read-only: every change is EROFS, and this client neither compacts nor
        #: deletes objects (the writing clients do); reads, warmup and stats work
        self.read_only = bool(self.options.get("read_only"))
        self.open_attrs: Dict[int, Attr] = {}
        self._slices: Dict[tuple[int, int], list[Slice]] = {}
        #: per open inode: a stamp (never reused) that each _drop_slices renews
        self._slice_gen: Dict[int, int] = {}
        self._stamps = itertools.count(1)
        #: data_version of each inode as the kernel's page cache last saw it; an
        #: inode never opened here has no pages in this mount's kernel cache (absent),
        #: STALE marks one whose pages another client's change made stale
        self.kernel_versions: Dict[int, int] = {}
        #: data_version of a file's attributes as last handed to the kernel (``told_kernel``)
        self.kernel_attrs: Dict[int, int] = {}
        self.writers = Writers(chunks, self._meta_call, self._new_slice_id, fmt.block_size,
                               fmt.chunk_size, on_commit=self._on_commit,
                               delete_later=self._delete_later,
                               on_slices=lambda ino, idxs: self.compactor.committed(ino, idxs))
        self.writers.flush_interval = float(self.options.get("flush_interval", FLUSH_INTERVAL_S))
        self.compactor = Compactor(self, 0 if self.read_only else int(self.options.get("compact_threshold", 64)))
        self.reader = Reader(chunks, fmt.chunk_size, fmt.block_size, self._get_slices,
                             readahead=int(self.options.get("readahead", 4 * fmt.block_size)))
        self.internal = InternalFiles(self._config, self._inode_stats)
        self.pusher = Pusher(notifier, chunks, fmt.chunk_size, fmt.block_size, self._get_slices,
                             budget=int(self.options.get("kernel_cache_budget", 1 << 30)),
                             push_whole_max=int(self.options.get("push_whole_max", 128 << 20)),
                             resident_bytes=self.options.get("resident_bytes"))
        image_cache = int(self.options.get("image_cache_size", 10 << 30))
        hold = self.options.get("image_hold")
        self.images = Images(chunks.cache.root, image_cache, int(self.options.get("passthrough_max", 4 << 30)),
                             default_hold_limit(image_cache) if hold is None else int(hold))
        self.passthrough = Passthrough(backing, self.images)
        self.pusher.blocked = lambda ino: (self.handles.is_writable(ino) or self.writers.get(ino) is not None
                                           or ino in self.passthrough.modes)
        #: per-inode READ requests that reached the daemon, and the last name seen
        self.inode_reads: Dict[int, int] = {}
        self.names: Dict[int, bytes] = {}
        self.kernel_probe = None  # set by the daemon when the BPF probes loaded
        self._observe_until = 0.0  # trio clock: the observers' lease (observe())
        self._observe_lock = trio.Lock()  # one attach/detach at a time
        #: changes made here, published to other clients by ``_publisher``
        self._changes: list = []
        self._changes_kick = trio.Event()
        #: inodes known to have no security.capability xattr: the kernel asks for
        #: it before every write (to drop file capabilities), so answer from memory
        self._no_caps: set[int] = set()
        self._delete_kick = trio.Event()
        self._local_deletes: list[tuple[int, int]] = []
        self._nursery: Optional[trio.Nursery] = None

    # ------------------------------------------------------------ plumbing
    async def _meta(self, fn, *args):
        return await threads.run_blocking(fn, *args, limiter=threads.META)

    async def _meta_call(self, name: str, *args):
        return await self._meta(getattr(self.engine, name), *args)

    async def _new_slice_id(self) -> int:
        return await self._meta(self.engine.next_slice_id)

    def _config(self) -> Dict[str, Any]:
        fmt = self.fmt.to_dict()
        fmt.pop("secret_key", None)
        fmt.pop("access_key", None)
        probe = self.kernel_probe
        opts = {k: v for k, v in self.options.items() if not callable(v)}
        return {"format": fmt, "options": opts, "pid": os.getpid(), "sid": self.engine.sid,
                "kernel_bpf": {"available": bool(probe and probe.available),
                               "reason": (probe.reason if probe else self.options.get("bpf_reason", "not loaded"))},
                "kernel_push": {"enabled": self.pusher.enabled,
                                "reason": getattr(self.notifier, "store_disabled_reason", "") if self.notifier else "no kernel notifier"},
                "kernel_passthrough": {"enabled": self.passthrough.available,
                                       "reason": "" if self.passthrough.available else self.passthrough.reason}}

    def is_internal_request(self, op: str, args: tuple) -> bool:
        """Whether a FUSE request concerns a virtual file (.stats, .config, .control)."""
        if not args:
            return False
        first = args[0]
        if op == "lookup":
            return first == ROOT_INODE and len(args) > 1 and args[1] in INTERNAL_NAMES
        if op in ("read", "write", "flush", "release", "fsync"):
            h = self.handles.by_fh.get(first)
            return h is not None and h.content is not None
        if op in ("getattr", "open", "setattr", "getxattr", "listxattr", "access"):
            return isinstance(first, int) and is_internal(first)
        return False

    def _remember(self, parent: int, name: bytes, ino: int) -> None:
        if len(self.names) > 100_000:
            self.names.clear()
        self.names[ino] = name

    async def _inode_stats(self) -> Dict[int, Dict[str, float]]:
        """Per-inode numbers for `stats --top`: daemon reads, BPF kernel counters (read
        in a worker thread: the per-inode map holds up to 65,536 entries)."""
        out: Dict[int, Dict[str, float]] = {}
        for ino, n in self.inode_reads.items():
            out.setdefault(ino, {})["daemon_reads"] = n
        probe = self.kernel_probe
        if probe is not None and probe.available:
            try:
                per = await threads.run_blocking(probe.per_inode, limiter=threads.STATS)
            except Exception as exc:
                log.debug("per-inode BPF read failed: %s", exc)
                per = {}
            for ino, d in per.items():
                out.setdefault(ino, {}).update({f"kernel_{k}": v for k, v in d.items()})
        out["names"] = {ino: self.names[ino] for ino in out if ino in self.names}  # type: ignore[index]
        return out

    async def info(self, ino: int) -> dict:
        """Where the bytes of ``ino`` are (``curvefs info``): its chunks and slices, its
        block objects and which are in the local block cache, its pages in the kernel's
        page cache (BPF), its passthrough image and unflushed writes."""
        if is_internal(ino) or not 0 < ino < 1 << 63:
            raise FsError(errno.EINVAL, "not a file of the volume")
        attr = await self._meta(self.engine.getattr, ino)
        out: dict = {"inode": ino, "mode": attr.mode, "nlink": attr.nlink, "length": attr.length,
                     "data_version": attr.data_version, "mtime_ns": attr.mtime_ns}
        if not attr.is_file:
            return out
        cs, bs, cache = self.fmt.chunk_size, self.fmt.block_size, self.chunks.cache
        chunks, objects = [], {}
        counts = {"total": 0, "memory": 0, "disk": 0}
        holes = 0  # chunks without a slice (a sparse file's): counted, not listed
        for idx in range((attr.length + cs - 1) // cs):
            rows = await self._meta(self.engine.read_chunk, ino, idx)
            if not rows:
                holes += 1
                continue
            keys = []
            for seg in overlay(rows, 0, min(cs, attr.length - idx * cs)):
                for b in seg.blocks(bs) if seg.id else ():
                    key = self.chunks.key(seg.id, seg.size, b)
                    if key in objects:
                        continue
                    where = {"memory": cache.in_mem(key), "disk": self.chunks.local_store or cache.has_disk(key)}
                    counts["total"] += 1
                    counts["memory"] += where["memory"]
                    counts["disk"] += where["disk"]
                    if len(objects) < INFO_MAX_OBJECTS:  # (a block shown twice is counted twice past it)
                        objects[key] = where
                        keys.append(key)
            chunks.append({"index": idx, "slices": [[s.pos, s.id, s.size, s.off, s.len] for s in rows],
                           "objects": keys})
        out["chunks"] = chunks
        out["empty_chunks"] = holes
        out["objects"] = objects  # the first INFO_MAX_OBJECTS
        out["object_counts"] = counts
        out["local_store"] = self.chunks.local_store
        probe = self.kernel_probe
        version = self.kernel_versions.get(ino)
        resident = None
        if probe is not None and probe.available:  # its lock may be held by an attach: off the loop
            resident = await threads.run_blocking(probe.resident_pages, ino, limiter=threads.DISK)
        out["kernel"] = {
            "pages": (attr.length + 4095) // 4096, "resident_pages": resident,
            "pages_of": ("current" if version == attr.data_version else
                         "stale" if version is not None else "never opened here")}
        image = self.images.lookup(attr, touch=False) if self.images.eligible(attr) else None
        out["image"] = None if image is None else {"path": image, "held": self.images.is_held(image),
                                                   "passthrough_open": ino in self.passthrough.modes}
        out["unflushed"] = self.writers.dirty_length(ino) is not None
        return out

    def _check_writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS, "mounted read-only")
        if self.failsafe:
            raise FsError(errno.EROFS, "file system is in failsafe mode (run fsck)")

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the background workers (deleter, heartbeat) in ``nursery``."""
        self._nursery = nursery
        self.writers.nursery = nursery
        self.pusher.nursery = nursery
        self.passthrough.nursery = nursery
        if not self.read_only:
            nursery.start_soon(self._deleter, name="deleter")
        nursery.start_soon(self._heartbeat, name="heartbeat")
        nursery.start_soon(self._follow_changes, name="change-feed")
        nursery.start_soon(self._publisher, name="change-publisher")
        nursery.start_soon(self._committer, name="idle-commits")

    async def _committer(self) -> None:
        """Commit the writes of files kept open within ``flush_interval`` seconds."""
        interval = self.writers.flush_interval
        while True:
            await trio.sleep(max(interval / 4, 0.1))
            try:
                await self.writers.commit_idle()
            except Exception as exc:  # never end the mount over a background commit
                log.exception("background commit failed: %s", exc)

    async def observe(self, seconds: float) -> bool:
        """Keep the kernel observers (per-read, per-stat BPF counters) attached for
        ``seconds`` more: ``curvefs stats`` asks on every refresh. False without BPF."""
        probe = self.kernel_probe
        if probe is None or not probe.available:
            return False
        self._observe_until = max(self._observe_until, trio.current_time() + min(max(seconds, 0), 3600))
        async with self._observe_lock:  # after a detach in flight, not during it
            if not probe.observing:
                await threads.run_blocking(probe.observe, True, limiter=threads.DISK)
        return True

    async def follow_observers(self) -> None:
        """With ``--kernel-observe on-demand``, detach the observers whenever nobody
        asked for them within their lease (checked every second); runs until unmount."""
        probe = self.kernel_probe
        if probe is None or self.options.get("kernel_observe", "on-demand") == "always":
            return
        while True:
            async with self._observe_lock:
                if probe.observing and trio.current_time() >= self._observe_until:
                    await threads.run_blocking(probe.observe, False, limiter=threads.DISK)
            await trio.sleep(1.0)

    async def close(self) -> None:
        """Flush every writer and run the deleter once (unmount path). A metadata
        or object-store outage here is logged, not raised: writers that could not
        flush say so (flush_all), and deletions stay queued for the next mount."""
        await self.writers.flush_all()
        await self._publish_now()  # the notes of the last commits: the publisher stops now
        try:
            if not self.read_only:
                await self._delete_pending()
        except FsError as exc:
            log.warning("deleting unused objects at unmount failed (left for later): %s", exc)
        await self.passthrough.close()

    def _changed(self, ino: int = 0, parent: int = 0, name: bytes = b"", version: int = -1) -> None:
        """Note a committed change for other clients' kernel caches (``version``:
        the inode's data_version after it, if known)."""
        from ..meta.engine import Change

        self._changes.append(Change(0, 0, ino, parent, name, version))
        self._changes_kick.set()

    async def _publisher(self) -> None:
        """Publish our changes in batches (about every 50 ms while busy)."""
        while True:
            await self._changes_kick.wait()
            self._changes_kick = trio.Event()
            await trio.sleep(0.05)
            await self._publish_now()

    async def _publish_now(self) -> None:
        batch, self._changes = list(dict.fromkeys(self._changes)), []
        if not batch:
            return
        try:
            await self._meta(self.engine.publish, batch)
        except Exception as exc:  # others fall back to their attr/entry timeouts
            log.warning("publishing %d changes failed: %s", len(batch), exc)

    def _on_commit(self, attr: Attr, bumped: bool = True) -> None:
        """A data change of ours committed; ``bumped``: it certainly added one to
        data_version (a write does; a truncate to the length the file already had
        does not, and then ``attr`` may carry another client's version).  What a
        rewrite does, and the bytes changed: the pusher forgets what it pushed."""
        ino = attr.ino
        self._on_rewrite(attr)
        self.pusher.changed(ino)
        # our own writes went through the page cache: the kernel's copy is current
        if bumped and self.kernel_versions.get(ino) == attr.data_version - 1:
            self.kernel_versions[ino] = attr.data_version
        if bumped and self.kernel_attrs.get(ino) == attr.data_version - 1:
            self.kernel_attrs[ino] = attr.data_version  # its size: the kernel's own writes
        if bumped:  # and the image it was mirrored into
            self.passthrough.committed(ino, attr.data_version)

    def _on_rewrite(self, attr: Attr) -> None:
        """Our compaction committed: the same bytes under new slices, data_version
        unmoved.  The kernel's pages, the image and what the pusher knows stay
        valid; only slice lists are stale (other clients' too: the note)."""
        self._changed(attr.ino, version=attr.data_version)
        self._drop_slices(attr.ino)
        if attr.ino in self.open_attrs:
            self.open_attrs[attr.ino] = attr
        self._delete_kick.set()  # the hidden slices are queued for deletion

    def _drop_slices(self, ino: int) -> None:
        """Forget the cached slice lists of ``ino`` (its chunks changed or may have);
        a fetch already running is not cached when it returns (_get_slices)."""
        if ino in self.open_attrs:
            self._slice_gen[ino] = next(self._stamps)
        else:  # nothing is cached for a file not open (and open() stamps first)
            self._slice_gen.pop(ino, None)
        for key in [k for k in self._slices if k[0] == ino]:
            del self._slices[key]

    def _delete_later(self, slice_id: int, size: int) -> None:
        self._local_deletes.append((slice_id, size))
        self._delete_kick.set()

    async def _get_slices(self, ino: int, chunk_idx: int) -> list[Slice]:
        key = (ino, chunk_idx)
        s = self._slices.get(key)
        if s is None:
            gen = self._slice_gen.get(ino, 0)
            s = await self._meta(self.engine.read_chunk, ino, chunk_idx)
            self.compactor.seen(ino, chunk_idx, len(s))
            # cache only for open files (dropped at open/commit), and not a list
            # fetched before a drop: it may be of the version before the drop
            if ino in self.open_attrs and self._slice_gen.get(ino, 0) == gen:
                self._slices[key] = s
        return s

    def told_kernel(self, attr: Attr) -> None:
        """The FUSE layer handed ``attr`` to the kernel (an entry, attr or
        readdirplus reply): the kernel's cached size is of this data_version."""
        if attr.is_file:
            if len(self.kernel_attrs) > 100_000:
                self.kernel_attrs.clear()  # then unknown: the next open expires them
            self.kernel_attrs[attr.ino] = attr.data_version

    async def _kernel_attrs_current(self, attr: Attr) -> bool:
        """Close-to-open for attributes: an open does not refresh the kernel's cached
        size, so after another client's change (before its change note arrives, or
        within --attr-timeout) reads stopped at the old size, read zeros past the new
        one, and O_APPEND wrote at the old end.  When the file's data_version is not
        the one of the attributes the kernel was given (our own commits move that
        on: the kernel sized the file itself as it wrote), expire the kernel's
        (attributes only: no page locks, safe inside the OPEN handler); reads and
        lseek(SEEK_END) then fetch them.  False if they were stale."""
        if self.kernel_attrs.get(attr.ino) == attr.data_version or self.notifier is None:
            return True
        await self.notifier.invalidate_inode(attr.ino, attr_only=True)
        self.kernel_attrs.pop(attr.ino, None)
        metrics.inc("vfs_open_stale_attrs")
        return False

    def _with_dirty(self, attr: Attr) -> Attr:
        d = self.writers.dirty_length(attr.ino)
        if d is not None:
            length, mtime = d
            attr = attr.copy(length=max(attr.length, length), mtime_ns=max(attr.mtime_ns, mtime))
        return attr

    # ------------------------------------------------------- background
    async def _deleter(self) -> None:
        while True:
            with trio.move_on_after(1.0):
                await self._delete_kick.wait()
            self._delete_kick = trio.Event()
            try:
                await self._delete_pending()
            except Exception as exc:  # keep going; objects stay queued
                log.warning("background delete failed: %s", exc)
                metrics.inc("vfs_delete_errors")
                await trio.sleep(5)

    async def _delete_pending(self) -> None:
        while self._local_deletes:
            sid, size = self._local_deletes.pop()
            await self.chunks.delete_slice(sid, size)
        while True:
            batch = await self._meta(self.engine.pending_deletes, 200)
            if not batch:
                return
            async with trio.open_nursery() as n:
                for sid, size in batch:
                    n.start_soon(self.chunks.delete_slice, sid, size)
            await self._meta(self.engine.done_deletes, [sid for sid, _ in batch])
            metrics.inc("vfs_slices_deleted", len(batch))

    async def _heartbeat(self) -> None:
        """Refresh this session; every minute, reclaim sessions of dead clients
        (no heartbeat for ``session_timeout`` s: their sustained files are freed)."""
        interval = float(self.options.get("heartbeat", 10))
        timeout = float(self.options.get("session_timeout", 300))
        last_clean = 0.0
        while True:
            await trio.sleep(interval)
            try:
                await self._meta(self.engine.heartbeat)
                if not self.read_only and trio.current_time() - last_clean > 60:  # (a write)
                    last_clean = trio.current_time()
                    dead = await self._meta(self.engine.clean_stale_sessions, timeout)
                    if dead:
                        log.info("reclaimed stale sessions %s", dead)
                        self._delete_kick.set()
            except Exception as exc:
                log.warning("session heartbeat failed: %s", exc)

    async def _follow_changes(self) -> None:
        """Invalidate this kernel's entries and inodes that other clients changed
        (DESIGN §7): with a change feed, long attr/entry timeouts are safe."""
        cursor, _ = await self._meta(self.engine.changes_since, -1)
        wait = float(self.options.get("feed_interval", 0.2))
        while True:
            try:
                await threads.run_blocking(self.engine.wait_changes, cursor, wait,
                                           limiter=threads.FEED)
                cursor, changes = await self._meta(self.engine.changes_since, cursor)
            except Exception as exc:
                log.warning("change feed failed: %s", exc)
                await trio.sleep(2)
                continue
            for ch in changes:
                await self._apply_change(ch)

    async def _apply_change(self, ch) -> None:
        metrics.inc("vfs_remote_changes")
        if ch.ino:
            self._no_caps.discard(ch.ino)
            # the kernel's pages are of the version the change left (a chmod, another
            # client's compaction; or the note of a write came after this client
            # opened the file it made): keep them and what the pusher knows; drop the
            # attributes.  The slice lists go anyway: a compaction replaced them
            # under the same version, and the old slices' objects are on their way out
            current = ch.version >= 0 and self.kernel_versions.get(ch.ino) == ch.version
            self._drop_slices(ch.ino)
            if current:
                metrics.inc("vfs_remote_changes_data_current")
            else:
                if ch.ino in self.kernel_versions:
                    self.kernel_versions[ch.ino] = STALE
                self.pusher.dropped(ch.ino)
            if ch.ino in self.open_attrs and not self.writers.get(ch.ino):
                try:
                    self.open_attrs[ch.ino] = await self._meta(self.engine.getattr, ch.ino)
                except FsError:
                    pass
            if self.notifier is not None:
                await self.notifier.invalidate_inode(ch.ino, attr_only=current)
        if ch.parent and ch.name and self.notifier is not None:
            await self.notifier.invalidate_entry(ch.parent, ch.name)

    # -------------------------------------------------------- namespace
    async def lookup(self, parent: int, name: bytes) -> Attr:
        if parent == ROOT_INODE and name in INTERNAL_NAMES:
            return await self.internal.attr(INTERNAL_NAMES[name])
        attr = await self._meta(self.engine.lookup, parent, name)
        self._remember(parent, name, attr.ino)
        return self._with_dirty(attr)

    async def getattr(self, ino: int) -> Attr:
        if is_internal(ino):
            return await self.internal.attr(ino)
        attr = await self._meta(self.engine.getattr, ino)
        return self._with_dirty(attr)

    async def setattr(self, ino: int, changes: SetAttr) -> Attr:
        if is_internal(ino):
            raise FsError(errno.EPERM)
        self._check_writable()
        if changes.length is not None:
            await self.writers.flush(ino)
        else:
            # a chmod/utimens must not be overtaken by a later commit of older writes
            if changes.mtime_ns is not None:
                await self.writers.flush(ino)
        if changes.length is not None:
            self.pusher.changed(ino)
        attr = await self._meta(self.engine.setattr, ino, changes)
        if changes.length is not None:
            self._on_commit(attr, bumped=False)
            await self.passthrough.mirror_truncate(ino, changes.length)
        else:
            self._changed(ino, version=attr.data_version)
            if ino in self.open_attrs:
                self.open_attrs[ino] = attr
        return self._with_dirty(attr)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    target: Optional[bytes] = None) -> Attr:
        self._check_writable()
        if parent == ROOT_INODE and name in INTERNAL_NAMES:
            raise FsError(errno.EEXIST)
        attr = await self._meta(self.engine.mknod, parent, name, mode, uid, gid, rdev, target)
        self._changed(parent, parent, name)
        return attr

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return await self.mknod(parent, name, stat.S_IFDIR | (mode & 0o7777), 0, uid, gid)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if not target or len(target) > 4096:
            raise FsError(errno.ENAMETOOLONG if target else errno.ENOENT)
        return await self.mknod(parent, name, stat.S_IFLNK | 0o777, 0, uid, gid, target)

    async def unlink(self, parent: int, name: bytes) -> Attr:
        self._check_writable()
        if parent == ROOT_INODE and name in INTERNAL_NAMES:
            raise FsError(errno.EPERM)
        attr = await self._meta(self.engine.unlink, parent, name, self.handles.is_open)
        self._changed(parent, parent, name)
        self._changed(attr.ino)
        if attr.nlink == 0 and attr.is_file:
            await threads.run_blocking(self.images.discard, attr.ino, limiter=threads.DISK)
        self._delete_kick.set()
        return attr

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._check_writable()
        ino = await self._meta(self.engine.rmdir, parent, name)
        self._changed(parent, parent, name)
        self._changed(ino)

    async def rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
                     flags: int = 0) -> None:
        self._check_writable()
        for p, n in ((parent, name), (newparent, newname)):
            if p == ROOT_INODE and n in INTERNAL_NAMES:
                raise FsError(errno.EPERM)
        moved, replaced = await self._meta(self.engine.rename, parent, name, newparent, newname,
                                           flags, self.handles.is_open)
        self._changed(parent, parent, name)
        self._changed(newparent, newparent, newname)
        self._changed(moved)
        if replaced is not None:
            self._changed(replaced.ino)
        self._delete_kick.set()

    async def link(self, ino: int, newparent: int, newname: bytes) -> Attr:
        self._check_writable()
        if is_internal(ino):
            raise FsError(errno.EPERM)
        attr = await self._meta(self.engine.link, ino, newparent, newname)
        self._changed(ino, newparent, newname)
        self._changed(newparent)
        return self._with_dirty(attr)

    async def readlink(self, ino: int) -> bytes:
        return await self._meta(self.engine.readlink, ino)

    # ------------------------------------------------------------- files
    async def open(self, ino: int, flags: int) -> tuple[int, bool, bool, int]:
        """Open a file: returns (fh, keep_cache, direct_io, backing id or 0).
        A backing id means FOPEN_PASSTHROUGH (see passthrough.py)."""
        if is_internal(ino):
            if flags & (os.O_WRONLY | os.O_RDWR) and ino != CONTROL_INO:
                raise FsError(errno.EACCES)
            h = self.handles.new(ino, flags, is_file=False)
            h.content = await self.internal.render(ino)
            return h.fh, False, True, 0
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._check_writable()
        attr = await self._meta(self.engine.getattr, ino)
        if attr.is_dir:
            raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC:  # also of an empty file: its mtime and ctime move (POSIX)
            await self.writers.flush(ino)
            was = attr.data_version
            attr = await self._meta(self.engine.setattr, ino, SetAttr(length=0))
            self._on_commit(attr, bumped=False)
            if self.kernel_attrs.get(ino) == was:  # the kernel sets its size to 0 itself
                self.kernel_attrs[ino] = attr.data_version
            await self.passthrough.mirror_truncate(ino, 0)
        # the kernel's append offset is its cached size, which no write refreshes:
        # an O_APPEND open that finds it stale appends where the daemon says
        append_at_eof = not await self._kernel_attrs_current(attr) and bool(
            flags & os.O_APPEND and flags & (os.O_WRONLY | os.O_RDWR))
        if ino in self.passthrough.modes and not self.writers.get(ino):
            self._drop_slices(ino)
            await self.passthrough.refresh(attr, lambda o, n: self.reader.read(ino, o, n, attr.length))
        await self.passthrough.prepare(attr, flags, self.handles.open_count.get(ino, 0))
        # no await from here to the reply: the kernel must see the mode decided here
        pt = self.passthrough.attach(attr, flags, self.handles.open_count.get(ino, 0))
        h = self.handles.new(ino, flags)
        h.append_at_eof = append_at_eof
        # close-to-open: drop cached slice lists, keep the kernel's pages only
        # while the data version is the one the kernel last saw
        if not self.writers.get(ino):
            self.open_attrs[ino] = attr
        else:
            self.open_attrs.setdefault(ino, attr)
        self._drop_slices(ino)  # after open_attrs: a fetch running now is not cached
        if pt is not None:
            h.backing = pt[0]
            return h.fh, False, pt[1] or append_at_eof, pt[0]
        # keep the pages when the kernel's copy is current, or when it has none
        # (never opened through this mount): replying keep_cache=False would make
        # the kernel drop pages the pusher may already be storing for this open
        keep = self.kernel_versions.get(ino, attr.data_version) == attr.data_version
        self.kernel_versions[ino] = attr.data_version
        if not flags & (os.O_WRONLY | os.O_RDWR):
            self.pusher.on_open(ino, attr.length, keep)
        elif not keep:
            self.pusher.dropped(ino)
        return h.fh, keep, append_at_eof, 0

    def _maybe_build_image(self, attr: Attr) -> None:
        """When a file's last handle closes: if its reads fetched every chunk's
        slice list and all those blocks are local (a hint, no metadata call),
        assemble its image for the next open."""
        ino, cs = attr.ino, self.fmt.chunk_size
        if not (self.passthrough.available and self._nursery is not None and self.images.eligible(attr)
                and ino not in self.images.building and self.images.lookup(attr) is None
                and not self.writers.get(ino)):
            return
        slices = {idx: self._slices.get((ino, idx)) for idx in range((attr.length + cs - 1) // cs)}
        if any(s is None for s in slices.values()):
            return  # not read to the end through this open
        if self.images.local_plan(attr.length, self.chunks, cs, slices) is None:  # type: ignore[arg-type]
            return
        self._nursery.start_soon(self._build_image, None, ino, name=f"image {ino}")

    async def _build_image(self, attr: Optional[Attr], ino: int = 0) -> bool:
        """Build from fresh metadata: the attributes first, then the slice lists,
        so the image's name (data_version) is never newer than its bytes."""
        try:
            if attr is None:
                attr = await self._meta(self.engine.getattr, ino)
                if not self.images.eligible(attr) or self.writers.get(ino):
                    return False
            return await self.images.build(attr, self.chunks, self.fmt.chunk_size,
                                           lambda i, idx: self._meta(self.engine.read_chunk, i, idx))
        except FsError as exc:  # removed or changed meanwhile: nothing to build
            log.debug("image of inode %d: %s", attr.ino if attr else ino, exc)
            return False
        except Exception as exc:  # an image is an optimisation: never fail a request for it
            log.warning("image of inode %d: %s", attr.ino if attr else ino, exc)
            return False

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, Attr]:
        attr = await self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, uid, gid)
        self._note_no_caps(attr.ino)  # a new file has no xattrs: its writes need not ask
        h = self.handles.new(attr.ino, flags)
        self._remember(parent, name, attr.ino)
        self.open_attrs[attr.ino] = attr
        self.kernel_versions[attr.ino] = attr.data_version
        return h.fh, attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        if h.content is not None:
            if h.ino == CONTROL_INO:
                return self.internal.control_status(h, off, size)
            return h.content[off:off + size]
        ino = h.ino
        self.inode_reads[ino] = self.inode_reads.get(ino, 0) + 1
        if self.writers.dirty_length(ino) is not None:
            await self.writers.flush(ino)
        attr = self.open_attrs.get(ino)
        if attr is None:
            attr = self.open_attrs[ino] = await self._meta(self.engine.getattr, ino)
        for attempt in range(STALE_READ_ATTEMPTS):
            try:
                data = await self.reader.read(ino, off, size, attr.length)
                break
            except NoSuchKey as exc:
                # Most likely our slice list is stale: another client (or our
                # compactor) committed newer slices and the hidden ones' objects are
                # gone (deleted within a second).  Read again with fresh metadata; a
                # busy file can be rewritten again meanwhile, so only a miss on
                # every fresh list is damage.
                if attempt == STALE_READ_ATTEMPTS - 1:
                    self.failsafe = True
                    log.error("inode %d: object missing (%s): failsafe mode, mutations get EROFS", ino, exc)
                    raise FsError(errno.EIO, str(exc)) from None
                metrics.inc("vfs_stale_slice_retries")
                if attempt:
                    await trio.sleep(0.05 * attempt)
                self._drop_slices(ino)
                attr = self.open_attrs[ino] = await self._meta(self.engine.getattr, ino)
        metrics.inc("vfs_read_bytes", len(data))
        end = off + len(data)
        if off == h.last_end or off == 0:
            h.seq_reads += 1
        else:
            h.seq_reads = 0
        sequential = h.seq_reads >= 2
        h.last_end = end
        if self.pusher.enabled:
            self.pusher.on_read(ino, off, len(data), attr.length, sequential)
        if sequential and self._nursery is not None and end < attr.length:
            self._nursery.start_soon(self._readahead, ino, end, attr.length)
        return data

    async def _readahead(self, ino: int, off: int, length: int) -> None:
        try:
            await self.reader.readahead_from(ino, off, length)
        except Exception as exc:
            log.debug("readahead of inode %d failed: %s", ino, exc)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles.get(fh)
        if h.content is not None:
            if h.ino == CONTROL_INO:
                return await self.internal.control_request(h, data, self)
            raise FsError(errno.EBADF)
        self._check_writable()
        self.pusher.changed(h.ino)
        if h.append_at_eof:  # direct_io: the kernel cached nothing at its offset
            attr = self.open_attrs.get(h.ino) or await self._meta(self.engine.getattr, h.ino)
            off = self._with_dirty(attr).length
        n = await self.writers.write(h.ino, off, data)
        await self.passthrough.mirror_write(h.ino, off, data[:n])
        metrics.inc("vfs_write_bytes", n)
        return n

    async def flush(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h.content is None:
            await self._flush_handle(h)

    async def _flush_handle(self, h, report: bool = True) -> None:
        """FLUSH/RELEASE: commit the file's writes.  A handle open for writing
        gets any failure (also one kept from a commit nobody waited for); a read-only
        handle's close does not fail for another's writes: they stay buffered for a
        retry, or, if dropped, the writer's next flush reports it."""
        if _writable(h) and report:
            await self.writers.flush(h.ino, report=True)
            return
        try:
            await self.writers.flush(h.ino)
        except FsError as exc:
            log.debug("flush at a reader's close of inode %d failed: %s", h.ino, exc)

    async def fsync(self, fh: int, datasync: bool = False) -> None:
        h = self.handles.get(fh)
        if h.content is None:  # durability asked for: a failure is the caller's to know
            await self.writers.flush(h.ino, report=_writable(h))

    async def release(self, fh: int) -> None:
        h = self.handles.by_fh.get(fh)
        if h is None:
            return
        if h.content is not None:
            self.handles.release(fh, is_file=False)
            self.internal.forget(fh)
            return
        try:  # the kernel ignores RELEASE's reply: the FLUSH before it reported
            await self._flush_handle(h, report=False)
        finally:  # a failed flush (its writes are retried) still ends the handle
            _, last = self.handles.release(fh)
            if h.backing and await self.passthrough.detach(h.ino):
                self.kernel_versions[h.ino] = STALE  # written while the page cache was bypassed
            if last:
                await self._last_release(h)

    async def _last_release(self, h) -> None:
        """The last handle of ``h.ino`` is gone: drop what was kept for open files,
        and free the inode if it was unlinked while open."""
        await self.passthrough.drop_unused(h.ino)
        attr = self.open_attrs.pop(h.ino, None)
        if attr is not None and not h.backing and not _writable(h):
            self._maybe_build_image(attr)
        self._drop_slices(h.ino)
        self.writers.forget_error(h.ino)
        await self._meta(self.engine.release_sustained, h.ino)
        self._delete_kick.set()

    async def warmup(self, inos: list[int], kernel: bool, progress) -> None:
        """Fetch the files' blocks into the block cache and (``kernel``) push
        them into the page cache.  ``progress(files, bytes)`` is called as it goes."""
        for ino in inos:
            try:
                attr = await self._meta(self.engine.getattr, ino)
            except FsError:
                progress(1, 0, error=f"inode {ino}: not found")
                continue
            if not attr.is_file:
                progress(1, 0)
                continue
            count = lambda n: progress(0, n)  # noqa: E731
            if (kernel and self.passthrough.available and self.images.eligible(attr)
                    and not self.handles.is_open(ino)):
                # fetch, then assemble the image: the next open is served by the kernel
                await self.pusher.warmup(ino, attr.length, False, count)
                count = lambda n: None  # noqa: E731  (bytes counted once)
                if await self._build_image(attr):
                    path = self.images.lookup(attr)
                    if path:
                        await threads.run_blocking(willneed, path, limiter=threads.DISK)
                    progress(1, 0)
                    continue
            push = kernel and self.pusher.enabled and not self.pusher.blocked(ino)
            seen = self.kernel_versions.get(ino)
            if seen != attr.data_version:
                # the kernel may hold an older version: let the next open drop it, and
                # push nothing from slice lists cached for it (a file open here)
                self.kernel_versions[ino] = STALE
                self._drop_slices(ino)
                self.pusher.dropped(ino)
                if push and seen is not None and self.notifier is not None:
                    await self.notifier.invalidate_inode(ino)  # its pages, before new ones
            await self.pusher.warmup(ino, attr.length, push, count)
            if push:  # every page in the kernel now is of this version
                self.kernel_versions[ino] = attr.data_version
            progress(1, 0)

    # ------------------------------------------------------- directories
    async def opendir(self, ino: int) -> int:
        attr = await self._meta(self.engine.getattr, ino)
        if not attr.is_dir:
            raise FsError(errno.ENOTDIR)
        return self.handles.new(ino, is_file=False).fh

    async def readdir(self, fh: int, start: int) -> list[tuple[int, DirEntry]]:
        """Entries from position ``start`` as (next position, entry).  The
        listing is a snapshot taken at the first call (and at a rewind to 0),
        so it is stable while the directory changes."""
        h = self.handles.get(fh)
        if h.entries is None or start == 0:
            attr = await self._meta(self.engine.getattr, h.ino)
            parent = await self._meta(self.engine.lookup, h.ino, b"..")
            entries = await self._meta(self.engine.readdir, h.ino)
            h.entries = [DirEntry(b".", attr.ino, attr), DirEntry(b"..", parent.ino, parent)]
            h.entries += [DirEntry(e.name, e.ino, self._with_dirty(e.attr)) for e in entries]
        return [(i + 1, h.entries[i]) for i in range(start, len(h.entries))]

    async def releasedir(self, fh: int) -> None:
        self.handles.by_fh.pop(fh, None)

    # -------------------------------------------------------------- misc
    async def statfs(self) -> StatFs:
        return await self._meta(self.engine.statfs)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if is_internal(ino):
            raise FsError(errno.ENODATA)
        caps = name == b"security.capability"
        if caps and ino in self._no_caps:
            metrics.inc("vfs_xattr_caps_cached")
            raise FsError(errno.ENODATA)
        try:
            return await self._meta(self.engine.getxattr, ino, name)
        except FsError as exc:
            if caps and exc.errno == errno.ENODATA:
                self._note_no_caps(ino)
            raise

    def _note_no_caps(self, ino: int) -> None:
        """``ino`` has no security.capability: the kernel asks before every write."""
        if len(self._no_caps) > 100_000:
            self._no_caps.clear()
        self._no_caps.add(ino)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_writable()
        if is_internal(ino):
            raise FsError(errno.EPERM)
        if len(name) > 255:
            raise FsError(errno.ERANGE)
        if not name.startswith(XATTR_NAMESPACES):  # as ext4 and tmpfs: no such namespace
            raise FsError(errno.EOPNOTSUPP)
        if len(value) > 65536:
            raise FsError(errno.E2BIG)
        self._no_caps.discard(ino)
        await self._meta(self.engine.setxattr, ino, name, value, flags)
        self._no_caps.discard(ino)  # and a getxattr answered meanwhile is of the old state
        self._changed(ino)

    async def listxattr(self, ino: int) -> list[bytes]:
        if is_internal(ino):
            return []
        return await self._meta(self.engine.listxattr, ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._check_writable()
        await self._meta(self.engine.removexattr, ino, name)
        self._changed(ino)

    async def access(self, ino: int, mode: int, uid: int, gids: list[int]) -> bool:
        attr = await self.getattr(ino)
        if uid == 0:
            return not (mode & os.X_OK) or bool(attr.mode & 0o111) or attr.is_dir
        if attr.uid == uid:
            bits = (attr.mode >> 6) & 7
        elif attr.gid in gids:
            bits = (attr.mode >> 3) & 7
        else:
            bits = attr.mode & 7
        return (mode & bits) == mode


#: reads of a file with fresh slice lists before a missing object is taken for damage
STALE_READ_ATTEMPTS = 4

#: the xattr namespaces Linux defines (xattr(7)); the kernel hands FUSE any name
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")


def _writable(h) -> bool:
    """A handle open for writing: its FLUSH and FSYNC hear of lost writes."""
    return bool(h.flags & (os.O_WRONLY | os.O_RDWR))
