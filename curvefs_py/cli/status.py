"""``curvefs status META_URL``: the volume's settings, its mounted clients and its usage."""
from __future__ import annotations

import json
import time

from .volume import backend_errors, open_volume


def register(sub) -> None:
    p = sub.add_parser("status", help="show a volume's settings, sessions and usage",
                       description="Show the settings, mounted clients (sessions) and usage of the volume in META_URL.")
    p.add_argument("meta_url", metavar="META_URL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    engine, fmt = open_volume(args.meta_url, loading_ok=True)
    try:
        with backend_errors():
            sessions = engine.list_sessions()
            usage = engine.usage()
            sf = engine.statfs()
    finally:
        engine.close()
    setting = fmt.to_dict()
    setting.pop("secret_key", None)
    if setting.get("access_key"):
        setting["access_key"] = setting["access_key"][:4] + "****"
    out = {"setting": setting, "sessions": sessions,
           "usage": {"used_space": usage.used_space, "used_inodes": usage.used_inodes,
                     "total_space": sf.total_space, "avail_space": sf.avail_space,
                     "avail_inodes": sf.avail_inodes}}
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True, default=str))
        return 0
    print(f"volume {fmt.name} ({fmt.uuid})")
    print(f"  storage     {fmt.storage}: {fmt.bucket}")
    print(f"  block size  {fmt.block_size >> 10} KiB, chunk size {fmt.chunk_size >> 20} MiB")
    cap = "unlimited" if not fmt.capacity else f"{fmt.capacity / (1 << 30):.1f} GiB"
    print(f"  capacity    {cap}, inodes {'unlimited' if not fmt.inodes else fmt.inodes}")
    print(f"  usage       {usage.used_space / (1 << 20):.1f} MiB in {usage.used_inodes} inodes")
    print(f"  sessions    {len(sessions)}")
    now = time.time()
    for s in sessions:
        info = {k: v for k, v in s.items() if k not in ("sid", "heartbeat")}
        hb = s.get("heartbeat")
        age = f"{now - float(hb):.0f}s ago" if hb else "?"
        print(f"    sid {s.get('sid')}: heartbeat {age} {json.dumps(info, default=str)}")
    return 0
