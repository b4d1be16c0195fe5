"""``curvefs gc META_URL``: find (and with ``--delete`` remove) objects no file names.

A crash between a write's upload and its commit leaves such objects (DESIGN §3);
they cost storage, nothing else.  Safe while clients stay mounted: see
``maint/audit.py`` for how an upload on its way to its commit is told from a leak.
"""
from __future__ import annotations

import json
import sys
import time

from ..errors import QuietError
from .units import fmt_bytes
from .volume import open_volume_and_store


def register(sub) -> None:
    p = sub.add_parser("gc", help="find and delete leaked objects",
                       description="List the volume's block objects and find those that no file names "
                                   "(leaked by a crash between upload and commit); --delete removes them.")
    p.add_argument("meta_url", metavar="META_URL")
    p.add_argument("--delete", action="store_true", help="delete the leaked objects (default: only report)")
    p.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                   help="only objects uploaded at least this long ago count as leaked, so that an upload "
                        "whose commit is on its way is never taken for one (default 3600)")
    p.add_argument("--threads", type=int, default=8, help="parallel deletes (default 8)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None

    def show(n: int, nbytes: int) -> None:
        print(f"\rlisting: {n} objects, {fmt_bytes(nbytes)}", end="", file=sys.stderr, flush=True)

    return show


def run(args) -> int:
    from ..maint.audit import audit, collect

    if not 0 <= args.min_age < float("inf"):  # also refuses nan, which would disable the age check
        raise QuietError("--min-age must be a number of seconds >= 0", 3)
    if args.threads < 1:
        raise QuietError("--threads must be >= 1", 3)
    progress = _progress(args.json)
    try:
        with open_volume_and_store(args.meta_url) as (engine, fmt, store):
            t0 = time.monotonic()
            a = audit(engine, store, fmt.block_size, args.min_age, progress)
            took = time.monotonic() - t0
            deleted = deleted_bytes = kept = 0
            if args.delete and (a.leaked or a.partial):
                deleted, deleted_bytes, kept = collect(engine, store, fmt.block_size, a.leaked,
                                                       args.threads, a.partial)
    finally:
        if progress:
            print(file=sys.stderr)  # end the progress line (before an error's line too)
    broken_blocks = sum(len(v) for v in a.broken.values())
    if args.json:
        print(json.dumps({
            "listed": a.listed, "listed_bytes": a.listed_bytes, "named": a.named,
            "queued": a.queued, "queued_slices": a.queued_slices, "young": a.young,
            "foreign": a.foreign, "leaked": len(a.leaked), "leaked_bytes": a.leaked_bytes,
            "partial": len(a.partial), "partial_bytes": a.partial_bytes,
            "deleted": deleted, "deleted_bytes": deleted_bytes, "kept": kept,
            "broken_files": len(a.broken), "broken_blocks": broken_blocks, "seconds": round(took, 3),
        }, indent=1, sort_keys=True))
        return 0
    print(f"listed {a.listed} objects ({fmt_bytes(a.listed_bytes)}) in {took:.1f}s")
    print(f"  named by files      {a.named}")
    print(f"  queued for deletion {a.queued} (of {a.queued_slices} slices; mounted clients delete them)")
    print(f"  too young to judge  {a.young} (uploaded less than {a.min_age:g} s ago)")
    print(f"  not block objects   {a.foreign} (left alone)")
    print(f"  leaked              {len(a.leaked)} ({fmt_bytes(a.leaked_bytes)})")
    if a.partial:
        print(f"  unfinished uploads  {len(a.partial)} ({fmt_bytes(a.partial_bytes)}; "
              "left by a crash during a put)")
    if a.broken:
        print(f"warning: {len(a.broken)} files miss {broken_blocks} block objects: run `curvefs fsck`")
    if not a.leaked and not a.partial:
        return 0
    if not args.delete:
        print("run with --delete to delete them")
    else:
        print(f"deleted {deleted} leaked objects and leftovers ({fmt_bytes(deleted_bytes)})"
              + (f"; kept {kept} that a file or the delete queue names now" if kept else ""))
    return 0
