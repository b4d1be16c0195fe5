"""``curvefs`` command line: subcommands register themselves; errors become one line.

Each ``cli/<command>.py`` module has ``register(subparsers)`` which adds its
parser and sets ``func`` to a function ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import QuietError

COMMANDS = ["format", "mount", "umount", "stats", "status", "info", "warmup", "bench", "gc", "fsck", "dump", "load"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvefs", description="curvefs_py: a POSIX file system on object storage")
    p.add_argument("--debug", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        rc = args.func(args)
    except QuietError as exc:
        print(f"curvefs {args.command}: {exc}", file=sys.stderr)
        return exc.exitcode
    except BrokenPipeError:  # e.g. `curvefs stats --json | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"curvefs {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
