"""Process-wide counters, gauges and log2 latency histograms (a leaf module).

Names follow ``<layer>_<what>_<unit>[_<label>]``.  ``snapshot()`` returns a
flat ``{name: number}`` dict; ``render_text()`` prints ``name value`` lines
(the ``.stats`` virtual file).  Updates are plain dict operations guarded by
one lock, cheap enough for every FUSE request and safe from worker threads.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict

_lock = threading.Lock()
_values: Dict[str, float] = {}
_collectors: list[Callable[[], Dict[str, float]]] = []

#: log2 latency buckets in microseconds: bucket i counts latencies in [2^i, 2^(i+1)) µs
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


def reset() -> None:
    """Forget every value (tests)."""
    with _lock:
        _values.clear()
