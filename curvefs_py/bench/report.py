"""The benchmark's output: one table (text or Markdown), ``results.json`` and PNG charts.

Rows are (condition, system, job).  A mount row's ratio is its throughput (or IOPS) divided
by the same job's on each baseline of the same run.  Columns whose counters are missing
print ``n/a``; ``-`` means the column does not apply to the job (e.g. a hit rate for writes).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Optional

from .suite import JOBS, JobResult, fmt_value

NA = "n/a"


def fmt_lat(us: Optional[float]) -> str:
    if us is None:
        return NA
    if us < 1000:
        return f"{us:.0f}µs" if us >= 10 else f"{us:.1f}µs"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms" if us < 100_000 else f"{us / 1000:.0f}ms"
    return f"{us / 1e6:.2f}s"


def baselines(results: list[JobResult]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r.kind == "baseline" and r.system not in seen:
            seen.append(r.system)
    return seen


def ratios(results: list[JobResult]) -> dict:
    """``{(condition, system, job): {baseline: ratio}}`` for rows that are ok."""
    base = {(r.system, r.job): r.value for r in results
            if r.kind == "baseline" and r.status == "ok" and r.value}
    out = {}
    for r in results:
        d = {}
        for b in baselines(results):
            bv = base.get((b, r.job))
            d[b] = (r.value / bv) if (r.status == "ok" and bv) else None
        out[(r.condition, r.system, r.job)] = d
    return out


def _job_hit_kind(job: str) -> Optional[str]:
    for j in JOBS:
        if j.name == job:
            return j.hit
    return None


def table_rows(results: list[JobResult]) -> tuple[list[str], list[list[str]]]:
    bases = baselines(results)
    rat = ratios(results)
    header = ["system", "job", "result", "p50", "p99"] + [f"vs {b}" for b in bases] + \
             ["kernel hit", "RT/op", "status"]
    if any(r.condition for r in results):
        header.insert(1, "network")
    rows = []
    for r in results:
        ok = r.status == "ok"
        row = [r.system, r.job,
               fmt_value(r.metric, r.value) if ok else "-",
               fmt_lat(r.p50_us) if ok else "-", fmt_lat(r.p99_us) if ok else "-"]
        for b in bases:
            v = rat[(r.condition, r.system, r.job)].get(b)
            row.append(f"{v:.2f}x" if v is not None else "-")
        if not ok or r.kind == "baseline":
            row += ["-", "-"]
        else:
            hit_kind = _job_hit_kind(r.job)
            if hit_kind is None:
                row.append("-")
            else:
                row.append(f"{r.kernel_hit * 100:.0f}% {hit_kind}" if r.kernel_hit is not None else NA)
            row.append(f"{r.rt_per_op:.2f}" if r.rt_per_op is not None else NA)
        reason = r.reason if len(r.reason) <= 110 else r.reason[:107] + "..."
        row.append("ok" if ok else f"{r.status.upper()}: {reason}")
        if any(x.condition for x in results):
            row.insert(1, r.condition or "local")
        rows.append(row)
    return header, rows


def render_text(results: list[JobResult]) -> str:
    header, rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the status column is last and not padded
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines) + "\n"


def render_markdown(results: list[JobResult]) -> str:
    header, rows = table_rows(results)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out) + "\n"


def machine_facts() -> dict:
    facts = {"kernel": platform.release(), "python": platform.python_version(),
             "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            facts["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:   # read-only look at the code that was measured
        repo = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            facts["revision"] = rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    if shutil.which("fio"):
        try:
            facts["fio"] = subprocess.run(["fio", "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return facts


def write_json(path: Path, results: list[JobResult], meta: dict) -> None:
    rat = ratios(results)
    rows = []
    for r in results:
        d = r.to_json()
        d["ratio"] = rat[(r.condition, r.system, r.job)]
        rows.append(d)
    doc = {"meta": meta, "results": rows}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def write_charts(outdir: Path, results: list[JobResult]) -> list[Path]:
    """throughput.png, latency.png and (with a baseline) ratio.png; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [j.name for j in JOBS if any(r.job == j.name for r in results)]
    series: list[tuple[str, str]] = []   # (condition, system) in order of appearance
    for r in results:
        key = (r.condition, r.system)
        if key not in series:
            series.append(key)
    label = {k: (f"{k[1]} {k[0]}" if k[0] else k[1]) for k in series}
    by = {(r.condition, r.system, r.job): r for r in results}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []
    ncol = 3
    nrow = max(1, (len(jobs) + ncol - 1) // ncol)

    def grid(title: str):
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow + 0.8), squeeze=False)
        fig.suptitle(title)
        for ax in axes.flat[len(jobs):]:
            ax.set_visible(False)
        return fig, axes

    def legend(fig):
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)])
                   for i in range(len(series))]
        fig.legend(handles, [label[k] for k in series], loc="lower center",
                   ncol=min(4, len(series)), fontsize="small")
        fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(series) - 1) // 4), 1, 0.96))

    # throughput / IOPS, one panel per job (each job has its own unit)
    fig, axes = grid("throughput (MiB/s) or IOPS per job")
    for n, job in enumerate(jobs):
        ax = axes.flat[n]
        unit = "MiB/s" if any(r.metric == "bw" for r in results if r.job == job) else "IOPS"
        vals = {}
        for i, key in enumerate(series):
            r = by.get((*key, job))
            if r is not None and r.status == "ok" and r.value > 0:
                vals[i] = r.value / 2**20 if unit == "MiB/s" else r.value
        _scale(ax, list(vals.values()))
        bottom = ax.get_ylim()[0]
        for i, key in enumerate(series):
            r = by.get((*key, job))
            if r is None:
                continue
            if i in vals:
                ax.bar(i, vals[i] - (bottom if ax.get_yscale() == "log" else 0), bottom=bottom
                       if ax.get_yscale() == "log" else 0, color=colors[i % len(colors)])
                ax.text(i, vals[i], _short(vals[i]), ha="center", va="bottom", fontsize=7)
            else:
                ax.text(i, bottom, r.status, rotation=90, ha="center", va="bottom", fontsize=7,
                        color="red")
        ax.set_title(job, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(series) - 0.4)
    legend(fig)
    p = outdir / "throughput.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)

    # latency: p50 bar, p99 marker
    fig, axes = grid("latency per call: bar = p50, dot = p99 (µs)")
    for n, job in enumerate(jobs):
        ax = axes.flat[n]
        pts = [x for key in series for r in [by.get((*key, job))]
               if r is not None and r.status == "ok" for x in (r.p50_us, r.p99_us) if x]
        _scale(ax, pts, force_log=True)
        bottom = ax.get_ylim()[0]
        for i, key in enumerate(series):
            r = by.get((*key, job))
            if r is None or r.status != "ok" or not r.p50_us:
                continue
            ax.bar(i, r.p50_us - bottom, bottom=bottom, color=colors[i % len(colors)])
            if r.p99_us:
                ax.plot([i], [r.p99_us], "o", color="black", markersize=4)
        ax.set_title(job, fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(series) - 0.4)
    legend(fig)
    p = outdir / "latency.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)

    bases = baselines(results)
    if bases:
        rat = ratios(results)
        b = bases[0]
        mounts = [k for k in series if any(r.kind != "baseline" for r in results
                                           if (r.condition, r.system) == k)]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(jobs) + 4), 4))
        w = 0.8 / max(1, len(mounts))
        for i, key in enumerate(mounts):
            xs, ys = [], []
            for n, job in enumerate(jobs):
                v = rat.get((*key, job), {}).get(b)
                if v:
                    xs.append(n + (i - (len(mounts) - 1) / 2) * w)
                    ys.append(v)
            ax.bar(xs, ys, width=w, label=label[key], color=colors[series.index(key) % len(colors)])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(jobs)))
        ax.set_xticklabels(jobs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"ratio to {b} (log)")
        ax.set_title(f"throughput / IOPS relative to {b} in the same run")
        if mounts:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        p = outdir / "ratio.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def _scale(ax, values: list, force_log: bool = False) -> None:
    """Linear from 0 when the values are within 30x of each other, else log from a decade."""
    import math
    pos = [v for v in values if v and v > 0]
    if not pos:
        ax.set_ylim(0, 1)
        return
    lo, hi = min(pos), max(pos)
    if not force_log and hi / lo < 30:
        ax.set_ylim(0, hi * 1.18)
        return
    from matplotlib import ticker
    ax.set_yscale("log")
    ax.set_ylim(10 ** math.floor(math.log10(lo) - 0.3), hi * 2.5)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: _short(v)))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _short(v: float) -> str:
    if v >= 1e9:
        return f"{v / 1e9:.3g}G"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def render_summary_md(results: list[JobResult], meta: dict) -> str:
    """A self-contained Markdown page: command, machine, network as measured, the table."""
    m = meta.get("machine", {})
    lines = ["# curvefs bench results", "",
             f"Measured {meta.get('started', '')} in {meta.get('duration_s', 0):.0f} s with:", "",
             "```", meta.get("command", ""), "```", "",
             "## Machine", "",
             f"- CPU: {m.get('cpu', '?')} x {m.get('cpus', '?')}, memory {m.get('memory_gib', '?')} GiB",
             f"- kernel {m.get('kernel', '?')}, Python {m.get('python', '?')}, {m.get('fio', 'fio ?')}",
             f"- curvefs_py revision {m.get('revision', '?')}",
             ]
    p = meta.get("params", {})
    lines.append(f"- fio parameters: SIZE={p.get('size')}, RUNTIME={p.get('runtime_s')} s, "
                 f"NFILES={p.get('nfiles')}; psync, queue depth 1, one job")
    env = meta.get("environment")
    if env:
        for name, b in env.get("baselines", {}).items():
            lines.append(f"- baseline {name}: {b.get('fs')} at {b.get('path')} {b.get('note', '')}".rstrip())
        for name, sysinfo in env.get("systems", {}).items():
            what = sysinfo.get("version") or sysinfo.get("missing") or sysinfo.get("setup_error", "")
            lines.append(f"- {name}: {what}")
        lines += ["", "## Network (measured before each condition)", "",
                  "| condition | latency via | up (host -> S3) | down (S3 -> host) | time to first byte | TCP connect |",
                  "|---|---|---|---|---|---|"]
        for c in env.get("conditions", []):
            ms = c.get("measured", {})
            lines.append(f"| {c['condition']} | {c.get('latency_mode', '')} | "
                         f"{ms.get('up_bps', 0) / 1e9:.2f} Gbit/s | {ms.get('down_bps', 0) / 1e9:.2f} Gbit/s | "
                         f"{ms.get('ttfb_ms', 0):.1f} ms | {ms.get('connect_ms', 0):.2f} ms |")
        lines += ["", "S3 server: moto under waitress in its own network namespace, behind a veth "
                  "pair with tbf on both ends; `GET /` costs the server about 1-2 ms by itself, "
                  "the rest of the time to first byte is the added latency."]
    elif meta.get("mount"):
        mt = meta["mount"]
        lines.append(f"- mount: {mt.get('path')} ({mt.get('fs')}), counters: "
                     f"{mt.get('stats', 'curvefs stats')}")
    counts = summary_counts(results)
    lines += ["", "## Results", "",
              f"{counts['ok']} ok, {counts['failed']} failed, {counts['not run']} not run. "
              "Ratios are throughput (or IOPS) divided by the baseline's in the same run; kernel "
              "hit = share of the pages read that the page cache served without a READ "
              "request (reads) or of stat calls answered without GETATTR/LOOKUP (stat_storm); "
              "RT/op = FUSE requests that reached the daemon per fio operation; n/a = no counters.",
              "", render_markdown(results).rstrip(), ""]
    return "\n".join(lines)


def summary_counts(results: Iterable[JobResult]) -> dict:
    out = {"ok": 0, "failed": 0, "not run": 0}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def load_results(path: Path) -> tuple[list[JobResult], dict]:
    """Read a ``results.json`` back (for re-rendering)."""
    doc = json.loads(Path(path).read_text())
    fields = set(JobResult.__dataclass_fields__)
    rows = [JobResult(**{k: v for k, v in d.items() if k in fields}) for d in doc["results"]]
    return rows, doc.get("meta", {})


def main(argv: list[str] | None = None) -> int:
    """``python -m curvefs_py.bench.report OUT``: redraw table, summary and charts of a run."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m curvefs_py.bench.report", description=main.__doc__)
    p.add_argument("out", type=Path, help="output directory of a `curvefs bench` run")
    a = p.parse_args(argv)
    results, meta = load_results(a.out / "results.json")
    (a.out / "table.txt").write_text(render_text(results))
    (a.out / "table.md").write_text(render_markdown(results))
    (a.out / "summary.md").write_text(render_summary_md(results, meta))
    write_charts(a.out, results)
    print(render_text(results), end="")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
