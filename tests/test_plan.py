from fetcher.models import Action, RelPath, RemoteFile
from fetcher.plan import ListingClock, LocalFile, decide, is_metadata, matches, wanted
from fetcher.state import Row


def remote(
    size: int | None = 10,
    stamp: str | None = "10|25-Nov-2026 14:02",
    mtime: float | None = 1_764_079_320.0,
) -> RemoteFile:
    return RemoteFile("http://h/a", RelPath("a"), size, True, mtime, stamp)


def row(stamp: str | None = "10|25-Nov-2026 14:02", size: int = 10, status: str = "ok") -> Row:
    return Row(
        "a",
        "http://h/a",
        size,
        1.0,
        '"e1"',
        "Wed, 25 Nov 2026 14:02:00 GMT",
        None,
        stamp,
        1_000.0,  # fetched long after its change (else racy: asked again)
        1,
        status,
    )


def test_new_file() -> None:
    d = decide(remote(), None, None)
    assert d.job is not None and d.job.action is Action.NEW


def test_unchanged_when_stamp_matches() -> None:
    assert decide(remote(), row(), LocalFile(10, 5.0)).job is None


def test_changed_when_stamp_differs() -> None:
    d = decide(remote(stamp="11|25-Nov-2026 15:00"), row(), LocalFile(10, 5.0))
    assert d.job is not None and d.job.action is Action.CHANGED
    assert d.job.etag == '"e1"'


def test_another_listed_size_or_digest_is_fetched_without_validators() -> None:
    # a 304 to the row's validators would keep ours (a version rolled back upstream keeps
    # an older date), where the listing already shows another file
    d = decide(remote(size=8, stamp="8|25-Nov-2026 13:00"), row(), LocalFile(10, 5.0)).job
    assert (
        d is not None and d.action is Action.CHANGED and (d.etag, d.last_modified) == (None, None)
    )
    f = RemoteFile("http://h/a", RelPath("a"), 10, True, None, "s", checksum=("sha256", "b" * 64))
    r = row()._replace(sha256="a" * 64)
    d = decide(f, r, LocalFile(10, 5.0)).job
    assert (
        d is not None and d.action is Action.CHANGED and (d.etag, d.last_modified) == (None, None)
    )
    assert decide(f, r._replace(sha256="B" * 64), LocalFile(10, 5.0)).job is None


def test_local_file_missing_or_resized_refetched() -> None:
    assert decide(remote(), row(), None).job is not None
    resized = decide(remote(), row(), LocalFile(3, 5.0)).job
    # in full: with the row's validators the server would answer 304 and keep the damage
    assert resized is not None and (resized.etag, resized.last_modified) == (None, None)
    no_stamp = decide(remote(size=None, stamp=None), row(stamp=None), LocalFile(3, 5.0)).job
    assert no_stamp is not None and no_stamp.action is Action.CHANGED and no_stamp.etag is None


def test_no_listing_metadata_means_conditional_get() -> None:
    d = decide(remote(size=None, stamp=None, mtime=None), row(stamp=None), LocalFile(10, 5.0))
    assert d.job is not None and d.job.action is Action.CHECK
    assert d.job.last_modified is not None


def test_partial_means_resume() -> None:
    d = decide(remote(), None, None, partial=True)
    assert d.job is not None and d.job.action is Action.RESUME


def test_adopt_matching_local_file_even_with_timezone_offset() -> None:
    f = remote()
    assert decide(f, None, LocalFile(10, f.mtime + 30)).adopt  # type: ignore[operator]
    assert decide(f, None, LocalFile(10, f.mtime - 3600 * 5)).adopt  # type: ignore[operator]
    assert not decide(f, None, LocalFile(10, f.mtime + 1800)).adopt  # type: ignore[operator]
    assert not decide(f, None, LocalFile(11, f.mtime)).adopt  # type: ignore[arg-type]


def test_adopt_at_another_quarter_hour_only_once_the_clock_trusts_it() -> None:
    f = remote()
    assert f.mtime is not None
    ist = LocalFile(10, f.mtime - 5.5 * 3600 + 20)  # the listing in India's time
    d = decide(f, None, ist)
    assert not d.adopt and d.job is not None and d.job.action is Action.NEW
    assert d.offset == 5.5 * 3600
    clock = ListingClock()
    for _ in range(ListingClock.AGREE - 1):
        assert decide(f, None, ist, clock=clock).offset == 19800
        assert not clock.vote(19800)
    assert clock.vote(19800)  # the AGREE-th file at that offset: the listing's zone
    assert decide(f, None, ist, clock=clock).adopt
    # only that offset; another quarter hour is not, nor is a date off by 20 minutes
    assert decide(f, None, LocalFile(10, f.mtime + 2.75 * 3600), clock=clock).offset == -9900
    assert decide(f, None, LocalFile(10, f.mtime + 20 * 60), clock=clock).offset is None
    assert not decide(f, None, LocalFile(10, f.mtime + 20 * 60), clock=clock).adopt
    assert decide(f, None, LocalFile(10, f.mtime + 3 * 3600), clock=clock).adopt  # whole hours
    assert decide(f, None, LocalFile(10, f.mtime + 15 * 3600)).offset is None  # beyond ±14 h


def test_metadata_paths() -> None:
    for p in [
        "repodata/repomd.xml",
        "x/repodata/primary.xml.gz",
        "dists/stable/Release",
        "dists/stable/InRelease",
        "dists/stable/main/binary-amd64/Packages.xz",
        "SHA256SUMS",
        "iso/MD5SUMS",
        "iso/Fedora-38-x86_64-CHECKSUM",
    ]:
        assert is_metadata(p), p
    for p in ["Packages/a.rpm", "repodata-old.txt", "pool/main/r/release-notes.deb"]:
        assert not is_metadata(p), p


def test_globs() -> None:
    assert matches("a/b/c.rpm", ["*.rpm"])
    assert matches("a/b/c.rpm", ["a/*/c.rpm"])
    assert not matches("a/b/c.rpm", ["b/*.rpm"])
    assert not wanted("debug/x.rpm", False, (), ("debug",))
    assert not wanted("debug", True, (), ("debug",))
    assert wanted("sub", True, ("*.rpm",), ())
    assert not wanted("sub/x.txt", False, ("*.rpm",), ())
