"""``curvefs stats MOUNTPOINT``: live hit rates from the kernel down to S3.

Reads ``MOUNTPOINT/.stats`` (the daemon's counters plus its BPF maps) and
``.config`` — never the BPF maps themselves, so it needs no root (DESIGN §6).
Each refresh prints one line of per-interval numbers; ``--json`` prints the same
numbers for one interval, and the cumulative counters; ``--top N`` lists the
busiest files.  While it runs it keeps the daemon's per-read and per-stat kernel
observers attached (``.control`` ``observe``; with ``mount --kernel-observe
on-demand``, the default, they are detached otherwise).
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time
from typing import Dict, Tuple

from ..errors import QuietError

OPS = ("lookup", "getattr", "read", "write", "open", "create", "readdir", "flush", "release",
       "setattr", "unlink", "mkdir", "rename", "fsync")


def register(sub) -> None:
    p = sub.add_parser("stats", help="live hit rates of a mount, kernel to S3",
                       description="Show what the kernel answered, what reached the daemon, "
                                   "block cache and object store activity.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    p.add_argument("--top", type=int, default=0, metavar="N", help="list the N busiest files")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval in seconds (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default: run until Ctrl-C)")
    p.add_argument("--observe", type=float, default=None, metavar="SECONDS",
                   help="keep the kernel read/stat observers attached this long after each refresh "
                        "(default: 5 intervals, at least 10 s)")
    p.set_defaults(func=run)


def read_stats(mp: str) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]], Dict[int, str]]:
    """(counters, per-inode counters, inode names) from MOUNTPOINT/.stats."""
    path = os.path.join(mp, ".stats")
    try:
        # os.open/os.read, not open(): no fstat, so reading adds no stat call to the counters
        fd = os.open(path, os.O_RDONLY)
        try:
            parts = []
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                parts.append(b)
        finally:
            os.close(fd)
        text = b"".join(parts).decode(errors="replace")
    except FileNotFoundError:
        raise QuietError(f"{mp} is not a curvefs mount (no .stats)", 6) from None
    except OSError as exc:
        raise QuietError(f"{mp}: {exc.strerror}", 6) from None
    counters: Dict[str, float] = {}
    inodes: Dict[int, Dict[str, float]] = {}
    names: Dict[int, str] = {}
    for line in text.splitlines():
        if line.startswith("# name "):
            _, _, ino, rest = line.split(" ", 3)
            try:
                names[int(ino)] = ast.literal_eval(rest)
            except (ValueError, SyntaxError):
                names[int(ino)] = rest
            continue
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            v = float(val)
        except ValueError:
            continue
        if key.startswith("inode."):
            _, ino, name = key.split(".", 2)
            inodes.setdefault(int(ino), {})[name] = v
        else:
            counters[key] = v
    return counters, inodes, names


def read_config(mp: str) -> dict:
    try:
        with open(os.path.join(mp, ".config")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _ratio(hit: float, total: float):
    return None if total <= 0 else max(0.0, min(1.0, hit / total))


def derive(c: Dict[str, float]) -> Dict[str, object]:
    """Numbers every view shows, from counters (cumulative or per-interval deltas)."""
    c = dict(c)
    # the kernel counts the requests that reading .stats itself makes: take them out
    for op in ("READ", "GETATTR", "LOOKUP", "OPEN", "FLUSH", "RELEASE"):
        k = f"kernel_fuse_requests_{op}"
        if k in c:
            c[k] = max(0.0, c[k] - c.get(f"fuse_internal_{op.lower()}_count", 0))
    g = c.get
    bpf = g("kernel_bpf_available", 0) >= 1
    d: Dict[str, object] = {"kernel_bpf_available": bpf}
    daemon_reads = g("fuse_op_read_count", 0)
    daemon_read_pages = g("vfs_read_bytes", 0) / 4096
    d["daemon_read_requests"] = daemon_reads
    d["daemon_read_pages"] = daemon_read_pages
    if bpf:
        calls, pages = g("kernel_read_calls", 0), g("kernel_read_pages", 0)
        d["kernel_read_calls"] = calls
        d["kernel_read_pages"] = pages
        d["kernel_read_hit_rate_calls"] = _ratio(calls - g("kernel_fuse_requests_READ", daemon_reads), calls)
        d["kernel_read_hit_rate_pages"] = _ratio(pages - g("kernel_fuse_read_bytes", 0) / 4096, pages)
        stats = g("kernel_stat_calls", 0)
        attr_req = g("kernel_fuse_requests_GETATTR", 0) + g("kernel_fuse_requests_LOOKUP", 0)
        d["kernel_stat_calls"] = stats
        d["daemon_attr_requests"] = attr_req
        d["attr_cache_hit_rate"] = _ratio(stats - attr_req, stats)
        d["kernel_pages_resident"] = g("kernel_pages_resident", 0)
        d["kernel_pages_evicted"] = g("kernel_pages_deleted", 0)
    else:
        for k in ("kernel_read_calls", "kernel_read_pages", "kernel_read_hit_rate_calls",
                  "kernel_read_hit_rate_pages", "kernel_stat_calls", "attr_cache_hit_rate",
                  "kernel_pages_resident", "kernel_pages_evicted"):
            d[k] = None
        d["daemon_attr_requests"] = g("fuse_op_getattr_count", 0) + g("fuse_op_lookup_count", 0)
    ops = {}
    for op in OPS:
        n = g(f"fuse_op_{op}_count", 0)
        if n:
            ops[op] = {"count": n, "avg_latency_us": g(f"fuse_op_{op}_us_sum", 0) / n}
    d["daemon_ops"] = ops
    mem, disk, miss = g("cache_mem_hits", 0), g("cache_disk_hits", 0), g("cache_misses", 0)
    d["block_cache"] = {"mem_hits": mem, "disk_hits": disk, "misses": miss,
                        "hit_rate": _ratio(mem + disk, mem + disk + miss),
                        "mem_bytes": g("cache_mem_bytes", 0), "disk_bytes": g("cache_disk_bytes", 0)}
    obj = {}
    for op in ("get", "put", "delete", "head", "list"):
        n = g(f"object_{op}_count", 0)
        obj[op] = {"count": n, "avg_latency_ms": (g(f"object_{op}_us_sum", 0) / n / 1000) if n else None}
    obj["get_bytes"] = g("object_get_bytes", 0)
    obj["put_bytes"] = g("object_put_bytes", 0)
    obj["retries"] = g("object_retries", 0)
    obj["errors"] = g("object_errors", 0)
    d["object_store"] = obj
    d["pusher"] = {"pushed_bytes": g("pusher_pushed_bytes", 0),
                   "repushed_bytes": g("pusher_repushed_bytes", 0),
                   "evicted_reads": g("pusher_evicted_reads", 0),
                   "budget_skips": g("pusher_budget_skips", 0),
                   "errors": g("pusher_errors", 0) + g("kernel_push_errors", 0)}
    # FUSE passthrough: opens the kernel serves from a file image (reads never reach us)
    d["passthrough"] = {"opens": g("passthrough_opens", 0),
                        "direct_opens": g("passthrough_direct_opens", 0),
                        "image_builds": g("image_builds", 0),
                        "image_built_bytes": g("image_built_bytes", 0),
                        "image_bytes": g("image_bytes", 0),
                        "image_held_bytes": g("image_held_bytes", 0),
                        "image_held_files": g("image_held_files", 0),
                        "image_hold_ends": g("image_hold_ends", 0),
                        "mirrored_bytes": g("passthrough_mirrored_bytes", 0)}
    return d


def top_files(inodes: Dict[int, Dict[str, float]], names: Dict[int, str], n: int) -> list[dict]:
    rows = []
    for ino, d in inodes.items():
        calls = d.get("kernel_read_calls", 0)
        daemon = d.get("daemon_reads", 0)
        rows.append({"ino": ino, "name": names.get(ino, ""), "kernel_read_calls": calls,
                     "daemon_reads": daemon,
                     "kernel_hit_rate": _ratio(calls - daemon, calls) if "kernel_read_calls" in d else None,
                     "resident_mib": d.get("kernel_resident_pages", 0) * 4096 / (1 << 20)})
    rows.sort(key=lambda r: -(r["kernel_read_calls"] + r["daemon_reads"]))
    return rows[:n]


def _pct(v) -> str:
    return "   -" if v is None else f"{v * 100:3.0f}%"


def _num(v: float) -> str:
    v = float(v or 0)
    for unit in ("", "K", "M", "G"):
        if abs(v) < 1000:
            return f"{v:.0f}{unit}" if unit == "" or v >= 10 else f"{v:.1f}{unit}"
        v /= 1000
    return f"{v:.0f}T"


def _bytes(v: float) -> str:
    v = float(v or 0)
    for unit in ("B", "K", "M", "G"):
        if abs(v) < 1024:
            return f"{v:.0f}{unit}" if v >= 10 or unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}T"


HEADER = ("time     | kernel READ       | attr cache        | daemon      | block cache    "
          "| object store              | push       | passthru")
SUB = ("         | calls  daemon hit | stats  req    hit | ops/s  lat  | mem  disk miss "
       "| get  put  MB/s  ms   retry | MB   evict | opens img")


def _line(dt: float, delta: Dict[str, float]) -> str:
    d = derive(delta)
    ops = sum(v["count"] for v in d["daemon_ops"].values())
    lat = (sum(v["count"] * v["avg_latency_us"] for v in d["daemon_ops"].values()) / ops) if ops else 0
    bc, ob, pu, pt = d["block_cache"], d["object_store"], d["pusher"], d["passthrough"]
    get_ms = ob["get"]["avg_latency_ms"]
    mbps = (ob["get_bytes"] + ob["put_bytes"]) / (1 << 20) / dt
    return (f"{time.strftime('%H:%M:%S')} | "
            f"{_num((d['kernel_read_calls'] or 0) / dt):>5} {_num(d['daemon_read_requests'] / dt):>6} {_pct(d['kernel_read_hit_rate_calls'])} | "
            f"{_num((d['kernel_stat_calls'] or 0) / dt):>5} {_num(d['daemon_attr_requests'] / dt):>5} {_pct(d['attr_cache_hit_rate'])} | "
            f"{_num(ops / dt):>5} {lat:4.0f}us | "
            f"{_num(bc['mem_hits'] / dt):>4} {_num(bc['disk_hits'] / dt):>4} {_num(bc['misses'] / dt):>4} | "
            f"{_num(ob['get']['count'] / dt):>4} {_num(ob['put']['count'] / dt):>4} {mbps:5.1f} "
            f"{(get_ms or 0):4.1f} {_num(ob['retries']):>5} | "
            f"{pu['pushed_bytes'] / (1 << 20) / dt:4.0f} {_num((d['kernel_pages_evicted'] or 0) / dt):>5} | "
            f"{_num((pt['opens'] + pt['direct_opens']) / dt):>5} {_num(pt['image_builds'] / dt):>3}")


#: counters that are levels, not sums: a window shows their current value
GAUGES = ("kernel_bpf_available", "kernel_observing", "kernel_pages_resident", "image_bytes",
          "image_files", "image_held_bytes", "image_held_files")


def window(prev: Dict[str, float], cur: Dict[str, float]) -> Dict[str, float]:
    """The counters of the interval between two snapshots (gauges: their current value)."""
    d = {k: v - prev.get(k, 0) for k, v in cur.items()}
    d.update({k: cur[k] for k in GAUGES if k in cur})
    return d


def observe(mp: str, seconds: float) -> None:
    """Ask the daemon to keep its per-read and per-stat kernel observers attached for
    ``seconds`` (mounted with ``--kernel-observe on-demand`` they are off otherwise)."""
    try:
        fd = os.open(os.path.join(mp, ".control"), os.O_RDWR)
        try:
            os.write(fd, json.dumps({"cmd": "observe", "seconds": seconds}).encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # an older daemon, or no BPF: the kernel columns say so


def run(args) -> int:
    if not 0 <= args.interval < float("inf"):
        raise QuietError("--interval must be a number of seconds >= 0", 3)
    mp = os.path.abspath(args.mountpoint)
    counters, inodes, names = read_stats(mp)
    cfg = read_config(mp)
    bpf = cfg.get("kernel_bpf", {})
    lease = args.observe if args.observe is not None else max(10.0, 5 * args.interval)
    observe(mp, lease)
    if args.json:
        # kernel read and stat calls are counted while observed: rates come from
        # one interval observed from its start (cumulative counters alongside);
        # --interval 0: no wait, rates from the cumulative counters (a caller that
        # keeps the observers attached itself, with --observe, takes its own deltas)
        t0 = time.monotonic()
        if args.interval > 0:
            time.sleep(args.interval)
            cur, inodes, names = read_stats(mp)
        else:
            cur, counters = counters, {}
        out = {"mountpoint": mp, "time": cur.get("time_unix_s"),
               "kernel_bpf": bpf, "kernel_push": cfg.get("kernel_push", {}),
               "kernel_passthrough": cfg.get("kernel_passthrough", {}),
               "interval_s": round(time.monotonic() - t0, 3),
               "derived": derive(window(counters, cur)), "counters": cur,
               "top_files": top_files(inodes, names, args.top or 20)}
        json.dump(out, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    if not bpf.get("available", False):
        print(f"kernel counters unavailable: {bpf.get('reason', 'unknown')} (kernel columns show '-')")
    pt = cfg.get("kernel_passthrough", {})
    if pt and not pt.get("enabled"):
        print(f"FUSE passthrough off: {pt.get('reason', 'unknown')}")
    print(HEADER)
    print(SUB)
    prev, t_prev = counters, time.monotonic()
    n = 0
    try:
        while not args.count or n < args.count:
            time.sleep(args.interval)
            observe(mp, lease)
            cur, inodes, names = read_stats(mp)
            now = time.monotonic()
            print(_line(max(now - t_prev, 1e-6), window(prev, cur)), flush=True)
            if args.top:
                print(f"  {'ino':>10} {'kernel reads':>12} {'daemon':>8} {'hit':>5} {'resident':>9}  name")
                for r in top_files(inodes, names, args.top):
                    print(f"  {r['ino']:>10} {_num(r['kernel_read_calls']):>12} {_num(r['daemon_reads']):>8} "
                          f"{_pct(r['kernel_hit_rate']):>5} {r['resident_mib']:8.1f}M  {r['name']}")
            prev, t_prev = cur, now
            n += 1
    except KeyboardInterrupt:
        pass
    return 0
