"""How directory listings lay out a row, and print sizes and dates in it (pure).

A link's row is its ``<tr>`` (Apache HTMLTable, lighttpd, nginx fancyindex,
Caddy: one cell each), else its line: the text up to the next newline or
``<br>``, after the link (nginx autoindex, Apache FancyIndexing ``<pre>``)
or before it (IIS).  Directories show as a trailing '/', an ``[DIR]`` icon,
``<dir>`` (IIS) or a '-' for a size.

Sizes, with their precision::

    12345, 1,234, 0 B, 1000 B     exact bytes (nginx, fancyindex, IIS, Caddy, Apache < 1K)
    2.4K, 121K, 3M                rounded (Apache, lighttpd, nginx autoindex_exact_size off)
    2.4 KiB, 3.3 MiB, 4 KB        rounded (fancyindex_exact_size off, Caddy); K is 1024

Dates, as printed (the timezone is whatever the server used, read here as UTC)::

    25-Nov-2026 14:02             nginx autoindex, Apache 2.2
    2026-11-25 14:02              Apache 2.4, fancyindex "%Y-%m-%d %H:%M", ISO 8601 with T/Z
    2026-Nov-25 14:02:03          lighttpd, fancyindex default
    Wednesday, November 25, 2026 2:02 PM    IIS (long date); "November 25, 2026" too
    11/25/2026 2:02 PM            IIS (short date), Caddy ("... 02:02:03 PM +00:00")
    Wed, 25 Nov 2026 14:02:03 GMT RFC 1123, "25 Nov 2026 14:02"
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # the elements come from fetcher.listing, which imports lxml when needed
    import lxml.etree as etree  # type: ignore[import-untyped,unused-ignore]

__all__ = [
    "DateFinder",
    "FoundDate",
    "Row",
    "parse_date",
    "parse_iso_date",
    "parse_size",
    "read_row",
    "size_token",
]

_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
# Digits are bounded: int() refuses strings of thousands of digits.
_SIZE = r"(\d{1,3}(?:,\d{3})+|\d{1,20}(?:\.\d{1,6})?) ?(?:([kmgtpe])(?:i?b)?|(b|bytes?))?"
_SIZE_FULL = re.compile(_SIZE, re.ASCII | re.IGNORECASE)
_SIZE_LEAD = re.compile(rf"{_SIZE}(?!\S)", re.ASCII | re.IGNORECASE)


def _size(m: re.Match[str]) -> tuple[int, bool] | None:
    number, unit, _byte_word = m.groups()
    number = number.replace(",", "")
    if unit is None:
        # "3.2" with no unit is a version, not a size; "3.2 bytes" is nonsense.
        return None if "." in number else (int(number), True)
    return round(float(number) * 1024 ** _POWERS[unit.lower()]), False


def parse_size(text: str) -> tuple[int, bool] | None:
    """``(bytes, exact)`` when all of ``text`` is a size, else ``None``.

    >>> parse_size("12345"), parse_size("2.4K"), parse_size("1.0 KiB"), parse_size("-")
    ((12345, True), (2458, False), (1024, False), None)
    """
    m = _SIZE_FULL.fullmatch(" ".join(text.split()))
    return _size(m) if m else None


def size_token(token: str) -> tuple[int | None, bool, bool]:
    """``(bytes, exact, dash)`` of a size column's one token, as a line's row reads it.

    >>> size_token("27702"), size_token("12K"), size_token("-")
    ((27702, True, False), (12288, False, False), (None, False, True))
    """
    if token.isdigit() and token.isascii() and len(token) <= 20:
        return int(token), True, False
    m = _SIZE_LEAD.match(token)
    number, exact = (_size(m) if m else None) or (None, False)
    return number, exact, token.lower() in _DASHES


_MONTH_NAMES = (
    "january february march april may june july august september october november december"
)
_MONTHS = {
    name: number
    for number, full in enumerate(_MONTH_NAMES.split(), start=1)
    for name in (full, full[:3])
} | {"sept": 9}

_T = r"(?P<H>\d{1,2}):(?P<M>\d{2})(?::(?P<S>\d{2}))?"
_Z = r"(?P<z>Z|GMT|UTC|[+-]\d{2}:?\d{2})"
_DATES = [
    re.compile(r"(?<!\d)" + p + r"(?![\d:])", re.ASCII | re.IGNORECASE)
    for p in (
        rf"(?P<y>\d{{4}})-(?P<m>\d{{2}})-(?P<d>\d{{2}})(?:[T ]{_T}(?:\.\d+)?(?: ?{_Z})?)?",
        rf"(?P<d>\d{{1,2}})-(?P<b>[a-z]{{3}})-(?P<y>\d{{4}})[ :]{_T}",
        rf"(?P<y>\d{{4}})-(?P<b>[a-z]{{3}})-(?P<d>\d{{1,2}}) {_T}",
        rf"(?:[a-z]+, )?(?P<b>[a-z]{{3,9}}) (?P<d>\d{{1,2}}), (?P<y>\d{{4}})"
        rf"(?: {_T}(?: ?(?P<p>[ap]m))?)?",
        rf"(?P<m>\d{{1,2}})/(?P<d>\d{{1,2}})/(?P<y>\d{{4}})"
        rf"(?: {_T}(?: ?(?P<p>[ap]m))?(?: {_Z})?)?",
        rf"(?:[a-z]{{3}}, )?(?P<d>\d{{1,2}}) (?P<b>[a-z]{{3}}) (?P<y>\d{{4}})(?: {_T}(?: {_Z})?)?",
    )
]


class FoundDate(NamedTuple):
    text: str
    """As printed, whitespace-normalised."""
    mtime: float | None
    """UTC epoch seconds; ``None`` when the fields are out of range."""
    start: int
    end: int


def _month(g: dict[str, Any]) -> int | None:
    if g.get("m"):
        return int(g["m"])
    return _MONTHS.get((g.get("b") or "").lower())


_UNSET = object()


def _epoch(g: dict[str, Any], month: int, days: dict[Any, Any]) -> float | None:
    """UTC epoch seconds of the matched fields; ``days`` caches each day's midnight."""
    hour = int(g["H"] or 0)
    if g.get("p"):
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if g["p"].lower() == "pm" else 0)
    minute, second = int(g["M"] or 0), int(g["S"] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    zone = (g.get("z") or "Z").upper()
    if zone not in ("Z", "GMT", "UTC"):  # rare: the exact arithmetic, range checks and all
        try:
            when = datetime(int(g["y"]), month, int(g["d"]), hour, minute, second, tzinfo=UTC)
            sign = -1 if zone[0] == "-" else 1
            when -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[-2:]))
        except (ValueError, OverflowError):
            return None
        return when.timestamp()
    # A page prints many times of a few days: each day's midnight is worked out once.
    key = (g["y"], month, g["d"])
    midnight = days.get(key, _UNSET)
    if midnight is _UNSET:
        try:
            midnight = datetime(int(g["y"]), month, int(g["d"]), tzinfo=UTC).timestamp()
        except ValueError:
            midnight = None
        if len(days) < 4096:
            days[key] = midnight
    if midnight is None:
        return None
    return float(midnight + hour * 3600 + minute * 60 + second)


class DateFinder:
    """Finds the first date in a row of text.

    One page prints every date the same way, so the format that matched last
    is tried first; make one finder per page.
    """

    __slots__ = ("_days", "_order")

    def __init__(self) -> None:
        self._order = list(range(len(_DATES)))
        self._days: dict[Any, Any] = {}

    def find(self, text: str, anchored: bool = False) -> FoundDate | None:
        """The first date in whitespace-normalised ``text`` (at its start, if ``anchored``)."""
        for i in self._order:
            pattern = _DATES[i]
            for m in (pattern.match(text),) if anchored else pattern.finditer(text):
                if m is None:
                    continue
                g = m.groupdict()
                month = _month(g)
                if month is None:
                    continue
                if i != self._order[0]:
                    self._order.remove(i)
                    self._order.insert(0, i)
                return FoundDate(m.group(), _epoch(g, month, self._days), m.start(), m.end())
        return None


def parse_date(text: str) -> float | None:
    """UTC epoch seconds of a listing date (whole ``text``), ``None`` if not one.

    >>> parse_date("25-Nov-2026 14:02"), parse_date("Wednesday, November 25, 2026 2:02 PM")
    (1795615320.0, 1795615320.0)
    """
    text = " ".join(text.split())
    found = DateFinder().find(text)
    if found is None or (found.start, found.end) != (0, len(text)):
        return None
    return found.mtime


def parse_iso_date(text: str) -> float | None:
    """A machine-readable timestamp (``<time datetime=...>``, Caddy) as UTC epoch seconds."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError):
        return None


class Row(NamedTuple):
    """What a link's row says about it."""

    size: int | None = None
    size_exact: bool = False
    date: str | None = None
    mtime: float | None = None
    dir_mark: bool = False
    """An ``[DIR]`` icon, ``<dir>`` (IIS) or a "Directory" type column."""
    dash: bool = False
    """The size column shows '-' (directories in nginx, Apache, lighttpd)."""


_DASHES = {"-", "\u2014", "\u2013"}
_DIR_WORDS = {"<dir>", "directory"}
_ROW_STOP = {"table", "tbody", "thead", "pre", "ul", "ol", "body", "html"}
_SIZE_ATTRS = ("data-size", "data-order", "data-value")  # Caddy: data-order="2500"


def read_row(a: etree._Element, dates: DateFinder) -> tuple[etree._Element | None, Row]:
    """The ``<tr>`` holding the link ``a`` (``None`` for a line), and what it says."""
    child, parent = a, a.getparent()
    for _ in range(10):
        if parent is None or parent.tag in _ROW_STOP or parent.tag == "li":
            break
        if parent.tag == "tr":
            return parent, _table_row(parent, child, dates)
        child, parent = parent, parent.getparent()
    return None, _line_row(a, dates)


def _is_dir_icon(img: etree._Element) -> bool:
    return str(img.get("alt") or "").strip().strip("[]").strip().upper() == "DIR"


def _table_row(tr: etree._Element, link_cell: etree._Element, dates: DateFinder) -> Row:
    size: tuple[int, bool] | None = None
    date: str | None = None
    mtime: float | None = None
    dash = False
    dir_mark = any(_is_dir_icon(img) for img in tr.iter("img"))
    for cell in tr:
        if cell is link_cell or not isinstance(cell.tag, str):
            continue
        text = " ".join("".join(cell.itertext()).split())
        if date is None:
            for stamp in cell.iter("time"):  # Caddy: <time datetime="2026-11-25T14:02:03Z">
                mtime = parse_iso_date(str(stamp.get("datetime") or ""))
                if mtime is not None:
                    date, text = text or str(stamp.get("datetime")).strip(), ""
                    break
            found = dates.find(text) if text else None
            if found is not None:
                date, mtime = found.text, found.mtime
                text = (text[: found.start] + text[found.end :]).strip()
        if not text:
            continue
        if size is None and (size := parse_size(text)) is not None:
            exact = _size_attr(cell)
            if exact is not None:
                size = (exact, True)
        dash = dash or text in _DASHES
        dir_mark = dir_mark or text.lower() in _DIR_WORDS
    # A number in a row without a date is more likely a count than a size.
    number, exact = size if size is not None and date is not None else (None, False)
    return Row(number, exact, date, mtime, dir_mark, dash)


def _size_attr(cell: etree._Element) -> int | None:
    for attr in _SIZE_ATTRS:
        value = str(cell.get(attr) or "")
        if value.isascii() and value.isdigit() and len(value) < 20:
            return int(value)
    return None


def _line_row(a: etree._Element, dates: DateFinder) -> Row:
    prev = a.getprevious()
    dir_mark = (bool(len(a)) and any(_is_dir_icon(img) for img in a.iter("img"))) or (
        prev is not None
        and prev.tag == "img"
        and "\n" not in (prev.tail or "")
        and _is_dir_icon(prev)
    )
    # "date size" follows the link (nginx, Apache) or, on IIS, fills the line before it.
    segments = [(a.tail or "").split("\n", 1)[0]]
    if prev is None or prev.tag == "br":
        parent = a.getparent()
        before = prev.tail if prev is not None else (parent.text if parent is not None else "")
        segments.append((before or "").rsplit("\n", 1)[-1])
    for segment in segments:
        text = " ".join(segment.split())
        found = dates.find(text, anchored=True) if text else None
        if found is None:
            continue
        rest = text[found.end :].lstrip()
        lead = rest.split(" ", 1)[0].lower()
        m = _SIZE_LEAD.match(rest)
        number, exact = (_size(m) if m else None) or (None, False)
        dir_mark = dir_mark or lead in _DIR_WORDS
        return Row(number, exact, found.text, found.mtime, dir_mark, lead in _DASHES)
    return Row(dir_mark=dir_mark)
