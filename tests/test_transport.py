"""Which transport a run gets (fetcher/transport.py), and the --http2 one end to end."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from fetcher.config import Transfer
from fetcher.http1 import ThreadConnTransport
from fetcher.limits import SharedLimits
from fetcher.transport import make_client, make_transport
from tests.faultserver import FaultServer


def test_http11_gets_the_thread_transport_and_http2_the_pool(tmp_path: Path) -> None:
    t = Transfer(dest=str(tmp_path), root="http://127.0.0.1:1/", pipeline=3)
    plain = make_transport(t)
    assert isinstance(plain, ThreadConnTransport)
    assert plain._depth == 3
    pooled = make_transport(Transfer(dest=str(tmp_path), root=t.root, http2=True))
    assert isinstance(pooled, httpx.HTTPTransport)
    assert not isinstance(pooled, ThreadConnTransport)
    plain.close()
    pooled.close()


def test_client_sends_the_run_headers_and_ignores_proxy_variables(
    tmp_path: Path, monkeypatch
) -> None:
    # a proxy that does not exist: if the client used it, the request would fail
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9/")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9/")
    with FaultServer() as srv:
        srv.add_file("/pub/a.txt", b"a")
        t = Transfer(dest=str(tmp_path), root=srv.url + "pub/", user_agent="fetch/test")
        with make_client(t) as client:
            assert client.get(srv.url + "pub/a.txt").content == b"a"
        (req,) = [q for q in srv.requests if q.path == "/pub/a.txt"]
        assert req.headers["user-agent"] == "fetch/test"
        assert req.headers["accept-encoding"] == "identity"


def test_http2_setting_mirrors_through_the_pool_under_the_cap(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        files = {f"/pub/d{i % 3}/f{i}.bin": bytes([i]) * (1000 + i) for i in range(30)}
        for path, data in files.items():
            srv.add_file(path, data)
        cfg = tmp_path / "h2.toml"
        cfg.write_text(
            f'[jobs.h2]\nurl = "{srv.url}pub/"\ndest = "{tmp_path / "d"}"\n'
            "http2 = true\nprocs = 1\nmax_connections = 2\n"
        )
        r = run_fetch("--config", cfg)
        assert r.code == 0, r
        for path, data in files.items():
            assert (tmp_path / "d" / path.removeprefix("/pub/")).read_bytes() == data
        assert srv.max_concurrent_connections <= 2
        assert sorted(q.path for q in srv.requests if q.path.endswith(".bin")) == sorted(files)


def test_pooled_transport_holds_the_connection_cap(tmp_path: Path) -> None:
    limits = SharedLimits.create(1, None)
    t = Transfer(dest=str(tmp_path), root="http://127.0.0.1:1/", http2=True, threads=4)
    with FaultServer() as srv:
        for i in range(8):
            srv.add_file(f"/f{i}", b"x" * 100)
        transport = make_transport(t, limits)
        errors: list[BaseException] = []

        def get(i: int) -> None:
            try:
                resp = transport.handle_request(httpx.Request("GET", f"{srv.url}f{i}"))
                resp.read()
                resp.close()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=get, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        transport.close()
        assert not errors, errors
        assert srv.max_concurrent_connections == 1
