"""``curvefs dump`` and ``curvefs load``: a volume's metadata moved to another engine.

A tree made through a real mount (directories, a multi-slice file, a sparse file, hard
and symbolic links, a fifo, xattrs, owners, modes, times, a name that is not UTF-8) is
dumped from SQLite and loaded into SQLite, Redis and PostgreSQL; each loaded volume,
mounted, shows the same tree with the same bytes (the data is not copied: the bucket is
shared), and takes new writes without touching the old objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat

import pytest

from curvefs_py.meta import open_engine

import servers
from mounthelper import cli, read_cold

MiB = 1 << 20


def make_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "d", "e"))
    f = os.path.join(root, "d", "e", "f")
    data = bytearray(random.Random(1).randbytes(5 * MiB))
    with open(f, "wb") as fh:
        fh.write(data)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(5):  # more slices over the first
            os.pwrite(fd, bytes([i]) * 1000, i * 777_777)
            os.fsync(fd)
    finally:
        os.close(fd)
    os.link(f, os.path.join(root, "hardlink"))
    os.symlink("d/e/f", os.path.join(root, "symlink"))
    os.mkfifo(os.path.join(root, "fifo"), 0o640)
    with open(os.path.join(root, "sparse"), "wb") as fh:
        fh.truncate(100 * MiB)
        fh.seek(50 * MiB)
        fh.write(b"middle")
        fh.seek(70 * MiB)  # in the second 64 MiB chunk
        fh.write(b"second chunk")
    os.mknod(os.path.join(root, "null"), 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    with open(os.path.join(root, "setuid"), "wb") as fh:
        fh.write(b"#!/bin/sh\n")
    os.chmod(os.path.join(root, "setuid"), 0o4755)
    os.setxattr(os.path.join(root, "d"), "user.on-a-dir", b"yes")
    with open(os.path.join(root.encode(), b"caf\xe9"), "wb") as fh:
        fh.write(b"latin-1 name")
    os.setxattr(f, "user.k", b"\x00\xffbinary")
    os.chown(os.path.join(root, "d"), 1000, 1001)
    os.chmod(os.path.join(root, "d"), 0o1750)
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_100_000_000_123_456_789))


def snapshot(root: str) -> dict:
    """Everything a user sees of the tree (atime left out), hard links by group."""
    out, groups = {}, {}
    broot = root.encode()
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rec = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
                   "size": st.st_size, "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns,
                   "link": groups.setdefault(st.st_ino, len(groups)),
                   "xattrs": {x: os.getxattr(p, x, follow_symlinks=False)
                              for x in os.listxattr(p, follow_symlinks=False)}}
            if stat.S_ISCHR(st.st_mode):
                rec["rdev"] = st.st_rdev
            if stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                rec["sha"] = hashlib.sha256(read_cold(p)).hexdigest()
            out[os.path.relpath(p, broot)] = rec
    st = os.stat(root)
    out[b"."] = {"mode": st.st_mode, "uid": st.st_uid, "mtime": st.st_mtime_ns}
    return out


@pytest.fixture
def dumped(mounts, tmp_path):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    make_tree(m.path)
    before = snapshot(m.path)
    m.stop()
    dump = str(tmp_path / "vol.dump")
    r = cli("dump", meta, dump)
    assert "dumped 10 inodes, 10 entries" in r.stderr, r.stderr
    return meta, dump, before


@pytest.mark.parametrize("engine", ["sqlite", "redis", "postgres"])
def test_a_volume_moves_to_another_engine(mounts, tmp_path, request, dumped, engine):
    meta, dump, before = dumped
    target = {"sqlite": lambda: f"sqlite3://{tmp_path}/moved.db",
              "redis": lambda: servers.redis_new_db(request.getfixturevalue("redis_server")),
              "postgres": lambda: request.getfixturevalue("pg").new_database()}[engine]()
    r = cli("load", target, dump)
    assert "loaded volume vol: 10 inodes" in r.stderr
    assert cli("fsck", target).returncode == 0
    usage = [json.loads(cli("status", u, "--json").stdout)["usage"] for u in (meta, target)]
    assert [(x["used_space"], x["used_inodes"]) for x in usage] == \
        [(usage[0]["used_space"], usage[0]["used_inodes"])] * 2
    m = mounts.mount(target, name="moved")
    assert snapshot(m.path) == before
    # the moved volume takes writes: new slices get new ids, the old objects stay whole
    with open(os.path.join(m.path, "new"), "wb") as fh:
        fh.write(random.Random(2).randbytes(3 * MiB))
    with open(os.path.join(m.path, "d", "e", "f"), "r+b") as fh:
        fh.write(b"overwritten")
    with open(os.path.join(m.path, "hardlink"), "rb") as fh:
        assert fh.read(11) == b"overwritten"
    new_ino = os.stat(os.path.join(m.path, "new")).st_ino
    m.stop()
    dumped_max = json.loads(open(dump).read().splitlines()[-1])["end"]["max_slice_id"]
    e = open_engine(target)
    try:
        new_ids = {sid for sid, _, ino in e.scan_slices() if ino == new_ino}
    finally:
        e.close()
    assert new_ids and min(new_ids) > dumped_max, (new_ids, dumped_max)  # ids go on past the dump's
    r = json.loads(cli("gc", target, "--json", "--min-age", "0").stdout)
    assert (r["leaked"], r["broken_files"]) == (0, 0), r
    m.start()
    after = snapshot(m.path)
    for name in (b"sparse", b"caf\xe9", b"symlink"):  # untouched files (link groups renumbered)
        assert {**after[name], "link": 0} == {**before[name], "link": 0}, name


def fails(*args: str, code: int, contains: str) -> None:
    r = cli(*args, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and contains in lines[0], (r.returncode, r.stderr)


def test_load_refuses_bad_input(mounts, tmp_path, dumped):
    meta, dump, _ = dumped
    fails("load", meta, dump, code=5, contains="already holds a volume")  # the source itself
    lines = open(dump).read().splitlines()

    def dump_file(name: str, text: str | bytes) -> str:
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(p)

    cut = f"sqlite3://{tmp_path}/cut.db"
    fails("load", cut, dump_file("cut", "\n".join(lines[:-1]) + "\n"), code=3, contains="ends early")
    # what the failed load left is refused until loaded anew into a new database
    mp = tmp_path / "mp"
    mp.mkdir()
    for args in (("mount", cut, str(mp), "--cache-dir", str(tmp_path / "c")), ("gc", cut), ("fsck", cut),
                 ("dump", cut, str(tmp_path / "again")), ("format", cut, "vol", "--force")):
        fails(*args, code=5, contains="did not finish")
    assert "loading" in cli("status", cut, "--json").stdout
    fails("load", cut, dump, code=5, contains="already holds a volume")
    # and its slice-id counter is past the dump's ids already
    e = open_engine(cut)
    try:
        assert e.next_slice_id() > json.loads(lines[-1])["end"]["max_slice_id"]
    finally:
        e.close()

    # a record lost from the middle (a file) or the root's: damaged, not loaded quietly
    lost = next(i for i, ln in enumerate(lines) if '"chunks"' in ln and '"parent"' in ln)
    fails("load", f"sqlite3://{tmp_path}/l1.db", dump_file("lost", "\n".join(lines[:lost] + lines[lost + 1:]) + "\n"),
          code=3, contains="damaged")
    fails("load", f"sqlite3://{tmp_path}/l2.db", dump_file("noroot", "\n".join(lines[:1] + lines[2:]) + "\n"),
          code=3, contains="no root record")
    fails("load", f"sqlite3://{tmp_path}/b1.db", dump_file("bad", '{"some": "json"}\n'),
          code=3, contains="not a curvefs dump")
    fails("load", f"sqlite3://{tmp_path}/b2.db", dump_file("bin", lines[0].encode() + b"\n\xff\xfe\n"),
          code=3, contains="can't decode")
    rec = json.loads(lines[2])
    rec["xattrs"] = ["a list"]
    fails("load", f"sqlite3://{tmp_path}/b3.db", dump_file("xl", "\n".join([lines[0], lines[1], json.dumps(rec)]) + "\n"),
          code=3, contains="line 3 of the dump is malformed")
    fails("load", f"sqlite3://{tmp_path}/b4.db", str(tmp_path / "nope"), code=3, contains="No such file")
    fails("dump", f"sqlite3://{tmp_path}/none.db", str(tmp_path / "x"), code=5, contains="no volume")
    assert not os.path.exists(tmp_path / "x")
    fails("dump", meta, str(tmp_path), code=3, contains="is a directory")
