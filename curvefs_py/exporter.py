"""``mount --metrics HOST:PORT``: the mount's counters for Prometheus at ``/metrics``.

The same numbers as ``MOUNTPOINT/.stats`` (the daemon's counters and its BPF
maps), in the text exposition format (``metrics.render_prometheus``), labelled
with the volume name and the mount point, as JuiceFS's ``--metrics`` does.  A
minimal HTTP/1.0 server on the trio loop: one request per connection, GET only.

The socket is bound before the FUSE mount (``bind``), so a bad or busy address
fails the mount with a one-line error instead of a mount without its exporter.
"""
from __future__ import annotations

import functools
import logging
import socket
from typing import Dict

import trio

from . import metrics
from .errors import QuietError

log = logging.getLogger(__name__)

#: a request larger than this, or slower than the timeout, is dropped
MAX_REQUEST = 8192
REQUEST_TIMEOUT_S = 5.0
#: connections served at once (more wait in the listen queue): file descriptors are
#: the daemon's, shared with its cache and backing files
MAX_CLIENTS = 8
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for 127.0.0.1); QuietError 3 otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise QuietError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9567", 3)
    return (host.strip("[]") or "127.0.0.1"), int(port)


def bind(text: str) -> socket.socket:
    """Blocking. A listening socket on the address (before the mount: errors are one line)."""
    host, port = parse_address(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise QuietError(f"--metrics {text}: {exc.strerror}", 3) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise QuietError(f"--metrics {text}: {exc.strerror}", 3) from None
    sock.setblocking(False)
    return sock


async def serve(sock: socket.socket, labels: Dict[str, str]) -> None:
    """Answer requests on ``sock`` until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    slots = trio.Semaphore(MAX_CLIENTS)  # taken before accept: bounds the open connections

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await _answer(stream, labels)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics client went away: %s", exc)
        except Exception as exc:  # never take the mount down over a scrape
            log.exception("metrics request failed: %s", exc)
        finally:
            slots.release()
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. out of file descriptors: try again shortly
                slots.release()
                log.warning("metrics endpoint: accept failed: %s", exc)
                await trio.sleep(0.5)
                continue
            nursery.start_soon(handle, stream)


async def _answer(stream: trio.SocketStream, labels: Dict[str, str]) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        buf += chunk
        if len(buf) > MAX_REQUEST:
            await _reply(stream, 431, "request too large\n")
            return
    method, _, rest = buf.split(b"\n", 1)[0].decode("latin-1").strip().partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if method != "GET":
        await _reply(stream, 405, "only GET\n")
    elif path != "/metrics":
        await _reply(stream, 404, "see /metrics\n")
    else:
        metrics.inc("metrics_scrapes")
        # off the loop: the collectors read the BPF maps under a lock an attach may hold
        body = await trio.to_thread.run_sync(functools.partial(metrics.render_prometheus, labels=labels))
        await _reply(stream, 200, body, CONTENT_TYPE)


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}


async def _reply(stream: trio.SocketStream, status: int, body: str,
                 content_type: str = "text/plain; charset=utf-8") -> None:
    data = body.encode(errors="backslashreplace")  # a mount point that is not UTF-8
    head = (f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    await stream.send_all(head + data)
