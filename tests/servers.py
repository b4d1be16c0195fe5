"""Loopback servers for tests and benchmarks: an S3 endpoint and a black hole.

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
    args = p.parse_args(argv)
    if args.what == "s3":
        # the same clean environment start_s3_server gives (before moto reads its settings)
        env = _clean_env(args.auth)
        os.environ.clear()
        os.environ.update(env)
        serve_s3(args.port, args.threads, args.auth, args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
