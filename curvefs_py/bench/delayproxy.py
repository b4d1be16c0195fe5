"""A TCP proxy that adds a fixed latency to every request: object-storage time to first byte.

Used by ``netenv`` inside the S3 server's network namespace where the kernel has no netem.
Bytes from the client are a *delay line*: each chunk is forwarded ``delay`` after it
arrived, in order, without waiting for the previous one to be sent -- so a request reaches
the server ``delay`` later (its answer's first byte arrives ``delay`` later) while a large
upload streams at full speed, only shifted by ``delay``.  Bytes from the server pass at
once.  Half-closes are forwarded, so HTTP keep-alive and ``Connection: close`` both work.

``python -m curvefs_py.bench.delayproxy --listen 10.231.0.2:9000 --target 127.0.0.1:9001
--delay-ms 30`` prints ``ready`` once it listens; SIGTERM/SIGINT stop it.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys

import trio

CHUNK = 256 * 1024
QUEUE_CHUNKS = 512          # at most 128 MiB in flight per connection


async def _plain(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while True:
            data = await src.receive_some(CHUNK)
            if not data:
                break
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _delayed(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    send, recv = trio.open_memory_channel(QUEUE_CHUNKS)

    async def reader():
        async with send:
            try:
                while True:
                    data = await src.receive_some(CHUNK)
                    await send.send((trio.current_time() + delay, data))
                    if not data:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await send.send((trio.current_time(), b""))

    async def writer():
        async with recv:
            try:
                async for due, data in recv:
                    await trio.sleep_until(due)
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        n.start_soon(writer)


async def _handle(client: trio.SocketStream, target: tuple[str, int], delay: float) -> None:
    try:
        server = await trio.open_tcp_stream(*target)
    except OSError:
        await client.aclose()
        return
    async with client, server:
        for s in (client, server):
            try:
                s.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            except OSError:
                pass
        async with trio.open_nursery() as n:
            if delay > 0:
                n.start_soon(_delayed, client, server, delay)
            else:
                n.start_soon(_plain, client, server)
            n.start_soon(_plain, server, client)


async def serve(listen: tuple[str, int], target: tuple[str, int], delay_ms: float,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    delay = max(0.0, delay_ms / 1000.0)
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0], backlog=512)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream):
        await _handle(stream, target, delay)
    await trio.serve_listeners(handler, listeners)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m curvefs_py.bench.delayproxy",
                                description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="added time to first byte")
    a = p.parse_args(argv)
    if not math.isfinite(a.delay_ms) or a.delay_ms < 0:
        p.error("--delay-ms must be >= 0")
    # nothing to flush: on SIGTERM leave at once (connections die with the process)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    async def run():
        async with trio.open_nursery() as n:
            port = await n.start(serve, _addr(a.listen), _addr(a.target), a.delay_ms)
            print(f"ready {port}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
