"""Decide, per file, what a run must do: pure functions over values.

``decide()`` takes what the listing says, what the state remembers and what
is on disk, and returns a :class:`Job` or ``None`` (skip).  Nothing here
touches the network or the filesystem; the caller passes ``stat`` results in.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from fetcher.checksums import is_sums_file
from fetcher.models import Action, Job, RemoteFile
from fetcher.state import Row

__all__ = [
    "Decision",
    "ListingClock",
    "LocalFile",
    "decide",
    "is_metadata",
    "is_top_metadata",
    "matches",
    "publish_step",
    "wanted",
]

# Repository metadata is published after the files it points at (DESIGN: incremental sync).
_METADATA = re.compile(
    r"(^|/)(repodata/[^/]+|Release|Release\.gpg|InRelease|Packages(\.[a-z0-9]+)?"
    r"|Sources(\.[a-z0-9]+)?|[A-Za-z0-9]*SUMS(\.[a-z]+)?|Contents-[^/]+|Index)$"
)

_TOP_METADATA = re.compile(
    r"(^|/)(repodata/repomd\.xml(\.asc|\.key)?|Release|Release\.gpg|InRelease)$"
)

_SIGNATURE = re.compile(r"(^|/)(repodata/repomd\.xml\.(asc|key)|Release\.gpg)$")

_ADOPT_SLACK = 60.0


class LocalFile(NamedTuple):
    """A file in DEST as one ``stat`` saw it (a named tuple: a re-sync makes one a file)."""

    size: int
    mtime: float


class Decision(msgspec.Struct, frozen=True):
    """What the plan does with a listed file: a job to fetch it, or none."""

    job: Job | None
    adopt: bool = False
    """No state row, but the local file matches the listing: record it, fetch nothing."""
    offset: int | None = None
    """With ``job``: the local file would match if the listing's dates were this many
    seconds off (a zone not whole hours from UTC), which ``ListingClock`` does not trust yet."""


def is_metadata(path: str) -> bool:
    """True for index files that must be published after everything they reference
    (checksum files too, Fedora's ``*-CHECKSUM`` among them: they name files as well)."""
    return _METADATA.search(path) is not None or is_sums_file(path.rpartition("/")[2])


def is_top_metadata(path: str) -> bool:
    """The metadata that points at other metadata: published after everything else."""
    return _TOP_METADATA.search(path) is not None


def publish_step(path: str) -> int:
    """When repository metadata is published, once every other file is in: 0 the indices,
    1 the files that point at them (``repomd.xml``, ``Release``, ``InRelease``), 2 the
    detached signatures of those (``Release.gpg``, ``repomd.xml.asc``), which must not
    stand beside an older copy of what they sign when its step failed."""
    if not is_top_metadata(path):
        return 0
    return 2 if _SIGNATURE.search(path) else 1


def matches(path: str, globs: Sequence[str]) -> bool:
    """Glob match: a pattern without '/' matches the name, one with '/' the whole relative path."""
    name = path.rsplit("/", 1)[-1]
    for g in globs:
        target = path if "/" in g.strip("/") else name
        if fnmatch.fnmatchcase(target, g.strip("/")):
            return True
    return False


def wanted(path: str, is_dir: bool, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Filters: an excluded directory is not crawled; includes select files only."""
    if exclude:
        parts = path.split("/")
        # an excluded directory excludes everything below it
        if any(matches("/".join(parts[: i + 1]), exclude) for i in range(len(parts))):
            return False
    if is_dir or not include:
        return True
    return matches(path, include)


def _offset(listing: float, local: float) -> int | None:
    """How far the listing's date is from the file's own, in whole quarter hours (seconds),
    if it is that within a minute; else None.

    Listing dates carry no time zone (nginx prints UTC unless told otherwise, Apache the
    server's local time) and often only minutes. Zones are whole quarter hours from UTC,
    up to ±14 h: India +5:30, Nepal +5:45, Newfoundland -3:30, South Australia +9:30.
    """
    diff = listing - local
    q = round(diff / _QUARTER) * _QUARTER
    if abs(q) > 14 * 3600 or abs(diff - q) > _ADOPT_SLACK:
        return None
    return q


_QUARTER = 900


class ListingClock:
    """Which offsets of a listing's dates from the files' own a run takes as the server's
    time zone, for adopting a tree another tool made.

    Whole hours always, as most zones are. Any other quarter hour is trusted once
    :attr:`AGREE` files of the same exact size have shown it: one server has one zone
    (two, with summer time), and a file of another content would have to match the size
    and that offset to the minute. Before that, the pipeline holds such files back
    (see ``Decision.offset``) and adopts them when the offset is trusted, or fetches them
    when the crawl ends without it.
    """

    AGREE = 3

    def __init__(self) -> None:
        self._votes: dict[int, int] = {}

    def trusted(self, offset: int) -> bool:
        return offset % 3600 == 0 or self._votes.get(offset, 0) >= self.AGREE

    def vote(self, offset: int) -> bool:
        """One more file at ``offset``; True when this vote makes it trusted."""
        n = self._votes.get(offset, 0) + 1
        self._votes[offset] = n
        return n == self.AGREE


def decide(
    f: RemoteFile,
    row: Row | None,
    local: LocalFile | None,
    partial: bool = False,
    clock: ListingClock | None = None,
) -> Decision:
    """What to do with ``f`` this run. ``clock``: the zones the run trusts the listing's
    dates to be in, for adopting a local file it has no row for (else whole hours only).

    >>> decide(RemoteFile("u", "a", 3, True, None, "3|x"), None, None).job.action
    <Action.NEW: 'new'>
    """
    if partial:
        return Decision(
            Job(f, Action.RESUME, row.etag if row else None, row.last_modified if row else None)
        )
    if row is not None and row.status == "invalid":
        return Decision(Job(f, Action.NEW))  # it failed a probe: fetch it again
    if row is None or row.status not in ("ok", "adopted"):
        off = _adoptable(f, local) if local is not None else None
        if off is None:
            return Decision(Job(f, Action.NEW))
        if (clock or ListingClock()).trusted(off):  # (a clock of its own: whole hours)
            return Decision(None, adopt=True)
        return Decision(Job(f, Action.NEW), offset=off)
    if local is None:
        return Decision(Job(f, Action.NEW))
    if row.size is not None and local.size != row.size:
        # DEST's copy is not the one fetched (cut short, overwritten): fetched again in
        # full. Not with the row's validators: the server's 304 would keep the damage.
        return Decision(Job(f, Action.CHANGED))
    if f.checksum is not None and row.sha256 and f.checksum[0] == "sha256":
        if f.checksum[1].lower() == row.sha256.lower() and local.size == row.size:
            return Decision(None)
        # Another digest: another file, whatever a 304 to the row's validators would say
        # (a version rolled back upstream keeps an older date, and the 304 kept ours).
        return Decision(Job(f, Action.CHANGED))
    unhashed = f.checksum is not None and f.checksum[0] == "sha256" and not row.sha256
    if unhashed and (f.stamp is None or f.stamp == row.stamp):
        # a digest DEST's copy, fetched before it was published, was never checked against
        return Decision(Job(f, Action.VERIFY))
    if f.stamp is not None:
        if f.stamp == row.stamp and (row.size is None or local.size == row.size):
            if racy(row):  # the same line may hide a rewrite: the server says (304, mostly)
                return Decision(Job(f, Action.CHECK, row.etag, row.last_modified))
            return Decision(None)
        if f.size_exact and f.size is not None and f.size != local.size:
            return Decision(Job(f, Action.CHANGED))  # another size: likewise
        return Decision(Job(f, Action.CHANGED, row.etag, row.last_modified))
    # The listing shows neither size nor date: ask the server with a conditional GET.
    return Decision(Job(f, Action.CHECK, row.etag, row.last_modified))


RACY = 90.0
"""Seconds: a listing's date is to the minute, and the server's clock is not ours."""


def racy(row: Row) -> bool:
    """Fetched so soon after its last change (the server's Last-Modified) that a rewrite in
    the same minute, to the same size, shows the same listing line: its stamp cannot vouch
    for it, and the next run asks the server (a conditional GET) instead of skipping it.
    (git's "racily clean" files.) A 304 then records a later fetch time."""
    return (
        row.last_modified is not None
        and row.fetched_at is not None
        and row.mtime is not None
        and row.fetched_at - row.mtime < RACY
    )


def _adoptable(f: RemoteFile, local: LocalFile) -> int | None:
    """The offset of the listing's date from the local file's, if the two may be one file."""
    if f.size is None or not f.size_exact or f.size != local.size or f.mtime is None:
        return None
    return _offset(f.mtime, local.mtime)
