import pickle
import random
from collections.abc import Callable

import msgspec
import pytest

from fetcher.errors import HTTPStatusError, UnsafePath
from fetcher.models import (
    Action,
    BytesEvent,
    CrawlProblem,
    FileDone,
    FileStarted,
    Job,
    Outcome,
    RelPath,
    RemoteFile,
    Retried,
    Scope,
    Status,
    WorkerExit,
    WorkerFatal,
    rel_path,
)
from fetcher.shard import Shard

UNSAFE = [
    "",
    "/etc/passwd",
    "..",
    "a/../../b",
    "%2e%2e/x",
    "%2E%2E/x",
    "a/%2e%2e/%2e%2e/x",
    "..%2fx",
    "..%2Fetc%2Fpasswd",
    "a%2fb",
    "a%5cb",
    "a\\b",
    "a/./b",
    "a//b",
    "a%00b",
    "a\x00b",
    "a%0ab",
    "%ff%fe",  # not UTF-8
    "caf%e9",  # latin-1 byte
    "x" * 256,
    "%C3%A9" * 128,  # 256 bytes once decoded
    ".fetcher/state.sqlite",
    ".fetcher",
]


@pytest.mark.parametrize("raw", UNSAFE)
def test_rel_path_rejects_unsafe(raw: str) -> None:
    with pytest.raises(UnsafePath):
        rel_path(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a%20b.rpm", "a b.rpm"),
        ("caf%C3%A9/na%CC%88me", "café/na\u0308me"),
        ("100%25.txt", "100%.txt"),
        ("%2525", "%25"),  # decoded exactly once
        ("a%23b%3Fc", "a#b?c"),
        ("-rf", "-rf"),
        (".hidden", ".hidden"),
        ("x" * 255, "x" * 255),
        ("sub/.fetcher", "sub/.fetcher"),
        ("tar-1.34+git~1.rpm", "tar-1.34+git~1.rpm"),
    ],
)
def test_rel_path_decodes_once(raw: str, expected: str) -> None:
    assert rel_path(raw) == expected


ROOT = "http://127.0.0.1:8080/centos/7/Packages/"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (ROOT + "a.rpm", "a.rpm"),
        (ROOT + "sub/", "sub"),
        (ROOT + "sub/b%20c.rpm", "sub/b c.rpm"),
        ("http://127.0.0.1:8080/centos/7/%50ackages/x.rpm", "x.rpm"),  # %50 is 'P'
        (ROOT + "a.rpm#frag", "a.rpm"),
        (ROOT, None),
        (ROOT + "?C=N;O=D", None),
        (ROOT + "a.rpm?x=1", None),
        ("http://127.0.0.1:8080/centos/7/", None),
        ("http://127.0.0.1:8080/centos/7/PackagesX/a.rpm", None),
        ("http://127.0.0.1:8081/centos/7/Packages/a.rpm", None),
        ("https://127.0.0.1:8080/centos/7/Packages/a.rpm", None),
        ("http://localhost:8080/centos/7/Packages/a.rpm", None),
        ("ftp://127.0.0.1:8080/centos/7/Packages/a.rpm", None),
        ("file:///centos/7/Packages/a.rpm", None),
    ],
)
def test_scope_relative(url: str, expected: str | None) -> None:
    assert Scope.for_start(ROOT).relative(url) == expected


def test_scope_unsafe_in_scope_raises() -> None:
    with pytest.raises(UnsafePath):
        Scope.for_start(ROOT).relative(ROOT + "%2e%2e/%2e%2e/etc/passwd")
    assert not Scope.for_start(ROOT).contains(ROOT + "%2e%2e/x")


def test_scope_alias() -> None:
    s = Scope.for_start(ROOT, ("mirror2.example:8080",))
    assert s.same_origin_or_alias("http://mirror2.example:8080/anything")
    assert not s.same_origin_or_alias("http://mirror3.example:8080/anything")


def test_values_pickle() -> None:
    f = RemoteFile(ROOT + "a", RelPath("a"), 3, True, 1.0, "3|x", ("sha256", "ab"))
    o = Outcome(RelPath("a"), ROOT + "a", Status.FETCHED, size=3)
    e = HTTPStatusError(503, ROOT, 2.0)
    for v in (f, o):
        assert pickle.loads(pickle.dumps(v)) == v
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.status, e2.retry_after, e2.retryable) == (503, 2.0, True)


def test_everything_sent_between_processes_pickles_field_for_field() -> None:
    """Jobs go to workers and events come back by pickle; every field must survive."""
    f = RemoteFile(ROOT + "a", RelPath("a"), 3, True, 1.0, "3|x", ("sha256", "ab"))
    job = Job(f, Action.CHANGED, '"etag"', "Wed, 25 Nov 2026 18:00:00 GMT")
    out = Outcome(RelPath("a"), ROOT + "a", Status.FAILED, size=3, received=2, mtime=5.0,
                  etag='"e"', last_modified="lm", sha256="cd", stamp="s", error="boom",
                  attempts=4, fatal=True)  # fmt: skip
    values = [
        f,
        job,
        out,
        Shard((job, job)),
        BytesEvent(1, 99),
        FileStarted(1, RelPath("a"), 7),
        Retried(1, RelPath("a"), 2, "503"),
        FileDone(1, out),
        WorkerFatal(1, "disk full"),
        WorkerExit(1),
        CrawlProblem(ROOT, "bad listing", "listing"),
    ]
    for v in values:
        back = pickle.loads(pickle.dumps(v))
        assert type(back) is type(v)
        assert [getattr(back, x.name) for x in msgspec.structs.fields(v)] == [
            getattr(v, x.name) for x in msgspec.structs.fields(v)
        ]


def test_child_of_a_listing_agrees_with_relative_on_hostile_names() -> None:
    """The crawl's shortcut for a listing's links gives relative()'s verdict, message and
    all, for names a hostile listing could hold (2,000 random ones below 3 parents)."""
    scope = Scope.for_start("http://m.test/pub/")
    parents = [("http://m.test/pub/", ""), ("http://m.test/pub/a%20b/", "a b"),
               ("http://m.test/pub/x/.fetcher/", "x/.fetcher")]  # fmt: skip
    pieces = ["a", "%2e", ".", "..", "%2E%2e", "%2F", "/", "\\", "?q", "#f", ".fetcher", "%00",
              "%C3%A9", "%ff", "\u00e9", "~", "+", " ", "x" * 120, "%", "%zz", "\ud800", ""]  # fmt: skip
    rng = random.Random(7)

    def verdict(f: Callable[..., RelPath | None], *args: str) -> tuple[str, str | None]:
        try:
            return "ok", f(*args)
        except UnsafePath as exc:
            return "unsafe", str(exc)

    for _ in range(2000):
        parent_url, parent_path = rng.choice(parents)
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
        url = parent_url + name
        assert verdict(scope.child, parent_url, parent_path, url) == verdict(scope.relative, url), (
            url
        )
