"""Find ffmpeg, build its argument lists (pure), and run one with a timeout.

Every argv starts with the absolute executable and ``-nostdin -hide_banner``;
every path is absolute and ``file:``-prefixed, so a name beginning with ``-``
or containing ``:`` is never read as an option or a protocol.  Nothing here
uses a shell: :func:`run` is the one place a process starts::

    >>> ff = FFmpeg("/usr/bin/ffmpeg", (5, 1, 2))
    >>> remux_argv(ff, Path("/m/-i a:b.mkv"), Path("/d/.tmp/remux.mp4"))[-5:]
    ['-movflags', '+faststart', '-f', 'mp4', 'file:/d/.tmp/remux.mp4']
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import msgspec

from fetcher.errors import PostProcessError, PostTimeout

__all__ = [
    "FFmpeg",
    "PostProcessError",
    "PostTimeout",
    "RunResult",
    "audio_argv",
    "custom_argv",
    "duration_argv",
    "file_arg",
    "find_ffmpeg",
    "media_seconds",
    "parse_version",
    "probe_argv",
    "remux_argv",
    "run",
    "thumbnails_argv",
    "transcode_argv",
]

_TAIL_LINES = 20
_VERSION_RE = re.compile(r"version\s+n?(\d+)\.(\d+)(?:\.(\d+))?")


class FFmpeg(msgspec.Struct, frozen=True):
    """An ffmpeg executable, its version and the flags that depend on it."""

    path: str
    version: tuple[int, ...] = ()
    """``(major, minor[, patch])``; empty when unparseable (a git build: assume new)."""
    ffprobe: str | None = None

    @property
    def fps_mode(self) -> tuple[str, str]:
        """``("-fps_mode", "vfr")`` from 5.1 on, ``("-vsync", "vfr")`` before (deprecated since)."""
        modern = not self.version or self.version >= (5, 1)
        return ("-fps_mode" if modern else "-vsync", "vfr")


def parse_version(text: str) -> tuple[int, ...]:
    """The version in ``ffmpeg -version`` output: ``n9.0.2-17-g…`` → ``(9, 0, 2)``."""
    m = _VERSION_RE.search(text.splitlines()[0] if text else "")
    if m is None:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)


def _candidates(search_path: str | None, fallback: bool) -> list[str]:
    found = [p for p in (shutil.which("ffmpeg", path=search_path),) if p]
    if fallback:
        try:
            import imageio_ffmpeg
        except ImportError:
            pass
        else:
            try:
                found.append(str(imageio_ffmpeg.get_ffmpeg_exe()))
            except RuntimeError:  # the package is there but its binary is not
                pass
    return found


def find_ffmpeg(search_path: str | None = None, *, fallback: bool = True) -> FFmpeg | None:
    """ffmpeg from ``PATH`` (or ``search_path``), else from ``imageio-ffmpeg``.

    A candidate that does not answer ``-version`` is passed over; ``None``
    when none works.  ``ffprobe`` is looked for beside it, then on the path.
    """
    for exe in _candidates(search_path, fallback):
        try:
            done = subprocess.run(
                [exe, "-hide_banner", "-version"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode != 0:
            continue
        sibling = Path(exe).with_name("ffprobe")
        if sibling.is_file() and os.access(sibling, os.X_OK):
            probe: str | None = str(sibling)
        else:
            probe = shutil.which("ffprobe", path=search_path)
        return FFmpeg(os.path.abspath(exe), parse_version(done.stdout), probe)
    return None


def file_arg(path: Path) -> str:
    """``file:/abs/path``: never an option, never another protocol."""
    if not path.is_absolute():
        raise ValueError(f"ffmpeg paths must be absolute: {str(path)!r}")
    return f"file:{path}"


def _base(ff: FFmpeg, *, overwrite: bool = True) -> list[str]:
    # -y is safe: outputs are always fresh temporary paths of our own.
    head = [ff.path, "-nostdin", "-hide_banner"]
    return [*head, "-y", "-loglevel", "error"] if overwrite else [*head, "-loglevel", "error"]


def thumbnails_argv(
    ff: FFmpeg, src: Path, outdir: Path, *, size: tuple[int, int] = (160, 90), count: int = 10
) -> list[str]:
    """Up to ``count`` key frames as ``outdir/thumb-001.jpg``…, letterboxed to ``size``.

    Frames are first made square-pixelled (``iw*sar``): a DVD's or a broadcast's
    wide picture is stored narrower than it is shown, and fitted by its stored
    shape it would come out squeezed between bars.  (``sar`` is 1 when unknown.)
    """
    w, h = size
    vf = (
        r"select='eq(pict_type\,I)',"
        "scale='trunc(iw*sar/2)*2':ih,setsar=1,"
        f"scale={w}:{h}:force_original_aspect_ratio=decrease,pad={w}:{h}:(ow-iw)/2:(oh-ih)/2"
    )
    # image2 expands '%' in the whole name, so a '%' in the directory is doubled.
    pattern = file_arg(outdir).replace("%", "%%") + "/thumb-%03d.jpg"
    return [
        *_base(ff),
        # Decode key frames only: fast even on long files.
        "-skip_frame", "nokey",
        "-i", file_arg(src),
        "-an", "-sn", "-dn",
        "-vf", vf,
        *ff.fps_mode,
        "-frames:v", str(count),
        "-q:v", "3",
        "-f", "image2",
        pattern,
    ]  # fmt: skip


def probe_argv(ff: FFmpeg, src: Path) -> list[str]:
    """Decode every video and audio stream to nowhere; any stderr line or a non-zero
    exit is a failure.

    Mapped explicitly: left to itself ffmpeg takes one video and one audio stream,
    and a damaged second audio track (a film's dub) would pass.  ``?``: a file
    without video (or audio) is not an error.  Subtitles, data and attachments
    are not decoded (a null output cannot take them).
    """
    return [
        *_base(ff, overwrite=False),
        "-xerror",
        "-i", file_arg(src),
        "-map", "0:v?", "-map", "0:a?",
        "-f", "null", "-",
    ]  # fmt: skip


def transcode_argv(
    ff: FFmpeg, src: Path, out: Path, *, height: int = 480, crf: int = 23, preset: str = "veryfast"
) -> list[str]:
    """H.264 + AAC in mp4, ``height`` lines at most (never upscaled, always even)."""
    return [
        *_base(ff),
        "-i", file_arg(src),
        "-sn", "-dn",
        "-vf", f"scale=-2:'trunc(min({height},ih)/2)*2'",
        "-c:v", "libx264", "-crf", str(crf), "-preset", preset, "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "128k",
        "-movflags", "+faststart",
        "-f", "mp4",
        file_arg(out),
    ]  # fmt: skip


def remux_argv(ff: FFmpeg, src: Path, out: Path) -> list[str]:
    """The best video and audio streams, copied into mp4 with the index up front."""
    return [
        *_base(ff),
        "-i", file_arg(src),
        "-sn", "-dn", "-c", "copy",
        "-movflags", "+faststart",
        "-f", "mp4",
        file_arg(out),
    ]  # fmt: skip


def audio_argv(ff: FFmpeg, src: Path, out: Path) -> list[str]:
    """The best audio stream as AAC in ``.m4a``."""
    return [
        *_base(ff),
        "-i", file_arg(src),
        "-vn", "-sn", "-dn",
        "-c:a", "aac", "-b:a", "160k",
        "-movflags", "+faststart",
        "-f", "ipod",
        file_arg(out),
    ]  # fmt: skip


def duration_argv(ff: FFmpeg, src: Path) -> list[str] | None:
    """ffprobe's reading of ``src``'s duration from its header (printed in seconds, or
    ``N/A``): None without an ffprobe."""
    if ff.ffprobe is None:
        return None
    return [
        ff.ffprobe, "-hide_banner", "-loglevel", "error",
        "-show_entries", "format=duration", "-of", "csv=p=0",
        file_arg(src),
    ]  # fmt: skip


_PROBE_SECONDS = 30.0
"""How long the duration's reading may take: it reads the header, not the streams."""


def media_seconds(ff: FFmpeg, src: Path, stop: threading.Event | None = None) -> float | None:
    """How long ``src`` plays, as its header says, or None when that cannot be told (no
    ffprobe, no duration in the header, ffprobe failed or timed out)."""
    argv = duration_argv(ff, src)
    if argv is None:
        return None
    try:
        result = run(argv, _PROBE_SECONDS, stop, output=True)
    except PostProcessError:
        return None
    try:
        seconds = float(result.output.strip().splitlines()[0])
    except (ValueError, IndexError):  # "N/A" (a raw stream), or nothing at all
        return None
    return seconds if result.returncode == 0 and 0 < seconds < float("inf") else None


def custom_argv(
    ff: FFmpeg, template: Sequence[str], *, src: Path, out: Path, outdir: Path
) -> list[str]:
    """The user's arguments with placeholders replaced inside each element.

    ``{input}``, ``{output}`` and ``{outdir}`` become ``file:`` paths;
    ``{stem}`` is the source's name without its extension, :func:`safe_stem`.  The
    program is always ffmpeg, and no element is ever split or given to a shell.
    """
    subs = {
        "{input}": file_arg(src),
        "{output}": file_arg(out),
        "{outdir}": file_arg(outdir),
        "{stem}": safe_stem(src.stem),
    }
    pattern = re.compile("|".join(re.escape(k) for k in subs))
    # One pass, so a substituted name containing "{output}" is left alone.
    return [*_base(ff), *(pattern.sub(lambda m: subs[m.group(0)], a) for a in template)]


_UNSAFE_IN_ARGS = re.compile(r"""[\x00-\x1f\x7f\\'",;:=\[\]|%]|^-""")


def safe_stem(stem: str) -> str:
    """``stem``, the server's name, as a custom rule may place it anywhere in ffmpeg's
    arguments: with ``_`` for each character that ends, joins or quotes filters and
    their options in a filter graph (``, ; : = [ ] ' " \\``), separates a URL's protocol
    (``:``) or a concat list (``|``), starts a pattern (``%``: image2's numbering,
    drawtext's expansions) or a line, and for a leading ``-`` (an option). Verbatim,
    a name ``x,metadata=mode=print:file=leak`` added a filter writing a file; a plain
    name (``Lecture 01 - Intro (2024)``) is left as it is."""
    return _UNSAFE_IN_ARGS.sub("_", stem)


class RunResult(msgspec.Struct, frozen=True):
    """How one ffmpeg run ended."""

    returncode: int
    stderr_tail: str
    """The last lines of stderr (at most 20)."""
    seconds: float
    output: str = ""
    """The start of stdout (at most 64 KiB), when asked for."""


def _drain(stream: IO[bytes], tail: collections.deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        tail.append(raw.decode("utf-8", "replace").rstrip())


_OUTPUT_BYTES = 64 << 10


def _collect(stream: IO[bytes], into: bytearray) -> None:
    for chunk in iter(lambda: stream.read(_OUTPUT_BYTES), b""):
        into += chunk[: _OUTPUT_BYTES - len(into)]  # (the rest is read, and dropped)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    # Not yet reaped, so its pid (= the group id of the session it leads) is
    # still ours: the group is killed, never a recycled pid.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once, in the parent (never after a fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    prctl: Callable[..., int] = fn
    return prctl


def _dies_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it dies.

    So a ``kill -9`` of fetch takes its ffmpeg processes along (their own session
    keeps them from the terminal's Ctrl-C, and nothing else would stop them).
    Linux sends it when the starting *thread* exits; :func:`run` never returns
    before its process has ended, and the pool's threads live as long as the pool.

    preexec_fn is unsafe with threads in general: the child runs Python code
    between fork and exec while other threads' locks may be held.  This one only
    calls a ctypes function resolved beforehand and ``os.getppid``/``os._exit``:
    no import, no Python-level lock (the GIL and the import lock are reset for the
    child by CPython when a preexec_fn is given), and glibc's malloc is fork-safe.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:  # we died before it was armed
            os._exit(1)

    return arm


def run(
    argv: Sequence[str],
    timeout: float,
    stop: threading.Event | None = None,
    *,
    output: bool = False,
) -> RunResult:
    """Run ``argv`` (no shell, no stdin), keeping the tail of its stderr (and with
    ``output``, the start of its stdout).

    Raises :class:`PostProcessError` when it cannot start or ``stop`` is set, and
    :class:`PostTimeout` when it runs longer than ``timeout`` seconds; the process
    group it started is killed first.  A non-zero exit is returned, not raised.
    """
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if output else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_dies_with_us(),  # safe as it is: see there
        )
    except OSError as exc:
        raise PostProcessError(f"cannot run {argv[0]}: {exc}") from exc
    # A thread reads stderr, so a chatty decoder never blocks on a full pipe
    # and memory stays bounded by the tail.
    readers = [threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)]
    stdout = bytearray()
    if proc.stdout is not None:
        readers.append(threading.Thread(target=_collect, args=(proc.stdout, stdout), daemon=True))
    for reader in readers:
        reader.start()
    why = ""
    try:
        while proc.poll() is None:
            left = started + timeout - time.monotonic()
            if left <= 0:
                why = f"timed out after {timeout:.1f}".rstrip("0").rstrip(".") + " s"
            elif stop is not None and stop.is_set():
                why = "cancelled"
            if why:
                _kill(proc)
                break
            try:
                proc.wait(timeout=min(left, 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.returncode is None:  # an exception above (KeyboardInterrupt)
            _kill(proc)
        for reader in readers:
            reader.join(timeout=5)
        for stream in (proc.stderr, proc.stdout):
            if stream is not None:
                stream.close()
    text = "\n".join(tail)
    if why:
        raise (PostProcessError if why == "cancelled" else PostTimeout)(why, text)
    out = stdout.decode("utf-8", "replace")
    return RunResult(proc.returncode, text, time.monotonic() - started, out)
