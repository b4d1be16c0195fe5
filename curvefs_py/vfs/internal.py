"""Virtual files at a reserved inode range in the root: ``.stats``, ``.config``, ``.control``.

They are found by ``lookup`` in the root directory (not listed by readdir, as
JuiceFS does) and served with ``direct_io`` so every read shows the daemon's
current state, never the page cache.

* ``.stats``: ``name value`` lines, a snapshot of the daemon's counters and
  the BPF maps taken at ``open``; per-inode lines ``inode.<ino>.<counter>``
  (for ``stats --top``) and ``inode.<ino>.name`` as a comment line.
  ``curvefs stats`` reads it and needs no privileges.
* ``.config``: JSON: the volume format (no secrets), mount options, pid,
  session id, whether the BPF probes and the pusher are on (and why not).
* ``.control``: a request channel.  A client writes one JSON request, e.g.
  ``{"cmd": "warmup", "inodes": [..], "kernel": true}``, and then reads
  (``pread(fd, n, 0)``) a JSON status line as many times as it likes until
  ``"done": true``.  The request runs in the daemon's nursery and goes on if
  the client goes away. ``{"cmd": "observe", "seconds": N}`` keeps the kernel
  observers (per-read and per-stat BPF counters) attached for N more seconds;
  ``curvefs stats`` sends it on every refresh.  ``{"cmd": "info", "inode": N}``
  answers (at once) where the file's bytes are: ``VFS.info``.
"""
from __future__ import annotations

import errno
import json
import stat
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Dict

from .. import INTERNAL_INODE_BASE, metrics, threads
from ..errors import FsError
from ..types import Attr

if TYPE_CHECKING:
    from .handles import Handle

STATS_INO = INTERNAL_INODE_BASE + 1
CONFIG_INO = INTERNAL_INODE_BASE + 2
CONTROL_INO = INTERNAL_INODE_BASE + 3

NAMES = {b".stats": STATS_INO, b".config": CONFIG_INO, b".control": CONTROL_INO}

TOP_INODES = 200


def is_internal(ino: int) -> bool:
    return ino >= INTERNAL_INODE_BASE


class InternalFiles:
    def __init__(self, config: Callable[[], Dict],
                 inode_stats: Callable[[], Awaitable[Dict[int, Dict[str, float]]]]):
        self._config = config
        self._inode_stats = inode_stats
        self._start_ns = time.time_ns()
        self._status: Dict[int, dict] = {}
        self._rendered: Dict[int, bytes] = {}  # per handle: its status as last read from 0

    async def render(self, ino: int) -> bytes:
        """The file's content now.  ``.stats`` reads the BPF maps (a collector of
        ``metrics.snapshot``, and the per-inode map): in a worker thread."""
        if ino == STATS_INO:
            per = await self._inode_stats()
            text = await threads.run_blocking(metrics.render_text, limiter=threads.STATS)
            return self._stats_text(text, per).encode()
        if ino == CONFIG_INO:
            return (json.dumps(self._config(), indent=2, sort_keys=True) + "\n").encode()
        if ino == CONTROL_INO:
            return b""
        raise KeyError(ino)

    @staticmethod
    def _stats_text(text: str, per: Dict) -> str:
        names = per.pop("names", {})
        busiest = sorted(per.items(), key=lambda kv: -(kv[1].get("kernel_read_calls", 0)
                                                       + kv[1].get("daemon_reads", 0)))[:TOP_INODES]
        lines = []
        for ino, d in busiest:
            for k in sorted(d):
                v = d[k]
                lines.append(f"inode.{ino}.{k} {int(v) if float(v).is_integer() else round(v, 3)}")
            if ino in names:
                lines.append(f"# name {ino} {names[ino].decode(errors='replace')!r}")
        return text + ("\n".join(lines) + "\n" if lines else "")

    async def attr(self, ino: int) -> Attr:
        now = time.time_ns()
        mode = stat.S_IFREG | (0o666 if ino == CONTROL_INO else 0o444)
        length = len(await self.render(ino))
        return Attr(ino=ino, mode=mode, nlink=1, uid=0, gid=0, length=length,
                    atime_ns=now, mtime_ns=now, ctime_ns=self._start_ns)

    # ------------------------------------------------------------ control
    async def control_request(self, h: "Handle", data: bytes, vfs) -> int:
        try:
            req = json.loads(data.decode())
            cmd = req["cmd"]
        except (ValueError, KeyError, UnicodeDecodeError):
            raise FsError(errno.EINVAL, "bad control request") from None
        if cmd == "observe":  # curvefs stats: keep the kernel observers attached
            try:
                seconds = float(req.get("seconds", 10))
            except (TypeError, ValueError):
                raise FsError(errno.EINVAL, "observe: seconds must be a number") from None
            ok = await vfs.observe(seconds)
            self._status[h.fh] = {"cmd": cmd, "observing": ok, "done": True}
            return len(data)
        if cmd == "info":  # curvefs info: where a file's bytes are
            try:
                ino = int(req["inode"])
            except (KeyError, TypeError, ValueError):
                raise FsError(errno.EINVAL, "info: inode must be a number") from None
            self._status[h.fh] = {**await vfs.info(ino), "cmd": cmd, "done": True}
            return len(data)
        if cmd != "warmup":
            raise FsError(errno.EINVAL, f"unknown control command {cmd!r}")
        inos = [int(i) for i in req.get("inodes", [])]
        st = {"cmd": cmd, "files": 0, "files_total": len(inos), "bytes": 0,
              "bytes_total": int(req.get("bytes_total", 0)), "errors": [], "done": False,
              "started": time.time()}
        self._status[h.fh] = st

        def progress(files: int, nbytes: int, error: str | None = None) -> None:
            st["files"] += files
            st["bytes"] += nbytes
            if error and len(st["errors"]) < 20:
                st["errors"].append(error)

        async def run():
            try:
                await vfs.warmup(inos, bool(req.get("kernel", True)), progress)
            except Exception as exc:
                st["errors"].append(str(exc))
            finally:
                st["done"] = True

        vfs._nursery.start_soon(run, name="warmup")
        return len(data)

    def control_status(self, h: "Handle", off: int = 0, size: int = 1 << 20) -> bytes:
        """The status line of the handle's request, read from ``off``: rendered anew at
        offset 0 (a warmup's progress moves on) and kept for the READs that follow, so
        that a long answer (``info`` of a big file) arrives in pieces of one rendering."""
        if off == 0:
            st = self._status.get(h.fh)
            self._rendered[h.fh] = (b'{"done": true, "idle": true}\n' if st is None
                                    else (json.dumps(st) + "\n").encode())
        return self._rendered.get(h.fh, b"")[off:off + size]

    def forget(self, fh: int) -> None:
        self._status.pop(fh, None)
        self._rendered.pop(fh, None)
