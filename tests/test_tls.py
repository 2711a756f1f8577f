"""TLS: certificates are verified by default; ``--ca-cert`` and ``--insecure`` are explicit.

The mirror is the fault server with a trustme certificate: signed by a CA that
no system trust store knows, so to a default client it is self-signed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fetcher.http1 import REUSE_BUFFER, ThreadConnTransport
from tests.faultserver import Fault, FaultServer
from tests.fixtures_servers import TLS
from tests.servers import serve

START = "/pub/start/"


def _mirror(tls: TLS) -> FaultServer:
    srv = FaultServer(tls=tls.server)
    srv.add_file(START + "a.txt", b"over tls")
    srv.add_file(START + "sub/b.bin", b"\0" * 5000)
    return srv


def _check_tree(dest: Path) -> None:
    assert (dest / "a.txt").read_bytes() == b"over tls"
    assert (dest / "sub" / "b.bin").read_bytes() == b"\0" * 5000


def test_untrusted_certificate_fails_clearly(tls: TLS, tmp_path: Path, run_fetch) -> None:
    with _mirror(tls) as srv:
        t0 = time.monotonic()
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1")
        elapsed = time.monotonic() - t0
        assert srv.requests == [], "a request went over an unverified connection"
        # a refused certificate is not a transient error: one handshake, no backoff
        assert srv.connections == 1, srv.connections
        assert not srv.errors
    assert r.code in (1, 2), r
    assert "Traceback" not in r.output, r
    assert elapsed < 10, elapsed
    lines = [line for line in r.output.splitlines() if "not trusted" in line]
    assert lines, r
    # one line says what happened and what to do
    assert all("--ca-cert" in line and "--insecure" in line for line in lines), lines
    assert any("certificate" in line.lower() for line in lines), lines
    assert not (tmp_path / "d" / "a.txt").exists()


# The crawl thread dies in these two; pytest would also report that as a thread warning.
_THREAD_DIES = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@_THREAD_DIES
def test_ca_cert_makes_it_work(tls: TLS, tmp_path: Path, run_fetch) -> None:
    dest = tmp_path / "d"
    with _mirror(tls) as srv:
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--ca-cert", tls.ca_pem
        )
        assert not srv.errors
    assert r.code == 0, r
    _check_tree(dest)


def test_insecure_makes_it_work(tls: TLS, tmp_path: Path, run_fetch) -> None:
    dest = tmp_path / "d"
    with _mirror(tls) as srv:
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--insecure")
        assert not srv.errors
    assert r.code == 0, r
    _check_tree(dest)


@_THREAD_DIES
def test_missing_ca_file_is_a_clear_error(tls: TLS, tmp_path: Path, run_fetch) -> None:
    with _mirror(tls) as srv:
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1",
            "--ca-cert", tmp_path / "no-such-ca.pem",
        )  # fmt: skip
        assert srv.requests == []
    assert r.code in (1, 2), r
    assert "Traceback" not in r.output, r
    assert "no-such-ca.pem" in r.output, r


def test_an_alias_never_takes_an_https_mirror_to_plain_http(
    tls: TLS, tmp_path: Path, run_fetch
) -> None:
    """A redirect to http:// on an --alias host (even the mirror's own host) is refused:
    the body would come unverified, and the run's Basic credentials went with it in clear."""
    from tests.faultserver import Fault

    with _mirror(tls) as srv, FaultServer() as plain:
        plain.add_file(START + "a.txt", b"over plain http")
        srv.persist(START + "a.txt", Fault.redirect(f"http://127.0.0.1:{plain.port}{START}a.txt"))
        url = srv.url.replace("https://", "https://fred:s3cret@") + START[1:]
        for alias in (f"127.0.0.1:{plain.port}", "127.0.0.1"):
            r = run_fetch("--mirror", url, "--dest", tmp_path / "d", "--procs", "1",
                          "--ca-cert", tls.ca_pem, "--alias", alias)  # fmt: skip
            assert r.code == 1 and "redirect off the mirror refused" in r.output, r.output
        assert plain.requests == []  # nothing asked over http, so no password sent in clear
    assert not (tmp_path / "d" / "a.txt").exists()
    assert (tmp_path / "d" / "sub" / "b.bin").read_bytes() == b"\0" * 5000


@pytest.mark.parametrize(
    "content", [b"", b"garbage\n", b"\x30\x82\x01\x0a"], ids=["empty", "text", "der"]
)
def test_a_ca_file_that_is_no_pem_bundle_is_refused_before_anything_starts(
    tmp_path: Path, run_fetch, content: bytes
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    r = run_fetch("--mirror", "https://127.0.0.1:9/", "--dest", tmp_path / "d", "--ca-cert", ca)
    assert r.code == 2, r
    assert f"fetch: error: --ca-cert: {ca}: not a PEM CA bundle" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "d").exists()
    cfg = tmp_path / "m.toml"
    cfg.write_text("[jobs.a]\nurl = 'https://127.0.0.1:9/'\nca_cert = 'ca.pem'\n")
    r = run_fetch("--config", cfg, "--check")
    assert r.code == 2 and f"m.toml: jobs.a.ca_cert: {ca}: not a PEM CA bundle" in r.output, r


def test_a_certificate_for_another_name_says_so_not_to_add_a_ca(
    tls: TLS, tmp_path: Path, run_fetch
) -> None:
    """Signed by the CA given with --ca-cert, but for another host: the hint said to give
    --ca-cert, which the run already had."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.example").configure_cert(server)
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    with FaultServer(tls=server) as srv:
        srv.add_file(START + "a.txt", b"x")
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1",
                      "--ca-cert", pem)  # fmt: skip
        assert srv.requests == []
    assert r.code == 1 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if "not trusted" in ln]
    assert lines, r.output
    for line in lines:  # (the listing error, and again in the summary)
        assert "mismatch" in line and "the host name its certificate names" in line, line
        assert "--ca-cert" not in line, line


def test_an_https_url_for_a_plain_http_server_says_so_once(tmp_path: Path, run_fetch) -> None:
    """It said "ConnectError: TLS with HOST:PORT failed: [SSL: WRONG_VERSION_NUMBER] wrong
    version number", after retrying that five times with backoff."""
    with FaultServer() as srv:
        srv.add_file("/pub/a.txt", b"a")
        url = srv.url.replace("http://", "https://") + "pub/"
        r = run_fetch("--mirror", url, "--dest", tmp_path / "d")
        connections = srv.connections
    assert r.code == 1, r
    assert f"does not answer in TLS (plain HTTP there?): use {srv.url}pub/" in r.output, r
    assert connections == 1, connections


# --- bodies over TLS ------------------------------------------------------------------


def test_a_big_body_over_tls_comes_in_pieces_of_many_records(tls: TLS) -> None:
    # One read of a TLS socket gives one record (at most 16 KiB): handed on one by
    # one, a GiB was 65,536 writes into the file and as many turns of the caller's loop.
    data = random.Random(7).randbytes(3 << 20)
    transport = ThreadConnTransport(ssl_context=lambda: tls.client, timeout=httpx.Timeout(5))
    try:
        with FaultServer(tls=tls.server) as srv:
            srv.add_file("/big.bin", data)
            request = httpx.Request("GET", srv.url + "big.bin", extensions={REUSE_BUFFER: True})
            resp = transport.handle_request(request)
            try:
                pieces = [bytes(piece) for piece in resp.stream]
            finally:
                resp.close()
            assert not srv.errors
    finally:
        transport.close()
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) > 16 * 1024, [len(p) for p in pieces][:20]


def test_a_tls_body_cut_short_resumes_from_its_last_byte(
    tls: TLS, tmp_path: Path, run_fetch
) -> None:
    # The records gathered into a piece before the connection dropped are written
    # too: the retry asks for the rest from the byte where the body stopped.
    data = random.Random(8).randbytes(3 << 20)
    cut = (2 << 20) + 5_000
    dest = tmp_path / "d"
    with FaultServer(tls=tls.server) as srv:
        srv.add_file(START + "big.bin", data)
        srv.script(START + "big.bin", [Fault.drop_after(cut)])
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--ca-cert", tls.ca_pem
        )
        asked = [q.headers.get("range") for q in srv.requests if q.path == START + "big.bin"]
    assert r.code == 0, r
    assert (dest / "big.bin").read_bytes() == data
    assert asked == [None, f"bytes={cut}-"], asked


@pytest.mark.real_server
def test_fetch_mirrors_nginx_over_tls(tmp_path: Path, run_fetch) -> None:
    # Real nginx speaking HTTPS (as most public mirrors do): listings and bodies over
    # TLS, a big file among small ones, and a re-sync that finds it all unchanged.
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    pem, ca_pem = tmp_path / "server.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    root = tmp_path / "www"
    files = {
        "pool/big.iso": random.Random(9).randbytes((3 << 20) + 12_345),
        **{f"pool/s/{i:02d}.deb": random.Random(i).randbytes(100 + 997 * i) for i in range(20)},
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    dest = tmp_path / "d"
    with serve("nginx", root, tmp_path / "work", tls=pem) as srv:
        assert srv.url.startswith("https://")
        argv = ("--mirror", srv.url, "--dest", dest, "--ca-cert", ca_pem, "--max-connections", "4")
        first = run_fetch(*argv)
        again = run_fetch(*argv, "--report", tmp_path / "again.json")
        big = [q for q in srv.requests(min_count=len(files)) if q.path.endswith("big.iso")]
    assert first.code == 0, first
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data, rel
    assert again.code == 0, again
    # the re-sync moved none of its bytes again (a file younger than the listing's
    # minute is asked about, and the answer is 304)
    assert sum(q.bytes_sent or 0 for q in big) == len(files["pool/big.iso"]), big


_COUNT_TLS_CONTEXTS = """
import os, sys
import httpx
real = httpx.create_ssl_context

def counted(*a, **k):
    with open(os.environ["FETCH_TEST_COUNT"], "a") as out:
        out.write(f"{os.getpid()}\\n")
    return real(*a, **k)

httpx.create_ssl_context = counted
from fetcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_one_tls_context_is_made_for_the_whole_run(tls: TLS, tmp_path: Path) -> None:
    # Loading a CA store costs 20-40 ms of CPU; the crawl and every worker process each
    # loaded it on their first https connection. Made before the workers fork, it is theirs.
    count = tmp_path / "contexts"
    dest = tmp_path / "d"
    with FaultServer(tls=tls.server) as srv:
        for i in range(12):
            srv.add_file(f"{START}f{i:02d}.bin", random.Random(i).randbytes(200_000))
        argv = [sys.executable, "-c", _COUNT_TLS_CONTEXTS, "--mirror", srv.url + START[1:],
                "--dest", str(dest), "--ca-cert", str(tls.ca_pem), "--procs", "2", "-q"]  # fmt: skip
        done = subprocess.run(
            argv, env={**os.environ, "FETCH_TEST_COUNT": str(count)}, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert not srv.errors
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list(dest.glob("f*.bin"))) == 12
    made = count.read_text().split()
    assert len(made) == 1, made
