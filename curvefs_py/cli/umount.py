"""``curvefs umount MOUNTPOINT``: flush, unmount, and wait for the daemon to finish."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time

from ..errors import QuietError
from ..fuse.mountinfo import FSTYPE, mount_fstype, mount_point


def register(sub) -> None:
    p = sub.add_parser("umount", help="unmount a volume",
                       description="Unmount MOUNTPOINT; waits until its daemon has flushed and exited.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-l", "--lazy", action="store_true", help="detach now even if busy (also clears a dead mount)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemon (default 60)")
    p.set_defaults(func=run)


def _daemon_pid(mp: str) -> int | None:
    try:
        with open(os.path.join(mp, ".config")) as f:
            return int(json.load(f).get("pid") or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except (OSError, IndexError):
        return False


def run(args) -> int:
    mp = os.path.abspath(args.mountpoint)
    found = mount_point(mp)  # from mountinfo: a stat could hang or fail on the mount
    if found is None:
        if not os.path.lexists(mp):
            raise QuietError(f"{mp} does not exist", 6)
        raise QuietError(f"{mp} is not mounted", 6)
    mp = found
    fstype = mount_fstype(mp)
    if fstype != FSTYPE:  # as root, fusermount3 would unmount anything
        raise QuietError(f"{mp} is not a curvefs mount (it is {fstype})", 6)
    try:
        # OPENDIR reaches the daemon (a stat may come from the attr cache)
        os.close(os.open(mp, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            # the daemon is gone (crashed or killed): clear the dead mount
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
            print(f"cleared dead mount {mp}")
            return 0
        # anything else (EIO while the daemon cannot reach its metadata): the
        # daemon is alive, and unmounting it is still the right thing to do
    pid = _daemon_pid(mp)
    cmd = ["fusermount3", "-u"] + (["-z"] if args.lazy else []) + [mp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unmount failed"])[-1]
        if "busy" in msg.lower():
            raise QuietError(f"{mp} is busy (files open or a process inside); close them or use --lazy", 6)
        raise QuietError(msg, 1)
    if pid:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            raise QuietError(f"unmounted, but daemon {pid} is still flushing after {args.timeout:.0f}s", 1)
    return 0
