"""``curvefs info PATH...``: where a file's bytes are, from the kernel down to the bucket.

Asks the daemon of the mount (``.control``, ``{"cmd": "info"}``) and prints, per file:
its chunks and slices, its block objects and which of them the local block cache
holds (memory, disk), how many of its pages the kernel's page cache holds (eBPF),
and its passthrough image.  ``--json`` prints the daemon's answer as it is.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import sys

from .units import fmt_bytes
from .volume import mountpoint_of


def register(sub) -> None:
    p = sub.add_parser("info", help="show where a file's bytes are (chunks, objects, caches)",
                       description="Show a file's chunks and slices, its block objects, which of them the "
                                   "local block cache holds, its pages in the kernel page cache and its "
                                   "passthrough image.")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--json", action="store_true", help="print the daemon's answers as JSON lines")
    p.set_defaults(func=run)


def ask(mp: str, ino: int) -> dict:
    """The daemon's answer about ``ino``; OSError as the daemon or kernel gave it."""
    fd = os.open(os.path.join(mp, ".control"), os.O_RDWR)
    try:
        os.write(fd, json.dumps({"cmd": "info", "inode": ino}).encode())
        parts, off = [], 0
        while True:  # a long answer comes in pieces
            b = os.pread(fd, 1 << 20, off)
            if not b:
                break
            parts.append(b)
            off += len(b)
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(parts))
    except ValueError as exc:
        raise OSError(errno.EIO, f"bad answer from the daemon: {exc}") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "special file"


def show(path: str, d: dict) -> None:
    print(f"{path}")
    print(f"  inode {d['inode']}, {_kind(d['mode'])}, {fmt_bytes(d['length'])} ({d['length']} bytes), "
          f"{d['nlink']} link(s), data version {d['data_version']}")
    if "chunks" not in d:
        return
    objs, n = d["objects"], d["object_counts"]
    nslices = sum(len(c["slices"]) for c in d["chunks"])
    print(f"  {len(d['chunks']) + d['empty_chunks']} chunk(s) ({d['empty_chunks']} empty), "
          f"{nslices} slice row(s), {n['total']} block object(s)")
    where = "local object store" if d.get("local_store") else "disk cache"
    print(f"  block cache: {n['memory']}/{n['total']} in memory, {n['disk']}/{n['total']} on {where}")
    k = d["kernel"]
    res = k["resident_pages"]
    if res is None:
        print(f"  kernel page cache: unknown (no eBPF counters); pages of {k['pages_of']} data")
    else:
        pct = 100 * res / k["pages"] if k["pages"] else 100
        print(f"  kernel page cache: {res}/{k['pages']} pages ({pct:.0f}%), of {k['pages_of']} data")
    img = d.get("image")
    if img is None:
        print("  passthrough image: none")
    else:
        print(f"  passthrough image: {img['path']}"
              + (", held" if img["held"] else "") + (", open in passthrough" if img["passthrough_open"] else ""))
    if d.get("unflushed"):
        print("  unflushed writes: yes")
    for c in d["chunks"]:
        print(f"  chunk {c['index']}:")
        for pos, sid, size, off, ln in c["slices"]:
            what = "hole" if sid == 0 else f"slice {sid} ({size} bytes) from {off}"
            print(f"    [{pos}, {pos + ln}) {what}")
        for key in c["objects"]:
            o = objs[key]
            flags = ",".join(w for w in ("memory", "disk") if o[w]) or "remote"
            print(f"    {key}  {flags}")
    if n["total"] > len(objs):
        print(f"  ({n['total'] - len(objs)} more block objects not listed)")


def run(args) -> int:
    rc = 0
    for path in args.paths:
        try:
            ino = os.lstat(path).st_ino
            d = ask(mountpoint_of(path), ino)
        except OSError as exc:  # gone meanwhile, not a file of the volume, daemon trouble
            print(f"curvefs info: {path}: {exc.strerror or os.strerror(exc.errno or errno.EIO)}",
                  file=sys.stderr)
            rc = 1
            continue
        if args.json:
            print(json.dumps({"path": path, **d}, sort_keys=True))
        else:
            show(path, d)
    return rc
