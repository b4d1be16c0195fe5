#!/usr/bin/env python3
"""The kernel fast-path goals, measured against local baselines in the same run.

    .venv/bin/python benchmarks/fastpath.py [--size 64M] [--seq-size 1G] [--runtime 10] [--rounds 3]

Builds a tmpfs and an ext4 directory (baselines) and a curvefs volume (SQLite
metadata, data on a loopback S3 server, block cache on disk), then runs each
goal's fio job on the baseline and on the mount, alternating, ``--rounds``
times, and prints the median of each side and their ratio:

1. warm 4 KiB random reads (psync, 1 job, invalidate=0) vs tmpfs, and daemon
   READ requests per 1,000 reads (the daemon's ``.stats`` counter). The mount
   runs with its defaults: the per-read and per-stat BPF observers are attached
   only while somebody watches (``curvefs stats``), so two more numbers are
   reported: with them attached (as while ``curvefs stats`` runs: any program
   on the filemap tracepoint costs every page-cache read on the mount, tmpfs
   reads do not fire it), and with all BPF off (``--no-bpf``);
2. right after a remount (kernel cache empty, block cache warm): every 4 KiB
   block of the file once in random order, vs tmpfs, and vs the same volume
   mounted with the kernel fast path off (``--kernel-cache-budget 0
   --no-passthrough``: every read is a daemon READ); for information, once at
   the end, also after ``drop_caches`` (the host's page cache of the disk cache
   emptied too, so it is read from the disk);
3. stat of 1,000 cached files (fio ``filestat``) vs ext4;
4. sequential 1 MiB reads of a file held in the block cache (page cache
   dropped by fio's ``invalidate=1``) vs tmpfs; the file is read once first
   (that first read, through the daemon, is reported apart) so that its image
   exists, as it does for any file read before.  The goal is measured on one
   mount, ``--seq-idle`` seconds idle before each round (idle page cache is what
   proactive reclaim takes); each round above also reads it, seconds after the
   remounts of 1 and 2 (one of them without passthrough, so nothing holds the
   image): reported apart, with the bytes read from the disks meanwhile.

With FUSE passthrough (Linux >= 6.9) files read before are served by the kernel
from their image in the disk cache; ``--no-passthrough`` measures the
notify_store pusher alone.

Needs root (mounts) and fio.  Everything it mounts or starts is torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from curvefs_py.config import parse_size  # noqa: E402
from mounthelper import Mount, cli  # noqa: E402
import servers  # noqa: E402


def fio(args: list[str]) -> dict:
    r = subprocess.run(["fio", "--output-format=json", "--ioengine=psync", "--numjobs=1",
                        "--group_reporting"] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]


def randread(path: str, size: int, runtime: int) -> float:
    j = fio(["--name=rr", f"--filename={path}", "--rw=randread", "--bs=4k", f"--size={size}",
             f"--runtime={runtime}", "--time_based", "--invalidate=0"])
    return j["read"]["iops"]


def randread_once(path: str, size: int) -> float:
    """Every 4 KiB block of the file once, in random order (fio's random map):
    what a reader sees right after a remount, before anything is cached."""
    j = fio(["--name=ro", f"--filename={path}", "--rw=randread", "--bs=4k", f"--size={size}",
             "--invalidate=0"])
    return j["read"]["iops"]


def seqread(path: str, size: int) -> float:
    j = fio(["--name=sr", f"--filename={path}", "--rw=read", "--bs=1M", f"--size={size}",
             "--invalidate=1"])
    return j["read"]["bw_bytes"] / (1 << 20)


def disk_read_bytes() -> int:
    """Bytes read so far from the disks (block devices with a device behind them:
    not loop, zram or device-mapper), from /proc/diskstats (512-byte sectors)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if os.path.exists(f"/sys/block/{fields[2]}/device"):
                total += int(fields[5]) * 512
    return total


def statstorm(directory: str, runtime: int) -> float:
    j = fio(["--name=st", f"--directory={directory}", "--ioengine=filestat", "--nrfiles=1000",
             "--filesize=4k", "--openfiles=1", "--file_service_type=sequential",
             f"--runtime={runtime}", "--time_based", "--create_on_open=0"])
    return j["read"]["iops"]


def make_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M")
    ap.add_argument("--seq-size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    ap.add_argument("--no-passthrough", action="store_true", help="mount without FUSE passthrough (pusher only)")
    ap.add_argument("--image-hold", default=None, help="the mount's --image-hold (0: images not held)")
    ap.add_argument("--seq-idle", type=float, default=30.0, help="seconds idle before each sequential round")
    ap.add_argument("--keep-log", default=None, help="copy the daemon's log here")
    args = ap.parse_args()
    size, seq_size = parse_size(args.size), parse_size(args.seq_size)
    work = tempfile.mkdtemp(prefix="curvefs-fastpath-", dir="/var/tmp")
    tmpfs = os.path.join(work, "tmpfs")
    ext4 = os.path.join(work, "ext4")
    os.makedirs(tmpfs)
    os.makedirs(ext4)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={seq_size + size + (64 << 20)}", "tmpfs", tmpfs], check=True)
    s3 = servers.start_s3_server(os.path.join(work, "s3"))
    mounts: list[Mount] = []
    results: dict[str, dict] = {}
    try:
        bucket = s3.create_bucket("fastpath")
        meta = f"sqlite3://{work}/vol.db"
        cli("format", meta, "fastpath", "--storage", "s3", "--bucket", bucket,
            "--access-key", s3.access_key, "--secret-key", s3.secret_key)
        cache = os.path.join(work, "cache")
        opts = ["--attr-timeout", "60", "--entry-timeout", "60"]
        if args.no_passthrough:
            opts.append("--no-passthrough")
        if args.image_hold is not None:
            opts += ["--image-hold", args.image_hold]
        m = Mount(meta, os.path.join(work, "mnt"), cache, os.path.join(work, "mnt.log"), opts)
        m.start()
        mounts.append(m)
        # data: the same files on tmpfs and on the mount
        for d in (tmpfs, m.path):
            make_file(os.path.join(d, "rand"), size)
            make_file(os.path.join(d, "seq"), seq_size)
        os.makedirs(os.path.join(m.path, "stats"))
        os.makedirs(os.path.join(ext4, "stats"))
        for d in (os.path.join(m.path, "stats"), os.path.join(ext4, "stats")):
            subprocess.run(["fio", "--name=st", f"--directory={d}", "--nrfiles=1000", "--filesize=4k",
                            "--create_only=1", "--rw=write", "--bs=4k"], check=True, capture_output=True)
        time.sleep(1)
        # the first sequential read after writing: through the daemon (no image yet)
        subprocess.run(["sync"])

        def remount(*extra: str) -> None:
            m.stop()
            m.options = opts + list(extra)
            m.start()
            time.sleep(4)  # let the BPF side car load (it shares the 2 cores)

        remount()
        first_seq = seqread(os.path.join(m.path, "seq"), seq_size)
        deadline = time.monotonic() + 120
        while not args.no_passthrough and time.monotonic() < deadline and m.stats().get("image_builds", 0) < 1:
            time.sleep(0.5)  # its image is assembled in the background
        rows = {k: ([], []) for k in ("warm", "warm_observed", "warm_nobpf", "remount", "remount_nopush", "remount_dropped",
                                      "stat", "seq_remount", "seq")}
        reads_per_1000 = []
        for rnd in range(args.rounds):
            # 1. warm random reads
            rows["warm"][0].append(randread(os.path.join(tmpfs, "rand"), size, args.runtime))
            with open(os.path.join(m.path, "rand"), "rb") as f:
                while f.read(1 << 20):
                    pass
            before = m.stats()
            iops = randread(os.path.join(m.path, "rand"), size, args.runtime)
            after = m.stats()
            rows["warm"][1].append(iops)
            n_reads = iops * args.runtime
            reads_per_1000.append(1000 * (after.get("fuse_op_read_count", 0) - before.get("fuse_op_read_count", 0)) / max(n_reads, 1))
            m.observe(600)  # as while `curvefs stats` runs
            rows["warm_observed"][1].append(randread(os.path.join(m.path, "rand"), size, args.runtime))
            remount("--no-bpf")
            with open(os.path.join(m.path, "rand"), "rb") as f:
                while f.read(1 << 20):
                    pass
            rows["warm_nobpf"][1].append(randread(os.path.join(m.path, "rand"), size, args.runtime))
            # 2. right after a remount, pushing on and off
            remount()
            rows["remount"][0].append(randread_once(os.path.join(tmpfs, "rand"), size))
            rows["remount"][1].append(randread_once(os.path.join(m.path, "rand"), size))
            remount("--kernel-cache-budget", "0", "--no-passthrough")
            rows["remount_nopush"][1].append(randread_once(os.path.join(m.path, "rand"), size))
            remount()
            # 3. stat storm over 1,000 cached files
            rows["stat"][0].append(statstorm(os.path.join(ext4, "stats"), args.runtime))
            statstorm(os.path.join(m.path, "stats"), 1)  # fill the attr/entry caches
            rows["stat"][1].append(statstorm(os.path.join(m.path, "stats"), args.runtime))
            # 4. sequential read of a block-cached file (fio drops its pages first)
            rows["seq_remount"][0].append(seqread(os.path.join(tmpfs, "seq"), seq_size))
            before, disk = m.stats(), disk_read_bytes()
            rows["seq_remount"][1].append(seqread(os.path.join(m.path, "seq"), seq_size))
            after, disk = m.stats(), disk_read_bytes() - disk
            pt = after.get("passthrough_opens", 0) - before.get("passthrough_opens", 0)
            print(f"round {rnd + 1}/{args.rounds} done: " + ", ".join(
                f"{k} {v[1][-1]:,.0f}" + (f"/{v[0][-1]:,.0f}" if v[0] else "") for k, v in rows.items() if v[1])
                + f"; passthrough opens in the seq read: {pt:.0f}, read from disks meanwhile: "
                f"{disk / (1 << 20):,.0f} MiB", file=sys.stderr)
        # 4. the sequential goal: one mount, idle before each round
        remount()
        for rnd in range(args.rounds):
            time.sleep(args.seq_idle)
            rows["seq"][0].append(seqread(os.path.join(tmpfs, "seq"), seq_size))
            disk = disk_read_bytes()
            rows["seq"][1].append(seqread(os.path.join(m.path, "seq"), seq_size))
            disk = disk_read_bytes() - disk
            print(f"seq round {rnd + 1}/{args.rounds}: {rows['seq'][1][-1]:,.0f}/{rows['seq'][0][-1]:,.0f} MiB/s, "
                  f"read from disks meanwhile: {disk / (1 << 20):,.0f} MiB", file=sys.stderr)
        # for information, once at the end: the host's page cache emptied too, so the
        # disk cache (images, blocks) is read from the disk itself
        remount()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        rows["remount_dropped"][1].append(randread_once(os.path.join(m.path, "rand"), size))
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        dropped_seq = seqread(os.path.join(m.path, "seq"), seq_size)

        med = {k: (statistics.median(a) if a else None, statistics.median(b)) for k, (a, b) in rows.items()}
        results = {
            "warm_randread_4k": {"curvefs_iops": med["warm"][1], "tmpfs_iops": med["warm"][0],
                                 "ratio": med["warm"][1] / med["warm"][0], "goal": 0.9,
                                 "daemon_reads_per_1000": statistics.median(reads_per_1000), "goal_reads": 1,
                                 "observed_iops": med["warm_observed"][1],
                                 "observed_ratio": med["warm_observed"][1] / med["warm"][0],
                                 "bpf_off_iops": med["warm_nobpf"][1],
                                 "bpf_off_ratio": med["warm_nobpf"][1] / med["warm"][0]},
            "remount_randread_4k": {"curvefs_iops": med["remount"][1], "tmpfs_iops": med["remount"][0],
                                    "ratio": med["remount"][1] / med["remount"][0], "goal": 0.8,
                                    "pushing_off_iops": med["remount_nopush"][1],
                                    "vs_pushing_off": med["remount"][1] / med["remount_nopush"][1], "goal_vs_off": 10,
                                    "after_drop_caches_iops": med["remount_dropped"][1]},
            "stat_1000_cached": {"curvefs_stats_per_s": med["stat"][1], "ext4_stats_per_s": med["stat"][0],
                                 "ratio": med["stat"][1] / med["stat"][0], "goal": 0.8},
            "seqread_block_cached": {"curvefs_mib_s": med["seq"][1], "tmpfs_mib_s": med["seq"][0],
                                     "ratio": med["seq"][1] / med["seq"][0], "goal": 0.8,
                                     "first_read_mib_s": first_seq, "after_drop_caches_mib_s": dropped_seq,
                                     "after_remounts_mib_s": med["seq_remount"][1],
                                     "after_remounts_ratio": med["seq_remount"][1] / med["seq_remount"][0]},
        }
    finally:
        for mm in mounts:
            try:
                st = mm.stats()
                print("daemon:", {k: v for k, v in st.items() if k.startswith(("image_", "passthrough_"))},
                      file=sys.stderr)
                mm.stop()
            except Exception as exc:
                print(f"unmount: {exc}", file=sys.stderr)
                mm.kill()
            if args.keep_log:
                shutil.copy(mm.log_file, args.keep_log)
        s3.stop()
        subprocess.run(["umount", tmpfs])
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'goal':<24} {'curvefs':>12} {'baseline':>12} {'ratio':>7} {'target':>7}")
    r = results
    print(f"{'warm 4K randread':<24} {r['warm_randread_4k']['curvefs_iops']:>12,.0f} {r['warm_randread_4k']['tmpfs_iops']:>12,.0f} "
          f"{r['warm_randread_4k']['ratio']:>7.2f} {'>=0.90':>7}  (tmpfs IOPS; daemon READs per 1000: {r['warm_randread_4k']['daemon_reads_per_1000']:.3f}, target <= 1; "
          f"while `curvefs stats` watches: {r['warm_randread_4k']['observed_iops']:,.0f} = {r['warm_randread_4k']['observed_ratio']:.2f}x; "
          f"BPF off: {r['warm_randread_4k']['bpf_off_iops']:,.0f} = {r['warm_randread_4k']['bpf_off_ratio']:.2f}x)")
    print(f"{'after remount':<24} {r['remount_randread_4k']['curvefs_iops']:>12,.0f} {r['remount_randread_4k']['tmpfs_iops']:>12,.0f} "
          f"{r['remount_randread_4k']['ratio']:>7.2f} {'>=0.80':>7}  (vs pushing off {r['remount_randread_4k']['pushing_off_iops']:,.0f} IOPS: "
          f"{r['remount_randread_4k']['vs_pushing_off']:.1f}x, target >= 10x; after drop_caches "
          f"{r['remount_randread_4k']['after_drop_caches_iops']:,.0f} IOPS)")
    print(f"{'stat 1000 cached files':<24} {r['stat_1000_cached']['curvefs_stats_per_s']:>12,.0f} {r['stat_1000_cached']['ext4_stats_per_s']:>12,.0f} "
          f"{r['stat_1000_cached']['ratio']:>7.2f} {'>=0.80':>7}  (ext4 stats/s)")
    print(f"{'seq read, block-cached':<24} {r['seqread_block_cached']['curvefs_mib_s']:>12,.0f} {r['seqread_block_cached']['tmpfs_mib_s']:>12,.0f} "
          f"{r['seqread_block_cached']['ratio']:>7.2f} {'>=0.80':>7}  (tmpfs MiB/s; seconds after remounts "
          f"{r['seqread_block_cached']['after_remounts_mib_s']:,.0f} MiB/s = "
          f"{r['seqread_block_cached']['after_remounts_ratio']:.2f}x; first read after writing, "
          f"through the daemon: {r['seqread_block_cached']['first_read_mib_s']:,.0f} MiB/s; after drop_caches "
          f"{r['seqread_block_cached']['after_drop_caches_mib_s']:,.0f} MiB/s)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"results": results, "rounds": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
