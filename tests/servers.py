"""Real HTTP servers serving a directory on 127.0.0.1, for integration tests.

::

    with serve("nginx", root, tmp_path) as srv:
        httpx.get(srv.url)                  # nginx autoindex of root
        srv.requests(min_count=1)           # parsed from nginx's access log

Each kind writes a minimal config into ``workdir``, runs the server in the
foreground on a free port (its pid, error, temp and access-log files inside
``workdir``), polls until it answers, and stops it by pid on exit -- also when
the body raises.  A missing binary skips the test (``pytest.skip``) or, outside
pytest, raises :class:`ServerUnavailable`.

Kinds: ``nginx`` (autoindex; options ``exact_size``, ``localtime``),
``nginx-fancyindex`` (same options), ``apache`` (options ``style``: ``fancy``,
``table`` or ``plain``; ``readmes``), ``lighttpd``, ``caddy`` and ``python``
(``http.server``; it has no Range, no ETag and logs no byte counts).

Running as root: nginx gets ``user root;``; lighttpd runs as root without
``server.username``; Apache gets no ``User`` directive, so its compiled-in
default ``#-1`` names no user, ``drop_privileges`` declines, and its workers
keep the starting user (root or not) -- which lets them read a 0700 pytest
``tmp_path``.  Everything else runs as the starting user.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "KINDS",
    "Request",
    "Served",
    "ServerUnavailable",
    "free_port",
    "hidden_names",
    "serve",
    "unavailable",
    "visible_manifest",
]

KINDS = ("nginx", "nginx-fancyindex", "apache", "lighttpd", "caddy", "python")
APACHE_STYLES = ("fancy", "table", "plain")

_NGINX_MODULES = Path("/usr/lib/nginx/modules")
_APACHE_MODULES = Path("/usr/lib/apache2/modules")
_LIGHTTPD_MODULES = Path("/usr/lib/lighttpd")
_BINARIES = {
    "nginx": "nginx",
    "nginx-fancyindex": "nginx",
    "apache": "apache2",
    "lighttpd": "lighttpd",
    "caddy": "caddy",
}
_PACKAGES = {
    "nginx": "nginx",
    "nginx-fancyindex": "nginx libnginx-mod-http-fancyindex",
    "apache": "apache2",
    "lighttpd": "lighttpd",
    "caddy": "caddy",
}


_PROBE = "/.well-known/fetch-readiness-probe"
"""Polled until the server answers (404); left out of :meth:`Served.requests`."""


class ServerUnavailable(RuntimeError):
    """The server kind cannot run here (binary or module missing)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One access-log line."""

    method: str
    target: str
    """The request target as the server logged it: percent-encoded, with any query."""
    status: int
    bytes_sent: int | None
    """Response body bytes; ``None`` where the server does not log them (python)."""
    range: str | None = None
    """The request's ``Range`` header; ``None`` if absent or not logged (python)."""

    @property
    def path(self) -> str:
        """The target's path, percent-decoded once as UTF-8, without the query."""
        return unquote(self.target.split("?", 1)[0], errors="surrogateescape")


@dataclass(slots=True)
class Served:
    """A running server: where it listens and what it logged."""

    kind: str
    root: Path
    port: int
    pid: int
    workdir: Path
    access_log: Path
    _parse: Callable[[str], Request | None] = field(repr=False)
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def requests(self, min_count: int = 0, timeout: float = 5.0) -> list[Request]:
        """Requests parsed from the access log, oldest first.

        Servers log a request after answering it, so a client may be done before
        its line is written: ``min_count`` polls until that many lines are there
        (or ``timeout`` passes, then returns what there is).
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self._read()
            if len(found) >= min_count or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def _read(self) -> list[Request]:
        try:
            text = self.access_log.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return []
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a line still being written
        found = (self._parse(line) for line in lines)
        return [r for r in found if r is not None and r.target != _PROBE]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unavailable(kind: str) -> str | None:
    """Why ``kind`` cannot run here, or ``None`` if it can."""
    if kind not in KINDS:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "python":
        return None
    binary = _BINARIES[kind]
    hint = f"(apt-get install -y {_PACKAGES[kind]})"
    if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
        return f"{kind}: {binary} not found {hint}"
    if kind == "nginx-fancyindex" and not (_NGINX_MODULES / _FANCYINDEX_SO).exists():
        return f"{kind}: {_NGINX_MODULES / _FANCYINDEX_SO} not found {hint}"
    if kind == "apache" and not (_APACHE_MODULES / "mod_autoindex.so").exists():
        return f"{kind}: {_APACHE_MODULES}/mod_autoindex.so not found {hint}"
    return None


def hidden_names(kind: str) -> Callable[[str], bool]:
    """Which names ``kind``'s listing leaves out (so a mirror cannot see them).

    nginx's autoindex and fancyindex (by default) skip every name starting with
    ``.``; the others as configured here list everything.
    """
    if kind in ("nginx", "nginx-fancyindex"):
        return lambda name: name.startswith(".")
    return lambda name: False


def visible_manifest(kind: str, manifest: dict[str, str | None]) -> dict[str, str | None]:
    """The part of a :func:`tests.trees.tree_manifest` that ``kind``'s listings show.

    A path is kept unless one of its segments is hidden by :func:`hidden_names`.
    """
    hidden = hidden_names(kind)
    return {p: v for p, v in manifest.items() if not any(map(hidden, p.split("/")))}


@contextlib.contextmanager
def serve(
    kind: str,
    root: Path,
    workdir: Path,
    *,
    style: str | None = None,
    exact_size: bool | None = None,
    localtime: bool | None = None,
    limit_rate: str | None = None,
    keepalive_requests: int | None = None,
    tz: str | None = None,
    readmes: bool = False,
    tls: Path | None = None,
    startup_timeout: float = 15.0,
) -> Iterator[Served]:
    """Run a ``kind`` server on 127.0.0.1 serving ``root`` with directory listings.

    ``style`` is Apache's listing style (``fancy``, the default, ``table`` or
    ``plain``); ``exact_size`` (default True) and ``localtime`` (default False)
    are nginx's ``autoindex_exact_size`` / ``autoindex_localtime`` (or the
    fancyindex equivalents).  ``limit_rate`` (nginx only, e.g. ``"20m"``) caps
    each connection's send rate, as a busy mirror does; ``keepalive_requests``
    (nginx only; default 10000) is how many requests a connection may carry before
    nginx closes it (1000 is nginx's own default, 100 before 1.19.10).  ``tz`` is the
    server's time zone (its ``TZ``, e.g. ``"Asia/Kolkata"``), in which Apache and nginx
    with ``localtime=True`` print listing dates.  ``readmes`` (Apache only) shows a
    directory's ``HEADER.html`` above its listing and ``README.html`` below it, as
    Debian's default config does (``HeaderName``, ``ReadmeName``).  ``tls`` (nginx
    only) is a PEM file holding the server's key and certificate chain: the server
    speaks HTTPS, and :attr:`Served.url` says so.  Config, logs and temp files go to
    ``workdir``.
    """
    reason = unavailable(kind)
    if reason is not None:
        _skip(reason)
    if (style is not None or readmes) and kind != "apache":
        raise ValueError(f"style= and readmes= are apache options, not {kind}'s")
    nginx_only = (exact_size, localtime, limit_rate, keepalive_requests, tls)
    if any(o is not None for o in nginx_only) and not kind.startswith("nginx"):
        raise ValueError(
            f"exact_size=, localtime=, limit_rate=, keepalive_requests= and tls= are nginx"
            f" options, not {kind}'s"
        )
    if limit_rate is not None and not re.fullmatch(r"[0-9]+[kKmMgG]?", limit_rate):
        raise ValueError(f"limit_rate must look like 500k or 20m, got {limit_rate!r}")
    style = style or "fancy"
    if style not in APACHE_STYLES:
        raise ValueError(f"apache style must be one of {APACHE_STYLES}, got {style!r}")
    root = root.resolve()
    if not root.is_dir():
        raise ValueError(f"not a directory: {root}")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir.resolve()))
    for path in (root, workdir, *([tls] if tls else [])):
        if any(c in str(path) for c in '"\\\n\r'):
            raise ValueError(f"path unusable in a server config: {path!r}")

    options = {
        "style": style,
        "readmes": readmes,
        "exact_size": exact_size is not False,
        "localtime": bool(localtime),
        "limit_rate": limit_rate,
        "keepalive_requests": int(keepalive_requests or 10000),
        "tls": tls.resolve() if tls else None,
    }
    last_error = ""
    for _attempt in range(3):
        port = free_port()
        argv, access_log, parse = _CONFIGURE[kind](root, workdir, port, options)
        proc = _start(argv, workdir, tz)
        try:
            ok, last_error = _wait_ready(proc, port, workdir, startup_timeout)
            if not ok:
                if "in use" in last_error:  # lost a race for the port: try another
                    continue
                raise RuntimeError(f"{kind} did not start: {last_error}")
            scheme = "https" if tls else "http"
            yield Served(kind, root, port, proc.pid, workdir, access_log, parse, scheme)
            return
        finally:
            _stop(proc)
    raise RuntimeError(f"{kind} did not start: {last_error}")


def _skip(reason: str) -> None:
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(reason)
    raise ServerUnavailable(reason)


# --- process handling ---------------------------------------------------------


def _start(argv: list[str], workdir: Path, tz: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        HOME=str(workdir),
        XDG_DATA_HOME=str(workdir / "data"),
        XDG_CONFIG_HOME=str(workdir / "config"),
    )
    if tz is not None:
        env["TZ"] = tz
    with open(workdir / "stdout.log", "ab") as out, open(workdir / "stderr.log", "ab") as err:
        return subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, workdir: Path, timeout: float
) -> tuple[bool, str]:
    """Poll until the server answers ``GET _PROBE`` (True) or exits or times out (False, why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False, f"exited with {proc.returncode}: {_logs_tail(workdir)}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", _PROBE)
            conn.getresponse().read()
            return True, ""
        except (OSError, http.client.HTTPException):
            time.sleep(0.02)
        finally:
            conn.close()
    return False, f"not answering after {timeout} s: {_logs_tail(workdir)}"


def _logs_tail(workdir: Path) -> str:
    parts = []
    for name in ("stderr.log", "stdout.log", "error.log"):
        path = workdir / name
        if path.exists() and path.stat().st_size:
            parts.append(f"[{name}] " + path.read_text(errors="replace")[-1500:])
    return " ".join(parts) or "(no output)"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the server, wait for it; SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only its children
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers a killed master left behind


# --- per-kind configs ---------------------------------------------------------

_Configured = tuple[list[str], Path, Callable[[str], Request | None]]
_FANCYINDEX_SO = "ngx_http_fancyindex_module.so"


def _tsv_parser(line: str) -> Request | None:
    """``method \\t target \\t status \\t bytes \\t range`` (``-`` for none)."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 5 or not parts[2].isdigit():
        return None
    method, target, status, size, rng = parts
    if " " in target:  # a request line: "GET /x HTTP/1.1"
        pieces = target.split(" ")
        target = pieces[1] if len(pieces) >= 2 else target
    return Request(
        method,
        target,
        int(status),
        int(size) if size.isdigit() else 0,
        None if rng == "-" else rng,
    )


def _nginx(root: Path, workdir: Path, port: int, options: dict[str, object]) -> _Configured:
    return _nginx_conf(root, workdir, port, options, fancy=False)


def _nginx_fancy(root: Path, workdir: Path, port: int, options: dict[str, object]) -> _Configured:
    return _nginx_conf(root, workdir, port, options, fancy=True)


def _nginx_conf(
    root: Path, workdir: Path, port: int, options: dict[str, object], *, fancy: bool
) -> _Configured:
    on = {True: "on", False: "off"}
    prefix = "fancyindex" if fancy else "autoindex"
    temp = workdir / "temp"
    temp.mkdir(exist_ok=True)
    mime = (
        '    include "/etc/nginx/mime.types";\n' if Path("/etc/nginx/mime.types").exists() else ""
    )
    conf = (
        (f'load_module "{_NGINX_MODULES / _FANCYINDEX_SO}";\n' if fancy else "")
        + ("user root root;\n" if os.geteuid() == 0 else "")
        + f'worker_processes 1;\npid "{workdir}/nginx.pid";\n'
        f'error_log "{workdir}/error.log" warn;\n'
        "events { worker_connections 512; }\n"
        "http {\n"
        f"{mime}"
        "    default_type application/octet-stream;\n"
        "    log_format fetchtsv '$request_method\\t$request_uri\\t$status\\t"
        "$body_bytes_sent\\t$http_range';\n"
        f'    access_log "{workdir}/access.log" fetchtsv;\n'
        + "".join(
            f'    {t}_temp_path "{temp}/{t}";\n'
            for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    sendfile on;\n    keepalive_requests {options['keepalive_requests']};\n"
        f"    server {{\n        listen 127.0.0.1:{port}{' ssl' if options['tls'] else ''};\n"
        "        server_name localhost;\n"
        + (
            f'        ssl_certificate "{options["tls"]}";\n'
            f'        ssl_certificate_key "{options["tls"]}";\n'
            if options["tls"]
            else ""
        )
        + f'        root "{root}";\n'
        f"        location / {{\n"
        f"            {prefix} on;\n"
        f"            {prefix}_exact_size {on[bool(options['exact_size'])]};\n"
        f"            {prefix}_localtime {on[bool(options['localtime'])]};\n"
        + (f"            limit_rate {options['limit_rate']};\n" if options["limit_rate"] else "")
        + "        }\n    }\n}\n"
    )
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    argv = [
        "nginx",
        "-p",
        f"{workdir}/",
        "-e",
        f"{workdir}/error.log",
        "-c",
        str(conf_path),
        "-g",
        "daemon off;",
    ]
    return argv, workdir / "access.log", _tsv_parser


_APACHE_INDEX_OPTIONS = {
    "fancy": "FancyIndexing NameWidth=* DescriptionWidth=* Charset=UTF-8",
    "table": "FancyIndexing HTMLTable VersionSort NameWidth=* DescriptionWidth=* Charset=UTF-8",
    "plain": "-FancyIndexing Charset=UTF-8",
}


def _apache(root: Path, workdir: Path, port: int, options: dict[str, object]) -> _Configured:
    mods = ["mpm_event", "authz_core", "dir", "autoindex", "mime", "alias"]
    loads = "".join(f'LoadModule {m}_module "{_APACHE_MODULES}/mod_{m}.so"\n' for m in mods)
    mime = "TypesConfig /etc/mime.types\n" if Path("/etc/mime.types").exists() else ""
    mime = mime or f'TypesConfig "{workdir}/mime.types"\n'
    (workdir / "mime.types").touch()
    icons = Path("/usr/share/apache2/icons")
    conf = (
        f'ServerRoot "{workdir}"\nDefaultRuntimeDir "{workdir}"\nPidFile "{workdir}/apache.pid"\n'
        f"Mutex file:{workdir} default\n"
        f"Listen 127.0.0.1:{port}\nServerName 127.0.0.1\n{loads}{mime}"
        "StartServers 1\nServerLimit 1\nThreadsPerChild 64\nMaxRequestWorkers 64\n"
        "MinSpareThreads 1\nMaxSpareThreads 64\nKeepAliveTimeout 30\nMaxKeepAliveRequests 0\n"
        f'ErrorLog "{workdir}/error.log"\nLogLevel warn\n'
        'LogFormat "%m\\t%r\\t%>s\\t%B\\t%{Range}i" fetchtsv\n'
        f'CustomLog "{workdir}/access.log" fetchtsv\n'
        "AllowEncodedSlashes NoDecode\nEnableSendfile On\n"
        f'DocumentRoot "{root}"\n'
        "<Directory />\n    Require all denied\n    AllowOverride None\n</Directory>\n"
        f'<Directory "{root}">\n    Options Indexes FollowSymLinks\n'
        "    AllowOverride None\n    Require all granted\n</Directory>\n"
        f"IndexOptions {_APACHE_INDEX_OPTIONS[str(options['style'])]}\n"
    )
    if options["readmes"]:
        conf += "HeaderName HEADER.html\nReadmeName README.html\n"
    if icons.is_dir():  # Debian's look: icons beside each entry, served from /icons/
        conf += (
            f'Alias /icons/ "{icons}/"\n'
            f'<Directory "{icons}">\n    Require all granted\n</Directory>\n'
            "AddIcon /icons/back.gif ..\nAddIcon /icons/folder.gif ^^DIRECTORY^^\n"
            "AddIcon /icons/blank.gif ^^BLANKICON^^\nAddIconByType (TXT,/icons/text.gif) text/*\n"
            "DefaultIcon /icons/unknown.gif\n"
        )
    conf_path = workdir / "httpd.conf"
    conf_path.write_text(conf)
    return ["apache2", "-DFOREGROUND", "-f", str(conf_path)], workdir / "access.log", _tsv_parser


def _lighttpd(root: Path, workdir: Path, port: int, options: dict[str, object]) -> _Configured:
    conf = (
        f'server.modules = ("mod_access", "mod_accesslog", "mod_dirlisting", "mod_staticfile")\n'
        f'server.document-root = "{root}"\nserver.bind = "127.0.0.1"\nserver.port = {port}\n'
        f'server.errorlog = "{workdir}/error.log"\nserver.upload-dirs = ("{workdir}")\n'
        'server.stat-cache-engine = "disable"\n'
        "server.max-keep-alive-requests = 10000\n"
        'dir-listing.activate = "enable"\ndir-listing.encoding = "utf-8"\n'
        'dir-listing.hide-dotfiles = "disable"\n'
        # a piped logger gets each line at once; a file only every 4 seconds
        f'accesslog.filename = "|exec cat >> {shlex.quote(str(workdir / "access.log"))}"\n'
        'accesslog.format = "%m\\t%r\\t%s\\t%b\\t%{Range}i"\n'
        'mimetype.assign = (".txt" => "text/plain; charset=utf-8", '
        '".html" => "text/html", "" => "application/octet-stream")\n'
    )
    conf_path = workdir / "lighttpd.conf"
    conf_path.write_text(conf)
    argv = ["lighttpd", "-D", "-f", str(conf_path)]
    if _LIGHTTPD_MODULES.is_dir():
        argv += ["-m", str(_LIGHTTPD_MODULES)]
    return argv, workdir / "access.log", _tsv_parser


def _caddy_parser(line: str) -> Request | None:
    try:
        entry = json.loads(line)
        request = entry["request"]
        ranges = request.get("headers", {}).get("Range") or [None]
        return Request(
            request["method"],
            request["uri"],
            int(entry["status"]),
            int(entry.get("size", 0)),
            ranges[0],
        )
    except (ValueError, KeyError, TypeError):
        return None


def _caddy(root: Path, workdir: Path, port: int, options: dict[str, object]) -> _Configured:
    access = "http.log.access.fetch"
    config = {
        "admin": {"disabled": True, "config": {"persist": False}},
        "storage": {"module": "file_system", "root": str(workdir / "data")},
        "logging": {
            "logs": {
                "default": {
                    "exclude": [access],
                    "level": "WARN",
                    "writer": {"output": "file", "filename": str(workdir / "error.log")},
                },
                "fetch": {
                    "include": [access],
                    "encoder": {"format": "json"},
                    "writer": {"output": "file", "filename": str(workdir / "access.log")},
                },
            }
        },
        "apps": {
            "http": {
                "servers": {
                    "fetch": {
                        "listen": [f"127.0.0.1:{port}"],
                        "automatic_https": {"disable": True},
                        "logs": {"default_logger_name": "fetch"},
                        "routes": [
                            {
                                "handle": [
                                    {"handler": "file_server", "root": str(root), "browse": {}},
                                ]
                            }
                        ],
                    }
                }
            }
        },
    }
    conf_path = workdir / "caddy.json"
    conf_path.write_text(json.dumps(config, indent=1))
    return ["caddy", "run", "--config", str(conf_path)], workdir / "access.log", _caddy_parser


_PYTHON_LINE = re.compile(r'"(\S+) (\S+) HTTP/[\d.]+" (\d{3}) (\S+)$')


def _python_parser(line: str) -> Request | None:
    m = _PYTHON_LINE.search(line.rstrip("\n"))
    if m is None:
        return None
    return Request(m[1], m[2], int(m[3]), int(m[4]) if m[4].isdigit() else None)


def _python(root: Path, workdir: Path, port: int, options: dict[str, object]) -> _Configured:
    argv = [
        sys.executable,
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        str(port),
        "--directory",
        str(root),
    ]
    return argv, workdir / "stderr.log", _python_parser


_CONFIGURE: dict[str, Callable[[Path, Path, int, dict[str, object]], _Configured]] = {
    "nginx": _nginx,
    "nginx-fancyindex": _nginx_fancy,
    "apache": _apache,
    "lighttpd": _lighttpd,
    "caddy": _caddy,
    "python": _python,
}
