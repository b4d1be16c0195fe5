"""Shared fixtures: a loopback S3 server, formatted volumes, real mounts.

Tests from t4 on mount a real curvefs daemon in a subprocess and use only
``os.*`` calls.  An unexpected WARNING/ERROR line in a daemon's log fails the
test that owned the mount (``Mount.allow_log`` lists expected fragments).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import uuid

import pytest

from mounthelper import Mount, cli
import servers

faulthandler.register(signal.SIGUSR1, all_threads=True)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        skip = pytest.mark.skip(reason="FUSE tests need root and /dev/fuse")
        for item in items:
            if "mounts" in item.fixturenames or "volume" in item.fixturenames:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    srv = servers.start_s3_server(tmp_path_factory.mktemp("s3"))
    yield srv
    srv.stop()


class Mounts:
    """Factory for formatted + mounted volumes; everything is unmounted at teardown."""

    def __init__(self, tmp_path, s3_factory):
        self.tmp = tmp_path
        self._s3_factory = s3_factory
        self.mounts: list[Mount] = []
        self.allow_log: list[str] = []

    def format(self, storage: str = "file", name: str = "vol", extra=(), meta: str | None = None) -> str:
        """Format a volume; return its META_URL (``meta``, default a new SQLite file)."""
        meta = meta or f"sqlite3://{self.tmp}/{name}-{uuid.uuid4().hex[:6]}.db"
        if storage == "file":
            bucket = str(self.tmp / f"{name}-{uuid.uuid4().hex[:6]}-objects")  # a bucket is one volume's
            args = ["format", meta, name, "--storage", "file", "--bucket", bucket]
        else:
            s3 = self._s3_factory()
            bucket = s3.create_bucket(f"b{uuid.uuid4().hex[:12]}")
            args = ["format", meta, name, "--storage", "s3", "--bucket", bucket,
                    "--access-key", s3.access_key, "--secret-key", s3.secret_key]
        cli(*args, *extra)
        return meta

    def mount(self, meta: str, *options: str, name: str | None = None) -> Mount:
        name = name or f"mnt{len(self.mounts)}"
        m = Mount(meta, str(self.tmp / name), str(self.tmp / f"cache-{name}"),
                  str(self.tmp / f"{name}.log"), list(options))
        m.start()
        self.mounts.append(m)
        return m

    def close(self) -> list[str]:
        problems = []
        for m in self.mounts:
            try:
                m.stop()
            except Exception as exc:  # keep unmounting the others
                problems.append(f"stop {m.path}: {exc}")
            for line in m.log_problems():
                if not any(a in line for a in self.allow_log):
                    problems.append(line.strip())
        return problems


@pytest.fixture
def mounts(tmp_path, request):
    s3_holder = {}

    def s3_factory():
        if "s3" not in s3_holder:
            s3_holder["s3"] = request.getfixturevalue("s3")
        return s3_holder["s3"]

    ms = Mounts(tmp_path, s3_factory)
    yield ms
    problems = ms.close()
    if problems:
        pytest.fail("daemon log problems:\n" + "\n".join(problems[:20]))


@pytest.fixture(params=["file", "s3"])
def volume(request, mounts):
    """A mounted volume on each store: the mount's path as a str."""
    meta = mounts.format(request.param)
    return mounts.mount(meta)


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """A PostgreSQL cluster for the session (tests/servers.py); ``pg.new_database()``
    gives each test an empty database and its META_URL."""
    srv = servers.start_postgres(tmp_path_factory.mktemp("pg"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server for the session (tests/servers.py: AOF, appendfsync always);
    ``servers.redis_new_db(redis_server)`` gives a test an empty database's META_URL."""
    srv = servers.start_redis(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()
