"""``curvefs dump META_URL [FILE]``: the volume's metadata as JSON lines (see maint/dump.py).

A backup of the metadata, or the first half of moving a volume to another engine
(``curvefs load``).  The secret key is left out unless ``--keep-secret-key``.
"""
from __future__ import annotations

import os
import stat
import sys
import tempfile

from ..errors import QuietError
from .volume import backend_errors, open_volume


def register(sub) -> None:
    p = sub.add_parser("dump", help="write a volume's metadata to a file",
                       description="Write the metadata of the volume in META_URL (tree, attributes, xattrs, "
                                   "slices) as JSON lines to FILE (default: stdout), for backups and for "
                                   "`curvefs load` into another engine. Dump a volume nobody writes to.")
    p.add_argument("meta_url", metavar="META_URL")
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="output file (default: stdout)")
    p.add_argument("--keep-secret-key", action="store_true", help="keep the S3 secret key in the dump")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..maint.dump import dump

    engine, _ = open_volume(args.meta_url)
    try:
        if args.file == "-":
            if sys.stdout is None:
                raise QuietError("standard output is closed: name an output FILE", 3)
            try:
                with backend_errors():
                    end = dump(engine, sys.stdout, args.keep_secret_key)
                    sys.stdout.flush()
            except BrokenPipeError:  # `dump | gzip > full-disk`: not a backup
                raise QuietError("the output was closed before the dump was complete", 1) from None
        else:
            end = _dump_to(engine, args.file, args.keep_secret_key)
    finally:
        engine.close()
    print(f"dumped {end['inodes']} inodes, {end['entries']} entries, {end['slices']} slices",
          file=sys.stderr)
    return 0


def _dump_to(engine, path: str, keep_secret: bool) -> dict:
    """Into a regular file: written beside it and renamed, so a failed dump leaves no
    partial file; into anything else (a pipe, a device) directly."""
    from ..maint.dump import dump

    target = os.path.abspath(path)
    try:
        if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
            if os.path.isdir(target):
                raise QuietError(f"{path} is a directory", 3)
            with open(target, "w", encoding="utf-8") as out, backend_errors():
                return dump(engine, out, keep_secret)
        fd, tmp = tempfile.mkstemp(prefix=".curvefs-dump-", dir=os.path.dirname(target))
    except OSError as exc:
        raise QuietError(f"{path}: {exc.strerror}", 3) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out, backend_errors():
            end = dump(engine, out, keep_secret)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        return end
    except OSError as exc:
        raise QuietError(f"{path}: {exc.strerror}", 3) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
