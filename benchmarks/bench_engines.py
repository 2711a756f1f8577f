"""What one HTTP request costs in each client engine.  (No disk: bodies are counted.)

Fetches every file of the ``small`` tree (5,000 files of 1-64 KiB) from nginx
on 127.0.0.1 over 16 connections in one process, with:

- ``httpx-pool``: ``httpx.Client`` (httpcore's shared pool), 16 threads —
  what fetch's workers did before ``fetcher.http1``;
- ``httpx-async``: ``httpx.AsyncClient``, 16 asyncio tasks;
- ``threadconn-client``: ``httpx.Client`` over fetch's ``ThreadConnTransport``;
- ``threadconn``: ``ThreadConnTransport.handle_request`` called directly (fetch's
  download path), 16 threads;
- ``threadconn-pipelined``: the same with ``--pipeline 4`` trains of 16 files;
- ``h11-threads``: h11 over one blocking socket per thread (a floor for Python
  threads with a pure-Python parser).

Reports wall time and process CPU (user+sys) per file; the ratios against
``httpx-pool`` are what to read (the machine is shared and noisy)::

    python benchmarks/bench_engines.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import h11  # noqa: E402
import httpx  # noqa: E402

from benchmarks.trees import build_tree  # noqa: E402
from fetcher.http1 import ThreadConnTransport  # noqa: E402
from tests.servers import serve  # noqa: E402

N = 16
HEADERS = {"User-Agent": "bench", "Accept-Encoding": "identity"}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _threads(paths: list[str], one: Callable[[list[str]], int]) -> int:
    """N threads each take batches of paths from a shared list; ``one`` fetches a batch."""
    todo = list(reversed(paths))
    lock = threading.Lock()
    total = [0]

    def work() -> None:
        n = 0
        while True:
            with lock:
                batch = [todo.pop() for _ in range(min(16, len(todo)))]
            if not batch:
                break
            n += one(batch)
        with lock:
            total[0] += n

    ts = [threading.Thread(target=work) for _ in range(N)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return total[0]


def _drain(resp: httpx.Response) -> int:
    n = sum(len(c) for c in resp.iter_raw())
    resp.close()
    return n


def httpx_pool(base: str, paths: list[str]) -> int:
    limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
    with httpx.Client(limits=limits, headers=HEADERS, trust_env=False) as c:
        return _threads(
            paths,
            lambda b: sum(_drain(c.send(c.build_request("GET", base + p), stream=True)) for p in b),
        )


def httpx_async(base: str, paths: list[str]) -> int:
    async def main() -> int:
        limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
        todo, total = list(reversed(paths)), 0
        async with httpx.AsyncClient(limits=limits, headers=HEADERS, trust_env=False) as c:

            async def work() -> None:
                nonlocal total
                while todo:
                    async with c.stream("GET", base + todo.pop()) as r:
                        async for chunk in r.aiter_raw():
                            total += len(chunk)

            await asyncio.gather(*(work() for _ in range(N)))
        return total

    return asyncio.run(main())


def _transport(pipeline: int = 1) -> ThreadConnTransport:
    return ThreadConnTransport(
        ssl_context=httpx.create_ssl_context,
        timeout=httpx.Timeout(30, connect=10),
        pipeline=pipeline,
    )


def threadconn_client(base: str, paths: list[str]) -> int:
    with httpx.Client(transport=_transport(), headers=HEADERS, trust_env=False) as c:
        return _threads(
            paths,
            lambda b: sum(_drain(c.send(c.build_request("GET", base + p), stream=True)) for p in b),
        )


def threadconn(base: str, paths: list[str]) -> int:
    t = _transport()
    try:
        return _threads(
            paths,
            lambda b: sum(
                _drain(t.handle_request(httpx.Request("GET", base + p, headers=HEADERS))) for p in b
            ),
        )
    finally:
        t.close()


def threadconn_pipelined(base: str, paths: list[str]) -> int:
    t = _transport(pipeline=4)

    def train(batch: list[str]) -> int:
        reqs = [httpx.Request("GET", base + p, headers=HEADERS) for p in batch]
        t.expect(reqs[1:])
        try:
            return sum(_drain(t.handle_request(r)) for r in reqs)
        finally:
            t.expect([])

    try:
        return _threads(paths, train)
    finally:
        t.close()


def h11_threads(base: str, paths: list[str]) -> int:
    host, port = base.split("//", 1)[1].split(":")
    socks: dict[int, tuple[socket.socket, h11.Connection]] = {}

    def one(batch: list[str]) -> int:
        key = threading.get_ident()
        if key not in socks:
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks[key] = (s, h11.Connection(h11.CLIENT))
        s, conn = socks[key]
        n = 0
        for p in batch:
            req = h11.Request(method="GET", target=p, headers=[("Host", host), *HEADERS.items()])
            s.sendall(conn.send(req) + conn.send(h11.EndOfMessage()))
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(s.recv(1 << 18))
                elif isinstance(ev, h11.Data):
                    n += len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    break
            conn.start_next_cycle()
        return n

    try:
        return _threads(paths, one)
    finally:
        for s, _ in socks.values():
            s.close()


ENGINES = {
    "httpx-pool": httpx_pool,
    "httpx-async": httpx_async,
    "threadconn-client": threadconn_client,
    "threadconn": threadconn,
    "threadconn-pipelined": threadconn_pipelined,
    "h11-threads": h11_threads,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    tree = build_tree("small", HERE / "work")
    paths = ["/" + quote(rel) for rel in sorted(tree.files)]
    want = sum(size for size, _ in tree.files.values())
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ENGINES}
    with serve("nginx", tree.root, HERE / "work" / "servers") as srv:
        base = f"http://127.0.0.1:{srv.port}"
        for r in range(args.rounds):
            for name, engine in ENGINES.items():  # interleaved, round by round
                t0, c0 = time.perf_counter(), _cpu()
                got = engine(base, paths)
                wall, cpu = time.perf_counter() - t0, _cpu() - c0
                if got != want:
                    print(f"{name}: {got} bytes, expected {want}", file=sys.stderr)
                    return 1
                results[name].append((wall, cpu))
                print(f"round {r + 1} {name:22s} {wall:6.2f} s  cpu {cpu:5.2f} s", flush=True)
    base_cpu = statistics.median(c for _, c in results["httpx-pool"])
    print(f"\n{len(paths)} files, {N} connections, medians of {args.rounds}:")
    print("| engine | wall s | CPU s | CPU ms/file | CPU ÷ httpx-pool |\n|---|---|---|---|---|")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(
            f"| {name} | {wall:.2f} | {cpu:.2f} | {cpu / len(paths) * 1000:.3f} | {cpu / base_cpu:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
