#!/usr/bin/env python3
"""What observing page-cache reads with BPF costs each read.

    .venv/bin/python benchmarks/bpf_overhead.py [--rounds 3] [--runtime 3]

fio 4 KiB random reads (psync, 1 job) of a cached 64 MiB file on the ext4
file system under /var/tmp, alternating, in the same run:

* no BPF program attached (baseline),
* a program on ``filemap:mm_filemap_get_pages`` that returns at once (the
  fixed price of a classic tracepoint with a BPF program: the kernel formats
  the event's arguments before the program runs),
* curvefs's ``bpf/page_cache.bpf.c`` compiled for that file system, counting
  every read as it does for a mount,
* curvefs's ``bpf/stat_calls.bpf.c`` (syscall tracepoints): it counts no read,
  but any attached syscall tracepoint sends every system call of every task
  through the slow entry path, so the reads pay for it too.

The page_cache read counter and stat_calls are the "observers" that a mount
attaches only while ``curvefs stats`` watches (``--kernel-observe``).

tmpfs reads do not go through ``filemap_get_pages`` and never pay this; reads
of a curvefs mount (page cache or passthrough image) do.  Needs root and BCC.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from curvefs_py.kernel import loader  # noqa: E402

TRIVIAL = "TRACEPOINT_PROBE(filemap, mm_filemap_get_pages) { return 0; }"


def fio(path: str, runtime: int) -> float:
    r = subprocess.run(["fio", "--name=rr", f"--filename={path}", "--rw=randread", "--bs=4k",
                        "--size=64M", f"--runtime={runtime}", "--time_based", "--invalidate=0",
                        "--ioengine=psync", "--output-format=json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fio failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]["iops"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=3)
    args = ap.parse_args()
    from bcc import BPF

    fd, path = tempfile.mkstemp(prefix="curvefs-bpfcost-", dir="/var/tmp")
    try:
        os.write(fd, os.urandom(64 << 20))
        os.close(fd)
        rows: dict[str, list[float]] = {"none": [], "trivial": [], "page_cache": [], "stat_calls": []}
        for _ in range(args.rounds):
            rows["none"].append(fio(path, args.runtime))
            b = BPF(text=TRIVIAL)
            try:
                rows["trivial"].append(fio(path, args.runtime))
            finally:
                b.cleanup()
            for program in ("page_cache", "stat_calls"):
                probe = loader.load(path, programs=[program])
                if not probe.available:
                    raise SystemExit(f"{program} program did not load: {probe.reason}")
                try:
                    rows[program].append(fio(path, args.runtime))
                finally:
                    probe.close()
    finally:
        os.unlink(path)
    base = statistics.median(rows["none"])
    print(f"{'attached (one at a time)':<44} {'IOPS':>10} {'ratio':>6} {'ns/read':>8}")
    for name, label in (("none", "nothing"), ("trivial", "a program that returns at once"),
                        ("page_cache", "curvefs bpf/page_cache.bpf.c"),
                        ("stat_calls", "curvefs bpf/stat_calls.bpf.c (syscalls)")):
        v = statistics.median(rows[name])
        print(f"{label:<44} {v:>10,.0f} {v / base:>6.2f} {1e9 / v - 1e9 / base:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
