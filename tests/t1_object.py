"""Object layer: one conformance suite for every ``ObjectStore``, then each store's failures.

The ``store`` fixture runs each conformance test against ``FileStore`` (a temp
directory) and ``S3Store`` (moto S3 under waitress on loopback, one server per
module, a fresh bucket per test).  Failure tests use real failures: a missing
bucket, a closed port, a listener that never answers, a server that is frozen
(SIGSTOP) or stopped mid-run, and a server started with signature checks on.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import time
import uuid

import pytest

from curvefs_py import metrics
from curvefs_py.errors import AccessDenied, NoSuchBucket, NoSuchKey, ObjectStoreError, QuietError
from curvefs_py.object import RetryPolicy, open_store
from curvefs_py.object.file import FileStore
from curvefs_py.object.retry import RetriesExhausted, TemporaryFailure, is_temp_failure, retry
from curvefs_py.object.s3 import S3Store

try:
    from tests.servers import Blackhole, free_port, start_s3_server
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from servers import Blackhole, free_port, start_s3_server

#: a policy that gives up in about a second (total outage tests)
FAST = RetryPolicy(attempts=100, base_delay=0.02, max_delay=0.2, deadline=1.0)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)
    return text


def delta(name: str, before: dict) -> float:
    return metrics.get(name) - before.get(name, 0)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


def new_bucket(server) -> str:
    return server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        st = FileStore(str(tmp_path / "objects"), create=True)
    else:
        server = request.getfixturevalue("s3_server")
        st = S3Store(new_bucket(server), server.access_key, server.secret_key,
                     retry_policy=RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.5, deadline=5))
    yield st
    st.close()


# ------------------------------------------------------------------------- conformance


def test_put_get_head(store):
    store.put("chunks/0/0/1_0_5", b"hello")
    store.put("empty", b"")
    assert store.get("chunks/0/0/1_0_5") == b"hello"
    assert store.head("chunks/0/0/1_0_5") == 5
    assert store.get("empty") == b""
    assert store.head("empty") == 0
    store.put("chunks/0/0/1_0_5", b"hello")  # a retried put rewrites the same bytes
    assert store.get("chunks/0/0/1_0_5") == b"hello"


@pytest.mark.parametrize("off,limit", [(0, -1), (0, 4), (3, 4), (3, -1), (9, 1), (9, 5), (10, -1),
                                       (10, 3), (50, 2), (0, 0), (5, 0), (0, 100)])
def test_range_get(store, off, limit):
    data = b"0123456789"
    store.put("r", data)
    want = data[off:] if limit < 0 else data[off:off + limit]
    assert store.get("r", off, limit) == want


def test_list_order_and_prefix(store):
    # '-' < '/' < '0': key order is not directory-walk order
    objs = {"a-c": 1, "a/b": 2, "a/c/d": 3, "a/c0": 4, "a0": 5, "b": 6, "chunks/1/1000/1000000_0_7": 7,
            "chunks/1/1000/1000001_0_8": 8, "chunks/10/x": 9, "é": 10}
    for key, size in objs.items():
        store.put(key, b"x" * size)
    for prefix in ["", "a", "a/", "a/c", "a/c/", "a/c/d", "chunks/1", "chunks/1/", "chunks/1/1000/10000",
                   "zz", "a/c/d/"]:
        want = sorted((k, s) for k, s in objs.items() if k.startswith(prefix))
        assert [(o.key, o.size) for o in store.list(prefix)] == want, prefix


def test_list_pages(store):
    if isinstance(store, S3Store):
        store.list_page_size = 3  # exercise continuation
    keys = [f"p/{i:03d}" for i in range(11)]
    for k in keys:
        store.put(k, b"z")
    assert [o.key for o in store.list("p/")] == keys


def test_list_gives_upload_time(store):
    before = time.time()
    store.put("t/a", b"xyz")
    [o] = store.list("t/")
    assert (o.key, o.size) == ("t/a", 3)
    # S3 LastModified has whole seconds
    assert before - 2 <= o.mtime <= time.time() + 1, (before, o.mtime)


def test_delete_idempotent(store):
    store.put("d/1/x", b"abc")
    store.put("d/2", b"abc")
    store.delete("d/1/x")
    store.delete("d/1/x")
    store.delete("never/was/here")
    with pytest.raises(NoSuchKey):
        store.get("d/1/x")
    with pytest.raises(NoSuchKey):
        store.head("d/1/x")
    assert [(o.key, o.size) for o in store.list("d/")] == [("d/2", 3)]


def test_missing_key(store):
    with pytest.raises(NoSuchKey) as exc:
        store.get("no/such/key")
    assert "no/such/key" in one_line(exc.value)
    with pytest.raises(NoSuchKey):
        store.head("no/such/key")
    with pytest.raises(NoSuchKey):
        store.get("no/such/key", 5, 10)


def test_large_object(store):
    data = random.Random(1).randbytes(8 << 20)
    store.put("big", data)
    assert store.head("big") == len(data)
    assert store.get("big") == data
    assert store.get("big", (4 << 20) - 100, 1 << 20) == data[(4 << 20) - 100:(5 << 20) - 100]
    assert store.get("big", len(data) - 10) == data[-10:]


def test_concurrent_puts(store):
    rnd = random.Random(2)
    objs = {f"chunks/{i % 3}/{i % 7}/{i}_0": rnd.randbytes(rnd.randrange(1, 64 << 10)) for i in range(120)}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put(*kv), objs.items()))
        got = dict(zip(objs, pool.map(store.get, objs)))
    assert got == objs
    assert [(o.key, o.size) for o in store.list("chunks/")] == sorted((k, len(v)) for k, v in objs.items())
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(store.delete, objs))
    assert list(store.list()) == []


def test_put_is_atomic(store):
    """Readers racing writers of one key see nothing or the whole object, never a part."""
    data = os.urandom(1 << 20)
    seen = set()

    def reader():
        for _ in range(30):
            try:
                seen.add(len(store.get("atomic")))
            except NoSuchKey:
                seen.add(None)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(reader) for _ in range(4)] + [pool.submit(store.put, "atomic", data)
                                                          for _ in range(4)]
        for f in futs:
            f.result()
    assert seen <= {None, len(data)}
    assert store.get("atomic") == data


def test_metrics(store):
    before = metrics.snapshot()
    store.put("m", b"12345")
    store.get("m")
    store.get("m", 1, 2)
    store.head("m")
    store.delete("m")
    with pytest.raises(NoSuchKey):
        store.get("m")
    assert delta("object_put_count", before) == 1
    assert delta("object_put_bytes", before) == 5
    assert delta("object_get_count", before) == 2
    assert delta("object_get_bytes", before) == 7
    assert delta("object_head_count", before) == 1
    assert delta("object_delete_count", before) == 1
    assert delta("object_errors", before) == 1
    assert delta("object_retries", before) == 0


def test_check(store):
    store.check()
    assert list(store.list()) == []  # the probe object is gone


# ---------------------------------------------------------------------------- FileStore


def test_file_missing_root(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(NoSuchBucket) as exc:
        FileStore(str(root))
    assert str(root) in one_line(exc.value)
    with pytest.raises(NoSuchBucket):
        open_store("file", str(root))
    st = open_store("file", f"file://{root}", create=True)
    assert root.is_dir()
    st.check()
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(ObjectStoreError) as exc:
        FileStore(str(tmp_path / "afile"), create=True)
    assert "not a directory" in one_line(exc.value)


def test_file_layout(tmp_path):
    st = FileStore(str(tmp_path), create=True)
    st.put("chunks/0/1/1234_0_3", b"abc")
    assert (tmp_path / "chunks/0/1/1234_0_3").read_bytes() == b"abc"
    assert os.listdir(tmp_path / "chunks/0/1") == ["1234_0_3"]  # no temporary file left
    (tmp_path / "chunks/0/1/.tmp-deadbeef").write_bytes(b"half")  # a crash left it
    assert [(o.key, o.size) for o in st.list()] == [("chunks/0/1/1234_0_3", 3)]
    # gc finds and removes such leftovers (list_partial / delete_partial), nothing else
    assert [(o.key, o.size) for o in st.list_partial("chunks/")] == [("chunks/0/1/.tmp-deadbeef", 4)]
    with pytest.raises(ValueError):
        st.delete_partial("chunks/0/1/1234_0_3")
    st.delete_partial("chunks/0/1/.tmp-deadbeef")
    st.delete_partial("chunks/0/1/.tmp-deadbeef")  # idempotent
    assert list(st.list_partial()) == [] and st.get("chunks/0/1/1234_0_3") == b"abc"
    (tmp_path / "chunks/7/7").mkdir(parents=True)
    (tmp_path / "chunks/7/7/.tmp-alone").write_bytes(b"x")
    st.delete_partial("chunks/7/7/.tmp-alone")
    assert not (tmp_path / "chunks/7").exists()  # the fan-out it emptied is pruned
    st.put("chunks/0/2/1_0_1", b"z")
    st.delete("chunks/0/1/1234_0_3")
    assert sorted(os.listdir(tmp_path / "chunks/0")) == ["2"]  # emptied fan-out dir pruned
    st.delete("chunks/0/2/1_0_1")
    assert os.listdir(tmp_path) == []  # the root stays


def test_file_bad_keys(tmp_path):
    st = FileStore(str(tmp_path), create=True)
    for key in ["", "/abs", "a//b", "a/../b", "./a", "a/", ".tmp-x", "a/.tmp-y", "x" * 256]:
        with pytest.raises(ValueError):
            st.put(key, b"")
    st.put("a", b"1")
    with pytest.raises(ObjectStoreError) as exc:
        st.put("a/b", b"2")
    assert "collides" in one_line(exc.value)
    with pytest.raises(NoSuchKey):
        st.get("a/b")
    st.delete("a/b")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_file_permission_denied(tmp_path):
    st = FileStore(str(tmp_path / "ro"), create=True)
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(AccessDenied) as exc:
            st.put("x", b"1")
        one_line(exc.value)
    finally:
        os.chmod(tmp_path / "ro", 0o700)


# ------------------------------------------------------------------------------ S3Store


def test_s3_missing_bucket(s3_server):
    st = S3Store(s3_server.url("no-such-bucket"), s3_server.access_key, s3_server.secret_key,
                 retry_policy=FAST)
    before = metrics.snapshot()
    t0 = time.monotonic()
    for fn in (st.check, lambda: st.get("k"), lambda: st.put("k", b"v"), lambda: list(st.list())):
        with pytest.raises(NoSuchBucket) as exc:
            fn()
        assert one_line(exc.value) == f"bucket no-such-bucket does not exist at {s3_server.endpoint}"
    assert time.monotonic() - t0 < 2
    assert delta("object_retries", before) == 0


def test_s3_wrong_port_fails_fast():
    port = free_port()
    st = open_store("s3", f"http://127.0.0.1:{port}/bucket", "testing", "testing")  # default policy
    t0 = time.monotonic()
    with pytest.raises(ObjectStoreError) as exc:
        st.check()
    assert time.monotonic() - t0 < 3
    msg = one_line(exc.value)
    assert msg.startswith(f"http://127.0.0.1:{port} unreachable: "), msg


def test_s3_hanging_endpoint_check_fails_fast():
    """A listener that never answers: the probe's short timeouts end it in seconds."""
    with Blackhole() as hole:
        st = S3Store(f"{hole.endpoint}/bucket", "testing", "testing")  # default timeouts
        t0 = time.monotonic()
        with pytest.raises(ObjectStoreError) as exc:
            st.check()
        elapsed = time.monotonic() - t0
    assert elapsed < 6, elapsed
    assert "unreachable" in one_line(exc.value)


def test_s3_outage_mid_run(tmp_path, caplog):
    """Freeze the server (read timeouts), resume it (the store recovers), stop it (refused)."""
    server = start_s3_server(tmp_path)
    try:
        st = S3Store(server.create_bucket("outage"), server.access_key, server.secret_key,
                     connect_timeout=0.3, read_timeout=0.3, retry_policy=FAST)
        st.put("k", b"before")
        caplog.set_level(logging.DEBUG, logger="curvefs_py.object.retry")
        before = metrics.snapshot()
        with server.outage():
            t0 = time.monotonic()
            with pytest.raises(RetriesExhausted) as exc:
                st.get("k")
            elapsed = time.monotonic() - t0
        assert FAST.deadline * 0.5 < elapsed < FAST.deadline + 0.3 + 1.0, elapsed
        assert one_line(exc.value).startswith(f"{server.endpoint} unreachable: GET k: ")
        assert isinstance(exc.value, ObjectStoreError)
        retries = delta("object_retries", before)
        assert retries >= 1
        assert delta("object_errors", before) == 1
        assert sum("retry" in r.getMessage() for r in caplog.records) == retries

        assert st.get("k") == b"before"  # back to normal after the outage
        st.put("k2", b"after")

        server.stop()
        before = metrics.snapshot()
        t0 = time.monotonic()
        with pytest.raises(RetriesExhausted) as exc:
            st.put("k3", b"lost")
        assert time.monotonic() - t0 < FAST.deadline + 1.0
        assert "unreachable" in one_line(exc.value)
        assert delta("object_retries", before) >= 3
        # a one-second outage is not worth a warning (WARNING starts 5 s into an outage)
        assert max(r.levelno for r in caplog.records) == logging.INFO
    finally:
        server.stop()


def test_s3_bad_credentials(tmp_path):
    try:
        server = start_s3_server(tmp_path, auth=True)
    except RuntimeError as exc:
        pytest.skip(f"cannot start moto with signature checks: {exc}")
    try:
        url = server.create_bucket("auth")
        good = S3Store(url, server.access_key, server.secret_key, retry_policy=FAST)
        good.check()
        before = metrics.snapshot()
        for ak, sk in [(server.access_key, "wrong-secret"), ("AKIAIOSFODNN7EXAMPLE", "whatever")]:
            bad = S3Store(url, ak, sk, retry_policy=FAST)
            for fn in (bad.check, lambda: bad.get("k"), lambda: bad.head("k")):
                with pytest.raises(AccessDenied) as exc:
                    fn()
                msg = one_line(exc.value)
                assert msg.startswith(f"access denied by {server.endpoint}")
                assert msg.endswith("check --access-key/--secret-key")
        assert delta("object_retries", before) == 0
    finally:
        server.stop()


def test_s3_http_ignores_ca_bundle(s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
    st = S3Store(new_bucket(s3_server), s3_server.access_key, s3_server.secret_key, retry_policy=FAST)
    st.check()


def test_s3_credentials_from_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    st = open_store("s3", new_bucket(s3_server))
    st.put("k", b"v")
    assert st.get("k") == b"v"
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDenied) as exc:
        open_store("s3", s3_server.url("x-bucket"), access_key="only-the-key")
    assert "--secret-key" in one_line(exc.value)


@pytest.mark.parametrize("url", ["ftp://h/b", "http://127.0.0.1:9000", "http://127.0.0.1:9000/",
                                 "http://h/b/extra", "http://h:port/b", "s3://", "http:///b",
                                 "http://k:s@h/b", "http://h/b?x=1", "bucket"])
def test_open_store_bad_url(url):
    with pytest.raises(QuietError) as exc:
        open_store("s3", url)
    assert exc.value.exitcode == 3
    assert "\n" not in str(exc.value)


def test_open_store_unknown_storage(tmp_path):
    with pytest.raises(QuietError) as exc:
        open_store("gcs", "x")
    assert exc.value.exitcode == 3
    assert "file, s3" in str(exc.value)
    with pytest.raises(QuietError):
        open_store("file", "")


def test_s3_url_forms():
    assert S3Store("s3://my-bucket", "a", "b").description.startswith("s3 https://")
    st = S3Store("https://s3.example.com:8443/bkt/", "a", "b")
    assert (st.endpoint, st.bucket) == ("https://s3.example.com:8443", "bkt")


# -------------------------------------------------------------------------------- retry


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s

    def __call__(self):
        return self.now


def test_retry_backoff_and_deadline(caplog):
    clock = FakeClock()
    calls = []

    def down():
        calls.append(clock.now)
        clock.now += 0.5  # each attempt takes half a second
        raise ConnectionRefusedError(111, "refused")

    before = metrics.snapshot()
    caplog.set_level(logging.DEBUG, logger="curvefs_py.object.retry")
    with pytest.raises(RetriesExhausted) as exc:
        retry(down, what="GET k", attempts=1000, base_delay=0.1, max_delay=2.0, deadline=30.0,
              sleep=clock.sleep, clock=clock)
    assert "GET k" in one_line(exc.value)
    assert clock.now <= 30.0 + 0.5  # deadline + one attempt
    for n, s in enumerate(clock.sleeps, 1):
        assert 0 <= s <= min(2.0, 0.1 * 2 ** (n - 1))  # full jitter under the capped exponential
    assert delta("object_retries", before) == len(clock.sleeps) == len(calls) - 1
    levels = [r.levelno for r in caplog.records]
    assert levels == sorted(levels) and levels[0] == logging.DEBUG and levels[-1] == logging.WARNING


def test_retry_attempts_and_classification():
    clock = FakeClock()
    n = []

    def flaky():
        n.append(1)
        if len(n) < 3:
            raise TemporaryFailure("SlowDown 503")
        return "ok"

    assert retry(flaky, what="PUT k", attempts=5, base_delay=0.01, max_delay=0.1,
                 sleep=clock.sleep, clock=clock) == "ok"
    assert len(n) == 3

    def always():
        n.append(1)
        raise TemporaryFailure("InternalError 500")

    n.clear()
    with pytest.raises(RetriesExhausted) as exc:
        retry(always, what="PUT k", attempts=2, base_delay=0.01, max_delay=0.1,
              sleep=clock.sleep, clock=clock)
    assert len(n) == 2 and "InternalError 500" in one_line(exc.value)
    final = NoSuchKey(msg="gone")
    calls = []

    def missing():
        calls.append(1)
        raise final

    with pytest.raises(NoSuchKey):
        retry(missing, what="GET k", sleep=clock.sleep, clock=clock)
    assert calls == [1]
    assert is_temp_failure(TimeoutError()) and is_temp_failure(ConnectionResetError())
    assert is_temp_failure(OSError(113, "no route"))
    assert not is_temp_failure(ValueError()) and not is_temp_failure(FileNotFoundError())
    assert not is_temp_failure(ObjectStoreError(msg="final"))
