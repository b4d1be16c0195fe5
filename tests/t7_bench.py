"""`curvefs bench`: the fio suite, its outputs, and the network-namespace environment.

- the counters arithmetic (kernel hit rate, round trips) on made-up snapshots;
- ``curvefs bench DIR``: a failing job is a FAILED row (exit 1), a job the target cannot
  prepare for (remount) is a NOT RUN row, counters that do not exist print n/a;
- ``NetEnv``: the namespace comes up, the tbf cap and the added latency are *measured*,
  and closing it leaves no namespace, veth or process;
- ``curvefs bench --env``: the whole suite on a real curvefs mount over S3 in the namespace
  beside a tmpfs baseline (every job ok; table, JSON and charts written; nothing left);
- Ctrl-C in the middle of ``--env`` tears everything down too.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curvefs_py.bench import envrun, netenv, suite  # noqa: E402
from curvefs_py.bench.systems import is_mounted  # noqa: E402

ROOT = os.geteuid() == 0
needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (namespaces, mounts)")
SMALL = ["--size", "4M", "--runtime", "0.5", "--nfiles", "30"]


def bench(*args: str, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run ``curvefs bench``; the result's ``pid`` names its namespaces (cfbench-<pid>-N)."""
    p = subprocess.Popen([sys.executable, "-m", "curvefs_py.cli.main", "bench", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or REPO)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        p.kill()
        p.wait()
        raise
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.pid = p.pid
    return r


def left_behind(pid: int, below: Path) -> list[str]:
    """Namespaces/links of the bench process ``pid`` and mounts below ``below`` still there
    (other bench runs on the machine are none of this test's business)."""
    left = netenv.leftovers()
    mine = [f"namespace {n}" for n in left["namespaces"] if n.startswith(f"cfbench-{pid}-")]
    mine += [f"link {x}" for x in left["links"] if x.startswith(f"cfb{pid % 100000}h")]
    return mine + [f"mount {m}" for m in envrun.mounts_below(below)]


def processes_mentioning(text: str) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            out.append(f"{d}: {cmd[:200]}")
    return out


# --- pure ---------------------------------------------------------------------------------

def test_derive_stats_from_counters():
    job = next(j for j in suite.JOBS if j.name == "rand_read_warm")
    before = {"kernel_bpf_available": 1, "kernel_fuse_requests_total": 100,
              "kernel_fuse_requests_READ": 10, "kernel_read_pages": 1000,
              "kernel_fuse_read_bytes": 40960}
    after = {"kernel_bpf_available": 1, "kernel_fuse_requests_total": 150,
             "kernel_fuse_requests_READ": 30, "kernel_read_pages": 2000,
             "kernel_fuse_read_bytes": 40960 + 100 * 4096}
    d = suite.derive_stats(before, after, job, ops=1000)
    assert d["rt_per_op"] == pytest.approx(0.05)
    assert d["kernel_hit"] == pytest.approx(0.9)          # 100 of 1000 pages from the daemon
    # the cost of reading the counters is subtracted
    d = suite.derive_stats(before, after, job, 1000, overhead={"kernel_fuse_requests_total": 10})
    assert d["rt_per_op"] == pytest.approx(0.04)
    # no counters: n/a (None), never 0
    assert suite.derive_stats(None, None, job, 1000)["kernel_hit"] is None
    # daemon-side counts only (no BPF): round trips yes, kernel hit rate unknown
    d = suite.derive_stats({"fuse_op_read_count": 1}, {"fuse_op_read_count": 11,
                                                      "fuse_op_getattr_count": 5}, job, 100)
    assert d["rt_per_op"] == pytest.approx(0.15) and d["kernel_hit"] is None


def test_parse_fio_output_and_select_jobs():
    with pytest.raises(ValueError):
        suite.select_jobs("seq_write,nonsense")
    assert [j.name for j in suite.select_jobs("stat_storm,seq_write")] == ["seq_write", "stat_storm"]
    for j in suite.JOBS:
        assert (suite.JOBS_DIR / f"{j.name}.fio").exists()


# --- the MOUNTPOINT form on plain directories --------------------------------------------

@needs_fio
@needs_root
def test_failed_and_not_run_jobs_are_reported(tmp_path):
    ro_src, ro = tmp_path / "src", tmp_path / "ro"
    ro_src.mkdir()
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro_src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        (ro_src / "curvefs-bench").mkdir()      # so only the job itself fails
        r = bench(str(ro), "--jobs", "seq_write", "--baseline", "none", "--out",
                  str(tmp_path / "out1"), "--no-stats", *SMALL)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert r.returncode == 1, r.stderr
    assert "FAILED" in r.stdout and "Read-only file system" in r.stdout
    doc = json.loads((tmp_path / "out1" / "results.json").read_text())
    assert [x["status"] for x in doc["results"]] == ["failed"]

    plain = tmp_path / "plain"
    plain.mkdir()
    r = bench(str(plain), "--jobs", "seq_write,rand_read_remount", "--baseline", "tmpfs",
              "--out", str(tmp_path / "out2"), *SMALL)
    assert r.returncode == 0, r.stderr
    rows = {(x["system"], x["job"]): x for x in
            json.loads((tmp_path / "out2" / "results.json").read_text())["results"]}
    mine = {j: x for (s, j), x in rows.items() if s != "tmpfs"}
    assert mine["seq_write"]["status"] == "ok" and mine["seq_write"]["ratio"]["tmpfs"] > 0
    assert mine["rand_read_remount"]["status"] == "not run"
    assert "remount" in mine["rand_read_remount"]["reason"]
    # a directory that is not a curvefs mount has no counters: n/a, not 0
    line = next(ln for ln in r.stdout.splitlines() if "seq_write" in ln and "tmpfs " not in ln[:6])
    assert "n/a" in line
    assert rows[("tmpfs", "rand_read_remount")]["status"] == "ok"   # drop_caches "remount"
    assert not list(plain.iterdir())                                # bench data removed


# --- the namespace environment -------------------------------------------------------------

@needs_root
def test_netenv_measured_bandwidth_and_latency_then_clean(tmp_path):
    pytest.importorskip("pyroute2")
    env = netenv.NetEnv(tmp_path / "ne", bandwidth="100mbit")
    with env:
        name, host_if = env.name, env.host_if
        pids = [p.pid for p in env.procs.values()]
        assert name in netenv.leftovers()["namespaces"]
        assert env.ns_ip.startswith("10.231.") and env.ns_ip != env.host_ip
        bw = env.measure_bandwidth(1.0)
        pids += [p.pid for p in env.procs.values()]
        # tbf at 100 Mbit/s on both ends: measured goodput just below the cap
        assert 60e6 < bw["up_bps"] < 110e6, bw
        assert 60e6 < bw["down_bps"] < 110e6, bw
        base = env.measure_latency(9)
        env.set_latency(30)
        slow = env.measure_latency(9)
        pids += [p.pid for p in env.procs.values()]
        added = slow["ttfb_ms"] - base["ttfb_ms"]
        assert 25 <= added <= 45, (base, slow, env.latency_mode)
        env.set_bandwidth("unlimited")
        fast = env.measure_bandwidth(0.5)
        assert fast["up_bps"] > 300e6, fast                       # the cap is really gone
        print(f"\nnetenv: 100mbit -> up {bw['up_bps'] / 1e6:.0f} / down {bw['down_bps'] / 1e6:.0f}"
              f" Mbit/s; uncapped up {fast['up_bps'] / 1e9:.1f} Gbit/s; ttfb {base['ttfb_ms']:.1f}"
              f" -> {slow['ttfb_ms']:.1f} ms with 30 ms via {env.latency_mode}")
    left = netenv.leftovers()
    assert name not in left["namespaces"] and host_if not in left["links"]
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    env.close()   # idempotent


def _curvefs_ready() -> bool:
    from curvefs_py.bench.systems import curvefs_commands
    return {"format", "mount", "umount"} <= curvefs_commands()


@needs_fio
@needs_root
def test_env_full_suite_on_curvefs_then_nothing_left(tmp_path):
    pytest.importorskip("pyroute2")
    pytest.importorskip("matplotlib")
    if not _curvefs_ready():
        pytest.skip("curvefs format/mount/umount not built yet")
    work, out = tmp_path / "work", tmp_path / "out"
    r = bench("--env", "--systems", "curvefs", "--bandwidth", "1gbit", "--latency", "5",
              "--baseline", "tmpfs", "--workdir", str(work), "--out", str(out), *SMALL,
              timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = doc["results"]
    assert {x["job"] for x in rows} == set(suite.JOB_NAMES)
    assert {(x["system"], x["status"]) for x in rows} == {("tmpfs", "ok"), ("curvefs", "ok")}, \
        [(x["system"], x["job"], x["reason"]) for x in rows if x["status"] != "ok"]
    cfs = {x["job"]: x for x in rows if x["system"] == "curvefs"}
    assert all(x["condition"] == "1gbit 5ms" and x["ratio"]["tmpfs"] > 0 for x in cfs.values())
    assert cfs["seq_write"]["value"] > 0 and cfs["stat_storm"]["p99_us"] > 0
    cond = doc["meta"]["environment"]["conditions"][0]
    assert cond["measured"]["up_bps"] > 0.2e9 and cond["measured"]["ttfb_ms"] >= 5
    for f in ("table.txt", "table.md", "throughput.png", "latency.png", "ratio.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "curvefs" in (out / "table.txt").read_text()
    assert len(list((out / "fio").glob("*.json"))) >= 2 * len(suite.JOBS)
    assert left_behind(r.pid, tmp_path) == []
    assert processes_mentioning(str(work)) == []


@needs_fio
@needs_root
def test_env_ctrl_c_tears_everything_down(tmp_path):
    pytest.importorskip("pyroute2")
    if not _curvefs_ready():
        pytest.skip("curvefs format/mount/umount not built yet")
    work = tmp_path / "work"
    log = open(tmp_path / "bench.log", "w+")
    p = subprocess.Popen([sys.executable, "-m", "curvefs_py.cli.main", "bench", "--env",
                          "--systems", "curvefs", "--baseline", "none", "--jobs",
                          "rand_read_warm,stat_storm", "--size", "4M", "--runtime", "20",
                          "--workdir", str(work), "--out", str(tmp_path / "out")],
                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        mnt = work / "curvefs" / "mnt"
        while not is_mounted(mnt):
            assert p.poll() is None, open(tmp_path / "bench.log").read()[-2000:]
            assert time.monotonic() < deadline, "no mount appeared"
            time.sleep(0.2)
        time.sleep(2)                       # fio is running on the mount now
        p.send_signal(signal.SIGINT)
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    log.seek(0)
    text = log.read()
    assert rc == 130, text[-2000:]
    assert "interrupted" in text
    assert left_behind(p.pid, tmp_path) == [], text[-2000:]
    assert processes_mentioning(str(work)) == []
