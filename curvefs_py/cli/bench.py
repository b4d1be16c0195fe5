"""``curvefs bench``: the fio suite on a mount beside local baselines; table, JSON, charts.

Two forms:

- ``curvefs bench MOUNTPOINT``: an existing mount (curvefs or any directory).  Remount and
  cold jobs need ``--remount-cmd`` / ``--cold-cmd`` (shell; ``{mnt}`` is replaced by the
  mount point); without them those jobs are reported as not run.  Counters come from
  ``curvefs stats MOUNTPOINT --json`` when that works, else the columns say n/a.
- ``curvefs bench --env``: the complete environment -- an S3 server in its own network
  namespace behind a veth pair, bandwidth caps and object-storage latency, a fresh curvefs
  volume (and the systems of ``--systems``), every combination measured, all torn down.

Outputs in ``--out``: ``table.txt``, ``table.md``, ``results.json``, ``throughput.png``,
``latency.png``, ``ratio.png`` and fio's JSON per job.  Exit status 0 when every job ran,
1 when a job failed (the table says which and why), 2 for bad arguments, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import QuietError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="fio benchmarks: a mount beside a local baseline (or a whole S3 environment)",
        description=__doc__.split("\n\n")[0].replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  curvefs bench /mnt/cfs --size 1G --runtime 30\n"
               "  curvefs bench --env --bandwidth 1gbit,10gbit --latency 0,10,30 --systems curvefs,s3fs\n"
               "  curvefs bench --cleanup        # remove namespaces left by a killed run")
    p.add_argument("mountpoint", nargs="?", help="directory to benchmark (omit with --env)")
    p.add_argument("--env", action="store_true",
                   help="build the S3-in-a-namespace environment, mount, run, tear down")
    p.add_argument("--size", default="256M", help="file size of the sequential/random jobs (256M)")
    p.add_argument("--runtime", type=float, default=10, help="seconds per job (10; fractions ok)")
    p.add_argument("--nfiles", type=int, default=1000, help="files of small_files/stat_storm (1000)")
    p.add_argument("--jobs", default="all", help="comma list of jobs (default all): "
                   "seq_write,seq_read_cold,seq_read_warm,rand_read_warm,rand_read_remount,"
                   "rand_read_cold,rand_write_fsync,small_files,stat_storm")
    p.add_argument("--baseline", default="tmpfs,ext4",
                   help="comma list: tmpfs, ext4 and/or directories; 'none' for no baseline")
    p.add_argument("--out", help="output directory (default ./bench-results/<time>)")
    p.add_argument("--workdir", help="scratch directory of --env (default: a temp dir, removed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group("MOUNTPOINT form")
    g.add_argument("--name", help="label of the mount in the table (default: its file system type)")
    g.add_argument("--remount-cmd", default="", help="shell command that remounts {mnt}")
    g.add_argument("--cold-cmd", default="", help="shell command that remounts {mnt} with empty caches")
    g.add_argument("--no-stats", action="store_true", help="do not call `curvefs stats --json`")
    e = p.add_argument_group("--env form")
    e.add_argument("--bandwidth", default="1gbit", help="comma list of link caps, e.g. 1gbit,10gbit "
                   "(tbf on both veth ends; 'unlimited' for none)")
    e.add_argument("--latency", default="10",
                   help="comma list of added ms to first byte per request, e.g. 0,10,30")
    e.add_argument("--latency-via", choices=["auto", "netem", "proxy"], default="auto",
                   help="netem qdisc where the kernel has it (auto), else a delay proxy")
    e.add_argument("--systems", default="curvefs",
                   help="comma list of curvefs, s3fs, rclone, juicefs (same server and network)")
    e.add_argument("--curvefs-mount-opts", default="", help="extra `curvefs mount` options")
    p.add_argument("--cleanup", action="store_true",
                   help="remove namespaces/links of killed bench runs, then exit")
    p.set_defaults(func=run)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _command_line(args) -> str:
    if len(sys.argv) > 1 and "bench" in sys.argv[1:3]:
        return shlex.join(["curvefs", *sys.argv[1:]])
    return "curvefs bench " + " ".join(getattr(args, "_argv", []))


def run(args) -> int:
    from ..bench import envrun, netenv, report, suite
    from ..bench.systems import SYSTEMS

    if args.cleanup:
        removed = netenv.cleanup_stale()
        print(f"removed: {', '.join(removed)}" if removed else "nothing to clean up")
        return 0
    if bool(args.mountpoint) == bool(args.env):
        raise QuietError("give either MOUNTPOINT or --env", 2)
    if not shutil.which("fio"):
        raise QuietError("fio is not installed (apt-get install fio)", 1)
    try:
        jobs = suite.select_jobs(args.jobs)
    except ValueError as exc:
        raise QuietError(str(exc), 2) from None
    if not args.runtime > 0 or args.nfiles < 1:
        raise QuietError("--runtime must be > 0 and --nfiles >= 1", 2)
    try:
        envrun.size_bytes(args.size)
    except ValueError:
        raise QuietError(f"bad --size {args.size!r} (e.g. 64M, 1G)", 2) from None
    baselines = [] if args.baseline.strip() == "none" else _csv(args.baseline)
    params = suite.Params(size=args.size, runtime=args.runtime, nfiles=args.nfiles)
    out = Path(args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuietError(f"--out {out}: {exc.strerror}", 3) from None
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    progress_factory = lambda n: suite.Progress(n, quiet=args.quiet)  # noqa: E731
    meta = {"command": _command_line(args), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": report.machine_facts(),
            "params": {"size": args.size, "runtime_s": args.runtime, "nfiles": args.nfiles,
                       "jobs": [j.name for j in jobs]}}
    t0 = time.monotonic()
    own_workdir = not args.workdir
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="curvefs-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.env:
            results, facts = _run_env(args, params, jobs, baselines, workdir, progress_factory, log,
                                      SYSTEMS)
            meta["environment"] = facts
        else:
            results, facts = _run_mount(args, params, jobs, baselines, workdir, progress_factory)
            meta["mount"] = facts
        _keep_fio_json(results, out / "fio")
    finally:
        if own_workdir:
            left = envrun.mounts_below(workdir)
            if left:   # never rmtree into a mount that failed to go away
                print(f"curvefs bench: left {workdir} in place: still mounted: {', '.join(left)}",
                      file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - t0, 1)
    text = report.render_text(results)
    (out / "table.txt").write_text(text)
    (out / "table.md").write_text(report.render_markdown(results))
    report.write_json(out / "results.json", results, meta)
    (out / "summary.md").write_text(report.render_summary_md(results, meta))
    try:
        charts = report.write_charts(out, results)
    except ImportError:
        charts = []
        print("curvefs bench: no charts: matplotlib is not installed", file=sys.stderr)
    print(text, end="")
    counts = report.summary_counts(results)
    files = ["results.json", "summary.md", "table.txt", "table.md"] + [p.name for p in charts]
    print(f"\n{counts['ok']} ok, {counts['failed']} failed, {counts['not run']} not run in "
          f"{meta['duration_s']:.0f}s; written: {out}/ ({', '.join(files)})")
    return 1 if counts["failed"] else 0


def _keep_fio_json(results, fio_dir: Path) -> None:
    """Copy fio's own JSON next to ours (the scratch directory is removed) and point to it."""
    fio_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        src = r.fio.get("path") if isinstance(r.fio, dict) else None
        if src and os.path.exists(src):
            dst = fio_dir / os.path.basename(src)
            shutil.copy(src, dst)
            r.fio["path"] = str(dst)


def _run_mount(args, params, jobs, baselines, workdir, progress_factory):
    from ..bench import envrun, suite
    from ..bench.systems import curvefs_argv, is_mounted

    mnt = Path(args.mountpoint)
    if not mnt.is_dir():
        raise QuietError(f"{mnt} is not a directory", 6)
    kind = envrun.fs_type(mnt)
    name = args.name or (kind.replace("fuse.", "") if is_mounted(mnt) else "dir") or "mount"
    if name in baselines or name in ("tmpfs", "ext4"):
        name = f"{name} (mount)"   # the baseline rows carry the plain name
    stats_argv = None if args.no_stats else curvefs_argv("stats", str(mnt), "--json")
    target = suite.CommandTarget(name, mnt, args.remount_cmd, args.cold_cmd, stats_argv,
                                 stats_file=mnt / ".stats")
    facts = {"path": str(mnt), "fs": kind, "label": name}
    try:
        with envrun.signals_as_interrupt(), \
                envrun.Baselines(workdir, baselines, envrun.size_bytes(params.size)) as base:
            progress = progress_factory(len(jobs) * (1 + len(base.targets)))
            results = suite.run_suite(base.targets + [target], jobs, params, workdir / "fio",
                                      progress)
    except RuntimeError as exc:
        raise QuietError(str(exc), 1) from None
    if target.stats_reader and target.stats_reader.reason:
        facts["stats"] = target.stats_reader.reason
    return results, facts


def _run_env(args, params, jobs, baselines, workdir, progress_factory, log, SYSTEMS):
    from ..bench import envrun, netenv

    if os.geteuid() != 0:
        raise QuietError("--env needs root (network namespaces, qdiscs, mounts)", 1)
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        raise QuietError("--env needs pyroute2 (pip install pyroute2)", 1) from None
    systems = _csv(args.systems)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise QuietError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}", 2)
    try:
        bandwidths = _csv(args.bandwidth)
        for b in bandwidths:
            netenv.parse_rate(b)
        latencies = [float(x) for x in _csv(args.latency)]
    except ValueError:
        raise QuietError("bad --bandwidth/--latency (e.g. --bandwidth 1gbit,10gbit --latency 0,10,30)",
                         2) from None
    if any(x < 0 for x in latencies) or not latencies or not bandwidths:
        raise QuietError("--latency values must be >= 0", 2)
    try:
        return envrun.run_env(workdir=workdir, params=params, jobs=jobs, baselines=baselines,
                              systems=systems, bandwidths=bandwidths, latencies=latencies,
                              latency_via=args.latency_via,
                              curvefs_mount_opts=args.curvefs_mount_opts,
                              progress_factory=progress_factory, log=log)
    except netenv.NetEnvError as exc:
        raise QuietError(f"network environment: {exc}", 1) from None
