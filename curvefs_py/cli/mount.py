"""``curvefs mount META_URL MOUNTPOINT``: serve a volume (foreground, or -d in the background)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from ..config import MountOptions, check_meta_url, parse_size
from ..errors import QuietError

#: seconds; an upload waits at most this long for its commit, far below gc's --min-age
MAX_FLUSH_INTERVAL = 300


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount a volume",
                       description="Mount the volume in META_URL on MOUNTPOINT.")
    p.add_argument("meta_url", metavar="META_URL")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-d", "--background", action="store_true", help="run in the background; return when the mount is usable")
    p.add_argument("--cache-dir", default="/var/cache/curvefs", help="local block cache directory (default /var/cache/curvefs)")
    p.add_argument("--cache-size", default="10G", help="disk cache limit (default 10G)")
    p.add_argument("--buffer-size", "--mem-cache-size", dest="mem_cache_size", default="256M", help="memory block cache (default 256M)")
    p.add_argument("--attr-timeout", type=float, default=1.0, help="kernel attribute cache timeout in seconds (default 1)")
    p.add_argument("--entry-timeout", type=float, default=1.0, help="kernel entry cache timeout in seconds (default 1)")
    p.add_argument("--negative-timeout", type=float, default=0.0, help="kernel negative-lookup cache timeout in seconds (default 0)")
    p.add_argument("--max-uploads", type=int, default=20, help="parallel object uploads/downloads (default 20)")
    p.add_argument("--readahead", default="0", help="sequential readahead window (default: 4 blocks)")
    p.add_argument("--kernel-cache-budget", default="1G", help="bytes of this mount the daemon may fill into the page cache (default 1G; 0 turns pushing off)")
    p.add_argument("--push-whole-max", default="128M", help="on open for reading, push whole files up to this size (larger ones: their first 8 MiB) from the local block cache into the page cache (default 128M)")
    p.add_argument("--io-timeout", type=float, default=30.0,
                   help="seconds to keep retrying a failing object request before the caller gets EIO (default 30)")
    p.add_argument("--passthrough-max", default="4G", help="files up to this size get a whole-file image in the disk cache, assembled from cached blocks, and reads of them are served by the kernel from it (FUSE passthrough, Linux >= 6.9; default 4G; 0: off)")
    p.add_argument("--no-passthrough", action="store_true", help="same as --passthrough-max 0")
    p.add_argument("--image-cache-size", default=None, help="disk space for file images (default: --cache-size)")
    p.add_argument("--image-hold", default=None,
                   help="bytes of the most recently used file images the daemon keeps mapped, so that "
                        "proactive reclaim of idle page cache (DAMON pageout filtered to unmapped pages) leaves them "
                        "resident; the kernel still reclaims them under memory pressure "
                        "(default: a quarter of RAM, at most --image-cache-size; 0: off)")
    p.add_argument("--flush-interval", type=float, default=10.0, metavar="SECONDS",
                   help="commit the writes of a file kept open at least this often, so other clients see "
                        "them and gc never takes their objects for leaks (default 10, at most 300: "
                        "well below gc's --min-age)")
    p.add_argument("--compact-threshold", type=int, default=64, help="compact a chunk once it holds more slices than this (default 64; 0: never)")
    p.add_argument("--read-only", action="store_true",
                   help="serve reads only: every change fails with EROFS, and this client neither compacts "
                        "nor deletes objects (warmup and stats work)")
    p.add_argument("--no-bpf", action="store_true", help="do not load the eBPF counters")
    p.add_argument("--metrics", default="", metavar="HOST:PORT",
                   help="serve the counters of `curvefs stats` for Prometheus at http://HOST:PORT/metrics "
                        "(e.g. 127.0.0.1:9567; default: off)")
    p.add_argument("--kernel-observe", choices=("on-demand", "always"), default="on-demand",
                   help="when the per-read and per-stat eBPF observers (kernel read calls, stat calls) are "
                        "attached: while `curvefs stats` runs (default; they cost every read ~280 ns and "
                        "every system call on the host ~80 ns), or always")
    p.add_argument("--log", dest="log_file", default=None, help="log file (default: stderr; /var/log/curvefs.log with -d)")
    p.add_argument("--timeout", type=float, default=30.0, help=argparse_suppress())
    p.set_defaults(func=run)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _options(args) -> MountOptions:
    check_meta_url(args.meta_url)
    if not args.io_timeout > 0:
        raise QuietError("--io-timeout must be a positive number of seconds", 3)
    if not 0 < args.flush_interval <= MAX_FLUSH_INTERVAL:
        raise QuietError(f"--flush-interval must be between 0 and {MAX_FLUSH_INTERVAL} seconds", 3)
    for name in ("attr_timeout", "entry_timeout", "negative_timeout"):
        v = getattr(args, name)
        if not 0 <= v < float("inf"):  # also refuses nan
            raise QuietError(f"--{name.replace('_', '-')} must be a number of seconds >= 0", 3)
    if not args.max_uploads >= 1:
        raise QuietError("--max-uploads must be at least 1", 3)
    if args.log_file is not None:
        try:  # here, not in the daemon: a bad path is one line, not a traceback
            with open(args.log_file, "a"):
                pass
        except OSError as exc:
            raise QuietError(f"log file {args.log_file}: {exc.strerror}", 3) from None
    if args.metrics:
        from ..exporter import parse_address

        parse_address(args.metrics)
    return MountOptions(
        meta_url=args.meta_url, mountpoint=args.mountpoint, cache_dir=args.cache_dir,
        cache_size=parse_size(args.cache_size), mem_cache_size=parse_size(args.mem_cache_size),
        attr_timeout=args.attr_timeout, entry_timeout=args.entry_timeout,
        negative_timeout=args.negative_timeout, log_file=args.log_file, debug=args.debug,
        no_bpf=args.no_bpf, max_uploads=args.max_uploads, readahead=parse_size(args.readahead),
        kernel_cache_budget=parse_size(args.kernel_cache_budget),
        push_whole_max=parse_size(args.push_whole_max), io_timeout=args.io_timeout,
        extra={"compact_threshold": args.compact_threshold, "kernel_observe": args.kernel_observe,
               "metrics": args.metrics, "flush_interval": args.flush_interval, "read_only": args.read_only,
               "passthrough_max": 0 if args.no_passthrough else parse_size(args.passthrough_max),
               "image_cache_size": parse_size(args.image_cache_size or args.cache_size),
               **({} if args.image_hold is None else {"image_hold": parse_size(args.image_hold)})})


def run(args) -> int:
    from ..fuse.daemon import check_mountpoint, serve, setup_logging

    opts = _options(args)
    check_mountpoint(opts.mountpoint)
    if not args.background:
        setup_logging(opts.log_file, opts.debug)
        return serve(opts)
    return _background(args, opts)


def _background(args, opts: MountOptions) -> int:
    """Start the daemon detached; exit 0 once MOUNTPOINT serves, else its one-line error."""
    mp = os.path.abspath(opts.mountpoint)
    argv = [a for a in sys.argv[1:] if a not in ("-d", "--background")]
    if sys.argv and not sys.argv[0].endswith("curvefs"):
        cmd = [sys.executable, "-m", "curvefs_py.cli.main"] + argv
    else:
        cmd = [sys.argv[0]] + argv
    if opts.log_file is None:
        cmd += ["--log", "/var/log/curvefs.log" if os.geteuid() == 0 else os.path.expanduser("~/.curvefs.log")]
    err = tempfile.NamedTemporaryFile(prefix="curvefs-mount-", suffix=".err", delete=False)
    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err, start_new_session=True, close_fds=True)
        parent_dev = os.stat(os.path.dirname(mp.rstrip("/")) or "/").st_dev
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            rc = child.poll()
            if rc is not None:
                err.seek(0)
                lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
                msg = lines[-1] if lines else f"daemon exited with status {rc}"
                if msg.startswith("curvefs mount: "):
                    msg = msg[len("curvefs mount: "):]
                raise QuietError(msg, rc or 1)
            try:
                if os.path.ismount(mp) and os.stat(mp).st_dev != parent_dev:
                    print(f"mounted on {mp} (pid {child.pid})")
                    return 0
            except OSError:
                pass
            time.sleep(0.05)
        child.terminate()
        raise QuietError(f"mount on {mp} did not come up within {args.timeout:.0f}s", 7)
    finally:
        err.close()
        os.unlink(err.name)
