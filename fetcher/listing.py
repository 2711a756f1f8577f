"""Read a directory listing page into :class:`~fetcher.models.ListingEntry` values (pure).

One reader for every server, driven by the markup around each ``<a href>``:
the link's row is its ``<tr>`` (Apache HTMLTable, lighttpd, nginx fancyindex,
Caddy), its ``<li>`` (Apache plain, Python ``http.server``) or its line inside
a ``<pre>`` (nginx autoindex, Apache FancyIndexing, IIS with ``<br>``).  Sizes
and dates in that row are read by :mod:`fetcher.listing_formats`; anything
else (a hand-made page) still gives its links, without metadata.

Hrefs keep the server's bytes: servers percent-encode names as UTF-8, but a
raw byte in an href (a Latin-1 page) must reach the server unchanged, so a
page that is not clean UTF-8 is read one character per byte (Latin-1) and
only display names are decoded with the page's charset.  lxml is used
directly: BeautifulSoup took ~1 s just to build the tree of a 50,000-entry
page, lxml ~0.1 s.

A page exactly as nginx's autoindex prints it (the commonest mirror listing) is
read line by line without building a tree, ~4x faster; anything the fast reader
does not recognise in full (another server, a hand-edited page, an odd name)
goes to the general reader, which gives the same entries for it.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import msgspec

from fetcher.listing_formats import DateFinder, FoundDate, Row, read_row, size_token
from fetcher.models import ListingEntry

if TYPE_CHECKING:
    import lxml.etree as etree  # type: ignore[import-untyped,unused-ignore]

__all__ = ["parse_listing", "read_listing"]

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w.:+-]+)""", re.I)
_XML_ENCODING = re.compile(rb"""<\?xml[^>]+encoding\s*=\s*["']([\w.:+-]+)""", re.I)
_WESTERN = {"ascii", "iso8859-1", "cp1252", "iso8859-15"}
_NOT_PAGE_CHARSETS = {
    "undefined", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "utf-7", "charmap",
}  # fmt: skip
_GB = {"gb2312", "gbk", "cp936"}  # WHATWG reads them all as GB18030, a superset
_URL_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # printable ASCII stays as written
_NEEDS_QUOTE = re.compile(r"[^\x21-\x7e]")
_C0_SPACE = "".join(map(chr, range(0x21)))
_SIMPLE_HREF = re.compile(r"[^:/?#\\.][^:?#\\]*")  # a plain relative path: no urljoin needed
_TRUNCATED = ("..>", "...", "\u2026")


def parse_listing(body: bytes, page_url: str) -> list[ListingEntry]:
    """Every child link of a listing page, in page order, one entry per URL.

    Honours the first ``<base href>``.  Drops sort links (anything with a
    query), the parent, the page itself, other hosts and schemes.  URLs keep
    the href's bytes (non-ASCII percent-encoded); a name is the link's text
    without a trailing '/', or the URL's last segment, decoded, when the text
    is empty or cut short ("..>").  Never raises on malformed input::

        >>> page = b'<pre><a href="../">../</a>\\n<a href="a%20b">a b</a> 25-Nov-2026 14:02 1234\\n'
        >>> parse_listing(page, "http://mirror.test/pub/")
        [ListingEntry(url='http://mirror.test/pub/a%20b', name='a b', is_dir=False, \
size=1234, size_exact=True, date='25-Nov-2026 14:02', mtime=1795615320.0)]
    """
    return read_listing(body, page_url)[0]


def read_listing(body: bytes, page_url: str) -> tuple[list[ListingEntry], str | None]:
    """:func:`parse_listing`'s entries, and why they may not be all the page holds (None
    when it was read whole): the HTML parser stops at a depth of nested elements (2048),
    which a page with an unclosed ``<font>`` or ``<div>`` on each row reaches after as
    many rows, and gives the part before as if it were all. The crawl cannot take such a
    page for the directory's contents (--delete would remove the rest).

    A page for the HTML parser with more than :data:`MAX_LINKS` links is not read at
    all (and says so)."""
    page = _Page.of(page_url)
    if page is None:
        return [], None
    if body.startswith(_NGINX_START):
        fast = _nginx_page(body, page, page_url)
        if fast is not None:
            return fast, None
    return _read_tree_whole(body, page, page_url)


def _read_tree(body: bytes, page: _Page, page_url: str) -> list[ListingEntry]:
    """The general reader: the page as an HTML tree, each link read with its row."""
    return _read_tree_whole(body, page, page_url)[0]


def _read_tree_whole(
    body: bytes, page: _Page, page_url: str
) -> tuple[list[ListingEntry], str | None]:
    """:func:`_read_tree`, and why the tree is not the whole page (None when it is)."""
    links = sum(1 for _ in itertools.islice(_LINK.finditer(body), MAX_LINKS + 1))
    if links > MAX_LINKS:
        return [], f"more than {MAX_LINKS:,} links, the most fetch reads from one page"
    text, charset = _decode(body)
    root, cut = _parse_html(text, raw=charset is not None)
    if root is None:
        return [], cut
    reader = _Reader(page, charset, page_url)
    for base in root.iter("base"):
        href = base.get("href")
        if href is not None:
            reader.rebase(str(href))
            break
    found: dict[str, _Found] = {}
    for a in _links(root):
        item = reader.read(a)
        if item is None:
            continue
        if item.url in found:
            found[item.url].merge(item)
        else:
            found[item.url] = item
    return [item.entry() for item in found.values()], cut


# The sort links of Apache's FancyIndexing and of nginx's fancyindex: "?C=N;O=D", "?C=M&O=A".
_SORT_LINK = re.compile(r"\?C=[NMSD][;&]O=[AD]")


def _links(root: etree._Element) -> Iterator[etree._Element]:
    """The page's links; on a page Apache or nginx's fancyindex made, its listing's only.

    Both put a directory's README around the ``<pre>`` or ``<table>`` of its listing
    (Apache's ``HeaderName`` and ``ReadmeName``, on by default in Debian's config;
    fancyindex's ``fancyindex_header`` and ``_footer``), and its links ("the ChangeLog",
    "old releases", "/status.html") are not entries: taken for ones, they were files
    fetched into a 404 on every run, and directories made in DEST with a listing error.
    Their listing is the ``<pre>`` or ``<table>`` that holds the sort links and, as they
    print it, an ``<hr>`` under them (Apache) or a ``<thead>`` (fancyindex); a hand-made
    page's sort links say nothing of where its other links are.
    """
    boxes: list[etree._Element] = []
    for a in root.iter("a"):
        if not _SORT_LINK.fullmatch(str(a.get("href") or "").strip()):
            continue
        box = next(a.iterancestors("pre", "table"), None)
        if box is None or box in boxes or next(box.iter("hr", "thead"), None) is None:
            continue
        boxes.append(box)
    if not boxes:
        yield from root.iter("a")
        return
    for box in boxes:
        if not any(outer in boxes for outer in box.iterancestors("pre", "table")):
            yield from box.iter("a")


# nginx's autoindex, as ngx_http_autoindex_module prints it (HTML, exact or rounded
# sizes, UTC or local dates): a head, one line per entry, a tail, nothing else.
_NGINX_START = b"<html>\r\n<head><title>Index of "

MAX_LINKS = 500_000
"""The most links a page read by the HTML parser may have. The parser costs ~1.1 KB of
memory a link (1,000,000 links of a 31 MiB page: 1.1 GB and 12 s), so a hostile page of
tiny links under the 64 MiB cap took ~2.5 GB, and each crawl connection may read one; a
real listing that fits the cap has fewer (Apache's rows are ~250 bytes). nginx's own
pages are read without the parser (~0.4 KB a link) and are not counted."""
_LINK = re.compile(rb"<a[\s>/]", re.IGNORECASE)
_NGINX_HEAD = re.compile(
    r"<html>\r\n<head><title>Index of [^<>\r\n]*</title></head>\r\n<body>\r\n"
    r"<h1>Index of [^<>\r\n]*</h1><hr><pre><a href=\"\.\./\">\.\./</a>\r\n"
)
_NGINX_TAIL = "</pre><hr></body>\r\n</html>\r\n"
# href: printable ASCII but '"&<> (as nginx escapes it, so already clean for _resolve);
# label: text with nginx's four entities. (Possessive: 3x faster, nothing to backtrack.)
_NGINX_LINE = re.compile(
    r'<a href="([!#-%\'-;=?-~]+)">((?:[^\x00-\x1f\x7f<>&"]++|&(?:amp|lt|gt|quot);)*+)</a>'
    r" ++(\d\d-[A-Z][a-z][a-z]-\d{4} \d\d:\d\d) ++(-|\d{1,18}[KMGTP]?)"
)
_NGINX_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"'}
_ENTITY = re.compile(r"&(?:amp|lt|gt|quot);")


def _nginx_page(body: bytes, page: _Page, page_url: str) -> list[ListingEntry] | None:
    """The entries of an nginx autoindex page, or None if this is not exactly one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    head = _NGINX_HEAD.match(text)
    if head is None or not text.endswith(_NGINX_TAIL):
        return None
    lines = text[head.end() : len(text) - len(_NGINX_TAIL)].split("\r\n")
    if lines.pop() != "":
        return None  # (the last entry line ends with CRLF too)
    reader = _Reader(page, None, page_url)
    dates: dict[str, FoundDate | None] = {}
    found: dict[str, _Found] = {}
    line = _NGINX_LINE.fullmatch
    for raw in lines:
        m = line(raw)
        if m is None:
            return None
        href, label, stamp, size = m.groups()
        url = reader.resolve(href)
        if url is None:
            continue
        if "&" in label:
            label = _ENTITY.sub(lambda e: _NGINX_ENTITIES[e.group()], label)
        if stamp in dates:
            date = dates[stamp]
        else:
            date = dates[stamp] = reader.dates.find(stamp, anchored=True)
        if date is None:
            return None
        number, exact, dash = size_token(size)
        item = reader.item(url, label, Row(number, exact, date.text, date.mtime, dash=dash))
        if url in found:
            found[url].merge(item)
        else:
            found[url] = item
    return [item.entry() for item in found.values()]


def _decode(body: bytes) -> tuple[str, str | None]:
    """The page as text, and ``None`` if it is clean UTF-8, else the charset for names.

    A non-None charset means the text holds one character per byte.  ``""``
    stands for "not declared": names then try UTF-8 and fall back to cp1252.
    """
    declared = None
    if body.startswith(codecs.BOM_UTF8):
        body, declared = body[3:], "utf-8"
    elif body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        body, declared = body.decode("utf-16", "replace").encode("utf-8", "replace"), "utf-8"
    # lxml refuses NUL.  Dropping it would turn the href "a\0b" into "ab", another
    # file's name; as "%00" it stays the unsafe name it is, and is reported as such.
    body = body.replace(b"\0", b"%00")
    if declared is None:
        head = body[:4096]
        m = _META_CHARSET.search(head) or _XML_ENCODING.search(head)
        declared = _charset(m.group(1).decode("ascii")) if m else None
    if declared in (None, "utf-8") or declared in _WESTERN:
        try:
            return body.decode("utf-8"), None
        except UnicodeDecodeError:
            pass
    if declared in _WESTERN:
        declared = "cp1252"
    return body.decode("latin-1"), declared if declared not in (None, "utf-8") else ""


def _charset(label: str) -> str | None:
    try:
        info = codecs.lookup(label)
    except LookupError:
        return None
    name = info.name
    if not getattr(info, "_is_text_encoding", True) or name in _NOT_PAGE_CHARSETS:
        return None  # <meta charset="rot13"> and friends: not a page's charset
    if name.startswith("utf-16"):
        return "utf-8"  # a meta tag cannot really mean UTF-16 (HTML spec)
    return "gb18030" if name in _GB else name


def _parse_html(text: str, raw: bool) -> tuple[etree._Element | None, str | None]:
    """The page's tree, and why it is not the whole page (None when it is)."""
    # imported here, not with the module: a run whose pages are all nginx's own
    # (the fast reader's) never needs it, and the import is ~8 ms of start-up
    import lxml.etree as etree  # type: ignore[import-untyped,unused-ignore]

    # huge_tree: libxml2 stops at 256 levels of nested elements without it, 2048 with it
    options = {
        "recover": True,
        "no_network": True,
        "remove_comments": True,
        "remove_pis": True,
        "huge_tree": True,
    }
    try:
        parser = etree.HTMLParser(**options)
        return etree.fromstring(text, parser), _cut(parser)
    except ValueError:  # lxml refuses a str that carries an XML encoding declaration
        pass
    except etree.LxmlError:
        return None, None
    encoding = "iso-8859-1" if raw else "utf-8"
    try:
        data = text.encode(encoding)
        parser = etree.HTMLParser(encoding=encoding, **options)
        return etree.fromstring(data, parser), _cut(parser)
    except (ValueError, etree.LxmlError):
        return None, None


def _cut(parser: etree.HTMLParser) -> str | None:
    """Why ``parser`` stopped before the end of the page: a limit of its own ("Excessive
    depth in document: 2048"), after which it returns the part before as if it were all."""
    for error in parser.error_log:
        if error.type_name == "ERR_RESOURCE_LIMIT":
            return str(error.message).split(",")[0].strip()  # (not "use XML_PARSE_HUGE")
    return None


def _decode_bytes(raw: bytes, charsets: tuple[str, ...]) -> str:
    for charset in charsets[:-1]:
        try:
            return raw.decode(charset)
        except UnicodeDecodeError:
            pass
    return raw.decode(charsets[-1], "replace")


class _Page(msgspec.Struct, frozen=True):
    """Where the page is, and what counts as below it."""

    prefix: str
    """``scheme://netloc`` of the page; every returned URL starts with it."""
    origin: tuple[str, str, int]
    dir_path: str
    dir_bytes: bytes
    path_bytes: bytes

    @staticmethod
    def of(url: str) -> _Page | None:
        try:
            parts = urlsplit(url)
            origin = _origin(parts.scheme, parts.hostname, parts.port)
        except ValueError:
            return None
        if origin is None:
            return None
        path = parts.path or "/"
        dir_path = path[: path.rfind("/") + 1]
        return _Page(
            f"{origin[0]}://{parts.netloc}",
            origin,
            dir_path,
            unquote_to_bytes(dir_path),
            unquote_to_bytes(path),
        )

    def child(self, url: str) -> str | None:
        """``url`` normalised onto the page's origin when it lies strictly below the page."""
        try:
            parts = urlsplit(url)
            if _origin(parts.scheme, parts.hostname, parts.port) != self.origin:
                return None
        except ValueError:
            return None
        path = unquote_to_bytes(parts.path)
        if not path.startswith(self.dir_bytes) or path == self.path_bytes:
            return None
        segments = path[len(self.dir_bytes) :].split(b"/")
        if segments[-1] == b"":
            segments.pop()
        if not segments or any(s in (b"", b".", b"..") for s in segments):
            return None
        return self.prefix + parts.path


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int] | None:
    scheme = scheme.lower()
    if scheme not in ("http", "https") or not host:
        return None
    return scheme, host.lower(), port or (443 if scheme == "https" else 80)


class _Found(msgspec.Struct):
    """One link while the page is read; duplicates merge into the first."""

    url: str
    name: str
    named: bool
    """``name`` is the link's text, not derived from the URL."""
    is_dir: bool
    size: int | None = None
    size_exact: bool = False
    date: str | None = None
    mtime: float | None = None

    def merge(self, other: _Found) -> None:
        if other.named and not self.named:
            self.name, self.named = other.name, True
        self.is_dir = self.is_dir or other.is_dir
        if other.size is not None and (self.size is None or other.size_exact > self.size_exact):
            self.size, self.size_exact = other.size, other.size_exact
        if self.date is None and other.date is not None:
            self.date, self.mtime = other.date, other.mtime

    def entry(self) -> ListingEntry:
        size, exact = (None, False) if self.is_dir else (self.size, self.size_exact)
        return ListingEntry(self.url, self.name, self.is_dir, size, exact, self.date, self.mtime)


class _Reader:
    """Turns ``<a>`` elements of one page into :class:`_Found` items."""

    def __init__(self, page: _Page, charset: str | None, page_url: str) -> None:
        self.page = page
        self.raw = charset is not None
        self.text_charsets = (charset,) if charset else ("utf-8", "cp1252")
        self.url_charsets = ("utf-8", charset or "cp1252")
        self.dates = DateFinder()
        self.base = page_url
        self.fast_prefix: str | None = None
        self.rebase("")
        # Several links in one <tr>: the first owns the row's size and date.
        self.row: etree._Element | None = None
        self.row_url = ""

    def rebase(self, href: str) -> None:
        """Resolve links against ``<base href>`` from now on."""
        try:
            self.base = urljoin(self.base, self._clean(href)).partition("#")[0]
        except ValueError:
            pass
        # Links in the page's own directory are joined by concatenation (fast).
        here = self.page.prefix + self.page.dir_path
        self.fast_prefix = here if self.base == here else None

    def _join(self, href: str) -> str | None:
        return self.resolve(self._clean(href))

    def resolve(self, href: str) -> str | None:
        """The URL of a cleaned href (see ``_clean``) below the page, else None."""
        if not href or href[0] == "#" or "?" in href or "\\" in href:
            return None
        if (
            self.fast_prefix is not None
            and _SIMPLE_HREF.fullmatch(href)
            and "/." not in href
            and "//" not in href
            and "%2e" not in href.lower()
        ):
            return self.fast_prefix + href
        try:
            url = urljoin(self.base, href)
        except ValueError:
            return None
        return self.page.child(url.partition("#")[0])

    def _clean(self, href: str) -> str:
        href = href.strip(_C0_SPACE)
        if "\t" in href or "\n" in href or "\r" in href:
            href = href.replace("\t", "").replace("\n", "").replace("\r", "")
        if not _NEEDS_QUOTE.search(href):
            return href
        if not self.raw:
            return quote(href, safe=_URL_SAFE, encoding="utf-8")
        # One char per byte, except what entities produced beyond Latin-1: UTF-8 for those.
        href = re.sub(r"[^\x00-\xff]+", lambda m: quote(m.group(), safe=""), href)
        return quote(href, safe=_URL_SAFE, encoding="latin-1")

    def _text(self, text: str) -> str:
        text = " ".join(text.split())
        if not self.raw or text.isascii():
            return text
        try:
            return _decode_bytes(text.encode("latin-1"), self.text_charsets)
        except UnicodeEncodeError:
            return text  # characters from entities: already text

    def read(self, a: etree._Element) -> _Found | None:
        href = a.get("href")
        url = None if href is None else self._join(str(href))
        if url is None:
            return None
        tr, row = read_row(a, self.dates)
        if tr is not None:
            if tr is not self.row:
                self.row, self.row_url = tr, url
            elif url != self.row_url:
                row = Row()
        return self.item(url, "".join(a.itertext()), row)

    def item(self, url: str, label: str, row: Row) -> _Found:
        """The entry of a link to ``url`` whose text is ``label``, in a row that says ``row``."""
        text = self._text(label)
        named = bool(text) and not text.endswith(_TRUNCATED)
        if named:
            name = text[:-1] if text.endswith("/") and len(text) > 1 else text
        else:
            segment = url.rstrip("/").rsplit("/", 1)[-1]
            name = _decode_bytes(unquote_to_bytes(segment), self.url_charsets)
        is_dir = url.endswith("/") or row.dir_mark or (row.dash and text.endswith("/"))
        return _Found(url, name, named, is_dir, row.size, row.size_exact, row.date, row.mtime)
