"""Which transport a run gets (fetcher/transport.py), and the --http2 one end to end."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from fetcher.config import Transfer
from fetcher.http1 import ThreadConnTransport
from fetcher.limits import SharedLimits
from fetcher.transport import file_url, make_client, make_transport, plain_get
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


ROOTS = ["http://127.0.0.1:8080/", "http://127.0.0.1/pub/centos/7/os/x86_64/Packages/",
         "https://[::1]:8443/debian/", "http://Mirror.Example/pub/"]  # fmt: skip
NAMES = ["a.rpm", "pool/main/a/acl/acl_2.3.1-3%2Bb1~deb12u1_amd64.deb", "caf%C3%A9/x.iso",
         "dir/", "sub/.hidden", "a,b;c=d&e!f$g'(h)*+:@i", "a%2bb", "a b", "x/./y", "x/../y",
         "x/..", "a//b", "a?x=1", "a#f", "a%zz", "é.rpm", "", "%2F", "a%2Fb"]  # fmt: skip


@pytest.mark.parametrize("root", ROOTS)
def test_request_urls_below_the_root_are_what_httpx_would_parse(root: str) -> None:
    """The URLs made without a parse equal httpx's parse of the same string, always;
    a package path below a root that parses to itself is made without one."""
    made_fast = 0
    for name in NAMES:
        url = root + name
        got = file_url(url, root)
        if not isinstance(got, httpx.URL):
            assert got == url  # left for httpx to parse
            continue
        made_fast += 1
        want = httpx.URL(url)
        assert (str(got), got.raw_path, got.scheme, got.host, got.port) == (
            str(want), want.raw_path, want.scheme, want.host, want.port
        ), name  # fmt: skip
        assert got == want and httpx.Request("GET", got).url == want
    if root == ROOTS[3]:  # the host is written in capitals: httpx's parse is not the string
        assert made_fast == 0
    else:
        assert made_fast >= 6
        assert isinstance(file_url(root + NAMES[1], root), httpx.URL)


def test_requests_made_without_a_parse_fetch_the_right_files(tmp_path: Path) -> None:
    """Through the transport to a real server: each file's own bytes."""
    www = tmp_path / "www"
    names = ["a+b~c.deb", "d,e;f=g.rpm", "caf\u00e9.iso"]
    for i, name in enumerate(names):
        (www / "sub").mkdir(parents=True, exist_ok=True)
        (www / "sub" / name).write_bytes(f"{i}:{name}".encode())
    with FaultServer(root=www) as srv:
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url)
        with make_transport(t) as transport:
            for i, name in enumerate(names):
                url = srv.url + "sub/" + quote(name, safe="~,;=+")
                req = plain_get(url, t)
                assert isinstance(req.url, httpx.URL) and str(req.url) == url
                resp = transport.handle_request(req)
                try:
                    assert resp.status_code == 200 and resp.read() == f"{i}:{name}".encode()
                finally:
                    resp.close()


def test_http2_without_the_h2_package_is_a_usage_error_with_the_way_to_get_it(
    tmp_path: Path, run_fetch, monkeypatch
) -> None:
    """Else every request to a server that offers HTTP/2 failed, mid-run, with httpx's
    ModuleNotFoundError for h2 (a server offering only HTTP/1.1 hid it)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "h2" else real(name, *a)
    )
    cfg = tmp_path / "h2.toml"
    cfg.write_text('[jobs.h2]\nurl = "http://127.0.0.1:9/pub/"\nhttp2 = true\n')
    r = run_fetch("--config", cfg, "--check")
    assert r.code == 2, r.output
    assert "jobs.h2.http2: needs the h2 package" in r.output, r.output
    assert "pip install 'fetcher[http2]'" in r.output, r.output
