"""An S3 server on its own network host: a namespace, a veth pair, a bandwidth cap, latency.

::

   host (mount, fio)                         namespace cfbench-<pid>-<n>
   10.231.X.1  veth cfb<pid>h<n>  ========  veth cfb<pid>n<n>  10.231.X.2
               egress: tbf (upload)          egress: tbf (download) [+ netem delay]
                                             :9000 delay proxy --> 127.0.0.1:9001 S3 (moto)

- Everything is made with pyroute2 (netlink): the namespace, the veth pair (one end moved
  into the namespace), the addresses, and a ``tbf`` qdisc on *both* ends so uploads and
  downloads are capped (``set_bandwidth("1gbit")``).  tbf and htb are built into this
  kernel; netem and fq are not.
- Object-storage latency (time to first byte of every request): where the kernel has
  ``netem``, a netem delay on the namespace's egress (answers leave ``delay`` later, a real
  network delay); elsewhere -- as here -- the S3 server is only reachable through
  ``delayproxy`` inside the namespace, which forwards each request ``delay`` late.  The S3
  server itself listens on the namespace's loopback, so no path bypasses the proxy.
  ``latency_mode`` says which one is in force.
- Processes in the namespace are started with ``setns`` in the child, in their own
  session; ``close()`` kills them (whole process group), deletes the veth pair and the
  namespace, and waits until the kernel has let them go.  ``close()`` is idempotent and is
  what ``with NetEnv(...)`` and the signal handlers of ``envrun`` call.  ``cleanup_stale()``
  removes what a killed run (SIGKILL) left behind, by the pid in the names.
- ``measure_bandwidth`` and ``measure_latency`` measure the link as it is (nothing is
  assumed): a TCP stream to/from a probe server in the namespace, and the time to first
  byte of an HTTP request to the S3 endpoint.

Only addresses inside 10.231.0.0/16 on our own veth pair and loopback are used.
"""
from __future__ import annotations

import ctypes
import errno
import http.client
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

NS_PREFIX = "cfbench-"
S3_PORT = 9001       # inside the namespace, on its loopback
PROXY_PORT = 9000    # on the namespace's veth address: the endpoint clients use
PROBE_PORT = 9100
REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
_counter = 0


def _libc_setns():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    return fn


def _ns_path(name: str) -> str:
    return f"/var/run/netns/{name}"


def parse_rate(text: str) -> Optional[int]:
    """'1gbit' / '10gbit' / '100mbit' / '500kbit' / 'unlimited' -> bits per second."""
    t = text.strip().lower()
    if t in ("", "0", "none", "unlimited", "inf"):
        return None
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1,
             "gbps": 8 * 10**9, "mbps": 8 * 10**6}
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(float(t))


def rate_label(bits: Optional[int]) -> str:
    if bits is None:
        return "unlimited"
    for div, u in ((10**9, "gbit"), (10**6, "mbit"), (10**3, "kbit")):
        if bits >= div and bits % div == 0:
            return f"{bits // div}{u}"
    return f"{bits}bit"


class NetEnvError(RuntimeError):
    pass


def kernel_has_qdisc(kind: str) -> Optional[bool]:
    """From /proc/config.gz when the kernel exposes it (None: unknown)."""
    import gzip
    key = {"netem": "CONFIG_NET_SCH_NETEM", "tbf": "CONFIG_NET_SCH_TBF",
           "htb": "CONFIG_NET_SCH_HTB", "fq": "CONFIG_NET_SCH_FQ"}[kind]
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(key + "="):
                    return line.strip().endswith(("=y", "=m"))
        return False
    except OSError:
        return None


class NetEnv:
    """See the module docstring.  ``with NetEnv(workdir, bandwidth="1gbit") as env: ...``"""

    def __init__(self, workdir: Path, *, bandwidth: Optional[str] = None, latency_ms: float = 0.0,
                 latency_via: str = "auto", s3_threads: int = 32):
        global _counter
        _counter += 1
        pid = os.getpid()
        self.workdir = Path(workdir)
        self.name = f"{NS_PREFIX}{pid}-{_counter}"
        self.host_if = f"cfb{pid % 100000}h{_counter % 100}"
        self.ns_if = f"cfb{pid % 100000}n{_counter % 100}"
        self.host_ip = self.ns_ip = ""
        self.bandwidth = parse_rate(bandwidth) if bandwidth else None
        self.latency_ms = float(latency_ms)
        if latency_via not in ("auto", "netem", "proxy"):
            raise ValueError("latency_via must be auto, netem or proxy")
        self.latency_via = latency_via
        self.latency_mode = ""          # netem | proxy, once started
        self.s3_threads = s3_threads
        self.procs: dict[str, subprocess.Popen] = {}
        self.s3_info: dict = {}
        self._started = False
        self._closed = False
        # pyroute2's NetNS forks this process (no exec) to enter the namespace; a forked copy
        # that unwinds its inherited stack must not tear down the parent's environment
        self._owner = os.getpid()

    # --- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> "NetEnv":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return f"http://{self.ns_ip}:{PROXY_PORT}"

    def _pick_subnet(self) -> int:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            used = set()
            for a in ipr.get_addr(family=socket.AF_INET):
                addr = a.get_attr("IFA_ADDRESS") or ""
                if addr.startswith("10.231."):
                    used.add(int(addr.split(".")[2]))
            for r in ipr.get_routes(family=socket.AF_INET):
                dst = r.get_attr("RTA_DST") or ""
                if dst.startswith("10.231."):
                    used.add(int(dst.split(".")[2]))
        start = (os.getpid() + _counter) % 250
        for i in range(250):
            x = (start + i) % 250 + 1
            if x not in used:
                return x
        raise NetEnvError("no free 10.231.X.0/30 subnet")

    def start(self) -> None:
        from pyroute2 import IPRoute, NetNS, netns
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = True
        netns.create(self.name)
        x = self._pick_subnet()
        self.host_ip, self.ns_ip = f"10.231.{x}.1", f"10.231.{x}.2"
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_if, kind="veth",
                     peer={"ifname": self.ns_if, "net_ns_fd": self.name})
            idx = ipr.link_lookup(ifname=self.host_if)[0]
            ipr.addr("add", index=idx, address=self.host_ip, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        with NetNS(self.name) as ns:
            idx = ns.link_lookup(ifname=self.ns_if)[0]
            ns.addr("add", index=idx, address=self.ns_ip, prefixlen=30)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        self._apply_qdiscs()
        self._start_s3()
        self._start_proxy()

    def close(self) -> None:
        """Kill our processes, delete the veth pair and the namespace (idempotent)."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        for key in list(self.procs)[::-1]:
            kill_process_group(self.procs.pop(key))
        if not self._started:
            return
        for p in pids_in_netns(self.name):     # anything else that joined the namespace
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_netns(self.name, self.host_if)

    # --- traffic control ------------------------------------------------------------------
    def _tbf_args(self) -> dict:
        rate_bps = self.bandwidth // 8
        # a burst of ~1 ms at the rate, at least 256 KiB (veth passes 64 KiB GSO packets)
        burst = max(256 * 1024, rate_bps // 1000)
        return {"rate": f"{self.bandwidth}bit", "burst": burst, "latency": "50ms"}

    def _apply_qdiscs(self) -> None:
        """(Re)build the qdiscs of both ends from ``bandwidth`` and, in netem mode, latency."""
        from pyroute2 import IPRoute, NetNS
        from pyroute2.netlink.exceptions import NetlinkError
        want_netem = self.latency_via in ("auto", "netem")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.host_if)[0]
            _del_root(ipr, idx)
            if self.bandwidth:
                ipr.tc("add", "tbf", idx, handle=0x10000, **self._tbf_args())
        with NetNS(self.name) as ns:
            idx = ns.link_lookup(ifname=self.ns_if)[0]
            _del_root(ns, idx)
            mode = "proxy"
            if want_netem:
                try:
                    ns.tc("add", "netem", idx, handle=0x10000, delay=int(self.latency_ms * 1000),
                          limit=100000)
                    mode = "netem"
                    if self.bandwidth:
                        ns.tc("add", "tbf", idx, parent=0x10001, handle=0x100000,
                              **self._tbf_args())
                except NetlinkError as exc:
                    if self.latency_via == "netem":
                        raise NetEnvError(f"this kernel has no netem qdisc ({exc})") from None
                    _del_root(ns, idx)
                    mode = "proxy"
            if mode == "proxy" and self.bandwidth:
                ns.tc("add", "tbf", idx, handle=0x10000, **self._tbf_args())
        self.latency_mode = mode

    def set_bandwidth(self, bandwidth: Optional[str]) -> None:
        self.bandwidth = parse_rate(bandwidth) if bandwidth else None
        self._apply_qdiscs()

    def set_latency(self, latency_ms: float) -> None:
        old_mode = self.latency_mode
        self.latency_ms = float(latency_ms)
        if old_mode == "netem":
            self._apply_qdiscs()
        else:
            self._start_proxy()

    def describe_qdiscs(self) -> str:
        out = []
        for pre, dev in (([], self.host_if), (["ip", "netns", "exec", self.name], self.ns_if)):
            try:
                out.append(subprocess.run(pre + ["tc", "qdisc", "show", "dev", dev],
                                          capture_output=True, text=True, timeout=10).stdout.strip())
            except (OSError, subprocess.TimeoutExpired):
                pass
        return "\n".join(out)

    # --- processes in the namespace -------------------------------------------------------
    def spawn(self, key: str, argv: list[str], *, ready_timeout: float = 60.0,
              env: Optional[dict] = None) -> tuple[subprocess.Popen, str]:
        """Start ``argv`` inside the namespace; wait for its first stdout line (its 'ready')."""
        setns = _libc_setns()
        fd = os.open(_ns_path(self.name), os.O_RDONLY | os.O_CLOEXEC)

        def enter():
            if setns(fd, CLONE_NEWNET) != 0:
                os._exit(121)

        log = open(self.workdir / f"{key}.log", "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=log, env=env, preexec_fn=enter,
                                    start_new_session=True, pass_fds=(fd,))
        finally:
            os.close(fd)
            log.close()
        old = self.procs.pop(key, None)
        self.procs[key] = proc
        if old is not None:
            kill_process_group(old)
        line = _read_line(proc, ready_timeout)
        if line is None:
            code = proc.poll()
            kill_process_group(proc)
            self.procs.pop(key, None)
            tail = _tail(self.workdir / f"{key}.log")
            raise NetEnvError(f"{key} did not start in the namespace"
                              f"{'' if code is None else f' (exit {code})'}: {tail}")
        return proc, line

    def _start_s3(self) -> None:
        servers = REPO / "tests" / "servers.py"
        if servers.exists():
            argv = [sys.executable, str(servers), "s3", "--port", str(S3_PORT),
                    "--threads", str(self.s3_threads)]
        else:   # an installed package without the repository's tests/: the same thing inline
            argv = [sys.executable, "-c", _S3_INLINE, str(S3_PORT), str(self.s3_threads)]
        _, line = self.spawn("s3", argv)
        self.s3_info = json.loads(line)

    def _start_proxy(self) -> None:
        delay = self.latency_ms if self.latency_mode == "proxy" else 0.0
        argv = [sys.executable, "-m", "curvefs_py.bench.delayproxy",
                "--listen", f"{self.ns_ip}:{PROXY_PORT}", "--target", f"127.0.0.1:{S3_PORT}",
                "--delay-ms", str(delay)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.spawn("proxy", argv, env=env, ready_timeout=30)
        _wait_tcp(self.ns_ip, PROXY_PORT, 10)

    @property
    def access_key(self) -> str:
        return self.s3_info.get("access_key", "testing")

    @property
    def secret_key(self) -> str:
        return self.s3_info.get("secret_key", "testing")

    def create_bucket(self, name: str) -> str:
        """Create ``name`` through the endpoint (PUT /name, unsigned: moto accepts it)."""
        conn = http.client.HTTPConnection(self.ns_ip, PROXY_PORT, timeout=30)
        try:
            conn.request("PUT", f"/{name}", body=b"")
            r = conn.getresponse()
            body = r.read()
            if r.status not in (200, 409):
                raise NetEnvError(f"creating bucket {name}: HTTP {r.status} {body[:200]!r}")
        finally:
            conn.close()
        return f"{self.endpoint}/{name}"

    # --- measuring --------------------------------------------------------------------------
    def start_probe(self) -> None:
        if "probe" in self.procs and self.procs["probe"].poll() is None:
            return
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.spawn("probe", [sys.executable, "-m", "curvefs_py.bench.netenv", "probe",
                             "--listen", f"{self.ns_ip}:{PROBE_PORT}"], env=env, ready_timeout=30)

    def measure_bandwidth(self, seconds: float = 1.0) -> dict:
        """Measured TCP goodput host->namespace ('up') and back ('down'), bits/s."""
        self.start_probe()
        return {"up_bps": _probe_up(self.ns_ip, seconds), "down_bps": _probe_down(self.ns_ip, seconds)}

    def measure_latency(self, n: int = 15) -> dict:
        """Median time to first byte of ``GET /`` on the S3 endpoint, and TCP connect time (ms)."""
        return measure_http_latency(self.ns_ip, PROXY_PORT, n)


def measure_http_latency(host: str, port: int, n: int = 15) -> dict:
    """Median time to first byte of ``GET /`` (a fresh connection each) and connect time."""
    ttfb, conn_ms, errors = [], [], 0
    while len(ttfb) < n:
        try:
            c, t = _one_ttfb(host, port)
        except OSError:
            errors += 1
            if errors > n:
                raise
            time.sleep(0.1)
            continue
        conn_ms.append(c)
        ttfb.append(t)
    return {"ttfb_ms": statistics.median(ttfb), "ttfb_min_ms": min(ttfb),
            "connect_ms": statistics.median(conn_ms), "samples": n, "errors": errors}


def _one_ttfb(host: str, port: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=30)
    t1 = time.perf_counter()
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        t2 = time.perf_counter()
        if not s.recv(1):
            raise ConnectionResetError("S3 endpoint closed the connection without answering")
        t3 = time.perf_counter()
        while s.recv(65536):
            pass
    finally:
        s.close()
    return (t1 - t0) * 1000, (t3 - t2) * 1000


def _probe_up(host: str, seconds: float) -> float:
    buf = b"\0" * (1 << 20)
    with socket.create_connection((host, PROBE_PORT), timeout=60) as s:
        s.sendall(b"up\n")
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            s.sendall(buf)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            reply += chunk
        elapsed = time.perf_counter() - t0
    return int(reply.strip() or 0) * 8 / elapsed


def _probe_down(host: str, seconds: float) -> float:
    total = 0
    with socket.create_connection((host, PROBE_PORT), timeout=60) as s:
        s.sendall(f"down {seconds}\n".encode())
        t0 = time.perf_counter()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        elapsed = time.perf_counter() - t0
    return total * 8 / elapsed


def _probe_server(listen: str) -> None:
    """In the namespace: 'up\\n' + bytes -> reply the count; 'down S\\n' -> stream S seconds."""
    import threading
    host, _, port = listen.rpartition(":")
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(16)
    print("ready", flush=True)

    def serve(c: socket.socket) -> None:
        with c:
            f = c.makefile("rb")
            cmd = f.readline().decode().split()
            if cmd and cmd[0] == "up":
                total = 0
                while True:
                    chunk = f.read1(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                c.sendall(f"{total}\n".encode())
            elif cmd and cmd[0] == "down":
                end = time.perf_counter() + float(cmd[1])
                buf = b"\0" * (1 << 20)
                while time.perf_counter() < end:
                    c.sendall(buf)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


# --- helpers ---------------------------------------------------------------------------------

def _del_root(ipr, idx: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        ipr.tc("del", index=idx, handle=0x10000, root=True)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise


def _read_line(proc: subprocess.Popen, timeout: float) -> Optional[str]:
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            buf += chunk
    return buf.decode(errors="replace").strip()


def _wait_tcp(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise NetEnvError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def kill_process_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), then SIGKILL."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    # (a leader that already exited is left alone: its pid may name someone else's group now)
    if proc.stdout:
        proc.stdout.close()


def pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is the named one."""
    try:
        target = os.stat(_ns_path(name)).st_ino
    except OSError:
        return []
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino == target:
                out.append(int(d))
        except OSError:
            continue
    return out


def remove_netns(name: str, host_if: Optional[str] = None, timeout: float = 5.0) -> None:
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError
    if host_if:
        with IPRoute() as ipr:
            try:
                for idx in ipr.link_lookup(ifname=host_if):
                    ipr.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
    if name in netns.listnetns():
        netns.remove(name)
    deadline = time.monotonic() + timeout
    while host_if and time.monotonic() < deadline:    # the kernel frees it asynchronously
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=host_if):
                break
        time.sleep(0.05)


def leftovers() -> dict:
    """Namespaces and host links of this module that still exist (for tests and --cleanup)."""
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError
    for attempt in range(5):   # a dump can fail while other links come and go
        try:
            with IPRoute() as ipr:
                links = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
            break
        except NetlinkError:
            if attempt == 4:
                raise
            time.sleep(0.1)
    return {"namespaces": [n for n in netns.listnetns() if n.startswith(NS_PREFIX)],
            "links": [l for l in links if l and l.startswith("cfb")]}


def cleanup_stale(all_: bool = False) -> list[str]:
    """Remove namespaces (and their links and processes) of runs whose pid is dead."""
    done = []
    for name in leftovers()["namespaces"]:
        pid_s = name[len(NS_PREFIX):].split("-")[0]
        alive = pid_s.isdigit() and os.path.exists(f"/proc/{pid_s}") and int(pid_s) != os.getpid()
        if alive and not all_:
            continue
        for p in pids_in_netns(name):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        n = name[len(NS_PREFIX):].split("-")
        host_if = f"cfb{int(n[0]) % 100000}h{int(n[1]) % 100}" if len(n) == 2 and all(
            x.isdigit() for x in n) else None
        remove_netns(name, host_if)
        done.append(name)
    return done


_S3_INLINE = r"""
import json, os, signal, sys
for k in list(os.environ):
    if k.startswith(("AWS_", "MOTO_")): del os.environ[k]
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
import waitress
from moto.moto_server.werkzeug_app import create_backend_app
srv = waitress.create_server(create_backend_app("s3"), host="127.0.0.1", port=int(sys.argv[1]),
                             threads=int(sys.argv[2]), connection_limit=1000, channel_timeout=300)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print(json.dumps({"endpoint": f"http://127.0.0.1:{srv.effective_port}",
                  "access_key": "testing", "secret_key": "testing"}), flush=True)
srv.run()
"""


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m curvefs_py.bench.netenv")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="(in the namespace) bandwidth probe server")
    pr.add_argument("--listen", required=True)
    sub.add_parser("leftovers", help="list namespaces/links left by bench runs")
    cl = sub.add_parser("cleanup", help="remove those of dead runs")
    cl.add_argument("--all", action="store_true", help="also of live runs")
    a = p.parse_args(argv)
    if a.cmd == "probe":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        _probe_server(a.listen)
    elif a.cmd == "leftovers":
        print(json.dumps(leftovers()))
    elif a.cmd == "cleanup":
        print(json.dumps(cleanup_stale(a.all)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
