"""POSIX behaviour through a real mount, with real syscalls, on both stores (file and S3)."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import time

import pytest


def p(m, *parts):
    return os.path.join(m.path, *parts)


def write(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def expect_errno(code, fn, *args, **kw):
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value!r}"


def test_file_roundtrip_and_attrs(volume):
    f = p(volume, "a.txt")
    write(f, b"hello world")
    assert read(f) == b"hello world"
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 and st.st_nlink == 1
    assert st.st_uid == os.getuid()
    write(f, b"!", "ab")  # O_APPEND
    assert read(f) == b"hello world!"
    write(f, b"new")  # O_TRUNC
    assert read(f) == b"new"
    expect_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    expect_errno(errno.ENOENT, os.stat, p(volume, "missing"))
    expect_errno(errno.ENOTDIR, os.stat, p(volume, "a.txt", "x"))


def test_random_writes_overwrite_sparse(volume):
    f = p(volume, "sparse")
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"A" * 10000, 0)
        os.pwrite(fd, b"B" * 100, 5000)
        os.pwrite(fd, b"C" * 10, 3 * (1 << 20) + 5)  # hole in between
        os.fsync(fd)
        big = 5 << 30  # past 4 GiB
        os.pwrite(fd, b"far", big)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(f)
    assert st.st_size == (5 << 30) + 3
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 10000, 0) == b"A" * 5000 + b"B" * 100 + b"A" * 4900
        assert os.pread(fd, 20, 3 * (1 << 20)) == b"\0" * 5 + b"C" * 10 + b"\0" * 5
        assert os.pread(fd, 4096, 1 << 30) == b"\0" * 4096
        assert os.pread(fd, 10, big - 2) == b"\0\0far"
    finally:
        os.close(fd)


def test_o_trunc_drops_writes_still_buffered(volume):
    """open(O_TRUNC) empties the file also of another fd's writes this mount holds
    uncommitted (it looked at the committed length only, 0, and truncated nothing)."""
    f = p(volume, "trunc")
    fd1 = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd1, b"A" * 100000)
        fd2 = os.open(f, os.O_WRONLY | os.O_TRUNC)
        assert os.fstat(fd2).st_size == 0
        os.write(fd2, b"hello")
        os.close(fd2)
    finally:
        os.close(fd1)
    assert read(f) == b"hello"
    # an empty file too: its mtime and ctime move (POSIX; ext4 and tmpfs do)
    e = p(volume, "empty")
    write(e, b"")
    os.utime(e, (1_000_000, 1_000_000))
    ctime = os.stat(e).st_ctime_ns
    time.sleep(0.01)
    os.close(os.open(e, os.O_WRONLY | os.O_TRUNC))
    st = os.stat(e)
    assert st.st_mtime > 1_000_000 and st.st_ctime_ns > ctime and st.st_size == 0


def test_truncate_down_up(volume):
    f = p(volume, "t")
    write(f, bytes(range(256)) * 64)  # 16 KiB
    os.truncate(f, 1000)
    assert os.stat(f).st_size == 1000
    os.truncate(f, 5000)
    data = read(f)
    assert data[:1000] == (bytes(range(256)) * 4)[:1000]
    assert data[1000:] == b"\0" * 4000
    with open(f, "r+b") as fh:
        fh.truncate(0)
    assert read(f) == b""


def test_chmod_chown_utimens(volume):
    f = p(volume, "m")
    write(f, b"x")
    os.chmod(f, 0o600)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(f, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(f)
    assert st.st_atime_ns == 1_000_000_000_123 and st.st_mtime_ns == 2_000_000_000_456
    before = time.time_ns()
    os.utime(f)  # UTIME_NOW
    assert os.stat(f).st_mtime_ns >= before - 2_000_000_000


def test_directories(volume):
    d = p(volume, "d")
    os.mkdir(d, 0o755)
    assert stat.S_ISDIR(os.stat(d).st_mode)
    assert os.stat(d).st_nlink == 2
    os.mkdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 3
    write(os.path.join(d, "f"), b"1")
    expect_errno(errno.EEXIST, os.mkdir, d)
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, os.path.join(d, "f"))
    expect_errno(errno.EISDIR, os.unlink, os.path.join(d, "sub"))
    assert sorted(os.listdir(d)) == ["f", "sub"]
    fd = os.open(d, os.O_RDONLY)
    try:
        names = set(os.listdir(fd))
    finally:
        os.close(fd)
    assert names == {"f", "sub"}
    os.unlink(os.path.join(d, "f"))
    os.rmdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 2
    os.rmdir(d)
    assert not os.path.exists(d)


def test_dot_entries_in_readdir(volume):

    d = p(volume, "dots")
    os.mkdir(d)
    # os.listdir hides . and ..; scandir too; use ls -a through a subprocess
    import subprocess

    out = subprocess.run(["ls", "-a", d], capture_output=True, text=True, check=True).stdout.split()
    assert out == [".", ".."]


def test_readdir_stable_while_changing(volume):
    d = p(volume, "many")
    os.mkdir(d)
    for i in range(300):
        write(os.path.join(d, f"f{i:04d}"), b"")
    seen = []
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i == 10:  # delete and create while listing
                for j in range(100, 200):
                    os.unlink(os.path.join(d, f"f{j:04d}"))
                write(os.path.join(d, "zz-new"), b"")
    assert len(seen) == len(set(seen)), "an entry was reported twice"
    assert set(f"f{i:04d}" for i in range(300)) <= set(seen) | set(f"f{j:04d}" for j in range(100, 200))


def test_symlink_readlink(volume):
    t = p(volume, "target")
    write(t, b"data")
    lnk = p(volume, "lnk")
    os.symlink("target", lnk)
    assert os.readlink(lnk) == "target"
    assert stat.S_ISLNK(os.lstat(lnk).st_mode)
    assert read(lnk) == b"data"
    os.symlink("/nonexistent/x", p(volume, "dangling"))
    expect_errno(errno.ENOENT, os.stat, p(volume, "dangling"))
    expect_errno(errno.EINVAL, os.readlink, t)


def test_hardlinks(volume):
    a = p(volume, "a")
    write(a, b"shared")
    os.link(a, p(volume, "b"))
    assert os.stat(a).st_nlink == 2
    assert os.stat(a).st_ino == os.stat(p(volume, "b")).st_ino
    write(p(volume, "b"), b"changed")
    assert read(a) == b"changed"
    os.unlink(a)
    assert os.stat(p(volume, "b")).st_nlink == 1
    assert read(p(volume, "b")) == b"changed"
    os.mkdir(p(volume, "dir"))
    expect_errno(errno.EPERM, os.link, p(volume, "dir"), p(volume, "dirlink"))


def test_rename_cases(volume):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(a, b, flags):
        AT_FDCWD = -100
        if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    a, b = p(volume, "ra"), p(volume, "rb")
    write(a, b"A")
    write(b, b"B")
    os.rename(a, b)  # replace atomically
    assert read(b) == b"A" and not os.path.exists(a)
    write(a, b"A2")
    expect_errno(errno.EEXIST, renameat2, a, b, 1)  # RENAME_NOREPLACE
    renameat2(a, b, 2)  # RENAME_EXCHANGE
    assert read(a) == b"A" and read(b) == b"A2"
    d1, d2 = p(volume, "d1"), p(volume, "d2")
    os.makedirs(os.path.join(d1, "inner"))
    os.mkdir(d2)
    write(os.path.join(d1, "inner", "f"), b"deep")
    os.rename(os.path.join(d1, "inner"), os.path.join(d2, "moved"))
    assert read(os.path.join(d2, "moved", "f")) == b"deep"
    assert os.stat(d1).st_nlink == 2 and os.stat(d2).st_nlink == 3
    expect_errno(errno.EINVAL, os.rename, d2, os.path.join(d2, "moved", "x"))
    os.mkdir(p(volume, "empty"))
    os.rename(d1, p(volume, "empty"))  # dir over empty dir
    assert not os.path.exists(d1)
    expect_errno(errno.ENOTEMPTY, os.rename, p(volume, "empty"), d2)
    expect_errno(errno.EISDIR, os.rename, a, d2)
    expect_errno(errno.ENOTDIR, os.rename, d2, a)


def test_name_too_long(volume):
    expect_errno(errno.ENAMETOOLONG, open, p(volume, "x" * 256), "wb")
    expect_errno(errno.ENAMETOOLONG, os.mkdir, p(volume, "y" * 300))
    write(p(volume, "z" * 255), b"ok")
    assert read(p(volume, "z" * 255)) == b"ok"


def test_fifo_mknod(volume):
    f = p(volume, "fifo")
    os.mkfifo(f, 0o600)
    assert stat.S_ISFIFO(os.stat(f).st_mode)


def test_xattrs(volume):
    f = p(volume, "x")
    write(f, b"")
    os.setxattr(f, "user.k", b"v1")
    assert os.getxattr(f, "user.k") == b"v1"
    assert "user.k" in os.listxattr(f)
    expect_errno(errno.EEXIST, os.setxattr, f, "user.k", b"v2", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, f, "user.none", b"v2", os.XATTR_REPLACE)
    os.setxattr(f, "user.k", b"v3", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.k") == b"v3"
    os.removexattr(f, "user.k")
    expect_errno(errno.ENODATA, os.getxattr, f, "user.k")
    expect_errno(errno.EOPNOTSUPP, os.setxattr, f, "bogus.k", b"v")  # no such namespace


def test_mount_is_noatime(volume):
    """The daemon keeps no access times (JuiceFS's default too): the mount says
    noatime rather than relatime, and a read leaves atime alone."""
    with open("/proc/self/mountinfo") as f:
        opts = [ln.split()[5] for ln in f if ln.split()[4] == volume.path]
    assert len(opts) == 1 and "noatime" in opts[0].split(","), opts
    f = p(volume, "a")
    write(f, b"data")
    os.utime(f, (1_000_000, 2_000_000))
    read(f)
    assert os.stat(f).st_atime == 1_000_000


def test_a_write_strips_file_capabilities(volume):
    """The kernel asks for security.capability before each write (to strip it, as a
    write to a setuid file strips the bit).  The daemon answers a new file's "none"
    without the metadata, but never once a capability is set."""
    f = p(volume, "cap")
    s0 = volume.stats()
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o755)
    try:
        for _ in range(3):
            os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    s1 = volume.stats()
    asked, cached = (s1.get(k, 0) - s0.get(k, 0) for k in ("fuse_op_getxattr_count", "vfs_xattr_caps_cached"))
    assert asked >= 1 and cached == asked, (asked, cached)
    # VFS_CAP_REVISION_2 with the effective flag, permitted = CAP_NET_BIND_SERVICE
    caps = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)
    os.setxattr(f, "security.capability", caps)
    assert os.getxattr(f, "security.capability") == caps
    with open(f, "r+b") as fh:
        fh.write(b"y")
    expect_errno(errno.ENODATA, os.getxattr, f, "security.capability")
    assert read(f)[:2] == b"yx"


def test_statfs(volume):
    write(p(volume, "s"), b"x" * 100000)
    st = os.statvfs(volume.path)
    assert st.f_bsize == 4096 and st.f_blocks > 0 and st.f_namemax == 255
    assert st.f_files - st.f_ffree >= 2  # root + the file


def test_unlink_while_open(volume):
    f = p(volume, "open-unlinked")
    write(f, b"still here" * 1000)
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not os.path.exists(f)
        assert os.pread(fd, 10, 0) == b"still here"
        os.pwrite(fd, b"more", 10000)
        assert os.pread(fd, 4, 10000) == b"more"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert not os.path.exists(f)


def _as_user(uid, gid, fn):
    """Run fn() in a forked child as uid/gid; returns its exit code (0 = fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_permissions_enforced_for_other_users(volume):
    # the test's tmp dirs are private to root: the child works through a dir fd
    # opened before it drops privileges
    os.mkdir(p(volume, "private"), 0o700)
    write(p(volume, "private", "secret"), b"s")
    os.mkdir(p(volume, "pub"), 0o755)
    write(p(volume, "pub", "ro"), b"r")
    os.chmod(p(volume, "pub", "ro"), 0o644)
    root_fd = os.open(volume.path, os.O_RDONLY | os.O_DIRECTORY)

    def child():
        denied = 0
        for fn in (lambda: os.listdir(os.open("private", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)),
                   lambda: os.open("pub/new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=root_fd),
                   lambda: os.open("pub/ro", os.O_WRONLY, dir_fd=root_fd),
                   lambda: os.chmod("pub/ro", 0o777, dir_fd=root_fd)):
            try:
                fn()
            except PermissionError:
                denied += 1
        # and what is allowed works
        with os.fdopen(os.open("pub/ro", os.O_RDONLY, dir_fd=root_fd), "rb") as f:
            return denied == 4 and f.read() == b"r"

    try:
        assert _as_user(65534, 65534, child) == 0
    finally:
        os.close(root_fd)


def test_new_file_owned_by_caller(volume):
    os.chmod(volume.path, 0o777)
    root_fd = os.open(volume.path, os.O_RDONLY | os.O_DIRECTORY)

    def child():
        fd = os.open("mine", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=root_fd)
        os.write(fd, b"m")
        os.close(fd)
        os.mkdir("minedir", dir_fd=root_fd)
        return True

    try:
        assert _as_user(1234, 4321, child) == 0
    finally:
        os.close(root_fd)
    st = os.stat(p(volume, "mine"))
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    st = os.stat(p(volume, "minedir"))
    assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_large_file_checksum(volume):
    f = p(volume, "big")
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(f, "wb") as fh:
        for i in range(64):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            fh.write(chunk)
    assert os.stat(f).st_size == 64 << 20
    h2 = hashlib.sha256()
    with open(f, "rb") as fh:
        while True:
            b = fh.read(1 << 20)
            if not b:
                break
            h2.update(b)
    assert h.hexdigest() == h2.hexdigest()


def test_remount_keeps_everything(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    os.makedirs(os.path.join(m.path, "a", "b"))
    write(os.path.join(m.path, "a", "b", "f"), b"persist" * 1000)
    os.symlink("a/b/f", os.path.join(m.path, "l"))
    m.stop()
    m.start()
    assert read(os.path.join(m.path, "l")) == b"persist" * 1000
    assert os.listdir(os.path.join(m.path, "a")) == ["b"]


def test_internal_files(volume):
    stats = volume.stats()
    assert "fuse_op_lookup_count" in stats or "fuse_op_getattr_count" in stats
    import json

    with open(p(volume, ".config")) as f:
        cfg = json.load(f)
    assert cfg["pid"] == volume.proc.pid
    assert "secret_key" not in cfg["format"]
    assert ".stats" not in os.listdir(volume.path)
