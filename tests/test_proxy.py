"""Through an HTTP proxy: --proxy, or the environment's (curl's and wget's variables).

The mirror is named ``mirror.test``, a name only the test proxy knows (it maps it
to the project's server on 127.0.0.1): a run that went around the proxy could not
reach it at all.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fetcher.config import proxy_for
from tests.faultserver import FaultServer
from tests.fixtures_servers import TLS
from tests.proxyserver import ForwardProxy
from tests.trees import settled

FILES = {"pub/a.txt": b"a" * 10, "pub/sub/b.bin": os.urandom(3 << 20), "pub/sub/c.txt": b"c"}


def _www(tmp_path: Path) -> Path:
    for rel, data in FILES.items():
        (tmp_path / "www" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "www" / rel).write_bytes(data)
    return settled(tmp_path / "www")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    # mirror.test is never looked up (workers are forked: they keep this too), so a run
    # that went around the proxy fails here instead of asking a DNS server
    real = socket.getaddrinfo

    def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "::1", "localhost", b"127.0.0.1"):
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: not looked up in tests")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


def test_every_request_goes_through_the_proxy_given(tmp_path: Path, run_fetch) -> None:
    with FaultServer(root=_www(tmp_path)) as srv, ForwardProxy({"mirror.test": srv.port}) as px:
        mirror = f"http://mirror.test:{srv.port}/pub/"
        proxy = px.url.replace("http://", "http://puser:p%40ss@")
        r = run_fetch("--mirror", mirror, "--dest", tmp_path / "d", "--proxy", proxy,
                      "--procs", "2", "--max-connections", "4")  # fmt: skip
        seen = list(px.seen)
    assert r.code == 0, r.output
    for rel, data in FILES.items():
        assert (tmp_path / "d" / rel.removeprefix("pub/")).read_bytes() == data
    targets = sorted(s.target for s in seen)
    base = f"http://mirror.test:{srv.port}/pub/"
    assert targets == sorted(
        [base, base + "a.txt", base + "sub/", base + "sub/b.bin", base + "sub/c.txt"]
    )
    basic = "Basic " + base64.b64encode(b"puser:p@ss").decode()
    assert all(s.proxy_auth == basic for s in seen)
    assert "p%40ss" not in r.output and "p@ss" not in r.output


def test_the_environment_s_proxy_is_used_and_a_second_run_is_incremental(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultServer(root=_www(tmp_path)) as srv, ForwardProxy({"mirror.test": srv.port}) as px:
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{px.port}")  # no scheme, as curl allows
        mirror = f"http://mirror.test:{srv.port}/pub/"
        assert run_fetch("--mirror", mirror, "--dest", tmp_path / "d", "--procs", "1").code == 0
        first = len(px.seen)
        again = run_fetch("--mirror", mirror, "--dest", tmp_path / "d", "--procs", "1")
        assert again.code == 0, again.output
        second = px.seen[first:]
    assert first == 5
    assert sorted(s.target for s in second) == [
        f"http://mirror.test:{srv.port}/pub/",
        f"http://mirror.test:{srv.port}/pub/sub/",
    ]  # listings only: nothing changed


def test_loopback_mirrors_bypass_the_environment_s_proxy(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultServer(root=_www(tmp_path)) as srv, ForwardProxy() as px:
        monkeypatch.setenv("http_proxy", px.url)
        r = run_fetch("--mirror", f"{srv.url}pub/", "--dest", tmp_path / "d", "--procs", "1")
        assert r.code == 0, r.output
        assert px.seen == []
        assert len(srv.requests) == 5


def test_which_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "proxy.example:3128")
    monkeypatch.setenv("https_proxy", "https://sproxy.example:443")
    monkeypatch.setenv("no_proxy", "internal.example,.corp")
    assert proxy_for("http://mirror.example/x/") == "http://proxy.example:3128"
    assert proxy_for("https://mirror.example/x/") == "https://sproxy.example:443"
    for direct in ("http://a.internal.example/", "http://x.corp/", "http://127.0.0.1:8/",
                   "http://localhost/", "http://[::1]:8/"):  # fmt: skip
        assert proxy_for(direct) is None, direct
    assert proxy_for("http://mirror.example/", "direct") is None
    assert proxy_for("http://127.0.0.1/", "http://p.example:1") == "http://p.example:1"
    monkeypatch.delenv("http_proxy")
    assert proxy_for("http://mirror.example/") is None
    monkeypatch.setenv("ALL_PROXY", "http://all.example:8")
    assert proxy_for("http://mirror.example/") == "http://all.example:8"


IMPORTS = (
    "import sys; from fetcher.config import proxy_for; p = proxy_for(sys.argv[1]); "
    "print(p, 'urllib.request' in sys.modules)"
)


def test_proxy_variables_are_read_only_when_there_are_any() -> None:
    # urllib.request (http.client, email, ...) costs ~17 ms of every run's start-up
    bare = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}

    def ask(url: str, **env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", IMPORTS, url], env={**bare, **env},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    assert ask("http://mirror.example/") == "None False"
    assert ask("http://127.0.0.1:8/", http_proxy="p.example:1") == "None False"
    assert ask("http://mirror.example/", http_proxy="p.example:1") == "http://p.example:1 True"
    assert ask("http://mirror.example/", NO_PROXY="*") == "None True"


def test_proxy_direct_ignores_the_environment(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultServer(root=_www(tmp_path)) as srv, ForwardProxy({"mirror.test": srv.port}) as px:
        monkeypatch.setenv("http_proxy", px.url)
        mirror = f"http://mirror.test:{srv.port}/pub/"
        r = run_fetch(
            "--mirror", mirror, "--dest", tmp_path / "d", "--proxy", "direct", "--retries", "1"
        )
        assert r.code == 1 and "not looked up in tests" in r.output, r.output  # went direct
        assert px.seen == [] and srv.requests == []


def test_https_goes_through_a_connect_tunnel_and_is_verified(
    tls: TLS, tmp_path: Path, run_fetch
) -> None:
    srv = FaultServer(root=_www(tmp_path), tls=tls.server)
    with srv, ForwardProxy() as px:
        mirror = f"https://localhost:{srv.port}/pub/"
        args = ("--mirror", mirror, "--proxy", px.url, "--procs", "1", "--retries", "1")
        r = run_fetch(*args, "--dest", tmp_path / "d", "--ca-cert", tls.ca_pem)
        assert r.code == 0, r.output
        tunnels = [s for s in px.seen if s.method == "CONNECT"]
        assert tunnels and all(s.target == f"localhost:{srv.port}" for s in tunnels)
        assert [s for s in px.seen if s.method != "CONNECT"] == []
        untrusted = run_fetch(*args, "--dest", tmp_path / "e")  # the system's CAs: refused
        assert untrusted.code != 0 and "not trusted" in untrusted.output, untrusted.output
    for rel, data in FILES.items():
        assert (tmp_path / "d" / rel.removeprefix("pub/")).read_bytes() == data
    assert not (tmp_path / "e" / "a.txt").exists()


@pytest.mark.parametrize(
    ("name", "value", "mirror", "message"),
    [
        (
            "http_proxy",
            "socks5://127.0.0.1:1",
            "http://mirror.test:9/pub/",
            '$http_proxy: expected an http:// or https:// proxy URL, got "socks5://127.0.0.1:1"',
        ),
        (
            "HTTP_PROXY",
            "http://a b:3128",
            "http://mirror.test:9/pub/",
            '$HTTP_PROXY: invalid host "a b" in "http://a b:3128"',
        ),
        (
            "https_proxy",
            "http://u:s3cret@127.0.0.1:99999",
            "https://mirror.test/pub/",
            '$https_proxy: expected a port from 0 to 65535 in "http://127.0.0.1:99999"',
        ),
        (
            "ALL_PROXY",
            "socks5h://u:s3cret@127.0.0.1:1",
            "http://mirror.test:9/pub/",
            '$ALL_PROXY: expected an http:// or https:// proxy URL, got "socks5h://127.0.0.1:1"',
        ),
    ],
)
def test_a_proxy_from_the_environment_is_checked_as_proxy_is(
    tmp_path: Path,
    run_fetch,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    mirror: str,
    message: str,
) -> None:
    """Refused before anything starts (exit 2, naming the variable), not a listing error."""
    monkeypatch.setenv(name, value)
    r = run_fetch("--mirror", mirror, "--dest", tmp_path / "d", "--retries", "1")
    assert r.code == 2, r.output
    assert f"fetch: error: {message}" in r.output
    assert "s3cret" not in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()


def test_a_proxy_from_the_environment_not_used_is_not_checked(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "socks5://127.0.0.1:1")
    monkeypatch.setenv("no_proxy", "mirror.test")
    for direct in ("http://mirror.test/", "http://127.0.0.1:8/", "http://[::1]:8/"):
        assert proxy_for(direct) is None, direct  # no_proxy, loopback: never used
    assert proxy_for("http://mirror.example/", "direct") is None
    assert proxy_for("https://mirror.example/") is None  # (http_proxy is for http:// only)
    with FaultServer(root=_www(tmp_path)) as srv:
        r = run_fetch("--mirror", f"{srv.url}pub/", "--dest", tmp_path / "d", "--procs", "1")
    assert r.code == 0, r.output


def test_a_proxy_that_refuses_connections_is_named_in_the_listing_error(
    tmp_path: Path, run_fetch
) -> None:
    """The error was "ConnectError: [Errno 111] Connection refused", which reads as the
    mirror refusing; without a proxy it names the host it could not reach."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FaultServer(root=_www(tmp_path)) as srv:
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", tmp_path / "d", "--retries", "1",
                      "--proxy", f"http://127.0.0.1:{port}")  # fmt: skip
        requests = srv.count()
    assert r.code == 1, r.output
    assert f"cannot connect to the proxy 127.0.0.1:{port}: " in r.output, r.output
    assert requests == 0
