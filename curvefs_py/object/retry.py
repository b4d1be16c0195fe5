"""Retries for object-store requests: which failures, how often, for how long.

Policy (as s3ql's ``retry`` decorator and the AWS "full jitter" backoff):

* **What is retried.** Only *temporary* failures (``is_temp_failure``): a
  ``TemporaryFailure`` raised by a store (S3 5xx, ``SlowDown``/throttling,
  request timeouts, connection errors translated by ``s3.py``) and plain
  network ``OSError``s (connection refused/reset/aborted, timeouts, broken
  pipe, unreachable network).  Everything else -- a missing key or bucket,
  denied access, a malformed request, a programming error -- is raised at once:
  retrying cannot fix it.  Every store operation is idempotent (objects are
  immutable; delete of a missing key succeeds), so repeating one is safe.
* **When.** Before retry *n* (1-based) we sleep ``uniform(0, min(max_delay,
  base_delay * 2**(n-1)))`` seconds: exponential growth, capped, with full
  jitter so that many workers failing together do not retry in lock-step.
* **How long.** We give up after ``attempts`` attempts or when the next sleep
  would end past ``deadline`` seconds from the first attempt, whichever comes
  first.  A total outage therefore ends in an ``ObjectStoreError`` after at most
  ``deadline`` plus one request timeout (default 30 s + the store's timeouts);
  tests pass small values.  ``RetryPolicy.quick()`` is the short policy for the
  format/mount probe, which must fail in seconds, not half a minute.
* **What is counted and logged.** Each retry increments the ``object_retries``
  metric (name configurable) and is logged at a level that rises with the
  outage: DEBUG for the first two retries, then INFO, and WARNING once the
  outage has lasted ``WARN_AFTER_S`` (5 s) -- a blip stays quiet, a real
  outage is visible in the default log.  Giving up is not logged here: the error
  is raised to the caller, which decides (its message is one line).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import random
import socket
import time
from typing import Callable, Optional, TypeVar

from .. import metrics
from ..errors import FsError, ObjectStoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errnos of OSErrors that mean "the network or the peer failed; try again"
TEMP_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
    errno.EPIPE, errno.EAGAIN, errno.EHOSTDOWN,
})

#: retries longer than this (seconds into an outage) are logged as WARNING
WARN_AFTER_S = 5.0


class TemporaryFailure(Exception):
    """Raised by a store for a failure worth retrying; the message is one line."""


class RetriesExhausted(ObjectStoreError):
    """A temporary failure outlasted the retry policy (attempts or deadline)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry: see the module docstring.  Times are in seconds."""

    attempts: int = 50
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float = 30.0

    @classmethod
    def quick(cls) -> "RetryPolicy":
        """For probes at format/mount time: fail within a couple of seconds."""
        return cls(attempts=3, base_delay=0.05, max_delay=0.5, deadline=2.0)

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def one_line(obj: object, limit: int = 300) -> str:
    """``str(obj)`` on one line (whitespace collapsed), at most ``limit`` characters."""
    text = " ".join(str(obj).split()) or type(obj).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_temp_failure(exc: BaseException) -> bool:
    """True if ``exc`` is a failure that may go away by itself (worth a retry)."""
    if isinstance(exc, TemporaryFailure):
        return True
    if isinstance(exc, FsError):  # already classified by a store: final
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(exc, OSError) and exc.errno in TEMP_ERRNOS:
        return True
    return False


def _level(retry_no: int, elapsed: float) -> int:
    if elapsed >= WARN_AFTER_S:
        return logging.WARNING
    if retry_no > 2:
        return logging.INFO
    return logging.DEBUG


def retry(fn: Callable[[], T], *, what: str, attempts: int = 50, base_delay: float = 0.1,
          max_delay: float = 5.0, deadline: float = 30.0,
          giveup: Optional[Callable[[BaseException, int, float], BaseException]] = None,
          counter: str = "object_retries",
          sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic) -> T:
    """Blocking. Call ``fn()`` until it succeeds, fails for good, or the policy runs out.

    ``what`` names the operation in logs (e.g. ``"GET chunks/1/2/3_0_4096"``).
    When retries run out, ``giveup(last_exc, attempts_made, elapsed_s)`` builds
    the exception to raise (default: ``RetriesExhausted`` saying what failed,
    why, and how long we tried); it is raised ``from`` the last failure.
    Non-temporary exceptions propagate unchanged on the attempt that raised them.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    start = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_temp_failure(exc):
                raise
            elapsed = clock() - start
            delay = random.uniform(0, min(max_delay, base_delay * (2 ** (attempt - 1))))
            if attempt >= attempts or elapsed + delay > deadline:
                if giveup is not None:
                    err = giveup(exc, attempt, elapsed)
                else:
                    err = RetriesExhausted(msg=f"{what}: {one_line(exc)} (gave up after "
                                               f"{attempt} attempts in {elapsed:.1f}s)")
                raise err from exc
            metrics.inc(counter)
            log.log(_level(attempt, elapsed), "%s: %s; retry %d in %.2fs (%.1fs into the outage)",
                    what, one_line(exc), attempt, delay, elapsed)
            sleep(delay)
