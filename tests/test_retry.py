import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.errors import HTTPStatusError, IncompleteDownload
from fetcher.models import Action, Job, Outcome, RelPath, RemoteFile, Status
from fetcher.retry import RetryPolicy, build_retrying, retry_after_seconds, with_retries
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
    fail_with: list[BaseException], t: Transfer = T, bare: bool = False
) -> tuple[list[float], int, BaseException | None]:
    """Calls of an operation that fails with ``fail_with`` in turn, under the policy (with
    ``bare``, through :func:`with_retries`): the sleeps, the calls and what was raised."""
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

    policy = build_retrying(t, sleep=sleeps.append)
    try:
        if bare:
            assert with_retries(policy, op) == "ok"
        else:
            for attempt in policy:
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


# -- with_retries: the first call bare, a failure replayed to the policy as attempt 1,
# so every case above must come out the same through it


@pytest.mark.parametrize(
    "fail_with",
    [
        [],
        [httpx.ConnectError("x"), httpx.ReadTimeout("x"), IncompleteDownload("short")],
        [HTTPStatusError(503, "u")],
        [HTTPStatusError(404, "u")],
        [HTTPStatusError(503, "u")] * 10,
        [HTTPStatusError(429, "u", 7.0), HTTPStatusError(503, "u", 3600.0)],
        [ValueError("bug")],
    ],
    ids=["ok", "transient", "503", "404", "gives-up", "retry-after", "bug"],
)
def test_with_retries_decides_as_the_policy(fail_with: list[BaseException]) -> None:
    sleeps, calls, err = run(fail_with, bare=True)
    want_sleeps, want_calls, want_err = run(fail_with)
    assert (calls, err) == (want_calls, want_err)
    if fail_with and isinstance(fail_with[0], HTTPStatusError) and fail_with[0].retry_after:
        assert sleeps == want_sleeps  # Retry-After, not the jittered backoff
    else:
        assert len(sleeps) == len(want_sleeps)


def test_with_retries_copies_no_policy_for_a_first_success() -> None:
    copies: list[dict[str, object]] = []

    class Counted(RetryPolicy):
        def copy(self, **changes: object) -> Any:
            copies.append(changes)
            return super().copy(**changes)

    policy = Counted(T, sleep=lambda s: None)
    assert with_retries(policy, lambda: 1) == 1
    assert copies == []
    calls = iter([httpx.ConnectError("x")])

    def once() -> int:
        err = next(calls, None)
        if err is not None:
            raise err
        return 2

    assert with_retries(policy, once) == 2 and len(copies) == 1


_A_POLICY = (
    "import sys, httpx\n"
    "from fetcher.config import Transfer\n"
    "from fetcher.retry import build_retrying, with_retries\n"
    "policy = build_retrying(Transfer(dest='/tmp/x', root='http://h/'), sleep=lambda s: None)\n"
)


def _python(code: str) -> tuple[int, str, str]:
    """``code`` run by a fresh interpreter: its exit code, stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-c", _A_POLICY + code],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_tenacity_loads_with_the_first_retry() -> None:
    """A process in which nothing fails never imports tenacity (~4 ms of start-up)."""
    code, out, err = _python(
        "assert with_retries(policy, lambda: 1) == 1\n"
        "print('tenacity' in sys.modules)\n"
        "errors = iter([httpx.ConnectError('x')])\n"
        "def op():\n"
        "    for e in errors:\n"
        "        raise e\n"
        "    return 2\n"
        "assert with_retries(policy, op) == 2\n"
        "print('tenacity' in sys.modules)\n"
    )
    assert code == 0 and out.split() == ["False", "True"], (out, err)


def test_with_retries_before_ends_the_attempts_unjudged() -> None:
    """What ``before`` raises (the crawl is over) is raised at once, even when the policy
    would retry it, and no attempt is made after it."""
    calls, befores = 0, 0

    def op() -> None:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("x")

    def before() -> None:
        nonlocal befores
        befores += 1
        if befores == 2:
            raise IncompleteDownload("over")  # retryable, were the policy to judge it

    sleeps: list[float] = []
    with pytest.raises(IncompleteDownload, match="over"):
        with_retries(build_retrying(T, sleep=sleeps.append), op, before)
    assert (calls, befores, len(sleeps)) == (1, 2, 1)


def test_policy_pickles() -> None:
    r = build_retrying(T)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.copy().stop.max_attempt_number == 5  # type: ignore[attr-defined]


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
    code, out, err = _python(
        "retrying = policy.copy()\n"
        "assert 'tornado' not in sys.modules, 'tornado imported'\n"
        "import tornado.gen\n"
        "print('ok', type(retrying).__name__)\n"
    )
    assert code == 0 and out.strip() == "ok Retrying", err
