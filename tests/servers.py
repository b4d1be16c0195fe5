"""Loopback servers for tests and benchmarks: an S3 endpoint, PostgreSQL, Redis, a black hole.

``start_s3_server(tmpdir)`` runs moto's S3 WSGI app under waitress (HTTP/1.1
keep-alive, a thread pool) in a **subprocess** bound to ``127.0.0.1`` on a port
the kernel picks.  Stock ``moto_server`` (werkzeug, ``Connection: close``) is
2-3x slower for many small requests; the app itself is the same.  The
subprocess gets its own environment: credentials ``testing``/``testing``,
region ``us-east-1`` and none of the caller's ``AWS_*``/``MOTO_*`` variables,
so a CA bundle or profile set on the machine cannot change its behaviour.
Its stderr goes to ``<tmpdir>/s3-server.log``.

``auth=True`` starts a server that *enforces* signatures (moto's IAM checks,
``INITIAL_NO_AUTH_ACTION_COUNT=0``) with one IAM user allowed ``s3:*``; its
key pair is ``server.access_key`` / ``server.secret_key``.  A wrong key id or
secret then gets a real 403 (``InvalidAccessKeyId`` / ``SignatureDoesNotMatch``).

Outages, for retry tests (pick the failure you want to see):

* ``server.outage()`` (context manager) or ``pause()``/``resume()``: SIGSTOP
  the server.  The kernel still completes TCP handshakes and buffers requests,
  so clients see **read timeouts** -- a hung server or a dropped network.
* ``server.stop()``: the port closes; clients see **connection refused** at
  once -- a crashed server or a wrong port.
* ``Blackhole()``: a listening socket that never accepts or answers; a client
  connects (the backlog) and then times out, like ``pause()`` but without a
  real server behind it.  ``.endpoint`` and ``.close()``.

Nothing here is needed by ``curvefs_py`` itself: S3Store talks to any S3
server; moto is only the one the tests start.

Command line (benchmarks reuse it)::

    python -m tests.servers s3 [--port N] [--threads 16] [--auth]

prints one JSON line ``{"endpoint": ..., "access_key": ..., "secret_key": ...}``
when it is ready and serves until SIGINT/SIGTERM.

``start_postgres(tmpdir)`` / ``start_redis(tmpdir)`` run the Debian servers the same
way (a supervisor subprocess that prints a ready line and stops the server when the
caller dies): ``PgServer.url`` / ``.new_database()`` and ``RedisServer.url(db)`` give
META_URLs.  ``python -m tests.servers postgres [--durable]`` and ``... redis --dir D``
serve until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional

HOST = "127.0.0.1"
REGION = "us-east-1"
DEFAULT_KEY = "testing"
DEFAULT_SECRET = "testing"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for 'wrong port' tests)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class S3Server:
    """Handle on a running S3 server subprocess (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, access_key: str,
                 secret_key: str, log_path: str, auth: bool):
        self.proc = proc
        self.endpoint = endpoint
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = REGION
        self.log_path = log_path
        self.auth = auth
        self._paused = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, bucket: str) -> str:
        """The storage URL of ``bucket`` on this server (``http://127.0.0.1:PORT/bucket``)."""
        return f"{self.endpoint}/{bucket}"

    def client(self):
        """A plain boto3 client for test set-up (creating buckets, peeking at objects)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            verify=False,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 3},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; return its storage URL."""
        self.client().create_bucket(Bucket=name)
        return self.url(name)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): requests hang until ``resume()``."""
        if self.proc.poll() is None and not self._paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Undo ``pause()`` (SIGCONT)."""
        if self._paused:
            self._paused = False
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """``with server.outage():`` the server hangs inside the block and resumes after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _clean_env(auth: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env.update(AWS_ACCESS_KEY_ID=DEFAULT_KEY, AWS_SECRET_ACCESS_KEY=DEFAULT_SECRET,
               AWS_DEFAULT_REGION=REGION, PYTHONUNBUFFERED="1")
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    return env


def _wait_http(host: str, port: int, deadline: float) -> None:
    """Until an HTTP request gets any answer (moto loaded and serving)."""
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"S3 server on port {port} does not answer: {last}")


def start_s3_server(tmpdir, *, auth: bool = False, threads: int = 16,
                    port: int = 0, timeout: float = 30.0) -> S3Server:
    """Start moto S3 under waitress in a subprocess; return once it answers HTTP.

    ``tmpdir`` (str or path) receives the server log.  ``port=0`` lets the
    kernel choose a free port (no race between picking and binding)."""
    tmpdir = os.fspath(tmpdir)
    os.makedirs(tmpdir, exist_ok=True)
    log_path = os.path.join(tmpdir, "s3-server.log")
    cmd = [sys.executable, os.path.abspath(__file__), "s3", "--port", str(port),
           "--threads", str(threads), "--parent-pid", str(os.getpid())] + (["--auth"] if auth else [])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log, env=_clean_env(auth), start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"S3 server did not start in {timeout:.0f}s (see {log_path})")
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"S3 server exited with {proc.wait()} (see {log_path})")
                line += chunk
        info = json.loads(line)
        host, _, p = info["endpoint"].rpartition("//")[2].partition(":")
        _wait_http(host, int(p), deadline)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        raise
    return S3Server(proc, info["endpoint"], info["access_key"], info["secret_key"], log_path, auth)


class Blackhole:
    """A TCP listener on 127.0.0.1 that never accepts: connects succeed, nothing answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://{HOST}:{self.port}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Blackhole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# PostgreSQL and Redis (metadata servers of the scale-out engines)
#
# Each runs under a small supervisor subprocess (``python servers.py postgres|redis ...``),
# as the S3 server does: it starts the server, prints one JSON line when it answers,
# and on SIGTERM/SIGINT, on the death of the test process (``--parent-pid``) or when
# the server exits, stops the server and removes what it created.  The server itself
# gets PR_SET_PDEATHSIG, so even a ``kill -9`` of the supervisor takes it down.

PG_BIN = os.environ.get("CURVEFS_PG_BIN", "/usr/lib/postgresql/15/bin")
PG_OS_USER = "postgres"  # initdb and postgres refuse to run as root
PG_USER = "curvefs"  # the cluster's superuser (password auth over TCP, trust on the socket)
PG_PASSWORD = "curvefs"
PG_DB = "curvefs"
REDIS_SERVER = os.environ.get("CURVEFS_REDIS_SERVER", "/usr/bin/redis-server")


def _start_supervisor(kind: str, args: list[str], log_path: str, timeout: float) -> tuple[subprocess.Popen, dict]:
    """Start ``servers.py KIND ARGS --parent-pid <us>``; return it and its ready line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "REDIS"))}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), kind, "--parent-pid", str(os.getpid())] + args
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"{kind} server did not start in {timeout:.0f}s (see {log_path})")
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"{kind} server exited with {proc.wait()} (see {log_path})")
                line += chunk
        return proc, json.loads(line)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        raise


def _stop_supervisor(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout and not proc.stdout.closed:
        proc.stdout.close()


class PgServer:
    """Handle on a PostgreSQL cluster started by ``start_postgres``.

    ``url`` is the META_URL of its database ``curvefs``; ``new_database()`` makes
    an empty database and returns its URL (one per test keeps tests apart)."""

    def __init__(self, proc: subprocess.Popen, info: dict, log_path: str):
        self.proc = proc
        self.host: str = info["host"]
        self.port: int = info["port"]
        self.user: str = info["user"]
        self.password: str = info["password"]
        self.dbname: str = info["dbname"]
        self.socket_dir: str = info["socket_dir"]
        self.server_pid: int = info["pid"]
        self.log_path = log_path
        self._n = 0

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def url_for(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        return (f"postgres://{user or self.user}:{password or self.password}"
                f"@{self.host}:{self.port}/{dbname}")

    def connect(self, dbname: str | None = None):
        """A psycopg connection (autocommit) as the superuser, for test set-up."""
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=dbname or self.dbname, autocommit=True, connect_timeout=10)

    def sql(self, query: str, *args, dbname: str | None = None) -> list[tuple]:
        """Run one statement as the superuser; its rows ([] if it returns none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; return its META_URL."""
        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}_{os.urandom(3).hex()}"
        self.sql(f'CREATE DATABASE "{name}"', dbname="postgres")
        return self.url_for(name)

    def _cluster(self) -> list[int]:
        """The postmaster and its children (backends call setsid(): each is a process
        group of its own, so killpg of the postmaster's group reached none of them)."""
        pids = [self.server_pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.server_pid:
                    pids.append(int(entry))
        return pids

    def _signal_cluster(self, sig: int) -> None:
        for pid in self._cluster():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """SIGSTOP the postmaster (first: it forks no new backend then) and every
        backend: clients hang, like a server that stopped answering."""
        self._signal_cluster(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_cluster(signal.SIGCONT)

    def stop(self) -> None:
        """Shut the cluster down and delete its data directory (idempotent)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self._signal_cluster(signal.SIGCONT)
        _stop_supervisor(self.proc)

    def __enter__(self) -> "PgServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_postgres(tmpdir, *, durable: bool = False, port: int = 0, timeout: float = 60.0) -> PgServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (a free port unless ``port``), with
    superuser ``curvefs``/``curvefs`` (scram over TCP) and a database ``curvefs``.

    The data directory and the unix socket live in a fresh ``/tmp/curvefs-pg-*`` owned by
    the ``postgres`` OS user (pytest's tmp dirs are private to root); ``tmpdir`` gets the
    log ``postgres.log``.  ``durable=False`` (tests) turns fsync and synchronous commit
    off; benchmarks pass ``durable=True`` for PostgreSQL's real commit cost."""
    tmpdir = os.fspath(tmpdir)
    os.makedirs(tmpdir, exist_ok=True)
    log_path = os.path.join(tmpdir, "postgres.log")
    args = ["--port", str(port)] + (["--durable"] if durable else [])
    proc, info = _start_supervisor("postgres", args, log_path, timeout)
    return PgServer(proc, info, log_path)


class RedisServer:
    """Handle on a redis-server started by ``start_redis`` (AOF, fsync on every write)."""

    def __init__(self, proc: subprocess.Popen, info: dict, log_path: str, dir: str):
        self.proc = proc
        self.host: str = info["host"]
        self.port: int = info["port"]
        self.server_pid: int = info["pid"]
        self.dir = dir
        self.log_path = log_path

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def kill(self) -> None:
        """``kill -9`` the server (its supervisor then exits); ``restart()`` brings it
        back on the same port and directory, with everything the AOF holds."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.server_pid, signal.SIGKILL)
        _stop_supervisor(self.proc)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        proc, info = _start_supervisor("redis", ["--port", str(self.port), "--dir", self.dir],
                                       self.log_path, timeout)
        self.proc, self.server_pid = proc, info["pid"]

    def pause(self) -> None:
        os.kill(self.server_pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.server_pid, signal.SIGCONT)

    def stop(self) -> None:
        """Shut the server down (idempotent); its directory is kept."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.server_pid, signal.SIGCONT)
        _stop_supervisor(self.proc)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis(tmpdir, *, port: int = 0, timeout: float = 30.0) -> RedisServer:
    """redis-server on 127.0.0.1 (a free port unless ``port``) with its data in
    ``tmpdir/redis``: no RDB snapshots, an append-only file fsynced on every write
    (``--appendfsync always``), so whatever a client saw committed survives ``kill -9``
    of the client (and of the server).  Log: ``tmpdir/redis.log``."""
    tmpdir = os.fspath(tmpdir)
    data = os.path.join(tmpdir, "redis")
    os.makedirs(data, exist_ok=True)
    log_path = os.path.join(tmpdir, "redis.log")
    proc, info = _start_supervisor("redis", ["--port", str(port), "--dir", data], log_path, timeout)
    return RedisServer(proc, info, log_path, data)


# ---- supervisor side

def _pdeathsig(sig: int):
    """preexec_fn: the child gets ``sig`` when its parent (the supervisor) dies."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: no imports in the child

    def fn() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    return fn


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _supervise(server: subprocess.Popen, parent_pid: int, stop_signal: int) -> None:
    """Block until SIGTERM/SIGINT, the parent's death or the server's exit; then stop
    the server (``stop_signal``, then SIGKILL after 20 s)."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop and server.poll() is None and (not parent_pid or _alive(parent_pid)):
        time.sleep(0.2)
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGCONT)
        server.send_signal(stop_signal)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _retry_ports(port: int, start) -> tuple[subprocess.Popen, int]:
    """``start(port)`` -> server or None if the port was taken; picks free ports when 0."""
    for _ in range(1 if port else 8):
        p = port or free_port()
        server = start(p)
        if server is not None:
            return server, p
    raise RuntimeError("no free port for the server")


def _sweep_dead_clusters() -> None:
    """Remove /tmp/curvefs-pg-* left by a supervisor that was killed: neither it nor its
    postmaster is alive (a directory without pid files must be an hour old)."""
    import glob
    import shutil

    for base in glob.glob("/tmp/curvefs-pg-*"):
        pids = []
        for name in ("supervisor.pid", "data/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(base, name)) as f:
                    pids.append(int(f.readline()))
        try:
            dead = not any(_alive(pid) for pid in pids) if pids else time.time() - os.stat(base).st_mtime > 3600
        except OSError:
            continue
        if dead:
            shutil.rmtree(base, ignore_errors=True)


def serve_postgres(port: int = 0, durable: bool = False, parent_pid: int = 0) -> None:
    """Blocking: initdb a cluster in a fresh /tmp dir, serve it, print the ready line."""
    import pwd
    import shutil
    import tempfile

    _sweep_dead_clusters()
    pw = pwd.getpwnam(PG_OS_USER)
    as_pg = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    base = tempfile.mkdtemp(prefix="curvefs-pg-", dir="/tmp")
    try:
        with open(os.path.join(base, "supervisor.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        data, sock = os.path.join(base, "data"), os.path.join(base, "sock")
        os.mkdir(sock)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
        pwfile = os.path.join(base, "pwfile")
        with open(pwfile, "w") as f:
            f.write(PG_PASSWORD + "\n")
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        r = subprocess.run([os.path.join(PG_BIN, "initdb"), "-D", data, "-U", PG_USER, f"--pwfile={pwfile}",
                            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                            "--no-sync", "--no-instructions"],
                           cwd=base, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           **as_pg)
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stdout.decode(errors='replace')}")
        settings = {"listen_addresses": HOST, "unix_socket_directories": sock, "max_connections": "300",
                    "log_min_messages": "warning", "log_checkpoints": "off"}
        if not durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")

        def start(p: int) -> Optional[subprocess.Popen]:
            cmd = [os.path.join(PG_BIN, "postgres"), "-D", data, "-p", str(p)]
            for k, v in settings.items():
                cmd += ["-c", f"{k}={v}"]
            server = subprocess.Popen(cmd, cwd=base, stdin=subprocess.DEVNULL, stdout=sys.stderr,
                                      stderr=sys.stderr, start_new_session=True,
                                      preexec_fn=_pdeathsig(signal.SIGQUIT), **as_pg)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    return None  # port taken (or worse: then every attempt fails the same way)
                r = subprocess.run([os.path.join(PG_BIN, "pg_isready"), "-q", "-h", sock, "-p", str(p),
                                    "-U", PG_USER, "-d", "postgres"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if r.returncode == 0:
                    return server
                time.sleep(0.05)
            server.kill()
            server.wait()
            raise RuntimeError("postgres did not become ready in 30 s")

        server, port = _retry_ports(port, start)
        try:
            r = subprocess.run([os.path.join(PG_BIN, "createdb"), "-h", sock, "-p", str(port), "-U", PG_USER,
                                PG_DB], stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"createdb failed: {r.stderr.strip()}")
            print(json.dumps({"host": HOST, "port": port, "user": PG_USER, "password": PG_PASSWORD,
                              "dbname": PG_DB, "socket_dir": sock, "pid": server.pid}), flush=True)
            # SIGINT: "fast" shutdown (roll back sessions, checkpoint, exit)
            _supervise(server, parent_pid, signal.SIGINT)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def serve_redis(port: int = 0, dir: str = ".", parent_pid: int = 0) -> None:
    """Blocking: serve redis-server (AOF, appendfsync always) in ``dir``; print the ready line."""
    def start(p: int) -> Optional[subprocess.Popen]:
        cmd = [REDIS_SERVER, "--bind", HOST, "--port", str(p), "--dir", os.path.abspath(dir),
               "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
               "--protected-mode", "no", "--logfile", ""]
        server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr,
                                  start_new_session=True, preexec_fn=_pdeathsig(signal.SIGTERM))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return None
            try:
                with socket.create_connection((HOST, p), timeout=2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return server  # (-LOADING while the AOF is read back)
            except OSError:
                pass
            time.sleep(0.05)
        server.kill()
        server.wait()
        raise RuntimeError("redis-server did not answer PING in 30 s")

    server, port = _retry_ports(port, start)
    try:
        print(json.dumps({"host": HOST, "port": port, "pid": server.pid}), flush=True)
        _supervise(server, parent_pid, signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# --------------------------------------------------------------------------------------------
# Subprocess side


def _make_iam_user() -> tuple[str, str]:
    """In the server process: an IAM user allowed s3:*, for signature-enforcing mode."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user(REGION, "curvefs")
    iam.put_user_policy("curvefs", "s3-all", json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }))
    key = iam.create_access_key("curvefs")
    return key.access_key_id, key.secret_access_key


def _patch_waitress_expect_continue() -> None:
    """Waitress (3.0.2) answers ``Expect: 100-continue`` on a request *without a body*
    with ``100 Continue`` and then waits forever for that body (``send_continue``
    marks the finished request incomplete again).  botocore sends the header on
    every PutObject, so an empty object would hang.  RFC 9110 lets a server skip
    the 100 when there is no body: do that.  Only this test server is patched."""
    from waitress.parser import HTTPRequestParser

    if getattr(HTTPRequestParser, "_curvefs_patched", False):
        return
    original = HTTPRequestParser.parse_header

    def parse_header(self, header_plus):
        original(self, header_plus)
        if self.expect_continue and not self.chunked and self.content_length == 0:
            self.expect_continue = False

    HTTPRequestParser.parse_header = parse_header
    HTTPRequestParser._curvefs_patched = True


def _exit_with_parent(pid: int) -> None:
    """A daemon thread that ends this process when ``pid`` is gone (a killed pytest
    must not leave servers behind)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve_s3(port: int = 0, threads: int = 16, auth: bool = False, parent_pid: int = 0) -> None:
    """Blocking: serve moto S3 on 127.0.0.1:port; print the ready line to stdout."""
    import waitress
    from moto.moto_server.werkzeug_app import create_backend_app

    _patch_waitress_expect_continue()
    if parent_pid:
        _exit_with_parent(parent_pid)

    if auth:
        os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    app = create_backend_app("s3")
    access_key, secret_key = _make_iam_user() if auth else (DEFAULT_KEY, DEFAULT_SECRET)
    server = waitress.create_server(app, host=HOST, port=port, threads=threads,
                                    connection_limit=1000, channel_timeout=300,
                                    expose_tracebacks=False, ident="curvefs-test-s3")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"endpoint": f"http://{HOST}:{server.effective_port}",
                      "access_key": access_key, "secret_key": secret_key}), flush=True)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.servers", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s3 = sub.add_parser("s3", help="moto S3 under waitress on 127.0.0.1")
    s3.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    s3.add_argument("--threads", type=int, default=16, help="waitress worker threads")
    s3.add_argument("--auth", action="store_true", help="enforce signatures (IAM user s3:*)")
    s3.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    pg = sub.add_parser("postgres", help="a throw-away PostgreSQL cluster on 127.0.0.1")
    pg.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    pg.add_argument("--durable", action="store_true", help="keep fsync and synchronous_commit on")
    pg.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    rd = sub.add_parser("redis", help="redis-server (AOF, appendfsync always) on 127.0.0.1")
    rd.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    rd.add_argument("--dir", default=".", help="data directory (the append-only file)")
    rd.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    args = p.parse_args(argv)
    if args.what == "postgres":
        serve_postgres(args.port, args.durable, args.parent_pid)
    if args.what == "redis":
        serve_redis(args.port, args.dir, args.parent_pid)
    if args.what == "s3":
        # the same clean environment start_s3_server gives (before moto reads its settings)
        env = _clean_env(args.auth)
        os.environ.clear()
        os.environ.update(env)
        serve_s3(args.port, args.threads, args.auth, args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def redis_new_db(server: RedisServer) -> str:
    """The META_URL of an empty database of ``server``: the next of databases 1..15
    (cycled; 0 is left for manual use), emptied with FLUSHDB."""
    import redis

    n = getattr(server, "_last_db", 0) % 15 + 1
    server._last_db = n
    client = redis.Redis(host=server.host, port=server.port, db=n)
    try:
        client.flushdb()
    finally:
        client.close()
    return server.url(n)
