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

from ..errors import QuietError
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
    fd = os.open(os.path.join(mp, ".control"), os.O_RDWR)
    try:
        try:
            os.write(fd, json.dumps({"cmd": "info", "inode": ino}).encode())
        except OSError as exc:
            raise QuietError(f"inode {ino}: {os.strerror(exc.errno or errno.EIO)}", 1) from None
        return json.loads(os.pread(fd, 1 << 24, 0))
    finally:
        os.close(fd)


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
    objs = d["objects"]
    nslices = sum(len(c["slices"]) for c in d["chunks"])
    print(f"  {len(d['chunks'])} chunk(s), {nslices} slice row(s), {len(objs)} block object(s)")
    mem = sum(1 for o in objs.values() if o["memory"])
    disk = sum(1 for o in objs.values() if o["disk"])
    where = "local object store" if d.get("local_store") else "disk cache"
    print(f"  block cache: {mem}/{len(objs)} in memory, {disk}/{len(objs)} on {where}")
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
            flags = ",".join(n for n in ("memory", "disk") if o[n]) or "remote"
            print(f"    {key}  {flags}")


def run(args) -> int:
    rc = 0
    for path in args.paths:
        try:
            ino = os.lstat(path).st_ino
        except OSError as exc:
            print(f"curvefs info: {path}: {exc.strerror}", file=sys.stderr)
            rc = 1
            continue
        d = ask(mountpoint_of(path), ino)
        if args.json:
            print(json.dumps({"path": path, **d}, sort_keys=True))
        else:
            show(path, d)
    return rc
