"""Bad input to the CLI: one line on stderr, a documented non-zero exit code, never a traceback.

Exit codes (errors.QuietError): 3 bad URL/argument, 4 storage unreachable / missing bucket /
bad credentials, 5 volume exists (format) or not formatted (mount), 6 mountpoint problems.
Storage failures must be reported within seconds (the format/mount probe uses a quick
retry policy), never after the 30 s data-path deadline.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

import servers
from mounthelper import CLI, ROOT, is_mounted

#: an unreachable or hanging endpoint must be reported within this many seconds
PROBE_LIMIT_S = 10.0


def run(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    """``curvefs ARGS`` → (exit code, stderr, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=ROOT,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    return r.returncode, r.stderr, time.monotonic() - t0


def fails(args, code: int | None = None, *, contains: str = "", within: float | None = None) -> str:
    """Run the CLI; assert a one-line error (optionally exit ``code``, text, time limit)."""
    rc, err, took = run(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0, f"curvefs {' '.join(args)} succeeded: {err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("curvefs "), lines[0]
    if code is not None:
        assert rc == code, f"exit {rc} (expected {code}): {lines[0]}"
    if contains:
        assert contains.lower() in lines[0].lower(), lines[0]
    if within is not None:
        assert took < within, f"took {took:.1f}s (limit {within}s): {lines[0]}"
    return lines[0]


def sqlite(tmp_path, name="vol") -> str:
    return f"sqlite3://{tmp_path}/{name}-{uuid.uuid4().hex[:6]}.db"


# ----------------------------------------------------------------------------- META_URL
@pytest.mark.parametrize("cmd", ["format", "mount"])
def test_unknown_meta_scheme(tmp_path, cmd):
    args = ["format", "mysql://h/db", "v"] if cmd == "format" else ["mount", "mysql://h/db", str(tmp_path)]
    fails(args, 3, contains="scheme")


def test_sqlite_in_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such"
    fails(["format", f"sqlite3://{missing}/v.db", "v", "--bucket", str(tmp_path / "o")], 3,
          contains="does not exist")
    assert not missing.exists()


def test_bad_block_size_and_name(tmp_path):
    fails(["format", sqlite(tmp_path), "v", "--block-size", "3M"], 3, contains="block-size")
    fails(["format", sqlite(tmp_path), "a/b"], 3, contains="name")
    fails(["format", sqlite(tmp_path), "v", "--block-size", "lots"], 3, contains="size")


# ------------------------------------------------------------------------------ storage
def s3_args(tmp_path, url, key="testing", secret="testing", meta=None):
    return ["format", meta or sqlite(tmp_path), "v", "--storage", "s3", "--bucket", url,
            "--access-key", key, "--secret-key", secret]


def test_s3_closed_port(tmp_path):
    url = f"http://127.0.0.1:{servers.free_port()}/bucket"
    fails(s3_args(tmp_path, url), 4, contains="unreachable", within=PROBE_LIMIT_S)


def test_s3_blackhole(tmp_path):
    with servers.Blackhole() as bh:
        fails(s3_args(tmp_path, f"{bh.endpoint}/bucket"), 4, within=PROBE_LIMIT_S)


def test_s3_bad_url(tmp_path):
    fails(s3_args(tmp_path, "ftp://127.0.0.1/b"), 3, contains="storage URL")
    fails(s3_args(tmp_path, "http://127.0.0.1:9/"), 3, contains="bucket")


def test_s3_missing_bucket(tmp_path, s3):
    fails(s3_args(tmp_path, s3.url(f"missing{uuid.uuid4().hex[:8]}"), s3.access_key, s3.secret_key),
          4, contains="does not exist", within=PROBE_LIMIT_S)


@pytest.fixture(scope="module")
def s3_auth(tmp_path_factory):
    srv = servers.start_s3_server(tmp_path_factory.mktemp("s3auth"), auth=True)
    yield srv
    srv.stop()


def test_s3_wrong_credentials(tmp_path, s3_auth):
    url = s3_auth.create_bucket(f"b{uuid.uuid4().hex[:10]}")
    fails(s3_args(tmp_path, url, "AKIAWRONGWRONGWRONG1", s3_auth.secret_key), 4,
          contains="access denied", within=PROBE_LIMIT_S)
    fails(s3_args(tmp_path, url, s3_auth.access_key, "not-the-secret"), 4,
          contains="access denied", within=PROBE_LIMIT_S)
    fails(s3_args(tmp_path, url, s3_auth.access_key, ""), None, within=PROBE_LIMIT_S)
    # and the right ones work against the same server
    rc, err, _ = run(*s3_args(tmp_path, url, s3_auth.access_key, s3_auth.secret_key))
    assert rc == 0, err


def s3_volume_gone(tmp_path) -> str:
    """META_URL of a formatted S3 volume whose server has stopped."""
    srv = servers.start_s3_server(tmp_path / "s3gone")
    try:
        url = srv.create_bucket("gone")
        meta = sqlite(tmp_path)
        rc, err, _ = run(*s3_args(tmp_path, url, srv.access_key, srv.secret_key, meta=meta))
        assert rc == 0, err
    finally:
        srv.stop()
    return meta


def test_mount_when_s3_is_gone(mounts, tmp_path):
    """A formatted S3 volume whose server has stopped: mount -d fails fast with exit 4."""
    meta = s3_volume_gone(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    fails(["mount", "-d", meta, str(mp), "--cache-dir", str(tmp_path / "c"), "--log", str(tmp_path / "l")],
          4, contains="unreachable", within=PROBE_LIMIT_S + 5)
    assert not is_mounted(str(mp))


# ------------------------------------------------------------------------------- format
def test_format_existing_needs_force(tmp_path):
    meta = sqlite(tmp_path)
    objs = str(tmp_path / "objs")
    rc, err, _ = run("format", meta, "v", "--bucket", objs)
    assert rc == 0, err
    fails(["format", meta, "v", "--bucket", objs], 5, contains="--force")
    rc, err, _ = run("format", meta, "v2", "--bucket", objs, "--force")
    assert rc == 0 and not err.strip(), err
    # block size of an existing volume cannot change: kept, not an error or a traceback
    rc, err, _ = run("format", meta, "v2", "--bucket", objs, "--force", "--block-size", "64K")
    assert rc == 0 or (len(err.strip().splitlines()) == 1 and "Traceback" not in err), err


@pytest.mark.parametrize("storage", ["file", "s3"])
def test_a_bucket_is_one_volumes(tmp_path, storage, request):
    """Two volumes formatted onto one bucket shared object keys (the same slice ids):
    one read the other's bytes, and gc took the other's objects for leaks.  format
    refuses a bucket another volume claimed, or any non-empty one; mount and gc
    refuse a volume whose bucket another volume claimed."""
    if storage == "s3":
        s3 = request.getfixturevalue("s3")
        bucket = s3.create_bucket(f"b{uuid.uuid4().hex[:8]}")
        extra = ["--storage", "s3", "--access-key", s3.access_key, "--secret-key", s3.secret_key]
    else:
        bucket, extra = str(tmp_path / "objs"), []
    one, two = sqlite(tmp_path, "one"), sqlite(tmp_path, "two")
    rc, err, _ = run("format", one, "one", "--bucket", bucket, *extra)
    assert rc == 0, err
    fails(["format", two, "two", "--bucket", bucket, *extra], 5, contains="another volume")
    rc, err, _ = run("format", one, "one", "--bucket", bucket, *extra, "--force")  # its own: fine
    assert rc == 0, err
    if storage == "file":
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_bytes(b"not ours")
        fails(["format", two, "two", "--bucket", str(tmp_path / "full")], 5, contains="not empty")
        # a volume whose bucket another volume claims (its marker rewritten here)
        (tmp_path / "objs" / "curvefs.uuid").write_text("00000000-0000-0000-0000-000000000000\n")
        mp = tmp_path / "mp"
        mp.mkdir()
        fails(["mount", one, str(mp), "--cache-dir", str(tmp_path / "cache")], 5, contains="another volume")
        fails(["gc", one], 5, contains="another volume")
        assert not is_mounted(str(mp))


# -------------------------------------------------------------------------------- mount
def mount_args(meta, mp, tmp_path, *extra):
    return ["mount", meta, str(mp), "--cache-dir", str(tmp_path / "cache"),
            "--log", str(tmp_path / "mount.log"), *extra]


@pytest.fixture
def file_volume(tmp_path):
    meta = sqlite(tmp_path)
    rc, err, _ = run("format", meta, "v", "--bucket", str(tmp_path / "objs"))
    assert rc == 0, err
    return meta


@pytest.mark.parametrize("background", [False, True])
def test_mount_missing_mountpoint(tmp_path, file_volume, background):
    extra = ["-d"] if background else []
    fails(mount_args(file_volume, tmp_path / "nope", tmp_path, *extra), 6, contains="does not exist")


@pytest.mark.parametrize("background", [False, True])
def test_mount_on_a_file(tmp_path, file_volume, background):
    f = tmp_path / "plainfile"
    f.write_bytes(b"x")
    extra = ["-d"] if background else []
    fails(mount_args(file_volume, f, tmp_path, *extra), 6, contains="not a directory")


def test_mount_busy_mountpoint(mounts, tmp_path):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    for extra in ([], ["-d"]):
        fails(mount_args(meta, m.path, tmp_path, *extra), 6, contains="busy")
    # the first mount is untouched
    with open(os.path.join(m.path, "still"), "wb") as f:
        f.write(b"ok")
    assert os.listdir(m.path) == ["still"]


@pytest.mark.parametrize("background", [False, True])
def test_mount_unformatted(tmp_path, background):
    mp = tmp_path / "mp"
    mp.mkdir()
    meta = sqlite(tmp_path)
    extra = ["-d"] if background else []
    fails(mount_args(meta, mp, tmp_path, *extra), 5, contains="format")
    assert not os.path.exists(meta.split("://", 1)[1]), "mount created an empty database"
    assert not is_mounted(str(mp))


def test_mount_d_storage_gone(tmp_path, file_volume):
    shutil.rmtree(tmp_path / "objs")
    mp = tmp_path / "mp"
    mp.mkdir()
    msg = fails(mount_args(file_volume, mp, tmp_path, "-d"), 4, within=PROBE_LIMIT_S)
    assert "objs" in msg and "does not exist" in msg, msg
    assert not is_mounted(str(mp))


def test_mount_bad_option_values(tmp_path, file_volume):
    mp = tmp_path / "mp"
    mp.mkdir()
    fails(mount_args(file_volume, mp, tmp_path, "--cache-size", "huge"), 3, contains="size")
    fails(mount_args(file_volume, mp, tmp_path, "--io-timeout", "0"), 3, contains="io-timeout")
    fails(mount_args(file_volume, mp, tmp_path, "--metrics", "9567"), 3, contains="HOST:PORT")
    for bad in ("0", "nan", "301", "1e9"):
        fails(mount_args(file_volume, mp, tmp_path, "--flush-interval", bad), 3, contains="flush-interval")
    fails(mount_args(file_volume, mp, tmp_path, "--attr-timeout", "-1"), 3, contains="attr-timeout")
    fails(mount_args(file_volume, mp, tmp_path, "--entry-timeout", "nan"), 3, contains="entry-timeout")
    fails(mount_args(file_volume, mp, tmp_path, "--max-uploads", "0"), 3, contains="max-uploads")
    fails(["mount", file_volume, str(mp), "--log", str(tmp_path / "missing" / "log")], 3, contains="log file")
    fails(["mount", file_volume, str(mp), "-d", "--log", str(tmp_path)], 3, contains="log file")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for extra in ([], ["-d"]):
            fails(mount_args(file_volume, mp, tmp_path, "--metrics", f"127.0.0.1:{port}", *extra), 3,
                  contains="in use")
    assert not is_mounted(str(mp))
    rc, err, _ = run(*mount_args(file_volume, mp, tmp_path, "--attr-timeout", "soon"))
    assert rc == 2 and "Traceback" not in err  # argparse: usage + one error line


# ------------------------------------------------------------------------------- umount
def test_umount_not_mounted(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    fails(["umount", str(d)], 6, contains="not mounted")
    fails(["umount", str(tmp_path / "missing")], 6, contains="does not exist")


def test_umount_refuses_other_file_systems(tmp_path):
    """As root fusermount3 unmounts anything: umount of a tmpfs exited 0 and took
    the tmpfs, and its files, with it."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)]).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        (d / "important").write_bytes(b"data")
        for lazy in ([], ["--lazy"]):
            fails(["umount", str(d)] + lazy, 6, contains="not a curvefs mount")
        assert is_mounted(str(d)) and (d / "important").read_bytes() == b"data"
    finally:
        subprocess.run(["umount", str(d)])


def test_umount_busy(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    fd = os.open(os.path.join(m.path, "held"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fails(["umount", m.path], 6, contains="busy")
        assert is_mounted(m.path)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ gc, fsck
@pytest.mark.parametrize("cmd", ["gc", "fsck"])
def test_gc_fsck_without_a_volume_or_its_bucket(tmp_path, file_volume, cmd):
    fails([cmd, "mysql://h/db"], 3, contains="scheme")
    missing = sqlite(tmp_path)
    fails([cmd, missing], 5, contains="no volume")
    assert not os.path.exists(missing.split("://", 1)[1]), f"{cmd} created an empty database"
    shutil.rmtree(tmp_path / "objs")
    msg = fails([cmd, file_volume], 4, within=PROBE_LIMIT_S)
    assert "objs" in msg and "does not exist" in msg, msg


@pytest.mark.parametrize("cmd", ["gc", "fsck"])
def test_gc_fsck_when_s3_is_gone(tmp_path, cmd):
    fails([cmd, s3_volume_gone(tmp_path)], 4, contains="unreachable", within=PROBE_LIMIT_S)


def test_gc_bad_options(file_volume):
    for bad in ("-1", "nan", "inf"):  # nan would turn the age check off
        fails(["gc", file_volume, "--min-age", bad], 3, contains="min-age")
    fails(["gc", file_volume, "--threads", "0"], 3, contains="threads")


def test_daemon_log_drops_stale_fuse_replies(tmp_path):
    """pyfuse3 logs a reply the kernel refused at ERROR.  ENOENT there means the
    kernel no longer waits for it (an interrupted request, or a background RELEASE
    still running when unmount aborted the connection: a CI run failed on that
    line), so the daemon's log counts it and keeps it out of the log unless
    --debug; any other refused reply stays an ERROR."""
    script = (
        "import logging, sys\n"
        "from curvefs_py import metrics\n"
        "from curvefs_py.fuse.daemon import setup_logging\n"
        "setup_logging(sys.argv[1], sys.argv[2] == 'debug')\n"
        "log = logging.getLogger('pyfuse3')\n"
        "log.error('fuse_release(): fuse_reply_* failed with %s', 'No such file or directory')\n"
        "log.error('fuse_read(): fuse_reply_* failed with %s', 'Input/output error')\n"
        "print(metrics.get('fuse_stale_replies'))\n")
    for mode, stale_level in [("info", None), ("debug", "DEBUG")]:
        logf = tmp_path / f"{mode}.log"
        r = subprocess.run([CLI[0], "-c", script, str(logf), mode], capture_output=True,
                           text=True, cwd=ROOT, check=True)
        assert float(r.stdout) == 1
        lines = logf.read_text().splitlines()
        eio = [ln for ln in lines if "Input/output error" in ln]
        assert len(eio) == 1 and " ERROR " in eio[0]
        stale = [ln for ln in lines if "No such file" in ln]
        if stale_level is None:
            assert stale == []
        else:
            assert len(stale) == 1 and f" {stale_level} " in stale[0]


@pytest.mark.parametrize("cmd", ["info", "warmup"])
def test_info_warmup_outside_a_mount(tmp_path, cmd):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    fails([cmd, str(f)], 6, contains=f"{mount_point_of_tmp(tmp_path)} is not a curvefs mount")


def mount_point_of_tmp(path) -> str:
    """The mount point ``path`` is on, from mountinfo (what the CLI names)."""
    from curvefs_py.fuse.mountinfo import mount_point

    p = os.path.abspath(path)
    while mount_point(p) is None and p != "/":
        p = os.path.dirname(p)
    return p
