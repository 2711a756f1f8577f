"""Post-processing: argv builders, rules, the plan, and the pool against real ffmpeg."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fetcher import ffmpeg as ffmpeg_mod
from fetcher.errors import ConfigError, UnsafePath, UsageError
from fetcher.ffmpeg import (
    FFmpeg,
    PostProcessError,
    RunResult,
    audio_argv,
    custom_argv,
    find_ffmpeg,
    media_seconds,
    parse_version,
    probe_argv,
    remux_argv,
    run,
    thumbnails_argv,
    transcode_argv,
)
from fetcher.postprocess import (
    AUDIO_GLOBS,
    DEFAULT_TIMEOUT,
    VIDEO_GLOBS,
    PostCounts,
    PostOptions,
    PostOutcome,
    PostPool,
    PostRule,
    PostStatus,
    check_derived,
    default_timeout,
    made_with,
    needs_ffmpeg,
    parse_post_spec,
    plan_post,
    remove_derived,
    require_ffmpeg,
    rule_from_mapping,
)

try:
    from tests.media import (
        ffprobe_exe,
        jpeg_size,
        make_clip,
        make_dubbed_clip,
        streams,
        truncate,
        unknown_codec,
    )
except ImportError:  # tests/ itself is on sys.path, not its parent
    from media import (  # type: ignore[no-redef,import-not-found,unused-ignore]
        ffprobe_exe,
        jpeg_size,
        make_clip,
        make_dubbed_clip,
        streams,
        truncate,
        unknown_codec,
    )

FF = find_ffmpeg()
needs_ff = pytest.mark.skipif(
    FF is None, reason="ffmpeg not found: apt-get install ffmpeg, or pip install imageio-ffmpeg"
)
needs_ffprobe = pytest.mark.skipif(ffprobe_exe() is None, reason="ffprobe not found")
FAKE = FFmpeg("/opt/ff/ffmpeg", (5, 1, 2))
FOREVER = ["-re", "-f", "lavfi", "-i", "testsrc", "-f", "mp4", "{output}"]


# --- argv builders: pure, no shell, every path behind file: -------------------------------


def _all_argvs(src: Path, out: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "thumbnails": thumbnails_argv(FAKE, src, tmp, size=(320, 180), count=4),
        "probe": probe_argv(FAKE, src),
        "transcode": transcode_argv(FAKE, src, out, height=360, crf=30, preset="fast"),
        "remux": remux_argv(FAKE, src, out),
        "audio": audio_argv(FAKE, src, out),
        "custom": custom_argv(FAKE, ["-i", "{input}", "{output}"], src=src, out=out, outdir=tmp),
    }


def test_argv_builders_are_lists_with_safe_prefix_and_file_paths() -> None:
    src, out, tmp = Path("/m/-i evil:name.mp4"), Path("/d/.tmp-1-x/o.mp4"), Path("/d/.tmp-1-x")
    for action, argv in _all_argvs(src, out, tmp).items():
        assert argv[0] == "/opt/ff/ffmpeg", action
        assert argv[1:3] == ["-nostdin", "-hide_banner"], action
        assert argv[argv.index("-loglevel") + 1] == "error", action
        assert ("-y" in argv) == (action != "probe"), action  # -y only where we write a temp
        assert all(isinstance(a, str) for a in argv)
        assert f"file:{src}" in argv, action
        # No element is a bare path (an option or protocol to ffmpeg).
        assert not any(a.startswith(("/m/", "/d/", "-i evil")) for a in argv), action
    argvs = _all_argvs(src, out, tmp)
    assert argvs["probe"][-3:] == ["-f", "null", "-"] and "-xerror" in argvs["probe"]
    assert argvs["transcode"][-1] == f"file:{out}" and "libx264" in argvs["transcode"]
    assert (
        "+faststart" in argvs["remux"] and argvs["remux"][argvs["remux"].index("-c") + 1] == "copy"
    )
    assert "-vn" in argvs["audio"] and "aac" in argvs["audio"]
    thumbs = argvs["thumbnails"]
    assert thumbs[-1] == "file:/d/.tmp-1-x/thumb-%03d.jpg"
    assert thumbs[thumbs.index("-frames:v") + 1] == "4"
    assert thumbs[thumbs.index("-fps_mode") + 1] == "vfr"
    assert "select='eq(pict_type\\,I)'" in thumbs[thumbs.index("-vf") + 1]
    assert "shell=" not in Path(ffmpeg_mod.__file__).read_text()


def test_argv_builders_handle_percent_old_versions_and_relative_paths() -> None:
    tmp = Path("/d/100%/.tmp-1-x")
    assert (
        thumbnails_argv(FAKE, Path("/m/a.mp4"), tmp)[-1] == "file:/d/100%%/.tmp-1-x/thumb-%03d.jpg"
    )
    old = FFmpeg("/ff", (4, 4))
    assert "-vsync" in thumbnails_argv(old, Path("/a"), Path("/o")) and old.fps_mode[0] == "-vsync"
    assert FFmpeg("/ff", ()).fps_mode == ("-fps_mode", "vfr")  # a git build: assume new
    with pytest.raises(ValueError, match="absolute"):
        probe_argv(FAKE, Path("relative.mp4"))


def test_custom_placeholders_are_substituted_inside_each_element_once() -> None:
    src = Path("/m/{output} x.mkv")
    argv = custom_argv(
        FAKE,
        ["-i", "{input}", "-metadata", "title={stem}", "{outdir}/f-%02d.png", "{output}"],
        src=src,
        out=Path("/d/t/custom-1.mkv"),
        outdir=Path("/d/t"),
    )
    assert argv[-6:] == [
        "-i",
        "file:/m/{output} x.mkv",  # a name containing a placeholder is left as it is
        "-metadata",
        "title={output} x",
        "file:/d/t/f-%02d.png",
        "file:/d/t/custom-1.mkv",
    ]


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026", (5, 1, 9)),
        ("ffmpeg version n9.0.2-17-g2a571b6068-20260930 Copyright", (9, 0, 2)),
        ("ffmpeg version 4.4 Copyright", (4, 4)),
        ("ffmpeg version N-112345-gabcdef Copyright", ()),
        ("", ()),
    ],
)
def test_parse_version(text: str, version: tuple[int, ...]) -> None:
    assert parse_version(text) == version


# --- finding ffmpeg ---------------------------------------------------------------------


def test_absent_ffmpeg_is_a_usage_error_naming_both_remedies(tmp_path: Path) -> None:
    assert find_ffmpeg(str(tmp_path), fallback=False) is None
    rules = [parse_post_spec("probe")]
    assert needs_ffmpeg(rules) and not needs_ffmpeg([])
    with pytest.raises(UsageError) as info:
        require_ffmpeg(rules, find=lambda: None)
    assert info.value.exit_code == 2
    assert str(info.value) == (
        "ffmpeg not found: install it (apt-get install ffmpeg) or `pip install 'fetcher[media]'`"
    )


@needs_ff
def test_found_ffmpeg_has_a_version_and_the_right_fps_flag() -> None:
    assert FF is not None and os.path.isabs(FF.path)
    assert FF.version >= (5, 1) and FF.fps_mode == ("-fps_mode", "vfr")
    assert pickle.loads(pickle.dumps(FF)) == FF


# --- run(): the one subprocess seam -------------------------------------------------------


def test_run_keeps_the_stderr_tail_and_returns_the_status() -> None:
    code = "import sys\nfor i in range(100): print('line', i, file=sys.stderr)\nsys.exit(3)"
    result = run([sys.executable, "-c", code], timeout=30)
    assert result.returncode == 3
    assert result.stderr_tail.splitlines() == [f"line {i}" for i in range(80, 100)]


def test_run_kills_the_whole_process_group_on_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(PostProcessError, match="timed out after 1 s"):
        run([sys.executable, "-c", code], timeout=1)
    assert time.monotonic() - started < 10
    # The grandchild went with the group (SIGKILL lands at once; dying takes a moment).
    assert _eventually(lambda: not _alive(int(pidfile.read_text())))


def test_run_keeps_the_start_of_stdout_when_asked() -> None:
    code = "import sys\nprint('12.5')\nsys.stdout.write('x' * (1 << 20))"
    result = run([sys.executable, "-c", code], timeout=30, output=True)
    assert result.returncode == 0 and result.output.startswith("12.5\nxx")
    assert len(result.output) == 64 << 10  # bounded; the rest was read and dropped
    assert run([sys.executable, "-c", code], timeout=30).output == ""


def test_run_reports_a_missing_program_and_a_cancel() -> None:
    with pytest.raises(PostProcessError, match="cannot run"):
        run(["/nonexistent/ffmpeg", "-version"], timeout=5)
    stop = threading.Event()
    stop.set()
    with pytest.raises(PostProcessError, match="cancelled"):
        run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=30, stop=stop)


def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return found


@needs_ff
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ffmpeg_dies_with_a_killed_fetch() -> None:
    """kill -9 of fetch must not leave ffmpeg running (in its own session, nothing else
    would stop it).  ffmpeg is started from a pool thread, as the PostPool does."""
    assert FF is not None
    argv = [FF.path, "-nostdin", "-loglevel", "error", "-nostats", "-re"]
    argv += ["-f", "lavfi", "-i", "testsrc=size=32x24:rate=5"]  # silent: no SIGPIPE
    code = (
        "import sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from fetcher.ffmpeg import run\n"
        f"ThreadPoolExecutor(1).submit(run, {[*argv, '-f', 'null', '-']!r}, 120).result()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(ffmpeg_mod.__file__).parents[1])}
    fetch = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL)
    ffmpeg: list[int] = []
    try:
        assert _eventually(lambda: bool(ffmpeg.extend(_children(fetch.pid)) or ffmpeg), 20)
        fetch.kill()
        fetch.wait(timeout=10)
        assert _eventually(lambda: not _alive(ffmpeg[0]))
    finally:
        fetch.kill()
        fetch.wait(timeout=10)
        for pid in ffmpeg:  # ours, if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_post_process_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(PostProcessError("ffmpeg exited with status 1", "moov")))
    assert (err.message, err.tail, str(err)) == ("ffmpeg exited with status 1", "moov", err.message)


# --- rules ------------------------------------------------------------------------------


def test_post_spec_and_default_globs() -> None:
    assert parse_post_spec("thumbnails=*.mp4") == PostRule("thumbnails", ("*.mp4",))
    assert parse_post_spec("remux=a/*.mkv,*.ts").globs == ("a/*.mkv", "*.ts")
    assert parse_post_spec("transcode").globs == VIDEO_GLOBS
    assert parse_post_spec("probe").globs == VIDEO_GLOBS + AUDIO_GLOBS
    for bad, match in [
        ("resize", "unknown action"),
        ("custom", "config file"),
        ("probe=", "empty"),
    ]:
        with pytest.raises(UsageError, match=match):
            parse_post_spec(bad)


def test_a_glob_rooted_at_slash_which_no_path_has_is_refused_with_the_one_meant() -> None:
    """Paths are matched as "talks/a.mkv": "/talks/*.mkv" made a rule that took nothing,
    without a word, on every run."""
    for spec in ["transcode=/talks/*.mkv", "probe=*.mp4,./talks/*.mkv"]:
        with pytest.raises(UsageError, match=r'never matches.* \(write "talks/\*\.mkv"\)'):
            parse_post_spec(spec)
    with pytest.raises(ConfigError, match=r'post\[0\]\.glob: "/talks/\*\.mkv" never matches'):
        rule_from_mapping({"action": "probe", "glob": ["*.mp4", "/talks/*.mkv"]}, "post[0]")
    assert parse_post_spec("probe=.hidden/*.mp4").globs == (".hidden/*.mp4",)  # not rooted


def test_globs_match_base_name_without_slash_and_whole_path_with_one() -> None:
    rule = PostRule("probe", ("*.mp4", "raw/*.ts"))
    assert rule.matches("a/b/C.MP4") and rule.matches("raw/x/y.ts")
    assert not rule.matches("a/raw/y.ts") and not rule.matches("a/mp4") and not rule.matches("x.ts")


def test_rule_from_mapping_reads_every_option() -> None:
    rule = rule_from_mapping(
        {"action": "thumbnails", "glob": ["*.mkv"], "size": "320x180", "count": 3, "timeout": 5},
        "post[0]",
    )
    assert (rule.globs, rule.options.size, rule.options.count, rule.timeout) == (
        ("*.mkv",),
        (320, 180),
        3,
        5.0,
    )
    custom = rule_from_mapping({"action": "custom", "args": FOREVER, "ext": "mkv"}, "p")
    assert custom.options.args == tuple(FOREVER) and custom.globs == VIDEO_GLOBS


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"action": "transcode", "height": "x"},
            'j.height: expected an integer ≥ 16 and ≤ 4320, got "x"',
        ),
        ({"action": "transcode", "crf": 99}, "j.crf: expected an integer ≥ 0 and ≤ 51, got 99"),
        ({"action": "thumbnails", "count": True}, "j.count: expected an integer"),
        ({"action": "thumbnails", "size": "161x90"}, 'j.size: expected "WIDTHxHEIGHT"'),
        ({"action": "transcode", "preset": "quick"}, "j.preset: expected one of ultrafast"),
        ({"action": "probe", "glob": 3}, "j.glob: expected a glob or a list of globs, got 3"),
        ({"action": "probe", "timeout": 0}, "j.timeout: expected a number of seconds > 0"),
        ({"action": "thumbnails", "height": 480}, "j.height: not an option of thumbnails"),
        ({"action": "transcode", "heigth": 480}, "j.heigth: unknown key"),
        (
            {"action": "resize"},
            'j.action: expected one of thumbnails, probe, transcode, remux, audio, custom; got "resize"',
        ),
        ({"glob": "*.mp4"}, "j.action: expected one of"),
        ({"action": "custom"}, "j.args: missing"),
        (
            {"action": "custom", "args": ["-i", "{input}"]},
            "j.args: must contain {output} or {outdir}",
        ),
        ({"action": "custom", "args": "-i {input} {output}"}, "j.args: expected a list of strings"),
        (
            {"action": "custom", "args": ["-i", "{inputt}", "{output}"]},
            'j.args: {inputt} in "{inputt}" is no placeholder; did you mean {input}?',
        ),
        (
            {"action": "custom", "args": ["-i", "{input}", "{outdir}/{Stem}.png"]},
            'j.args: {Stem} in "{outdir}/{Stem}.png" is no placeholder; did you mean {stem}?',
        ),
        ({"action": "custom", "args": ["{output}"], "ext": "../x"}, "j.ext: expected"),
        ("probe", 'j: expected a table with an action, got "probe"'),
    ],
)
def test_config_errors_name_the_key(table: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        rule_from_mapping(table, "j")
    assert str(info.value).startswith(message)
    assert info.value.exit_code == 2


def test_unknown_key_suggests_the_near_one() -> None:
    with pytest.raises(ConfigError) as info:
        rule_from_mapping({"action": "transcode", "heigth": 480}, "j")
    assert info.value.hint == "did you mean 'height'?"


# --- the plan and the derived tree -------------------------------------------------------


def test_plan_lays_out_one_directory_per_source() -> None:
    rules = [
        rule_from_mapping({"action": "thumbnails"}, "a"),
        parse_post_spec("probe"),
        rule_from_mapping({"action": "transcode", "height": 720}, "b"),
        parse_post_spec("remux"),
        parse_post_spec("audio"),
        rule_from_mapping({"action": "custom", "args": ["-i", "{input}", "{output}"]}, "c"),
        rule_from_mapping({"action": "custom", "args": ["{outdir}/x.png"], "name": "frames"}, "d"),
        parse_post_spec("probe"),  # the same output again: the first rule wins
    ]
    tasks = plan_post(rules, "tv/s01/Ep 1.MKV")
    assert [(t.output, t.is_dir) for t in tasks] == [
        ("tv/s01/Ep 1.MKV/thumbnails-160x90", True),
        ("tv/s01/Ep 1.MKV/probe.ok", False),
        ("tv/s01/Ep 1.MKV/transcode-720p.mp4", False),
        ("tv/s01/Ep 1.MKV/remux.mp4", False),
        ("tv/s01/Ep 1.MKV/audio.m4a", False),
        ("tv/s01/Ep 1.MKV/custom-1.mkv", False),
        ("tv/s01/Ep 1.MKV/custom-frames", True),
    ]
    assert all(t.source == "tv/s01/Ep 1.MKV" for t in tasks)
    assert pickle.loads(pickle.dumps(tasks)) == tasks
    assert [t.output for t in plan_post(rules, "song.flac")] == ["song.flac/probe.ok"]
    assert plan_post(rules, "README.txt") == []


@pytest.mark.parametrize(
    "rel", ["../x.mp4", "a/../../x.mp4", "/etc/x.mp4", ".fetcher/x.mp4", "a//b.mp4"]
)
def test_plan_refuses_unsafe_paths(rel: str) -> None:
    with pytest.raises(UnsafePath):
        plan_post([parse_post_spec("probe")], rel)


def test_remove_derived_stays_inside_the_tree(tmp_path: Path) -> None:
    derived = tmp_path / "dest.derived"
    (derived / "a/b/clip.mp4/thumbnails-160x90").mkdir(parents=True)
    (derived / "a/b/clip.mp4/probe.ok").write_text("ok")
    (derived / "a/keep.mp4").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    (derived / "a/link.mp4").symlink_to(outside)
    assert remove_derived(derived, "a/b/clip.mp4")
    assert not (derived / "a/b").exists() and (derived / "a/keep.mp4").is_dir()
    assert not remove_derived(derived, "a/b/clip.mp4")
    for bad in ["../outside", "a/link.mp4"]:
        with pytest.raises(UnsafePath):
            remove_derived(derived, bad)
    assert (outside / "precious").read_text() == "x"


def test_derived_tree_must_not_overlap_the_mirror(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    check_derived(dest, tmp_path / "dest.derived")
    check_derived(dest, dest / ".fetcher" / "derived")
    for bad in [dest / "derived", tmp_path]:
        with pytest.raises(UsageError, match="outside"):
            check_derived(dest, bad)
    # where fetch clears what a run left (staged metadata, partial files): not there
    for cleared in ["staged", "partial", "staged/x", "partial/x"]:
        with pytest.raises(UsageError, match="which runs clear"):
            check_derived(dest, dest / ".fetcher" / cleared)
    # .fetcher itself: DERIVED/state.sqlite, the outputs of a source of that name, is the
    # mirror's state (removed by --delete when the source vanished)
    for top in [dest / ".fetcher", dest / ".fetcher" / "."]:
        with pytest.raises(UsageError, match="holds fetch's state"):
            check_derived(dest, top)


# --- the pool, against real ffmpeg ----------------------------------------------------------


class Counting:
    """A runner that counts ffmpeg runs and remembers their argv."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], timeout: float, stop: threading.Event | None
    ) -> RunResult:
        self.calls.append(list(argv))
        return run(argv, timeout, stop)


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if FF is None:
        pytest.skip("ffmpeg not found: apt-get install ffmpeg, or pip install imageio-ffmpeg")
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4").read_bytes()


@pytest.fixture
def tree(tmp_path: Path, clip_bytes: bytes) -> tuple[Path, Path]:
    dest, derived = tmp_path / "dest", tmp_path / "dest.derived"
    (dest / "videos").mkdir(parents=True)
    (dest / "videos/clip.mp4").write_bytes(clip_bytes)
    return dest, derived


def _pool(tree: tuple[Path, Path], rules: list[PostRule], **kw: object) -> PostPool:
    assert FF is not None
    return PostPool(FF, rules, tree[0], tree[1], jobs=2, **kw)  # type: ignore[arg-type]


def _made(tree: tuple[Path, Path], rules: list[PostRule]) -> None:
    """The clip's outputs for ``rules``, made once by a pool that runs ffmpeg."""
    with _pool(tree, rules) as pool:
        assert pool.submit("videos/clip.mp4") == len(rules)
        assert {o.status for o in pool.close()} == {PostStatus.DONE}


def _leftovers(derived: Path) -> list[str]:
    return [str(p) for p in derived.rglob(".tmp-*")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:\tZ") for line in f)
    except FileNotFoundError:
        return False


def _eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
    return found


@needs_ff
def test_thumbnails_are_jpegs_of_the_requested_size(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    rule = rule_from_mapping({"action": "thumbnails", "size": "128x96", "count": 5}, "t")
    with _pool(tree, [rule]) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        [outcome] = pool.close()
    assert outcome.status == PostStatus.DONE, outcome.error
    assert outcome.outputs and all(
        o.startswith("videos/clip.mp4/thumbnails-128x96/thumb-") for o in outcome.outputs
    )
    assert 1 <= len(outcome.outputs) <= 5
    for rel in outcome.outputs:
        assert jpeg_size((derived / rel).read_bytes()) == (128, 96)
    if ffprobe_exe():
        [s] = streams(derived / outcome.outputs[0])
        assert (s["codec_name"], s["width"], s["height"]) == ("mjpeg", 128, 96)
    assert pool.counts.done == 1 and pool.counts.running == pool.counts.queued == 0
    assert _leftovers(derived) == []


def _rgb_at(jpeg: Path, x: int, y: int) -> tuple[int, int, int]:
    """The colour of one pixel, decoded by ffmpeg."""
    assert FF is not None
    raw = subprocess.run(
        [FF.path, "-nostdin", "-loglevel", "error", "-i", f"file:{jpeg}",
         "-vf", f"format=rgb24,crop=1:1:{x}:{y}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return raw[0], raw[1], raw[2]


@needs_ff
def test_thumbnails_of_anamorphic_video_have_its_display_shape(tree: tuple[Path, Path]) -> None:
    # A PAL DVD's 16:9 picture is stored as 720x576 with wide pixels (64:45). Fitted by
    # its stored shape (5:4), its 160x90 thumbnail was a squeezed picture between bars.
    assert FF is not None
    dest, derived = tree
    subprocess.run(
        [FF.path, "-nostdin", "-loglevel", "error",
         "-f", "lavfi", "-i", "color=c=red:size=720x576:rate=25:duration=1,setsar=64/45",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-f", "mp4", f"file:{dest / 'videos/dvd.mp4'}"],
        stdin=subprocess.DEVNULL, check=True, timeout=60,
    )  # fmt: skip
    with _pool(tree, [parse_post_spec("thumbnails")]) as pool:
        pool.submit("videos/dvd.mp4")
        [outcome] = pool.close()
    assert outcome.status == PostStatus.DONE, outcome.error
    thumb = derived / outcome.outputs[0]
    assert jpeg_size(thumb.read_bytes()) == (160, 90)
    for x, y in [(1, 45), (158, 45), (80, 45)]:  # edges and middle: picture, no bars
        r, g, b = _rgb_at(thumb, x, y)
        assert r > 200 and g < 60 and b < 60, ((x, y), (r, g, b))


@needs_ff
def test_probe_passes_a_good_clip_and_fails_a_truncated_one_with_a_reason(
    tree: tuple[Path, Path],
) -> None:
    dest, derived = tree
    (dest / "videos/broken.mp4").write_bytes((dest / "videos/clip.mp4").read_bytes())
    truncate(dest / "videos/broken.mp4")
    with _pool(tree, [parse_post_spec("probe")]) as pool:
        pool.submit("videos/clip.mp4")
        pool.submit("videos/broken.mp4")
        outcomes = {o.rel: o for o in pool.close()}
    good, bad = outcomes["videos/clip.mp4"], outcomes["videos/broken.mp4"]
    assert good.status == PostStatus.DONE and good.outputs == ("videos/clip.mp4/probe.ok",)
    assert (derived / "videos/clip.mp4/probe.ok").is_file()
    assert bad.status == PostStatus.FAILED and bad.error is not None
    assert "ffmpeg exited with status" in bad.error and "moov atom not found" in bad.error
    assert bad.undecodable and not good.undecodable  # only this makes the file fetched again
    assert not (derived / "videos/broken.mp4/probe.ok").exists()
    assert pool.counts.failed == 1 and _leftovers(derived) == []


@needs_ff
def test_probe_decodes_every_audio_track_not_only_the_one_ffmpeg_would_pick(
    tree: tuple[Path, Path],
) -> None:
    # README: probe "decodes every stream". ffmpeg alone maps one video and one audio
    # stream, so a damaged second (dubbed) track went unnoticed and got a probe.ok.
    dest, derived = tree
    make_dubbed_clip(dest / "videos/dubbed.mkv")
    with _pool(tree, [parse_post_spec("probe")]) as pool:
        pool.submit("videos/clip.mp4")
        pool.submit("videos/dubbed.mkv")
        outcomes = {o.rel: o for o in pool.close()}
    good, bad = outcomes["videos/clip.mp4"], outcomes["videos/dubbed.mkv"]
    assert good.status == PostStatus.DONE, good.error
    assert bad.status == PostStatus.FAILED and bad.undecodable, bad
    assert not (derived / "videos/dubbed.mkv/probe.ok").exists()


@needs_ff
def test_a_file_without_the_stream_an_action_takes_is_skipped_not_failed(
    tree: tuple[Path, Path],
) -> None:
    # A silent screen recording has no audio to extract, a sound-only .webm no picture
    # to take thumbnails of: nothing is wrong with either, yet each run failed (exit 1).
    dest, derived = tree
    make_clip(dest / "videos/silent.mp4", seconds=1, size="64x64", audio=False)
    exe = FF.path if FF is not None else "ffmpeg"
    subprocess.run(
        [exe, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=1",
         "-c:a", "libopus", "-f", "webm", str(dest / "videos/sound.webm")],
        stdin=subprocess.DEVNULL, check=True, timeout=60,
    )  # fmt: skip
    # an old version's output, stale now: it goes, as after a failed remake
    (derived / "videos/silent.mp4").mkdir(parents=True)
    (derived / "videos/silent.mp4/audio.m4a").write_bytes(b"old")
    os.utime(derived / "videos/silent.mp4/audio.m4a", (1, 1))
    rules = [parse_post_spec("audio"), parse_post_spec("thumbnails"), parse_post_spec("probe")]
    with _pool(tree, rules) as pool:
        pool.submit("videos/silent.mp4")
        pool.submit("videos/sound.webm")
        outcomes = {(o.rel, o.action): o for o in pool.close()}
    for key in [("videos/silent.mp4", "audio"), ("videos/sound.webm", "thumbnails")]:
        assert outcomes[key].status == PostStatus.SKIPPED, outcomes[key]
        assert outcomes[key].outputs == () and not outcomes[key].undecodable
    others = {k: o.status for k, o in outcomes.items() if o.status != PostStatus.SKIPPED}
    assert set(others.values()) == {PostStatus.DONE}, others
    assert pool.counts.failed == 0 and pool.counts.skipped == 2
    assert not (derived / "videos/silent.mp4/audio.m4a").exists()
    assert not (derived / "videos/sound.webm/thumbnails-160x90").exists()
    assert _leftovers(derived) == []


@needs_ff
def test_a_probe_of_a_codec_this_ffmpeg_cannot_decode_is_no_verdict_on_the_file(
    tree: tuple[Path, Path],
) -> None:
    # A file in a codec this ffmpeg build has no decoder for (AV1, VVC in an older one)
    # says nothing about the file: fetching it again on every run would never help.
    dest, derived = tree
    unknown_codec(make_clip(dest / "videos/new-codec.mp4", seconds=1, audio=False))
    with _pool(tree, [parse_post_spec("probe")]) as pool:
        pool.submit("videos/new-codec.mp4")
        [outcome] = pool.close()
    assert outcome.status == PostStatus.FAILED and outcome.error is not None
    assert "no decoder" in outcome.error and "not found" in outcome.error, outcome.error
    assert not outcome.undecodable  # probed again next run, not fetched again
    assert not (derived / "videos/new-codec.mp4/probe.ok").exists()


@needs_ff
def test_a_probe_that_times_out_or_cannot_write_is_no_verdict_on_the_file(
    tree: tuple[Path, Path],
) -> None:
    dest, derived = tree
    os.mkfifo(dest / "videos/stuck.mp4")  # nobody writes: ffmpeg waits until killed
    rule = rule_from_mapping({"action": "probe", "timeout": 0.5}, "p")
    with _pool(tree, [rule]) as pool:
        assert pool.submit("videos/stuck.mp4") == 1
        [timed_out] = pool.close()
    assert timed_out.status == PostStatus.FAILED and timed_out.error is not None
    assert timed_out.error.startswith("timed out after 0.5 s") and not timed_out.undecodable

    # probe.ok cannot be written (a directory is in its way): a disk problem, not the file's.
    (derived / "videos/clip.mp4/probe.ok").mkdir(parents=True)
    (derived / "videos/clip.mp4/probe.ok/x").write_text("")
    os.utime(derived / "videos/clip.mp4/probe.ok", (0, 0))  # stale
    with _pool(tree, [parse_post_spec("probe")]) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        [unwritable] = pool.close()
    assert unwritable.status == PostStatus.FAILED and not unwritable.undecodable


@needs_ff
@needs_ffprobe
def test_transcode_has_the_requested_height_and_h264_aac(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    rule = rule_from_mapping(
        {"action": "transcode", "height": 120, "crf": 35, "preset": "ultrafast"}, "t"
    )
    with _pool(tree, [rule]) as pool:
        pool.submit("videos/clip.mp4")
        [outcome] = pool.close()
    assert outcome.status == PostStatus.DONE, outcome.error
    found = {s["codec_type"]: s for s in streams(derived / "videos/clip.mp4/transcode-120p.mp4")}
    assert (found["video"]["codec_name"], found["video"]["height"], found["video"]["width"]) == (
        "h264",
        120,
        160,
    )
    assert found["audio"]["codec_name"] == "aac"


@needs_ff
def test_a_name_like_an_option_and_a_protocol_is_processed_safely(
    tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, derived = tree
    evil = "odd 100%/-i evil:name.mp4"  # '%' would be a pattern to image2
    (dest / "odd 100%").mkdir()
    (dest / evil).write_bytes((dest / "videos/clip.mp4").read_bytes())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rules = [parse_post_spec("probe"), parse_post_spec("remux"), parse_post_spec("thumbnails")]
    with _pool(tree, rules) as pool:
        assert pool.submit(evil) == 3
        outcomes = pool.close()
    assert {o.status for o in outcomes} == {PostStatus.DONE}, [o.error for o in outcomes]
    assert (derived / evil / "remux.mp4").stat().st_size > 1000
    assert list(cwd.iterdir()) == []  # nothing written where "evil" or "name.mp4" would land
    assert sorted(p.name for p in (dest / "odd 100%").iterdir()) == ["-i evil:name.mp4"]
    assert next(o for o in outcomes if o.action == "thumbnails").outputs[0] == (
        f"{evil}/thumbnails-160x90/thumb-001.jpg"
    )


@needs_ff
def test_fresh_outputs_are_skipped_without_running_ffmpeg(tree: tuple[Path, Path]) -> None:
    dest, derived = tree
    rules = [parse_post_spec("probe"), parse_post_spec("thumbnails")]
    first = Counting()
    with _pool(tree, rules, runner=first) as pool:
        assert pool.submit("videos/clip.mp4") == 2
        assert {o.status for o in pool.close()} == {PostStatus.DONE}
    assert len(first.calls) == 2
    stamps = {p: p.stat().st_mtime_ns for p in derived.rglob("*")}

    again = Counting()
    with _pool(tree, rules, runner=again) as pool:
        assert pool.submit("videos/clip.mp4") == 0
        skipped = pool.close()
    assert again.calls == [] and all(o.outputs for o in skipped)
    assert sorted((o.action, o.status) for o in skipped) == [
        ("probe", PostStatus.SKIPPED),
        ("thumbnails", PostStatus.SKIPPED),
    ]
    assert {p: p.stat().st_mtime_ns for p in derived.rglob("*")} == stamps

    # A source newer than its outputs (or a forced one) is done again.
    future = time.time() + 3600
    os.utime(dest / "videos/clip.mp4", (future, future))
    with _pool(tree, rules[:1], runner=again) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        [redone] = pool.close()
    assert redone.status == PostStatus.DONE and len(again.calls) == 1
    assert (derived / redone.outputs[0]).stat().st_mtime >= future  # fresh from now on
    with _pool(tree, rules[:1], runner=again) as pool:
        assert pool.submit("videos/clip.mp4") == 0
        assert pool.submit("videos/clip.mp4", force=True) == 1
        pool.close()
    assert len(again.calls) == 2


@needs_ff
def test_outputs_on_a_file_system_keeping_whole_seconds_stay_fresh(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # ext2/ext3 with 128-byte inodes keep whole seconds (FAT two, exFAT 10 ms): an output
    # dated as its source, to the nanosecond, was stored older than it, and every run
    # remade every output of a derived tree on such a disk. Such a file system, here:
    real_utime = os.utime

    def whole_seconds(path: object, *args: object, ns: tuple[int, int] | None = None) -> None:
        assert ns is not None and not args
        real_utime(path, ns=tuple(t - t % 1_000_000_000 for t in ns))  # type: ignore[arg-type]

    dest = tree[0]
    src = dest / "videos/clip.mp4"
    src.write_bytes(src.read_bytes())  # a ctime with nanoseconds, as a download's
    assert max(src.stat().st_mtime_ns, src.stat().st_ctime_ns) % 1_000_000_000 != 0
    monkeypatch.setattr(os, "utime", whole_seconds)
    rules = [parse_post_spec("probe"), parse_post_spec("thumbnails")]
    _made(tree, rules)
    again = Counting()
    with _pool(tree, rules, runner=again) as pool:
        assert pool.submit("videos/clip.mp4") == 0
        assert {o.status for o in pool.close()} == {PostStatus.SKIPPED}
    assert again.calls == []


@needs_ff
def test_a_source_replaced_by_an_older_dated_version_is_made_again(
    tree: tuple[Path, Path],
) -> None:
    """A download dates the file as the server does: maybe before the old outputs."""
    dest, derived = tree
    src = dest / "videos/clip.mp4"
    with _pool(tree, [parse_post_spec("remux")]) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        assert [o.status for o in pool.close()] == [PostStatus.DONE]
    out = derived / "videos/clip.mp4/remux.mp4"
    made = time.time() - 60  # the outputs are a minute old, the new version's date older
    os.utime(out, (made, made))
    src.write_bytes(src.read_bytes() + b"\0")
    os.utime(src, (made - 3600, made - 3600))

    again = Counting()
    with _pool(tree, [parse_post_spec("remux")], runner=again) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        assert [o.status for o in pool.close()] == [PostStatus.DONE]
    assert len(again.calls) == 1
    with _pool(tree, [parse_post_spec("remux")], runner=again) as pool:
        assert pool.submit("videos/clip.mp4") == 0  # and now it is fresh
        pool.close()


class _Noting:
    """A runner whose ``event`` is set as its first ffmpeg is about to start."""

    def __init__(self) -> None:
        self.event = threading.Event()


class Blocked(_Noting):
    """A runner that starts nothing and waits for the pool's cancel."""

    def __call__(
        self, argv: Sequence[str], timeout: float, stop: threading.Event | None
    ) -> RunResult:
        self.event.set()
        assert stop is not None and stop.wait(30)
        raise PostProcessError("cancelled")


@needs_ff
def test_a_forced_remake_removes_the_old_outputs_before_it_starts(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    rules = [parse_post_spec("probe"), parse_post_spec("thumbnails")]
    _made(tree, rules)
    assert (derived / "videos/clip.mp4/probe.ok").is_file()
    blocked = Blocked()
    pool = _pool(tree, rules, runner=blocked)
    assert pool.submit("videos/clip.mp4", force=True) == 2
    # Interrupted now, the next run finds them missing, not old outputs looking fresh.
    gone = ["videos/clip.mp4/probe.ok", "videos/clip.mp4/thumbnails-160x90"]
    assert not any(os.path.lexists(derived / o) for o in gone)
    assert blocked.event.wait(10)
    pool.cancel()
    pool.close()
    assert not (derived / "videos/clip.mp4").exists() and _leftovers(derived) == []


@needs_ff
def test_an_emptied_output_is_made_again(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    rules = [parse_post_spec("probe"), parse_post_spec("thumbnails")]
    _made(tree, rules)
    out = derived / "videos/clip.mp4"
    (out / "probe.ok").write_bytes(b"")  # a full disk, a crash before the data reached it
    for jpg in (out / "thumbnails-160x90").iterdir():
        jpg.unlink()

    with _pool(tree, rules) as pool:
        assert pool.submit("videos/clip.mp4") == 2  # newer than the source, but empty
        assert {o.status for o in pool.close()} == {PostStatus.DONE}
    assert (out / "probe.ok").stat().st_size > 0
    assert (out / "thumbnails-160x90/thumb-001.jpg").is_file()


@needs_ff
def test_a_never_ending_custom_command_is_killed_at_its_timeout(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    rule = rule_from_mapping({"action": "custom", "args": FOREVER, "timeout": 1}, "c")
    started = time.monotonic()
    with _pool(tree, [rule]) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        [outcome] = pool.close()
    assert time.monotonic() - started < 15
    assert outcome.status == PostStatus.FAILED and outcome.error is not None
    assert outcome.error.startswith("timed out after 1 s")
    assert _processes_mentioning(str(derived)) == []
    assert not (derived / "videos/clip.mp4/custom-1.mp4").exists() and _leftovers(derived) == []
    assert sorted(os.listdir(derived)) == []  # and no temporary area either


def test_the_default_timeout_is_by_size_with_a_floor_by_duration() -> None:
    mib = 1 << 20
    assert default_timeout(19 * mib) == 79.0  # as it was: what an unknown duration gets
    # the five-minute talk of 19 MiB whose transcode took 76 s of its 79
    assert default_timeout(19 * mib, 300.0) == 660.0
    assert default_timeout(2000 * mib, 60.0) == 2060.0  # never below the size's
    assert default_timeout(0, 0.5) == 61.0


class Timed:
    """A runner that remembers the timeout each output's ffmpeg was given."""

    def __init__(self) -> None:
        self.limits: dict[str, float] = {}

    def __call__(
        self, argv: Sequence[str], timeout: float, stop: threading.Event | None
    ) -> RunResult:
        made = argv[-1].rsplit("/", 1)[-1] if argv[-1] != "-" else "probe"
        self.limits[made.replace("thumb-%03d.jpg", "thumbnails")] = timeout
        return run(argv, timeout, stop)


@needs_ff
@needs_ffprobe
def test_a_long_small_clip_gets_a_timeout_by_its_duration_where_work_follows_it(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    """A long talk at a low bit rate is small: a timeout by its size alone stopped its
    transcode (19 MiB, 5 minutes of 720p: 76 s of work against 79 s), and every run after."""
    dest = tree[0]
    clip = make_clip(dest / "talks/long.mp4", seconds=120, size="32x32")
    size = clip.stat().st_size
    assert size < 2 << 20 and default_timeout(size) < 65  # by size: about a minute
    assert FF is not None
    seconds = media_seconds(FF, clip)
    assert seconds is not None and 119.9 < seconds < 120.5
    rules = [parse_post_spec(a) for a in ("transcode", "audio", "probe", "remux", "thumbnails")]
    timed = Timed()
    with _pool(tree, rules, runner=timed) as pool:
        assert pool.submit("talks/long.mp4") == 5
        outcomes = pool.close()
    assert {o.status for o in outcomes} == {PostStatus.DONE}, [o.error for o in outcomes]
    by_duration = 60 + 2 * seconds
    assert timed.limits == {
        "transcode-480p.mp4": by_duration,
        "audio.m4a": by_duration,
        "probe": by_duration,
        "remux.mp4": default_timeout(size),  # copies bytes
        "thumbnails": default_timeout(size),  # a few key frames
    }

    # A rule's own timeout still wins, and a source ffprobe cannot read keeps the floor.
    rule = rule_from_mapping({"action": "transcode", "height": 16, "timeout": 45}, "t")
    (dest / "talks/noise.mp4").write_bytes(b"\0" * 1000)
    timed = Timed()
    with _pool(tree, [rule, parse_post_spec("probe")], runner=timed) as pool:
        assert pool.submit("talks/long.mp4") == 1  # (its probe.ok is fresh)
        assert pool.submit("talks/noise.mp4") == 2
        pool.close()
    assert timed.limits == {"transcode-16p.mp4": 45, "probe": default_timeout(1000)}
    assert media_seconds(FF, dest / "talks/noise.mp4") is None
    assert media_seconds(FFmpeg(FF.path, FF.version, None), clip) is None  # no ffprobe


@needs_ff
def test_only_a_failure_that_would_repeat_is_recorded_against_file_rule_and_ffmpeg(
    tree: tuple[Path, Path],
) -> None:
    """A timeout or a file ffmpeg refuses would fail the same way on the next run; a full
    disk, or a process killed by someone else, says nothing of the file."""
    dest = tree[0]
    (dest / "videos/bad.mp4").write_bytes((dest / "videos/clip.mp4").read_bytes())
    truncate(dest / "videos/bad.mp4")  # no index: "moov atom not found"
    rule = rule_from_mapping({"action": "remux", "timeout": 30}, "r")
    with _pool(tree, [rule]) as pool:
        pool.submit("videos/bad.mp4")
        [refused] = pool.close()
    assert refused.status == PostStatus.FAILED and refused.failure is not None
    st = (dest / "videos/bad.mp4").stat()
    assert refused.failure.output == refused.output == "videos/bad.mp4/remux.mp4"
    assert (refused.failure.source, refused.failure.size) == ("videos/bad.mp4", st.st_size)
    assert refused.failure.changed_ns == max(st.st_mtime_ns, st.st_ctime_ns)
    assert FF is not None and refused.failure.made_by == (
        f"remux timeout=30.0 ffmpeg={FF.path} {'.'.join(map(str, FF.version))}"
    )
    assert "moov atom not found" in refused.failure.error

    def answering(
        code: int, tail: str
    ) -> Callable[[Sequence[str], float, threading.Event | None], RunResult]:
        return lambda argv, timeout, stop: RunResult(code, tail, 0.0)

    for code, tail in [
        (1, "[out#0/mp4] Error writing trailer: No space left on device"),
        (1, "file:/d/.fetcher/x/remux.mp4: Permission denied"),
        (-9, ""),  # the kernel's OOM killer
    ]:
        with _pool(tree, [rule], runner=answering(code, tail)) as pool:
            pool.submit("videos/clip.mp4")
            [failed] = pool.close()
        assert failed.status == PostStatus.FAILED and failed.failure is None, (code, tail)

    # Recorded, it is not tried again while all stays so, unless the pool is told to.
    calls = Counting()
    with _pool(tree, [rule], runner=calls, failed={refused.output: refused.failure}) as pool:
        assert pool.submit("videos/bad.mp4") == 0
        [before] = pool.close()
    assert (before.status, before.error, calls.calls) == (
        PostStatus.FAILED_BEFORE, refused.failure.error, []
    )  # fmt: skip
    assert pool.counts == PostCounts(failed_before=1)
    failed = {refused.output: refused.failure}
    other = rule_from_mapping({"action": "remux", "timeout": 31}, "r")  # another rule
    for rules, retry in [([rule], True), ([other], False)]:
        with _pool(tree, rules, runner=calls, failed=failed, retry_failed=retry) as pool:
            assert pool.submit("videos/bad.mp4") == 1
            [again] = pool.close()
        assert again.status == PostStatus.FAILED and again.failure is not None
    assert len(calls.calls) == 2


@needs_ff
def test_a_failure_under_the_default_timeout_names_its_terms(tree: tuple[Path, Path]) -> None:
    """With no timeout set, a failure is recorded against the default's terms: one recorded
    under other terms (an older fetch's default, or plain "default") is tried again, as
    under another rule's timeout; under the same terms it is not."""
    dest = tree[0]
    (dest / "videos/bad.mp4").write_bytes((dest / "videos/clip.mp4").read_bytes())
    truncate(dest / "videos/bad.mp4")
    rule = rule_from_mapping({"action": "remux"}, "r")
    with _pool(tree, [rule]) as pool:
        pool.submit("videos/bad.mp4")
        [refused] = pool.close()
    assert refused.failure is not None
    assert f" timeout={DEFAULT_TIMEOUT} " in refused.failure.made_by
    assert DEFAULT_TIMEOUT == "default(60s+10s/10MiB,>=60s+2x)"
    calls = Counting()
    for made_by, tried in [
        (refused.failure.made_by, 0),
        (refused.failure.made_by.replace(DEFAULT_TIMEOUT, "default"), 1),
        (refused.failure.made_by.replace("+10s/10MiB", "+20s/10MiB"), 1),
    ]:
        failed = {refused.output: refused.failure._replace(made_by=made_by)}
        with _pool(tree, [rule], runner=calls, failed=failed) as pool:
            assert pool.submit("videos/bad.mp4") == tried, made_by
            pool.close()
    assert len(calls.calls) == 2


class Started(_Noting):
    """A runner that says when its first ffmpeg is about to start, then starts it."""

    def __call__(
        self, argv: Sequence[str], timeout: float, stop: threading.Event | None
    ) -> RunResult:
        self.event.set()
        return run(argv, timeout, stop)


@needs_ff
def test_cancel_kills_running_work_and_drops_the_queue(tree: tuple[Path, Path]) -> None:
    dest, derived = tree
    for n in range(3):
        (dest / f"videos/more-{n}.mp4").write_bytes(b"not really")
    rule = rule_from_mapping({"action": "custom", "args": FOREVER, "timeout": 120}, "c")
    assert FF is not None
    started = Started()
    pool = PostPool(FF, [rule], dest, derived, jobs=1, runner=started)
    t0 = time.monotonic()
    for rel in ["videos/clip.mp4", *(f"videos/more-{n}.mp4" for n in range(3))]:
        assert pool.submit(rel) == 1
    assert started.event.wait(timeout=10)
    pool.cancel()
    outcomes = pool.close()
    assert time.monotonic() - t0 < 15
    assert outcomes == []  # the killed run is no failure: not done, made next time
    assert pool.counts == PostCounts()
    assert _processes_mentioning(str(derived)) == [] and _leftovers(derived) == []
    with pytest.raises(RuntimeError, match="after close"):
        pool.submit("videos/clip.mp4")


@needs_ff
def test_a_custom_rule_writing_only_to_outdir_makes_a_directory(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    args = ["-i", "{input}", "-frames:v", "2", "-update", "0", "{outdir}/{stem}-%02d.png"]
    rule = rule_from_mapping({"action": "custom", "args": args, "name": "frames"}, "c")
    with _pool(tree, [rule]) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        [outcome] = pool.close()
    assert outcome.status == PostStatus.DONE, outcome.error
    assert outcome.outputs == (
        "videos/clip.mp4/custom-frames/clip-01.png",
        "videos/clip.mp4/custom-frames/clip-02.png",
    )
    assert (derived / outcome.outputs[1]).read_bytes()[:4] == b"\x89PNG"


@needs_ff
def test_custom_rules_work_for_names_with_percent_and_write_nowhere_else(
    tree: tuple[Path, Path],
) -> None:
    """'%' in the paths given to ffmpeg is a pattern to image2: '100%d.mp4' would be
    written towards '1001.mp4', '50% off.mp4' fail ("more than one file")."""
    dest, derived = tree
    names = ["50% off.mp4", "v/100%d.mp4", "-ü 100%03d.mp4"]
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes((dest / "videos/clip.mp4").read_bytes())
    frames = ["-i", "{input}", "-frames:v", "2", "-s", "32x24", "{outdir}/f-%02d.png"]
    still = ["-i", "{input}", "-frames:v", "1", "-s", "32x24", "{output}"]
    rules = [
        rule_from_mapping({"action": "custom", "args": frames, "name": "frames"}, "c"),
        rule_from_mapping({"action": "custom", "args": still, "name": "still", "ext": "png"}, "d"),
        parse_post_spec("thumbnails"),
    ]
    # A temporary left by a run that died (no such pid) is swept.
    (derived / ".fetcher/.tmp-999999999-dead").mkdir(parents=True)
    with _pool(tree, rules) as pool:
        for name in names:
            assert pool.submit(name) == 3
        outcomes = pool.close()
    assert {o.status for o in outcomes} == {PostStatus.DONE}, [o.error for o in outcomes]
    for name in names:
        assert sorted(os.listdir(derived / name / "custom-frames")) == ["f-01.png", "f-02.png"]
        assert (derived / name / "custom-still.png").read_bytes()[:4] == b"\x89PNG"
        assert (derived / name / "thumbnails-160x90/thumb-001.jpg").is_file()
    made = sorted(str(p.relative_to(derived)) for p in derived.rglob("*") if p.is_file())
    assert all(any(m.startswith(f"{n}/") for n in names) for m in made), made
    assert not (derived / ".fetcher").exists() and _leftovers(derived) == []
    assert remove_derived(derived, "v/100%d.mp4") and not (derived / "v").exists()


@needs_ff
def test_directory_outputs_follow_the_umask_as_files_do(tree: tuple[Path, Path]) -> None:
    derived = tree[1]
    frames = ["-i", "{input}", "-frames:v", "1", "-s", "32x24", "{outdir}/f-%02d.png"]
    rules = [
        parse_post_spec("thumbnails"),
        rule_from_mapping({"action": "custom", "args": frames, "name": "frames"}, "c"),
        parse_post_spec("probe"),
    ]
    old = os.umask(0o027)
    try:
        with _pool(tree, rules) as pool:
            assert pool.submit("videos/clip.mp4") == 3
            assert {o.status for o in pool.close()} == {PostStatus.DONE}
    finally:
        os.umask(old)
    out = derived / "videos/clip.mp4"
    for d in ("thumbnails-160x90", "custom-frames"):
        assert (out / d).stat().st_mode & 0o777 == 0o750, d  # not mkdtemp's 0700
    assert (out / "probe.ok").stat().st_mode & 0o777 == 0o640
    assert (out / "thumbnails-160x90/thumb-001.jpg").stat().st_mode & 0o777 == 0o640


@needs_ff
def test_a_missing_source_is_a_failed_outcome(tree: tuple[Path, Path]) -> None:
    with _pool(tree, [parse_post_spec("probe")]) as pool:
        assert pool.submit("videos/gone.mp4") == 0
        assert pool.submit("notes.txt") == 0
        [outcome] = pool.close()
    assert outcome == PostOutcome(
        "videos/gone.mp4",
        "probe",
        PostStatus.FAILED,
        (),
        outcome.error,
        output="videos/gone.mp4/probe.ok",
    )
    assert outcome.error is not None and "cannot read videos/gone.mp4" in outcome.error


@needs_ff
def test_a_hostile_name_cannot_add_filters_through_stem(
    tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``{stem}`` in a filter graph (frames labelled with their file's name): a server's
    name ``x,metadata=mode=print:file=leak`` added a filter writing a file of ffmpeg's
    choosing (as ``movie=`` could read one). Characters that end, join or quote filters
    and options, and ``%``, become ``_`` in ``{stem}``; a plain name is left as it is."""
    dest, derived = tree
    name = "x,metadata=mode=print:file=leak"
    (dest / f"{name}.mp4").write_bytes((dest / "videos/clip.mp4").read_bytes())
    monkeypatch.chdir(tmp_path)  # where ffmpeg would write a relative "leak"
    args = ["-i", "{input}", "-frames:v", "1", "-s", "32x24",
            "-vf", "metadata=mode=add:key=title:value={stem}", "-metadata", "title={stem}",
            "{output}"]  # fmt: skip
    rule = rule_from_mapping({"action": "custom", "args": args, "name": "t", "ext": "mkv"}, "c")
    with _pool(tree, [rule]) as pool:
        assert pool.submit(f"{name}.mp4") == 1
        assert pool.submit("videos/clip.mp4") == 1
        outcomes = pool.close()
    assert {o.status for o in outcomes} == {PostStatus.DONE}, [o.error for o in outcomes]
    assert [p.name for p in tmp_path.rglob("leak")] == []
    titles = {o.rel: _metadata(derived / o.outputs[0]) for o in outcomes}
    assert "title=x_metadata_mode_print_file_leak" in titles[f"{name}.mp4"], titles
    assert "title=clip" in titles["videos/clip.mp4"], titles


def _metadata(media: Path) -> str:
    """``media``'s global metadata, as ffmpeg writes it out (``title=...`` lines)."""
    assert FF is not None
    argv = [FF.path, "-hide_banner", "-i", str(media), "-f", "ffmetadata", "-"]
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


@needs_ff
def test_a_ts_file_that_is_not_a_transport_stream_is_not_media(tree: tuple[Path, Path]) -> None:
    """``*.ts`` is in the default globs for MPEG transport streams (recordings, HLS
    segments), and names TypeScript sources too: a mirror holding both had ffmpeg fail
    on every ``.ts`` source, and a failed probe sends its file to be fetched again, on
    every run. A ``.ts`` whose bytes are not a transport stream (sync byte 0x47 every 188
    bytes, or 192 with a time code) is left alone; a real one is processed as before."""
    dest, derived = tree
    assert FF is not None
    (dest / "src").mkdir()
    (dest / "src/app.ts").write_text("export const answer: number = 42;\n" * 20)
    (dest / "src/empty.ts").write_bytes(b"")
    subprocess.run(
        [FF.path, "-nostdin", "-loglevel", "error", "-i", str(dest / "videos/clip.mp4"),
         "-c", "copy", "-f", "mpegts", str(dest / "videos/clip.ts")],
        check=True, timeout=60,
    )  # fmt: skip
    with _pool(tree, [parse_post_spec("probe")]) as pool:
        assert pool.submit("src/app.ts") == 0
        assert pool.submit("src/empty.ts") == 0
        assert pool.submit("videos/clip.ts") == 1
        outcomes = pool.close()
    assert [(o.rel, o.status) for o in outcomes] == [("videos/clip.ts", PostStatus.DONE)]
    assert not (derived / "src").exists()


def test_what_made_an_output_names_the_options_its_name_does_not() -> None:
    assert made_with(parse_post_spec("transcode")) == (
        "transcode height=480 crf=23 preset='veryfast'\n"
    )
    assert made_with(PostRule("thumbnails", ("*.mp4",), PostOptions(size=(320, 180), count=4))) == (
        "thumbnails size=320x180 count=4\n"
    )
    custom = PostRule("custom", ("*.mp4",), PostOptions(args=("-i", "{input}", "{output}")))
    assert made_with(custom) == "custom args=('-i', '{input}', '{output}')\n"
    assert [made_with(parse_post_spec(a)) for a in ("probe", "remux", "audio")] == [None] * 3


@needs_ff
def test_an_output_is_made_again_when_its_options_change(tree: tuple[Path, Path]) -> None:
    """A transcode's quality or the thumbnails' count changed in the config, not the
    source: the outputs were kept as fresh, made with the old options, run after run."""
    derived = tree[1]

    def thumbnails(count: int) -> list[PostRule]:
        return [PostRule("thumbnails", ("*.mp4",), PostOptions(count=count))]

    runs = Counting()
    with _pool(tree, thumbnails(2), runner=runs) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        [made] = pool.close()
    assert made.status == PostStatus.DONE, made.error
    out = derived / "videos/clip.mp4/thumbnails-160x90"
    record = derived / "videos/clip.mp4/.thumbnails-160x90.options"
    assert record.read_text() == "thumbnails size=160x90 count=2\n"
    assert made.outputs == tuple(
        f"videos/clip.mp4/thumbnails-160x90/{p.name}" for p in sorted(out.iterdir())
    )

    with _pool(tree, thumbnails(2), runner=runs) as pool:  # the same options: fresh
        assert pool.submit("videos/clip.mp4") == 0
        pool.close()
    assert len(runs.calls) == 1

    with _pool(tree, thumbnails(3), runner=runs) as pool:  # another count: made again
        assert pool.submit("videos/clip.mp4") == 1
        [again] = pool.close()
    assert again.status == PostStatus.DONE and len(runs.calls) == 2
    assert record.read_text() == "thumbnails size=160x90 count=3\n"
    assert [c[c.index("-frames:v") + 1] for c in runs.calls] == ["2", "3"]

    # Made before records were kept: taken as made with this run's options, and recorded.
    record.unlink()
    with _pool(tree, thumbnails(4), runner=runs) as pool:
        assert pool.submit("videos/clip.mp4") == 0
        pool.close()
    assert len(runs.calls) == 2 and record.read_text() == "thumbnails size=160x90 count=4\n"
    with _pool(tree, thumbnails(2), runner=runs) as pool:
        assert pool.submit("videos/clip.mp4") == 1
        pool.close()
    assert len(runs.calls) == 3

    # A source fetched again (forced) whose remake fails: neither output nor record is left.
    def failing(argv: Sequence[str], timeout: float, stop: threading.Event | None) -> RunResult:
        return RunResult(1, "boom", 0.0)

    with _pool(tree, thumbnails(2), runner=failing) as pool:
        assert pool.submit("videos/clip.mp4", force=True) == 1
        [failed] = pool.close()
    assert failed.status == PostStatus.FAILED
    assert not out.exists() and not record.exists()


def test_braces_that_are_no_placeholder_typo_go_to_ffmpeg() -> None:
    """Only a near miss of a placeholder is refused: drawtext's ``%{pts}`` and text of the
    user's in braces are ffmpeg's."""
    args = ["-i", "{input}", "-vf", "drawtext=text='%{pts} {camera}'", "{output}"]
    rule = rule_from_mapping({"action": "custom", "args": args, "ext": "mkv"}, "c")
    assert rule.options.args == tuple(args)
