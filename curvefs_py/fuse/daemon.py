"""Composition root: build the layers, mount, run the trio loop, and tear down in reverse.

``serve(opts)`` is blocking and runs in the foreground process:

1. open the engine and load the format (not formatted → QuietError 5),
2. open the object store and prove it works (QuietError 4),
3. register a session, build cache → chunk store → VFS → Operations,
4. ``pyfuse3.init`` (mount), then ``trio.run``: one nursery holds the
   background workers (uploads, deleter, heartbeat, prefetch) and the signal
   watcher; ``pyfuse3.main`` serves requests until the file system is
   unmounted (``curvefs umount``/``fusermount3 -u``) or a signal arrives,
5. flush every writer, run the deleter once, close the session, unmount.

SIGTERM/SIGINT/SIGHUP flush and unmount (lazily if busy).  ``faulthandler`` is
on, and SIGUSR1 dumps every thread's stack to the log.
"""
from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import socket
import subprocess
import sys

import trio

from .. import __version__, metrics, threads
from ..config import MountOptions, redact, refuse_foreign_bucket, refuse_unfinished_load
from ..errors import FsError, ObjectStoreError, QuietError
from .mountinfo import FSTYPE, mount_device, mount_fstype

log = logging.getLogger(__name__)


def check_mountpoint(mp: str) -> str:
    """Validate MOUNTPOINT; clear a dead FUSE mount left by a crashed daemon."""
    mp = os.path.abspath(mp)
    try:
        st = os.stat(mp)
        if os.path.ismount(mp):
            # the stat may have come from the kernel's attr cache of a dead mount:
            # OPENDIR always reaches the daemon (ENOTCONN when it is gone)
            try:
                os.close(os.open(mp, os.O_RDONLY | os.O_DIRECTORY))
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    raise
    except FileNotFoundError:
        raise QuietError(f"mountpoint {mp} does not exist", 6) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a daemon died with the mount in place
            fstype = mount_fstype(mp)
            if fstype != FSTYPE:
                raise QuietError(f"mountpoint {mp} is a dead mount of another file system "
                                 f"({fstype}): unmount it first", 6) from None
            log.warning("%s: clearing a dead mount (its daemon is gone)", mp)
            lazy_unmount(mp)
            st = os.stat(mp)
        else:
            raise QuietError(f"mountpoint {mp}: {exc.strerror}", 6) from None
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise QuietError(f"mountpoint {mp} is not a directory", 6)
    if os.path.ismount(mp):
        raise QuietError(f"mountpoint {mp} is busy: something is already mounted there", 6)
    return mp


def lazy_unmount(mp: str) -> None:
    for cmd in (["fusermount3", "-uz", mp], ["umount", "-l", mp]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue


def serve(opts: MountOptions) -> int:
    """Mount and serve in the foreground until unmounted. Blocking."""
    import pyfuse3

    from ..chunk.cache import BlockCache
    from ..chunk.store import ChunkStore
    from ..meta import open_engine
    from ..object import open_store
    from ..vfs.vfs import VFS
    from .backing import KernelBacking
    from .notifier import KernelNotifier
    from .operations import Operations

    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mp = check_mountpoint(opts.mountpoint)
    metrics_sock = None
    if opts.extra.get("metrics"):
        from ..exporter import bind

        metrics_sock = bind(opts.extra["metrics"])  # before the mount: a busy port is one line
    engine = open_engine(opts.meta_url)
    try:
        fmt = engine.load()
    except FsError as exc:
        if exc.errno == errno.ENOENT:
            raise QuietError(f"{redact(opts.meta_url)} holds no volume: run `curvefs format` first", 5) from None
        raise QuietError(f"cannot read metadata: {exc}", 4) from None
    refuse_unfinished_load(fmt, opts.meta_url)
    try:
        from ..object import RetryPolicy

        store = open_store(fmt.storage, fmt.bucket, fmt.access_key, fmt.secret_key, fmt.region,
                           retry_policy=RetryPolicy(deadline=opts.io_timeout),
                           read_timeout=min(10.0, opts.io_timeout))
        store.check()
        refuse_foreign_bucket(store, fmt)
    except ObjectStoreError as exc:
        raise QuietError(f"object storage: {exc}", 4) from None

    if engine.__class__.__name__ == "SqliteEngine":
        threads.configure(meta=1)  # one writer for SQLite
    threads.configure(s3=max(4, opts.max_uploads))
    try:
        os.makedirs(opts.cache_dir, exist_ok=True)
    except OSError as exc:
        raise QuietError(f"cache dir {opts.cache_dir}: {exc.strerror}", 3) from None
    cache = BlockCache(opts.cache_dir, opts.cache_size, opts.mem_cache_size, fmt.uuid)
    # a local `file` store is as fast as the disk cache: do not copy uploads into it
    chunks = ChunkStore(store, cache, fmt.block_size, local_store=fmt.storage == "file")
    engine.new_session({"host": socket.gethostname(), "pid": os.getpid(), "mountpoint": mp,
                        "version": __version__})
    notifier = KernelNotifier(opts.kernel_cache_budget)
    vfs_options = {"attr_timeout": opts.attr_timeout, "entry_timeout": opts.entry_timeout,
                   "kernel_cache_budget": opts.kernel_cache_budget,
                   "push_whole_max": opts.push_whole_max,
                   "negative_timeout": opts.negative_timeout, "cache_dir": opts.cache_dir,
                   "cache_size": opts.cache_size, "mountpoint": mp, "meta_url": redact(opts.meta_url)}
    if opts.readahead:
        vfs_options["readahead"] = opts.readahead
    vfs_options.update(opts.extra)
    vfs_options.setdefault("image_cache_size", opts.cache_size)
    backing = KernelBacking()
    vfs = VFS(engine, chunks, fmt, notifier=notifier, options=vfs_options, backing=backing)
    ops = Operations(vfs, attr_timeout=opts.attr_timeout, entry_timeout=opts.entry_timeout,
                     negative_timeout=opts.negative_timeout, backing=backing)
    if vfs.images.max_file > 0 and vfs.images.hold_limit > 0:
        # at once: between the last daemon's exit and this hold the images are
        # unmapped, and proactive reclaim takes idle unmapped pages within seconds
        held = vfs.images.hold_resident()
        log.info("holding %d image(s) still in the page cache", held)
    fuse_opts = set(pyfuse3.default_options)
    # noatime: the daemon keeps no access times (as JuiceFS's default atime mode); the
    # mount says so instead of showing relatime
    fuse_opts |= {f"fsname=curvefs:{fmt.name}", "subtype=curvefs", "default_permissions", "noatime"}
    if os.geteuid() == 0:
        fuse_opts.add("allow_other")
    try:
        pyfuse3.init(ops, mp, fuse_opts)
    except RuntimeError as exc:
        engine.close_session()
        raise QuietError(f"FUSE mount on {mp} failed: {exc}", 7) from None
    log.info("mounted volume %s on %s (pid %d)", fmt.name, mp, os.getpid())
    if vfs.images.max_file > 0:
        backing.install()  # before pyfuse3.main reads FUSE_INIT
    else:
        backing.reason = "disabled (--passthrough-max 0)"
    vfs.options["kernel_readahead"] = opts.readahead or 4 * fmt.block_size
    state = {"signalled": False}
    try:
        exporter = None if metrics_sock is None else (metrics_sock, {"volume": fmt.name, "mountpoint": mp})
        trio.run(_run, vfs, chunks, state, None if opts.no_bpf else mp, exporter)
    finally:
        try:
            pyfuse3.close(unmount=state["signalled"])
        except Exception as exc:  # already unmounted
            log.debug("pyfuse3.close: %s", exc)
        if state["signalled"] and os.path.ismount(mp):
            lazy_unmount(mp)
        try:
            engine.close_session()
        except FsError as exc:  # e.g. the metadata server is down at unmount
            log.warning("closing session failed (others reclaim it after the session timeout): %s", exc)
        finally:
            engine.close()
            store.close()
        log.info("unmounted %s", mp)
        if not opts.no_bpf:  # unmounted within seconds of mounting: a compile may still run
            from ..kernel.loader import wait_for_loads

            if not wait_for_loads(0):
                if sys.exc_info()[0] is None:
                    _exit_under_compile()
                elif not wait_for_loads(60):  # an error is on its way out: let it, after the compile
                    log.warning("exiting while the BPF programs still compile")
    return 0


def _exit_under_compile() -> None:
    """Exit now, with the BPF compile still running in its thread.  Everything of
    the mount is done (unmounted, flushed, session closed); waiting would hold
    `curvefs umount` for the seconds of the compile, and the interpreter's exit-time
    teardown would race clang's (BCC then prints "missing bcc/helpers.h").  So no
    teardown: flush the logs and leave; the kernel frees the half-loaded programs."""
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


async def _load_bpf(vfs, mp: str) -> None:
    """Load the eBPF counters for this mount (seconds of compiling, in a thread)."""
    from ..kernel.loader import load_async

    try:
        backing_dev = os.stat(vfs.options["cache_dir"]).st_dev  # where the images live
    except OSError:
        backing_dev = None
    probe = await load_async(mp, backing_dev=backing_dev)
    vfs.kernel_probe = probe
    if probe.available:
        metrics.add_collector(probe.snapshot)
        vfs.passthrough.map = probe.map_backing
        vfs.images.unmap = probe.unmap_backing

        def resident() -> int | None:
            snap = probe.snapshot_totals() if hasattr(probe, "snapshot_totals") else probe.snapshot()
            r = snap.get("kernel_pages_resident")
            return None if r is None else int(r) * 4096

        vfs.pusher.resident_bytes = resident
        log.info("eBPF counters loaded for %s", mp)
        await vfs.follow_observers()
    else:
        metrics.set_gauge("kernel_bpf_available", 0)
        log.info("eBPF counters unavailable: %s", probe.reason)


async def _run(vfs, chunks, state, bpf_mountpoint, exporter=None) -> None:
    import pyfuse3

    threads.reset()
    probe_holder = vfs
    async with trio.open_nursery() as nursery:
        if exporter is not None:
            from .. import exporter as prometheus

            nursery.start_soon(prometheus.serve, *exporter, name="metrics-exporter")
        if bpf_mountpoint:
            nursery.start_soon(_load_bpf, vfs, bpf_mountpoint, name="bpf-loader")
        else:
            vfs.options["bpf_reason"] = "disabled by --no-bpf"
            metrics.set_gauge("kernel_bpf_available", 0)
        if hasattr(chunks, "start"):
            res = chunks.start(nursery)
            if hasattr(res, "__await__"):
                await res
        await vfs.start(nursery)
        nursery.start_soon(_watch_signals, state, name="signals")
        nursery.start_soon(_readahead_after_init, vfs, name="readahead")
        nursery.start_soon(_passthrough_after_init, vfs, name="passthrough-probe")
        try:
            await pyfuse3.main()
        finally:
            with trio.CancelScope(shield=True):
                await vfs.close()
                probe = probe_holder.kernel_probe
                if probe is not None:
                    metrics.remove_collector(probe.snapshot)
                    await trio.to_thread.run_sync(probe.close)
            nursery.cancel_scope.cancel()


async def _watch_signals(state) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("signal %s: flushing and unmounting", signal.Signals(sig).name)
            state["signalled"] = True
            pyfuse3.terminate()
            return


async def _readahead_after_init(vfs) -> None:
    """The kernel sets the readahead while it processes FUSE_INIT's reply:
    set ours once that is done (shortly after the loop starts)."""
    for _ in range(10):
        await trio.sleep(0.2)
        if _set_kernel_readahead(vfs.options["mountpoint"], vfs.options["kernel_readahead"]):
            return


async def _passthrough_after_init(vfs) -> None:
    """Once FUSE_INIT is answered, find out whether the kernel takes backing files."""
    backing = vfs.passthrough.kernel
    if backing is None or not backing.installed:
        await threads.run_blocking(vfs.images.release_all, limiter=threads.HOLD)  # unused here
        return
    for _ in range(50):
        await trio.sleep(0.1)
        if backing.init_state() != 0:
            break
    await threads.run_blocking(vfs.images.scan, limiter=threads.DISK)
    if await backing.probe(os.path.join(vfs.images.dir, ".probe")):
        log.info("FUSE passthrough on: files up to %d bytes are served from images in %s",
                 vfs.images.max_file, vfs.images.dir)
    else:
        log.info("FUSE passthrough unavailable: %s", backing.reason)
        await threads.run_blocking(vfs.images.release_all, limiter=threads.HOLD)


def _set_kernel_readahead(mp: str, nbytes: int) -> bool:
    """Raise the mount's kernel readahead (FUSE defaults to 128 KiB), so a
    sequential reader's misses arrive as 1 MiB READs instead of 128 KiB ones."""
    try:
        dev = mount_device(mp)  # from mountinfo: a stat() here would wait for our own loop
        if dev is None:
            return False
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        want = str(max(128, min(nbytes, 64 << 20) >> 10))
        with open(path, "w") as f:
            f.write(want)
        with open(path) as f:
            return f.read().strip() == want
    except OSError as exc:  # not root, or no sysfs: keep the kernel default
        log.debug("cannot set readahead: %s", exc)
        return True


class _StaleReplyFilter(logging.Filter):
    """pyfuse3 logs every failed reply at ERROR.  A reply refused with ENOENT is
    one the kernel no longer waits for: the request was interrupted, or the
    connection was aborted at unmount while a background RELEASE was still
    running (fs/fuse/inode.c fuse_conn_destroy aborts what is in flight after
    DESTROY).  libfuse itself stays silent on ENOENT (fuse_send_msg: "ENOENT
    means the operation was interrupted"); the handler's work is done either
    way, only the reply is lost.  Count it, and log it at DEBUG."""

    _STALE = "fuse_reply_* failed with " + os.strerror(errno.ENOENT)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and self._STALE in record.getMessage():
            metrics.inc("fuse_stale_replies")
            if not logging.getLogger().isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def setup_logging(log_file: str | None, debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    fuse_log = logging.getLogger("pyfuse3")
    for f in list(fuse_log.filters):
        if isinstance(f, _StaleReplyFilter):
            fuse_log.removeFilter(f)
    fuse_log.addFilter(_StaleReplyFilter())
    metrics.set_gauge("daemon_start_unix_s", __import__("time").time())
