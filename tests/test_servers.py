"""Self-tests of the test harness: real servers, the fault server, the tree builders."""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import re
import socket
import threading
import time
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urljoin

import httpx
import pytest

from tests import servers as servers_module
from tests.faultserver import AUTO, Fault, FaultServer, generated_body
from tests.fixtures_servers import HardTree
from tests.servers import KINDS, Request, hidden_names, serve, visible_manifest
from tests.trees import (
    BIG_FILE,
    HARD_NAMES,
    LONG_NAME,
    MANY_COUNT,
    NFC_NAME,
    NFD_NAME,
    make_simple_tree,
    tree_manifest,
)

_HREF = re.compile(r'(?<![\w:-])href="([^"]*)"')


def hrefs(page: str) -> dict[str, str]:
    """Decoded child name -> href as written, for the relative links of a listing page."""
    found = {}
    for raw in _HREF.findall(page):
        href = html.unescape(raw)
        name = href.removeprefix("./")  # Apache and Caddy write "./a:b" so it is no scheme
        if not name or name[0] in "?#/" or name.startswith(("../", "http:", "https:")):
            continue
        found[unquote(name, errors="strict").rstrip("/")] = href
    return found


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- trees ------------------------------------------------------------------------


def test_hard_tree_manifest(hard_tree: HardTree) -> None:
    m = hard_tree.manifest
    assert NFC_NAME != NFD_NAME and {NFC_NAME, NFD_NAME} <= m.keys()
    assert m[NFC_NAME] != m[NFD_NAME]
    assert unicodedata.normalize("NFC", NFD_NAME) == NFC_NAME
    assert len(LONG_NAME.encode()) == 200 and LONG_NAME in m
    for name in ("empty-dir", ".empty-dot-dir", "deep", "many", "big"):
        assert m[name] is None
    assert m["empty.txt"] == sha256(b"")
    assert "deep/" + "/".join(f"level{i}" for i in range(1, 11)) + "/leaf.txt" in m
    assert sum(1 for p in m if p.startswith("many/")) == MANY_COUNT
    big = (hard_tree.root / BIG_FILE).read_bytes()
    assert len(big) == 20 << 20 and m[BIG_FILE] == sha256(big)
    assert len(gzip.compress(big[: 1 << 20], 1)) > 1 << 20  # incompressible
    assert all(name in m for name in HARD_NAMES)
    assert tree_manifest(hard_tree.root) == m


def test_tree_manifest_skips_state_dir_and_sees_changes(tmp_path: Path) -> None:
    (tmp_path / ".fetcher" / "partial").mkdir(parents=True)
    (tmp_path / "d" / ".fetcher").mkdir(parents=True)  # only the top-level one is skipped
    (tmp_path / "d" / "f").write_bytes(b"1")
    before = tree_manifest(tmp_path)
    assert before == {"d": None, "d/.fetcher": None, "d/f": sha256(b"1")}
    (tmp_path / "d" / "f").write_bytes(b"2")
    assert tree_manifest(tmp_path) != before


def test_simple_tree_is_deterministic(tmp_path: Path) -> None:
    a = make_simple_tree(tmp_path / "a", files=60, dirs=7, min_size=10, max_size=100, seed=3)
    b = make_simple_tree(tmp_path / "b", files=60, dirs=7, min_size=10, max_size=100, seed=3)
    c = make_simple_tree(tmp_path / "c", files=60, dirs=7, min_size=10, max_size=100, seed=4)
    assert a == b != c
    assert sum(v is None for v in a.values()) == 7 and len(a) == 67
    sizes = [p.stat().st_size for p in (tmp_path / "a").rglob("*.bin")]
    assert len(sizes) == 60 and all(10 <= s <= 100 for s in sizes)


# --- real servers -------------------------------------------------------------------


@pytest.mark.real_server
def test_real_server_lists_serves_and_ranges(
    server_kind: str, hard_tree: HardTree, tmp_path: Path
) -> None:
    with serve(server_kind, hard_tree.root, tmp_path) as srv, httpx.Client() as client:
        assert srv.url == f"http://127.0.0.1:{srv.port}/" and srv.kind == server_kind
        page = client.get(srv.url)
        assert page.status_code == 200
        links = hrefs(page.text)
        hidden = hidden_names(server_kind)
        expected = [n for n in (*HARD_NAMES, "empty-dir", ".empty-dot-dir") if not hidden(n)]
        assert [n for n in expected if n not in links] == []
        fetched = [n for n in HARD_NAMES if not hidden(n)]
        for name in fetched:  # every hostile name, fetched through its own href
            r = client.get(urljoin(srv.url, links[name]))
            assert (r.status_code, sha256(r.content)) == (200, hard_tree.manifest[name]), name

        big = (hard_tree.root / BIG_FILE).read_bytes()
        r = client.get(srv.url + BIG_FILE, headers={"Range": "bytes=1000-1999"})
        if server_kind == "python":  # http.server knows no Range and no ETag
            assert r.status_code == 200 and r.content == big
            validator = {"If-Modified-Since": r.headers["Last-Modified"]}
        else:
            assert r.status_code == 206 and r.content == big[1000:2000]
            assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(big)}"
            assert r.headers["ETag"] and r.headers["Last-Modified"]
            validator = {"If-None-Match": r.headers["ETag"]}
        assert client.get(srv.url + BIG_FILE, headers=validator).status_code == 304

        log = srv.requests(min_count=len(fetched) + 3)
        assert len(log) == len(fetched) + 3
        assert log[0] == Request("GET", "/", 200, log[0].bytes_sent)
        ranged = [r for r in log if r.path == "/" + BIG_FILE]
        assert ranged[0].status == (200 if server_kind == "python" else 206)
        if server_kind != "python":
            assert ranged[0].range == "bytes=1000-1999" and ranged[0].bytes_sent == 1000
        hostile = [r for r in log if r.path == "/" + LONG_NAME]
        assert hostile and "%" in hostile[0].target  # logged raw, decoded by .path


@pytest.mark.real_server
def test_real_server_stops_on_error(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(ZeroDivisionError), serve("python", tmp_path / "root", tmp_path) as srv:
        pid, port = srv.pid, srv.port
        1 / 0  # noqa: B018
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.real_server
@pytest.mark.parametrize(
    ("style", "marker"), [("fancy", "<pre>"), ("table", "<table>"), ("plain", "<ul>")]
)
def test_apache_styles(tmp_path: Path, style: str, marker: str) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a b.txt").write_bytes(b"x")
    with serve("apache", tmp_path / "root", tmp_path, style=style) as srv:
        page = httpx.get(srv.url).text
        assert marker in page and "a b.txt" in hrefs(page)


@pytest.mark.real_server
@pytest.mark.parametrize("kind", ["nginx", "nginx-fancyindex"])
def test_nginx_human_sizes(tmp_path: Path, kind: str) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f.bin").write_bytes(b"x" * 5_000_000)
    with serve(kind, tmp_path / "root", tmp_path, exact_size=False, localtime=True) as srv:
        page = httpx.get(srv.url).text
        assert "5000000" not in page and "f.bin" in hrefs(page)


def test_serve_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown server kind"), serve("iis", tmp_path, tmp_path):
        pass
    with (
        pytest.raises(ValueError, match="apache option"),
        serve("python", tmp_path, tmp_path, style="table"),
    ):
        pass
    assert set(KINDS) >= {"nginx", "apache", "lighttpd", "caddy", "python"}


def test_missing_binary_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(servers_module._BINARIES, "lighttpd", "no-such-lighttpd")
    assert "no-such-lighttpd not found" in (servers_module.unavailable("lighttpd") or "")
    with (
        pytest.raises(pytest.skip.Exception, match="apt-get install -y lighttpd"),
        serve("lighttpd", tmp_path, tmp_path),
    ):
        pass


def test_visible_manifest() -> None:
    m = {"a": None, "a/.b": "1", ".c": None, ".c/d": "2", "e": "3"}
    assert visible_manifest("nginx", m) == {"a": None, "e": "3"}
    assert visible_manifest("apache", m) == m


# --- fault server: serving ----------------------------------------------------------


def test_fault_server_serves_disk_tree_like_nginx(hard_tree: HardTree) -> None:
    with FaultServer(root=hard_tree.root) as srv, httpx.Client() as client:
        page = client.get(srv.url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        links = hrefs(page.text)
        assert {*HARD_NAMES, "empty-dir", ".empty-dot-dir"} <= links.keys()
        assert links["a?b=c&d=e.txt"] == "a%3Fb%3Dc%26d%3De.txt"
        assert links[NFD_NAME] == "cafe%CC%81.txt" and links["big"] == "big/"
        line = next(x for x in page.text.splitlines() if 'href="empty.txt"' in x)
        assert re.search(r"</a> +\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d +0$", line)
        big_page = client.get(srv.url + "big/").text
        assert re.search(r"twenty-mib.bin</a> .* 20971520\r?$", big_page, re.M)
        for name in HARD_NAMES:
            r = client.get(urljoin(srv.url, links[name]))
            assert sha256(r.content) == hard_tree.manifest[name], name
        assert client.get(srv.url + "many/").text.count("<a href=") == MANY_COUNT + 1
        assert client.get(srv.url + "big").status_code == 301
        assert client.get(srv.url + "../etc/passwd").status_code == 404
        assert client.get(srv.url + "%2e%2e/x").status_code == 404
        assert srv.count(path="/") == 1
    assert not srv.errors


def test_memory_file_ranges_and_validators(fault_server: FaultServer) -> None:
    data = bytes(range(256)) * 40
    fault_server.add_file("/d/é x.bin", data, etag='"v1"', last_modified=1_700_000_000)
    url = fault_server.url + "d/%C3%A9%20x.bin"
    with httpx.Client() as c:
        r = c.get(url)
        assert r.content == data and r.headers["ETag"] == '"v1"'
        assert r.headers["Last-Modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
        assert r.headers["Content-Length"] == str(len(data))
        head = c.head(url)
        assert head.content == b"" and head.headers["Content-Length"] == str(len(data))
        r = c.get(url, headers={"Range": "bytes=100-"})
        assert (r.status_code, r.content) == (206, data[100:])
        assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        r = c.get(url, headers={"Range": "bytes=-10"})
        assert (r.status_code, r.content) == (206, data[-10:])
        r = c.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
        r = c.get(url, headers={"Range": "bytes=10-19", "If-Range": '"v1"'})
        assert (r.status_code, r.content) == (206, data[10:20])
        r = c.get(url, headers={"Range": "bytes=10-19", "If-Range": '"v0"'})
        assert (r.status_code, r.content) == (200, data)
        lm = "Tue, 14 Nov 2023 22:13:20 GMT"
        assert c.get(url, headers={"Range": "bytes=1-1", "If-Range": lm}).status_code == 206
        assert c.get(url, headers={"If-None-Match": '"v1"'}).status_code == 304
        assert c.get(url, headers={"If-None-Match": '"v0"'}).status_code == 200
        assert c.get(url, headers={"If-Modified-Since": lm}).status_code == 304
        assert (
            c.get(url, headers={"If-Modified-Since": "Mon, 13 Nov 2023 00:00:00 GMT"}).status_code
            == 200
        )
        listing = c.get(fault_server.url + "d/").text
        assert 'href="%C3%A9%20x.bin"' in listing and "14-Nov-2023 22:13" in listing
        assert "d" in hrefs(c.get(fault_server.url).text)
        assert c.post(url).status_code == 405
    assert fault_server.connections == 1  # keep-alive
    assert fault_server.count(method="GET", path="/d/é x.bin") == 11
    assert fault_server.count(path="/d/é x.bin") == 13  # + HEAD + POST
    assert fault_server.requests[0].target == "/d/%C3%A9%20x.bin"
    assert fault_server.requests[0].headers["accept-encoding"]


def test_upstream_change(fault_server: FaultServer) -> None:
    fault_server.add_file("/f", b"one", etag=AUTO)
    url = fault_server.url + "f"
    first = httpx.get(url).headers["ETag"]
    fault_server.add_file("/f", b"two!")
    r = httpx.get(url, headers={"Range": "bytes=1-", "If-Range": first})
    assert (r.status_code, r.content) == (200, b"two!")
    fault_server.set_etag("/f", '"pinned"')
    fault_server.set_last_modified("/f", None)
    r = httpx.get(url)
    assert r.headers["ETag"] == '"pinned"' and "Last-Modified" not in r.headers
    fault_server.remove("/f")
    assert httpx.get(url).status_code == 404


def test_raw_listing_and_no_validators(fault_server: FaultServer) -> None:
    hostile = b'<a href="../../etc/passwd">x</a><a href="\xff\xfe">bad</a>'
    fault_server.add_listing("/evil/", hostile)
    fault_server.add_file("/plain", b"abc", etag=None, last_modified=None)
    assert httpx.get(fault_server.url + "evil/").content == hostile
    r = httpx.get(fault_server.url + "plain")
    assert "ETag" not in r.headers and "Last-Modified" not in r.headers
    assert "evil" in hrefs(httpx.get(fault_server.url).text)


# --- fault server: faults ------------------------------------------------------------


def stream(client: httpx.Client, url: str, **kw: object) -> tuple[bytes, Exception | None]:
    """Body bytes received until the end or an error, and that error."""
    got = bytearray()
    try:
        with client.stream("GET", url, **kw) as r:  # type: ignore[arg-type]
            for chunk in r.iter_raw():
                got += chunk
    except httpx.HTTPError as exc:
        return bytes(got), exc
    return bytes(got), None


def test_scripted_faults_in_order_then_normal(fault_server: FaultServer) -> None:
    data = os.urandom(5000)
    fault_server.add_file("/a/b.bin", data)
    fault_server.script(
        "/a/b.bin",
        [
            Fault.status(503, retry_after="1"),
            Fault.status(429, retry_after="0"),
            Fault.drop_after(1000),
            Fault.drop_after(10, reset=True),
            Fault.short_body(500),
            Fault.ok(),
        ],
    )
    url = fault_server.url + "a/b.bin"
    with httpx.Client() as c:
        r = c.get(url)
        assert (r.status_code, r.headers["Retry-After"]) == (503, "1")
        r = c.get(url)
        assert (r.status_code, r.headers["Retry-After"]) == (429, "0")
        body, exc = stream(c, url)
        assert body == data[:1000] and isinstance(exc, httpx.RemoteProtocolError)
        body, exc = stream(c, url)
        assert len(body) <= 10 and isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError)
        r = c.get(url)
        assert r.content == data[:500] and r.headers["Content-Length"] == "500"
        assert c.get(url).content == data
        assert fault_server.pending("/a/b.bin") == 0
        assert c.get(url).content == data
    assert [r.status for r in fault_server.requests] == [503, 429, 200, 200, 200, 200, 200]
    assert [r.bytes_sent for r in fault_server.requests][2:] == [1000, 10, 500, 5000, 5000]
    assert fault_server.file_bytes_sent == 1000 + 10 + 500 + 5000 + 5000


def test_range_faults(fault_server: FaultServer) -> None:
    data = os.urandom(1000)
    fault_server.add_file("/r", data)
    fault_server.script("/r", [Fault.ignore_range(), Fault.wrong_content_range()])
    rng = {"Range": "bytes=100-199"}
    url = fault_server.url + "r"
    r = httpx.get(url, headers=rng)
    assert (r.status_code, r.content) == (200, data)
    r = httpx.get(url, headers=rng)
    assert r.status_code == 206 and r.headers["Content-Range"] == "bytes 101-200/1000"
    assert r.content == data[100:200]
    fault_server.persist("/r", Fault.ignore_range())
    for _ in range(2):
        assert httpx.get(url, headers=rng).status_code == 200
    fault_server.persist("/r", None)
    assert httpx.get(url, headers=rng).status_code == 206
    stale = {**rng, "If-Range": '"not-this-version"'}
    assert httpx.get(url, headers=stale).status_code == 200
    fault_server.script("/r", [Fault.ignore_if_range()])
    r = httpx.get(url, headers=stale)
    assert (r.status_code, r.content) == (206, data[100:200])
    assert httpx.get(url, headers=stale).status_code == 200


def test_encoding_faults(fault_server: FaultServer) -> None:
    data = b"compressible " * 1000
    fault_server.add_file("/g", data)
    fault_server.script("/g", [Fault.gzip(), Fault.chunked(), Fault.header("Content-Length", None)])
    url = fault_server.url + "g"
    with httpx.Client() as c:
        with c.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
            raw = b"".join(r.iter_raw())
            assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(raw) == data and len(raw) < len(data)
        r = c.get(url)
        assert r.headers["Transfer-Encoding"] == "chunked" and r.content == data
        r = c.get(url)  # no length: the body ends when the connection closes
        assert "Content-Length" not in r.headers and r.content == data
        assert r.headers["Connection"] == "close"


def test_redirects_and_loop(fault_server: FaultServer) -> None:
    fault_server.add_file("/target", b"here")
    fault_server.script("/moved", [Fault.redirect("/target", 301)])
    fault_server.script("/abs", [Fault.redirect(fault_server.url + "target", 307)])
    fault_server.persist("/loop/*", Fault.redirect("/loop/again"))
    with httpx.Client(follow_redirects=True, max_redirects=5) as c:
        assert c.get(fault_server.url + "moved").content == b"here"
        assert c.get(fault_server.url + "abs").content == b"here"
        with pytest.raises(httpx.TooManyRedirects):
            c.get(fault_server.url + "loop/start")
    assert fault_server.count(path="/loop/again") == 5


def test_method_filter_and_prefix_rules(fault_server: FaultServer) -> None:
    fault_server.add_file("/p/x", b"x")
    fault_server.script("/p/*", [Fault.status(500)], method="GET")
    assert httpx.head(fault_server.url + "p/x").status_code == 200
    assert fault_server.pending() == 1
    assert httpx.get(fault_server.url + "p/x").status_code == 500
    assert httpx.get(fault_server.url + "p/x").status_code == 200


def test_combined_faults(fault_server: FaultServer) -> None:
    data = os.urandom(300)
    fault_server.add_file("/c", data)
    fault_server.script("/c", [Fault.ignore_range() | Fault.drop_after(50)])
    with httpx.Client() as c:
        body, exc = stream(c, fault_server.url + "c", headers={"Range": "bytes=100-"})
    assert body == data[:50] and exc is not None
    assert fault_server.requests[0].status == 200


def test_hang_trickle_delay_end_at_shutdown() -> None:
    srv = FaultServer()
    srv.start()
    try:
        srv.add_file("/slow", b"s" * 1000)
        srv.add_file("/stuck", b"t" * 1000)
        srv.script("/slow", [Fault.trickle(bytes_per_sec=1)])
        srv.persist("/stuck", Fault.hang())
        srv.script("/half", [Fault.hang(after_bytes=10)])
        srv.add_file("/half", b"h" * 100)
        results: dict[str, object] = {}

        def fetch(name: str) -> None:
            with httpx.Client(timeout=httpx.Timeout(30)) as c:
                results[name] = stream(c, srv.url + name)

        threads = [threading.Thread(target=fetch, args=(n,)) for n in ("slow", "stuck", "half")]
        for t in threads:
            t.start()
        assert srv.wait_for(3)
        with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
            c.get(srv.url + "stuck")
        deadline = time.monotonic() + 5
        while srv.bytes_sent < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.max_concurrent_requests >= 3
    finally:
        started = time.monotonic()
        srv.close()
        assert time.monotonic() - started < 3
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    for name in ("slow", "stuck", "half"):
        _, exc = results[name]  # type: ignore[misc]
        assert exc is not None, name
    assert results["half"][0] == b"h" * 10  # type: ignore[index]
    assert len(results["slow"][0]) < 10  # type: ignore[index,arg-type]
    assert not srv.errors


def test_trickle_delivers_everything_slowly(fault_server: FaultServer) -> None:
    fault_server.add_file("/t", b"z" * 200)
    fault_server.script("/t", [Fault.trickle(2000)])
    started = time.monotonic()
    assert httpx.get(fault_server.url + "t").content == b"z" * 200
    assert time.monotonic() - started >= 0.08


def test_reset_and_delay(fault_server: FaultServer) -> None:
    fault_server.add_file("/x", b"x")
    fault_server.script("/x", [Fault.reset(), Fault.delay(0.2)])
    with pytest.raises(httpx.TransportError):
        httpx.get(fault_server.url + "x")
    started = time.monotonic()
    assert httpx.get(fault_server.url + "x").content == b"x"
    assert time.monotonic() - started >= 0.2
    assert [r.status for r in fault_server.requests] == [None, 200]


def test_concurrency_counters(fault_server: FaultServer) -> None:
    fault_server.add_file("/w", b"w")
    gate = threading.Event()
    fault_server.persist("/w", Fault.gated(gate))
    clients = [httpx.Client() for _ in range(4)]
    threads = [threading.Thread(target=c.get, args=(fault_server.url + "w",)) for c in clients]
    try:
        for t in threads:
            t.start()
        assert fault_server.wait_for(4, path="/w")
        assert fault_server.max_concurrent_connections == 4
        assert fault_server.max_concurrent_requests == 4
        assert all(r.status is None for r in fault_server.requests)
    finally:
        gate.set()
        for t in threads:
            t.join(10)
        for c in clients:
            c.close()
    assert [r.status for r in fault_server.requests] == [200] * 4
    assert fault_server.bytes_sent == 4
    fault_server.reset_stats()
    assert fault_server.requests == [] and fault_server.bytes_sent == 0


def test_generated_tree() -> None:
    with FaultServer() as srv, httpx.Client() as c:
        tree = srv.add_generated_tree("/gen/", dirs=2000, files_per_dir=100)
        assert tree.count == 200_000
        assert "gen" in hrefs(c.get(srv.url).text)
        top = hrefs(c.get(srv.url + "gen/").text)
        assert len(top) == 2000 and top["d1999"] == "d1999/"
        page = c.get(srv.url + "gen/d0042/").text
        files = hrefs(page)
        assert len(files) == 100 and page == c.get(srv.url + "gen/d0042/").text
        path = "/gen/d0042/f007.bin"
        body = c.get(srv.url + path[1:]).content
        assert body == tree.content(path) == generated_body(path, tree.size(path))
        assert re.search(rf"f007.bin</a> .* {tree.size(path)}\r?$", page, re.M)
        assert 1 <= len(body) <= 4096
        r = c.get(srv.url + path[1:], headers={"Range": "bytes=33-"})
        assert r.status_code == 206 and r.content == body[33:]
        assert c.get(srv.url + "gen/d2000/").status_code == 404
        assert c.get(srv.url + "gen/d0001/f100.bin").status_code == 404
        assert c.get(srv.url + "gen/d0001").status_code == 301
    assert generated_body("/x", 10, 30) == generated_body("/x", 40)[30:]


def test_tls(tls: object) -> None:
    with FaultServer(tls=tls.server) as srv:  # type: ignore[attr-defined]
        srv.add_file("/s", b"secret")
        assert srv.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=tls.client) as c:  # type: ignore[attr-defined]
            assert c.get(srv.url + "s").content == b"secret"
            assert c.get(srv.url + "s").content == b"secret"
        assert srv.connections == 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "s")  # untrusted CA
    assert not srv.errors


@pytest.mark.real_server
def test_nginx_limit_rate_is_configured_and_served(tmp_path: Path) -> None:
    """``serve(..., limit_rate=)`` (benchmarks' --server-limit-rate) gives nginx a per-connection cap."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.bin").write_bytes(b"a" * 5000)
    with serve("nginx", root, tmp_path / "work", limit_rate="2m") as srv:
        conf = (srv.workdir / "nginx.conf").read_text()
        assert "limit_rate 2m;" in conf
        assert httpx.get(srv.url + "a.bin", timeout=10).content == b"a" * 5000


@pytest.mark.parametrize("bad", ["fast", "2 m", "2m; evil"])
def test_limit_rate_rejects_values_nginx_would_misread(tmp_path: Path, bad: str) -> None:
    (tmp_path / "www").mkdir()
    with (
        pytest.raises(ValueError, match="limit_rate"),
        serve("nginx", tmp_path / "www", tmp_path / "work", limit_rate=bad),
    ):
        pass


def test_limit_rate_is_nginx_only(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    with (
        pytest.raises(ValueError, match="nginx options"),
        serve("apache", tmp_path / "www", tmp_path / "work", limit_rate="2m"),
    ):
        pass


def test_benchmarks_proxy_delays_each_way_and_passes_bytes_in_order(tmp_path: Path) -> None:
    """benchmarks/proxy.py (the suite's round trip): a request and its answer each wait
    the delay, and the bytes arrive whole and in order, again on the kept-alive connection."""
    from benchmarks.run import proxied

    root = tmp_path / "www"
    root.mkdir()
    body = bytes(range(256)) * 4096  # 1 MiB, every offset's byte known
    (root / "big.bin").write_bytes(body)
    delay_ms = 40
    with serve("nginx", root, tmp_path / "work") as srv, proxied(srv.port, delay_ms) as port:
        url = f"http://127.0.0.1:{port}/big.bin"
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                started = time.monotonic()
                assert client.get(url).content == body
                assert time.monotonic() - started >= 2 * delay_ms / 1000  # there and back
        assert [r.path for r in srv.requests(min_count=3)] == ["/big.bin"] * 3


def test_benchmarks_layers_fetch_every_file_each_way(tmp_path: Path) -> None:
    """benchmarks/layers.py (a small file's CPU, layer by layer): each layer fetches the
    whole tree from nginx, checked against its manifest, and the report has a row each."""
    from benchmarks.layers import LAYERS, measure, report
    from benchmarks.trees import build_tree

    tree = build_tree("small", tmp_path, scale=0.02)  # 100 files of 1-64 KiB
    dest = tmp_path / "dest"
    with serve("nginx", tree.root, tmp_path / "work") as srv:
        results = measure(srv.url, tree, dest, runs=1, layers=list(LAYERS))
        passes = len(LAYERS) + 1  # and the untimed first
        logged = srv.requests(min_count=passes * len(tree.files))
    assert list(results) == list(LAYERS)
    assert all(len(runs) == 1 and runs[0][1] > 0 for runs in results.values())
    assert len(logged) == passes * len(tree.files)  # every file once a pass, no more
    assert not dest.exists()
    rows = report(results, len(tree.files)).splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == [f"| {name}" for name in LAYERS]
