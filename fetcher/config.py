"""Configuration values: one :class:`MirrorJob` per mirror, built from TOML or the CLI.

Both sources go through :func:`build_job`, so a bad value reads the same way
wherever it came from and always names its key::

    mirrors.toml: jobs.centos.threads: expected an integer from 1 to 1024, got "eight"
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import ipaddress
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import msgspec
from msgspec.structs import fields

from fetcher import __version__
from fetcher.errors import ConfigError
from fetcher.models import STATE_DIR

__all__ = ["DEPENDENT", "MirrorJob", "Transfer", "build_job", "default_dest", "load_config"]

USER_AGENT = f"fetch/{__version__} (+https://pypi.org/project/fetcher/)"


_SECRET = ("proxy", "headers", "auth")  # a job's or a transfer's repr leaves them out


def _shown(self: msgspec.Struct) -> list[tuple[str, Any]]:
    return [(k, getattr(self, k)) for k in self.__struct_fields__ if k not in _SECRET]


def _repr(self: msgspec.Struct) -> str:
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in _shown(self))})"


class Transfer(msgspec.Struct, frozen=True):
    """What a worker needs to fetch files; small, frozen and picklable."""

    dest: str
    root: str
    threads: int = 2
    retries: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retry_after_cap: float = 120.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    user_agent: str = USER_AGENT
    verify: bool | str = True
    aliases: tuple[str, ...] = ()
    limit_rate: float | None = None
    """Bytes per second for the runner's own limits (a Dask task); local workers share one bucket."""
    min_rate: float | None = None
    """``--min-rate``: a body slower than this many bytes a second over ``min_rate_time``
    seconds fails (:class:`fetcher.limits.Pace`); None: no floor."""
    min_rate_time: float = 30.0
    http2: bool = False
    proxy: str | None = None
    """The HTTP proxy every request goes through (resolved: :func:`proxy_for`), or None."""
    headers: tuple[tuple[str, str], ...] = ()
    """``--header``s, sent with every request."""
    segments: int = 1
    """``--segments``: a big file's byte ranges fetched at once over this many connections."""
    auth: tuple[str, str] | None = None
    """User and password from the start URL (``https://user:pass@host/``), sent as HTTP Basic
    auth with every request; the URLs themselves carry none (see :func:`build_job`)."""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    """The run's selection (``--include`` / ``--exclude``): a published index is checked
    against what DEST holds only for the files the selection takes."""
    pipeline: int = 8
    """Small-file requests in flight per download thread, and listings' per crawl connection
    (1: none pipelined); each gathered on as few connections as hold them (see
    :func:`fetcher.http1.pipelined_lanes`, :class:`fetcher.runner.ShardRunner`)."""

    __repr__ = _repr
    __rich_repr__ = _shown


class MirrorJob(msgspec.Struct, frozen=True):
    """One mirror to sync: every option of the CLI, resolved and validated."""

    url: str
    dest: Path
    name: str = "mirror"
    procs: int = 2
    threads: int = 4
    max_connections: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    depth: int = 64
    retries: int = 5
    timeout: float = 30.0
    connect_timeout: float = 10.0
    dry_run: bool = False
    delete: bool = False
    max_delete: float = 0.10
    """A fraction (< 1) of the files, or an absolute count (≥ 1)."""
    force: bool = False
    aliases: tuple[str, ...] = ()
    limit_rate: float | None = None
    listing_rate: float | None = None
    min_rate: float | None = None
    min_rate_time: float = 30.0
    ca_cert: Path | None = None
    insecure: bool = False
    http2: bool = False
    pipeline: int = 8
    executor: str = "local"
    scheduler: str | None = None
    post: tuple[Any, ...] = ()
    post_dest: Path | None = None
    post_jobs: int = msgspec.field(default_factory=lambda: os.cpu_count() or 2)
    retry_failed_post: bool = False
    """Try again the post-processing outputs that failed before on an unchanged input."""
    index: str = "html"
    verify_digests: bool = False
    max_listing_bytes: int = 64 << 20
    suites: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    skip_if_locked: bool = False
    """Another run still holds DEST's lock: log it and exit 0 instead of 3 (for timers)."""
    auth: tuple[str, str] | None = None
    """From the URL's ``user:password@``, which ``url`` no longer holds."""
    proxy: str | None = None
    """``--proxy``: a proxy URL, ``direct``, or None (the environment's, see :func:`proxy_for`)."""
    user_agent: str = USER_AGENT
    headers: tuple[tuple[str, str], ...] = ()
    """``--header Name: value``: sent with every request (values may be secrets: not shown)."""
    segments: int = 1

    __repr__ = _repr
    __rich_repr__ = _shown

    def derived_root(self) -> Path:
        """Where post-processing outputs go: ``post_dest``, else ``<dest>.derived`` beside DEST."""
        if self.post_dest is not None:
            return self.post_dest.absolute()
        dest = self.dest.absolute()
        if dest.name == "..":  # (else "...derived", inside DEST: refused)
            dest = dest.resolve()
        return dest.parent / f"{dest.name}.derived"

    def transfer(self) -> Transfer:
        verify: bool | str = True
        if self.insecure:
            verify = False
        elif self.ca_cert is not None:
            verify = str(self.ca_cert)
        return Transfer(
            dest=str(self.dest),
            root=self.url,
            threads=self.threads,
            retries=self.retries,
            connect_timeout=self.connect_timeout,
            read_timeout=self.timeout,
            verify=verify,
            aliases=self.aliases,
            limit_rate=self.limit_rate,
            min_rate=self.min_rate,
            min_rate_time=self.min_rate_time,
            http2=self.http2,
            pipeline=self.pipeline,
            auth=self.auth or netrc_auth(self.url),
            proxy=proxy_for(self.url, self.proxy),
            user_agent=self.user_agent,
            headers=self.headers,
            segments=self.segments,
            include=self.include,
            exclude=self.exclude,
        )


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_for(url: str, explicit: str | None = None) -> str | None:
    """The proxy for ``url``: ``explicit`` (``--proxy``; ``direct``: none), else the
    environment's (``https_proxy``, ``http_proxy``, ``all_proxy``, as curl and wget read
    them), unless ``no_proxy`` names the host or the host is a loopback address, which
    no proxy could reach (as Go's ProxyFromEnvironment decides)."""
    if explicit is not None:
        return None if explicit == "direct" else explicit
    parts = urlsplit(url)
    if _loopback(parts.hostname or "") or not any(
        v and k.lower().endswith("_proxy") for k, v in os.environ.items()
    ):
        return None  # (urllib.request, with http.client and email: 17 ms of start-up)
    import urllib.request

    env = urllib.request.getproxies_environment()
    key = parts.scheme if env.get(parts.scheme) else "all"
    proxy = env.get(key)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxy or bypass(parts.netloc.rpartition("@")[2], env):
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    try:  # as --proxy is: else a SOCKS proxy, say, fails every listing as an ImportError
        return _proxy_url(_url_str(proxy))
    except ValueError as exc:
        raise ConfigError(
            f"${_proxy_variable(key)}: {exc}", "unset it, or give --proxy URL or --proxy direct"
        ) from None


def _proxy_variable(key: str) -> str:
    """The variable ``key``'s proxy came from: ``http_proxy`` before ``HTTP_PROXY``, as
    urllib (and curl) read them."""
    name = f"{key}_proxy"
    if os.environ.get(name):
        return name
    return next((n for n, v in os.environ.items() if n.lower() == name and v), name)


def netrc_auth(url: str) -> tuple[str, str] | None:
    """The login and password for ``url``'s host in ``$NETRC`` or ``~/.netrc`` (as curl
    ``--netrc-optional`` and wget read it), or None: no file, no entry for the host.

    Raises :class:`ConfigError` for a file that cannot be read or parsed (Python's
    parser also refuses a ``~/.netrc`` with passwords that others can read).
    """
    import netrc

    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(url).hostname or "")
    except (OSError, netrc.NetrcParseError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:  # (netrc reads UTF-8, then the locale's encoding)
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if entry is None or not (entry[0] or entry[2]):
        return None
    login, _, password = entry
    return (login, password or "")


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``https://user:pass@host/x/`` → (``https://host/x/``, ("user", "pass")).

    Credentials travel in a header (:attr:`Transfer.auth`), never in a URL: so they are
    never printed in a summary or a log line, written to the state, a report or the
    metrics, or handed on in a redirect's ``Location``.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return parts._replace(netloc=hostport).geturl(), (unquote(user), unquote(password))


def default_dest(url: str) -> Path:
    """The URL's last path segment, as ``lftp mirror`` does (``.../Packages/`` → ``Packages``)."""
    # (dot segments resolved, RFC 3986 section 5.2.4: ``.../Packages/./`` is ``Packages``)
    segs = [s for s in posixpath.normpath(urlsplit(url).path or "/").split("/") if s]
    name = unquote(segs[-1]) if segs else (urlsplit(url).hostname or "mirror")
    if name in (".", "..") or "/" in name or "\0" in name:
        name = urlsplit(url).hostname or "mirror"
    return Path(name)


CONNECTIONS_PER_PROC = 4
"""By default, no more downloads than this share one interpreter lock."""


def default_procs(max_connections: int = 8) -> int:
    """One process per CPU, or more where that would put over 4 downloads in one; at most 4.

    A process's download threads take turns at the interpreter lock around every
    socket and file call; on small files, 16 connections as 4 processes of 4 beat
    2 processes of 8 even on 2 CPUs (benchmarks/RESULTS.md).
    """
    want = -(-max_connections // CONNECTIONS_PER_PROC)  # ceiling
    return max(1, min(4, max(os.cpu_count() or 1, want)))


# ---------------------------------------------------------------- validation

MAX_CONNECTIONS = 1024
"""The most connections (and processes, and threads per process) a run may ask for."""


def _int(lo: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"expected an integer ≥ {lo}, got {_show(v)}")
        return v

    return check


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}, got {_show(v)}")
        return v

    return check


def _float_range(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:  # (NaN too)
            raise ValueError(f"expected a number from {lo:g} to {hi:g}, got {_show(v)}")
        return float(v)

    return check


MAX_TIMEOUT = 86400.0
"""Seconds (a day). Beyond, the deadlines the sockets compute overflow the clock."""

MIN_RATE, MAX_RATE = 1.0, float(1 << 40)
"""``--limit-rate`` in bytes per second. Below a byte a second, the wait for the next
block overflows ``time.sleep`` (or lasts for weeks); above 1024G it is no limit."""


def _rate(v: Any) -> float:
    """``500k``, ``10M``, ``1.5G`` or a plain number of bytes per second."""
    n: float | None = None
    if isinstance(v, int | float) and not isinstance(v, bool):
        n = float(v)
    elif isinstance(v, str):
        s = v.strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        with contextlib.suppress(ValueError):
            n = float(s[:-1] if mult > 1 else s) * mult
    if n is None or not MIN_RATE <= n <= MAX_RATE:  # (NaN too)
        raise ValueError(
            "expected a rate like 500k, 10M or a number of bytes per second,"
            f" from 1 to 1024G, got {_show(v)}"
        )
    return n


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_show(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {_show(v)}")
    return v


def _path(v: Any) -> str:
    s = _str(v)
    if "\x00" in s:  # (no file name holds one: os calls raise ValueError on it)
        raise ValueError(f"expected a path without NUL characters, got {s!r}")
    return s


def _url(v: Any) -> str:
    s = _url_str(v)
    parts = _split_url(s)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {_show_url(v)}")
    _check_authority(s)
    return s


def _proxy(v: Any) -> str:
    s = _url_str(v)
    if s == "direct":
        return s
    return _proxy_url(s, "expected an http:// or https:// proxy URL, or direct")


def _proxy_url(s: str, expected: str = "expected an http:// or https:// proxy URL") -> str:
    parts = _split_url(s)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{expected}, got {_show_url(s)}")
    _check_authority(s)
    return s


def _split_url(s: str) -> SplitResult:
    """``urlsplit(s)``; where it refuses the URL itself (newer Pythons check a bracketed
    host: "Invalid IPv6 URL"), the error names what is wrong as on every Python."""
    try:
        return urlsplit(s)
    except ValueError:
        _check_authority(s)
        raise ValueError(f"invalid URL {_show_url(s)}") from None


def _check_authority(url: str) -> None:
    """The URL's host is one a connection can be made to, and its port a port.

    Checked here, not left to the first request: a host that cannot be (a space in it,
    an empty label, 256.1.1.1) would fail every listing and exit 1 as a network error.
    """
    # the authority as urlsplit finds it (after "//", up to a path, query or fragment),
    # taken by hand: urlsplit may refuse it before saying why
    rest = url.partition(":")[2]
    netloc = re.split(r"[/?#]", rest[2:], maxsplit=1)[0] if rest.startswith("//") else ""
    hostport = netloc.rpartition("@")[2]
    host, port = _split_port(hostport)
    if not _port_ok(port, required=False):
        raise ValueError(f"expected a port from 0 to 65535 in {_show_url(url)}")
    if not _valid_host(host):
        raise ValueError(f"invalid host {_show(host)} in {_show_url(url)}")


def _port_ok(port: str | None, required: bool) -> bool:
    """What :func:`_split_port` gave is a port (from 0 to 65535; none at all when not
    ``required``)."""
    if port is None or not re.fullmatch(r"[0-9]{1,5}" if required else r"[0-9]{0,5}", port):
        return False
    return int(port or 0) <= 65535


def _split_port(hostport: str) -> tuple[str, str | None]:
    """``host:port`` → (host, port text: "" when there is none); port None when what
    follows the host is not ``:`` and a port (``[::1]x``)."""
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        host += "]"
        if rest and not rest.startswith(":"):
            return host, None
        return host, rest[1:]
    host, _, port = hostport.partition(":")
    return host, port


# (an underscore is not a host name's, but DNS and /etc/hosts carry them, and curl takes them)
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _valid_host(host: str) -> bool:
    """A DNS name (IDNA-encodable, when not ASCII), an IPv4 dotted quad, or an IPv6
    literal in brackets: what a URL's host may be."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    name = host.removesuffix(".")  # (an absolute name)
    if re.fullmatch(r"[0-9]+", name.rpartition(".")[2]):  # numbers: an address, as browsers read it
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    if not name.isascii():
        import idna  # (httpx's dependency, and the encoding it uses)

        try:
            name = idna.encode(name.lower()).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return False
    labels = name.split(".")
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _url_str(v: Any) -> str:
    """``_str`` for a URL: a wrong value is shown without the user and password in it."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {_show_url(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line
        raise ValueError(f"expected a URL in UTF-8, got {_hide_userinfo(v)!a}") from None
    # (urlsplit would quietly drop tabs and line breaks)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise ValueError(f"expected a URL without control characters, got {_hide_userinfo(v)!a}")
    return v


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_OWN_HEADERS = {
    "host", "range", "if-range", "if-none-match", "if-modified-since", "accept-encoding",
    "content-length", "transfer-encoding", "connection", "keep-alive", "te", "upgrade",
    "expect", "proxy-authorization", "user-agent",
}  # fmt: skip
"""Set by fetch itself (framing, resumes, conditional requests); User-Agent has its option."""


def _headers(v: Any) -> tuple[tuple[str, str], ...]:
    """``["Name: value", ...]`` (or a TOML table ``{Name = "value"}``) → pairs."""
    if isinstance(v, dict):
        items = list(v.items())
    else:
        lines = _strs(v)
        bad = next((h for h in lines if ":" not in h), None)
        if bad is not None:  # (that one, not the list: a tuple's repr from the command line)
            raise ValueError(f"expected 'Name: value' headers, got {_show(bad)}")
        items = [h.partition(":")[::2] for h in lines]
    out = []
    for name, value in items:
        name = str(name).strip()
        value = value.strip() if isinstance(value, str) else value
        if not _TOKEN.fullmatch(name) or not isinstance(value, str):
            raise ValueError(f"expected 'Name: value' headers, got {_show(name)}")
        if name.lower() in _OWN_HEADERS:
            hint = " (use --user-agent)" if name.lower() == "user-agent" else ""
            raise ValueError(f"{name} is set by fetch itself{hint}")
        if not _one_line(value):
            raise ValueError(f"the value of {name} must be one line of Latin-1 text")
        out.append((name, value))
    return tuple(out)


def _one_line(s: str) -> bool:
    """Fit for a header value: Latin-1, no line breaks or NUL (no header injection)."""
    try:
        s.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(c in s for c in "\r\n\0")


def _user_agent(v: Any) -> str:
    s = _str(v)
    if not _one_line(s):
        raise ValueError("expected one line of Latin-1 text")
    return s


_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?"
)


def _hosts(v: Any) -> tuple[str, ...]:
    """``host`` or ``host:port`` each (an alias is a server, not a URL)."""
    out = _strs(v)
    for h in out:
        m = _HOST.fullmatch(h)
        if m is None or int(m.group(1) or 0) > 65535 or not _valid_host(_split_port(h)[0]):
            raise ValueError(
                f"expected HOST or HOST:PORT, such as mirror.example.org, got {_show(h)}"
            )
    return out


_SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss")
"""What a Dask Client reaches a scheduler in another process over (distributed.comm
registers these; inproc is one process's own, ucx is gone from distributed)."""


def _scheduler(v: Any) -> str:
    """``tcp://HOST:PORT`` (or tls, ws, wss; no scheme: tcp, as Dask reads it): checked
    here, as distributed would only say so after its 20 s connect timeout."""
    s = _str(v)
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "tcp", s
    host, port = _split_port(hostport)
    ok = (
        scheme in _SCHEDULER_SCHEMES
        and _port_ok(port, required=True)
        and int(port or 0) > 0
        and _valid_host(host)
    )
    if not ok:
        raise ValueError(f"expected tcp://HOST:PORT (or tls://, ws://, wss://), got {_show(v)}")
    return s


def _strs(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list | tuple):
        raise ValueError(f"expected a string or a list of strings, got {_show(v)}")
    for x in v:  # (the one at fault, not the list: a tuple's repr from the command line)
        if not isinstance(x, str) or not x:
            raise ValueError(f"expected a non-empty string or a list of them, got {_show(x)}")
    return tuple(v)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {_show(v)}")
        return str(v)

    return check


def _max_delete(v: Any) -> float:
    if isinstance(v, str) and v.endswith("%"):
        try:
            pct = float(v[:-1])
        except ValueError:
            pct = -1
        if 0 <= pct <= 100:
            return pct / 100 if pct < 100 else 1.0 - 1e-12
    if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf:
        return float(v)
    raise ValueError(f"expected a count like 500 or a percentage like '10%', got {_show(v)}")


def _show(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


_USERINFO = re.compile(r"//[^/?#]*@")
"""What :func:`split_credentials` takes out: all up to the authority's last ``@``."""


def _hide_userinfo(url: str) -> str:
    """``url`` without its ``user:password@``: a message is printed, logged and mailed.

    Textual, not :func:`split_credentials`: urlsplit cannot parse every URL a message
    is about (a broken ``[IPv6]``), and drops tabs and line breaks a message must show.
    """
    return _USERINFO.sub("//", url)


def _show_url(v: Any) -> str:
    """``_show`` for a URL (or whatever came in its place), without credentials."""
    return _show(_hide_userinfo(v)) if isinstance(v, str) else _hide_userinfo(repr(v))


PATH_KEYS = ("dest", "ca_cert", "post_dest")
"""Keys naming a file or directory: relative, they are the config file's directory's."""

_ONE_DIRECTORY = ("dest", "post_dest")
"""Overrides naming one job's own directory: for the jobs run (``--job``) only."""

_FIELDS: dict[str, Callable[[Any], Any]] = {
    "url": _url,
    "dest": _path,
    "procs": _int_range(1, MAX_CONNECTIONS),
    "threads": _int_range(1, MAX_CONNECTIONS),
    "max_connections": _int_range(1, MAX_CONNECTIONS),
    "include": _strs,
    "exclude": _strs,
    "depth": _int(0),
    "retries": _int(1),
    "timeout": _float_range(0.001, MAX_TIMEOUT),
    "connect_timeout": _float_range(0.001, MAX_TIMEOUT),
    "dry_run": _bool,
    "delete": _bool,
    "max_delete": _max_delete,
    "force": _bool,
    "aliases": _hosts,
    "proxy": _proxy,
    "headers": _headers,
    "user_agent": _user_agent,
    "limit_rate": _rate,
    "min_rate": _rate,
    "min_rate_time": _float_range(1, MAX_TIMEOUT),
    "listing_rate": _float_range(0.001, 10000),
    "ca_cert": _path,
    "insecure": _bool,
    "http2": _bool,
    "pipeline": _int_range(1, 32),
    "segments": _int_range(1, 16),
    "executor": _choice("local", "dask"),
    "scheduler": _scheduler,
    "post_dest": _path,
    "post_jobs": _int(1),
    "retry_failed_post": _bool,
    "index": _choice("auto", "html", "repodata", "debian"),
    "verify_digests": _bool,
    "skip_if_locked": _bool,
    "suites": _strs,
    "components": _strs,
    "architectures": _strs,
}

ALIASES = {"max-connections": "max_connections", "verify": "verify_digests"}


def build_job(
    values: Mapping[str, Any],
    where: str,
    *,
    base_dir: Path | None = None,
    name: str = "mirror",
    post_parser: Callable[[Any, str], Any] | None = None,
) -> MirrorJob:
    """Validate ``values`` (TOML keys, ``-`` or ``_``) into a :class:`MirrorJob`.

    ``where`` prefixes every message (``mirrors.toml: jobs.centos``);
    relative paths resolve against ``base_dir``.
    """
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key.replace("-", "_"))
        if key == "post":
            if post_parser is None:
                from fetcher.postrules import rule_from_mapping

                post_parser = rule_from_mapping
            if isinstance(value, tuple):  # rules already parsed (from the CLI)
                out["post"] = value
                continue
            if not isinstance(value, list):
                raise ConfigError(f"{where}.post: expected an array of tables ([[...post]])")
            out["post"] = tuple(post_parser(v, f"{where}.post[{i}]") for i, v in enumerate(value))
            continue
        check = _FIELDS.get(key)
        if check is None:
            raise ConfigError(f"{where}.{raw_key}: unknown key", _suggest(raw_key))
        try:
            v = check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}.{raw_key}: {exc}") from None
        if key in PATH_KEYS:
            try:
                p = Path(v).expanduser()
            except RuntimeError:  # "~name" of no such user, or "~" with no home at all
                user = str(v).split("/", 1)[0]
                raise ConfigError(f"{where}.{raw_key}: no home directory for {user}") from None
            v = (base_dir / p) if base_dir is not None and not p.is_absolute() else p
            if key == "ca_cert":
                _check_ca_file(v, f"{where}.{raw_key}")
        out[key] = v
    if "url" not in out:
        raise ConfigError(f"{where}: missing required key 'url'")
    out["url"], auth = split_credentials(out["url"])
    if auth is not None:
        out["auth"] = auth
        if any(n.lower() == "authorization" for n, _ in out.get("headers", ())):
            raise ConfigError(
                f"{where}.url: credentials in the URL and an Authorization header: give one"
            )
    out.setdefault(
        "dest",
        default_dest(out["url"]) if base_dir is None else base_dir / default_dest(out["url"]),
    )
    _check_dest(out["dest"], f"{where}.dest")
    out.setdefault("max_connections", 8)
    out.setdefault("procs", default_procs(out["max_connections"]))
    # rounded up: every connection gets a thread; the shared cap holds the total to N
    out.setdefault("threads", max(1, -(-out["max_connections"] // out["procs"])))
    if out.get("executor") == "dask" and not out.get("scheduler"):
        env = os.environ.get("DASK_SCHEDULER_ADDRESS")
        if env:
            try:
                out["scheduler"] = _scheduler(env)
            except ValueError as exc:
                raise ConfigError(f"$DASK_SCHEDULER_ADDRESS: {exc}") from None
    if out.get("executor") == "dask" and not out.get("dry_run"):
        _check_dask(out, where)
    if out.get("http2") and importlib.util.find_spec("h2") is None:
        # (else every request to a server that offers HTTP/2 fails, with ModuleNotFoundError)
        raise ConfigError(f"{where}.http2: needs the h2 package", "pip install 'fetcher[http2]'")
    known = {f.name for f in fields(MirrorJob)}
    return MirrorJob(name=name, **{k: v for k, v in out.items() if k in known})


def _check_dask(values: Mapping[str, Any], where: str) -> None:
    """A run on Dask has a scheduler to reach and ``distributed`` to reach it with: found
    out only as the executor was made, after DEST, its lock and its state were, and the
    jobs before it in a config file had run (``--check`` said the job was valid)."""
    if not values.get("scheduler"):
        raise ConfigError(
            f"{where}.scheduler: missing: a Dask run needs its scheduler, tcp://HOST:8786"
            " (or $DASK_SCHEDULER_ADDRESS)",
            "start one with 'dask scheduler --host HOST'",
        )
    if importlib.util.find_spec("distributed") is None:
        raise ConfigError(
            f"{where}.executor: dask needs Dask distributed, which is not installed",
            "pip install 'fetcher[dask]'",
        )


def _check_dest(dest: Path, where: str) -> None:
    """DEST is a directory of its own: not in a state directory (a run there would take
    a mirror's state and lock for files, and --delete them), nor inside another mirror
    (whose --delete would take this one's files for vanished ones and remove them)."""
    real = _real(dest)
    if STATE_DIR in real.parts:
        raise ConfigError(
            f"{where}: {real} lies in a state directory ({STATE_DIR}), which is fetch's own",
            "give the mirror's directory itself, or one outside it",
        )
    for parent in real.parents:
        try:
            mirror = (parent / STATE_DIR / "state.sqlite").is_file()
        except OSError:  # (not ours to look into: not a mirror of ours either)
            mirror = False
        if mirror:
            raise ConfigError(
                f"{where}: {real} lies inside the mirror {parent}, whose --delete would remove it",
                "give a directory outside it",
            )


def _check_ca_file(path: Path, where: str) -> None:
    """A CA bundle TLS can load: else every request of the run fails, after its retries."""
    if not path.is_file():
        raise ConfigError(f"{where}: no such CA file: {path}")
    import ssl  # here, not above: a run without --ca-cert does not pay for it

    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError):  # (SSLError first: it is an OSError too)
        raise ConfigError(
            f"{where}: {path}: not a PEM CA bundle", "give the CA's certificates in PEM form"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None


_RENAMED = {"mirror": "url", "arch": "architectures"}
"""Options whose key is not their name (the others close enough for difflib to find)."""

_COMMAND_LINE_ONLY = (
    "quiet", "verbose", "log_format", "log_file", "report", "metrics",
    "config", "job", "check", "verify_only",
)  # fmt: skip
"""Options of a whole run, not of a job: a file has no key for them."""


def _suggest(key: str) -> str | None:
    import difflib

    key = key.replace("-", "_")
    if key in _RENAMED:
        return f"did you mean '{_RENAMED[key]}'?"
    if key in _COMMAND_LINE_ONLY:
        return f"--{key.replace('_', '-')} is an option of the command line only"
    close = difflib.get_close_matches(key, [*_FIELDS, "post"], n=1)
    return f"did you mean '{close[0]}'?" if close else None


def _check_defaults(defaults: Mapping[str, Any], where: str) -> None:
    """Each ``[defaults]`` key is known and its value valid, named as the file has it:
    checked only once merged into a job, a typo there read ``jobs.a.max_conections:
    unknown key``, pointing at a table that has no such key."""
    for raw_key, value in defaults.items():
        key = ALIASES.get(raw_key, raw_key.replace("-", "_"))
        if key == "post":
            continue  # (its rules are checked with each job's: they are one list)
        check = _FIELDS.get(key)
        if check is None:
            raise ConfigError(f"{where}.{raw_key}: unknown key", _suggest(raw_key))
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}.{raw_key}: {exc}") from None


def _check_post(table: Mapping[str, Any], where: str) -> None:
    """``post`` is an array of tables, before defaults' and a job's rules are joined."""
    if "post" in table and not isinstance(table["post"], list):
        name = where.rpartition(": ")[2]
        raise ConfigError(f"{where}.post: expected an array of tables ([[{name}.post]])")


MAX_CONFIG_BYTES = 16 << 20
"""A config file is read up to this size: a file of jobs is a few KiB, and what is much
larger (or endless) is something else given by mistake."""


def load_config(
    path: Path,
    post_parser: Callable[[Any, str], Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, MirrorJob]:
    """Read a TOML file of ``[defaults]`` and ``[jobs.NAME]`` tables into jobs, in file
    order, or the jobs named in ``only`` (``--job``), in its order.

    ``overrides`` (the command line's) go over every job, but for ``dest`` and
    ``post_dest``, which go over the jobs run only: the others keep their own, and
    every job's DEST is still checked against every other's.
    """
    import tomllib  # only runs from a config file need it

    label = path.name
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            # (/dev/zero, a log or an image given by mistake: read whole, it took all memory)
            raise ConfigError(
                f"{path}: over {MAX_CONFIG_BYTES >> 20} MiB, too big for a config file"
            )
        # utf-8-sig: a byte order mark, which Windows editors put first, is dropped; left,
        # it was "Invalid statement (at line 1, column 1)", about a character no one sees
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}): a TOML file is UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    except RecursionError:  # (tomllib reads nested arrays and tables by recursion)
        raise ConfigError(f"{label}: not valid TOML: arrays or tables nested too deeply") from None
    for key in data:
        if key not in ("defaults", "jobs"):
            raise ConfigError(f"{label}: {key}: unknown table; expected [defaults] and [jobs.NAME]")
    defaults = data.get("defaults", {})
    jobs = data.get("jobs", {})
    if not isinstance(defaults, dict) or not isinstance(jobs, dict):
        raise ConfigError(f"{label}: [defaults] and [jobs] must be tables")
    if not jobs:
        raise ConfigError(f"{label}: no [jobs.NAME] table")
    _check_post(defaults, f"{label}: defaults")
    defaults = _with_env(defaults, f"{label}: defaults")
    _check_defaults(defaults, f"{label}: defaults")
    run = list(dict.fromkeys(only or jobs))
    missing = [n for n in run if n not in jobs]
    if missing:
        raise ConfigError(f"{label}: no job named {', '.join(missing)}; jobs: {', '.join(jobs)}")
    over = dict(overrides or {})
    over_others = {k: v for k, v in over.items() if k not in _ONE_DIRECTORY}
    given = set(run) if "dest" in over else set()  # (the jobs whose DEST is --dest)
    # A file read from a pipe (--config <(...), /dev/stdin) has no directory of its own:
    # "/proc/PID/fd" is not where its relative paths were meant, the current one is.
    base = path.resolve().parent if path.is_file() else Path.cwd()
    out: dict[str, MirrorJob] = {}
    for name, table in jobs.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{label}: jobs.{name}: expected a table")
        _check_post(table, f"{label}: jobs.{name}")
        table = _with_env(table, f"{label}: jobs.{name}")
        merged = {**defaults, **table}
        _check_dependent(table, merged, f"{label}: jobs.{name}")
        if "post" in defaults and "post" in table:
            merged["post"] = [*defaults["post"], *table["post"]]
        # (after the rules' merge: --post replaces both)
        merged.update(over if name in run else over_others)
        job = build_job(
            merged, f"{label}: jobs.{name}", base_dir=base, name=name, post_parser=post_parser
        )
        _check_own_dest(job, out.values(), f"{label}: jobs.{name}", given)
        out[name] = job
    return {name: out[name] for name in run}


_ENV_VAR = re.compile(r"\$(?:(\$)|\{(\w+)\}|(\w+))")


def _with_env(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``table`` with ``$VAR`` and ``${VAR}`` in its paths (``dest``, ``post_dest``,
    ``ca_cert``) replaced by the environment's values, and ``$$`` by ``$``: written in
    the file, ``dest = "$MIRRORS/centos"`` made a directory named ``$MIRRORS``. A variable
    that is not set is an error, not an empty string. (The command line's paths are the
    shell's to expand: not again here.)"""
    out = dict(table)
    for key, value in table.items():
        if key.replace("-", "_") in PATH_KEYS and isinstance(value, str):
            out[key] = _ENV_VAR.sub(functools.partial(_env_value, where=f"{where}.{key}"), value)
    return out


def _env_value(m: re.Match[str], where: str) -> str:
    if m.group(1):
        return "$"
    name = m.group(2) or m.group(3)
    if name not in os.environ:
        raise ConfigError(f"{where}: ${name} is not set", "or write $$ for a $")
    return os.environ[name]


DEPENDENT: tuple[tuple[tuple[str, ...], str, object], ...] = (
    (("scheduler",), "executor", "dask"),
    (("suites", "components", "architectures"), "index", "debian"),
    (("force", "max_delete"), "delete", True),
)
"""Keys that mean something only beside another's value: (keys, the other key, its value).
The command line's options (``cli._unused_flags``) and a job's table here alike."""


def _check_dependent(table: Mapping[str, Any], merged: Mapping[str, Any], where: str) -> None:
    """A key of the job's own table that its file's settings leave unused (``max_delete``
    without ``delete``) is a mistake to say, as its option on the command line is, not to
    drop. Judged by the file, not the command line: a job's ``max_delete`` still goes
    with its ``delete = true`` on a run with ``--no-delete``; a key in [defaults] is for
    the jobs that use it."""
    for keys, other, value in DEPENDENT:
        for key in keys:
            if key in table and table[key] is not False and merged.get(other) != value:
                shown = "true" if value is True else f'"{value}"'
                raise ConfigError(f"{where}.{key}: goes with {other} = {shown}")
    if merged.get("insecure") is True and merged.get("ca_cert"):
        # one check off and a CA bundle for it: which was meant? (insecure won, quietly;
        # a one-off --insecure over a job's ca_cert is the command line's, and fine)
        raise ConfigError(f"{where}.insecure: turns off the check that ca_cert is for")


def _check_own_dest(
    job: MirrorJob, others: Iterable[MirrorJob], where: str, given: Set[str] = frozenset()
) -> None:
    """``job``'s DEST is neither another job's nor inside or around one: one DEST, one
    state, and each run would take the other's files for vanished ones (--delete) and
    fetch everything again on every turn. Compared resolved: ``link`` and ``./x/../d``
    may well be ``d``."""
    mine = _real(job.dest)
    shown = str(job.dest) if mine == job.dest else f"{job.dest} ({mine})"
    for other in others:
        theirs = _real(other.dest)
        hint = _dest_hint(job.name, other.name, given)
        if mine == theirs:
            raise ConfigError(
                f"{where}: dest {shown} is jobs.{other.name}'s too;"
                " give each job a directory of its own",
                hint,
            )
        if mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
            raise ConfigError(
                f"{where}: dest {shown} and jobs.{other.name}'s {other.dest} lie one inside"
                " the other; give each job a directory of its own",
                hint,
            )
        # and their post-processing outputs: one's --delete would remove the other's, and
        # the same path in both mirrors would make one set of outputs for two files
        if job.post and other.post:
            d, theirs_d = _real(job.derived_root()), _real(other.derived_root())
            if d == theirs_d or d.is_relative_to(theirs_d) or theirs_d.is_relative_to(d):
                raise ConfigError(
                    f"{where}: post_dest {d} and jobs.{other.name}'s {theirs_d} are one, or"
                    " one inside the other; give each job's outputs a directory of their own"
                )


def _dest_hint(name: str, other: str, given: Set[str]) -> str | None:
    """What to do when ``given`` (the jobs whose DEST is the command line's) clash."""
    if name in given and other in given:
        return "--dest goes to every job run: pick one with --job"
    if name in given or other in given:
        keeps = other if name in given else name
        return f"--dest overlaps jobs.{keeps}'s dest: give a directory of its own"
    return None


def _real(path: Path) -> Path:
    """``path`` resolved (symlinks, ``..``), as far as it exists; absolute at least."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # (a symlink loop, on Python 3.11)
        return path.absolute()
