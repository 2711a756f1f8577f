"""Walk a mirror's directory listings breadth-first, several directories at once.

``crawl()`` yields :class:`RemoteFile` values as each directory is parsed, so
downloads start long before the walk ends, plus :class:`RemoteDir` for every
directory (empty ones are mirrored too) and :class:`CrawlProblem` for
everything it refused or could not read.  Guards: scope, depth, a visited set
of normalised directory URLs, a cap on one listing's size, and a loop check
(a directory listing identical to one of its ancestors' is not descended).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import itertools
import re
import shlex
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import unquote

import httpx
import msgspec
from msgspec.structs import replace

from fetcher import __version__
from fetcher.checksums import MAX_SUMS_BYTES, is_sums_file, parse_sums
from fetcher.config import Transfer
from fetcher.errors import (
    HTTPStatusError,
    IncompleteDownload,
    ListingError,
    TransferError,
    UnsafePath,
)
from fetcher.http1 import pipelined_lanes
from fetcher.limits import pace
from fetcher.models import (
    CrawlProblem,
    Listing,
    ListingEntry,
    RelPath,
    RemoteDir,
    RemoteFile,
    Scope,
    UnchangedDir,
    names_digest,
    normalise_dir_url,
)
from fetcher.plan import wanted
from fetcher.retry import (
    build_retrying,
    not_tls,
    retry_after_seconds,
    untrusted_certificate,
    with_retries,
)
from fetcher.transport import plain_get

__all__ = ["CrawlOptions", "crawl"]


class CrawlOptions(msgspec.Struct, frozen=True):
    """What the crawl reads and how (from the job's options)."""

    depth: int = 64
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    concurrency: int = 4
    listing_rate: float | None = None
    max_listing_bytes: int = 64 << 20
    min_rate: float | None = None
    min_rate_time: float = 30.0
    """``--min-rate``: a listing (or checksum file, or index) slower than ``min_rate``
    bytes a second over ``min_rate_time`` seconds fails (:class:`~fetcher.limits.Pace`)."""
    verify: bool = False
    """Read SHA256SUMS-style files and give each file its published digest."""
    suites: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    """Debian archives (``--index debian``): which parts to mirror; empty means all."""


class _Dir(msgspec.Struct, frozen=True):
    """A directory to list: its URL, its path below the root and its depth."""

    url: str
    path: str  # "" for the root
    depth: int
    ancestors: tuple[bytes, ...]
    ahead: Future[_Page] | None = None
    """Set on a directory asked for before the crawl reached it (``known``): its listing."""
    confirms: _Suspect | None = None
    """Set on a listing read only to tell whether ``confirms.d`` is a symlink loop."""


class _Page(msgspec.Struct, frozen=True):
    """A listing as read: its entries, or, kept, the last run's."""

    url: str
    entries: list[ListingEntry]
    sums: dict[str, tuple[str, str]] = msgspec.field(default_factory=dict)
    digest: bytes | None = None
    """The page's bytes and the crawl's options, hashed (when listings are kept)."""
    kept: _Kept | None = None
    """Not parsed: the same as the last run's, its files all unchanged (see ``crawl``)."""
    unsure: bool = False
    """Ended by the connection's close, or compressed, with no closing tag at its end:
    maybe cut short."""


class _Suspect(msgspec.Struct, frozen=True):
    """A directory whose listing is the same as an ancestor's, held back.

    A server-side symlink loop shows the same listing again one level further down,
    which a coincidence does not: ``pkg/`` holding only ``pkg/``, both changed in one
    minute (or on a listing without dates), is not a loop, and ``pkg/pkg/`` has its own.
    """

    d: _Dir
    page: _Page
    expect: bytes
    """The fingerprint the listing below (``_Dir.confirms``) has if ``d`` is a loop."""


class _Kept(msgspec.Struct, frozen=True):
    """A page the same as the last run's over files as it left them."""

    listing: Listing
    files: tuple[str, ...]
    nbytes: int
    body: bytes  # parsed after all (as read from ``url``) if the page cannot stand for
    url: str  # the last run's here


_Keep = Callable[[str, bytes], tuple[Listing, tuple[str, ...], int] | None]
Intact = Callable[[str, Listing], tuple[tuple[str, ...], int] | None]
"""``(directory's path, its listing of the last run)`` → its files and their bytes if every
one of them is in the state and in DEST as the plan would find it unchanged, else None."""

CrawlItem = RemoteFile | RemoteDir | CrawlProblem | Listing | UnchangedDir


_Get = Callable[[str], httpx.Response]
"""A listing's GET: the response, its body not read yet, no redirect followed."""


def _getter(
    client: httpx.Client, t: Transfer, transport: httpx.BaseTransport | None
) -> tuple[_Get, Callable[[str], httpx.Request]]:
    """How the crawl asks for a listing, and builds its request ahead (to announce it).

    Through ``transport`` (the client's own, when the caller has it) the request is
    :func:`~fetcher.transport.plain_get`'s: no URL parse, cookie jar or auth flow per
    page, 160 -> 74 µs of CPU each on loopback. Else through ``client``.
    """
    if transport is not None:
        direct = transport

        def get(url: str) -> httpx.Response:
            return direct.handle_request(plain_get(url, t))

        return get, functools.partial(plain_get, t=t)

    def send(url: str) -> httpx.Response:
        return client.send(client.build_request("GET", url), stream=True, follow_redirects=False)

    return send, functools.partial(client.build_request, "GET")


class _RateGate:
    def __init__(self, rate: float | None, stop: threading.Event | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._stop = stop

    def wait(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next)
            self._next = at + self._interval
        delay = at - time.monotonic()
        if delay > 0:
            if self._stop is not None:
                self._stop.wait(delay)
            else:
                time.sleep(delay)


def _fetch_page(
    get: _Get,
    url: str,
    scope: Scope,
    opts: CrawlOptions,
    gate: _RateGate,
    keep: _Keep | None = None,
) -> _Page:
    try:
        return _read_page(get, url, scope, opts, gate, keep)
    except httpx.ConnectError as exc:
        if not_tls(exc):  # (else "[SSL: WRONG_VERSION_NUMBER] wrong version number", 5 times)
            where = httpx.URL(url)
            raise ListingError(
                f"{where.host}:{where.port or 443} does not answer in TLS (plain HTTP there?):"
                f" use {url.replace('https://', 'http://', 1)} if that is the mirror"
            ) from exc
        cert = untrusted_certificate(exc)
        if cert is None:
            raise
        # Not transient: retrying would only repeat the same refusal.
        if cert.verify_code in _NAME_MISMATCH:  # (a CA of its own would not help there)
            hint = "use the host name its certificate names, or --insecure to skip verification"
        else:
            hint = "use --ca-cert FILE to trust its CA, or --insecure to skip verification"
        raise ListingError(
            f"TLS certificate of {httpx.URL(url).host} not trusted: "
            f"{(cert.verify_message or cert.reason or '').rstrip('.')}; {hint}"
        ) from exc


_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _read_page(
    get: _Get,
    url: str,
    scope: Scope,
    opts: CrawlOptions,
    gate: _RateGate,
    keep: _Keep | None = None,
) -> _Page:
    hops = 0
    while True:
        gate.wait()
        with contextlib.closing(get(url)) as resp:
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                target = str(httpx.URL(url).join(resp.headers["location"])).split("#", 1)[0]
                if not scope.contains(target):
                    moved = (
                        f"; the start URL has moved: mirror {target} instead (--mirror)"
                        if url == scope.root and not hops
                        else ""
                    )
                    raise ListingError(
                        f"listing redirects off the mirror: {url} -> {target}{moved}"
                    )
                hops += 1
                if hops > 5:
                    raise ListingError(f"more than 5 redirects from {url}")
                url = target
                continue
            if resp.status_code != 200:
                raise HTTPStatusError(
                    resp.status_code, url, retry_after_seconds(resp.headers.get("retry-after"))
                )
            cl = resp.headers.get("content-length")
            if cl and cl.isdigit() and int(cl) > opts.max_listing_bytes:
                raise ListingError(
                    f"listing of {cl} bytes is over the {opts.max_listing_bytes} byte cap: {url}"
                )
            try:
                body = _capped_body(resp, opts.max_listing_bytes, "listing", url, opts)
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                raise IncompleteDownload(f"listing cut short: {url}: {exc}") from exc
            ctype = resp.headers.get("content-type", "text/html")
            if "html" not in ctype and "xml" not in ctype and not body.lstrip()[:1] == b"<":
                raise ListingError(f"not a directory listing ({ctype}): {url}")
            # A body neither sized nor chunked ends where the connection does, cut short
            # or not; a compressed one (sent although we ask for identity) may stop short
            # within its framing, and httpx's decoder does not say so; a page's closing
            # tag at its end says it is whole.
            framed = (
                "content-length" in resp.headers
                or "chunked" in resp.headers.get("transfer-encoding", "").lower()
            )
            coded = resp.headers.get("content-encoding", "").strip().lower() not in ("", "identity")
            unsure = (not framed or coded) and _CLOSING_TAG.search(
                body, max(0, len(body) - 512)
            ) is None
        page_url = url if url.endswith("/") else url + "/"
        if unsure:
            return _Page(page_url, _parse(bytes(body), url), unsure=True)  # nor kept
        if keep is None:
            return _Page(page_url, _parse(bytes(body), url))
        digest = hashlib.blake2b(body, digest_size=16, key=_options_key(scope, opts)).digest()
        same = keep(page_url, digest)
        if same is not None:
            return _Page(page_url, [], digest=digest, kept=_Kept(*same, bytes(body), url))
        return _Page(page_url, _parse(bytes(body), url), digest=digest)


_CLOSING_TAG = re.compile(rb"</[A-Za-z][\w:.-]*\s*>\s*\Z")
_HTML_MARK = re.compile(rb"<(?:html|head|body|title|pre|table|ul)\b", re.I)
"""What every server's page of an empty directory still shows (nginx, Apache, lighttpd,
Caddy, IIS, python's http.server): a page with no link and none of these is no listing."""


def _parse(body: bytes, url: str) -> list[ListingEntry]:
    # The readers load with the first page parsed (their structs and regular
    # expressions: ~4 ms of start-up): a re-sync whose pages are all kept parses none.
    from fetcher.listing import read_listing

    entries, cut = read_listing(body, url)
    if cut is not None:
        raise ListingError(f"the page could not be read whole ({cut}): {url}")
    if not entries and _HTML_MARK.search(body) is None:
        # An empty body, a compressed page sent without its Content-Encoding, bytes of
        # something else sent as text/html: read as an empty directory, --delete then
        # removed the files below it.
        raise ListingError(f"not a directory listing (no links, and no HTML in it): {url}")
    return entries


@functools.lru_cache(maxsize=8)
def _options_key(scope: Scope, opts: CrawlOptions) -> bytes:
    """What, besides a page's bytes, decides what its listing gives the crawl: the options,
    and this version of fetch (after an upgrade, whose readers may read a page better,
    every kept page is read again once)."""
    what = repr(
        (__version__, scope.root, scope.aliases, opts.depth, opts.include, opts.exclude,
         opts.verify)
    )  # fmt: skip
    return hashlib.blake2b(what.encode("utf-8", "surrogateescape"), digest_size=32).digest()


def _fetch_text(client: httpx.Client, url: str, cap: int, opts: CrawlOptions) -> str:
    with client.stream("GET", url, follow_redirects=False) as resp:
        if resp.status_code != 200:
            raise HTTPStatusError(
                resp.status_code, url, retry_after_seconds(resp.headers.get("retry-after"))
            )
        body = _capped_body(resp, cap, "checksum file", url, opts)
    return body.decode("utf-8", "replace")


def _capped_body(
    resp: httpx.Response, cap: int, what: str, url: str, opts: CrawlOptions
) -> bytearray:
    """The body of a page read whole (a listing, a checksum file): at most ``cap`` bytes
    once decoded, else :class:`ListingError`; at ``opts.min_rate`` or faster, else
    :class:`~fetcher.errors.TooSlow`.

    We ask for identity; a server may send gzip or deflate anyway (a misconfigured one),
    which is decoded here, never past the cap: zlib is told how much it may give. Any
    other coding is refused unread: a zstd page of 128 KiB, decoded by httpx chunk by
    chunk, had grown this process by 8 GiB before the cap was looked at."""
    coding = resp.headers.get("content-encoding", "").strip().lower()
    decoder: Any = None
    chunks: Iterable[bytes]
    if resp.is_stream_consumed:  # made with its content (a test's transport): decoded then
        coding, chunks = "", [resp.content]
    else:
        chunks = resp.iter_raw()
    if coding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == "deflate":
        decoder = _Deflate()
    elif coding not in ("", "identity"):
        raise ListingError(
            f"{what} sent with Content-Encoding {coding[:40]!r} (identity was asked): not read:"
            f" {url}"
        )
    body = bytearray()
    floor = pace(opts.min_rate, opts.min_rate_time)
    for chunk in chunks:
        if floor is not None:
            floor.add(len(chunk), f"the {what} {url}")
        if decoder is not None:
            try:
                chunk = decoder.decompress(chunk, cap + 1 - len(body))
            except zlib.error as exc:
                raise ListingError(f"{what} not decodable ({coding}: {exc}): {url}") from None
        body += chunk
        if len(body) > cap:
            raise ListingError(f"{what} is over the {cap} byte cap: {url}")
    return body


class _Deflate:
    """``Content-Encoding: deflate``: zlib's format, or raw deflate as some servers send it
    (as httpx reads it), with zlib's bound on what one call gives."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj()
        self._first = True

    def decompress(self, data: bytes, most: int) -> bytes:
        if self._first:
            self._first = False
            try:
                return self._d.decompress(data, most)
            except zlib.error:
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._d.decompress(data, most)


def _fingerprint(entries: Sequence[ListingEntry]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for e in sorted(entries, key=lambda e: e.url.rsplit("/", 2)[-2 if e.is_dir else -1]):
        last = e.url.rstrip("/").rsplit("/", 1)[-1]
        h.update(f"{last}\0{e.is_dir}\0{e.size}\0{e.date}\n".encode("utf-8", "surrogateescape"))
    return h.digest()


def crawl(
    client: httpx.Client,
    t: Transfer,
    opts: CrawlOptions,
    *,
    stop: threading.Event | None = None,
    sleep: Callable[[float], object] = time.sleep,
    on_wait: Callable[[], object] | None = None,
    width: Callable[[], int] | None = None,
    ahead: Callable[[Sequence[httpx.Request]], object] | None = None,
    pipelining: Callable[[], bool] | None = None,
    known: Sequence[str] = (),
    listings: Mapping[str, Listing] | None = None,
    intact: Intact | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Iterator[CrawlItem]:
    """Yield every in-scope file and directory below ``t.root``, and every problem met.

    ``on_wait`` is called whenever the crawl is about to wait for listings: a consumer
    that passes items on in batches hands on what it holds then. ``width``, asked
    before each new listing, is how many may be in flight now (at most
    ``opts.concurrency``, the default).

    ``ahead`` (the transport's ``expect``, see :mod:`fetcher.http1`) lets a crawl
    thread take a train of listings and announce the ones after the first, which
    then go on its connection without waiting for the answers before them: a level
    of many small directories costs a round trip per train, not per listing. The
    ``concurrency × t.pipeline`` listings in flight then go on as few threads as hold
    them (:func:`~fetcher.http1.pipelined_lanes`: 4 threads 32 deep for 16 × 8),
    which is what the transport's depth must be. Sixteen threads each parsing a
    page had kept the coordinator's other threads waiting for the interpreter lock
    (the first shard left ~80 ms after the first files were found; now ~4). While
    ``pipelining()`` says the transport has stopped sending requests ahead, listings
    go back to every thread, in trains of up to ``t.pipeline`` (one request at a
    time each). Not with ``--listing-rate`` (each request waits its turn) nor with
    checksum files to read between listings.

    ``known`` are directory URLs a previous run found files in (:meth:`State.directories
    <fetcher.state.State.directories>`). Their listings are asked for from the start,
    beside the root's, instead of a level at a time as the crawl reaches them: an
    unchanged tree five levels deep costs one round trip of listings, not five. A
    listing asked ahead counts only once the crawl reaches its directory through its
    parent's listing, so the result is the same as without; one the crawl never reaches
    (gone upstream, or now excluded) was a wasted request and is not shown.

    ``listings`` are what each directory's listing gave the last run (a
    :class:`~fetcher.models.Listing` is yielded for every page read without a problem,
    for the caller to keep). A page whose bytes are the same again, in a directory
    whose files ``intact`` finds all in the state and in DEST as that run left them,
    is not parsed: its directories are crawled from the kept listing and an
    :class:`~fetcher.models.UnchangedDir` stands for its files, each of which the plan
    would have found unchanged. Not with ``opts.verify`` (checksum files are read
    from the parsed page).

    ``transport``: ``client``'s, for the listings to go to it directly (see
    :func:`_getter`).

    Example::

        with httpx.Client() as client:
            for item in crawl(client, transfer, CrawlOptions()):
                print(item)
    """
    scope = Scope.for_start(t.root, t.aliases)
    over = threading.Event()  # the crawl has ended: listings asked ahead are not wanted
    if sleep is time.sleep:
        sleep = functools.partial(_nap, over, stop)  # nor may a wait outlast Ctrl-C
    retrying = build_retrying(t, sleep=sleep)
    get, prepare = _getter(client, t, transport)
    gate = _RateGate(opts.listing_rate, stop)
    visited = {normalise_dir_url(scope.root)}
    pool = ThreadPoolExecutor(max(1, opts.concurrency), thread_name_prefix="crawl")
    running: dict[Future[_Page], _Dir] = {}  # a listing each
    trains: set[Future[None]] = set()  # a crawl thread each
    longest = 1 if ahead is None or opts.listing_rate or opts.verify else max(1, t.pipeline)
    lanes, depth = pipelined_lanes(opts.concurrency, longest)

    def keeper(d: _Dir) -> _Keep | None:
        if listings is None or intact is None or opts.verify or d.confirms is not None:
            return None

        def keep(page_url: str, digest: bytes) -> tuple[Listing, tuple[str, ...], int] | None:
            # by the URL asked for, not the page's (after a redirect it may be another
            # directory's, whose kept listing is that directory's)
            last = listings.get(d.url)
            if last is None or last.digest != digest or last.path != d.path:
                return None
            same = intact(d.path, last)
            return None if same is None else (last, *same)

        return keep

    def fetch(
        d: _Dir,
        defer: bool = False,
        failed: Exception | None = None,
        failed_at: float | None = None,
    ) -> _Page:
        """``d``'s page. ``defer``: its first attempt only, what it raises for the caller to
        give back as ``failed`` (at ``failed_at``) for the rest of its attempts."""
        keep = keeper(d)

        def reached() -> None:
            if d.ahead is not None and over.is_set():
                raise ListingError("the crawl is over")  # asked ahead, never reached: no retry

        def attempt() -> _Page:
            return _fetch_page(get, d.url, scope, opts, gate, keep)

        if defer:
            reached()
            page = attempt()
        else:
            page = with_retries(retrying, attempt, reached, failed=failed, failed_at=failed_at)
        if opts.verify and d.confirms is None:
            for e in page.entries:
                name = unquote(e.url.rstrip("/").rsplit("/", 1)[-1])
                if not e.is_dir and is_sums_file(name) and scope.contains(e.url):
                    text = with_retries(
                        retrying,
                        functools.partial(_fetch_text, client, e.url, MAX_SUMS_BYTES, opts),
                    )
                    page.sums.update(parse_sums(name, text))
        return page

    def fetch_train(train: list[tuple[_Dir, Future[_Page]]]) -> None:
        announce = ahead if len(train) > 1 else None
        if announce is not None:
            announce([prepare(d.url) for d, _ in train[1:]])
        # Listings whose first attempt failed mid-train, and when: retried once the train
        # is over. At once, the retry went out of turn, and the connection went with the
        # answers on their way to the listings behind it (each of them asked for again),
        # which all waited out its Retry-After first.
        later: list[tuple[_Dir, Future[_Page], Exception, float]] = []
        try:
            for i, (d, fut) in enumerate(train):
                if not fut.set_running_or_notify_cancel():
                    continue
                defer = announce is not None and i < len(train) - 1
                try:
                    fut.set_result(fetch(d, defer=defer))
                except Exception as exc:  # noqa: BLE001 - judged by the policy, or delivered
                    if defer:
                        later.append((d, fut, exc, time.monotonic()))
                    else:
                        fut.set_exception(exc)
                except BaseException as exc:  # noqa: BLE001 - delivered to the crawl loop
                    fut.set_exception(exc)
        finally:
            if announce is not None:
                announce([])
        for d, fut, failure, at in later:
            try:
                fut.set_result(fetch(d, failed=failure, failed_at=at))
            except BaseException as exc:  # noqa: BLE001 - delivered to the crawl loop
                fut.set_exception(exc)

    # Listings in flight: at most ``concurrency``, picked alternately deepest first and
    # oldest first.  Deepest first, files turn up after one listing per level instead of
    # after every directory of the upper levels; oldest first, a shallow directory (the
    # big images beside a deep package pool) is not left to the very end, where its
    # files would be the run's long tail.
    deep: list[tuple[int, int, _Dir]] = []
    wide: deque[tuple[int, _Dir]] = deque()
    taken: set[int] = set()
    waiting = 0  # directories submitted and not taken yet
    order = itertools.count()
    most = max(1, opts.concurrency)
    turn = itertools.cycle((deep, wide))

    def queue(d: _Dir) -> None:
        nonlocal waiting
        n = next(order)
        heapq.heappush(deep, (-d.depth, n, d))
        wide.append((n, d))
        waiting += 1

    def next_dir() -> _Dir | None:
        nonlocal waiting
        for _ in range(2):
            side = next(turn)
            while side:
                if side is deep:
                    _, n, d = heapq.heappop(deep)
                else:
                    n, d = wide.popleft()
                if n not in taken:
                    taken.add(n)
                    waiting -= 1
                    return d
        return None

    # listings asked ahead (``known``), by normalised URL, until the crawl reaches them
    asked: dict[str, Future[_Page]] = {}

    def submit(d: _Dir) -> None:
        fut = asked.pop(normalise_dir_url(d.url), None) if asked else None
        if fut is not None:
            running[fut] = d  # asked already: its answer (or failure) is this directory's
        else:
            queue(d)

    queue(_Dir(scope.root, "", 0, ()))
    for early in _ahead(known, scope, opts):
        assert early.ahead is not None
        asked[normalise_dir_url(early.url)] = early.ahead
        queue(early)
    try:
        while True:
            if stop is not None and stop.is_set():
                return
            room = most if width is None else max(1, min(most, width()))
            gathered = depth > 1 and (pipelining is None or pipelining())
            if gathered:
                room = min(room, lanes)
            trains = {f for f in trains if not f.done()}
            while len(trains) < room and waiting:
                # gathered: full trains on as few threads as hold them; else what waits,
                # shared out among the free threads, a train each
                share = -(-waiting // (room - len(trains)))
                size = min(depth, waiting) if gathered else min(longest, share)
                train: list[tuple[_Dir, Future[_Page]]] = []
                while len(train) < size and (d := next_dir()) is not None:
                    if d.ahead is not None:
                        train.append((d, d.ahead))  # in running once the crawl reaches it
                        continue
                    fut: Future[_Page] = Future()
                    running[fut] = d
                    train.append((d, fut))
                trains.add(pool.submit(fetch_train, train))
            if not running:
                break
            if on_wait is not None:
                on_wait()
            watched: list[Future[Any]] = [*running, *trains]
            done, _ = wait(watched, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in sorted((f for f in done if f in running), key=lambda f: running[f].url):
                d = running.pop(fut)
                try:
                    page = fut.result()
                except (TransferError, ListingError) as exc:
                    yield from _unread(
                        d, str(exc) + (_start_is_a_file(client, t) if not d.path else "")
                    )
                    continue
                except httpx.HTTPError as exc:
                    yield from _unread(d, f"{type(exc).__name__}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001
                    # Whatever a hostile page or header sets off, one unreadable listing
                    # must end as a listing error (which blocks --delete), never as the
                    # silent end of a crawl that then looks complete and clean.
                    yield from _unread(d, f"unexpected {type(exc).__name__}: {exc}")
                    continue
                if d.confirms is not None:
                    yield from _confirmed(page, d, scope, opts, visited, submit)
                    continue
                if page.unsure:
                    yield CrawlProblem(
                        d.url,
                        "the listing came without a length (or compressed) and does not end"
                        " with a closing tag: it may be cut short, so --delete will not act"
                        " on this run",
                        "unsure",
                    )
                if page.kept is not None:
                    yield from _kept_children(page, d, scope, opts, visited, submit)
                else:
                    yield from _children(page, d, scope, opts, visited, submit)
    finally:
        over.set()
        for fut in asked.values():
            fut.cancel()  # never reached: a train still to ask for it skips it
        pool.shutdown(wait=True, cancel_futures=True)


def _ahead(known: Sequence[str], scope: Scope, opts: CrawlOptions) -> Iterator[_Dir]:
    """The directories of ``known`` and their ancestors below the root, each once and
    shallowest first, within ``--depth`` and the filters, each with a future for its listing."""
    root = scope.root
    found: dict[str, tuple[str, RelPath, int]] = {normalise_dir_url(root): (root, RelPath(""), 0)}
    for url in known:
        if not url.startswith(root):
            continue
        segments = url[len(root) :].split("/")[:-1]
        for n in range(1, min(len(segments), opts.depth) + 1):
            sub = root + "/".join(segments[:n]) + "/"
            key = normalise_dir_url(sub)
            if key in found:
                continue
            try:
                rel = scope.relative(sub)
            except UnsafePath:
                break
            if rel is None or not wanted(rel, True, opts.include, opts.exclude):
                break
            found[key] = (sub, rel, n)
    for sub, rel, n in sorted(found.values(), key=lambda v: (v[2], v[1]))[1:]:
        yield _Dir(sub, rel, n, (), Future())


def _nap(over: threading.Event, stop: threading.Event | None, seconds: float) -> None:
    """Sleep ``seconds``, less once the crawl is over or ``stop`` is set."""
    end = time.monotonic() + seconds
    while not (over.is_set() or (stop is not None and stop.is_set())):
        left = end - time.monotonic()
        if left <= 0:
            return
        over.wait(min(left, 0.1))


def _start_is_a_file(client: httpx.Client, t: Transfer) -> str:
    """What to add to the start listing's error when the start URL, as given, is a file.

    ``--mirror https://host/dir/file.iso`` is crawled as ``.../file.iso/``, which fails;
    one GET of the URL as given (headers only) tells a file from a missing directory.
    """
    url = t.root
    if url.endswith("/"):
        return ""
    try:
        with client.stream("GET", url) as resp:
            kind = resp.headers.get("content-type", "")
            if resp.status_code != 200 or kind.startswith("text/html"):
                return ""
    except httpx.HTTPError:
        return ""
    parent, _, name = url.rpartition("/")
    return (
        f"; {url} is a file, not a directory listing: to fetch it, mirror its directory with"
        f" --mirror {parent}/ --include {shlex.quote(unquote(name))}"
    )


def _unread(d: _Dir, message: str) -> Iterator[CrawlItem]:
    if d.confirms is not None:  # the suspect is neither a loop nor crawled: unread too
        d, message = d.confirms.d, f"no listing below it to tell a symlink loop by: {message}"
    if d.path:
        yield RemoteDir(RelPath(d.path))  # it exists upstream, even if unreadable now
    yield CrawlProblem(d.url, message, "listing")


def _first_visit(url: str, visited: set[str]) -> bool:
    """True the first time the crawl meets the directory ``url`` (then it is noted)."""
    key = normalise_dir_url(url)
    if key in visited:
        return False
    visited.add(key)
    return True


def _children(
    page: _Page,
    d: _Dir,
    scope: Scope,
    opts: CrawlOptions,
    visited: set[str],
    submit: Callable[[_Dir], None],
    checked: bool = False,
) -> Iterator[CrawlItem]:
    fp = _fingerprint(page.entries)
    if fp in d.ancestors and not checked:
        check = _check_loop(page, d, scope, fp)
        if check is None:
            yield _loop(d)
        else:
            submit(check)  # held back until the listing below tells (``_confirmed``)
        return
    if d.path:
        yield RemoteDir(RelPath(d.path))
    chain = (*d.ancestors, fp)
    files: dict[str, RemoteFile] = {}
    dirs: set[str] = set()
    below: list[tuple[str, str]] = []  # its directories to crawl, for the kept listing
    problems = False
    for e in page.entries:
        try:
            rel = scope.child(d.url, d.path, e.url)
        except UnsafePath as exc:
            problems = True
            yield CrawlProblem(e.url, str(exc), "unsafe")
            continue
        if rel is None:
            continue  # off-site, above the start, the page itself: silently out of scope
        if d.path and not (rel.startswith(d.path + "/")):
            continue  # a link elsewhere in the mirror: it is crawled from its own parent
        if "/" in rel[len(d.path) + 1 if d.path else 0 :]:
            continue  # not a direct child: reached from its own parent
        if not wanted(rel, e.is_dir, opts.include, opts.exclude):
            continue
        if e.is_dir:
            dirs.add(rel)
            url = e.url if e.url.endswith("/") else e.url + "/"
            below.append((url, rel))
            if not _first_visit(e.url, visited):
                continue
            if d.depth + 1 > opts.depth:
                problems = True
                yield CrawlProblem(
                    e.url, f"deeper than --depth {opts.depth}; not crawled", "depth", rel
                )
                continue
            submit(_Dir(url, rel, d.depth + 1, chain))
        elif rel not in files:
            # "a.txt" and "%61.txt" are one local file: fetch it once, not twice at once.
            digest = page.sums.get(rel.rsplit("/", 1)[-1])
            files[rel] = RemoteFile(e.url, rel, e.size, e.size_exact, e.mtime, e.stamp, digest)
    for name in sorted(files):
        if name in dirs:
            problems = True
            yield CrawlProblem(
                files[name].url,
                "the listing shows a file and a directory of this name; the directory is mirrored",
                "unsafe",
            )
        else:
            yield files[name]
    if page.digest is not None and not problems:
        stamps = [(path, f.stamp) for path, f in files.items() if f.stamp is not None]
        if len(stamps) == len(files):  # a file without one is asked about every run
            names = names_digest(stamps)
            yield Listing(d.url, d.path, page.digest, names, len(files), tuple(below), fp)


def _loop(d: _Dir) -> CrawlProblem:
    # Not even the directory itself is mirrored: it is a view of an ancestor.
    return CrawlProblem(
        d.url,
        "listing identical to an ancestor's, and so is the one below it (a server-side "
        "symlink loop?); not descended",
        "loop",
    )


def _check_loop(page: _Page, d: _Dir, scope: Scope, fp: bytes) -> _Dir | None:
    """The listing that tells whether ``d``, whose listing is the same as an ancestor's,
    is that ancestor again (a symlink loop); ``None`` when there is none to ask for.

    If ``d`` is the ancestor ``a`` again, then ``d/x/``, for the name ``x`` that leads from
    ``a`` down towards ``d``, is ``a/x/`` again, whose listing the crawl has seen: the
    next ancestor's, or ``d``'s own when ``a`` is ``d``'s parent.
    """
    at = max(i for i, seen in enumerate(d.ancestors) if seen == fp)
    segments = d.path.split("/")
    if len(segments) != len(d.ancestors):
        return None
    below = f"{d.path}/{segments[at]}"
    expect = d.ancestors[at + 1] if at + 1 < len(d.ancestors) else fp
    for e in page.entries:
        if not e.is_dir:
            continue
        try:
            if scope.child(d.url, d.path, e.url) != below:
                continue
        except UnsafePath:
            continue
        url = e.url if e.url.endswith("/") else e.url + "/"
        return _Dir(url, below, d.depth + 1, (), confirms=_Suspect(d, page, expect))
    return None


def _confirmed(
    page: _Page,
    check: _Dir,
    scope: Scope,
    opts: CrawlOptions,
    visited: set[str],
    submit: Callable[[_Dir], None],
) -> Iterator[CrawlItem]:
    """The suspect of ``check`` (see ``_check_loop``), now that ``page`` is its listing."""
    s = check.confirms
    assert s is not None
    if _fingerprint(page.entries) == s.expect:
        yield _loop(s.d)
    else:
        yield from _children(s.page, s.d, scope, opts, visited, submit, checked=True)


def _kept_children(
    page: _Page,
    d: _Dir,
    scope: Scope,
    opts: CrawlOptions,
    visited: set[str],
    submit: Callable[[_Dir], None],
) -> Iterator[CrawlItem]:
    """What :func:`_children` gives for a page kept unparsed (see ``crawl``): the kept
    listing's directories, and its files as one :class:`UnchangedDir`."""
    kept = page.kept
    assert kept is not None
    last = kept.listing  # of this directory's path (keep() saw to that)
    if last.fp in d.ancestors or (last.dirs and d.depth + 1 > opts.depth):
        # here the last run's listing would not stand: read the page after all
        entries = _parse(kept.body, kept.url)
        yield from _children(replace(page, entries=entries, kept=None), d, scope, opts,
                             visited, submit)  # fmt: skip
        return
    if d.path:
        yield RemoteDir(RelPath(d.path))
    chain = (*d.ancestors, last.fp)
    for url, rel in last.dirs:
        if _first_visit(url, visited):
            submit(_Dir(url, rel, d.depth + 1, chain))
    yield UnchangedDir(RelPath(d.path), kept.files, kept.nbytes, last.url)
