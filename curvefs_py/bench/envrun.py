"""Baselines, and the complete environment in one command (``curvefs bench --env``).

``Baselines`` makes the local directories fio runs on beside the mount: ``tmpfs`` (a tmpfs
we mount, or a directory in /dev/shm without root), ``ext4`` (a directory on an ext4 file
system, or an ext4 image on a loop device we mount) or any directory given by path.

``run_env`` does, in order, with every step undone in ``finally`` (also on an exception,
Ctrl-C, SIGTERM or SIGHUP -- those two are turned into ``KeyboardInterrupt``):

1. remove what a killed earlier run left (namespaces of dead pids);
2. the suite on the baselines (their numbers do not depend on the network);
3. a ``NetEnv``: S3 server in its own namespace behind a veth pair;
4. per system (curvefs, then the ones to compare): a bucket and a volume on it;
5. per bandwidth x latency: set the qdiscs / delay, *measure* the link (TCP goodput both
   ways, time to first byte), then per system: mount, the suite, unmount;
6. unmount everything still mounted, close the namespace, unmount the baselines.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

from . import netenv, suite
from .systems import SYSTEMS, force_unmount, is_mounted


def fs_type(path: Path) -> str:
    p = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4]
            fstype = parts[parts.index("-") + 1]
            if (p == mp or p.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, fstype
    return kind


class Baselines(contextlib.ExitStack):
    """``with Baselines(workdir, ["tmpfs", "ext4"]) as b: b.targets``"""

    def __init__(self, workdir: Path, specs: list[str], size_hint_bytes: int = 1 << 30):
        super().__init__()
        self.workdir = Path(workdir)
        self.specs = specs
        self.size_hint = size_hint_bytes
        self.targets: list[suite.Target] = []
        self._owner = os.getpid()

    def __enter__(self):
        super().__enter__()
        try:
            for spec in self.specs:
                self.targets.append(self._make(spec))
        except BaseException:
            self.close()
            raise
        return self

    def _mount(self, argv: list[str], mnt: Path) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        self.callback(self._umount, mnt)

    def _umount(self, mnt: Path) -> None:
        if os.getpid() != self._owner:
            return
        if is_mounted(mnt):
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
        force_unmount(mnt)

    def _make(self, spec: str) -> suite.Target:
        root = os.geteuid() == 0
        if spec == "tmpfs":
            mnt = self.workdir / "baseline-tmpfs"
            mnt.mkdir(parents=True, exist_ok=True)
            if root:
                self._mount(["mount", "-t", "tmpfs", "-o", "size=75%,mode=0755", "curvefs-bench",
                             str(mnt)], mnt)
                return suite.LocalTarget("tmpfs", mnt)
            d = Path(tempfile.mkdtemp(prefix="curvefs-bench-", dir="/dev/shm"))
            self.callback(shutil.rmtree, d, True)
            return suite.LocalTarget("tmpfs", d)
        if spec == "ext4":
            d = self.workdir / "baseline-ext4"
            d.mkdir(parents=True, exist_ok=True)
            if fs_type(d) == "ext4":
                return suite.LocalTarget("ext4", d, note=f"directory on the ext4 of {d}")
            if not root:
                raise RuntimeError(f"{self.workdir} is not on ext4 and making an ext4 image needs root")
            img = self.workdir / "baseline-ext4.img"
            with open(img, "wb") as f:
                f.truncate(max(4 * self.size_hint, 2 << 30))
            self.callback(lambda: img.unlink(missing_ok=True))
            subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True,
                           timeout=120)
            self._mount(["mount", "-o", "loop", str(img), str(d)], d)
            return suite.LocalTarget("ext4", d, note="ext4 image on a loop device")
        path = Path(spec)
        if not path.is_dir():
            raise RuntimeError(f"baseline {spec!r} is neither tmpfs, ext4 nor a directory")
        return suite.LocalTarget(path.name or str(path), path, note=fs_type(path))


def size_bytes(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


@contextlib.contextmanager
def signals_as_interrupt():
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so every
    ``finally`` and ``__exit__`` tears down what it set up.

    Only in *this* process: pyroute2 forks it (without exec) to enter a namespace, and the
    fork inherits the handler and the whole Python stack; a Ctrl-C to the process group
    would otherwise unwind the copy and run our cleanups twice, killing the parent's
    servers in the middle of the run.  A forked copy just exits."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _not_run(system: str, condition: str, reason: str, status: str, jobs) -> list[suite.JobResult]:
    return [suite.JobResult(system=system, job=j.name, status=status, reason=reason,
                            metric=j.metric, condition=condition) for j in jobs]


def run_env(*, workdir: Path, params: suite.Params, jobs: list[suite.Job], baselines: list[str],
            systems: list[str], bandwidths: list[str], latencies: list[float],
            latency_via: str = "auto", curvefs_mount_opts: str = "",
            progress_factory: Callable[[int], suite.Progress] = suite.Progress,
            log: Callable[[str], None] = print) -> tuple[list[suite.JobResult], dict]:
    """See the module docstring.  Returns (results, facts about the environment)."""
    results: list[suite.JobResult] = []
    facts: dict = {"conditions": [], "systems": {}, "baselines": {}}
    removed = netenv.cleanup_stale()
    if removed:
        log(f"removed leftovers of killed runs: {', '.join(removed)}")
    n_cond = len(bandwidths) * len(latencies)
    total = len(jobs) * (len(baselines) + n_cond * len(systems))
    progress = progress_factory(total)
    with signals_as_interrupt(), contextlib.ExitStack() as stack:
        base = stack.enter_context(Baselines(workdir, baselines, size_bytes(params.size)))
        for t in base.targets:
            facts["baselines"][t.name] = {"path": str(t.path), "fs": fs_type(t.path), "note": t.note}
        results += suite.run_suite(base.targets, jobs, params, workdir / "fio", progress)

        env = stack.enter_context(netenv.NetEnv(workdir / "netenv", latency_via=latency_via))
        facts["endpoint"] = env.endpoint
        facts["namespace"] = env.name
        live: list = []
        for name in systems:
            sysobj = SYSTEMS[name](workdir, env.endpoint, f"bench-{name}", env.access_key,
                                   env.secret_key, **({"mount_opts": curvefs_mount_opts}
                                                      if name == "curvefs" else {}))
            stack.callback(sysobj.unmount)          # also on failure / Ctrl-C
            why = sysobj.missing()
            if why:
                facts["systems"][name] = {"missing": why}
                live.append((sysobj, f"not installed: {why}", "not run"))
                continue
            try:
                env.create_bucket(sysobj.bucket)
                sysobj.setup()
                facts["systems"][name] = {"version": sysobj.version(),
                                          "mount": " ".join(sysobj.mount_argv())}
                live.append((sysobj, "", ""))
            except Exception as exc:
                facts["systems"][name] = {"setup_error": str(exc)}
                live.append((sysobj, f"setup failed: {exc}", "failed"))
        for bw in bandwidths:
            for lat in latencies:
                env.set_bandwidth(bw)
                env.set_latency(lat)
                cond = f"{netenv.rate_label(env.bandwidth)} {lat:g}ms"
                measured = env.measure_bandwidth(1.0)
                measured.update(env.measure_latency())
                facts["conditions"].append({"condition": cond, "bandwidth": bw, "latency_ms": lat,
                                            "latency_mode": env.latency_mode,
                                            "measured": measured})
                progress.note(f"network {cond}: measured up {measured['up_bps'] / 1e9:.2f} Gbit/s, "
                              f"down {measured['down_bps'] / 1e9:.2f} Gbit/s, time to first byte "
                              f"{measured['ttfb_ms']:.1f} ms (latency via {env.latency_mode})")
                for sysobj, why, status in live:
                    if why:
                        results += _not_run(sysobj.name, cond, why, status, jobs)
                        progress.n += len(jobs)
                        continue
                    try:
                        sysobj.mount()
                    except Exception as exc:
                        results += _not_run(sysobj.name, cond, f"mount failed: {exc}", "failed", jobs)
                        progress.n += len(jobs)
                        continue
                    target = sysobj.target(sysobj.name)
                    try:
                        results += suite.run_suite([target], jobs, params, workdir / "fio",
                                                   progress, condition=cond)
                    finally:
                        try:
                            sysobj.unmount()
                        except Exception as exc:
                            facts.setdefault("errors", []).append(f"{cond} {sysobj.name}: {exc}")
                            progress.note(f"warning: {exc}")
    return results, facts


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    w = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == w or mp.startswith(w.rstrip("/") + "/"):
                out.append(mp)
    return out


def verify_clean(workdir: Optional[Path] = None) -> list[str]:
    """What a run left behind: namespaces, links, mounts below ``workdir``."""
    left = netenv.leftovers()
    out = [f"namespace {n}" for n in left["namespaces"]] + [f"link {l}" for l in left["links"]]
    if workdir:
        out += [f"mount {mp}" for mp in mounts_below(workdir)]
    return out
