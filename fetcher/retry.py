"""The one retry policy, as a value: which failures are worth another attempt, and how long to wait.

Transient failures only (connect and read errors, timeouts, incomplete bodies,
408, 425, 429 and 5xx; never other 4xx, never a certificate that does not
verify), exponential backoff with jitter, and at least what ``Retry-After``
asks (capped).  Sleep is injectable, so tests run without waiting::

    sleeps = []
    for attempt in build_retrying(transfer, sleep=sleeps.append):
        with attempt:
            ...
"""

from __future__ import annotations

import ssl
import sys
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from fetcher.config import Transfer
from fetcher.errors import HTTPStatusError, TransferError

if TYPE_CHECKING:
    import tenacity


def _import_tenacity() -> Any:
    # tenacity imports tornado whenever it is installed (the dask extra brings it), to
    # retry tornado coroutines, which fetch has none of: 30 ms in every process that
    # imports it. A None in sys.modules makes that one import fail as if tornado were
    # absent; the entry goes at once, so Dask (or anyone) imports tornado as usual.
    if "tenacity" not in sys.modules and "tornado" not in sys.modules:
        sys.modules["tornado"] = None  # type: ignore[assignment]
        try:
            import tenacity
        finally:
            del sys.modules["tornado"]
    import tenacity

    return tenacity


__all__ = [
    "RetryPolicy",
    "build_retrying",
    "not_tls",
    "retry_after_seconds",
    "untrusted_certificate",
    "with_retries",
]

_T = TypeVar("_T")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def untrusted_certificate(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind ``exc`` (httpx wraps it), if that is what it is."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def not_tls(exc: BaseException) -> bool:
    """Whether ``exc`` is a TLS handshake answered by something that is not TLS (OpenSSL's
    "wrong version number": most often plain HTTP on that port, an https:// URL for an
    http:// server)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError) and cur.reason == "WRONG_VERSION_NUMBER":
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        # a certificate that does not verify will not verify on the next attempt either,
        # nor will a server that does not speak TLS start to
        return (
            not isinstance(exc, httpx.UnsupportedProtocol)
            and untrusted_certificate(exc) is None
            and not not_tls(exc)
        )
    if isinstance(exc, TransferError):
        return bool(exc.retryable)
    return False


class _WaitRetryAfter:
    """Exponential backoff with jitter, but at least what ``Retry-After`` asked (capped)."""

    def __init__(self, t: Transfer) -> None:
        tenacity = _import_tenacity()
        self._backoff = tenacity.wait_exponential(
            multiplier=t.backoff_initial, max=t.backoff_max
        ) + tenacity.wait_random(0, t.backoff_initial)
        self._cap = t.retry_after_cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = float(self._backoff(retry_state))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, HTTPStatusError) and exc.retry_after is not None:
            return min(self._cap, max(exc.retry_after, 0.0))
        return wait


class RetryPolicy:
    """The one retry policy: transient errors only, backoff with jitter, ``Retry-After``.

    A value (it pickles to a worker); :meth:`copy` gives a fresh ``tenacity.Retrying``
    to run attempts under. tenacity itself (~4 ms to import) loads with the first copy:
    the first attempt of a file or a listing runs bare (:func:`with_retries`,
    :func:`~fetcher.download.fetch_file`), so a run in which nothing fails never needs it.
    """

    __slots__ = ("_before_sleep", "_built", "_sleep", "_t")

    def __init__(
        self,
        t: Transfer,
        sleep: Callable[[float], Any] = time.sleep,
        before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
    ) -> None:
        self._t = t
        self._sleep = sleep
        self._before_sleep = before_sleep
        self._built: tenacity.Retrying | None = None

    def retrying(self) -> tenacity.Retrying:
        """The policy as tenacity runs it (built once; two threads may both build it)."""
        built = self._built
        if built is None:
            tenacity = _import_tenacity()
            t = self._t
            built = self._built = tenacity.Retrying(
                stop=tenacity.stop_after_attempt(t.retries),
                wait=_WaitRetryAfter(t),
                retry=tenacity.retry_if_exception(_is_transient),
                reraise=True,
                sleep=self._sleep,
                before_sleep=self._before_sleep,
            )
        return built

    def copy(self, **changes: Any) -> tenacity.Retrying:
        """A fresh ``tenacity.Retrying`` of this policy (``changes`` as its ``copy`` takes)."""
        return self.retrying().copy(**changes)

    def __iter__(self) -> Iterator[tenacity.AttemptManager]:
        return iter(self.retrying())

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._t, self._sleep, self._before_sleep)  # not what is built from them

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._t, self._sleep, self._before_sleep = state
        self._built = None


def build_retrying(
    t: Transfer,
    sleep: Callable[[float], Any] = time.sleep,
    before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
) -> RetryPolicy:
    """The one retry policy (:class:`RetryPolicy`) for ``t``."""
    return RetryPolicy(t, sleep, before_sleep)


def _counted_from(sleep: Callable[[float], Any], at: float) -> Callable[[float], Any]:
    """``sleep``, its first wait counted from ``at`` (``time.monotonic()``), not from now."""
    first = True

    def wait(seconds: float) -> None:
        nonlocal first
        if first:
            first = False
            seconds -= time.monotonic() - at
        if seconds > 0:
            sleep(seconds)

    return wait


def with_retries(
    retrying: RetryPolicy,
    attempt: Callable[[], _T],
    before: Callable[[], object] = lambda: None,
    *,
    failed: Exception | None = None,
    failed_at: float | None = None,
    **changes: Any,
) -> _T:
    """``attempt()`` under ``retrying``'s policy, its first call bare.

    Most calls need no second attempt, and the policy's bookkeeping (a copy of it, its
    iterator, the attempt's context) costs ~25 µs, as much as reading a small listing.
    A first failure is replayed to the policy as attempt 1, so what it decides (retry
    or not, how long to wait) is what it would have decided. ``before`` runs before
    every attempt (what it raises ends them, unjudged). ``failed``: the first attempt
    was made elsewhere, and raised this; ``failed_at``: when (``time.monotonic()``),
    from which the wait after it counts. ``changes`` go to the policy's copy (e.g.
    ``before_sleep``).
    """
    first = failed
    if failed_at is not None:
        changes["sleep"] = _counted_from(retrying._sleep, failed_at)
    if first is None:
        before()
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - judged by the policy just below
            first = exc
    for each in retrying.copy(**changes):
        if first is None:
            before()  # (outside the attempt: what it raises is not the policy's to judge)
        with each:
            if first is not None:
                replay, first = first, None
                raise replay
            return attempt()
    raise AssertionError("unreachable")  # pragma: no cover - the policy re-raises
