"""The benchmark suite: which fio jobs, in which cache state, on which targets.

A *job* is one ``benchmarks/<name>.fio`` file plus what must happen before it:

- ``fresh``   its directory is emptied (writes that must create their files);
- ``prepare`` fio lays out the job's files first (``--create_only=1``, not measured);
- ``warm``    ... and the runner reads them once, so kernel and file-system caches hold them;
- ``remount`` ... and the target is remounted (kernel caches gone, local disk cache kept);
- ``cold``    ... and the target is remounted with its local cache emptied (data from S3).

A *target* is a directory plus optional hooks: how to remount it, how to make it cold and
how to read its counters (``curvefs stats --json``).  A baseline directory (tmpfs, ext4)
"remounts" by dropping the kernel's caches.  A hook that a target lacks turns the jobs
that need it into ``not run`` rows with the reason; a job that fails is a ``failed`` row
with fio's error.  Nothing is skipped silently.

The fio jobs take their parameters from the environment (``BENCH_DIR``, ``SIZE``,
``RUNTIME``, ``NFILES``), as mountpoint-s3's do, so they also run by hand:
``BENCH_DIR=/mnt/x SIZE=64M RUNTIME=5 NFILES=1000 fio benchmarks/seq_write.fio``.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Optional

JOBS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
BENCH_SUBDIR = "curvefs-bench"


@dataclass(frozen=True)
class Job:
    name: str
    data: str          # sub-directory of <target>/curvefs-bench; jobs reading the same data share it
    before: str        # fresh | prepare | warm | remount | cold
    metric: str        # bw (bytes/s) | iops
    op: str            # read | write: which side of fio's JSON holds the numbers
    latency: str = "clat"   # clat: per-call latency; sync: the fsync latency
    hit: Optional[str] = None  # read | attr: which kernel hit rate applies
    time_based: bool = False


JOBS: list[Job] = [
    Job("seq_write", "seq_write", "fresh", "bw", "write"),
    Job("seq_read_cold", "seq_read", "cold", "bw", "read", hit="read"),
    Job("seq_read_warm", "seq_read", "warm", "bw", "read", hit="read"),
    Job("rand_read_warm", "rand_read", "warm", "iops", "read", hit="read", time_based=True),
    Job("rand_read_remount", "rand_read", "remount", "iops", "read", hit="read", time_based=True),
    Job("rand_read_cold", "rand_read", "cold", "iops", "read", hit="read", time_based=True),
    Job("rand_write_fsync", "rand_write", "fresh", "iops", "write", latency="sync", time_based=True),
    Job("small_files", "small_files", "fresh", "iops", "write"),
    Job("stat_storm", "stat_storm", "prepare", "iops", "read", hit="attr", time_based=True),
]
JOB_NAMES = [j.name for j in JOBS]


def select_jobs(spec: Optional[str]) -> list[Job]:
    """``None``/``all`` or a comma list of job names (order of the suite is kept)."""
    if not spec or spec == "all":
        return list(JOBS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in JOB_NAMES]
    if unknown:
        raise ValueError(f"unknown job(s) {', '.join(unknown)}; jobs: {', '.join(JOB_NAMES)}")
    return [j for j in JOBS if j.name in wanted]


@dataclass
class Params:
    size: str = "256M"       # fio size of the sequential/random files
    runtime: float = 10.0    # seconds (fractions allowed: fio gets milliseconds)
    nfiles: int = 1000       # small files / stat storm
    jobs_dir: Path = JOBS_DIR
    timeout_slack: float = 600.0   # added to 3 x runtime: only catches hangs (fio sets up files untimed)
    prepare_timeout: float = 900.0

    def fio_env(self, bench_dir: Path) -> dict:
        env = dict(os.environ)
        env.update(BENCH_DIR=str(bench_dir), SIZE=str(self.size),
                   RUNTIME=f"{max(1, round(self.runtime * 1000))}ms", NFILES=str(self.nfiles))
        return env


class NotSupported(Exception):
    """A target cannot do what a job needs (e.g. remount); the job is reported as not run."""


class Target:
    """A directory to benchmark. Subclasses override the hooks they can do."""

    kind = "mount"

    def __init__(self, name: str, path: Path, note: str = ""):
        self.name = name
        self.path = Path(path)
        self.note = note

    def remount(self) -> None:
        raise NotSupported(f"{self.name}: no way to remount {self.path} (see --remount-cmd)")

    def make_cold(self) -> None:
        raise NotSupported(f"{self.name}: no way to empty the caches of {self.path} (see --cold-cmd)")

    def stats(self) -> Optional[dict]:
        """Flat ``{name: number}`` counters, or None when the target has none."""
        return None

    def stats_reason(self) -> str:
        return "no counters for this target"


def drop_kernel_caches() -> None:
    """``sync`` + ``echo 3 > /proc/sys/vm/drop_caches`` (root only): page, dentry, inode caches."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise NotSupported(f"cannot drop the kernel's caches ({exc.strerror}; needs root)") from None


class LocalTarget(Target):
    """A local baseline directory: a remount is emulated by dropping the kernel's caches
    (what a remount does to a local file system's cached data)."""

    kind = "baseline"

    def remount(self) -> None:
        drop_kernel_caches()

    def make_cold(self) -> None:
        drop_kernel_caches()


def run_shell(cmd: str, what: str, timeout: float = 300) -> None:
    try:
        p = subprocess.run(cmd, shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} command timed out after {timeout:.0f}s: {cmd}") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{what} command failed ({p.returncode}): {cmd}: {tail[0]}")


class StatsReader:
    """Runs a ``... stats MOUNTPOINT --json`` command; remembers why it is unavailable.

    ``stats_file`` (``MOUNTPOINT/.stats``, ``name value`` lines -- the numbers that
    ``stats --json`` prints) is read instead while the CLI has no ``stats`` command."""

    def __init__(self, argv: list[str], timeout: float = 20, stats_file: Optional[Path] = None):
        self.argv = argv
        self.timeout = timeout
        self.stats_file = stats_file
        self.reason = ""
        self.source = ""

    def read(self) -> Optional[dict]:
        if self.reason:
            return None
        if self.source == "file":
            return self._read_file()
        try:
            p = subprocess.run(self.argv, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.reason = f"stats command failed: {exc}"
            return None
        if p.returncode != 0:
            msg = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            if "invalid choice" in msg and self.stats_file is not None and not self.source:
                self.source = "file"     # this CLI has no `stats` command yet
                return self._read_file()
            self.reason = f"`{' '.join(self.argv[-3:])}` failed: {msg[:160]}"
            return None
        try:
            self.source = "command"
            return flatten(json.loads(p.stdout))
        except ValueError:
            self.reason = "stats --json printed no JSON"
            return None

    def _read_file(self) -> Optional[dict]:
        try:
            with open(self.stats_file) as f:
                text = f.read()
        except OSError as exc:
            self.reason = f"no `stats` command and {self.stats_file}: {exc.strerror}"
            return None
        out = {}
        for line in text.splitlines():
            name, _, value = line.strip().partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
        if not out:
            self.reason = f"{self.stats_file} has no counters"
            return None
        return out


def flatten(obj, prefix: str = "") -> dict:
    """Nested JSON -> ``{"a.b.c": number}`` (numbers only; bools dropped)."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = obj
    return out


class CommandTarget(Target):
    """Any mounted directory, with user-given shell commands for remount / cold."""

    def __init__(self, name: str, path: Path, remount_cmd: str = "", cold_cmd: str = "",
                 stats_argv: Optional[list[str]] = None, note: str = "",
                 stats_file: Optional[Path] = None):
        super().__init__(name, path, note)
        self.remount_cmd = remount_cmd
        self.cold_cmd = cold_cmd
        self.stats_reader = StatsReader(stats_argv, stats_file=stats_file) if stats_argv else None

    def _fmt(self, cmd: str) -> str:
        return cmd.replace("{mnt}", shlex.quote(str(self.path)))

    def remount(self) -> None:
        if not self.remount_cmd:
            super().remount()
        run_shell(self._fmt(self.remount_cmd), "remount")

    def make_cold(self) -> None:
        if not self.cold_cmd:
            super().make_cold()
        run_shell(self._fmt(self.cold_cmd), "cold")

    def stats(self) -> Optional[dict]:
        return self.stats_reader.read() if self.stats_reader else None

    def stats_reason(self) -> str:
        if not self.stats_reader:
            return "no stats command"
        return self.stats_reader.reason or "stats unavailable"


# --------------------------------------------------------------------------------------------
# results


@dataclass
class JobResult:
    system: str
    job: str
    status: str                  # ok | failed | not run
    reason: str = ""
    metric: str = ""             # bw | iops
    value: float = 0.0           # bytes/s or ops/s
    p50_us: Optional[float] = None
    p99_us: Optional[float] = None
    ops: int = 0                 # fio I/O calls (+ fsyncs for the fsync job)
    runtime_s: float = 0.0
    kernel_hit: Optional[float] = None   # 0..1, None = n/a
    rt_per_op: Optional[float] = None    # daemon round trips per fio op, None = n/a
    stats_note: str = ""
    stats_delta: dict = field(default_factory=dict)
    fio: dict = field(default_factory=dict)
    condition: str = ""          # e.g. "1gbit 10ms" in the network environment
    kind: str = "mount"          # mount | baseline

    def to_json(self) -> dict:
        return asdict(self)


def parse_fio(doc: dict, job: Job) -> dict:
    """The numbers of one fio ``--output-format=json`` document for ``job``."""
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError("fio printed no job")
    j = jobs[0]
    side = j[job.op]
    if job.latency == "sync":
        lat = j.get("sync", {}).get("lat_ns", {})
    else:
        lat = side.get("clat_ns", {})
    pct = lat.get("percentile") or {}

    def p(key: str) -> Optional[float]:
        v = pct.get(key)
        return None if v is None else v / 1000.0

    ops = int(side.get("total_ios", 0))
    syncs = int(j.get("sync", {}).get("total_ios", 0) or 0)
    return {
        "error": int(j.get("error", 0)),
        "bw_bytes": float(side.get("bw_bytes", 0)),
        "iops": float(side.get("iops", 0)),
        "io_bytes": int(side.get("io_bytes", 0)),
        "ios": ops,
        "syncs": syncs,
        "runtime_ms": int(j.get("job_runtime", side.get("runtime", 0))),
        "p50_us": p("50.000000"),
        "p90_us": p("90.000000"),
        "p99_us": p("99.000000"),
        "p99.9_us": p("99.900000"),
        "mean_us": (lat.get("mean") or 0) / 1000.0,
        "usr_cpu": j.get("usr_cpu"),
        "sys_cpu": j.get("sys_cpu"),
    }


# --- counters -> kernel hit rate and daemon round trips --------------------------------------
# `curvefs stats --json` prints the daemon's metrics snapshot (DESIGN.md §6; names follow
# <layer>_<what>_<unit>).  The BPF side (kernel/loader.py) counts what the kernel did:
#   kernel_fuse_requests_total / _<OP>   requests that reached the daemon
#   kernel_read_calls                    read calls served by the page-cache path
#   kernel_stat_calls                    stat-family calls aimed at this mount
# and the daemon counts the requests it answered: fuse_op_<name>_count.
# A counter that is missing makes its column n/a, never 0.

REQ_TOTAL = "kernel_fuse_requests_total"
DAEMON_OP_PREFIX, DAEMON_OP_SUFFIX = "fuse_op_", "_count"


def _get(snap: dict, name: str) -> Optional[float]:
    """``name`` at the top level, else in a nested section (not an interval/rate one)."""
    if name in snap:
        return snap[name]
    for k, v in snap.items():
        if k.endswith("." + name) and not any(x in k for x in ("interval", "rate", "per_s")):
            return v
    return None


def _delta(before: dict, after: dict, name: str) -> Optional[float]:
    a = _get(after, name)
    if a is None:
        return None
    return a - (_get(before, name) or 0.0)


def _daemon_ops(snap: dict) -> dict:
    return {k.rsplit(".", 1)[-1]: v for k, v in snap.items()
            if k.rsplit(".", 1)[-1].startswith(DAEMON_OP_PREFIX) and k.endswith(DAEMON_OP_SUFFIX)
            and not any(x in k for x in ("interval", "rate", "per_s"))}


def _requests(before: dict, after: dict, op: Optional[str] = None) -> Optional[float]:
    """FUSE requests that reached the daemon (all, or of one opcode): BPF count if loaded,
    else the daemon's own per-handler counts."""
    if _get(after, "kernel_bpf_available"):
        return _delta(before, after, f"kernel_fuse_requests_{op.upper()}" if op else REQ_TOTAL) \
            or (0.0 if _get(after, REQ_TOTAL) is not None else None)
    ops_after = _daemon_ops(after)
    if not ops_after:
        return None
    ops_before = _daemon_ops(before)
    if op:
        key = f"{DAEMON_OP_PREFIX}{op.lower()}{DAEMON_OP_SUFFIX}"
        return ops_after.get(key, 0.0) - ops_before.get(key, 0.0)
    return sum(v - ops_before.get(k, 0.0) for k, v in ops_after.items())


def derive_stats(before: Optional[dict], after: Optional[dict], job: Job, ops: int,
                 overhead: Optional[dict] = None) -> dict:
    """``{kernel_hit, rt_per_op, delta}`` from two flat snapshots; None where unknown.

    ``overhead`` is the delta of two back-to-back snapshots (reading the counters through
    the mount costs a few requests of its own); it is subtracted from the job's delta."""
    out: dict = {"kernel_hit": None, "rt_per_op": None, "delta": {}}
    if before is None or after is None:
        return out
    if overhead:
        after = {k: (v - overhead.get(k, 0.0) if isinstance(v, (int, float)) else v)
                 for k, v in after.items()}
    out["delta"] = {k: after[k] - before.get(k, 0) for k in after
                    if isinstance(after[k], (int, float)) and "time_unix" not in k
                    and after[k] - before.get(k, 0) != 0 and "_us_bucket_" not in k}
    reqs = _requests(before, after)
    if reqs is not None and ops:
        out["rt_per_op"] = max(0.0, reqs) / ops
    bpf = bool(_get(after, "kernel_bpf_available"))
    if job.hit == "read" and bpf:
        # by pages: pages the readers asked the page cache for vs. pages the daemon sent
        # (READ replies); pages pushed ahead with notify_store count as hits
        pages = _delta(before, after, "kernel_read_pages")
        fetched = _delta(before, after, "kernel_fuse_read_bytes")
        if pages and fetched is not None:
            out["kernel_hit"] = min(1.0, max(0.0, 1.0 - (fetched / 4096.0) / pages))
    elif job.hit == "attr" and bpf:
        calls = _delta(before, after, "kernel_stat_calls")
        getattr_ = _requests(before, after, "getattr")
        lookup = _requests(before, after, "lookup")
        if calls and getattr_ is not None and lookup is not None:
            out["kernel_hit"] = max(0.0, 1.0 - (getattr_ + lookup) / calls)
    return out


# --------------------------------------------------------------------------------------------
# progress


class Progress:
    """One line per job on stderr; on a terminal the running line ticks every second."""

    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total = total
        self.n = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._label = ""
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _write(self, text: str, end: str = "\n") -> None:
        if self.quiet:
            return
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text + end)
            else:
                self.stream.write(text + end)
            self.stream.flush()

    def note(self, text: str) -> None:
        self._write(text)

    def start(self, label: str, expect_s: Optional[float] = None) -> None:
        self.n += 1
        self._label = f"[{self.n:>2}/{self.total}] {label}"
        self._t0 = time.monotonic()
        if not self.tty:
            self._write(self._label + " ...")
            return
        self._stop.clear()

        def tick():
            while not self._stop.wait(1.0):
                el = time.monotonic() - self._t0
                extra = f"/{expect_s:.0f}s" if expect_s else "s"
                self._write(f"{self._label}  {el:.0f}{extra}", end="")
        self._write(self._label, end="")
        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def done(self, text: str) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._write(f"{self._label}  {text}  ({time.monotonic() - self._t0:.1f}s)")


def fmt_value(metric: str, value: float) -> str:
    if metric == "bw":
        return f"{value / 2**20:.1f} MiB/s"
    if value >= 10000:
        return f"{value / 1000:.1f}k IOPS"
    return f"{value:.0f} IOPS"


# --------------------------------------------------------------------------------------------
# running


def _run_fio(jobfile: Path, env: dict, out_json: Path, timeout: float,
             extra: tuple[str, ...] = ()) -> tuple[Optional[dict], str]:
    """Run fio; return (json document or None, error text)."""
    argv = ["fio", "--output-format=json", f"--output={out_json}", *extra, str(jobfile)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    except FileNotFoundError:
        return None, "fio is not installed"
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, f"fio did not finish within {timeout:.0f}s (killed)"
    except BaseException:
        _kill_group(proc)
        raise
    doc = None
    if out_json.exists() and out_json.stat().st_size:
        text = out_json.read_text(errors="replace")
        start = text.find("{")
        try:
            doc = json.loads(text[start:]) if start >= 0 else None
        except ValueError:
            doc = None
    errs = [ln for ln in (err or "").splitlines() if ln.strip()]
    first = [ln for ln in errs if "err=" in ln or "error" in ln.lower()]
    if first:
        errs = first[:1]
    if proc.returncode != 0:
        return doc, (errs[-1] if errs else f"fio exited with {proc.returncode}")
    if doc is None:
        return None, (errs[-1] if errs else "fio wrote no JSON")
    return doc, ""


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_all(directory: Path) -> None:
    """Read every regular file below ``directory`` once (fills the caches for *warm* jobs)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass


def run_job(target: Target, job: Job, params: Params, workdir: Path,
            condition: str = "") -> JobResult:
    res = JobResult(system=target.name, job=job.name, status="failed", metric=job.metric,
                    kind=target.kind)
    jobfile = params.jobs_dir / f"{job.name}.fio"
    bench_dir = target.path / BENCH_SUBDIR / job.data
    env = params.fio_env(bench_dir)
    stem = f"{_safe(condition)}.{_safe(target.name)}" if condition else _safe(target.name)
    out_json = workdir / f"{stem}.{job.name}.json"
    try:
        if not jobfile.exists():
            raise RuntimeError(f"job file {jobfile} is missing")
        if job.before == "fresh" and bench_dir.exists():
            shutil.rmtree(bench_dir)
        bench_dir.mkdir(parents=True, exist_ok=True)
        if job.before != "fresh":
            doc, err = _run_fio(jobfile, env, out_json.with_suffix(".prep.json"),
                                params.prepare_timeout, ("--create_only=1",))
            if err:
                raise RuntimeError(f"laying out the files failed: {err}")
        if job.before == "warm":
            _read_all(bench_dir)
        elif job.before == "remount":
            target.remount()
        elif job.before == "cold":
            target.make_cold()
    except NotSupported as exc:
        res.status, res.reason = "not run", str(exc)
        return res
    except Exception as exc:
        res.reason = f"before the job: {exc}"
        return res
    before = target.stats()
    overhead = None
    if before is not None:          # what reading the counters costs by itself
        again = target.stats()
        if again is not None:
            overhead = {k: v - before.get(k, 0.0) for k, v in again.items()
                        if isinstance(v, (int, float)) and "time_unix" not in k}
            before = again
    doc, err = _run_fio(jobfile, env, out_json, params.runtime * 3 + params.timeout_slack)
    after = target.stats() if before is not None else None
    if doc is not None:
        res.fio = {"path": str(out_json)}
    if err:
        res.reason = err
        return res
    try:
        s = parse_fio(doc, job)
    except (KeyError, ValueError, TypeError) as exc:
        res.reason = f"cannot read fio's JSON: {exc}"
        return res
    res.fio = {**s, "path": str(out_json)}
    if s["error"]:
        res.reason = f"fio: {os.strerror(s['error'])} (errno {s['error']})"
        return res
    res.value = s["bw_bytes"] if job.metric == "bw" else s["iops"]
    res.p50_us, res.p99_us = s["p50_us"], s["p99_us"]
    res.ops = s["ios"] + (s["syncs"] if job.latency == "sync" else 0)
    res.runtime_s = s["runtime_ms"] / 1000.0
    if res.ops == 0:
        res.reason = "fio did no I/O"
        return res
    d = derive_stats(before, after, job, res.ops, overhead)
    res.kernel_hit, res.rt_per_op, res.stats_delta = d["kernel_hit"], d["rt_per_op"], d["delta"]
    if before is None:
        res.stats_note = target.stats_reason()
    res.status = "ok"
    return res


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_suite(targets: list[Target], jobs: list[Job], params: Params, workdir: Path,
              progress: Optional[Progress] = None, condition: str = "",
              keep_data: bool = False) -> list[JobResult]:
    """Every job on every target, in order; the data is removed afterwards."""
    results = []
    workdir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        try:
            for job in jobs:
                label = f"{target.name:<18} {job.name:<18}"
                if progress:
                    progress.start(label, params.runtime if job.time_based else None)
                r = run_job(target, job, params, workdir, condition)
                r.condition = condition
                results.append(r)
                if progress:
                    if r.status == "ok":
                        progress.done(fmt_value(r.metric, r.value))
                    else:
                        progress.done(f"{r.status.upper()}: {r.reason}")
        finally:
            if not keep_data:
                shutil.rmtree(target.path / BENCH_SUBDIR, ignore_errors=True)
    return results


def expected_seconds(jobs: list[Job], params: Params, n_targets: int) -> float:
    """A rough lower bound of the suite's duration (for the progress header)."""
    return n_targets * sum(params.runtime if j.time_based else 1 for j in jobs)


def new_workdir(base: Optional[Path] = None) -> Path:
    return Path(tempfile.mkdtemp(prefix="curvefs-bench-", dir=base))
