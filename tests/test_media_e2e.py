"""Post-processing end to end: clips made by ffmpeg, served by nginx (or the fault
server), mirrored by the real CLI, processed by the real ffmpeg, checked with
ffprobe and by reading the JPEG headers.

Layout checked throughout (see :mod:`fetcher.postprocess`)::

    <tmp>/dest/<rel>                                   the mirrored clip
    <tmp>/dest.derived/<rel>/thumbnails-160x90/thumb-001.jpg …
    <tmp>/dest.derived/<rel>/probe.ok | transcode-480p.mp4 | remux.mp4 | audio.m4a
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Run
from tests.faultserver import Fault, FaultServer
from tests.media import ffmpeg_exe, ffprobe_exe, jpeg_size, make_clip, streams, truncate
from tests.servers import Served
from tests.trees import settled

pytestmark = pytest.mark.skipif(
    ffmpeg_exe() is None, reason="ffmpeg not found (apt-get install ffmpeg)"
)

needs_ffprobe = pytest.mark.skipif(
    ffprobe_exe() is None, reason="ffprobe not found (apt-get install ffmpeg)"
)

Fetch = Callable[..., Run]


# --- clips, trees, helpers ------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Template clips, made once: copy them into each test's served tree."""
    d = tmp_path_factory.mktemp("clips")
    small = make_clip(d / "small.mp4", seconds=2, size="320x240")
    bad = truncate(shutil.copyfile(small, d / "bad.mp4"))
    return {
        "small": small,  # 2 key frames (one a second)
        "wide": make_clip(d / "wide.mp4", seconds=1, size="1280x720"),
        "bad": bad,  # no moov atom: cannot even be opened
    }


def build(root: Path, clips: dict[str, Path], layout: dict[str, str | bytes]) -> Path:
    """``{rel: clip-name or bytes}`` → files below ``root``."""
    for rel, what in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, bytes):
            path.write_bytes(what)
        else:
            shutil.copyfile(clips[what], path)
    return root


@pytest.fixture
def nginx(served: Callable[..., Served]) -> Callable[[Path], Served]:
    return lambda root: served("nginx", root)


def thumbs(derived: Path, rel: str, size: str = "160x90") -> list[Path]:
    return sorted((derived / rel / f"thumbnails-{size}").glob("thumb-*.jpg"))


def decodes(path: Path) -> bool:
    exe = ffmpeg_exe()
    assert exe is not None
    done = subprocess.run(
        [exe, "-nostdin", "-v", "error", "-i", f"file:{path}", "-f", "null", "-"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0 and not done.stderr


def report(path: Path) -> dict[str, Any]:
    job: dict[str, Any] = json.loads(path.read_text())["jobs"][0]
    return job


def mtimes(tree: Path) -> dict[str, int]:
    return {str(p.relative_to(tree)): p.stat().st_mtime_ns for p in sorted(tree.rglob("*"))}


def leftovers(tree: Path) -> list[Path]:
    return [p for p in tree.rglob("*") if p.name.startswith(".tmp-")]


def summary_lines(output: str, prefix: str) -> list[str]:
    return [ln.strip() for ln in output.splitlines() if ln.strip().startswith(prefix)]


# --- thumbnails --------------------------------------------------------------------


@pytest.mark.real_server
def test_thumbnails_are_decodable_jpegs_of_the_default_size_for_every_clip(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(
        tmp_path / "srv",
        clips,
        {"a.mp4": "small", "sub/B.MP4": "small", "wide.mp4": "wide", "docs/notes.txt": b"hi\n"},
    )
    srv = nginx(root)
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"

    r = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "thumbnails")

    assert r.code == 0, r
    for rel in ("a.mp4", "sub/B.MP4", "wide.mp4"):
        jpgs = thumbs(derived, rel)
        assert jpgs, f"no thumbnails for {rel}: {sorted(derived.rglob('*'))}"
        for jpg in jpgs:
            assert jpeg_size(jpg.read_bytes()) == (160, 90), jpg
            assert decodes(jpg), jpg
    assert len(thumbs(derived, "a.mp4")) == 2  # one per key frame of a 2 s clip
    assert not (derived / "docs").exists()  # not media: no rule matched
    assert not leftovers(derived)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "dest.derived", "servers", "srv"]


# --- probe, report and state -------------------------------------------------------


@pytest.mark.real_server
def test_a_truncated_clip_fails_probe_with_ffmpegs_reason_counted_apart_from_downloads(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"good.mp4": "small", "bad.mp4": "bad"})
    srv = nginx(root)
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"

    r = run_fetch(
        "--mirror", srv.url, "--dest", dest, "--post", "probe", "--report", tmp_path / "r.json"
    )

    assert r.code == 1, r
    [line] = summary_lines(r.output, "post-processing failed")
    assert "bad.mp4 (probe)" in line
    assert "moov atom not found" in r.output  # ffmpeg's own words
    assert (derived / "good.mp4" / "probe.ok").is_file()
    assert not (derived / "bad.mp4" / "probe.ok").exists()
    # The download itself succeeded: the bytes are exactly what the server has.
    assert (dest / "bad.mp4").read_bytes() == (root / "bad.mp4").read_bytes()

    job = report(tmp_path / "r.json")
    assert job["exit_code"] == 1
    assert job["fetched"]["files"] == 2
    assert job["failed"] == []  # downloads: none failed
    assert job["post"] == {"probe done": 1, "probe failed": 1}
    [failure] = job["post_failed"]
    assert failure["path"] == "bad.mp4 (probe)"
    assert "moov atom not found" in failure["error"]


def test_metrics_count_post_processing_failures_apart_from_files(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """Exit 1 for a clip that does not decode: the metrics say why, not 0 files failed."""
    root = build(tmp_path / "srv", clips, {"good.mp4": "small", "bad.mp4": "bad"})
    metrics = tmp_path / "fetch.prom"
    with FaultServer(root=root) as srv:
        r = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "dest", "--post", "probe",
            "--post", "remux", "--metrics", metrics,
        )  # fmt: skip

    assert r.code == 1, r
    lines = metrics.read_text().splitlines()
    assert f'fetch_post_failed{{mirror="{srv.url}"}} 2' in lines  # bad.mp4: probe, remux
    assert f'fetch_files_failed{{mirror="{srv.url}"}} 0' in lines


@pytest.mark.real_server
def test_a_clip_that_breaks_upstream_loses_its_old_outputs(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    """Outputs of the old version must not outlive a failed remake: they would look fresh.

    The new version is dated before the old outputs were made (mirrors do that),
    so only their absence makes a later run try again.
    """
    root = build(tmp_path / "srv", clips, {"c.mp4": "small"})
    srv = nginx(root)
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"
    args = ("--mirror", srv.url, "--dest", dest, "--post", "probe", "--post", "thumbnails")
    first = run_fetch(*args)
    assert first.code == 0, first
    assert (derived / "c.mp4" / "probe.ok").is_file() and thumbs(derived, "c.mp4")
    shutil.copyfile(clips["bad"], root / "c.mp4")
    os.utime(root / "c.mp4", (1_000_000_000, 1_000_000_000))  # 2001

    r = run_fetch(*args)

    assert r.code == 1, r
    assert (dest / "c.mp4").read_bytes() == clips["bad"].read_bytes()
    assert not (derived / "c.mp4").exists()  # no probe.ok vouching for it, no old thumbnails


def test_a_clip_fetched_again_loses_the_outputs_of_rules_this_run_does_not_have(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """Thumbnails of another size, or an action since dropped: made from the old version,
    dated as it was, and never looked at again by the rules of this run."""
    root = build(tmp_path / "srv", clips, {"c.mp4": "small", "same.mp4": "small"})
    then = time.time() - 7200
    os.utime(root / "c.mp4", (then, then))
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"
    with FaultServer(root=root) as srv:
        first = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "remux")
        assert first.code == 0, first
        assert (derived / "c.mp4" / "remux.mp4").is_file()
        shutil.copyfile(clips["wide"], root / "c.mp4")  # a new version upstream
        os.utime(root / "c.mp4", (then + 3600, then + 3600))

        r = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "probe")

    assert r.code == 0, r
    assert (dest / "c.mp4").read_bytes() == clips["wide"].read_bytes()
    assert sorted(os.listdir(derived / "c.mp4")) == ["probe.ok"]  # no remux of the old one
    assert (derived / "same.mp4" / "remux.mp4").is_file()  # not fetched again: kept


@pytest.mark.real_server
def test_a_clip_that_failed_probe_is_fetched_again_next_run(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = settled(build(tmp_path / "srv", clips, {"good.mp4": "small", "bad.mp4": "bad"}))
    srv = nginx(root)
    dest = tmp_path / "dest"
    first = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "probe")
    assert first.code == 1, first
    before = srv.requests(min_count=3)
    assert [q.path for q in before].count("/bad.mp4") == 1

    again = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "probe")

    # This run lists "/" and, with the fix, GETs /bad.mp4 again (nginx logs
    # after answering: poll for the lines, with a deadline).
    after = srv.requests(min_count=len(before) + 2, timeout=2)
    assert [q.path for q in after].count("/bad.mp4") == 2
    assert [q.path for q in after].count("/good.mp4") == 1
    assert again.code == 1, again  # still broken upstream: probed again, failed again


def test_a_probe_that_times_out_does_not_make_the_clip_fetched_again(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """Only a file that does not decode is fetched again: a too-small timeout is no verdict."""
    root = build(tmp_path / "srv", clips, {"c.mp4": "small"})
    with FaultServer(root=root) as srv:
        cfg = tmp_path / "m.toml"
        cfg.write_text(
            f"""
[jobs.media]
url = "{srv.url}"
dest = "dest"

[[jobs.media.post]]
action = "probe"
timeout = 0.001
"""
        )
        first = run_fetch("--config", cfg, "--report", tmp_path / "1.json")
        assert first.code == 1, first
        assert "timed out after" in report(tmp_path / "1.json")["post_failed"][0]["error"]

        again = run_fetch("--config", cfg, "--report", tmp_path / "2.json")

    # not fetched again, and not probed again either: it would only time out again
    assert again.code == 0, again
    job = report(tmp_path / "2.json")
    assert job["fetched"]["files"] == 0, job
    assert job["post"] == {"probe failed before": 1}


def _spy_on_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put first on PATH an ffmpeg that logs its arguments to the file returned."""
    calls = tmp_path / "calls.log"
    spy = tmp_path / "spy" / "ffmpeg"
    spy.parent.mkdir()
    spy.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{ffmpeg_exe()}" "$@"\n')
    spy.chmod(0o755)
    monkeypatch.setenv("PATH", f"{spy.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def _transcodes(calls: Path) -> int:
    return sum("transcode-" in line for line in calls.read_text().splitlines())


def _failed_posts(dest: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
    try:
        return con.execute("SELECT output, made_by FROM post_failures ORDER BY output").fetchall()
    finally:
        con.close()


def test_a_transcode_that_timed_out_is_tried_again_only_when_file_rule_or_user_says(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transcode that timed out was tried again, and timed out again, on every run."""
    root = build(tmp_path / "srv", clips, {"other.mp4": "small"})
    # a minute of 640x360 takes seconds to transcode: never done within the timeouts here
    make_clip(root / "talk.mp4", seconds=60, size="640x360")
    calls = _spy_on_ffmpeg(tmp_path, monkeypatch)
    cfg, dest = tmp_path / "m.toml", tmp_path / "dest"
    metrics = tmp_path / "fetch.prom"

    def config(timeout: float | None) -> None:
        cfg.write_text(
            f"""
[jobs.media]
url = "{srv.url}"
dest = "dest"

[[jobs.media.post]]
action = "transcode"
glob = "talk.mp4"
height = 120
{f"timeout = {timeout}" if timeout else ""}
"""
        )

    def runs(*more: str) -> tuple[Run, dict[str, Any], int]:
        before = _transcodes(calls) if calls.exists() else 0
        r = run_fetch("--config", cfg, "--report", tmp_path / "r.json", "--metrics", metrics, *more)
        return r, report(tmp_path / "r.json"), _transcodes(calls) - before

    with FaultServer(root=root) as srv:
        config(0.5)
        r, job, ran = runs()
        assert (r.code, job["post"], ran) == (1, {"transcode failed": 1}, 1), r
        assert "timed out after 0.5 s" in job["post_failed"][0]["error"]
        assert [o for o, _ in _failed_posts(dest)] == ["talk.mp4/transcode-120p.mp4"]

        # The next run: not tried (no ffmpeg at all), and says so; no failure of its own.
        r, job, ran = runs()
        assert (r.code, job["post"], ran) == (0, {"transcode failed before": 1}, 0), r
        assert job["post_failed"] == []
        [before] = job["post_failed_before"]
        assert before["path"] == "talk.mp4 (transcode)"
        assert before["error"].startswith("timed out after 0.5 s")
        [note] = summary_lines(r.output, "note 1 post-processing output not tried")
        assert "--retry-failed-post" in note
        [line] = summary_lines(r.output, "failed before")
        assert line == "failed before talk.mp4 (transcode): timed out after 0.5 s"
        lines = metrics.read_text().splitlines()
        assert 'fetch_post_failed{mirror="media"} 0' in lines
        assert 'fetch_post_failed_before{mirror="media"} 1' in lines

        # Asked to: tried again (and timed out again).
        r, job, ran = runs("--retry-failed-post")
        assert (r.code, job["post"], ran) == (1, {"transcode failed": 1}, 1), r

        # Another timeout is another rule: tried again; then not, as before.
        config(0.6)
        r, job, ran = runs()
        assert (r.code, job["post"], ran) == (1, {"transcode failed": 1}, 1), r
        assert "timeout=0.6" in _failed_posts(dest)[0][1]
        r, job, ran = runs()
        assert (r.code, job["post"], ran) == (0, {"transcode failed before": 1}, 0), r

        # The file changed upstream (published again, fetched again): tried again.
        later = (root / "talk.mp4").stat().st_mtime + 3600
        os.utime(root / "talk.mp4", (later, later))
        r, job, ran = runs()
        assert (r.code, job["fetched"]["files"], ran) == (1, 1, 1), r
        assert job["post"] == {"transcode failed": 1}

        # Given its time, it is made, and its record goes.
        config(None)
        r, job, ran = runs()
        assert (r.code, job["post"], ran) == (0, {"transcode done": 1}, 1), r
        assert _failed_posts(dest) == []
        config(0.5)
        r, job, ran = runs()
        assert (r.code, job["post"], ran) == (0, {"transcode skipped": 1}, 0), r


@pytest.mark.real_server
def test_a_file_ffmpeg_refuses_is_not_tried_again_and_its_record_goes_with_it(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"good.mp4": "small", "bad.mp4": "bad"})
    srv = nginx(root)
    dest = tmp_path / "dest"
    args = ("--mirror", srv.url, "--dest", dest, "--post", "transcode", "--post", "thumbnails")

    first = run_fetch(*args, "--report", tmp_path / "1.json")
    assert first.code == 1, first
    assert report(tmp_path / "1.json")["post"] == {
        "thumbnails done": 1, "thumbnails failed": 1, "transcode done": 1, "transcode failed": 1
    }  # fmt: skip
    assert [o for o, _ in _failed_posts(dest)] == [
        "bad.mp4/thumbnails-160x90",
        "bad.mp4/transcode-480p.mp4",
    ]

    again = run_fetch(*args, "--report", tmp_path / "2.json")
    assert again.code == 0, again
    job = report(tmp_path / "2.json")
    assert job["post"] == {
        "thumbnails failed before": 1, "thumbnails skipped": 1,
        "transcode failed before": 1, "transcode skipped": 1,
    }  # fmt: skip
    assert "moov atom not found" in job["post_failed_before"][0]["error"]  # ffmpeg's words

    (root / "bad.mp4").unlink()  # gone upstream: its outputs' records go with its row
    gone = run_fetch(*args, "--delete", "--max-delete", "1")
    assert gone.code == 0, gone
    assert _failed_posts(dest) == []


@pytest.mark.real_server
def test_the_summary_prints_names_and_reasons_with_brackets_verbatim(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"[draft] bad.mp4": "bad"})
    srv = nginx(root)

    r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "dest", "--post", "probe")

    assert r.code == 1, r
    [line] = summary_lines(r.output, "post-processing failed")
    assert line.startswith("post-processing failed [draft] bad.mp4 (probe)"), line
    assert "[mov,mp4,m4a" in r.output.split("post-processing failed", 1)[1]


# --- transcode, remux, audio -----------------------------------------------------------


def _by_type(path: Path) -> dict[str, dict[str, Any]]:
    return {s["codec_type"]: s for s in streams(path)}


@needs_ffprobe
@pytest.mark.real_server
def test_transcode_remux_and_audio_make_what_they_promise(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"small.mp4": "small", "hd/wide.mp4": "wide"})
    srv = nginx(root)
    derived = tmp_path / "dest.derived"

    r = run_fetch(
        "--mirror", srv.url, "--dest", tmp_path / "dest",
        "--post", "transcode", "--post", "remux", "--post", "audio",
    )  # fmt: skip

    assert r.code == 0, r
    # transcode: H.264 + AAC, at most 480 lines, never upscaled, even width.
    for rel, (width, height) in {"small.mp4": (320, 240), "hd/wide.mp4": (854, 480)}.items():
        got = _by_type(derived / rel / "transcode-480p.mp4")
        assert set(got) == {"video", "audio"}, got
        assert (got["video"]["codec_name"], got["audio"]["codec_name"]) == ("h264", "aac")
        assert (got["video"]["width"], got["video"]["height"]) == (width, height), rel
        # remux: the same streams, copied into mp4
        remuxed = _by_type(derived / rel / "remux.mp4")
        assert {k: v["codec_name"] for k, v in remuxed.items()} == {"video": "h264", "audio": "aac"}
        assert (remuxed["video"]["width"], remuxed["video"]["height"]) == {
            "small.mp4": (320, 240),
            "hd/wide.mp4": (1280, 720),
        }[rel]
        # audio: the sound alone, as AAC
        audio = streams(derived / rel / "audio.m4a")
        assert [(s["codec_type"], s["codec_name"]) for s in audio] == [("audio", "aac")]
    assert not leftovers(derived)


# --- hostile names --------------------------------------------------------------------


@pytest.mark.real_server
def test_names_like_options_protocols_and_patterns_are_mirrored_and_processed_safely(
    tmp_path: Path,
    clips: dict[str, Path],
    nginx: Callable[[Path], Served],
    run_fetch: Fetch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["-i evil:name.mp4", "sub dir/sp ace 100%.mp4", "-y/%03d.mp4"]
    root = build(tmp_path / "srv", clips, dict.fromkeys(names, "small"))
    srv = nginx(root)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"

    r = run_fetch(
        "--mirror", srv.url, "--dest", out / "dest", "--post", "thumbnails", "--post", "remux"
    )

    assert r.code == 0, r
    derived = out / "dest.derived"
    for rel in names:
        assert (out / "dest" / rel).read_bytes() == (root / rel).read_bytes()
        jpgs = thumbs(derived, rel)
        assert jpgs and all(jpeg_size(j.read_bytes()) == (160, 90) for j in jpgs), rel
        assert (derived / rel / "remux.mp4").stat().st_size > 0
    assert list(cwd.iterdir()) == []  # ffmpeg wrote nothing where it was started
    assert sorted(p.name for p in out.iterdir()) == ["dest", "dest.derived"]
    assert not leftovers(derived)
    made = {str(p.relative_to(derived)) for p in derived.rglob("*") if p.is_file()}
    assert all(any(m.startswith(f"{n}/") for n in names) for m in made), made


# --- incremental ---------------------------------------------------------------------


@pytest.mark.real_server
def test_a_rerun_of_an_unchanged_mirror_runs_no_ffmpeg(
    tmp_path: Path,
    clips: dict[str, Path],
    nginx: Callable[[Path], Served],
    run_fetch: Fetch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = build(tmp_path / "srv", clips, {"a.mp4": "small", "sub/b.mp4": "small"})
    srv = nginx(root)
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"
    args = ("--mirror", srv.url, "--dest", dest, "--post", "thumbnails", "--post", "probe")
    first = run_fetch(*args)
    assert first.code == 0, first
    made = mtimes(derived)
    # sub/, and per clip: its directory, thumbnails-160x90/, 2 JPEGs, the record of their
    # options (.thumbnails-160x90.options), probe.ok
    assert len(made) == 1 + 2 * (1 + 1 + 2 + 1 + 1)

    # The second run finds a wrapper first on PATH that logs every invocation.
    calls = tmp_path / "calls.log"
    spy = tmp_path / "spy" / "ffmpeg"
    spy.parent.mkdir()
    spy.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{ffmpeg_exe()}" "$@"\n')
    spy.chmod(0o755)
    monkeypatch.setenv("PATH", f"{spy.parent}{os.pathsep}{os.environ['PATH']}")

    again = run_fetch(*args, "--report", tmp_path / "r.json")

    assert again.code == 0, again
    assert calls.read_text().splitlines() == ["-hide_banner -version"]  # found, never run
    job = report(tmp_path / "r.json")
    assert job["fetched"]["files"] == 0
    assert job["post"] == {"thumbnails skipped": 2, "probe skipped": 2}
    assert "thumbnails skipped 2" in again.output
    assert mtimes(derived) == made  # nothing rewritten, nothing added


@needs_ffprobe
def test_a_clip_replaced_upstream_and_fetched_without_post_gets_new_outputs_later(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """The new version is dated after the old one but before the old outputs were made:
    its server date alone would make them look fresh."""
    root = build(tmp_path / "srv", clips, {"c.mp4": "small"})
    then = time.time() - 7200
    os.utime(root / "c.mp4", (then, then))
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"
    with FaultServer(root=root) as srv:
        first = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "remux")
        assert first.code == 0, first
        shutil.copyfile(clips["wide"], root / "c.mp4")
        os.utime(root / "c.mp4", (then + 3600, then + 3600))
        plain = run_fetch("--mirror", srv.url, "--dest", dest, "--report", tmp_path / "1.json")
        assert plain.code == 0 and report(tmp_path / "1.json")["fetched"]["files"] == 1, plain

        r = run_fetch(
            "--mirror", srv.url, "--dest", dest, "--post", "remux", "--report", tmp_path / "2.json"
        )

    assert r.code == 0, r
    assert report(tmp_path / "2.json")["post"] == {"remux done": 1}
    assert _by_type(derived / "c.mp4" / "remux.mp4")["video"]["width"] == 1280


@pytest.mark.real_server
def test_delete_removes_a_vanished_clips_outputs_and_keeps_the_others(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"keep.mp4": "small", "old/gone.mp4": "small"})
    srv = nginx(root)
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"
    first = run_fetch("--mirror", srv.url, "--dest", dest, "--post", "thumbnails")
    assert first.code == 0, first
    assert thumbs(derived, "old/gone.mp4")
    kept = mtimes(derived / "keep.mp4")
    (root / "old" / "gone.mp4").unlink()
    (root / "old").rmdir()
    # a file of the user's, with a name fetch would refuse to fetch (it aborted the run)
    shutil.copyfile(clips["small"], dest / "loc\\al.mp4")

    r = run_fetch(
        "--mirror", srv.url, "--dest", dest, "--post", "thumbnails",
        "--delete", "--max-delete", "2", "--report", tmp_path / "r.json",
    )  # fmt: skip

    assert r.code == 0, r
    assert sorted(report(tmp_path / "r.json")["deleted"]) == ["loc\\al.mp4", "old/gone.mp4"]
    assert not (dest / "old" / "gone.mp4").exists()
    assert not (derived / "old").exists()  # its outputs, and the emptied directory
    assert mtimes(derived / "keep.mp4") == kept
    assert len(thumbs(derived, "keep.mp4")) == 2


# --- rules from a config file ---------------------------------------------------------


@pytest.mark.real_server
def test_config_rules_set_options_and_a_never_ending_custom_rule_is_killed_at_its_timeout(
    tmp_path: Path, clips: dict[str, Path], nginx: Callable[[Path], Served], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"a.mp4": "small"})
    srv = nginx(root)
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f"""
[jobs.media]
url = "{srv.url}"
dest = "dest"

[[jobs.media.post]]
action = "thumbnails"
size = "96x96"
count = 1

[[jobs.media.post]]
action = "custom"
name = "forever"
ext = "mkv"
timeout = 1.5
# reads a source that never ends: only the timeout stops it
args = ["-re", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-f", "matroska", "{{output}}"]
"""
    )
    started = time.monotonic()

    r = run_fetch("--config", cfg, "--report", tmp_path / "r.json")

    assert r.code == 1, r
    assert time.monotonic() - started < 30
    derived = tmp_path / "dest.derived"
    [jpg] = thumbs(derived, "a.mp4", "96x96")  # count = 1
    assert jpeg_size(jpg.read_bytes()) == (96, 96)
    assert not (derived / "a.mp4" / "custom-forever.mkv").exists()
    assert not leftovers(derived)
    job = report(tmp_path / "r.json")
    assert job["post"] == {"thumbnails done": 1, "custom-forever failed": 1}
    [failure] = job["post_failed"]
    assert failure["path"] == "a.mp4 (custom-forever)"
    assert "timed out after 1.5 s" in failure["error"]


def test_two_custom_rules_are_told_apart_in_the_summary_and_the_report(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """Each custom rule is named by its output (``custom-<name>``, else its place): both
    used to be just "custom", so a failure did not say which rule's it was."""
    root = build(tmp_path / "srv", clips, {"a.mp4": "small"})
    cfg = tmp_path / "m.toml"
    with FaultServer(root=root) as srv:
        cfg.write_text(
            f"""
[jobs.media]
url = "{srv.url}"
dest = "dest"

[[jobs.media.post]]
action = "custom"
name = "still"
ext = "png"
args = ["-i", "{{input}}", "-frames:v", "1", "{{output}}"]

[[jobs.media.post]]
action = "custom"
ext = "mkv"
args = ["-i", "{{input}}", "-c:v", "no-such-encoder", "{{output}}"]
"""
        )
        r = run_fetch("--config", cfg, "--report", tmp_path / "r.json")
        assert not srv.errors, srv.errors

    assert r.code == 1, r
    assert (tmp_path / "dest.derived/a.mp4/custom-still.png").is_file()
    job = report(tmp_path / "r.json")
    assert job["post"] == {"custom-still done": 1, "custom-2 failed": 1}
    [failure] = job["post_failed"]
    assert failure["path"] == "a.mp4 (custom-2)", failure
    assert summary_lines(r.output, "post-processing failed") == [
        "post-processing failed a.mp4 (custom-2): ffmpeg exited with status 1"
    ]


# --- overlap --------------------------------------------------------------------------


def test_post_processing_starts_while_a_download_is_still_running(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """A held download cannot finish until a thumbnail exists: so they overlapped.

    The server holds ``/zz-big.bin`` until the gate opens; a watcher opens it as
    soon as the clip's thumbnails appear (or at a deadline, which fails the test).
    It is bigger than download.RESUME_MIN: a lane of its own. (A small file's held
    answer would hold the clip too, were the clip behind it in one pipelined train.)
    """
    root = build(tmp_path / "srv", clips, {"a.mp4": "small", "zz-big.bin": os.urandom(2 << 20)})
    derived = tmp_path / "dest.derived"
    gate = threading.Event()
    seen: dict[str, int] = {}

    def watch() -> None:
        deadline = time.monotonic() + 20
        while not gate.is_set() and time.monotonic() < deadline:
            if thumbs(derived, "a.mp4"):
                seen["big requests when thumbnails appeared"] = srv.count(path="/zz-big.bin")
                break
            gate.wait(0.02)
        gate.set()

    with FaultServer(root=root) as srv:
        srv.persist("/zz-big.bin", Fault.gated(gate))
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "dest", "--post", "thumbnails")
        finally:
            gate.set()
            watcher.join(timeout=30)
        assert not srv.errors, srv.errors

    assert r.code == 0, r
    assert seen, "no thumbnail appeared while /zz-big.bin was held: no overlap"
    assert (tmp_path / "dest" / "zz-big.bin").read_bytes() == (root / "zz-big.bin").read_bytes()


def test_the_download_rate_leaves_out_the_wait_for_ffmpeg(
    tmp_path: Path, clips: dict[str, Path]
) -> None:
    """ "fetched 1  25.6 MiB (802.0 KiB/s)" for a download that took a third of a second
    and a transcode that took 32: the rate divided by the whole run."""
    import io

    from fetcher.config import MirrorJob
    from fetcher.pipeline import mirror
    from fetcher.postprocess import rule_from_mapping
    from fetcher.progress import human_bytes
    from fetcher.report import render_plain

    root = build(tmp_path / "srv", clips, {"a.mp4": "small"})
    args = ["-re", "-i", "{input}", "-c", "copy", "{output}"]  # 2 s, the clip's pace
    rule = rule_from_mapping({"action": "custom", "name": "slow", "ext": "mkv", "args": args}, "t")
    with FaultServer(root=root) as srv:
        s = mirror(MirrorJob(url=srv.url, dest=tmp_path / "dest", post=(rule,), post_jobs=1))
    out = io.StringIO()
    render_plain(s, out)

    assert s.post == {"custom-slow done": 1}
    assert s.finished - s.downloaded >= 1.5  # ffmpeg's time, after the last download
    rate = human_bytes(s.fetched.bytes / (s.downloaded - s.started))
    assert f"({rate}/s)" in out.getvalue(), out.getvalue()
    assert f"({human_bytes(s.fetched.bytes / s.elapsed)}/s)" not in out.getvalue()


def test_the_json_status_event_counts_ffmpeg_work(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """The text status line said "ffmpeg 1 done, 0 to do, 1 failed"; the JSON one, the
    same event, had no field for any of it."""
    root = build(tmp_path / "srv", clips, {"good.mp4": "small", "bad.mp4": "bad"})
    with FaultServer(root=root) as srv:
        r = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "dest", "--post", "probe",
            "--log-format", "json",
        )  # fmt: skip

    assert r.code == 1, r
    records = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    status = [rec for rec in records if rec["event"] == "status"][-1]
    assert status["post"] == {
        "queued": 0, "running": 0, "done": 1, "skipped": 0, "failed": 1, "failed_before": 0
    }  # fmt: skip


def test_the_status_shows_ffmpeg_work_under_way_before_any_of_it_has_finished(
    tmp_path: Path, clips: dict[str, Path]
) -> None:
    """Long transcodes after the last download: the status said nothing of them (no
    line at all for their whole time) until the first had finished."""
    from fetcher.config import MirrorJob
    from fetcher.models import Reporter
    from fetcher.pipeline import mirror
    from fetcher.postprocess import PostCounts, rule_from_mapping

    class Seen(Reporter):
        def __init__(self) -> None:
            self.counts: list[PostCounts] = []

        def post_progress(self, c: PostCounts) -> None:
            self.counts.append(c)

    root = build(tmp_path / "srv", clips, {"a.mp4": "small"})
    # as long as the clip (-re: read at its own pace), 2 s
    args = ["-re", "-i", "{input}", "-c", "copy", "{output}"]
    rule = rule_from_mapping({"action": "custom", "name": "slow", "ext": "mkv", "args": args}, "t")
    seen = Seen()
    with FaultServer(root=root) as srv:
        job = MirrorJob(url=srv.url, dest=tmp_path / "dest", post=(rule,), post_jobs=1)
        summary = mirror(job, seen)

    assert summary.post == {"custom-slow done": 1}
    first = seen.counts[0]  # shown once queued (or already started)
    assert (first.queued + first.running, first.done) == (1, 0), seen.counts
    assert PostCounts(running=1) in seen.counts  # and while it runs
    assert seen.counts[-1] == PostCounts(done=1)


def test_ctrl_c_while_clips_download_ends_the_run_interrupted(
    tmp_path: Path, clips: dict[str, Path]
) -> None:
    """Files still finish while a stopped run drains its workers; post-processing was
    cancelled by then, and handing them to it raised RuntimeError (a traceback, exit 1,
    no summary)."""
    import signal

    from tests.background import fetch_session

    root = build(tmp_path / "srv", clips, {f"c{i:02}.mp4": "small" for i in range(40)})
    dest = tmp_path / "dest"
    with FaultServer(root=root) as srv:
        argv = ["--mirror", srv.url, "--dest", str(dest), "--post", "thumbnails",
                "--post-jobs", "2", "--limit-rate", "400K"]  # fmt: skip
        with fetch_session(argv) as proc:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(list(dest.glob("c*.mp4"))) < 3:
                time.sleep(0.02)
            assert len(list(dest.glob("c*.mp4"))) >= 3, "no clip arrived"
            os.kill(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=90)
    text = out.decode(errors="replace")
    assert proc.returncode == 130 and "Traceback" not in text, text
    assert "interrupted" in text, text
    assert not leftovers(tmp_path / "dest.derived"), "a half-made output was left"


def test_dest_given_as_dotdot_gets_its_derived_tree_beside_it(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = build(tmp_path / "srv", clips, {"a.mp4": "small"})
    (tmp_path / "mirror" / "notes").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "mirror" / "notes")
    with FaultServer(root=root) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", "..", "--post", "probe")

    assert r.code == 0, r  # was refused: "the derived tree .../notes/...derived must lie outside"
    assert (tmp_path / "mirror" / "a.mp4").is_file()
    assert (tmp_path / "mirror.derived" / "a.mp4" / "probe.ok").is_file()


def test_a_post_dest_that_cannot_be_written_stops_the_run_before_any_download(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    root = build(tmp_path / "srv", clips, {"a.mp4": "small", "b.mp4": "small"})
    in_the_way = tmp_path / "outputs"
    in_the_way.write_text("a file of the user's\n")
    dest = tmp_path / "dest"
    with FaultServer(root=root) as srv:
        r = run_fetch(
            "--mirror", srv.url, "--dest", dest, "--post", "probe", "--post-dest", in_the_way
        )

    assert r.code == 4, r
    assert f"cannot write to {in_the_way}: Not a directory" in r.output
    assert "post-processing failed" not in r.output
    assert not (dest / "a.mp4").exists() and not (dest / "b.mp4").exists()
    assert in_the_way.read_text() == "a file of the user's\n"


def test_a_symbolic_link_in_the_derived_tree_is_one_clear_line_never_a_traceback(
    tmp_path: Path, clips: dict[str, Path], run_fetch: Fetch
) -> None:
    """A link in DERIVED that loops ended the run in a traceback (Python's "Symlink
    loop"), and one to elsewhere failed each output as "DERIVED/a/x.mp4 is not below
    DERIVED", which it seems to be: the link was never named."""
    root = build(tmp_path / "srv", clips, {"a/x.mp4": "small", "b/y.mp4": "small"})
    dest, derived, elsewhere = tmp_path / "dest", tmp_path / "dest.derived", tmp_path / "other"
    derived.mkdir()
    elsewhere.mkdir()
    (derived / "a").symlink_to("a")  # a loop
    (derived / "b").symlink_to(elsewhere)
    with FaultServer(root=root) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--post", "remux")
        r = run_fetch(*args, "--report", tmp_path / "r.json")
        assert r.code == 1, r
        assert "Traceback" not in r.output
        failed = report(tmp_path / "r.json")["post_failed"]
        assert sorted(failed, key=lambda f: str(f["path"])) == [
            {
                "path": "a/x.mp4 (remux)",
                "error": f"{derived}/a is a loop of symbolic links: outputs are written only"
                f" into directories below {derived} (replace the link with one)",
            },
            {
                "path": "b/y.mp4 (remux)",
                "error": f"{derived}/b is a symbolic link to {elsewhere}, which is not below"
                f" {derived}: outputs are written only into directories below it (replace the"
                " link with one)",
            },
        ]
        assert list(elsewhere.iterdir()) == []  # nothing written through the link

        # --delete of a vanished source whose outputs lie past a loop: its file goes.
        (root / "a/x.mp4").unlink()
        r = run_fetch(*args, "--delete", "--max-delete", "1")
        assert "Traceback" not in r.output
        assert not (dest / "a/x.mp4").exists() and (derived / "a").is_symlink()

        # The derived tree itself a loop: refused at start, exit 2, in one line.
        (derived / "b").unlink()
        (derived / "a").unlink()
        derived.rmdir()
        derived.symlink_to(derived.name)
        r = run_fetch(*args)
    assert r.code == 2, r
    assert r.output == f"fetch: error: the derived tree {derived} is a loop of symbolic links\n"


# --- no ffmpeg ------------------------------------------------------------------------


def test_without_ffmpeg_a_post_rule_is_a_usage_error_with_an_install_hint(
    tmp_path: Path, run_fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # the import raises ImportError
    dest = tmp_path / "dest"

    r = run_fetch("--mirror", "http://127.0.0.1:9/", "--dest", dest, "--post", "thumbnails")

    assert r.code == 2, r
    assert "ffmpeg not found" in r.output
    assert "apt-get install ffmpeg" in r.output
    assert "fetcher[media]" in r.output
    assert not dest.exists()  # refused at start-up, before touching anything
