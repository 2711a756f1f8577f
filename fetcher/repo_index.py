"""File lists from repository metadata instead of HTML listings (``--index``).

Not implemented yet: ``auto`` falls back to the HTML crawl; ``repodata`` and
``debian`` are refused with a clear message.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx

from fetcher.config import Transfer
from fetcher.crawl import CrawlItem, CrawlOptions, crawl
from fetcher.errors import UsageError

__all__ = ["index_files"]


def index_files(
    client: httpx.Client,
    t: Transfer,
    opts: CrawlOptions,
    kind: str,
    *,
    stop: threading.Event | None = None,
) -> Iterator[CrawlItem]:
    if kind == "auto":
        return crawl(client, t, opts, stop=stop)
    raise UsageError(f"--index {kind} is not supported yet; use --index html")
