"""The kernel fast path through a real mount: page cache and attr cache answer, the daemon is not woken.

Counters come from the daemon (``.stats``: ``fuse_op_*``) and from its BPF
maps (``kernel_*``), read before and after a known workload.
"""
from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request

import pytest

from curvefs_py.fuse.mountinfo import mount_device
from mounthelper import cli
import servers

MiB = 1 << 20


def wait_bpf(m, timeout=90.0, observe=True) -> dict:
    """Wait for the daemon's BPF counters; ``observe``: attach the kernel observers
    (read and stat calls), as ``curvefs stats`` does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.path.join(m.path, ".config")) as f:
            cfg = json.load(f)
        b = cfg["kernel_bpf"]
        if b["available"]:
            if observe:
                m.observe()
            return cfg
        if b["reason"] not in ("not loaded", ""):
            pytest.skip(f"BPF unavailable here: {b['reason']}")
        time.sleep(0.3)
    raise AssertionError("BPF probes did not load in time")


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def kdelta(before: dict, after: dict, op: str) -> float:
    """Requests of opcode ``op`` the kernel sent to the daemon between two
    snapshots, without those made by reading ``.stats`` itself."""
    return delta(before, after, f"kernel_fuse_requests_{op}") - \
        delta(before, after, f"fuse_internal_{op.lower()}_count")


def make_file(path: str, size: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def test_warmup_then_random_reads_never_reach_daemon(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    f = os.path.join(m.path, "f64")
    data = make_file(f, 64 * MiB)
    m.stop()
    m.start()  # empty page cache, warm block cache
    wait_bpf(m)
    r = cli("warmup", f)
    assert "warmed up 1 files" in r.stdout
    before = m.stats()
    fd = os.open(f, os.O_RDONLY)
    rnd = random.Random(7)
    try:
        for _ in range(10_000):
            off = rnd.randrange(0, 64 * MiB // 4096) * 4096
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    after = m.stats()
    assert delta(before, after, "fuse_op_read_count") == 0
    assert kdelta(before, after, "READ") == 0
    # the BPF page-cache counter saw every one of them
    assert delta(before, after, "kernel_read_calls") >= 10_000


def test_push_on_open_after_remount(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    f = os.path.join(m.path, "f")
    data = make_file(f, 20 * MiB + 123)
    m.stop()
    m.start()
    fd = os.open(f, os.O_RDONLY)
    try:
        # the push runs in the background after OPEN's reply: wait for it to end
        deadline = time.monotonic() + 10
        while m.stats().get("pusher_pushed_bytes", 0) < len(data) - 4096 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = m.stats()
        got = b"".join(os.pread(fd, 1 << 20, off) for off in range(0, len(data), 1 << 20))
        after = m.stats()
    finally:
        os.close(fd)
    assert got == data
    assert after["pusher_pushed_bytes"] >= len(data) - 4096
    assert delta(before, after, "fuse_op_read_count") == 0
    assert os.stat(f).st_size == len(data), "a push changed the file size"


def test_pushing_off_reaches_daemon(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta, "--kernel-cache-budget", "0")
    f = os.path.join(m.path, "f")
    make_file(f, 8 * MiB)
    m.stop()
    m.start()
    before = m.stats()
    with open(f, "rb") as fh:
        fh.read()
    after = m.stats()
    assert delta(before, after, "fuse_op_read_count") > 0
    assert after.get("pusher_pushed_bytes", 0) == 0


def test_stats_answered_by_attr_cache(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta, "--attr-timeout", "30", "--entry-timeout", "30")
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i}") for i in range(100)]
    for n in names:
        open(n, "wb").close()
    wait_bpf(m)
    for n in names:  # first stat of each may reach the daemon
        os.stat(n)
    before = m.stats()
    for _ in range(10):
        for n in names:
            os.stat(n)
    after = m.stats()
    daemon = delta(before, after, "fuse_op_getattr_count") + delta(before, after, "fuse_op_lookup_count")
    assert daemon <= len(names), daemon  # at most once per file per attr timeout
    assert kdelta(before, after, "GETATTR") + \
        kdelta(before, after, "LOOKUP") == daemon
    assert delta(before, after, "kernel_stat_calls") == 1000


def test_bpf_counts_known_workload_exactly(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    f = os.path.join(m.path, "f")
    make_file(f, 4 * MiB)
    wait_bpf(m)
    n = 37  # a prime: miscounting by a factor shows
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, 4096)
    try:
        before = m.stats()
        for i in range(n):
            os.preadv(fd, [buf], i * 8192)
        after = m.stats()
    finally:
        os.close(fd)
    assert kdelta(before, after, "READ") == n
    assert delta(before, after, "fuse_op_read_count") == n
    # buffered reads of cached pages: N read calls in the kernel, none at the daemon
    with open(f, "rb") as fh:
        fh.read()
    fd = os.open(f, os.O_RDONLY)
    try:
        before = m.stats()
        for i in range(n):
            os.pread(fd, 4096, i * 4096)
        after = m.stats()
    finally:
        os.close(fd)
    assert delta(before, after, "kernel_read_calls") == n
    assert kdelta(before, after, "READ") == 0


def two_clients(mounts):
    """Two mounts of one file volume with 60 s attr/entry timeouts, and the
    paths of one file as each sees it: (a, b, path on a, path on b)."""
    meta = mounts.format("file")
    a = mounts.mount(meta, "--attr-timeout", "60", "--entry-timeout", "60")
    b = mounts.mount(meta, "--attr-timeout", "60", "--entry-timeout", "60")
    return a, b, os.path.join(a.path, "shared"), os.path.join(b.path, "shared")


def poll(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_kernel_observers_attach_on_demand(mounts):
    """By default the per-read and per-stat observers stay detached until somebody
    observes (``curvefs stats``): page-cache reads and stats then leave
    kernel_read_calls and kernel_stat_calls alone. ``observe`` attaches them (exact
    counts again) and they detach when its lease runs out. ``--kernel-observe
    always`` keeps them attached without asking."""
    meta = mounts.format("file")
    m = mounts.mount(meta, "--attr-timeout", "60")
    f = os.path.join(m.path, "f")
    make_file(f, MiB)
    wait_bpf(m, observe=False)
    poll(lambda: m.stats().get("kernel_observing") == 0)  # detached right after loading
    fd = os.open(f, os.O_RDONLY)
    try:
        os.pread(fd, MiB, 0)  # cached from here on

        def workload() -> dict:
            before = m.stats()
            for i in range(53):
                assert len(os.pread(fd, 4096, i * 4096)) == 4096
                os.stat(f)
            return {k: delta(before, m.stats(), k) for k in ("kernel_read_calls", "kernel_stat_calls")}

        assert workload() == {"kernel_read_calls": 0, "kernel_stat_calls": 0}
        m.observe(5)  # the lease outlasts the workload, then runs out
        assert workload() == {"kernel_read_calls": 53, "kernel_stat_calls": 53}
        poll(lambda: m.stats().get("kernel_observing") == 0)  # the lease ran out
        assert workload() == {"kernel_read_calls": 0, "kernel_stat_calls": 0}
    finally:
        os.close(fd)
    m.stop()
    m2 = mounts.mount(meta, "--kernel-observe", "always")
    wait_bpf(m2, observe=False)
    time.sleep(2.5)  # the on-demand follower would have detached by now
    assert m2.stats().get("kernel_observing") == 1


def test_other_client_change_never_read_stale(mounts):
    a, b, fa, fb = two_clients(mounts)
    make_file(fa, 3 * MiB, seed=1)
    with open(fb, "rb") as f:  # B caches version 1 in its page cache
        v1 = f.read()
    assert len(v1) == 3 * MiB
    new = make_file(fa, 3 * MiB, seed=2)  # same size: only the data version tells
    with open(fb, "rb") as f:
        assert f.read() == new
    assert os.stat(fb).st_size == 3 * MiB


def test_other_clients_chmod_keeps_the_page_cache(mounts):
    """A change note carries the data version the change left: another client's chmod
    refreshes this client's attributes at once (60 s timeouts) but keeps its page
    cache, whose pages are of that version; another client's write drops it."""
    meta = mounts.format("file")
    opts = ("--attr-timeout", "60", "--entry-timeout", "60", "--no-passthrough")
    a, b = mounts.mount(meta, *opts), mounts.mount(meta, *opts)
    fa, fb = os.path.join(a.path, "shared"), os.path.join(b.path, "shared")
    start = b.stats()
    data = make_file(fa, 2 * MiB)
    poll(lambda: delta(start, b.stats(), "vfs_remote_changes") >= 2)  # the new entry, the write
    with open(fb, "rb") as f:  # B's page cache: this version
        assert f.read() == data
    before = b.stats()
    os.chmod(fa, 0o600)
    poll(lambda: delta(before, b.stats(), "vfs_remote_changes_data_current") == 1)
    assert os.stat(fb).st_mode & 0o777 == 0o600
    mid = b.stats()
    with open(fb, "rb") as f:
        assert f.read() == data
    assert delta(mid, b.stats(), "fuse_op_read_count") == 0  # all from B's page cache
    with open(fa, "r+b") as f:
        f.write(b"x" * 4096)
    poll(lambda: delta(mid, b.stats(), "vfs_remote_changes") >= 1)
    with open(fb, "rb") as f:
        assert f.read(4096) == b"x" * 4096
    assert delta(mid, b.stats(), "vfs_remote_changes_data_current") == 0


def test_stats_json_has_every_field(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    wait_bpf(m)
    make_file(os.path.join(m.path, "x"), MiB)
    out = json.loads(cli("stats", m.path, "--json", "--top", "5").stdout)
    d = out["derived"]
    for key in ("kernel_read_calls", "daemon_read_requests", "kernel_read_hit_rate_calls",
                "kernel_read_hit_rate_pages", "kernel_stat_calls", "daemon_attr_requests",
                "attr_cache_hit_rate", "daemon_ops", "block_cache", "object_store", "pusher",
                "kernel_pages_resident", "kernel_pages_evicted"):
        assert key in d, key
    for key in ("mem_hits", "disk_hits", "misses"):
        assert key in d["block_cache"]
    for key in ("get", "put", "delete", "get_bytes", "put_bytes", "retries", "errors"):
        assert key in d["object_store"]
    for key in ("pushed_bytes", "repushed_bytes"):
        assert key in d["pusher"]
    for key in ("opens", "direct_opens", "image_builds", "image_bytes", "image_held_bytes", "image_held_files",
                "image_hold_ends", "mirrored_bytes"):
        assert key in d["passthrough"]
    assert "enabled" in out["kernel_passthrough"]
    assert out["kernel_bpf"]["available"] is True
    assert isinstance(out["top_files"], list)
    # the live view runs and prints one line per interval
    r = cli("stats", m.path, "--interval", "0.2", "--count", "2", "--top", "3")
    assert r.stdout.count("\n") >= 4


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_prometheus_metrics_endpoint(mounts):
    """``--metrics HOST:PORT`` serves the counters of ``stats`` for Prometheus, labelled
    with the volume and the mount point; latencies as cumulative histograms."""
    port = servers.free_port()
    meta = mounts.format("file")
    m = mounts.mount(meta, "--metrics", f"127.0.0.1:{port}")
    wait_bpf(m)
    make_file(os.path.join(m.path, "x"), MiB)
    for _ in range(5):
        os.stat(os.path.join(m.path, "x"))
    status, ctype, text = scrape(port)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    got = samples(text)
    lab = f'mountpoint="{m.path}",volume="vol"'
    stats = m.stats()
    for name in ("object_put_bytes", "cache_mem_blocks", "kernel_bpf_available"):
        assert got[f"curvefs_{name}{{{lab}}}"] == stats[name] > 0, name
    # a latency histogram: cumulative buckets in seconds, +Inf = count, sum in seconds
    h = "curvefs_fuse_op_write_seconds"
    assert f"# TYPE {h} histogram" in text
    buckets = [(float(k.split('le="')[1].rstrip('"}')), v) for k, v in got.items()
               if k.startswith(h + "_bucket")]
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets) and buckets[-1][0] == float("inf")
    assert all(v1 <= v2 for (_, v1), (_, v2) in zip(buckets, buckets[1:]))
    assert buckets[-1][1] == got[f"{h}_count{{{lab}}}"] == stats["fuse_op_write_count"]
    assert 0 < got[f"{h}_sum{{{lab}}}"] == pytest.approx(stats["fuse_op_write_us_sum"] / 1e6)
    assert not [k for k in got if "_us_" in k]  # the raw slots are not exported twice
    # the BPF maps' round trips per opcode, as one histogram labelled op
    kb = f'curvefs_kernel_fuse_latency_seconds_count{{{lab},op="WRITE"}}'
    assert got[kb] >= 1, sorted(k for k in got if "kernel_fuse_latency" in k)[:5]
    assert scrape(port, "/other")[0] == 404
    assert samples(scrape(port)[2])[f"curvefs_metrics_scrapes{{{lab}}}"] >= 2
    m.stop()
    with pytest.raises(OSError):  # the exporter goes with the mount
        scrape(port)


def info(path: str) -> dict:
    return json.loads(cli("info", "--json", path).stdout)


def test_info_shows_where_a_files_bytes_are(mounts):
    """``curvefs info``: a file's slices and block objects, which of them the block cache
    holds, and its pages in the kernel's page cache, each as it changes."""
    meta = mounts.format("s3")
    m = mounts.mount(meta, "--no-passthrough", "--kernel-cache-budget", "0")  # no pushes: pages follow reads
    wait_bpf(m, observe=False)
    f = os.path.join(m.path, "f")
    content = make_file(f, 9 * MiB)
    with open(f, "r+b") as fh:  # a second slice over the first's middle
        fh.seek(5 * MiB)
        fh.write(b"x" * MiB)
    os.truncate(f, 80 * MiB)  # a hole up to a second chunk
    d = info(f)
    assert (d["length"], len(d["chunks"]), d["empty_chunks"]) == (80 * MiB, 1, 1)
    [c0] = d["chunks"]
    assert [row[4] for row in c0["slices"]] == [9 * MiB, MiB]
    assert len(c0["objects"]) == 4 and set(d["objects"]) == set(c0["objects"])  # 3 + the second's 1
    assert d["kernel"]["pages"] == 80 * MiB // 4096 and d["unflushed"] is False

    m.stop()
    m.cache_dir += "-cold"
    m.start()
    wait_bpf(m, observe=False)
    d = info(f)
    assert not any(o["memory"] or o["disk"] for o in d["objects"].values())  # all in the bucket only
    assert d["kernel"]["resident_pages"] == 0 and d["image"] is None
    with open(f, "rb") as fh:
        assert fh.read(9 * MiB)[:5 * MiB] == content[:5 * MiB]
    d = info(f)
    assert all(o["disk"] for o in d["objects"].values())  # fetched, kept on the disk cache
    assert d["kernel"]["resident_pages"] >= 9 * MiB // 4096 and d["kernel"]["pages_of"] == "current"
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert info(f)["kernel"]["resident_pages"] == 0
    text = cli("info", f, m.path).stdout
    assert "2 chunk(s) (1 empty), 2 slice row(s), 4 block object(s)" in text and "directory" in text
    r = cli("info", os.path.join(m.path, "nope"), os.path.join(m.path, ".stats"), f, check=False)
    assert r.returncode == 1 and r.stdout.count("block object(s)") == 1  # the others are still shown
    errs = r.stderr.splitlines()
    assert len(errs) == 2 and "nope: No such file" in errs[0] and ".stats: Invalid argument" in errs[1], errs
    # a big sparse file: its empty chunks are counted, the answer comes in pieces
    big = os.path.join(m.path, "big")
    with open(big, "wb") as fh:
        fh.truncate(1 << 40)  # 1 TiB: 16,384 empty chunks
        fh.seek((1 << 40) - 10)
        fh.write(b"the end")
    d = info(big)
    assert (d["empty_chunks"], len(d["chunks"]), d["object_counts"]["total"]) == (16383, 1, 1)
    r = cli("info", "/", check=False)
    assert r.returncode == 6 and "not a curvefs mount" in r.stderr


def test_bpf_unavailable_gives_reason(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta, "--no-bpf")
    with open(os.path.join(m.path, ".config")) as f:
        cfg = json.load(f)
    assert cfg["kernel_bpf"] == {"available": False, "reason": "disabled by --no-bpf"}
    r = cli("stats", m.path, "--interval", "0.1", "--count", "1")
    assert "kernel counters unavailable: disabled by --no-bpf" in r.stdout
    out = json.loads(cli("stats", m.path, "--json").stdout)
    assert out["derived"]["kernel_read_hit_rate_calls"] is None


def test_mount_raises_the_kernel_readahead(mounts):
    """FUSE's default readahead is 128 KiB; the daemon sets the mount's bdi to four
    blocks (a sequential reader's misses then arrive as large READs), finding its
    device in mountinfo, where a mount point with a space is spelled with \\040."""
    m = mounts.mount(mounts.format("file", extra=("--block-size", "1M")), "--readahead", "8M",
                     name="mnt with space")
    dev = mount_device(m.path)
    assert dev is not None
    poll(lambda: open(f"/sys/class/bdi/{dev}/read_ahead_kb").read().strip() == str(8 << 10))
