"""The eBPF side car (bpf/*.bpf.c, curvefs_py.kernel) against real FUSE mounts.

Mounts are ``tests/simplefs.py`` (one read-only file of known content, run as a
subprocess) so that the numbers can be checked against a daemon we control.
Every counter is checked against a known workload with a prime number of events
(bcc's CONTRIBUTING-SCRIPTS discipline): exact counts for this mount, zero for
other devices.  Where the kernel's own behaviour matters (how many
mm_filemap_get_pages events a read makes), a private tracefs instance counts
the raw events as an independent cross-check.

Facts these tests pin down (kernel 6.18, x86_64, glibc 2.36):
* fuse:fuse_request_* ``connection`` == the mount's s_dev in kernel encoding
  (major << 20 | minor), and so is filemap's ``s_dev``;
  ``os.stat().st_dev`` and ``struct stat.st_dev`` use the user encoding, which
  differs once the minor is >= 256 (test_high_minor_encodings).
* A 4 KiB O_DIRECT pread is one READ request; READ's end ``len`` is the reply
  size (16-byte header + payload).
* A small buffered pread fires mm_filemap_get_pages once; a 1 MiB one fires it
  once per folio batch (9 times), counted by page_cache.bpf.c as one call.
* Python's os.stat/lstat/fstat are newfstatat; statx and the old
  stat/lstat/fstat syscalls are only reached through libc.statx / syscall().
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from curvefs_py.kernel import loader, maps

HERE = Path(__file__).resolve().parent
PAGE = 4096
TRACEFS = Path("/sys/kernel/tracing")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, FUSE mounts)")

# Reasons that mean "this machine cannot run BPF" (skip), as opposed to a bug in
# our C or loader (fail).
ENVIRONMENT_REASONS = ("not root", "no tracefs", "BCC import failed", "kernel headers missing",
                       "tracepoint ")


# -- helpers ------------------------------------------------------------------------

class Mount:
    def __init__(self, path: Path, proc: subprocess.Popen, counts: Path, ino: int, size: int):
        self.path, self.proc, self.counts_file, self.ino, self.size = path, proc, counts, ino, size

    @property
    def file(self) -> str:
        return str(self.path / "data")

    @property
    def st_dev(self) -> int:
        return os.stat(self.path).st_dev

    def daemon_counts(self) -> dict:
        """Requests the daemon itself saw (simplefs dumps them on SIGUSR1)."""
        before = self.counts_file.stat().st_mtime_ns if self.counts_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.counts_file.exists() and self.counts_file.stat().st_mtime_ns != before:
                return json.loads(self.counts_file.read_text())
            time.sleep(0.01)
        raise TimeoutError("simplefs did not dump its counts")


def _mount(base: Path, name: str, size: int, ino: int, keep_cache: bool = True) -> Mount:
    mnt = base / name
    mnt.mkdir()
    counts = base / f"{name}.counts.json"
    cmd = [sys.executable, str(HERE / "simplefs.py"), str(mnt), "--size", str(size),
           "--ino", str(ino), "--counts", str(counts)]
    if keep_cache:
        cmd.append("--keep-cache")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"simplefs exited {proc.returncode}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("simplefs did not mount")
        time.sleep(0.02)
    return Mount(mnt, proc, counts, ino, size)


def _umount(m: Mount) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        m.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        m.proc.kill()
        m.proc.wait()
    err = m.proc.stderr.read().decode()
    m.proc.stderr.close()
    assert "Traceback" not in err, err


@pytest.fixture
def mount_base():
    """A private directory for mount points.  Not pytest's tmp_path: concurrent pytest
    sessions rotate /tmp/pytest-of-<user> and would walk (stat!) our live mounts."""
    base = Path(tempfile.mkdtemp(prefix="curvefs_t5_"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mounts(mount_base):
    """Factory: ``mounts(size=…, ino=…)`` -> a fresh simplefs Mount, unmounted at the end."""
    made: list[Mount] = []

    def make(size: int = 64 * PAGE, ino: int = 1000, keep_cache: bool = True) -> Mount:
        m = _mount(mount_base, f"mnt{len(made)}", size, ino, keep_cache)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        _umount(m)


@pytest.fixture
def probes():
    """Factory: ``probes(mount)`` -> a loaded KernelProbe (skip if the machine cannot)."""
    made: list[loader.KernelProbe] = []

    def make(m: Mount, **kw) -> loader.KernelProbe:
        p = loader.load(m.path, **kw)
        made.append(p)
        if not p.available:
            if p.reason.startswith(ENVIRONMENT_REASONS):
                pytest.skip(f"kernel counters unavailable here: {p.reason}")
            pytest.fail(f"BPF failed to load: {p.reason}")
        return p

    yield make
    for p in made:
        p.close()


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


class Interference(Exception):
    """The page cache changed under the test (another process ran drop_caches, as the
    benchmark suite does, or memory reclaim): the workload is repeated on a fresh mount."""


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


SYS_cachestat = 451   # x86_64, Linux >= 6.5


def cached_pages(fd: int) -> int | None:
    """Pages of ``fd`` in the page cache per cachestat(2) (an independent count), or
    None where the syscall is missing."""
    if os.uname().machine != "x86_64":
        return None
    libc = _libc()
    rng, cs = _CachestatRange(0, 0), _Cachestat()
    if libc.syscall(SYS_cachestat, fd, ctypes.byref(rng), ctypes.byref(cs), 0) != 0:
        return None
    return int(cs.nr_cache)


def expect_cached(fd: int, pages: int) -> None:
    n = cached_pages(fd)
    if n is not None and n != pages:
        raise Interference(f"{n} pages cached, expected {pages}")


def retry_on_interference(fn, tries: int = 4):
    """Run ``fn(attempt)`` until it completes without Interference."""
    for attempt in range(tries):
        try:
            return fn(attempt)
        except Interference as exc:
            last = exc
    pytest.fail(f"page cache kept changing under the test: {last}")


def direct_preads(path: str, pages) -> None:
    """One 4 KiB O_DIRECT pread per page number: each one is a READ request."""
    buf = mmap.mmap(-1, PAGE)  # page-aligned buffer
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for p in pages:
            assert os.preadv(fd, [buf], p * PAGE) == PAGE
            assert buf[:4] == bytes((i % 251) for i in range(p * PAGE, p * PAGE + 4))
    finally:
        os.close(fd)


class TraceInstance:
    """A private tracefs instance counting one event for one device (cross-check)."""

    def __init__(self, event: str, filter_: str):
        self.dir = TRACEFS / "instances" / f"curvefs_t5_{os.getpid()}_{time.monotonic_ns()}"
        self.event = event
        os.mkdir(self.dir)
        (self.dir / "events" / event / "filter").write_text(filter_)
        (self.dir / "events" / event / "enable").write_text("1")

    def count(self) -> int:
        (self.dir / "events" / self.event / "enable").write_text("0")
        name = self.event.split("/")[1] + ":"
        return sum(1 for line in (self.dir / "trace").read_text().splitlines()
                   if name in line and not line.startswith("#"))

    def close(self):
        (self.dir / "events" / self.event / "enable").write_text("0")
        os.rmdir(self.dir)


# -- pure facts -------------------------------------------------------------------

def test_dev_encodings():
    # user encoding == glibc makedev for majors < 4096; differs from MKDEV for minor >= 256
    for major, minor in [(0, 39), (0, 255), (0, 256), (0, 1000), (8, 1), (259, 70000)]:
        assert loader.user_dev(major, minor) == os.makedev(major, minor)
        st_dev = os.makedev(major, minor)
        assert loader.kernel_dev(st_dev) == (major << 20) | minor
    assert loader.kernel_dev(os.makedev(0, 39)) == os.makedev(0, 39)
    assert loader.kernel_dev(os.makedev(0, 256)) != os.makedev(0, 256)


def test_opcode_table_matches_tracefs():
    fmt = (TRACEFS / "events/fuse/fuse_request_send/format")
    if not fmt.exists():
        pytest.skip("no fuse tracepoints")
    text = fmt.read_text()
    for num, name in maps.FUSE_OPCODES.items():
        assert f'{{{num}, "FUSE_{name}"}}' in text, (num, name)


# -- fuse_req ---------------------------------------------------------------------

def test_fuse_read_requests_exact_per_mount(mounts, probes):
    a = mounts(size=64 * PAGE, ino=1000)
    b = mounts(size=64 * PAGE, ino=1000)
    assert a.st_dev != b.st_dev
    pa, pb = probes(a), probes(b)
    sa0, sb0 = pa.snapshot(), pb.snapshot()
    da0, db0 = a.daemon_counts(), b.daemon_counts()

    direct_preads(a.file, range(37))            # 37 READs on a
    direct_preads(b.file, range(3, 3 + 41))     # 41 READs on b

    sa1, sb1 = pa.snapshot(), pb.snapshot()
    assert delta(sa0, sa1, "kernel_fuse_requests_READ") == 37
    assert delta(sb0, sb1, "kernel_fuse_requests_READ") == 41
    assert delta(sa0, sa1, "kernel_fuse_read_bytes") == 37 * PAGE
    assert delta(sb0, sb1, "kernel_fuse_read_bytes") == 41 * PAGE
    # cross-check against what the daemons saw
    da1, db1 = a.daemon_counts(), b.daemon_counts()
    assert da1["READ"] - da0.get("READ", 0) == 37
    assert db1["READ"] - db0.get("READ", 0) == 41
    assert delta(sa0, sa1, "kernel_fuse_requests_OPEN") == da1["OPEN"] - da0.get("OPEN", 0) == 1
    # every READ completed and landed in exactly one latency slot
    hist = {k: v for k, v in sa1.items() if k.startswith("kernel_fuse_latency_us_bucket_")
            and k.endswith("_READ")}
    hist0 = sum(v for k, v in sa0.items() if k in hist)
    assert sum(hist.values()) - hist0 == 37
    assert all(0 < int(k.split("_")[5]) < maps.HIST_SLOTS for k in hist)
    assert delta(sa0, sa1, "kernel_fuse_latency_us_sum_READ") > 0
    assert "kernel_fuse_errors_READ" not in sa1


def test_fuse_errors_and_lookup(mounts, probes):
    m = mounts()
    p = probes(m)
    s0 = p.snapshot()
    for i in range(13):
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / f"missing{i}")     # distinct names: no negative dentry reuse
    s1 = p.snapshot()
    assert delta(s0, s1, "kernel_fuse_requests_LOOKUP") == 13
    assert delta(s0, s1, "kernel_fuse_errors_LOOKUP") == 13


# -- page_cache -------------------------------------------------------------------

def test_buffered_preads_counted_as_read_calls(mounts, probes):
    def run(attempt):
        m = mounts(size=80 * PAGE, ino=4242)
        p = probes(m)
        fd = os.open(m.file, os.O_RDONLY)
        try:
            assert len(os.pread(fd, m.size, 0)) == m.size     # fill the page cache
            expect_cached(fd, 80)
            s0, i0 = p.snapshot(), p.per_inode()[4242]
            tr = TraceInstance("filemap/mm_filemap_get_pages",
                               f"s_dev == {loader.kernel_dev(m.st_dev)}")
            try:
                for page in range(0, 2 * 37, 2):              # 37 preads on distinct pages
                    assert len(os.pread(fd, PAGE, page * PAGE)) == PAGE
                raw = tr.count()
            finally:
                tr.close()
            s1, i1 = p.snapshot(), p.per_inode()[4242]
            expect_cached(fd, 80)
        finally:
            os.close(fd)
        assert raw == 37                                   # the kernel: one event per small pread
        assert delta(s0, s1, "kernel_read_calls") == 37
        assert delta(s0, s1, "kernel_read_pages") == 37
        assert i1["read_calls"] - i0["read_calls"] == 37
        assert i1["read_pages"] - i0["read_pages"] == 37
        assert delta(s0, s1, "kernel_fuse_requests_READ") == 0   # all served by the kernel

    retry_on_interference(run)


def test_large_read_is_one_call(mounts, probes):
    def run(attempt):
        m = mounts(size=256 * PAGE, ino=31337)
        p = probes(m)
        fd = os.open(m.file, os.O_RDONLY)
        try:
            s0 = p.snapshot()
            assert len(os.pread(fd, m.size, 0)) == m.size      # cold: readahead, READs
            s1 = p.snapshot()
            expect_cached(fd, 256)
            tr = TraceInstance("filemap/mm_filemap_get_pages",
                               f"s_dev == {loader.kernel_dev(m.st_dev)}")
            try:
                assert len(os.pread(fd, m.size, 0)) == m.size  # warm
                raw = tr.count()
            finally:
                tr.close()
            s2 = p.snapshot()
            expect_cached(fd, 256)
        finally:
            os.close(fd)
        assert delta(s0, s1, "kernel_read_calls") == 1
        assert delta(s0, s1, "kernel_read_pages") == 256
        assert delta(s0, s1, "kernel_fuse_read_bytes") == m.size
        assert raw > 1                                     # one event per folio batch ...
        assert delta(s1, s2, "kernel_read_calls") == 1     # ... counted as one call
        assert delta(s1, s2, "kernel_read_pages") == 256
        assert delta(s1, s2, "kernel_fuse_requests_READ") == 0

    retry_on_interference(run)


def test_resident_pages_follow_reads_and_fadvise(mounts, probes):
    pages = 53

    def run(attempt):
        m = mounts(size=pages * PAGE, ino=2027)
        other = mounts(size=pages * PAGE, ino=2027)
        p = probes(m)
        assert p.resident_pages(2027) == 0
        with open(other.file, "rb") as f:                  # another mount: not ours
            f.read()
        fd = os.open(m.file, os.O_RDONLY)
        try:
            assert os.pread(fd, m.size, 0) == bytes(i % 251 for i in range(m.size))
            resident, snap, totals = p.resident_pages(2027), p.snapshot(), p.snapshot_totals()
            expect_cached(fd, pages)                       # cross-check: cachestat(2)
            assert resident == pages
            assert p.per_inode()[2027]["resident_pages"] == pages
            assert snap["kernel_pages_resident"] == totals["kernel_pages_resident"] == pages
            assert snap["kernel_pages_added"] == pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            expect_cached(fd, 0)
        finally:
            os.close(fd)
        assert p.resident_pages(2027) == 0
        snap = p.snapshot()
        assert snap["kernel_pages_resident"] == 0
        assert snap["kernel_pages_deleted"] == pages
        assert snap["kernel_pages_deleted_untracked"] == 0

    retry_on_interference(run)


def test_pages_resident_before_load_are_not_counted(mounts, probes):
    def run(attempt):
        m = mounts(size=17 * PAGE, ino=99)
        fd = os.open(m.file, os.O_RDONLY)
        try:
            os.pread(fd, m.size, 0)                        # resident before the probe
            p = probes(m)
            expect_cached(fd, 17)
            os.pread(fd, PAGE, 0)                          # creates the inode entry
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        snap = p.snapshot()
        if snap["kernel_pages_added"]:
            raise Interference(f"{snap['kernel_pages_added']:g} pages re-read after a drop")
        assert p.resident_pages(99) == 0                   # never negative
        assert snap["kernel_pages_resident"] == 0
        assert snap["kernel_pages_deleted_untracked"] == 17

    retry_on_interference(run)


# -- stat_calls -------------------------------------------------------------------

def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


SYS_stat, SYS_fstat, SYS_lstat = 4, 5, 6   # x86_64
AT_FDCWD = -100


def test_stat_calls_exact_per_syscall(mounts, probes, tmp_path):
    if os.uname().machine != "x86_64":
        pytest.skip("raw syscall numbers are x86_64")
    m = mounts()
    other = mounts()
    p = probes(m)
    libc = _libc()
    buf = ctypes.create_string_buffer(512)
    elsewhere = tmp_path / "plain"
    elsewhere.write_bytes(b"x")
    path = m.file.encode()

    s0 = p.snapshot()
    for _ in range(37):
        os.stat(m.file)                                     # newfstatat
    for _ in range(19):
        os.stat(elsewhere)                                  # other device
        os.stat(other.file)                                 # other FUSE mount
    for _ in range(11):
        assert libc.statx(AT_FDCWD, path, 0, 0xfff, buf) == 0, ctypes.get_errno()
        assert libc.statx(AT_FDCWD, str(elsewhere).encode(), 0, 0xfff, buf) == 0
    for _ in range(7):
        assert libc.syscall(SYS_stat, path, buf) == 0
    for _ in range(5):
        assert libc.syscall(SYS_lstat, path, buf) == 0
    fd = os.open(m.file, os.O_RDONLY)
    try:
        for _ in range(3):
            assert libc.syscall(SYS_fstat, fd, buf) == 0
            os.fstat(fd)                                    # newfstatat(fd, "", AT_EMPTY_PATH)
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "nope")                            # failed calls do not count
    s1 = p.snapshot()
    assert delta(s0, s1, "kernel_stat_calls_newfstatat") == 37 + 3
    assert delta(s0, s1, "kernel_stat_calls_statx") == 11
    assert delta(s0, s1, "kernel_stat_calls_newstat") == 7
    assert delta(s0, s1, "kernel_stat_calls_newlstat") == 5
    assert delta(s0, s1, "kernel_stat_calls_newfstat") == 3
    assert delta(s0, s1, "kernel_stat_calls") == 37 + 3 + 11 + 7 + 5 + 3


# -- a minor >= 256: kernel and user encodings differ ---------------------------------

def test_high_minor_encodings(mount_base, probes):
    """Hold anonymous device numbers with tmpfs mounts until the next one is >= 256,
    then mount simplefs there: all three programs must still count exactly."""
    held: list[Path] = []
    m = None
    try:
        for attempt in range(5):   # other processes may free a low minor meanwhile: retry
            while True:
                d = mount_base / f"hold{len(held)}"
                d.mkdir()
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "none", str(d)],
                               check=True)
                held.append(d)
                if os.minor(os.stat(d).st_dev) >= 255 or len(held) > 1000:
                    break
            m = _mount(mount_base, f"high{attempt}", 29 * PAGE, 1000)
            if os.minor(m.st_dev) >= 256:
                break
            _umount(m)
            m = None
        for d in held:
            subprocess.run(["umount", str(d)], check=True)
        held.clear()
        if m is None:
            pytest.skip("could not get an anonymous device minor >= 256")
        assert loader.kernel_dev(m.st_dev) != m.st_dev
        p = probes(m)
        s0 = p.snapshot()
        direct_preads(m.file, range(23))
        with open(m.file, "rb") as f:
            f.read()
            resident, cached = p.resident_pages(1000), cached_pages(f.fileno())
        s_read = p.snapshot()
        for _ in range(31):
            os.stat(m.file)
        libc = _libc()
        buf = ctypes.create_string_buffer(512)
        for _ in range(13):
            assert libc.statx(AT_FDCWD, m.file.encode(), 0, 0xfff, buf) == 0
        s1 = p.snapshot()
        assert delta(s0, s1, "kernel_fuse_requests_READ") >= 23 + 1
        assert delta(s0, s1, "kernel_fuse_read_bytes") == 23 * PAGE + 29 * PAGE
        assert resident == (29 if cached is None else cached)
        assert delta(s_read, s1, "kernel_stat_calls_newfstatat") == 31
        assert delta(s0, s1, "kernel_stat_calls_statx") == 13
    finally:
        for d in held:
            subprocess.run(["umount", str(d)], check=False)
        if m is not None:
            _umount(m)


# -- degrading ---------------------------------------------------------------------

def _assert_unavailable(p: loader.KernelProbe, fragment: str) -> None:
    assert not p.available
    assert fragment in p.reason, p.reason
    assert "\n" not in p.reason
    assert p.snapshot() == {"kernel_bpf_available": 0.0}
    assert p.snapshot_totals() == {"kernel_bpf_available": 0.0}
    assert p.per_inode() == {}
    assert p.resident_pages(1) == 0
    p.close()
    p.close()


def test_unavailable_reasons(mounts, tmp_path):
    m = mounts()
    _assert_unavailable(loader.load(m.path, tracefs=str(tmp_path / "no-tracefs")), "no tracefs")
    _assert_unavailable(loader.load(tmp_path / "does-not-exist"), "cannot stat")
    _assert_unavailable(loader.load(m.path, bpf_dir=tmp_path), "BPF sources missing")
    _assert_unavailable(loader.load(m.path, programs=["nope"]), "unknown BPF program")

    # a tracefs without the fuse tracepoints (an older kernel): that program fails
    fake = tmp_path / "tracefs"
    for tp in loader.PROGRAMS["page_cache"]:
        (fake / "events" / tp).mkdir(parents=True)
    _assert_unavailable(loader.load(m.path, tracefs=str(fake), programs=["fuse_req"]),
                        "tracepoint fuse:fuse_request_send missing")

    # a real compile error
    broken = tmp_path / "broken"
    shutil.copytree(loader.default_bpf_dir(), broken)
    src = broken / "fuse_req.bpf.c"
    src.write_text(src.read_text() + "\nthis is not C;\n")
    _assert_unavailable(loader.load(m.path, bpf_dir=broken, programs=["fuse_req"]),
                        "compile/attach error in fuse_req.bpf.c")


def test_partial_load_keeps_working_programs(mounts, tmp_path):
    m = mounts()
    broken = tmp_path / "broken"
    shutil.copytree(loader.default_bpf_dir(), broken)
    (broken / "stat_calls.bpf.c").write_text("#include \"curvefs_bpf.h\"\n#error broken\n")
    p = loader.load(m.path, bpf_dir=broken)
    try:
        if not p.loaded:
            pytest.skip(p.reason)
        assert not p.available and "stat_calls" in p.reason
        assert set(p.loaded) == {"fuse_req", "page_cache"}
        s0 = p.snapshot()
        direct_preads(m.file, range(7))
        s1 = p.snapshot()
        assert delta(s0, s1, "kernel_fuse_requests_READ") == 7
        assert "kernel_stat_calls" not in s1
    finally:
        p.close()


def test_not_root(mounts):
    """Drop root in a forked child: the loader says so instead of failing in bpf()."""
    st_dev = mounts().st_dev   # nobody may not stat a FUSE mount without allow_other
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just report and exit
        try:
            os.close(r)
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            p = loader.load(st_dev)
            os.write(w, json.dumps([p.available, p.reason]).encode())
        except BaseException as exc:
            os.write(w, json.dumps([None, repr(exc)]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    available, reason = json.loads(data)
    assert not available
    assert reason.startswith("not root")


async def test_load_async(mounts):
    import trio

    m = mounts()
    p = await loader.load_async(m.path, timeout=60)
    try:
        if p.reason.startswith(ENVIRONMENT_REASONS):
            pytest.skip(p.reason)
        assert p.available, p.reason
        s0 = p.snapshot()
        await trio.to_thread.run_sync(direct_preads, m.file, range(5))
        assert delta(s0, p.snapshot(), "kernel_fuse_requests_READ") == 5
    finally:
        p.close()
    late = await loader.load_async(m.path, timeout=0)
    assert not late.available and "timed out" in late.reason
