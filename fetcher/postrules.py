"""Post-processing rules: which files (globs) get which ffmpeg action, and the plan (pure).

A rule comes from the CLI (``--post thumbnails=*.mp4``) or a config file
(``[[jobs.NAME.post]]`` tables); :func:`plan_post` maps a mirrored file to the
outputs its rules make in the derived tree (see :mod:`fetcher.postprocess`).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from fetcher.errors import ConfigError, UnsafePath, UsageError
from fetcher.ffmpeg import (
    FFmpeg,
    find_ffmpeg,
)
from fetcher.models import STATE_DIR

__all__ = [
    "ACTIONS",
    "AUDIO_GLOBS",
    "BY_DURATION",
    "DEFAULT_TIMEOUT",
    "TMP_PREFIX",
    "VIDEO_GLOBS",
    "PostOptions",
    "PostRule",
    "PostTask",
    "check_rel",
    "default_timeout",
    "needs_ffmpeg",
    "parse_post_spec",
    "plan_post",
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
TMP_PREFIX = ".tmp-"
_NO_FFMPEG = (
    "ffmpeg not found: install it (apt-get install ffmpeg) or `pip install 'fetcher[media]'`"
)


class PostOptions(msgspec.Struct, frozen=True):
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


class PostRule(msgspec.Struct, frozen=True):
    """Files whose relative path matches one of ``globs`` get ``action``.

    A glob without ``/`` matches the base name, one with ``/`` the whole path
    (``*`` crosses ``/``); matching ignores case, so ``*.mp4`` takes ``A.MP4``.
    """

    action: str
    globs: tuple[str, ...]
    options: PostOptions = msgspec.field(default_factory=PostOptions)
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
    # A mistyped placeholder ({inputt}, {Stem}) went to ffmpeg as it is: every file then
    # failed, each with ffmpeg's own error. Braces that are not close to one are left to
    # ffmpeg (drawtext's %{pts}, text of the user's).
    for a in v:
        for name in _BRACED.findall(a):
            if name not in PLACEHOLDERS:
                close = difflib.get_close_matches(name.lower(), PLACEHOLDERS, n=1, cutoff=0.75)
                if close:
                    raise ConfigError(
                        f"{where}: {{{name}}} in {_show(a)} is no placeholder;"
                        f" did you mean {{{close[0]}}}? (known: "
                        + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                        + ")"
                    )
    return tuple(v)


PLACEHOLDERS = ("input", "output", "outdir", "stem")
"""What a custom rule's arguments may name (:func:`fetcher.ffmpeg.custom_argv`)."""

_BRACED = re.compile(r"(?<!%)\{(\w+)\}")


def _globs(where: str, v: object) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(g, str) and g for g in items):
        raise ConfigError(f"{where}: expected a glob or a list of globs, got {_show(v)}")
    for g in items:
        if _rooted(g):
            raise ConfigError(f"{where}: {_rooted(g)}")
    return tuple(items)


def _rooted(glob: str) -> str | None:
    """Why ``glob`` can match nothing (it starts with ``/`` or ``./``: paths are matched
    as ``talks/a.mkv``, below the start URL), or None."""
    fixed = glob
    while fixed.startswith(("/", "./")):
        fixed = fixed[1:] if fixed.startswith("/") else fixed[2:]
    if fixed == glob:
        return None
    lead = glob[: glob.index("/") + 1]
    return (
        f"{_show(glob)} never matches: paths are matched below the start URL,"
        f" without a leading {lead!r} (write {_show(fixed)})"
    )


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
    for g in parts:
        if _rooted(g):
            raise UsageError(f"--post {spec}: {_rooted(g)}")
    return PostRule(action, parts)


class PostTask(msgspec.Struct, frozen=True):
    """One output to make: relative paths below DEST and below DERIVED."""

    rule: PostRule
    source: str
    output: str
    is_dir: bool = False

    @property
    def custom(self) -> str | None:
        """A custom rule's output name without extension (``custom-still``, ``custom-2``):
        what tells two custom rules apart in the summary and the report."""
        if self.rule.action != "custom":
            return None
        name = self.output.rsplit("/", 1)[-1]
        return name if self.is_dir else name.rsplit(".", 1)[0]


def check_rel(rel: str) -> str:
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
    rel = check_rel(rel_path)
    tasks: dict[str, PostTask] = {}
    customs = 0
    for rule in rules:
        customs += rule.action == "custom"
        if rule.matches(rel):
            name, is_dir = _output_name(rule, customs, rel)
            tasks.setdefault(f"{rel}/{name}", PostTask(rule, rel, f"{rel}/{name}", is_dir))
    return list(tasks.values())


BY_DURATION = ("probe", "transcode", "audio", "custom")
"""The actions that decode the whole input, whose work follows how long it plays, not its
size: a five-minute 720p talk of 19 MiB took 76 s to transcode against a limit, by its
size, of 79 s. (``thumbnails`` decodes a few key frames, ``remux`` copies bytes.)"""


_BASE, _PER_10_MIB, _PLAYS = 60.0, 10.0, 2.0  # default_timeout()'s terms

DEFAULT_TIMEOUT = f"default({_BASE:g}s+{_PER_10_MIB:g}s/10MiB,>={_BASE:g}s+{_PLAYS:g}x)"
"""The default timeout as a failure's record names it (:func:`default_timeout`, in its own
terms): a failure recorded under other terms is tried again, as under another timeout."""


def default_timeout(size: int, seconds: float | None = None) -> float:
    """60 s, plus 10 s for each 10 MiB of input; for an input that plays ``seconds``
    (known for an action of :data:`BY_DURATION`), at least 60 s plus twice that, so
    that only an ffmpeg slower than half real time is stopped.

    >>> default_timeout(19 << 20), default_timeout(19 << 20, 300.0)
    (79.0, 660.0)
    """
    by_size = _BASE + _PER_10_MIB * size / (10 << 20)
    if seconds is None:
        return by_size
    return max(by_size, _BASE + _PLAYS * seconds)


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
