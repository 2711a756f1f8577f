import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.errors import HTTPStatusError, IncompleteDownload
from fetcher.models import Action, Job, Outcome, RelPath, RemoteFile, Status
from fetcher.retry import build_retrying, retry_after_seconds
from fetcher.transport import make_transport
from tests.faultserver import Fault, FaultServer

T = Transfer(
    dest="/tmp/x",
    root="http://127.0.0.1/",
    retries=5,
    backoff_initial=0.5,
    backoff_max=8,
    retry_after_cap=60,
)


def run(
    fail_with: list[BaseException], t: Transfer = T
) -> tuple[list[float], int, BaseException | None]:
    sleeps: list[float] = []
    calls = 0
    errors = iter(fail_with)

    def op() -> str:
        nonlocal calls
        calls += 1
        err = next(errors, None)
        if err is not None:
            raise err
        return "ok"

    try:
        for attempt in build_retrying(t, sleep=sleeps.append):
            with attempt:
                op()
    except Exception as exc:
        return sleeps, calls, exc
    return sleeps, calls, None


def test_transient_errors_retried_with_backoff() -> None:
    sleeps, calls, err = run(
        [httpx.ConnectError("x"), httpx.ReadTimeout("x"), IncompleteDownload("short")]
    )
    assert err is None and calls == 4
    assert len(sleeps) == 3 and all(0 < s <= 8 for s in sleeps)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    _, calls, err = run([HTTPStatusError(status, "u")])
    assert err is None and calls == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
def test_other_4xx_not_retried(status: int) -> None:
    sleeps, calls, err = run([HTTPStatusError(status, "u")])
    assert calls == 1 and sleeps == [] and isinstance(err, HTTPStatusError)


def test_gives_up_after_attempts() -> None:
    sleeps, calls, err = run([HTTPStatusError(503, "u")] * 10)
    assert calls == 5 and len(sleeps) == 4 and isinstance(err, HTTPStatusError)


def test_retry_after_honoured_and_capped() -> None:
    sleeps, _, _ = run([HTTPStatusError(429, "u", 7.0), HTTPStatusError(503, "u", 3600.0)])
    assert sleeps == [7.0, 60.0]


def test_programming_errors_not_retried() -> None:
    _, calls, err = run([ValueError("bug")])
    assert calls == 1 and isinstance(err, ValueError)


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == 60
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_policy_pickles() -> None:
    r = build_retrying(T)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.stop.max_attempt_number == 5  # type: ignore[attr-defined]


# -- fetch_file against a real server: the first attempt runs outside the policy and a
# failure is replayed to it, so attempts and retries must come out as the policy says.


def _fetch_one(tmp_path: Path, srv: FaultServer, retries: int) -> tuple[Outcome, list[int]]:
    t = Transfer(dest=str(tmp_path / "d"), root=srv.url, retries=retries,
                 backoff_initial=0.0, backoff_max=0.0)  # fmt: skip
    f = RemoteFile(srv.url + "f.bin", RelPath("f.bin"), 5000, True)
    retried: list[int] = []
    with make_transport(t) as transport:
        out = fetch_file(
            transport,
            Job(f, Action.NEW),
            t,
            retrying=build_retrying(t, sleep=lambda s: None),
            on_retry=lambda attempt, reason: retried.append(attempt),
        )
    return out, retried


@pytest.fixture
def fault_server(tmp_path: Path) -> Iterator[FaultServer]:
    www = tmp_path / "www"
    www.mkdir()
    (www / "f.bin").write_bytes(os.urandom(5000))
    with FaultServer(root=www) as srv:
        yield srv


def test_fetch_file_retries_transient_failures_then_succeeds(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    fault_server.script("/f.bin", [Fault.status(503), Fault.status(500)])
    out, retried = _fetch_one(tmp_path, fault_server, retries=5)
    assert out.status is Status.FETCHED, out
    assert retried == [1, 2]
    assert fault_server.count("GET", "/f.bin") == 3
    assert (tmp_path / "d" / "f.bin").read_bytes() == (tmp_path / "www" / "f.bin").read_bytes()


def test_fetch_file_gives_up_after_the_policy_s_attempts(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    fault_server.persist("/f.bin", Fault.status(503))
    out, retried = _fetch_one(tmp_path, fault_server, retries=3)
    assert out.status is Status.FAILED and out.attempts == 3, out
    assert retried == [1, 2]
    assert fault_server.count("GET", "/f.bin") == 3
    assert not (tmp_path / "d" / "f.bin").exists()


def test_fetch_file_does_not_retry_a_permanent_failure(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    fault_server.persist("/f.bin", Fault.status(404))
    out, retried = _fetch_one(tmp_path, fault_server, retries=5)
    assert out.status is Status.FAILED and out.attempts == 1 and "404" in (out.error or ""), out
    assert retried == []
    assert fault_server.count("GET", "/f.bin") == 1


def test_the_policy_loads_without_tornado_which_stays_importable() -> None:
    """tenacity would import tornado (30 ms a process) when it is installed; fetch's
    policy never needs it, and hiding it must not stop Dask from importing it after."""
    pytest.importorskip("tornado")
    code = (
        "import sys, fetcher.download, fetcher.retry, tenacity\n"
        "assert 'tornado' not in sys.modules, 'tornado imported'\n"
        "import tornado.gen\n"
        "print('ok', tenacity.Retrying.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok Retrying", done.stderr
