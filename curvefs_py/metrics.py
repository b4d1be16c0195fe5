"""Process-wide counters, gauges and log2 latency histograms (a leaf module).

Names follow ``<layer>_<what>_<unit>[_<label>]``.  ``snapshot()`` returns a
flat ``{name: number}`` dict; ``render_text()`` prints ``name value`` lines
(the ``.stats`` virtual file).  Updates are plain dict operations guarded by
one lock, cheap enough for every FUSE request and safe from worker threads.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Callable, Dict

_lock = threading.Lock()
_values: Dict[str, float] = {}
_collectors: list[Callable[[], Dict[str, float]]] = []

#: log2 latency buckets in microseconds: slot 0 counts latencies under 1 µs, slot i > 0
#: those in [2^(i-1), 2^i) µs, the last slot everything above
HIST_SLOTS = 27


def inc(name: str, value: float = 1) -> None:
    with _lock:
        _values[name] = _values.get(name, 0) + value


def set_gauge(name: str, value: float) -> None:
    with _lock:
        _values[name] = value


def get(name: str, default: float = 0) -> float:
    with _lock:
        return _values.get(name, default)


def observe_us(name: str, micros: float) -> None:
    """Count one event of ``name`` taking ``micros`` µs (count, sum, log2 slot)."""
    slot = min(int(micros).bit_length(), HIST_SLOTS - 1)
    with _lock:
        _values[name + "_count"] = _values.get(name + "_count", 0) + 1
        _values[name + "_us_sum"] = _values.get(name + "_us_sum", 0) + micros
        key = f"{name}_us_bucket_{slot}"
        _values[key] = _values.get(key, 0) + 1


class timer:
    """``with metrics.timer("object_get"):`` observes the block's latency."""

    __slots__ = ("name", "t0")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        observe_us(self.name, (time.perf_counter() - self.t0) * 1e6)
        return False


def add_collector(fn: Callable[[], Dict[str, float]]) -> None:
    """Register a function whose numbers are merged into every snapshot
    (e.g. the BPF map readers, the cache sizes)."""
    with _lock:
        _collectors.append(fn)


def remove_collector(fn: Callable[[], Dict[str, float]]) -> None:
    with _lock:
        if fn in _collectors:
            _collectors.remove(fn)


def snapshot() -> Dict[str, float]:
    with _lock:
        out = dict(_values)
        collectors = list(_collectors)
    for fn in collectors:
        try:
            out.update(fn())
        except Exception as exc:  # a broken collector must not break .stats
            out["metrics_collector_errors"] = out.get("metrics_collector_errors", 0) + 1
            out.setdefault("metrics_collector_error", 0)
            del exc
    out["time_unix_s"] = time.time()
    return out


def render_text(snap: Dict[str, float] | None = None) -> str:
    snap = snapshot() if snap is None else snap
    lines = []
    for k in sorted(snap):
        v = snap[k]
        lines.append(f"{k} {int(v) if float(v).is_integer() else round(v, 6)}")
    return "\n".join(lines) + "\n"


def render_prometheus(snap: Dict[str, float] | None = None, labels: Dict[str, str] | None = None,
                      prefix: str = "curvefs_") -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4).

    A latency histogram becomes ``X_seconds`` with cumulative ``le`` buckets in
    seconds: the daemon's (``X_count``, ``X_us_sum``, ``X_us_bucket_<slot>``) and the
    BPF maps' per opcode (``X_us_sum_<OP>``, ``X_us_bucket_<slot>_<OP>``, labelled
    ``op``).  Every other value is one untyped sample.  ``labels`` go on every
    sample (volume, mount point)."""
    snap = snapshot() if snap is None else snap
    base = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted((labels or {}).items()))

    def sample(name: str, value: float, extra: str = "") -> str:
        lab = ",".join(x for x in (base, extra) if x)
        v = int(value) if float(value).is_integer() else repr(float(value))
        return f"{prefix}{name}{{{lab}}} {v}" if lab else f"{prefix}{name} {v}"

    # (histogram name, op label or "") -> {"sum": µs, "count": n, slot: n}
    hists: Dict[tuple[str, str], Dict] = {}
    rest = []
    for k, v in snap.items():
        m = _HIST_KEY.fullmatch(k)
        if m and (m["name"] + "_us_sum" + (f"_{m['op']}" if m["op"] else "")) in snap:
            part = int(m["slot"]) if m["slot"] is not None else "sum"
            hists.setdefault((m["name"], m["op"] or ""), {})[part] = v
        else:
            rest.append(k)
    for (name, op), h in hists.items():
        if not op and f"{name}_count" in snap:
            h["count"] = snap[f"{name}_count"]
            rest.remove(f"{name}_count")
    lines: list[str] = []
    typed = set()
    for (name, op), h in sorted(hists.items()):
        metric = f"{name}_seconds"
        if metric not in typed:
            typed.add(metric)
            lines.append(f"# TYPE {prefix}{metric} histogram")
        op_label = f'op="{_label_value(op)}"' if op else ""
        total = 0.0
        for slot in range(HIST_SLOTS - 1):
            total += h.get(slot, 0)
            le = f'le="{(1 << slot) / 1e6!r}"'
            lines.append(sample(f"{metric}_bucket", total, ",".join(x for x in (op_label, le) if x)))
        count = h.get("count", total + h.get(HIST_SLOTS - 1, 0))
        lines.append(sample(f"{metric}_bucket", count, ",".join(x for x in (op_label, 'le="+Inf"') if x)))
        lines.append(sample(f"{metric}_sum", h.get("sum", 0) / 1e6, op_label))
        lines.append(sample(f"{metric}_count", count, op_label))
    for k in sorted(rest):
        if _METRIC_NAME.fullmatch(k):
            lines.append(sample(k, snap[k]))
    return "\n".join(lines) + "\n"


def _label_value(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
#: X_us_sum, X_us_bucket_<slot>, and the same with _<OP> (the BPF maps' per-opcode histograms)
_HIST_KEY = re.compile(r"(?P<name>[a-z0-9_]+?)_us_(?:sum|bucket_(?P<slot>\d+))(?:_(?P<op>[A-Z][A-Z0-9_]*))?")


def reset() -> None:
    """Forget every value (tests)."""
    with _lock:
        _values.clear()
