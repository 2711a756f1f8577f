"""A latency-injecting TCP proxy for benchmarks: 127.0.0.1 in, 127.0.0.1 out.

Every chunk read from one side is written to the other ``delay`` seconds
after it arrived, in arrival order (one queue per direction), so a 25 ms
delay each way makes a 50 ms round trip without reordering bytes.  Each
direction buffers at most ``max_buffer`` bytes; beyond that the proxy stops
reading, so TCP flow control pushes back on the sender instead of the proxy
growing without bound.

Run it as its own process (its CPU then does not count toward the tool
measured)::

    python benchmarks/proxy.py --listen 0 --upstream 8080 --delay-ms 25

It prints ``listening PORT`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys

__all__ = ["main", "run_proxy"]

READ_SIZE = 256 * 1024
HOST = "127.0.0.1"


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    max_buffer: int,
) -> bool:
    """Copy reader → writer, each chunk ``delay`` seconds late, in order, bounded.

    Returns True after a clean end of stream (passed on as a half-close), False
    when either side failed.
    """
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    room = asyncio.Semaphore(max(1, max_buffer // READ_SIZE))
    loop = asyncio.get_running_loop()

    async def receive() -> None:
        while True:
            await room.acquire()
            chunk = await reader.read(READ_SIZE)
            queue.put_nowait((loop.time() + delay, chunk))
            if not chunk:
                return

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:  # end of stream: half-close, as the sender did
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
            room.release()

    tasks = [asyncio.create_task(receive()), asyncio.create_task(send())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await t
    return all(not t.cancelled() and t.exception() is None for t in tasks)


async def _handle(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    upstream_port: int,
    delay: float,
    max_buffer: int,
) -> None:
    try:
        up_r, up_w = await asyncio.open_connection(HOST, upstream_port)
    except OSError:
        client_w.close()
        return
    for w in (client_w, up_w):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pumps = {
        asyncio.create_task(_pump(client_r, up_w, delay, max_buffer)),
        asyncio.create_task(_pump(up_r, client_w, delay, max_buffer)),
    }
    try:
        while pumps:
            done, pumps = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if not all(t.result() for t in done):
                break  # one side failed: closing both ends the other pump too
    finally:
        for w in (client_w, up_w):
            w.close()
        for t in pumps:
            t.cancel()
        for t in pumps:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await t
        for w in (client_w, up_w):
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()


async def run_proxy(
    listen_port: int, upstream_port: int, delay: float, max_buffer: int = 32 << 20
) -> None:
    # The loop keeps only weak references to tasks: a connection whose transports are
    # both out of the selector (one side paused for flow control, nothing to write)
    # would be collected mid-transfer ("Task was destroyed but it is pending!") and its
    # sockets closed under the tool measured. Each connection's task is held here.
    live: set[asyncio.Task[None]] = set()

    def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(_handle(r, w, upstream_port, delay, max_buffer))
        live.add(task)
        task.add_done_callback(live.discard)

    server = await asyncio.start_server(connected, HOST, listen_port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    p.add_argument("--upstream", type=int, required=True, help="port on 127.0.0.1 to forward to")
    p.add_argument("--delay-ms", type=float, default=25.0, help="added delay each way")
    p.add_argument("--max-buffer", type=int, default=32 << 20, help="bytes buffered per direction")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_proxy(args.listen, args.upstream, args.delay_ms / 1000, args.max_buffer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
