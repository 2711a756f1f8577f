"""Post-processing: rules (globs → an ffmpeg action), their plan, and the pool.

Outputs for ``DEST/<rel>`` live in a directory named after the source in the
derived tree, outside the mirror, so ``--delete`` and the crawl never see them::

    DERIVED/<rel>/thumbnails-160x90/thumb-001.jpg …   key frames, letterboxed
    DERIVED/<rel>/probe.ok                            marker: the file decodes
    DERIVED/<rel>/transcode-480p.mp4                  H.264 + AAC
    DERIVED/<rel>/remux.mp4                           streams copied into mp4
    DERIVED/<rel>/audio.m4a                           AAC
    DERIVED/<rel>/custom-1.mkv                        1: the rule's place among the
    DERIVED/<rel>/custom-1/…                          custom rules (or its name); a
                                                      directory when its args name
                                                      only {outdir}

Each output is made in ``DERIVED/<rel>/.tmp-<pid>-<random>/`` and renamed into
place (a directory as a whole), then dated no earlier than its source.  An
output at least as new as its source is fresh and is not made again::

    >>> [t.output for t in plan_post([parse_post_spec("remux")], "a/b.MKV")]
    ['a/b.MKV/remux.mp4']
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import functools
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetcher.errors import ConfigError, UnsafePath, UsageError
from fetcher.ffmpeg import (
    FFmpeg,
    PostProcessError,
    RunResult,
    audio_argv,
    custom_argv,
    find_ffmpeg,
    probe_argv,
    remux_argv,
    run,
    thumbnails_argv,
    transcode_argv,
)
from fetcher.models import STATE_DIR

__all__ = [
    "ACTIONS",
    "AUDIO_GLOBS",
    "VIDEO_GLOBS",
    "PostCounts",
    "PostOptions",
    "PostOutcome",
    "PostPool",
    "PostRule",
    "PostStatus",
    "PostTask",
    "check_derived",
    "default_timeout",
    "needs_ffmpeg",
    "parse_post_spec",
    "plan_post",
    "remove_derived",
    "require_ffmpeg",
    "rule_from_mapping",
]

ACTIONS = ("thumbnails", "probe", "transcode", "remux", "audio", "custom")
VIDEO_GLOBS = tuple(f"*.{e}" for e in "mp4 mkv webm mov avi m4v ts mpg mpeg flv wmv".split())  # noqa: SIM905
AUDIO_GLOBS = tuple(f"*.{e}" for e in "mp3 m4a aac flac ogg oga opus wav wma".split())  # noqa: SIM905
# Only probe reads audio files too: extracting "audio" from an audio file is a
# pointless re-encode, and the other actions need a picture.
_DEFAULT_GLOBS = {a: VIDEO_GLOBS for a in ACTIONS} | {"probe": VIDEO_GLOBS + AUDIO_GLOBS}
_OPTIONS = {"thumbnails": ("size", "count"), "transcode": ("height", "crf", "preset"),
            "custom": ("args", "ext", "name")}  # fmt: skip
_PRESETS = "ultrafast superfast veryfast faster fast medium slow slower veryslow placebo".split()  # noqa: SIM905
_TMP = ".tmp-"
_NO_FFMPEG = (
    "ffmpeg not found: install it (apt-get install ffmpeg) or `pip install 'fetcher[media]'`"
)


@dataclass(frozen=True, slots=True)
class PostOptions:
    """An action's settings; each action reads only its own."""

    height: int = 480
    crf: int = 23
    preset: str = "veryfast"
    size: tuple[int, int] = (160, 90)
    count: int = 10
    args: tuple[str, ...] = ()
    ext: str | None = None
    """Output extension of a custom rule; the source's when unset."""
    name: str | None = None
    """Names a custom rule's output (``custom-<name>``) instead of its position."""


@dataclass(frozen=True, slots=True)
class PostRule:
    """Files whose relative path matches one of ``globs`` get ``action``.

    A glob without ``/`` matches the base name, one with ``/`` the whole path
    (``*`` crosses ``/``); matching ignores case, so ``*.mp4`` takes ``A.MP4``.
    """

    action: str
    globs: tuple[str, ...]
    options: PostOptions = field(default_factory=PostOptions)
    timeout: float | None = None

    def matches(self, rel: str) -> bool:
        name = rel.lower().rsplit("/", 1)[-1]
        return any(
            fnmatch.fnmatchcase(rel.lower() if "/" in g else name, g.lower()) for g in self.globs
        )


def _show(v: object) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else repr(v)


def _int(where: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{where}: expected an integer ≥ {lo} and ≤ {hi}, got {_show(v)}")
    return v


def _size(where: str, v: object) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{2,4})x(\d{2,4})", v) if isinstance(v, str) else None
    w, h = (int(m[1]), int(m[2])) if m else (0, 0)
    if not (16 <= w <= 4096 and 16 <= h <= 4096 and w % 2 == 0 and h % 2 == 0):
        raise ConfigError(f'{where}: expected "WIDTHxHEIGHT", even, 16 to 4096, got {_show(v)}')
    return w, h


def _word(where: str, v: object, pattern: str, what: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(pattern, v):
        raise ConfigError(f"{where}: expected {what}, got {_show(v)}")
    return v


def _args(where: str, v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        raise ConfigError(f"{where}: expected a list of strings (ffmpeg arguments), got {_show(v)}")
    if not any("{output}" in a or "{outdir}" in a for a in v):
        raise ConfigError(f"{where}: must contain {{output}} or {{outdir}}, where ffmpeg writes")
    return tuple(v)


def _globs(where: str, v: object) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(g, str) and g for g in items):
        raise ConfigError(f"{where}: expected a glob or a list of globs, got {_show(v)}")
    return tuple(items)


def _seconds(where: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ConfigError(f"{where}: expected a number of seconds > 0, got {_show(v)}")
    return float(v)


_CHECKS: dict[str, Callable[[str, object], object]] = {
    "glob": _globs,
    "timeout": _seconds,
    "height": lambda at, v: _int(at, v, 16, 4320),
    "crf": lambda at, v: _int(at, v, 0, 51),
    "count": lambda at, v: _int(at, v, 1, 1000),
    "size": _size,
    "preset": lambda at, v: _word(at, v, "|".join(_PRESETS), f"one of {', '.join(_PRESETS)}"),
    "ext": lambda at, v: _word(at, v, "[a-z0-9]{1,10}", "a lower-case extension such as mkv"),
    "name": lambda at, v: _word(at, v, "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "a short name"),
    "args": _args,
}


def rule_from_mapping(d: Any, where: str) -> PostRule:
    """A ``[[post]]`` table → :class:`PostRule`; errors name the key.

    >>> rule_from_mapping({"action": "transcode", "height": "x"}, "post[0]")
    Traceback (most recent call last):
    ...
    fetcher.errors.ConfigError: post[0].height: expected an integer ≥ 16 and ≤ 4320, got "x"
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a table with an action, got {_show(d)}")
    action = d.get("action")
    if action not in ACTIONS:
        got = "missing" if action is None else f"got {_show(action)}"
        raise ConfigError(f"{where}.action: expected one of {', '.join(ACTIONS)}; {got}")
    allowed = ("glob", "timeout", *_OPTIONS.get(action, ()))
    values: dict[str, Any] = {"glob": _DEFAULT_GLOBS[action], "timeout": None}
    for key, v in d.items():
        if key == "action":
            continue
        if key not in allowed:
            if key in _CHECKS:
                raise ConfigError(f"{where}.{key}: not an option of {action}")
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
            raise ConfigError(f"{where}.{key}: unknown key", hint)
        values[key] = _CHECKS[key](f"{where}.{key}", v)
    if action == "custom" and "args" not in values:
        raise ConfigError(f"{where}.args: missing (custom rules need ffmpeg's arguments)")
    globs, timeout = values.pop("glob"), values.pop("timeout")
    return PostRule(action, globs, PostOptions(**values), timeout)


def parse_post_spec(spec: str) -> PostRule:
    """``--post ACTION[=GLOB[,GLOB…]]`` → :class:`PostRule` with default options."""
    action, eq, globs = spec.partition("=")
    if action == "custom":
        raise UsageError(f"--post {spec}: custom rules need arguments; define one in a config file")
    if action not in ACTIONS:
        raise UsageError(f"--post {spec}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
    parts = tuple(g for g in globs.split(",") if g) if eq else _DEFAULT_GLOBS[action]
    if not parts:
        raise UsageError(f"--post {spec}: empty glob")
    return PostRule(action, parts)


@dataclass(frozen=True, slots=True)
class PostTask:
    """One output to make: relative paths below DEST and below DERIVED."""

    rule: PostRule
    source: str
    output: str
    is_dir: bool = False


def _check_rel(rel: str) -> str:
    # Already decoded (a RelPath): checked, never decoded again.
    parts = rel.split("/")
    if rel.startswith("/") or parts[0] == STATE_DIR or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"not a safe relative path: {rel!r}")
    if "\0" in rel or "\\" in rel:
        raise UnsafePath(f"unsafe character in {rel!r}")
    return rel


def _output_name(rule: PostRule, n: int, source: str) -> tuple[str, bool]:
    o = rule.options
    if rule.action == "thumbnails":
        return f"thumbnails-{o.size[0]}x{o.size[1]}", True
    if rule.action == "transcode":
        return f"transcode-{o.height}p.mp4", False
    if rule.action == "custom":
        stem = f"custom-{o.name or n}"
        if not any("{output}" in a for a in o.args):
            return stem, True
        ext = o.ext or (
            source.rsplit(".", 1)[1].lower() if "." in source.rsplit("/", 1)[-1] else "out"
        )
        return f"{stem}.{ext}", False
    return {"probe": "probe.ok", "remux": "remux.mp4", "audio": "audio.m4a"}[rule.action], False


def plan_post(rules: Iterable[PostRule], rel_path: str) -> list[PostTask]:
    """The outputs ``rules`` make for the file ``rel_path`` (pure; first rule wins a name)."""
    rel = _check_rel(rel_path)
    tasks: dict[str, PostTask] = {}
    customs = 0
    for rule in rules:
        customs += rule.action == "custom"
        if rule.matches(rel):
            name, is_dir = _output_name(rule, customs, rel)
            tasks.setdefault(f"{rel}/{name}", PostTask(rule, rel, f"{rel}/{name}", is_dir))
    return list(tasks.values())


def default_timeout(size: int) -> float:
    """60 s, plus 10 s for each 10 MiB of input."""
    return 60.0 + 10.0 * size / (10 << 20)


def needs_ffmpeg(rules: Iterable[PostRule]) -> bool:
    return any(r.action in ACTIONS for r in rules)


def require_ffmpeg(
    rules: Iterable[PostRule], find: Callable[[], FFmpeg | None] = find_ffmpeg
) -> FFmpeg:
    """The ffmpeg to use; :class:`UsageError` (exit 2) at start-up when absent."""
    found = find()
    if found is None:
        raise UsageError(_NO_FFMPEG)
    return found


def _inside(path: Path, root: Path) -> Path:
    if not path.resolve().is_relative_to(root.resolve()) or path.resolve() == root.resolve():
        raise UnsafePath(f"{path} is not below {root}")
    return path


def check_derived(dest: Path, derived: Path) -> None:
    """Refuse a derived tree that overlaps the mirror (``--delete`` would eat it)."""
    d, m = derived.resolve(), dest.resolve()
    if (d.is_relative_to(m) and not d.is_relative_to(m / STATE_DIR)) or m.is_relative_to(d):
        raise UsageError(f"the derived tree {derived} must lie outside {dest} (and not contain it)")


def remove_derived(derived: Path, rel: str) -> bool:
    """Remove ``DERIVED/<rel>/`` (a deleted source's outputs) and empty parents."""
    target = _inside(Path(derived) / _check_rel(rel), Path(derived))
    if not os.path.lexists(target):
        return False
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()
    for parent in target.parents:
        if parent == Path(derived) or not parent.is_relative_to(derived):
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: keep it and everything above
            break
    return True


class PostStatus(enum.StrEnum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PostOutcome:
    """What one rule did for one file; ``outputs`` are relative to DERIVED."""

    rel: str
    action: str
    status: PostStatus
    outputs: tuple[str, ...] = ()
    error: str | None = None
    """The reason and ffmpeg's stderr tail, when failed."""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class PostCounts:
    queued: int = 0
    running: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0


Runner = Callable[[Sequence[str], float, threading.Event | None], RunResult]


def _fresh(out: Path, mtime: float) -> bool:
    try:
        return out.stat().st_mtime >= mtime
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(parent: Path) -> None:
    # Temporaries left by a run that died (its pid is gone); a live run's stay.
    for entry in os.scandir(parent):
        pid = entry.name[len(_TMP) :].split("-", 1)[0]
        if (
            entry.name.startswith(_TMP)
            and pid.isdigit()
            and int(pid) != os.getpid()
            and not _pid_alive(int(pid))
        ):
            shutil.rmtree(entry.path, ignore_errors=True)


class PostPool:
    """Runs post-processing tasks in a bounded pool while downloads go on.

    Only the coordinating process uses it: threads, each waiting on one
    ffmpeg process (the work happens there).  ``runner`` is the subprocess
    seam, replaceable in tests.

    >>> pool = PostPool(ff, rules, dest, derived)            # doctest: +SKIP
    >>> pool.submit("videos/a.mp4")                          # doctest: +SKIP
    2
    >>> pool.close()                                         # doctest: +SKIP
    [PostOutcome(rel='videos/a.mp4', action='thumbnails', status='done', ...), ...]
    """

    def __init__(
        self,
        ffmpeg: FFmpeg,
        rules: Sequence[PostRule],
        dest: Path,
        derived: Path,
        *,
        jobs: int | None = None,
        timeout: float | None = None,
        runner: Runner = run,
    ) -> None:
        self._ff = ffmpeg
        self._rules = tuple(rules)
        self._dest = Path(dest).absolute()
        self._derived = Path(derived).absolute()
        check_derived(self._dest, self._derived)
        self._timeout = timeout
        self._runner = runner
        self._pool = ThreadPoolExecutor(jobs or os.cpu_count() or 2, thread_name_prefix="post")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._finished: list[PostOutcome] = []
        self._inflight: set[str] = set()
        self._counts = {"queued": 0, "running": 0, "done": 0, "skipped": 0, "failed": 0}
        self._crash: BaseException | None = None
        self._closed = False

    @property
    def counts(self) -> PostCounts:
        with self._lock:
            return PostCounts(**self._counts)

    def submit(self, rel: str, *, force: bool = False) -> int:
        """Queue the stale outputs of ``DEST/<rel>``; the number queued.

        Fresh outputs are reported as skipped by :meth:`poll`.  ``force``
        ignores freshness: pass it for a file this run changed, whose server
        date may be older than the outputs of its previous version.
        """
        if self._closed:
            raise RuntimeError("PostPool.submit() after close() or cancel()")
        tasks = plan_post(self._rules, rel)
        if not tasks:
            return 0
        src = self._dest / rel
        try:
            st = src.stat()
        except OSError as exc:
            for t in tasks:
                self._finish(t, PostStatus.FAILED, error=f"cannot read {rel}: {exc.strerror}")
            return 0
        queued = 0
        for task in tasks:
            out = self._derived / task.output
            with self._lock:
                if task.output in self._inflight:
                    continue
                if not force and _fresh(out, st.st_mtime):
                    self._counts["skipped"] += 1
                    skipped = PostOutcome(rel, task.rule.action, PostStatus.SKIPPED, (task.output,))
                    self._finished.append(skipped)
                    continue
                self._inflight.add(task.output)
                self._counts["queued"] += 1
            limit = task.rule.timeout or self._timeout or default_timeout(st.st_size)
            fut = self._pool.submit(self._execute, task, src, st.st_mtime, limit)
            fut.add_done_callback(functools.partial(self._settled, task))
            queued += 1
        return queued

    def poll(self) -> list[PostOutcome]:
        """Outcomes finished since the last call (never blocks)."""
        with self._lock:
            out, self._finished = self._finished, []
            crash, self._crash = self._crash, None
        if crash is not None:  # a bug in a worker thread: do not hide it
            raise crash
        return out

    def close(self, wait: bool = True) -> list[PostOutcome]:
        """Accept no more files; with ``wait``, let the queue drain first."""
        self._closed = True
        self._pool.shutdown(wait=wait)
        return self.poll()

    def cancel(self) -> None:
        """Drop queued tasks and kill running ffmpeg processes (Ctrl-C)."""
        self._closed = True
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> PostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.cancel()
        self._pool.shutdown(wait=True)

    def _settled(self, task: PostTask, fut: Future[None]) -> None:
        with self._lock:
            if fut.cancelled():
                self._counts["queued"] -= 1
                self._inflight.discard(task.output)
            elif fut.exception() is not None and self._crash is None:
                self._crash = fut.exception()

    def _finish(
        self,
        task: PostTask,
        status: PostStatus,
        *,
        outputs: tuple[str, ...] = (),
        error: str | None = None,
        ran: bool = False,
        seconds: float = 0.0,
    ) -> None:
        outcome = PostOutcome(task.source, task.rule.action, status, outputs, error, seconds)
        with self._lock:
            if ran:
                self._counts["running"] -= 1
                self._inflight.discard(task.output)
            self._counts[status.value] += 1
            self._finished.append(outcome)

    def _execute(self, task: PostTask, src: Path, mtime: float, limit: float) -> None:
        with self._lock:
            self._counts["queued"] -= 1
            self._counts["running"] += 1
        started = time.monotonic()
        status, error = PostStatus.FAILED, None
        outputs: tuple[str, ...] = ()
        try:
            outputs = self._make(task, src, mtime, limit)
            status = PostStatus.DONE
        except PostProcessError as exc:
            error = f"{exc.message}\n{exc.tail}".strip()
        except (OSError, UnsafePath) as exc:
            error = str(exc)
        seconds = time.monotonic() - started
        self._finish(task, status, outputs=outputs, error=error, ran=True, seconds=seconds)

    def _argv(self, task: PostTask, src: Path, out: Path, tmp: Path) -> list[str]:
        o, action = task.rule.options, task.rule.action
        if action == "thumbnails":
            return thumbnails_argv(self._ff, src, tmp, size=o.size, count=o.count)
        if action == "probe":
            return probe_argv(self._ff, src)
        if action == "transcode":
            return transcode_argv(self._ff, src, out, height=o.height, crf=o.crf, preset=o.preset)
        if action == "remux":
            return remux_argv(self._ff, src, out)
        if action == "audio":
            return audio_argv(self._ff, src, out)
        return custom_argv(self._ff, o.args, src=src, out=out, outdir=tmp)

    def _make(self, task: PostTask, src: Path, mtime: float, limit: float) -> tuple[str, ...]:
        final = self._derived / task.output
        parent = _inside(final.parent, self._derived)
        parent.mkdir(parents=True, exist_ok=True)
        _sweep(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-", dir=parent))
        old: str | None = None
        try:
            made = tmp if task.is_dir else tmp / final.name
            result = self._runner(self._argv(task, src, made, tmp), limit, self._stop)
            if result.returncode != 0:
                raise PostProcessError(
                    f"ffmpeg exited with status {result.returncode}", result.stderr_tail
                )
            if task.rule.action == "probe":
                if result.stderr_tail:
                    raise PostProcessError("decoding reported errors", result.stderr_tail)
                made.write_text(f"decoded by ffmpeg {'.'.join(map(str, self._ff.version))}\n")
            if not (any(made.iterdir()) if task.is_dir else made.is_file()):
                raise PostProcessError("ffmpeg wrote no output", result.stderr_tail)
            stamp = max(time.time(), mtime)  # a source dated in the future stays fresh too
            os.utime(made, (stamp, stamp))
            if task.is_dir and os.path.lexists(final):
                # rename() cannot replace a non-empty directory: move the old one aside.
                old = tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-old-", dir=parent)
                os.replace(final, Path(old) / "x")
            os.replace(made, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        if task.is_dir:
            return tuple(f"{task.output}/{n}" for n in sorted(os.listdir(final)))
        return (task.output,)
