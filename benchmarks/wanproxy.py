"""A userland WAN on loopback: one-way delay and a per-connection rate cap, both ways.

The kernel here has no netem, so this stands in for a cross-cloud link where one
stream is slow and many are fast. Each direction of each connection is a delay line:
a chunk read at t is written no earlier than t + delay, and no faster than ``rate``
bytes per second (token bucket). Run it as a process:

    python -m benchmarks.wanproxy --upstream 127.0.0.1:9000 --port 0 --delay-ms 20 --rate-mbps 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

CHUNK = 64 * 1024


async def _line(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float, rate: float
) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)

    async def read() -> None:
        while chunk := await src.read(CHUNK):
            await queue.put((time.monotonic() + delay, chunk))
        await queue.put((time.monotonic() + delay, b""))

    async def write() -> None:
        budget_t = time.monotonic()  # when the link is next free
        while True:
            due, chunk = await queue.get()
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            if not chunk:
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            budget_t = max(budget_t, time.monotonic()) + len(chunk) / rate
            dst.write(chunk)
            await dst.drain()
            wait = budget_t - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(read())
        tg.create_task(write())


async def serve(upstream: tuple[str, int], port: int, delay: float, rate: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*upstream)
        except OSError:
            writer.close()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_line(reader, up_w, delay, rate))
                tg.create_task(_line(up_r, writer, delay, rate))
        except* (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)  # the port, for the caller
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=20)
    p.add_argument("--rate-mbps", type=float, default=8, help="MB/s per connection, each way")
    a = p.parse_args()
    host, _, port = a.upstream.rpartition(":")
    try:
        asyncio.run(serve((host, int(port)), a.port, a.delay_ms / 1000, a.rate_mbps * 1e6))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
