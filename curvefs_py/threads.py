"""The loop only schedules: blocking work runs in worker threads behind named limiters.

``run_blocking(fn, *args, limiter=S3)`` is the one way layers above ``object``
and ``meta`` call blocking code.  Limiters are created lazily (inside trio)
with sizes from ``configure``.  SQLite gets one writer (``META`` size 1 for
sqlite, as JuiceFS's txn lock does); servers get a pool.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, TypeVar

import trio

T = TypeVar("T")

S3 = "s3"
META = "meta"
DISK = "disk"
PUSH = "push"
FEED = "feed"  # the change-feed waiter (one blocking wait at a time)
INVAL = "inval"  # kernel invalidations (may wait for a pending request)
HOLD = "hold"  # mapping images in (may read a whole image from the disk)
STATS = "stats"  # rendering .stats (BPF map reads): one at a time

_sizes: Dict[str, int] = {S3: 20, META: 8, DISK: 8, PUSH: 4, FEED: 1, INVAL: 2, HOLD: 2, STATS: 1}
_limiters: Dict[str, trio.CapacityLimiter] = {}


def configure(**sizes: int) -> None:
    """Set limiter sizes (e.g. ``configure(s3=32, meta=1)``) before first use."""
    for name, n in sizes.items():
        _sizes[name] = n
        lim = _limiters.get(name)
        if lim is not None:
            lim.total_tokens = n


def limiter(name: str) -> trio.CapacityLimiter:
    lim = _limiters.get(name)
    if lim is None:
        lim = _limiters[name] = trio.CapacityLimiter(_sizes.get(name, 4))
    return lim


async def run_blocking(fn: Callable[..., T], *args, limiter: str, **kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in a worker thread under the named limiter.

    The call is not cancellable once started (abandoning a half-done DB
    transaction or upload would be worse than waiting for it)."""
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    return await trio.to_thread.run_sync(fn, *args, limiter=globals()["limiter"](limiter))


def reset() -> None:
    """Forget limiters (each trio.run needs its own)."""
    _limiters.clear()
