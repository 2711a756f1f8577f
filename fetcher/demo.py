"""``fetch demo``: build a small sample mirror, serve it on 127.0.0.1, mirror it.

The sample looks like a package repository (a few hundred ``.rpm``-like files
in nested directories, ``repodata/`` published last) plus a few short video
clips when ffmpeg is at hand.  The server prints nginx-style listings with
exact sizes and dates and honours ``Range``, like the mirrors ``fetch`` is for.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import html
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console

from fetcher.errors import FatalIOError

__all__ = ["build_sample", "demo_main", "serve_directory"]

_EPOCH = 1_764_000_000  # fixed mtimes make the sample, and its listings, reproducible


def _blob(name: str, size: int) -> bytes:
    out = bytearray()
    seed = name.encode()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:size])


def build_sample(root: Path, packages: int = 300, media: bool = True) -> int:
    """Write the sample tree below ``root``; returns the number of files."""
    count = 0
    names = [
        "bash",
        "coreutils",
        "curl",
        "glibc",
        "httpd",
        "kernel",
        "nginx",
        "openssl",
        "python3",
        "zlib",
    ]
    for i in range(packages):
        base = names[i % len(names)]
        sub = root / "Packages" / base[0]
        sub.mkdir(parents=True, exist_ok=True)
        size = 2048 + (i * 7919) % 200_000
        p = sub / f"{base}-{1 + i // 10}.{i % 10}-{i % 3 + 1}.el9.x86_64.rpm"
        p.write_bytes(_blob(p.name, size))
        os.utime(p, (_EPOCH + i * 60, _EPOCH + i * 60))
        count += 1
    extras = {"Packages/l/libstdc++-11.4.1-2.el9.x86_64.rpm": 40_000, "Packages/t/tar-1.34+git~1.el9.x86_64.rpm": 30_000,
              "docs/README v1.txt": 1_200, "docs/café.txt": 700, "isos/boot.iso": 8 << 20, "empty-dir/.keep": 0}  # fmt: skip
    for rel, size in extras.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_blob(rel, size))
        os.utime(p, (_EPOCH, _EPOCH))
        count += 1
    repo = root / "repodata"
    repo.mkdir(exist_ok=True)
    (repo / "repomd.xml").write_text("<repomd><!-- sample --></repomd>\n")
    os.utime(repo / "repomd.xml", (_EPOCH, _EPOCH))
    count += 1
    ffmpeg = shutil.which("ffmpeg")
    if media and ffmpeg:
        clips = root / "media"
        clips.mkdir(exist_ok=True)
        for n, pattern in enumerate(("testsrc", "smptebars", "testsrc2")):
            out = clips / f"clip-{n + 1}-{pattern}.mp4"
            if not out.exists():
                proc = subprocess.run(
                    [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                     "-f", "lavfi", "-i", f"{pattern}=size=320x180:rate=25:duration=3",
                     "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
                     "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac",
                     "-shortest", f"file:{out}"],
                    check=False, timeout=120, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                if proc.returncode != 0:
                    continue  # the demo goes on without this clip
            count += 1
    return count


class _ListingHandler(SimpleHTTPRequestHandler):
    """nginx-style autoindex listings with sizes and dates, plus single ``Range`` requests."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def list_directory(self, path: str | os.PathLike[str]) -> Any:
        entries = sorted(os.scandir(path), key=lambda e: (not e.is_dir(), e.name))
        rows = []
        for e in entries:
            st = e.stat()
            name = e.name + ("/" if e.is_dir() else "")
            date = time.strftime("%d-%b-%Y %H:%M", time.gmtime(st.st_mtime))
            size = "-" if e.is_dir() else str(st.st_size)
            rows.append(
                f'<a href="{quote(name)}">{html.escape(name)}</a>{" " * max(1, 51 - len(name))}{date} {size:>19}'
            )
        title = html.escape(self.path.split("?", 1)[0])
        body = (f"<html>\r\n<head><title>Index of {title}</title></head>\r\n<body>\r\n<h1>Index of {title}</h1>"
                f'<hr><pre><a href="../">../</a>\r\n' + "\r\n".join(rows) + "\r\n</pre><hr></body>\r\n</html>\r\n").encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        rng = self.headers.get("Range")
        if (
            os.path.isdir(path)
            or not rng
            or not rng.startswith("bytes=")
            or not os.path.isfile(path)
        ):
            return super().send_head()
        st = os.stat(path)
        if_range = self.headers.get("If-Range")
        lm = email.utils.formatdate(st.st_mtime, usegmt=True)
        if if_range and if_range != lm:
            return super().send_head()
        start_s, _, end_s = rng[6:].partition("-")
        try:
            start = int(start_s)
            end = int(end_s) if end_s else st.st_size - 1
        except ValueError:
            return super().send_head()
        if start >= st.st_size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{st.st_size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")  # noqa: SIM115 - handed to the base class, which closes it
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{st.st_size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Last-Modified", lm)
        self.end_headers()
        return f


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 on a free port; yields the base URL."""

    def handler(*args: Any, **kw: Any) -> _ListingHandler:
        return _ListingHandler(*args, directory=str(root), **kw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    th = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        th.join(timeout=5)


def _have_ffmpeg() -> bool:
    from fetcher.ffmpeg import find_ffmpeg

    return find_ffmpeg() is not None


def demo_main(argv: list[str], console: Console) -> int:
    from rich.markup import escape

    from fetcher.cli import main, refused

    p = argparse.ArgumentParser(
        prog="fetch demo", description="Mirror a built-in sample mirror served on 127.0.0.1."
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("fetch-demo"),
        help="where the sample and the mirror go (default ./fetch-demo)",
    )
    p.add_argument(
        "--packages", type=int, default=300, help="number of package files (default 300)"
    )
    p.add_argument("--no-media", action="store_true", help="no video clips (and no thumbnails)")
    p.add_argument("--procs", type=int, default=2)
    try:
        ns, rest = p.parse_known_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    upstream = ns.dir / "upstream"
    dest = ns.dir / "mirror"
    # the options passed on to the mirror run: refused now, not after building the sample
    passed = ["--dest", str(dest), "--procs", str(ns.procs), *rest]
    code = refused(["--mirror", "http://127.0.0.1/", *passed], console)
    if code is not None:
        return code
    console.print(f"[bold]building a sample mirror in {escape(str(upstream))}[/] …")
    try:
        n = build_sample(upstream, ns.packages, media=not ns.no_media)
    except OSError as exc:  # (--dir a file, or somewhere this user cannot write)
        where = f"{exc.filename}: " if exc.filename else ""
        raise FatalIOError(
            f"cannot build the sample: {where}{exc.strerror or exc}",
            "give --dir a directory you can write",
        ) from None
    with serve_directory(upstream) as url:
        console.print(
            f"[bold]serving it at {url}[/] ({n} files); mirroring into {escape(str(dest))}"
        )
        args = ["--mirror", url, *passed]
        media = not ns.no_media and _have_ffmpeg()
        if media:
            args += ["--post", "thumbnails=*.mp4", "--post", "probe=*.mp4"]
        code = main(args, console)
        if code == 0:
            console.print("\n[bold]again: an unchanged mirror downloads nothing[/]")
            code = main([*args, "-q"], console)
    if code:
        return code  # main said why
    console.print(f"\n[bold]done:[/] the mirror is in [green]{escape(str(dest.resolve()))}[/]")
    if media:
        console.print(
            f"      thumbnails of the clips are in [green]{escape(str(dest.resolve()))}.derived/media/[/]"
        )
    return code
