"""Small media clips for post-processing tests, and ways to look inside them.

Clips come from ffmpeg's own generators (``testsrc`` picture, ``sine`` tone),
so no media is checked in::

    clip = make_clip(tmp_path / "a.mp4", seconds=2)
    truncate(clip)            # now its index (the moov atom) is gone
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "ffmpeg_exe",
    "ffprobe_exe",
    "jpeg_size",
    "make_clip",
    "make_dubbed_clip",
    "streams",
    "truncate",
    "unknown_codec",
]


def ffmpeg_exe() -> str | None:
    """ffmpeg from PATH, else imageio-ffmpeg's, else ``None``."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError:
        return None


def ffprobe_exe() -> str | None:
    return shutil.which("ffprobe")


def make_clip(
    path: Path, seconds: float = 2, size: str = "320x240", audio: bool = True, *, gop: int = 25
) -> Path:
    """An H.264 (+ AAC) mp4 of ``seconds`` with a key frame every ``gop`` frames (25 fps).

    The index is written at the end (no faststart), as most encoders do, so
    :func:`truncate` makes a file that cannot be opened at all.
    """
    exe = ffmpeg_exe()
    assert exe is not None, "ffmpeg is needed to make clips"
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    argv += ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration={seconds}"]
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(gop), "-pix_fmt", "yuv420p"]
    if audio:
        argv += ["-c:a", "aac", "-b:a", "64k"]
    argv += ["-f", "mp4", f"file:{path.absolute()}"]
    subprocess.run(argv, stdin=subprocess.DEVNULL, check=True, timeout=60)
    return path


def make_dubbed_clip(path: Path, seconds: float = 6) -> Path:
    """An mkv with a picture and two audio tracks, the second one damaged past its start.

    Its first ``seconds / 2`` are sound (so opening the file, which reads a few
    packets of every stream, finds nothing wrong); the rest is corrupted AAC, as a
    bad sector in the dubbed track of a film would leave it.
    """
    exe = ffmpeg_exe()
    assert exe is not None, "ffmpeg is needed to make clips"
    work = path.parent / f".{path.name}.parts"
    work.mkdir(parents=True, exist_ok=True)
    half = seconds / 2
    q = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]

    def ff(*args: str) -> None:
        subprocess.run([*q, *args], stdin=subprocess.DEVNULL, check=True, timeout=60)

    good, noisy, listing = work / "good.mka", work / "noisy.mka", work / "list.txt"
    ff("-f", "lavfi", "-i", f"sine=frequency=880:duration={half}", "-c:a", "aac", str(good))
    ff("-i", str(good), "-c", "copy", "-bsf:a", "noise=amount=2", str(noisy))
    listing.write_text(f"file '{good}'\nfile '{noisy}'\n")
    ff(
        "-f", "lavfi", "-i", f"testsrc=size=64x64:rate=25:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
        "-f", "concat", "-safe", "0", "-i", str(listing),
        "-map", "0", "-map", "1", "-map", "2",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-c:a:0", "aac", "-c:a:1", "copy",
        "-f", "matroska", f"file:{path.absolute()}",
    )  # fmt: skip
    shutil.rmtree(work)
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut ``path`` to ``fraction`` of its size, in place (a broken download)."""
    with path.open("r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))
    return path


def unknown_codec(path: Path) -> Path:
    """Rename, in place, the H.264 sample entry of an mp4 from :func:`make_clip` (``avc1``)
    to a codec no ffmpeg knows: a sound file in a format this ffmpeg cannot decode, as
    AV1 is to a build without an AV1 decoder."""
    data = path.read_bytes()
    at = data.rfind(b"avc1")  # the last: the first ones are brands in 'ftyp'
    assert at > 0 and data[at - 4 : at].startswith(b"\0"), "no avc1 sample entry"
    path.write_bytes(data[:at] + b"zzzz" + data[at + 4 :])
    return path


def streams(path: Path) -> list[dict[str, Any]]:
    """``ffprobe -show_streams`` as a list of dicts (needs ffprobe)."""
    exe = ffprobe_exe()
    assert exe is not None, "ffprobe is needed to inspect streams"
    out = subprocess.run(
        [exe, "-v", "error", "-show_streams", "-of", "json", f"file:{path.absolute()}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    result: list[dict[str, Any]] = json.loads(out)["streams"]
    return result


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's start-of-frame header."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"bad JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise ValueError("no start-of-frame marker in JPEG")
