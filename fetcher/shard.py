"""Split jobs into small shards, biggest first, balanced by bytes (pure)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import msgspec

from fetcher.models import Job

__all__ = ["MAX_FILES", "Shard", "make_shards"]

MAX_FILES = 32
MAX_BYTES = 32 << 20
_UNKNOWN = 1 << 20  # size assumed for a file whose listing shows none


class Shard(msgspec.Struct, frozen=True):
    """A unit of work for one worker: a few files, fetched by its thread pool."""

    jobs: tuple[Job, ...]

    @property
    def nbytes(self) -> int:
        return sum(_size(j) for j in self.jobs)


def _size(job: Job) -> int:
    return job.file.size if job.file.size is not None else _UNKNOWN


def make_shards(
    jobs: Iterable[Job], max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES
) -> list[Shard]:
    """Pack ``jobs`` into shards of at most ``max_files`` files and about ``max_bytes`` bytes.

    Files are taken biggest first, so a long transfer starts early and the
    small ones fill in around it; a file bigger than ``max_bytes`` is a shard
    of its own.  The number of shards is the fewest both limits allow, and
    bytes are dealt to the lightest shard, so shards come out even.

    >>> [len(s.jobs) for s in make_shards([])]
    []
    """
    ordered = sorted(jobs, key=lambda j: (-_size(j), j.file.path))
    if not ordered:
        return []
    big = [j for j in ordered if _size(j) >= max_bytes]
    rest = ordered[len(big) :]
    shards: list[list[Job]] = [[j] for j in big]
    if rest:
        total = sum(_size(j) for j in rest)
        n = max(-(-len(rest) // max_files), -(-total // max_bytes), 1)
        bins: list[list[Job]] = [[] for _ in range(n)]
        # the lightest bin that has room, lowest index first among equals: a heap of
        # (load, index); a full bin is not put back
        lightest = [(0, k) for k in range(n)]
        for j in rest:
            load, i = heapq.heappop(lightest)
            bins[i].append(j)
            if len(bins[i]) < max_files:
                heapq.heappush(lightest, (load + _size(j), i))
        shards.extend(bins)
    return [Shard(tuple(s)) for s in shards if s]
