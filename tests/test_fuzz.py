"""Fuzzing the three gates between a hostile page and the disk: ``parse_listing``,
``Scope.relative`` and ``rel_path``.  Whatever goes in, what comes out is either
rejected with :class:`UnsafePath` or a path that stays below DEST."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fetcher.errors import UnsafePath
from fetcher.listing import parse_listing
from fetcher.models import STATE_DIR, RelPath, Scope, rel_path

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ROOT = "http://127.0.0.1:8080/pub/start/"
SCOPE = Scope.for_start(ROOT, ("127.0.0.1:9090", "mirror.test"))
DEST = Path("/srv/dest")

# Pieces that have broken path handling somewhere: dots, encoded dots and
# separators, backslashes, NUL, other origins, schemes, entities, odd bytes.
PIECES = [
    "..", ".", "/", "//", "\\", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "%5C",
    "%00", "\x00", "%0a", "\n", "\t", " ", "%20", "%", "%%", "%zz", "%e9", "%C3%A9", "é", "中",
    "\udce9", "~", ";", "?", "#", ":", "@", "a", "b.txt", "sub", STATE_DIR, "%2efetcher",
    "http://127.0.0.1:8080", "http://127.0.0.1:9090", "http://127.0.0.2:8080", "//127.0.0.1:8080",
    "https://127.0.0.1:8080", "HTTP://127.0.0.1:8080", "http://user@127.0.0.1:8080",
    "http://[::1", "http://127.0.0.1:99999", "http://mirror.test", "file:", "javascript:",
    "mailto:", "data:", "/pub/start", "/pub/startx", "/pub", "x" * 200,
]  # fmt: skip
HTML_PIECES = [*PIECES, "&amp;", "&#46;", "&#x2f;", "&#0;", "&#x5c;", "&quot;", "&lt;", "&eacute;"]


def _check_safe(p: str, root: Path = DEST) -> None:
    """What every RelPath must be: plain names, below ``root`` once joined."""
    assert p and not p.startswith("/"), p
    segments = p.split("/")
    for seg in segments:
        assert seg not in ("", ".", ".."), p
        assert "\\" not in seg and "\0" not in seg, p
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg), p
        assert len(seg.encode("utf-8")) <= 255, p
    assert segments[0] != STATE_DIR, p
    resolved = Path(root, p).resolve()
    assert resolved.is_relative_to(root.resolve()) and resolved != root.resolve(), p


def _hostile(pieces: list[str], max_size: int = 12) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.sampled_from(pieces), st.text(max_size=4)), max_size=max_size).map(
        "".join
    )


# --- rel_path -------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(st.text(), _hostile(PIECES), st.text(st.characters(codec=None))))
@example("\udce9")
@example("a/%2e%2e/%2e%2e/etc")
@example("%2e%2e%2f%2e%2e%2fetc%2fpasswd")
def test_rel_path_safe_or_refused(raw: str) -> None:
    try:
        p = rel_path(raw)
    except UnsafePath:
        return
    _check_safe(p)


@SETTINGS
@given(
    st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=20), min_size=1, max_size=5)
)
def test_rel_path_round_trips_plain_names(names: list[str]) -> None:
    """Any percent-encoded safe name decodes back to itself (one decoding, no more)."""
    from urllib.parse import quote

    encoded = "/".join(quote(n, safe="") for n in names)
    try:
        p = rel_path(encoded)
    except UnsafePath:
        return
    assert p == "/".join(names)
    _check_safe(p)


# --- Scope.relative -----------------------------------------------------------------------


def _below_root(url: str, p: RelPath) -> None:
    """The URL's decoded path is the root's decoded path followed by ``p``."""
    path = unquote_to_bytes(urlsplit(url).path)
    root = unquote_to_bytes(urlsplit(ROOT).path)
    assert path.startswith(root), (url, p)
    assert path[len(root) :].rstrip(b"/").decode("utf-8") == p, (url, p)


@SETTINGS
@given(
    st.sampled_from(
        [
            "",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:9090",
            "http://mirror.test",
            "http://127.0.0.2:8080",
            "https://127.0.0.1:8080",
            "HTTP://127.0.0.1:8080",
            "http://127.0.0.1",
            "file://",
            "javascript:",
            "//127.0.0.1:8080",
        ]
    ),
    st.sampled_from(
        ["", "/pub/start/", "/pub/start", "/pub/", "/", "/pub/startx/", "/pub//start/"]
    ),
    _hostile(PIECES),
)
@example("http://127.0.0.1:8080", "/pub/start/", "%2e%2e/%2e%2e/etc/passwd")
@example("http://127.0.0.1:8080", "/pub/start/", "a/..%2f..%2f..%2fx")
@example("http://127.0.0.1:8080", "/pub/start/", "\udce9")
def test_scope_relative_never_outside(origin: str, prefix: str, tail: str) -> None:
    url = origin + prefix + tail
    # the predicates answer, whatever the URL
    assert isinstance(SCOPE.contains(url), bool)
    assert isinstance(SCOPE.is_root(url), bool)
    assert isinstance(SCOPE.same_origin_or_alias(url), bool)
    try:
        p = SCOPE.relative(url)
    except UnsafePath:
        return
    if p is None:
        return
    _check_safe(p)
    if urlsplit(url).hostname == "127.0.0.1" and urlsplit(url).port == 8080:
        _below_root(url, p)


# --- parse_listing + Scope -----------------------------------------------------------------

PAGE_URLS = [ROOT, ROOT + "index.html", ROOT + "sub/", "http://127.0.0.1:8080/pub/start"]


def _attr(href: str) -> bytes:
    return href.replace('"', "&quot;").encode("utf-8", "surrogateescape")


@st.composite
def _pages(draw: st.DrawFn) -> bytes:
    hrefs = draw(st.lists(_hostile(HTML_PIECES), min_size=1, max_size=8))
    out = [b"<html><head>"]
    if draw(st.booleans()):
        out.append(b'<base href="' + _attr(draw(_hostile(HTML_PIECES, 6))) + b'">')
    if draw(st.booleans()):
        out.append(
            b'<meta charset="'
            + draw(st.sampled_from([b"gbk", b"latin-1", b"utf-8", b"bogus", b"utf-16"]))
            + b'">'
        )
    out.append(b"</head><body>")
    wrap = draw(st.sampled_from(["pre", "table", "ul", "none"]))
    for href in hrefs:
        text = _attr(draw(_hostile(HTML_PIECES, 4)))
        link = b'<a href="' + _attr(href) + b'">' + text + b"</a>"
        tail = draw(st.sampled_from([b" 25-Nov-2026 14:02 1234", b" - ", b"", b" 2.3K"]))
        if wrap == "table":
            link = b"<tr><td>" + link + b"</td><td>" + tail + b"</td></tr>"
        elif wrap == "ul":
            link = b"<li>" + link + tail
        else:
            link += tail + b"\n"
        out.append(link)
    page = b"".join(out)
    if draw(st.booleans()):  # a truncated page
        page = page[: draw(st.integers(0, len(page)))]
    return page + draw(st.binary(max_size=8))


@SETTINGS
@given(st.one_of(_pages(), st.binary(max_size=300)), st.sampled_from(PAGE_URLS))
@example(b'<a href="%2e%2e/x">x</a><a href="..%2fx">y</a><a href="a\\..\\..\\x">z</a>', ROOT)
@example(b'<base href="../../"><a href="etc/passwd">p</a>', ROOT)
@example(b'<a href="nul\x00x">n</a><a href="caf\xe9">c</a>', ROOT)
def test_parse_listing_and_scope_never_unsafe(page: bytes, page_url: str) -> None:
    entries = parse_listing(page, page_url)
    prefix = page_url[: page_url.rfind("/") + 1]
    for e in entries:
        assert e.url.startswith("http://127.0.0.1:8080/"), e
        assert unquote_to_bytes(e.url).startswith(unquote_to_bytes(prefix)), (e.url, prefix)
        try:
            p = SCOPE.relative(e.url)
        except UnsafePath:
            continue
        if p is None:
            continue
        _check_safe(p)
        _below_root(e.url, p)
