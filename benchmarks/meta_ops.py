"""Metadata operation rates through a mount, per metadata engine, beside a local directory.

Creates, stats, renames and unlinks ``--files`` small files (``--size`` bytes each,
default 0: pure metadata) with ``--threads`` threads (one directory each), on:

* ``local``     a directory on the local disk (the baseline; ext4 here);
* ``sqlite``    a curvefs mount, ``sqlite3://`` metadata (WAL, synchronous=FULL);
* ``postgres``  a curvefs mount, ``postgres://`` metadata on a throw-away local
                PostgreSQL 15 cluster with fsync and synchronous_commit on;
* ``redis``     (if asked for) ``redis://`` on a local redis-server (AOF, fsync always).

The mounts use the file object store and, unless ``--kernel-cache``, attr/entry
timeouts of 0, so every stat reaches the daemon and its engine.  Each phase is
timed over all threads; the median of ``--rounds`` rounds is printed as ops/s,
with the ratio to the local directory and postgres/sqlite.

Run as root (FUSE)::

    .venv/bin/python benchmarks/meta_ops.py [--files 2000] [--threads 1] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import servers  # noqa: E402
from mounthelper import Mount, cli  # noqa: E402

PHASES = ("create", "stat", "rename", "unlink")


def run_phase(dirs: list[str], files: int, op) -> float:
    """ops/s of ``op(dir, i)`` for i < files in every dir, one thread per dir."""
    barrier = threading.Barrier(len(dirs) + 1)
    errors: list[BaseException] = []

    def work(d: str) -> None:
        barrier.wait()
        try:
            for i in range(files):
                op(d, i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return len(dirs) * files / elapsed


def workload(root: str, files: int, threads: int, size: int, rnd: int) -> dict[str, float]:
    dirs = [os.path.join(root, f"r{rnd}-t{t}") for t in range(threads)]
    for d in dirs:
        os.mkdir(d)
    payload = os.urandom(size)

    def create(d, i):
        fd = os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        if payload:
            os.write(fd, payload)
        os.close(fd)

    ops = {
        "create": create,
        "stat": lambda d, i: os.stat(os.path.join(d, f"f{i}")),
        "rename": lambda d, i: os.rename(os.path.join(d, f"f{i}"), os.path.join(d, f"g{i}")),
        "unlink": lambda d, i: os.unlink(os.path.join(d, f"g{i}")),
    }
    out = {name: run_phase(dirs, files, ops[name]) for name in PHASES}
    for d in dirs:
        os.rmdir(d)
    return out


def measure(root: str, args) -> dict[str, float]:
    rounds = [workload(root, args.files, args.threads, args.size, r) for r in range(args.rounds)]
    return {p: statistics.median(r[p] for r in rounds) for p in PHASES}


def measure_mount(name: str, meta: str, work: str, args) -> tuple[dict[str, float], float]:
    cli("format", meta, "bench", "--storage", "file", "--bucket", os.path.join(work, f"{name}-objects"))
    opts = ["--no-bpf"] + ([] if args.kernel_cache else ["--attr-timeout", "0", "--entry-timeout", "0"])
    m = Mount(meta, os.path.join(work, f"{name}-mnt"), os.path.join(work, f"{name}-cache"),
              os.path.join(work, f"{name}.log"), opts).start()
    try:
        rates = measure(m.path, args)
        retries = m.stats().get("meta_txn_retries", 0)
    finally:
        m.stop()
    return rates, retries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=2000, help="files per thread and round (default 2000)")
    p.add_argument("--threads", type=int, default=1, help="threads, one directory each (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is printed (default 3)")
    p.add_argument("--size", type=int, default=0, help="bytes written into each new file (default 0)")
    p.add_argument("--engines", default="sqlite,postgres", help="comma list of sqlite, postgres, redis")
    p.add_argument("--kernel-cache", action="store_true", help="keep the default attr/entry timeouts (1 s)")
    p.add_argument("--workdir", default="/var/tmp", help="local-disk directory for everything (default /var/tmp)")
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    work = tempfile.mkdtemp(prefix="curvefs-metaops-", dir=args.workdir)
    results: dict[str, dict[str, float]] = {}
    retries: dict[str, float] = {}
    started = []
    try:
        local = os.path.join(work, "local")
        os.mkdir(local)
        results["local"] = measure(local, args)
        for name in engines:
            if name == "sqlite":
                meta = f"sqlite3://{work}/sqlite.db"
            elif name == "postgres":
                pg = servers.start_postgres(os.path.join(work, "pg"), durable=True)
                started.append(pg)
                meta = pg.new_database("bench")
            elif name == "redis":
                rd = servers.start_redis(os.path.join(work, "redis"))
                started.append(rd)
                meta = rd.url(1)
            else:
                p.error(f"unknown engine {name!r}")
            results[name], retries[name] = measure_mount(name, meta, work, args)
    finally:
        for srv in started:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    cols = ["local"] + engines
    print(f"# {args.files} files x {args.threads} thread(s), {args.size} B each, median of {args.rounds} "
          f"round(s); {'kernel cache on' if args.kernel_cache else 'attr/entry timeout 0'}; ops/s "
          "(x: fraction of local)")
    head = f"{'op':8}" + "".join(f"{c:>22}" for c in cols)
    if "sqlite" in engines and "postgres" in engines:
        head += f"{'postgres/sqlite':>17}"
    print(head)
    for ph in PHASES:
        line = f"{ph:8}{results['local'][ph]:>22,.0f}"
        for e in engines:
            r = results[e][ph]
            line += f"{r:>13,.0f} (x{r / results['local'][ph]:.3f})"
        if "sqlite" in engines and "postgres" in engines:
            line += f"{results['postgres'][ph] / results['sqlite'][ph]:>17.2f}"
        print(line)
    print("# meta_txn_retries: " + ", ".join(f"{e} {retries[e]:.0f}" for e in engines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
