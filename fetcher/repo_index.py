"""File lists from repository metadata instead of HTML listings (``--index``).

``index_files()`` picks the source: ``repodata`` reads a yum/dnf repository's
``repodata/repomd.xml`` and its ``primary`` file (:mod:`fetcher.repo_yum`),
``debian`` reads ``dists/SUITE/Release`` and the ``Packages`` indices it lists
(:mod:`fetcher.repo_debian`), and ``auto`` tries both before falling back to
the HTML crawl.  Every file comes with its exact size and published digest, so
no directory listing of ``Packages/`` or ``pool/`` is ever requested and every
download is verified while it streams.

An index that cannot be read or fails its own checksum ends as a
:class:`CrawlProblem` of kind ``listing``: deletion is then blocked, because the
file list is incomplete.  This module holds what both sources share: the
:class:`IndexSource` that GETs index files (scope-checked, redirects within
scope, the one retry policy), decompression, and digest checks.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, cast
from urllib.parse import quote

import httpx

from fetcher.config import Transfer
from fetcher.crawl import CrawlItem, CrawlOptions, crawl
from fetcher.errors import FetchError, HTTPStatusError, IncompleteDownload, ListingError, UnsafePath
from fetcher.limits import pace
from fetcher.models import CrawlProblem, RelPath, RemoteDir, RemoteFile, Scope
from fetcher.plan import wanted
from fetcher.retry import build_retrying, retry_after_seconds

__all__ = [
    "IndexSource",
    "check_digest",
    "decompressed",
    "index_files",
    "normal_algo",
]

INDEX_CAP = 1 << 30
"""Largest index file read into memory (compressed); Debian's biggest are ~ 20 MiB."""

_MAX_REDIRECTS = 5


def index_files(
    client: httpx.Client,
    t: Transfer,
    opts: CrawlOptions,
    kind: str,
    *,
    stop: threading.Event | None = None,
    on_wait: Callable[[], object] | None = None,
) -> Iterator[CrawlItem]:
    """Yield the files below ``t.root`` from repository metadata (``kind``), or by crawling.

    ``kind`` is ``auto``, ``repodata``, ``debian`` (or ``html``, which just crawls).
    ``on_wait`` as for :func:`~fetcher.crawl.crawl`, when it crawls.

    Example::

        with httpx.Client() as client:
            for item in index_files(client, transfer, CrawlOptions(), "auto"):
                print(item)
    """
    from fetcher import repo_debian, repo_yum

    if kind == "html":
        yield from crawl(client, t, opts, stop=stop, on_wait=on_wait)
        return
    src = IndexSource(client, t, opts, stop)
    auto = kind == "auto"
    try:
        if kind in ("auto", "repodata"):
            repomd = src.get("repodata/repomd.xml", probe=auto)
            # "auto" must not take a soft-404 page for a repository.
            if repomd is not None and (not auto or b"<repomd" in repomd[:4096]):
                yield from repo_yum.walk(src, repomd)
                return
            if not auto:
                msg = "no repodata/repomd.xml below the start URL: not a yum/dnf repository"
                yield CrawlProblem(src.url("repodata/repomd.xml"), msg, "listing")
                return
        suites = repo_debian.find_suites(src, probe=auto)
        if suites:
            yield from repo_debian.walk(src, suites)
            return
        if not auto:
            msg = "no dists/SUITE/Release below the start URL: not a Debian-style repository"
            yield CrawlProblem(src.url("dists/"), msg, "listing")
            return
    except (FetchError, httpx.HTTPError) as exc:
        yield CrawlProblem(src.root, f"repository index: {exc}", "listing")
        return
    yield from crawl(client, t, opts, stop=stop, on_wait=on_wait)


def normal_algo(name: str) -> str:
    """A repository's checksum type as a :mod:`hashlib` name (yum's ``sha`` is SHA-1)."""
    name = name.strip().lower()
    return {"sha": "sha1", "sha-1": "sha1", "sha-256": "sha256"}.get(name, name)


def check_digest(data: bytes, algo: str, want: str, size: int | None, url: str) -> None:
    """Raise :class:`ListingError` when ``data`` is not what its index says it is."""
    if size is not None and len(data) != size:
        raise ListingError(f"{url}: size mismatch: {len(data)} bytes, the index says {size}")
    try:
        h = hashlib.new(algo)
    except ValueError:
        raise ListingError(f"{url}: unknown checksum type {algo!r}") from None
    h.update(data)
    if h.hexdigest().lower() != want.strip().lower():
        raise ListingError(f"{url}: {algo} mismatch: expected {want}, got {h.hexdigest()}")


def decompressed(data: bytes, name: str) -> IO[bytes]:
    """A file object over ``data`` decompressed, by magic number (then by name)."""
    raw = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw))
    if data[:6] == b"\xfd7zXZ\x00" or name.endswith(".lzma"):
        return cast(IO[bytes], lzma.LZMAFile(raw))
    if data[:3] == b"BZh":
        return cast(IO[bytes], bz2.BZ2File(raw))
    if data[:4] == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise ListingError(f"{name} is zstd-compressed: install 'zstandard'") from None
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw))
    if name.endswith((".gz", ".xz", ".bz2", ".zst", ".zck")):
        raise ListingError(f"{name}: not in the compression its name says")
    return raw


class IndexSource:
    """GETs index files below the start URL: scope-checked, retried, size-capped.

    Also turns index entries into :class:`RemoteFile` values (or problems) and
    yields each directory on the way once, so the pipeline creates it.
    """

    def __init__(
        self,
        client: httpx.Client,
        t: Transfer,
        opts: CrawlOptions,
        stop: threading.Event | None = None,
    ) -> None:
        self.client = client
        self.scope = Scope.for_start(t.root, t.aliases)
        self.root = self.scope.root
        self.opts = opts
        self.stop = stop
        self.retrying = build_retrying(t, sleep=stop.wait if stop is not None else time.sleep)
        self._dirs: set[str] = set()

    def url(self, href: str) -> str:
        """The URL of ``href``, a plain (not percent-encoded) path relative to the root."""
        return self.root + quote(href, safe="/")

    def get(self, href: str, cap: int = INDEX_CAP, *, probe: bool = False) -> bytes | None:
        """The body of ``href`` as stored; ``None`` when the server says 404 or 410.

        ``probe``: any other refusal (4xx) also means "not there", for ``auto``'s guesses.
        """
        return self.get_url(self.url(href), cap, probe=probe)

    def get_url(self, url: str, cap: int = INDEX_CAP, *, probe: bool = False) -> bytes | None:
        try:
            for attempt in self.retrying.copy():
                with attempt:
                    return self._get_once(url, cap)
        except HTTPStatusError as exc:
            if probe and not exc.retryable:
                return None
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_once(self, url: str, cap: int) -> bytes | None:
        if not self.scope.contains(url):
            # A name from the metadata itself (a Release's component, a repomd.xml's
            # href) with ".." in it: httpx drops the dot segments, and the request went
            # above the start URL.
            raise ListingError(f"index outside the start URL: {url}")
        for _ in range(_MAX_REDIRECTS + 1):
            if self.stop is not None and self.stop.is_set():
                raise ListingError("interrupted")
            headers = {"Accept-Encoding": "identity"}
            with self.client.stream("GET", url, headers=headers, follow_redirects=False) as resp:
                code = resp.status_code
                if code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                    target = str(httpx.URL(url).join(resp.headers["location"])).split("#", 1)[0]
                    if not self.scope.contains(target):
                        raise ListingError(f"index redirects off the mirror: {url} -> {target}")
                    url = target
                    continue
                if code in (404, 410):
                    return None
                if code != 200:
                    ra = retry_after_seconds(resp.headers.get("retry-after"))
                    raise HTTPStatusError(code, url, ra)
                body = bytearray()
                floor = pace(self.opts.min_rate, self.opts.min_rate_time)
                try:
                    # Raw bytes: a .gz index served with Content-Encoding: gzip stays as stored,
                    # so its digest is the one the metadata publishes.
                    for chunk in resp.iter_raw():
                        if floor is not None:
                            floor.add(len(chunk), f"the index {url}")
                        body += chunk
                        if len(body) > cap:
                            raise ListingError(f"index over the {cap} byte cap: {url}")
                except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                    raise IncompleteDownload(f"index cut short: {url}: {exc}") from exc
                return bytes(body)
        raise ListingError(f"more than {_MAX_REDIRECTS} redirects from {url}")

    def file(
        self,
        url: str,
        size: int | None,
        checksum: tuple[str, str] | None,
        mtime: float | None = None,
    ) -> Iterator[CrawlItem]:
        """One indexed file: its new parent directories, then the file (or why not)."""
        try:
            rel = self.scope.relative(url)
        except UnsafePath as exc:
            yield CrawlProblem(url, str(exc), "unsafe")
            return
        if rel is None:
            yield CrawlProblem(url, "the index points outside the start URL", "unsafe")
            return
        if not wanted(rel, False, self.opts.include, self.opts.exclude):
            return
        yield from self._parents(rel)
        digest = checksum[1].lower() if checksum else "-"
        stamp = f"{size if size is not None else '-'}|{digest}"
        if checksum is not None:
            checksum = (checksum[0], checksum[1].lower())
        yield RemoteFile(url, rel, size, size is not None, mtime, stamp, checksum)

    def _parents(self, rel: RelPath) -> Iterator[RemoteDir]:
        parts = rel.split("/")[:-1]
        new: list[str] = []
        for i in range(len(parts), 0, -1):
            d = "/".join(parts[:i])
            if d in self._dirs:
                break
            self._dirs.add(d)
            new.append(d)
        for d in reversed(new):
            yield RemoteDir(RelPath(d))
