"""Mount points from ``/proc/self/mountinfo``, without a call into any mounted file
system: a stat of a FUSE mount waits for its daemon (forever, if it hangs) or fails
when the daemon cannot answer (ENOTCONN after a crash, EIO while its metadata is
unreachable), and the callers here must decide exactly those cases."""
from __future__ import annotations

import os
import re
from typing import Optional, Union


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> dict[str, tuple[str, str]]:
    """{mount point: (device "major:minor", file system type)}; the last mount of a
    point wins (it is the one a path lookup reaches).  The type is the first field
    after the " - " separator (optional fields come before it)."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6) if "-" in fields[6:] else len(fields) - 1
            out[_unescape(fields[4])] = (fields[2], fields[sep + 1] if sep + 1 < len(fields) else "")
    return out


#: the type of a curvefs mount in mountinfo (FUSE with subtype=curvefs)
FSTYPE = "fuse.curvefs"


def _point(path: Union[str, os.PathLike], mounts: dict) -> Optional[str]:
    """``path`` as ``mounts`` spells it if it is a mount point, else None. Only the
    parent directory is resolved (symlinks), never the mount point itself."""
    p = os.path.abspath(path)
    if p in mounts:
        return p
    real = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return real if real in mounts else None


def mount_point(path: Union[str, os.PathLike]) -> Optional[str]:
    """``path`` as mountinfo spells it if it is a mount point, else None."""
    return _point(path, _mounts())


def mount_fstype(path: Union[str, os.PathLike]) -> Optional[str]:
    """The file system type of the mount at ``path`` (``fuse.curvefs`` for ours)."""
    mounts = _mounts()
    p = _point(path, mounts)
    return None if p is None else mounts[p][1]


def containing_mount(path: Union[str, os.PathLike]) -> tuple[str, str]:
    """(mount point, file system type) of the mount ``path`` lies on (the nearest
    mount point at or above it; ``/`` at the latest)."""
    mounts = _mounts()
    p = os.path.abspath(path)
    while True:
        found = _point(p, mounts)
        if found is not None or os.path.dirname(p) == p:
            mp = found or p
            return mp, mounts.get(mp, ("", ""))[1]
        p = os.path.dirname(p)


def mount_device(path: Union[str, os.PathLike]) -> Optional[str]:
    """The device ("major:minor", as in /sys/class/bdi/) of the mount at ``path``."""
    mounts = _mounts()
    p = _point(path, mounts)
    return None if p is None else mounts[p][0]


def is_mounted(path: Union[str, os.PathLike]) -> bool:
    return mount_point(path) is not None
