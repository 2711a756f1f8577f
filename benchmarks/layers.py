"""Where a small file's CPU goes, layer by layer, in one worker process.

The ``small`` tree (5,000 files of 1-64 KiB, served by nginx on 127.0.0.1) is
fetched in this process four ways, each on one pipelined keep-alive connection
(32 requests deep at most, sent in groups of 8, as a worker's small-file lane
sends them), each file written as fetch writes it (an unnamed file in its
directory, the body, the server's time, then its name):

``wire``
    a bare loop over :mod:`fetcher.wire` (``read_head``, ``framing``, ``Body``)
    and those system calls: the floor for this design in Python;
``transport``
    the prepared ``httpx.Request`` of each file (:func:`fetcher.transport.plain_get`)
    through :class:`fetcher.http1.ThreadConnTransport` to an ``httpx.Response``;
``fetch_file``
    :func:`fetcher.download.fetch_file` per file (redirects, checks, publish,
    outcome) on that transport;
``runner``
    a :class:`fetcher.runner.ShardRunner`, as a worker runs a shard: its lanes,
    trains, events and outcomes.

After one untimed pass, the layers run in turn, run by run; the report gives each
one's CPU (user+sys of this process) per file and its difference from the layer
below. Every run's files are checked against the tree's manifest::

    python benchmarks/layers.py                       # small tree, 5 runs each
    python benchmarks/layers.py --runs 9 --dest /dev/shm/layers
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from benchmarks.run import WORK, verify
from benchmarks.trees import Tree, build_tree
from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.http1 import ThreadConnTransport
from fetcher.models import Action, Job, RelPath, RemoteFile, Scope, Status
from fetcher.retry import build_retrying
from fetcher.runner import ShardRunner
from fetcher.transport import make_transport, plain_get
from fetcher.wire import Body, Conn, framing, read_head, write_all
from tests.servers import serve

DEPTH = 32  # requests in flight on the connection, as a worker's small-file lane
GROUP = DEPTH // 4  # sent once this many places are free (fetcher.http1's batches)
TRAIN = 4 * DEPTH  # files a lane takes at once (fetcher.runner)


class _Owner:
    """What a :class:`Body` tells when it is done (the bare loop keeps its one connection)."""

    read_timeout = 30.0

    def done(self, conn: Conn, keep: bool) -> None:
        pass


def _save(t: Transfer, job: Job, status: int, chunks: Iterable[bytes], layer: str) -> None:
    """Write a body as fetch writes a small file: unnamed in its directory, then, once it is
    whole (a 200 of the listed size), the server's time and its name."""
    final = os.path.join(t.dest, job.file.path)
    fd = os.open(os.path.dirname(final), os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    try:
        got = 0
        for chunk in chunks:
            write_all(fd, chunk)
            got += len(chunk)
        if status != 200 or got != job.file.size:
            raise SystemExit(f"{layer}: {job.file.url}: {status}, {got} bytes")
        os.utime(fd, (1e9, 1e9))
        os.link(f"/proc/self/fd/{fd}", final, src_dir_fd=fd, follow_symlinks=True)
    finally:
        os.close(fd)


def _wire(url: str, jobs: list[Job], t: Transfer) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    agent = t.user_agent
    heads = [
        f"GET {urlsplit(j.file.url).path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"User-Agent: {agent}\r\nAccept-Encoding: identity\r\n\r\n".encode("ascii")
        for j in jobs
    ]
    owner = _Owner()
    with socket.create_connection((host, port), timeout=30) as sock:
        conn = Conn(("http", host, port), sock, None)
        sent = 0
        for i, job in enumerate(jobs):
            if sent - i < DEPTH - GROUP and sent < len(heads):
                n = min(len(heads), i + DEPTH) - sent
                sock.sendall(b"".join(heads[sent : sent + n]))
                sent += n
            status, _, headers, _ = read_head(conn)
            mode, length = framing("GET", status, headers)
            _save(t, job, status, Body(owner, conn, mode, length, True), "wire")


def _in_trains(
    transport: ThreadConnTransport, jobs: list[Job], t: Transfer
) -> Iterator[tuple[Job, httpx.Request]]:
    """Each job with its prepared GET, announced to the transport a train at a time (as a
    lane announces them, so they may be sent ahead)."""
    for s in range(0, len(jobs), TRAIN):
        train = jobs[s : s + TRAIN]
        ready = [plain_get(j.file.url, t) for j in train]
        transport.expect(ready[1:])
        yield from zip(train, ready, strict=True)
        transport.expect([])


def _own_transport(t: Transfer) -> ThreadConnTransport:
    transport = make_transport(t, pipeline=DEPTH)
    assert isinstance(transport, ThreadConnTransport)
    return transport


def _transport(url: str, jobs: list[Job], t: Transfer) -> None:
    with _own_transport(t) as transport:
        for job, req in _in_trains(transport, jobs, t):
            resp = transport.handle_request(req)
            _save(t, job, resp.status_code, resp.stream, "transport")
            resp.close()


def _fetch_file(url: str, jobs: list[Job], t: Transfer) -> None:
    retrying = build_retrying(t)
    scope = Scope.for_start(t.root, t.aliases)
    known: set[str] = set()
    with _own_transport(t) as transport:
        for job, req in _in_trains(transport, jobs, t):
            out = fetch_file(
                transport, job, t, retrying=retrying, scope=scope, known_dirs=known,
                prepared=req, defer=True,
            )  # fmt: skip
            if out.status is not Status.FETCHED:
                raise SystemExit(f"fetch_file: {job.file.url}: {out.error}")


def _runner(url: str, jobs: list[Job], t: Transfer) -> None:
    outcomes = ShardRunner(t, 0, lambda events: None).run(jobs)
    bad = [o for o in outcomes if o.status is not Status.FETCHED]
    if bad:
        raise SystemExit(f"runner: {bad[0].url}: {bad[0].error}")


LAYERS: dict[str, Callable[[str, list[Job], Transfer], None]] = {
    "wire": _wire,
    "transport": _transport,
    "fetch_file": _fetch_file,
    "runner": _runner,
}


def _jobs(tree: Tree, url: str) -> list[Job]:
    return [
        Job(RemoteFile(url + quote(rel), RelPath(rel), size, True), Action.NEW)
        for rel, (size, _) in sorted(tree.files.items())
    ]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _one(name: str, url: str, jobs: list[Job], tree: Tree, dest: Path) -> tuple[float, float]:
    """One layer's pass over the tree, checked: its (wall, CPU) seconds."""
    shutil.rmtree(dest, ignore_errors=True)
    for d in sorted({os.path.dirname(rel) for rel in tree.files}):
        (dest / d).mkdir(parents=True, exist_ok=True)  # as the plan makes them
    # the runner's defaults for a worker of 4 lanes; its small files go on one
    t = Transfer(dest=str(dest), root=url, threads=4, pipeline=8)
    c0, w0 = _cpu(), time.perf_counter()
    LAYERS[name](url, jobs, t)
    wall, cpu = time.perf_counter() - w0, _cpu() - c0
    ok, problem = verify(tree, dest)
    if not ok:
        raise SystemExit(f"{name}: {problem}")
    return wall, cpu


def measure(
    url: str, tree: Tree, dest: Path, runs: int, layers: list[str]
) -> dict[str, list[tuple[float, float]]]:
    """Each layer's (wall, CPU) seconds per run, the layers interleaved run by run, after
    one untimed pass (the first pass of a process and a server is slower for all)."""
    jobs = _jobs(tree, url)
    _one(layers[0], url, jobs, tree, dest)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
    for r in range(runs):
        for name in layers:
            wall, cpu = _one(name, url, jobs, tree, dest)
            results[name].append((wall, cpu))
            print(f"  run {r}  {name:11} {wall:6.3f} s  cpu {cpu:6.3f} s", flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    return results


def report(results: dict[str, list[tuple[float, float]]], files: int) -> str:
    lines = [
        "| layer | wall s | CPU s | CPU µs/file | added by the layer, µs/file |",
        "|---|---|---|---|---|",
    ]
    below = None
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        per = cpu / files * 1e6
        added = "—" if below is None else f"{per - below:+.0f}"
        lines.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {per:.0f} | {added} |")
        below = per
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dest", type=Path, default=Path("/dev/shm/fetch-layers"))
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma list of {','.join(LAYERS)}")
    args = p.parse_args(argv)
    layers = [x for x in args.layers.split(",") if x]
    unknown = set(layers) - set(LAYERS)
    if unknown:
        p.error(f"unknown layers: {', '.join(sorted(unknown))}")
    WORK.mkdir(exist_ok=True)
    tree = build_tree("small", WORK)
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(serve("nginx", tree.root, WORK / "servers"))
        results = measure(srv.url, tree, args.dest, args.runs, layers)
    print()
    print(f"{len(tree.files)} files of the small tree, medians of {args.runs} runs:")
    print(report(results, len(tree.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
