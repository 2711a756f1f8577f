"""The order the crawl reads listings in: deep directories early, shallow ones in time.

Deepest-first alone finds files after one listing per level, but leaves a shallow
directory (a repository's big images beside a deep package pool) to the end of the
crawl, where its files become the run's long tail; breadth-first alone reads every
upper directory before the first file turns up.  The crawl alternates.  One listing
at a time (``concurrency=1``) makes the order observable at the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from fetcher.config import Transfer, build_job
from fetcher.crawl import CrawlOptions, crawl
from fetcher.http1 import ThreadConnTransport
from fetcher.models import RemoteFile
from fetcher.pipeline import mirror
from fetcher.transport import make_client, make_transport
from tests.background import hold_listing, mirror_in_background
from tests.faultserver import Fault, FaultServer

SHALLOW = [f"s{i}/" for i in range(8)]
DEEP = ["deep/", "deep/a/", "deep/a/b/", "deep/a/b/c/"]


def _listing_order(tmp_path: Path, concurrency: int) -> tuple[list[str], set[str]]:
    with FaultServer() as srv:
        for d in SHALLOW:
            srv.add_file(f"/pub/{d}file.txt", d.encode())
        srv.add_file("/pub/deep/a/b/c/file.txt", b"deep")
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/")
        with make_client(t) as client:
            items = list(crawl(client, t, CrawlOptions(concurrency=concurrency)))
        listings = [q.path.removeprefix("/pub/") for q in srv.requests if q.path.endswith("/")]
    files = {i.path for i in items if isinstance(i, RemoteFile)}
    return listings, files


def test_deep_directories_are_read_early_and_shallow_ones_in_time(tmp_path: Path) -> None:
    listings, files = _listing_order(tmp_path, concurrency=1)
    assert files == {f"{d}file.txt" for d in [*SHALLOW, DEEP[-1]]}
    assert sorted(listings) == sorted(["", *SHALLOW, *DEEP])  # each listing read once
    deepest = listings.index(DEEP[-1])
    # not breadth-first: the deepest directory comes before the last shallow one ...
    assert deepest < listings.index(SHALLOW[-1]), listings
    # ... and not deepest-first only: shallow directories are read along the way
    assert any(listings.index(d) < deepest for d in SHALLOW), listings


def test_the_order_does_not_change_what_is_found(tmp_path: Path) -> None:
    one, files_one = _listing_order(tmp_path / "a", concurrency=1)
    many, files_many = _listing_order(tmp_path / "b", concurrency=8)
    assert files_one == files_many
    assert sorted(one) == sorted(many)


def test_a_listings_files_are_fetched_while_the_next_listing_is_held(tmp_path: Path) -> None:
    # The crawl hands its items to the coordinator in batches: a batch must go when the
    # crawl waits for a listing, or the files it holds wait for that listing too.
    with FaultServer() as srv:
        files = {"/pub/first.txt": b"first", "/pub/slow/later.txt": b"later"}
        gate = hold_listing(srv, files, "/pub/slow/")
        job = build_job({"url": srv.url + "pub/", "dest": str(tmp_path / "d"), "procs": 1}, "t")
        with mirror_in_background(job, gate) as result:
            assert srv.wait_for(1, path="/pub/first.txt", timeout=30), (
                "first.txt was not asked for while /pub/slow/ was held"
            )
            assert srv.count(path="/pub/slow/later.txt") == 0
    assert result and result[0].exit_code == 0
    assert (tmp_path / "d" / "first.txt").read_bytes() == b"first"
    assert (tmp_path / "d" / "slow" / "later.txt").read_bytes() == b"later"


def _wait_in_flight(srv: FaultServer, n: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while srv.max_concurrent_requests < n:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_listings_in_flight_follow_the_width_asked_for(tmp_path: Path) -> None:
    with FaultServer() as srv:
        gate = threading.Event()
        for d in SHALLOW:
            srv.add_file(f"/pub/{d}file.txt", d.encode())
            srv.persist(f"/pub/{d}", Fault.gated(gate))
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/")
        found: list[object] = []
        with make_client(t) as client:
            walk = crawl(client, t, CrawlOptions(concurrency=8), width=lambda: 3)
            th = threading.Thread(target=lambda: found.extend(walk), daemon=True)
            th.start()
            try:
                assert _wait_in_flight(srv, 3), srv.max_concurrent_requests
            finally:
                gate.set()
                th.join(timeout=60)
        assert not th.is_alive()
        assert srv.max_concurrent_requests == 3  # of the 8 it could have had
    assert {i.path for i in found if isinstance(i, RemoteFile)} == {f"{d}file.txt" for d in SHALLOW}


def test_a_resync_reads_listings_on_every_connection(tmp_path: Path) -> None:
    # Nothing to download: the listings may have all --max-connections (a fresh mirror
    # leaves half of them to the downloads). Without pipelining, one listing each.
    with FaultServer() as srv:
        for d in SHALLOW:  # (dated long ago: a file just changed is asked again, plan.racy)
            srv.add_file(f"/pub/{d}file.txt", d.encode(), last_modified=1_700_000_000)
        job = build_job(
            {"url": srv.url + "pub/", "dest": str(tmp_path / "d"), "procs": 1,
             "max_connections": 6, "pipeline": 1},
            "t",
        )  # fmt: skip
        assert mirror(job).exit_code == 0
        gate = threading.Event()
        for d in SHALLOW:
            srv.persist(f"/pub/{d}", Fault.gated(gate))
        srv.reset_stats()
        with mirror_in_background(job, gate) as result:
            assert _wait_in_flight(srv, 6), srv.max_concurrent_requests
        assert srv.max_concurrent_requests == 6
        assert not any(q.path.endswith(".txt") for q in srv.requests)  # nothing fetched
    assert result and result[0].exit_code == 0


def test_listings_go_in_trains_on_one_connection(tmp_path: Path) -> None:
    # One crawl thread, pipeline 4: after the root, the eight directories go as two
    # trains of four, the three after each first announced to the transport (sent
    # ahead on the connection), each listing asked for once.
    with FaultServer() as srv:
        for d in SHALLOW:
            srv.add_file(f"/pub/{d}file.txt", d.encode())
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/", pipeline=4)
        transport = make_transport(t, pool_size=1)
        assert isinstance(transport, ThreadConnTransport)
        announced: list[list[str]] = []

        def ahead(requests: Sequence[httpx.Request]) -> None:
            announced.append([str(r.url).removeprefix(srv.url + "pub/") for r in requests])
            transport.expect(requests)

        with make_client(t, transport=transport) as client:
            items = list(crawl(client, t, CrawlOptions(concurrency=1), ahead=ahead))
        listings = [q.path for q in srv.requests if q.path.endswith("/")]
        connections = srv.connections
    assert {i.path for i in items if isinstance(i, RemoteFile)} == {f"{d}file.txt" for d in SHALLOW}
    assert sorted(listings) == sorted(["/pub/", *(f"/pub/{d}" for d in SHALLOW)])
    trains = [a for a in announced if a]
    assert [len(a) for a in trains] == [3, 3], announced
    assert sorted(x for a in trains for x in a) == sorted(SHALLOW[1:4] + SHALLOW[5:8])
    assert connections == 1


def test_a_listing_that_fails_mid_train_is_retried_after_the_train(tmp_path: Path) -> None:
    # s1/'s first answer is a 503 (Retry-After: 1) while s2/ and s3/ are already asked for
    # on the same connection. Retried at once, its request came out of turn: the
    # connection went, with the answers on their way to the listings behind it, which
    # were asked for again (every listing of a 32-deep train, twice), and all of them
    # waited out its Retry-After first. Retried after the train: each asked for once.
    with FaultServer() as srv:
        for d in SHALLOW:
            srv.add_file(f"/pub/{d}file.txt", d.encode())
        srv.script("/pub/s1/", [Fault.status(503, retry_after="1")])
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/", pipeline=4)
        transport = make_transport(t, pool_size=1)
        assert isinstance(transport, ThreadConnTransport)
        with make_client(t, transport=transport) as client:
            items = list(crawl(client, t, CrawlOptions(concurrency=1), ahead=transport.expect))
        listings = [q.path for q in srv.requests if q.path.endswith("/")]
        connections = srv.connections
    assert {i.path for i in items if isinstance(i, RemoteFile)} == {f"{d}file.txt" for d in SHALLOW}
    assert sorted(listings) == sorted(["/pub/", "/pub/s1/", *(f"/pub/{d}" for d in SHALLOW)])
    assert connections == 1


def _trains(tmp_path: Path, pipelining: bool) -> tuple[list[list[str]], int, set[str]]:
    """Crawl root + 8 directories at concurrency 4, pipeline 4: the trains announced."""
    with FaultServer() as srv:
        for d in SHALLOW:
            srv.add_file(f"/pub/{d}file.txt", d.encode())
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/", pipeline=4)
        transport = make_transport(t, pool_size=4, pipeline=16)
        assert isinstance(transport, ThreadConnTransport)
        announced: list[list[str]] = []

        def ahead(requests: Sequence[httpx.Request]) -> None:
            announced.append([str(r.url).removeprefix(srv.url + "pub/") for r in requests])
            transport.expect(requests)

        opts = CrawlOptions(concurrency=4)
        with make_client(t, transport=transport) as client:
            items = list(crawl(client, t, opts, ahead=ahead, pipelining=lambda: pipelining))
        listings = [q.path for q in srv.requests if q.path.endswith("/")]
        connections = srv.connections
    assert sorted(listings) == sorted(["/pub/", *(f"/pub/{d}" for d in SHALLOW)])
    files = {i.path for i in items if isinstance(i, RemoteFile)}
    return [a for a in announced if a], connections, files


def test_listings_gather_on_as_few_threads_as_hold_them(tmp_path: Path) -> None:
    # 4 threads x pipeline 4 = 16 listings in flight, and 16 fit on one connection: the
    # eight directories go as one train (seven announced behind the first), on one
    # thread, so the crawl's threads do not queue for the interpreter lock.
    trains, connections, files = _trains(tmp_path, pipelining=True)
    assert files == {f"{d}file.txt" for d in SHALLOW}
    assert trains == [SHALLOW[1:]], trains
    assert connections == 1


def test_listings_spread_over_the_threads_when_pipelining_stops(tmp_path: Path) -> None:
    # The transport no longer sends requests ahead: trains of one request at a time would
    # be serial, so the listings go back to every thread, two each.
    trains, connections, files = _trains(tmp_path, pipelining=False)
    assert files == {f"{d}file.txt" for d in SHALLOW}
    assert sorted(len(a) for a in trains) == [1, 1, 1, 1], trains
    assert connections > 1  # (a thread done early may take another's train)


def test_with_the_transport_given_listings_skip_the_client_and_go_as_files_do(
    tmp_path: Path,
) -> None:
    # crawl(transport=...) sends each listing's prepared request (plain_get) to the
    # transport itself: the client is not asked, and the server sees the request a file
    # gets, the same but for httpx.Client's default headers.
    with FaultServer() as srv:
        for d in SHALLOW:
            srv.add_file(f"/pub/{d}file.txt", d.encode())
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/")
        seen: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {}
        for way in ("client", "transport"):
            transport = make_transport(t)
            asked: list[str] = []
            with make_client(t, transport=transport) as client:
                client.send = _recording(client.send, asked)  # type: ignore[method-assign]
                given = transport if way == "transport" else None
                items = list(crawl(client, t, CrawlOptions(concurrency=1), transport=given))
            assert {i.path for i in items if isinstance(i, RemoteFile)} == {
                f"{d}file.txt" for d in SHALLOW
            }
            assert (asked == []) is (way == "transport"), asked
            seen[way] = sorted(
                (q.path, sorted(q.headers.items())) for q in srv.requests if q.path.endswith("/")
            )
            srv.reset_stats()
        assert [p for p, _ in seen["transport"]] == [p for p, _ in seen["client"]]
        assert len(seen["client"]) == 9
        for (_, direct), (_, through) in zip(seen["transport"], seen["client"], strict=True):
            # the files' requests' headers: httpx.Client's defaults (Accept: */*, Connection:
            # keep-alive, both HTTP/1.1's own defaults) are not among them
            extra = set(through) - set(direct)
            assert set(direct) <= set(through) and extra == {
                ("accept", "*/*"),
                ("connection", "keep-alive"),
            }


def _recording(send: Any, asked: list[str]) -> Any:
    def recorded(request: httpx.Request, **kw: Any) -> httpx.Response:
        asked.append(str(request.url))
        return send(request, **kw)  # type: ignore[no-any-return]

    return recorded
