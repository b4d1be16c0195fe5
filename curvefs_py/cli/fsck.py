"""``curvefs fsck META_URL``: check that every block object a file names is in the bucket.

Exit 0 when the volume is whole, 1 when files miss data (each named with its
path and the objects it misses).  Read only: it lists and HEADs objects.
"""
from __future__ import annotations

import json
import time

from .units import fmt_bytes
from .volume import open_volume_and_store


def register(sub) -> None:
    p = sub.add_parser("fsck", help="check that the objects of every file exist",
                       description="Check that every block object the volume's files name is in the object "
                                   "store with its length; name the files that miss data.")
    p.add_argument("meta_url", metavar="META_URL")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..maint.audit import audit, paths_of

    with open_volume_and_store(args.meta_url) as (engine, fmt, store):
        t0 = time.monotonic()
        a = audit(engine, store, fmt.block_size)
        paths = paths_of(engine, a.broken) if a.broken else {}
        took = time.monotonic() - t0
    broken = [{"inode": ino, "path": paths.get(ino),
               "objects": [{"key": k, "problem": p} for k, p in problems]}
              for ino, problems in sorted(a.broken.items())]
    if args.json:
        print(json.dumps({"files": a.files, "slices": a.slices, "objects": a.named,
                          "listed": a.listed, "leaked": len(a.leaked), "broken": broken,
                          "seconds": round(took, 3)}, indent=1, sort_keys=True))
        return 1 if broken else 0
    for b in broken:
        where = b["path"] or "(no path: deleted, still open somewhere)"
        print(f"BROKEN {where} (inode {b['inode']}): {len(b['objects'])} objects")
        for o in b["objects"]:
            print(f"  {o['key']}: {o['problem']}")
    print(f"checked {a.files} files, {a.slices} slices, {a.named + sum(len(b['objects']) for b in broken)} "
          f"objects ({fmt_bytes(a.listed_bytes)} listed) in {took:.1f}s: "
          + (f"{len(broken)} files miss data" if broken else "all present"))
    if a.leaked:
        print(f"{len(a.leaked)} leaked objects ({fmt_bytes(a.leaked_bytes)}): `curvefs gc --delete` removes them")
    return 1 if broken else 0
