"""Format and mount real curvefs volumes in subprocesses (used by t4+ tests and benchmarks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from curvefs_py.fuse.mountinfo import is_mounted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "curvefs_py.cli.main"]


def cli(*args: str, check: bool = True, env: Optional[dict] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"curvefs {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def read_cold(path: str) -> bytes:
    """The whole file, read after dropping its pages, so the daemon is asked."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return bytes(out)
            out += b
    finally:
        os.close(fd)


@dataclass
class Mount:
    meta_url: str
    path: str
    cache_dir: str
    log_file: str
    options: list = field(default_factory=list)
    proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30) -> "Mount":
        if is_mounted(self.path):  # a dead mount left by a killed daemon
            subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
        os.makedirs(self.path, exist_ok=True)
        cmd = CLI + ["mount", self.meta_url, self.path, "--cache-dir", self.cache_dir,
                     "--log", self.log_file] + list(self.options)
        # stderr to a file, not a pipe nobody drains: libfuse and Python print there
        with open(self.stderr_file, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited {self.proc.returncode}: {self._stderr()}")
            if is_mounted(self.path):
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError("mount did not come up")

    def stop(self, timeout: float = 60) -> None:
        """Unmount with `curvefs umount` (flushes) and wait for the daemon."""
        if self.proc is None:
            if is_mounted(self.path):  # a test that killed the daemon ended before its remount
                subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
            return
        if is_mounted(self.path):
            r = cli("umount", self.path, check=False)
            if r.returncode != 0:
                time.sleep(0.5)
                r = cli("umount", self.path, check=False)
                if r.returncode != 0:
                    self.kill()
                    raise AssertionError(f"umount failed: {r.stderr}")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("daemon did not exit after umount")
        self.proc = None

    def kill(self) -> None:
        """kill -9 the daemon and clear the dead mount (as a crash would leave it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
        self.proc = None

    @property
    def stderr_file(self) -> str:
        return self.log_file + ".stderr"

    def _stderr(self) -> str:
        try:
            with open(self.stderr_file, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_problems(self) -> list[str]:
        """WARNING/ERROR lines of the daemon log, and whatever the daemon printed on
        stderr (libfuse's own complaints land there): tests fail on unexpected ones."""
        try:
            with open(self.log_file) as f:
                lines = [ln for ln in f if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
        except FileNotFoundError:
            lines = []
        return lines + [f"stderr: {ln}" for ln in self._stderr().splitlines() if ln.strip()]

    def observe(self, seconds: float = 600) -> None:
        """Attach the daemon's per-read and per-stat kernel observers for ``seconds``,
        as ``curvefs stats`` does (mounted ``--kernel-observe on-demand`` they are off)."""
        from curvefs_py.cli.stats import observe

        observe(self.path, seconds)
        assert self.stats().get("kernel_observing") == 1, "kernel observers did not attach"

    def stats(self) -> dict:
        """The daemon's counters (``.stats``), read as ``curvefs stats`` reads them."""
        from curvefs_py.cli.stats import read_stats

        return read_stats(self.path)[0]
