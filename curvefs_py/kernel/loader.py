"""Load the eBPF side car for one FUSE mount and read its maps.

Design
------
``bpf/*.bpf.c`` hold the C (one program per concern, ``TRACEPOINT_PROBE`` only,
settings as ``-D`` cflags); this module compiles them with BCC for the device of
one mount, attaches them, and turns their maps into flat counters.

* Device numbers.  Tracepoints carry the kernel's internal ``dev_t``
  (``MKDEV``: ``major << 20 | minor``); ``struct stat.st_dev`` and
  ``os.stat().st_dev`` carry the user-space encoding (``new_encode_dev``:
  ``minor & 0xff | major << 8 | (minor & ~0xff) << 12``); ``struct statx`` carries
  major and minor apart.  FUSE mounts have major 0 and minors that may be >= 256,
  where the encodings differ, so the loader derives all three from
  ``os.stat(mountpoint).st_dev`` and each program compares like with like.
  For FUSE, the tracepoints' ``connection`` is ``fuse_conn->dev``, which is the
  superblock's ``s_dev``: the same device as the page-cache tracepoints' ``s_dev``.
* Degrading.  :func:`load` never raises: when something is missing (not root,
  no tracefs, BCC import failed, kernel headers missing, a tracepoint missing, a
  compile or attach error) it returns a probe with ``available=False`` and a
  one-line ``reason``; the mount carries on without kernel counters.  Programs
  load independently: ``loaded`` lists those that work, and counters of the
  others are simply absent.
* Blocking.  Compiling takes a fraction of a second to seconds per program and
  cannot be interrupted.  :func:`load` is a plain blocking function (use it from
  a script or a worker thread); :func:`load_async` runs it in a trio worker
  thread with a timeout, so the loop is never held forever (a load that
  finishes after the timeout is closed at once).
* Counters are cumulative since load (nothing clears the maps), so several
  readers -- the pusher, ``.stats``, benchmarks -- can each take their own deltas.

Run ``python -m curvefs_py.kernel.loader MOUNTPOINT [INTERVAL]`` (as root) to
print the non-zero counters of a mount every INTERVAL seconds.
"""
from __future__ import annotations

import atexit
import ctypes as ct
import logging
import os
import stat as stat_mod
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

from . import maps

log = logging.getLogger(__name__)

#: program name -> tracepoints it attaches to (checked before compiling)
PROGRAMS: Dict[str, tuple[str, ...]] = {
    "fuse_req": ("fuse/fuse_request_send", "fuse/fuse_request_end"),
    "page_cache": ("filemap/mm_filemap_get_pages", "filemap/mm_filemap_add_to_page_cache",
                   "filemap/mm_filemap_delete_from_page_cache"),
    "stat_calls": tuple(f"syscalls/sys_{d}_{s}" for s in maps.STAT_SYSCALLS
                        for d in ("enter", "exit")),
}

#: the observers: tracepoints that fire on every buffered read call, or -- any syscall
#: tracepoint switches every task on the machine to the slow system-call path -- on
#: every system call. Measured here (benchmarks/bpf_overhead.py): ~280 ns per read
#: and ~80 ns per system call. They feed only ``kernel_read_*`` and ``kernel_stat_*``,
#: so they are attached while somebody observes (``KernelProbe.observe``); the rest
#: (FUSE requests, page-cache residency, which the pusher steers by) stays attached.
OBSERVERS: Dict[str, tuple[str, ...]] = {
    "page_cache": ("filemap/mm_filemap_get_pages",),
    "stat_calls": PROGRAMS["stat_calls"],
}

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

#: per-opcode counters always present in snapshots (hit rates need their zeros)
ALWAYS_REPORTED_OPS = ("LOOKUP", "GETATTR", "OPEN", "READ", "WRITE")


def default_bpf_dir() -> Path:
    env = os.environ.get("CURVEFS_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def kernel_dev(st_dev: int) -> int:
    """User-space st_dev -> the kernel's internal dev_t (MKDEV), as tracepoints show it."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def user_dev(major: int, minor: int) -> int:
    """(major, minor) -> struct stat.st_dev as the kernel writes it (new_encode_dev)."""
    return (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)


class KernelProbe:
    """BPF counters of one mount.  ``available`` says whether every requested program
    loaded, ``reason`` why not (empty when available).  All methods are blocking and
    thread-safe; after ``close()`` (or when nothing loaded) they return empty data."""

    def __init__(self, st_dev: Optional[int] = None, reason: str = ""):
        self.st_dev = st_dev                     # user-space encoding (os.stat)
        self.kdev = kernel_dev(st_dev) if st_dev is not None else None
        self.reason = reason
        self.loaded: Dict[str, object] = {}      # program name -> bcc.BPF
        self.errors: Dict[str, str] = {}         # program name -> reason
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self.observing = True                    # BCC attaches everything at load
        self._observed_s = 0.0                   # observer-attached seconds before _since
        self._since = time.monotonic()

    # -- state ----------------------------------------------------------------
    @property
    def available(self) -> bool:
        return bool(self.loaded) and not self.errors and not self.reason and not self._closed

    def __repr__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"<KernelProbe dev={self.st_dev} loaded={sorted(self.loaded)} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Detach all programs (blocking, idempotent)."""
        with self._lock:
            self._closed = True
            bpfs, self.loaded = list(self.loaded.values()), {}
        for b in bpfs:
            try:
                b.cleanup()
            except Exception as exc:  # never raise from close
                log.info("BPF cleanup: %s", exc)  # e.g. detaching a probe whose load was abandoned

    def _table(self, program: str, name: str):
        b = self.loaded.get(program)
        return None if b is None else b[name.encode()]

    def observe(self, on: bool) -> bool:
        """Attach (``on``) or detach the observers (``OBSERVERS``); blocking, cheap
        (no compiling). Returns whether they are attached now. While detached,
        ``kernel_read_*`` and ``kernel_stat_*`` do not grow."""
        with self._lock:
            if self._closed or on == self.observing:
                return self.observing and not self._closed
            for program, tps in OBSERVERS.items():
                b = self.loaded.get(program)
                for tp in tps if b is not None else ():
                    cat, name = tp.split("/")
                    try:
                        if on:
                            b.attach_tracepoint(tp=f"{cat}:{name}".encode(),
                                                fn_name=f"tracepoint__{cat}__{name}".encode())
                        else:
                            b.detach_tracepoint(f"{cat}:{name}".encode())
                    except Exception as exc:  # counters stop; the mount does not
                        log.warning("%s %s: %s", "attaching" if on else "detaching", tp, exc)
            now = time.monotonic()
            if self.observing:
                self._observed_s += now - self._since
            self._since = now
            self.observing = on
            return on

    def observed_seconds(self) -> float:
        """Seconds the observers were attached since load."""
        with self._lock:
            extra = time.monotonic() - self._since if self.observing and not self._closed else 0.0
            return self._observed_s + extra

    # -- writers --------------------------------------------------------------
    def map_backing(self, st_dev: int, st_ino: int, ino: int) -> None:
        """Count page-cache events of an image file (``os.stat`` dev/ino) for
        mount inode ``ino`` (FUSE passthrough: the kernel reads the image)."""
        with self._lock:
            t = None if self._closed else self._table("page_cache", "backing")
            if t is not None:
                t[maps.BackingKeyC(kernel_dev(st_dev), 0, st_ino)] = ct.c_uint64(ino)

    def unmap_backing(self, st_dev: int, st_ino: int) -> None:
        with self._lock:
            t = None if self._closed else self._table("page_cache", "backing")
            if t is not None:
                try:
                    del t[maps.BackingKeyC(kernel_dev(st_dev), 0, st_ino)]
                except KeyError:
                    pass

    # -- readers --------------------------------------------------------------
    def snapshot(self) -> Dict[str, float]:
        """Flat cumulative counters (names ``kernel_<what>[_<unit>][_<label>]``):

        kernel_bpf_available                  1 if every program loaded, else 0
        kernel_fuse_requests_<OP>             requests sent to the daemon (+ _total)
        kernel_fuse_errors_<OP>               replies with an error
        kernel_fuse_latency_us_sum_<OP>       summed send->end latency
        kernel_fuse_latency_us_bucket_<s>_<OP>  log2 slot s: [2^(s-1), 2^s) us
        kernel_fuse_read_bytes                READ reply payload bytes
        kernel_read_calls, kernel_read_pages  read calls (pages asked) served by the
                                              page cache path (filemap_get_pages)
        kernel_pages_resident                 pages of this mount in the page cache
        kernel_pages_added, kernel_pages_deleted, kernel_pages_deleted_untracked
        kernel_stat_calls (+ _<syscall>)      successful stat-family calls on this mount
        kernel_observing, kernel_observed_s   whether the observers (kernel_read_*,
                                              kernel_stat_*) are attached; for how long
        """
        out: Dict[str, float] = {"kernel_bpf_available": 1.0 if self.available else 0.0}
        observed = self.observed_seconds()
        with self._lock:
            if self._closed:
                return out
            if self.loaded:
                out["kernel_observing"] = 1.0 if self.observing else 0.0
                out["kernel_observed_s"] = observed
            t = self._table("fuse_req", "op_stats")
            if t is not None:
                ops = maps.read_op_stats(t)
                total = 0
                for name in ALWAYS_REPORTED_OPS:
                    out[f"kernel_fuse_requests_{name}"] = 0.0
                for op, s in ops.items():
                    name = maps.opcode_name(op)
                    total += s.requests
                    out[f"kernel_fuse_requests_{name}"] = float(s.requests)
                    if s.errors:
                        out[f"kernel_fuse_errors_{name}"] = float(s.errors)
                    if s.completed:
                        out[f"kernel_fuse_latency_us_sum_{name}"] = s.latency_ns_sum / 1000.0
                read = ops.get(maps.FUSE_OPCODE_NUMBERS["READ"])
                out["kernel_fuse_read_bytes"] = float(read.bytes if read else 0)
                out["kernel_fuse_requests_total"] = float(total)
                for op, slots in maps.read_latency(self._table("fuse_req", "lat_hist")).items():
                    name = maps.opcode_name(op)
                    for slot, n in slots.items():
                        out[f"kernel_fuse_latency_us_bucket_{slot}_{name}"] = float(n)
            t = self._table("page_cache", "totals")
            if t is not None:
                pt = maps.read_page_totals(t)
                out["kernel_read_calls"] = float(pt.read_calls)
                out["kernel_read_pages"] = float(pt.read_pages)
                out["kernel_pages_resident"] = float(pt.resident)
                out["kernel_pages_added"] = float(pt.pages_added)
                out["kernel_pages_deleted"] = float(pt.pages_deleted)
                out["kernel_pages_deleted_untracked"] = float(pt.pages_deleted_untracked)
            t = self._table("stat_calls", "stat_calls")
            if t is not None:
                calls = maps.read_stat_calls(t)
                out["kernel_stat_calls"] = float(sum(calls.values()))
                for sysname, n in calls.items():
                    out[f"kernel_stat_calls_{sysname}"] = float(n)
        return out

    def snapshot_totals(self) -> Dict[str, float]:
        """The page-cache totals only (one map lookup; for the pusher's budget)."""
        out: Dict[str, float] = {"kernel_bpf_available": 1.0 if self.available else 0.0}
        with self._lock:
            t = None if self._closed else self._table("page_cache", "totals")
            if t is not None:
                pt = maps.read_page_totals(t)
                out["kernel_read_calls"] = float(pt.read_calls)
                out["kernel_read_pages"] = float(pt.read_pages)
                out["kernel_pages_resident"] = float(pt.resident)
        return out

    def per_inode(self) -> Dict[int, Dict[str, int]]:
        """{ino: {read_calls, read_pages, resident_pages}} for inodes seen since load."""
        with self._lock:
            t = None if self._closed else self._table("page_cache", "inodes")
            if t is None:
                return {}
            return {ino: s.as_dict() for ino, s in maps.read_inodes(t).items()}

    def resident_pages(self, ino: int) -> int:
        """Pages of ``ino`` in the page cache (0 if unknown or not loaded)."""
        with self._lock:
            t = None if self._closed else self._table("page_cache", "inodes")
            if t is None:
                return 0
            s = maps.read_inode(t, ino)
            return s.resident_pages if s else 0


def _fail(probe: KernelProbe, reason: str) -> KernelProbe:
    probe.reason = reason
    log.info("kernel counters unavailable: %s", reason)
    return probe


def _find_tracefs(tracefs: Optional[str]) -> Optional[Path]:
    for cand in ([tracefs] if tracefs else TRACEFS_CANDIDATES):
        p = Path(cand)
        if (p / "events").is_dir():
            return p
    return None


def _headers_reason() -> Optional[str]:
    """None if BCC will find kernel headers, else why not."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return None
    rel = os.uname().release
    for d in (f"/lib/modules/{rel}/build", f"/lib/modules/{rel}/source"):
        if os.path.exists(f"{d}/include/linux/kconfig.h"):
            return None
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return None
    return (f"kernel headers missing (no /lib/modules/{rel}/build/include/linux/kconfig.h, "
            f"no /sys/kernel/kheaders.tar.xz; run scripts/setup.sh)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _resolve_dev(mountpoint_or_dev: Union[str, os.PathLike, int]) -> int:
    if isinstance(mountpoint_or_dev, int):
        return mountpoint_or_dev
    return os.stat(mountpoint_or_dev).st_dev


def load(mountpoint_or_dev: Union[str, os.PathLike, int], *,
         programs: Iterable[str] = tuple(PROGRAMS),
         tracefs: Optional[str] = None,
         bpf_dir: Optional[Union[str, os.PathLike]] = None,
         extra_cflags: Iterable[str] = (),
         backing_dev: Optional[int] = None) -> KernelProbe:
    """Compile and attach the BPF programs for one mount (blocking; never raises).

    ``mountpoint_or_dev`` is a path on the mount or its ``os.stat().st_dev``.
    ``tracefs`` overrides where tracepoints are looked up, ``bpf_dir`` where the C
    lives (default: ``$CURVEFS_BPF_DIR`` or ``<repo>/bpf``).  ``backing_dev``: the
    ``st_dev`` of the file system holding the passthrough images (``map_backing``)."""
    probe = KernelProbe()
    t0 = time.monotonic()
    try:
        if backing_dev is not None:
            extra_cflags = (*extra_cflags, f"-DCURVEFS_BACKING_DEV={kernel_dev(backing_dev)}u")
        return _load(probe, mountpoint_or_dev, tuple(programs), tracefs, bpf_dir,
                     tuple(extra_cflags))
    except Exception as exc:  # the side car must never take the mount down
        probe.close()
        return _fail(probe, f"unexpected error: {_first_line(exc)}")
    finally:
        probe.load_seconds = time.monotonic() - t0


def _load(probe, target, programs, tracefs, bpf_dir, extra_cflags) -> KernelProbe:
    try:
        st_dev = _resolve_dev(target)
    except OSError as exc:
        return _fail(probe, f"cannot stat {target}: {exc.strerror}")
    probe.st_dev, probe.kdev = st_dev, kernel_dev(st_dev)
    unknown = [p for p in programs if p not in PROGRAMS]
    if not programs:
        return _fail(probe, "no BPF programs requested")
    if unknown:
        return _fail(probe, f"unknown BPF program(s): {', '.join(unknown)}")
    if os.geteuid() != 0:
        return _fail(probe, f"not root (uid {os.geteuid()}): loading BPF needs CAP_BPF "
                            f"and CAP_PERFMON or CAP_SYS_ADMIN")
    tfs = _find_tracefs(tracefs)
    if tfs is None:
        where = tracefs or " or ".join(TRACEFS_CANDIDATES)
        return _fail(probe, f"no tracefs at {where} (mount -t tracefs nodev /sys/kernel/tracing)")
    src = Path(bpf_dir) if bpf_dir else default_bpf_dir()
    missing = [f"{p}.bpf.c" for p in programs if not (src / f"{p}.bpf.c").is_file()]
    if missing or not (src / "curvefs_bpf.h").is_file():
        return _fail(probe, f"BPF sources missing in {src}: "
                            f"{', '.join(missing) or 'curvefs_bpf.h'}")
    try:
        import bcc  # Debian's python3-bpfcc, linked into the venv by scripts/setup.sh
    except Exception as exc:
        return _fail(probe, f"BCC import failed: {_first_line(exc)}")
    why = _headers_reason()
    if why:
        return _fail(probe, why)

    major, minor = os.major(st_dev), os.minor(st_dev)
    cflags = [f"-I{src}",
              f"-DCURVEFS_DEV={probe.kdev}u",
              f"-DCURVEFS_UDEV={user_dev(major, minor)}ULL",
              f"-DCURVEFS_DEV_MAJOR={major}u",
              f"-DCURVEFS_DEV_MINOR={minor}u",
              *extra_cflags]
    for name in programs:
        gone = [tp for tp in PROGRAMS[name] if not (tfs / "events" / tp).is_dir()]
        if gone:
            probe.errors[name] = f"tracepoint {gone[0].replace('/', ':')} missing"
            continue
        try:
            b = bcc.BPF(src_file=os.fsencode(src / f"{name}.bpf.c"), cflags=cflags)
        except Exception as exc:
            probe.errors[name] = f"compile/attach error in {name}.bpf.c: {_first_line(exc)}"
            continue
        # BCC registers cleanup() with atexit; the probe owns it instead (close()).
        # Otherwise an abandoned load closing itself in its worker thread races the
        # exit-time cleanup over the same descriptor numbers (EBADF on stderr, or a
        # reused fd closed). Exit releases the programs' descriptors anyway.
        atexit.unregister(b.cleanup)
        try:
            maps.check_layout(name, b)
        except Exception as exc:
            b.cleanup()
            probe.errors[name] = f"map layout mismatch: {_first_line(exc)}"
            continue
        probe.loaded[name] = b
    if probe.errors:
        return _fail(probe, "; ".join(probe.errors.values()))
    log.info("kernel counters loaded for dev %d:%d (%s)", major, minor, ", ".join(probe.loaded))
    return probe


async def load_async(mountpoint_or_dev, *, timeout: float = 60.0, **kwargs) -> KernelProbe:
    """:func:`load` in a trio worker thread, giving up after ``timeout`` seconds
    (then ``available=False``).  A load abandoned by the timeout or by an outer
    cancellation closes its probe itself when the compile finally returns."""
    import trio

    lock = threading.Lock()
    state = {"abandoned": False}

    def run() -> KernelProbe:
        with _loads:
            _loads.running += 1
        try:
            p = load(mountpoint_or_dev, **kwargs)
            with lock:
                if state["abandoned"]:
                    p.close()
            return p
        finally:
            with _loads:
                _loads.running -= 1
                _loads.notify_all()

    probe = None
    try:
        with trio.move_on_after(timeout):
            probe = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    finally:
        if probe is None:
            with lock:
                state["abandoned"] = True
    if probe is None:
        probe = _fail(KernelProbe(), f"loading BPF timed out after {timeout:g}s")
    return probe


class _Loads(threading.Condition):
    running = 0


#: loads running in worker threads (an abandoned one goes on until its compile returns)
_loads = _Loads()


def wait_for_loads(timeout: float) -> bool:
    """Blocking. Wait until no load runs in a worker thread (True), at most ``timeout``
    seconds. A process must not exit under a running compile: the interpreter's and
    clang's exit-time teardown would race it (BCC prints "missing bcc/helpers.h")."""
    with _loads:
        return _loads.wait_for(lambda: _loads.running == 0, timeout)


def _main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="print a mount's kernel counters")
    ap.add_argument("mountpoint")
    ap.add_argument("interval", nargs="?", type=float, default=1.0)
    ap.add_argument("count", nargs="?", type=int, default=0)
    ap.add_argument("-j", "--json", action="store_true")
    ap.add_argument("--top", type=int, default=0, help="also print the N busiest inodes")
    args = ap.parse_args(argv)
    if not stat_mod.S_ISDIR(os.stat(args.mountpoint).st_mode):
        ap.error("not a directory")
    probe = load(args.mountpoint)
    if not probe.available:
        print(f"kernel counters unavailable: {probe.reason}")
        if not probe.loaded:
            return 1
    n = 0
    try:
        while True:
            time.sleep(args.interval)
            snap = {k: v for k, v in probe.snapshot().items() if v}
            if args.json:
                print(json.dumps(snap, sort_keys=True), flush=True)
            else:
                print(time.strftime("%H:%M:%S"))
                for k in sorted(snap):
                    print(f"  {k:<56} {snap[k]:>14g}")
                if args.top:
                    rows = sorted(probe.per_inode().items(),
                                  key=lambda kv: -kv[1]["read_calls"])[:args.top]
                    print(f"  {'ino':>12} {'read_calls':>12} {'read_pages':>12} {'resident':>10}")
                    for ino, s in rows:
                        print(f"  {ino:>12} {s['read_calls']:>12} {s['read_pages']:>12} "
                              f"{s['resident_pages']:>10}")
            n += 1
            if args.count and n >= args.count:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        probe.close()


if __name__ == "__main__":
    raise SystemExit(_main())
