"""ctypes mirrors of ``bpf/curvefs_bpf.h`` and readers that turn BCC tables into
plain dataclasses and dicts.

The mirrors document the layout and let the loader check it: BCC builds its own
ctypes types from the compiled program (``table.Key`` / ``table.Leaf``), and
:func:`check_layout` compares their sizes with the mirrors, so a header edit that
is not repeated here fails at load time with a clear reason instead of reading
garbage.  Everything here is blocking (one ``bpf()`` syscall per map lookup, or
one per batch) and cheap; nothing here imports BCC.
"""
from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass
from typing import Dict

#: mirrors of the constants in curvefs_bpf.h
MAX_OPCODE = 64
HIST_SLOTS = 27
PAGE_SIZE = 4096

#: FUSE opcode numbers (include/uapi/linux/fuse.h, enum fuse_opcode) -> names
FUSE_OPCODES: Dict[int, str] = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK",
    6: "SYMLINK", 8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR",
    12: "RENAME", 13: "LINK", 14: "OPEN", 15: "READ", 16: "WRITE",
    17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR", 22: "GETXATTR",
    23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR",
    28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 31: "GETLK", 32: "SETLK",
    33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT", 37: "BMAP",
    38: "DESTROY", 39: "IOCTL", 40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET",
    43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK",
    47: "COPY_FILE_RANGE", 48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS",
    51: "TMPFILE", 52: "STATX",
}
FUSE_OPCODE_NUMBERS: Dict[str, int] = {v: k for k, v in FUSE_OPCODES.items()}


def opcode_name(op: int) -> str:
    """Name of a FUSE opcode; slot 0 collects opcodes >= MAX_OPCODE (CUSE_INIT)."""
    if op == 0:
        return "OTHER"
    return FUSE_OPCODES.get(op, f"OP{op}")


#: enum curvefs_stat_sys -> syscall name (index of the stat_calls array)
STAT_SYSCALLS = ("newfstatat", "statx", "newfstat", "newstat", "newlstat")


# -- ctypes mirrors --------------------------------------------------------------

class OpStatsC(ct.Structure):
    _fields_ = [("requests", ct.c_uint64), ("completed", ct.c_uint64),
                ("errors", ct.c_uint64), ("latency_ns_sum", ct.c_uint64),
                ("bytes", ct.c_uint64)]


class LatKeyC(ct.Structure):
    _fields_ = [("opcode", ct.c_uint32), ("slot", ct.c_uint32)]


class ReqStartC(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("opcode", ct.c_uint32), ("pad", ct.c_uint32)]


class InodeStatsC(ct.Structure):
    _fields_ = [("read_calls", ct.c_uint64), ("read_pages", ct.c_uint64),
                ("resident_pages", ct.c_int64), ("pages_added", ct.c_uint64),
                ("pages_deleted", ct.c_uint64)]


class PageTotalsC(ct.Structure):
    _fields_ = [("read_calls", ct.c_uint64), ("read_pages", ct.c_uint64),
                ("pages_added", ct.c_uint64), ("pages_deleted", ct.c_uint64),
                ("pages_deleted_untracked", ct.c_uint64)]


class ReadCursorC(ct.Structure):
    _fields_ = [("ino", ct.c_uint64), ("index", ct.c_uint64), ("last_index", ct.c_uint64)]


class BackingKeyC(ct.Structure):
    _fields_ = [("dev", ct.c_uint32), ("pad", ct.c_uint32), ("ino", ct.c_uint64)]


class StatArgC(ct.Structure):
    _fields_ = [("buf", ct.c_uint64), ("sys", ct.c_uint32), ("pad", ct.c_uint32)]


#: (program, map) -> (key mirror, value mirror)
LAYOUT = {
    ("fuse_req", "op_stats"): (ct.c_int, OpStatsC),
    ("fuse_req", "lat_hist"): (LatKeyC, ct.c_uint64),
    ("fuse_req", "inflight"): (ct.c_uint64, ReqStartC),
    ("page_cache", "inodes"): (ct.c_uint64, InodeStatsC),
    ("page_cache", "totals"): (ct.c_int, PageTotalsC),
    ("page_cache", "read_cursor"): (ct.c_uint64, ReadCursorC),
    ("page_cache", "backing"): (BackingKeyC, ct.c_uint64),
    ("stat_calls", "stat_calls"): (ct.c_int, ct.c_uint64),
    ("stat_calls", "stat_args"): (ct.c_uint64, StatArgC),
}


class LayoutError(Exception):
    pass


def check_layout(program: str, bpf) -> None:
    """Raise LayoutError if a map of the compiled ``bpf`` object differs in size
    from its mirror here (header edited without updating maps.py)."""
    for (prog, name), (key_t, leaf_t) in LAYOUT.items():
        if prog != program:
            continue
        table = bpf[name.encode()]
        for what, ours, theirs in (("key", key_t, table.Key), ("value", leaf_t, table.Leaf)):
            if ct.sizeof(ours) != ct.sizeof(theirs):
                raise LayoutError(
                    f"{program}: map {name} {what} is {ct.sizeof(theirs)} bytes in C, "
                    f"{ct.sizeof(ours)} in maps.py")


# -- values ---------------------------------------------------------------------

@dataclass
class OpStats:
    requests: int = 0
    completed: int = 0
    errors: int = 0
    latency_ns_sum: int = 0
    bytes: int = 0


@dataclass
class InodeStats:
    read_calls: int = 0
    read_pages: int = 0
    resident_pages: int = 0   # clamped at 0 (pages resident before load are unknown)
    pages_added: int = 0
    pages_deleted: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {"read_calls": self.read_calls, "read_pages": self.read_pages,
                "resident_pages": self.resident_pages}


@dataclass
class PageTotals:
    read_calls: int = 0
    read_pages: int = 0
    pages_added: int = 0
    pages_deleted: int = 0
    pages_deleted_untracked: int = 0

    @property
    def resident(self) -> int:
        return max(0, self.pages_added - self.pages_deleted)


def _int(v) -> int:
    """A ctypes scalar or a plain int (batch readers return either) -> int."""
    return int(getattr(v, "value", v))


def _copy(dc, c_value):
    return dc(**{f: getattr(c_value, f) for f in dc.__dataclass_fields__})


def _items(table):
    """All (key, value) pairs of a hash table: one batch syscall when the kernel
    and BCC allow it, else one lookup per key."""
    try:
        return list(table.items_lookup_batch())
    except Exception:
        return list(table.items())


# -- readers (blocking) ------------------------------------------------------------

def read_op_stats(table) -> Dict[int, OpStats]:
    """fuse_req op_stats array -> {opcode: OpStats} for opcodes with any request."""
    out: Dict[int, OpStats] = {}
    for op in range(MAX_OPCODE):
        v = table[ct.c_int(op)]
        if v.requests or v.completed:
            out[op] = _copy(OpStats, v)
    return out


def read_latency(table) -> Dict[int, Dict[int, int]]:
    """fuse_req lat_hist -> {opcode: {slot: count}}."""
    out: Dict[int, Dict[int, int]] = {}
    for k, v in _items(table):
        out.setdefault(int(k.opcode), {})[int(k.slot)] = _int(v)
    return out


def read_inodes(table) -> Dict[int, InodeStats]:
    """page_cache inodes -> {ino: InodeStats}."""
    out: Dict[int, InodeStats] = {}
    for k, v in _items(table):
        s = _copy(InodeStats, v)
        s.resident_pages = max(0, s.resident_pages)
        out[_int(k)] = s
    return out


def read_inode(table, ino: int) -> InodeStats | None:
    try:
        v = table[ct.c_uint64(ino)]
    except KeyError:
        return None
    s = _copy(InodeStats, v)
    s.resident_pages = max(0, s.resident_pages)
    return s


def read_page_totals(table) -> PageTotals:
    return _copy(PageTotals, table[ct.c_int(0)])


def read_stat_calls(table) -> Dict[str, int]:
    """stat_calls array -> {syscall name: matching calls}."""
    return {name: _int(table[ct.c_int(i)]) for i, name in enumerate(STAT_SYSCALLS)}


def hist_quantile_us(slots: Dict[int, int], q: float) -> float:
    """Upper bound (us) of the log2 slot holding quantile ``q`` (0..1) of a histogram
    in bpf_log2l() slots; 0 if empty."""
    total = sum(slots.values())
    if not total:
        return 0.0
    need = q * total
    seen = 0
    for slot in sorted(slots):
        seen += slots[slot]
        if seen >= need:
            return float(1 << slot)
    return float(1 << max(slots))
