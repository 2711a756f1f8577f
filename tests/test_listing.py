"""parse_listing: a corpus of real server pages, plus the rules one by one."""

from __future__ import annotations

import calendar
import doctest
import json
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urljoin

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import asdict

import fetcher.listing
import fetcher.listing_formats
from fetcher.listing import parse_listing
from fetcher.listing_formats import parse_date, parse_iso_date, parse_size
from fetcher.models import ListingEntry

FIXTURES = Path(__file__).parent / "fixtures" / "listings"
CORPUS = sorted(FIXTURES.glob("*.json"))
PAGE = "http://mirror.test/pub/"


def utc(*fields: int) -> float:
    return float(calendar.timegm((*fields, 0, 0, 0, 0, 0, 0)[:6]))


def urls(entries: list[ListingEntry]) -> list[str]:
    return [e.url for e in entries]


# -- the corpus: one page per server, captured by fixtures/listings/capture.py ----------


def test_corpus_has_every_format() -> None:
    names = {p.stem for p in CORPUS}
    assert names >= {
        "nginx", "nginx-localtime", "nginx-fancyindex", "nginx-fancyindex-tuna",
        "apache-plain", "apache-fancy", "apache-table", "lighttpd", "caddy",
        "python-http-server", "iis", "messy", "latin1", "cp936",
    }  # fmt: skip
    assert all(p.with_suffix(".html").exists() for p in CORPUS)


@pytest.mark.parametrize("fixture", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus(fixture: Path) -> None:
    doc = json.loads(fixture.read_text(encoding="utf-8"))
    page_url = doc["page_url"]
    body = fixture.with_suffix(".html").read_bytes()
    expected = [{**e, "url": urljoin(page_url, e["url"])} for e in doc["entries"]]
    assert [asdict(e) for e in parse_listing(body, page_url)] == expected


# -- sizes and dates -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12345", (12345, True)),
        ("  0 ", (0, True)),
        ("1,234", (1234, True)),
        ("1000 B", (1000, True)),
        ("7 bytes", (7, True)),
        ("2.4K", (round(2.4 * 1024), False)),
        ("121K", (121 * 1024, False)),
        ("0.0K", (0, False)),
        ("3M", (3 * 1024**2, False)),
        ("3.3 MiB", (round(3.3 * 1024**2), False)),
        ("1.2 GiB", (round(1.2 * 1024**3), False)),
        ("4 KB", (4096, False)),
        ("12.5 kB", (12800, False)),
        ("2T", (2 * 1024**4, False)),
        ("-", None),
        ("\u2014", None),
        ("", None),
        ("3.2", None),  # a version, not a size
        ("1.5 bytes", None),
        ("12 files", None),
        ("9" * 5000, None),  # int() would refuse it
    ],
)
def test_parse_size(text: str, expected: tuple[int, bool] | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("25-Nov-2026 14:02", utc(2026, 11, 25, 14, 2)),  # nginx, Apache 2.2
        ("2026-11-25 14:02", utc(2026, 11, 25, 14, 2)),  # Apache 2.4
        ("2026-Nov-25 14:02:03", utc(2026, 11, 25, 14, 2, 3)),  # lighttpd
        ("2026-Nov-25 14:02", utc(2026, 11, 25, 14, 2)),  # fancyindex
        ("Wednesday, November 25, 2026 2:02 PM", utc(2026, 11, 25, 14, 2)),  # IIS
        ("Thursday, January 1, 2026 12:00 AM", utc(2026, 1, 1)),
        ("Saturday, July 4, 2026 12:30 PM", utc(2026, 7, 4, 12, 30)),
        ("11/25/2026 2:02 PM", utc(2026, 11, 25, 14, 2)),  # IIS short date
        ("11/25/2026 02:02:03 PM +00:00", utc(2026, 11, 25, 14, 2, 3)),  # Caddy
        ("11/25/2026 09:02:03 AM -05:00", utc(2026, 11, 25, 14, 2, 3)),
        ("2026-11-25T14:02:03Z", utc(2026, 11, 25, 14, 2, 3)),
        ("2026-11-25T15:02:03+01:00", utc(2026, 11, 25, 14, 2, 3)),
        ("Wed, 25 Nov 2026 14:02:03 GMT", utc(2026, 11, 25, 14, 2, 3)),
        ("November 25, 2026", utc(2026, 11, 25)),
        ("  25-Nov-2026\t 14:02 ", utc(2026, 11, 25, 14, 2)),
        ("2024-02-29 23:59", utc(2024, 2, 29, 23, 59)),
        ("2026-02-30 10:00", None),  # looks like a date, is not one
        ("31-Foo-2026 10:00", None),
        ("13:00 PM 11/25/2026", None),
        ("25-Nov-2026 14:02 extra", None),
        ("", None),
    ],
)
def test_parse_date(text: str, expected: float | None) -> None:
    assert parse_date(text) == expected


def test_dates_that_share_a_day_keep_their_own_times() -> None:
    # One page reads each day's midnight once: the times on it still differ, and an
    # impossible day or time gives no mtime however often it comes.
    rows = [
        ("a", "25-Nov-2026 14:02", utc(2026, 11, 25, 14, 2)),
        ("b", "25-Nov-2026 23:59", utc(2026, 11, 25, 23, 59)),
        ("c", "30-Feb-2026 10:00", None),
        ("d", "25-Nov-2026 00:00", utc(2026, 11, 25)),
        ("e", "30-Feb-2026 11:00", None),
        ("f", "25-Nov-2026 24:00", None),
        ("g", "26-Nov-2026 00:01", utc(2026, 11, 26, 0, 1)),
    ]
    page = "<pre>" + "".join(f'<a href="{n}">{n}</a> {d} 12\n' for n, d, _ in rows) + "</pre>"
    entries = parse_listing(page.encode(), "http://h/pub/")
    assert [(e.name, e.date, e.mtime) for e in entries] == rows


def test_parse_iso_date() -> None:
    assert parse_iso_date(" 2026-11-25T14:02:03Z") == utc(2026, 11, 25, 14, 2, 3)
    assert parse_iso_date("2026-11-25T14:02:03") == utc(2026, 11, 25, 14, 2, 3)  # naive: UTC
    assert parse_iso_date("yesterday") is None


def test_doctests() -> None:
    for module in (fetcher.listing, fetcher.listing_formats):
        assert doctest.testmod(module).failed == 0


# -- links: which count, and their URLs -----------------------------------------------


def page(*links: str, head: str = "", charset: str = "utf-8") -> bytes:
    body = "\n".join(links)
    return f"<html><head>{head}</head><body><pre>{body}</pre></body></html>".encode(charset)


@pytest.mark.parametrize(
    "href",
    [
        "../", "..", "/", "/pub/", "./", ".", "", "#top", "?C=N;O=D", "x.iso?download=1",
        "../other/file.iso", "/other/file.iso", "/pub/../etc/passwd", "%2e%2e/escape",
        "mailto:root@mirror.test", "javascript:void(0)", "file:///etc/passwd",
        "data:text/plain,hi", "ftp://mirror.test/pub/x", "https://mirror.test/pub/x",
        "http://other.test/pub/x", "//other.test/pub/x", "http://mirror.test:8080/pub/x",
        "http://[::1", "a\\b",
    ],
)  # fmt: skip
def test_ignored_links(href: str) -> None:
    body = page(f'<a href="{href}">x</a>', '<a href="keep.iso">keep.iso</a>')
    assert urls(parse_listing(body, PAGE)) == [PAGE + "keep.iso"]


def test_only_anchors_count() -> None:
    head = '<link rel="stylesheet" href="style.css"><script src="app.js"></script>'
    body = page('<img src="logo.png">', "<a>no href</a>", '<a name="x">anchor</a>', head=head)
    body += b"<script>document.write('<a href=\"fake.iso\">')</script>"
    assert parse_listing(body, PAGE) == []


@pytest.mark.parametrize(
    ("href", "url"),
    [
        ("a%20b.iso", "a%20b.iso"),  # already encoded: kept as is, not encoded twice
        ("a b.iso", "a%20b.iso"),
        ("Tom &amp; Jerry.mkv", "Tom%20&%20Jerry.mkv"),
        ("caf\u00e9.txt", "caf%C3%A9.txt"),  # raw UTF-8 in the page
        ("caf&eacute;.txt", "caf%C3%A9.txt"),
        ("caf%c3%a9.txt", "caf%c3%a9.txt"),  # Apache's lower-case escapes survive
        ("100%.txt", "100%.txt"),
        ("./c+d.txt", "c+d.txt"),
        ("x.iso#sha256", "x.iso"),
        ("  spaced.txt\n", "spaced.txt"),
        ("sub/deeper/file", "sub/deeper/file"),
        ("http://mirror.test/pub/abs", "abs"),
        ("HTTP://MIRROR.TEST:80/pub/upper", "upper"),
    ],
)
def test_href_to_url(href: str, url: str) -> None:
    [entry] = parse_listing(page(f'<a href="{href}">x</a>'), PAGE)
    assert entry.url == PAGE + url


def test_href_keeps_raw_bytes_whatever_the_charset() -> None:
    raw = b'<pre><a href="caf\xe9.txt">caf\xe9.txt</a>\n<a href="\xd6\xd0.txt">\xd6\xd0.txt</a>\n'
    [latin, gbk] = parse_listing(raw, PAGE)
    assert (latin.url, latin.name) == (PAGE + "caf%E9.txt", "caf\u00e9.txt")
    assert gbk.url == PAGE + "%D6%D0.txt"
    declared = b'<meta charset="gbk">' + raw
    assert urls(parse_listing(declared, PAGE)) == [PAGE + "caf%E9.txt", PAGE + "%D6%D0.txt"]
    assert parse_listing(declared, PAGE)[1].name == "\u4e2d.txt"


def test_base_href() -> None:
    head = '<base href="http://mirror.test/pub/sub/"><base href="http://mirror.test/other/">'
    body = page('<a href="x.iso">x</a>', '<a href="../y.iso">y</a>', head=head)
    assert urls(parse_listing(body, PAGE)) == [PAGE + "sub/x.iso", PAGE + "y.iso"]
    relative = page('<a href="x.iso">x</a>', head='<base href="sub/">')
    assert urls(parse_listing(relative, PAGE)) == [PAGE + "sub/x.iso"]
    elsewhere = page('<a href="x.iso">x</a>', head='<base href="http://cdn.test/pub/">')
    assert parse_listing(elsewhere, PAGE) == []


def test_page_url_with_a_file_name() -> None:
    body = page('<a href="index.html">me</a>', '<a href="x.iso">x</a>')
    assert urls(parse_listing(body, PAGE + "index.html")) == [PAGE + "x.iso"]


# -- duplicates, names, directories ------------------------------------------------


def test_duplicates_merge_keeping_the_richest() -> None:
    body = page(
        '<a href="x.iso"><img src="i.gif" alt="[   ]"></a> <a href="x.iso">x.iso</a>'
        "  25-Nov-2026 14:02  1234",
        '<a href="y.iso">y.iso</a>  25-Nov-2026 14:02  2.0K',
        '<a href="y.iso">download</a>  25-Nov-2026 14:02  2048',
        '<a href="x.iso#top">again</a>',
    )
    x, y = parse_listing(body, PAGE)
    assert x == ListingEntry(
        PAGE + "x.iso", "x.iso", False, 1234, True, "25-Nov-2026 14:02", utc(2026, 11, 25, 14, 2)
    )
    assert (y.name, y.size, y.size_exact) == ("y.iso", 2048, True)  # exact beats rounded


def test_first_link_of_a_row_owns_its_metadata() -> None:
    row = (
        '<table><tr><td><a href="x.iso">x.iso</a> <a href="x.iso.sig">sig</a></td>'
        "<td>2026-11-25 14:02</td><td>700M</td></tr></table>"
    )
    x, sig = parse_listing(row.encode(), PAGE)
    assert (x.size, x.date) == (700 * 1024**2, "2026-11-25 14:02")
    assert (sig.size, sig.date) == (None, None)


def test_numbers_without_a_date_are_not_sizes() -> None:
    body = b'<p>Released 2026-11-25, 12 files. <a href="NEWS">NEWS</a> (3 days ago)</p>'
    body += b'<table><tr><td><a href="x">x</a></td><td>12</td></tr></table>'
    assert [(e.size, e.date) for e in parse_listing(body, PAGE)] == [(None, None)] * 2


def test_truncated_names_come_from_the_href() -> None:
    long = "a-very-long-file-name-that-nginx-cuts-short-\u00fcber.tar.gz"
    href = "a-very-long-file-name-that-nginx-cuts-short-%C3%BCber.tar.gz"
    body = page(f'<a href="{href}">a-very-long-file-name-that-ngi..&gt;</a> 25-Nov-2026 14:02 1')
    assert parse_listing(body, PAGE)[0].name == long
    assert parse_listing(page(f'<a href="{href}"></a>'), PAGE)[0].name == long


@pytest.mark.parametrize(
    ("line", "is_dir"),
    [
        ('<a href="d/">d/</a>  25-Nov-2026 14:02  -', True),
        ('<a href="d">d/</a>  25-Nov-2026 14:02  -', True),  # '-' size and a '/' name
        ('<a href="d">d</a>  25-Nov-2026 14:02  -', False),
        ('<a href="d">d/</a>  25-Nov-2026 14:02  12', False),
        ('<img src="f.gif" alt="[DIR]"> <a href="d">d</a>  2026-11-25 14:02  -', True),
        ("<br> Wednesday, November 25, 2026 2:02 PM &lt;dir&gt; <a href='d'>d</a><br>", True),
    ],
)
def test_directories(line: str, is_dir: bool) -> None:
    [entry] = parse_listing(page(line), PAGE)
    assert entry.is_dir is is_dir
    assert entry.size is None if is_dir else True


# -- robustness -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"\0\0\0",
        b"<a href='x.iso'>x\0</a>",
        b"<?xml version='1.0' encoding='utf-16'?><html><a href='x.iso'>x</a></html>",
        "\ufeff<a href='x.iso'>x</a>".encode("utf-16"),
        b"<a href='x.iso'>x</a><a href='y",  # truncated
        b"<" * 10_000 + b"<a href='x.iso'>x</a>",
        b"<div>" * 5_000 + b"<a href='x.iso'>x</a>",  # deeper than libxml2's limit
        b'<meta charset="no-such-charset"><a href="x.iso">x</a>',
        *(
            b'<meta charset="%s"><a href="x.iso">\xe9\\x\xff</a>' % name
            for name in (b"rot13", b"base64", b"undefined", b"unicode_escape", b"utf-32", b"idna")
        ),
    ],
)
def test_odd_bodies_do_not_raise(body: bytes) -> None:
    for entry in parse_listing(body, PAGE):
        assert entry.url == PAGE + "x.iso"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes(body: bytes) -> None:
    for entry in parse_listing(body, PAGE):
        assert entry.url.startswith("http://mirror.test/pub/")


_HREF = st.lists(
    st.sampled_from([*"aZ09/.-_~%#?&;:@+=, \t\n\\\"'<>é\u4e2d\x00\x7f", "&amp;", "%C3%A9", "../"]),
    max_size=12,
).map("".join)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            _HREF,
            st.text(max_size=10),
            st.sampled_from(["", " 25-Nov-2026 14:02 12", " 2026-11-25 14:02  1.2K", " -"]),
        ),
        max_size=12,
    ),
    st.sampled_from(["utf-8", "latin-1", "gbk"]),
)
def test_any_links(links: list[tuple[str, str, str]], charset: str) -> None:
    lines = [f'<a href="{href}">{text}</a>{meta}' for href, text, meta in links]
    body = page(*lines).decode().encode(charset, "replace")
    entries = parse_listing(body, PAGE)
    assert len({e.url for e in entries}) == len(entries)
    for entry in entries:
        assert entry.url.startswith("http://mirror.test/pub/")
        assert entry.url.isascii() and " " not in entry.url and "#" not in entry.url
        assert entry.size is None or entry.size >= 0


def test_a_50000_entry_page() -> None:
    rows = []
    for i in range(50_000):
        name = f"package-{i:05d}_1.{i % 97}.{i % 13}-1_amd64.deb"
        text = name if len(name) <= 50 else name[:47] + "..&gt;"
        rows.append(f'<a href="{name}">{text}</a>{" " * 12}25-Nov-2026 14:02{i * 1000:>20}\n')
    body = ('<html><body><pre><a href="../">../</a>\n' + "".join(rows) + "</pre>").encode()
    entries = parse_listing(body, PAGE)
    assert len(entries) == 50_000
    assert entries[-1].size == 49_999_000 and entries[-1].size_exact


# -- the nginx fast reader: the same entries as the general reader, or it declines ------


def _general(body: bytes, page_url: str) -> list[ListingEntry]:
    page = fetcher.listing._Page.of(page_url)
    assert page is not None
    return fetcher.listing._read_tree(body, page, page_url)


def _fast(body: bytes, page_url: str) -> list[ListingEntry] | None:
    page = fetcher.listing._Page.of(page_url)
    assert page is not None
    return fetcher.listing._nginx_page(body, page, page_url)


@pytest.mark.parametrize("fixture", CORPUS, ids=[p.stem for p in CORPUS])
def test_nginx_fast_reader_takes_nginx_pages_only(fixture: Path) -> None:
    page_url = json.loads(fixture.read_text(encoding="utf-8"))["page_url"]
    body = fixture.with_suffix(".html").read_bytes()
    fast = _fast(body, page_url)
    if fixture.stem in ("nginx", "nginx-localtime"):
        assert fast is not None and fast == _general(body, page_url)
        assert any(e.size_exact for e in fast) and any(e.is_dir for e in fast)
    else:
        assert fast is None


def nginx_page(lines: list[str], title: str = "/pub/") -> bytes:
    """A page laid out as nginx's autoindex lays it out."""
    head = (
        f"<html>\r\n<head><title>Index of {title}</title></head>\r\n<body>\r\n"
        f'<h1>Index of {title}</h1><hr><pre><a href="../">../</a>\r\n'
    )
    body = "".join(line + "\r\n" for line in lines)
    return (head + body + "</pre><hr></body>\r\n</html>\r\n").encode()


def nginx_line(href: str, label: str, date: str, size: str) -> str:
    return f'<a href="{href}">{label}</a>{" " * max(1, 51 - len(label))}{date}{size:>20}'


def test_nginx_fast_reader_reads_what_nginx_prints() -> None:
    body = nginx_page(
        [
            nginx_line("d%20e/", "d e/", "25-Nov-2026 14:02", "-"),
            nginx_line("a%26b%3C%3E.txt", "a&amp;b&lt;&gt;.txt", "25-Nov-2026 14:02", "1234"),
            nginx_line("x%22y", "x&quot;y", "01-Feb-2025 09:30", "12K"),
            nginx_line(
                "long-" * 12,
                "long-long-long-long-long-long-long-long-long-lo..&gt;",
                "25-Nov-2026 14:02",
                "3M",
            ),
            nginx_line("../../etc/passwd", "passwd", "25-Nov-2026 14:02", "1"),
            nginx_line("http://elsewhere.test/x", "x", "25-Nov-2026 14:02", "1"),
        ]
    )
    fast = _fast(body, PAGE)
    assert fast is not None and fast == _general(body, PAGE)
    assert [(e.name, e.is_dir, e.size, e.size_exact) for e in fast] == [
        ("d e", True, None, False),
        ("a&b<>.txt", False, 1234, True),
        ('x"y', False, 12 * 1024, False),
        ("long-" * 12, False, 3 * 1024**2, False),
    ]
    assert fast[1].mtime == utc(2026, 11, 25, 14, 2) and fast[2].date == "01-Feb-2025 09:30"


@pytest.mark.parametrize(
    "body",
    [
        nginx_page([nginx_line("a", "a", "25-Nov-2026 14:02", "1")])[:-2],  # no final CRLF
        nginx_page([nginx_line("a", "a", "25-Nov-2026 14:02", "1") + " extra"]),
        nginx_page([nginx_line("a", "a&apos;", "25-Nov-2026 14:02", "1")]),  # other entity
        nginx_page([nginx_line("a", "a\tb", "25-Nov-2026 14:02", "1")]),  # a control char
        nginx_page([nginx_line("a", "a", "25-Nov-2026 14:02", "1.5K")]),
        nginx_page([nginx_line("a", "a", "32-Foo-2026 14:02", "1")]),  # no such month
        nginx_page([nginx_line("a b", "a b", "25-Nov-2026 14:02", "1")]),  # raw space in href
        nginx_page(['<a href="a">a</a><img src="x">  25-Nov-2026 14:02  1']),
        nginx_page([nginx_line("a", "\u00fc", "25-Nov-2026 14:02", "1")]).replace(
            "\u00fc".encode(),
            b"\xfc",  # not UTF-8
        ),
        nginx_page([], title="/pub/<b>"),
    ],
)
def test_nginx_fast_reader_declines_anything_else(body: bytes) -> None:
    assert _fast(body, PAGE) is None
    assert parse_listing(body, PAGE) == _general(body, PAGE)


_NAME = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=60
)
_HOSTILE_HREF = st.sampled_from(
    ["../x", "a/../../b", "//evil.test/x", "http://evil.test/", "?C=M;O=A", "#top", "./", ".",
     "%2e%2e/x", "a//b", "a/./b", "javascript:alert(1)", "/pub/abs", "/elsewhere"]
)  # fmt: skip
_SIZE_TOKEN = st.one_of(
    st.sampled_from(["-", "0", "12K", "3M", "1G", "7T", "2P"]),
    st.integers(0, 10**18).map(str),
)
_DATE = st.one_of(
    st.sampled_from(
        [
            "25-Nov-2026 14:02",
            "29-Feb-2024 23:59",
            "31-Feb-2026 14:02",
            "01-Jan-1970 00:00",
            "25-Nov-2026 24:61",
            "25-Xyz-2026 14:02",
        ]
    ),
    st.datetimes().map(lambda d: d.strftime("%d-%b-%Y %H:%M")),
)


def _escape_label(name: str) -> str:
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                _NAME.map(lambda n: (quote(n, safe=""), n)), _HOSTILE_HREF.map(lambda h: (h, h))
            ),
            st.booleans(),  # a directory
            st.booleans(),  # the label cut short
            _DATE,
            _SIZE_TOKEN,
        ),
        max_size=20,
    ),
    st.sampled_from(
        ["http://mirror.test/pub/", "http://mirror.test/", "https://m.test:8443/a%20b/"]
    ),
)
def test_nginx_fast_reader_agrees_with_the_general_reader(
    entries: list[tuple[tuple[str, str], bool, bool, str, str]], page_url: str
) -> None:
    lines = []
    for (href, name), is_dir, cut, date, size in entries:
        label = _escape_label(name).replace('"', "&quot;")
        if is_dir:
            href, label = href + "/", label + "/"
        if cut:
            label = label[:47] + "..&gt;"
        lines.append(nginx_line(href, label, date, "-" if is_dir else size))
    body = nginx_page(lines)
    fast = _fast(body, page_url)
    assert parse_listing(body, page_url) == _general(body, page_url)
    if fast is not None:
        assert fast == _general(body, page_url)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text("abcXYZ019.-_+~ \u00fc\u65e5&<>\"'", min_size=1, max_size=40).filter(
                lambda n: n.strip() not in ("", ".", "..")
            ),
            st.datetimes(datetime(1970, 1, 1), datetime(9999, 12, 31)),
            st.integers(0, 10**15),
        ),
        max_size=30,
    )
)
def test_nginx_fast_reader_takes_every_plain_nginx_page(
    entries: list[tuple[str, datetime, int]],
) -> None:
    lines = [
        nginx_line(quote(n, safe=""), _escape_label(n).replace('"', "&quot;"),
                   d.strftime("%d-%b-%Y %H:%M"), str(size))
        for n, d, size in entries
    ]  # fmt: skip
    body = nginx_page(lines)
    fast = _fast(body, PAGE)
    assert fast is not None and fast == _general(body, PAGE)
    assert len(fast) == len({quote(n, safe="") for n, _d, _s in entries})


@pytest.mark.parametrize(("exact_size", "localtime"), [(True, False), (False, True)])
def test_nginx_fast_reader_on_real_nginx(tmp_path: Path, exact_size: bool, localtime: bool) -> None:
    import httpx

    from tests.servers import serve

    root = tmp_path / "root"
    odd = root / "odd dir & more"
    odd.mkdir(parents=True)
    names = [
        "a&b.txt", "lt<gt>.txt", 'quote"d.txt', "it's.txt", "sp ace.txt", "two  spaces.txt",
        "\u00fcber-\u65e5\u672c.txt", "pct%41.txt", "hash#.txt", "q?mark.txt", "semi;colon",
        "plus+tilde~1.0.deb", "x" * 80 + ".tar.gz",
    ]  # fmt: skip
    for i, name in enumerate(names):
        (odd / name).write_bytes(b"x" * (i * 700))
    (odd / "sub").mkdir()
    (odd / "big.iso").write_bytes(b"\0" * (3 * 1024 * 1024 + 5))
    # nginx cuts a long name at 50 bytes, which may split a UTF-8 character: not UTF-8,
    # so that page goes to the general reader
    (root / "cut").mkdir()
    (root / "cut" / ("\u00e9" * 60)).write_bytes(b"x")
    with serve("nginx", root, tmp_path / "srv", exact_size=exact_size, localtime=localtime) as srv:
        body = httpx.get(srv.url + "cut/", timeout=10).content
        assert _fast(body, srv.url + "cut/") is None
        assert [e.name for e in parse_listing(body, srv.url + "cut/")] == ["\u00e9" * 60]
        for url in (srv.url, srv.url + "odd%20dir%20%26%20more/"):
            body = httpx.get(url, timeout=10).content
            fast = _fast(body, url)
            assert fast is not None, body[:300]
            assert fast == _general(body, url) == parse_listing(body, url)
        got = {e.name: e for e in fast}
        # (a name is the link's text, whitespace-normalised; paths come from the hrefs)
        assert set(got) == {*(" ".join(n.split()) for n in names), "sub", "big.iso"}
        assert {e.url.rsplit("/", 1)[1] for e in fast if not e.is_dir} == {
            quote(n, safe="") for n in [*names, "big.iso"]
        }
        assert got["sub"].is_dir and not got["a&b.txt"].is_dir
        assert got["big.iso"].size_exact is exact_size
        assert got["big.iso"].size == (3 * 1024 * 1024 + 5 if exact_size else 3 * 1024 * 1024)
