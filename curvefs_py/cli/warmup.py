"""``curvefs warmup PATH...``: fill the block cache (and the kernel page cache) ahead of use.

Walks the paths (directories recursively), sends the inode list to the daemon
through ``MOUNTPOINT/.control`` and shows progress (files, bytes, rate, ETA)
until the daemon reports it is done.  ``--no-kernel`` fills only the local
block cache.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time

from ..errors import QuietError
from .units import fmt_bytes
from .volume import mountpoint_of


def register(sub) -> None:
    p = sub.add_parser("warmup", help="fetch files into the caches",
                       description="Fetch files' blocks into the local cache and push them into the kernel page cache.")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--no-kernel", action="store_true", help="fill only the local block cache, not the page cache")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def _collect(paths):
    inos, total, seen = [], 0, set()
    for top in paths:
        try:
            st = os.stat(top)
        except OSError as exc:
            raise QuietError(f"{top}: {exc.strerror}", 1) from None
        todo = [(top, st)]
        while todo:
            path, st = todo.pop()
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(path) as it:
                    for e in it:
                        try:
                            todo.append((e.path, e.stat(follow_symlinks=False)))
                        except OSError:
                            continue
            elif stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                inos.append(st.st_ino)
                total += st.st_size
    return inos, total


def run(args) -> int:
    mps = {mountpoint_of(p) for p in args.paths}
    if len(mps) != 1:
        raise QuietError("all PATHs must be on one curvefs mount", 1)
    mp = mps.pop()
    inos, total = _collect(args.paths)
    req = {"cmd": "warmup", "inodes": inos, "kernel": not args.no_kernel, "bytes_total": total}
    fd = os.open(os.path.join(mp, ".control"), os.O_RDWR)
    t0 = time.monotonic()
    tty = sys.stderr.isatty() and not args.quiet
    try:
        os.write(fd, json.dumps(req).encode())
        while True:
            st = json.loads(os.pread(fd, 1 << 16, 0))
            el = time.monotonic() - t0
            rate = st["bytes"] / el if el > 0 else 0
            eta = (total - st["bytes"]) / rate if rate > 0 else 0
            line = (f"warmup: {st['files']}/{st['files_total']} files, {fmt_bytes(st['bytes'])}"
                    f"/{fmt_bytes(total)}, {fmt_bytes(rate)}/s, ETA {eta:.0f}s")
            if tty:
                print("\r" + line + "   ", end="", file=sys.stderr, flush=True)
            if st.get("done"):
                break
            time.sleep(0.2)
    finally:
        os.close(fd)
    if tty:
        print(file=sys.stderr)
    if not args.quiet:
        print(f"warmed up {st['files']} files, {fmt_bytes(st['bytes'])} in {time.monotonic() - t0:.1f}s"
              + ("" if args.no_kernel else " (pushed into the kernel page cache)"))
    for e in st.get("errors", []):
        print(f"curvefs warmup: {e}", file=sys.stderr)
    return 1 if st.get("errors") else 0
