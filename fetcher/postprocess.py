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

Each output is made in ``DERIVED/.fetcher/.tmp-<pid>-<random>/`` (a name free of
the server's characters) and renamed into place (a directory as a whole), dated
as its source's last change on disk (the later of its mtime and ctime, when the
task was queued).  An output at least as new as that is fresh and is not made
again, unless the options its name does not show were changed since: beside an
output of thumbnails (their count), transcode (its quality and preset) or a custom
rule (its arguments), ``.<output>.options`` says what made it, in a line such as
``transcode height=480 crf=23 preset='veryfast'``.  An output without one (made
before fetch kept them) is taken as made with the rule's options of the run that
finds it.

An output whose ffmpeg timed out or refused the source would fail so again: its
outcome carries a :class:`~fetcher.state.FailedPost`, which the coordinator keeps in
the state, and a pool given it reports the output as failed before, without running
ffmpeg, while the source's size and change, the rule, its timeout and ffmpeg stay as
they were (unless told to ``retry_failed``, or the source was fetched again)::

    >>> [t.output for t in plan_post([parse_post_spec("remux")], "a/b.MKV")]
    ['a/b.MKV/remux.mp4']
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import msgspec

from fetcher.errors import UnsafePath, UsageError
from fetcher.ffmpeg import (
    FFmpeg,
    PostProcessError,
    PostTimeout,
    RunResult,
    audio_argv,
    custom_argv,
    media_seconds,
    probe_argv,
    remux_argv,
    run,
    thumbnails_argv,
    transcode_argv,
)
from fetcher.models import STATE_DIR
from fetcher.postrules import (
    ACTIONS,
    AUDIO_GLOBS,
    BY_DURATION,
    DEFAULT_TIMEOUT,
    TMP_PREFIX,
    VIDEO_GLOBS,
    PostOptions,
    PostRule,
    PostTask,
    check_rel,
    default_timeout,
    needs_ffmpeg,
    parse_post_spec,
    plan_post,
    require_ffmpeg,
    rule_from_mapping,
)
from fetcher.state import FailedPost

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


def _link_in(path: Path, root: Path) -> Path | None:
    """The first symbolic link on the way from ``root`` (not itself) down to ``path``."""
    for step in reversed((path, *path.parents)):
        if step.is_relative_to(root) and step != root and step.is_symlink():
            return step
    return None


def _inside(path: Path, root: Path) -> Path:
    """``path``, which must lie below ``root`` (a directory of outputs) also once its
    symbolic links are followed: else :class:`UnsafePath`, naming the link to blame."""
    try:
        real, top = path.resolve(), root.resolve()
    except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
        raise UnsafePath(
            f"{_link_in(path, root) or path} is a loop of symbolic links: outputs are written"
            f" only into directories below {root} (replace the link with one)"
        ) from None
    if not real.is_relative_to(top) or real == top:
        link = _link_in(path, root)
        if link is None:
            raise UnsafePath(f"{path} is not below {root}")
        raise UnsafePath(
            f"{link} is a symbolic link to {os.readlink(link)}, which is not below {root}:"
            " outputs are written only into directories below it (replace the link with one)"
        )
    return path


def _real(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # (RuntimeError: a loop, before Python 3.13)
        raise UsageError(f"{what} {path} is a loop of symbolic links") from exc


def check_derived(dest: Path, derived: Path) -> None:
    """Refuse a derived tree that overlaps the mirror (``--delete`` would eat it)."""
    d, m = _real(derived, "the derived tree"), _real(dest, "DEST")
    if (d.is_relative_to(m) and not d.is_relative_to(m / STATE_DIR)) or m.is_relative_to(d):
        raise UsageError(f"the derived tree {derived} must lie outside {dest} (and not contain it)")
    if d == m / STATE_DIR:
        # DERIVED/<rel> would be fetch's own files for a source named like them: --delete
        # of an upstream "state.sqlite" removed the mirror's state, "partial/" mixed with
        # partial downloads
        raise UsageError(
            f"the derived tree {derived} is {STATE_DIR} itself, which holds fetch's state:"
            " put it elsewhere (a directory below it will do)"
        )
    for cleared in ("staged", "replaced", "partial"):  # emptied by runs (metadata, partials)
        if d.is_relative_to(m / STATE_DIR / cleared):
            where = m / STATE_DIR / cleared
            raise UsageError(
                f"the derived tree {derived} lies in {where}, which runs clear: put it elsewhere"
            )


def remove_derived(derived: Path, rel: str) -> bool:
    """Remove ``DERIVED/<rel>/`` (a deleted source's outputs) and empty parents."""
    return _remove_below(Path(derived), Path(derived) / check_rel(rel))


def _remove_below(derived: Path, target: Path) -> bool:
    """Remove ``target`` (a file, or a directory and all in it) inside ``derived``, then
    the directories that leaves empty up to ``derived``; False if there was nothing."""
    target = _inside(target, derived)
    if not os.path.lexists(target):
        return False
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()
    for parent in target.parents:
        if parent == derived or not parent.is_relative_to(derived):
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (other outputs, a sibling's temporary): kept, and above
            break
    return True


class PostStatus(enum.StrEnum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    FAILED_BEFORE = "failed before"
    """Not tried: it failed before on this same input, with this same rule, timeout and
    ffmpeg, in a way that would fail again (see :class:`~fetcher.state.FailedPost`)."""


class PostOutcome(msgspec.Struct, frozen=True):
    """What one rule did for one file; ``outputs`` are relative to DERIVED."""

    rel: str
    action: str
    status: PostStatus
    outputs: tuple[str, ...] = ()
    error: str | None = None
    """The reason and ffmpeg's stderr tail, when failed; why, when skipped for want of
    a stream to take."""
    seconds: float = 0.0
    undecodable: bool = False
    """Failed because the file does not decode: a probe's ffmpeg ran to its end and
    rejected it (not a timeout, a kill, or a file we could not write)."""
    custom: str | None = None
    """A custom rule's output name (``custom-still``): several custom rules are told
    apart by it."""
    output: str = ""
    """The output it is about, below DERIVED (for thumbnails, their directory)."""
    failure: FailedPost | None = None
    """When failed in a way that would fail again on the same input with the same rule
    (a timeout, ffmpeg refusing the file): the record that keeps later runs from trying
    it again while both stay as they are."""

    @property
    def label(self) -> str:
        """How the summary, the report and the log name the rule."""
        return self.custom or self.action


class PostCounts(msgspec.Struct, frozen=True):
    queued: int = 0
    running: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failed_before: int = 0


Runner = Callable[[Sequence[str], float, threading.Event | None], RunResult]


class _Undecodable(PostProcessError):
    """ffmpeg ran to its end on the source and reported that it does not decode."""


class _Refused(PostProcessError):
    """ffmpeg ran to its end and made nothing of the source: it would again, given the
    same file, rule and ffmpeg."""


class _NothingToTake(PostProcessError):
    """The source has none of the streams the action takes: the audio of a silent
    video, thumbnails of a sound-only file.  Nothing is wrong, and nothing to make."""


# What ffmpeg says (5.1: "Output file #0 does not contain any stream"; 7: "Output file
# does not contain any stream") when the action's selection found nothing to take.
_NO_STREAM = "does not contain any stream"
# What ffmpeg says when it has no decoder for a stream's codec (5.1, 6: "Decoder (codec
# av1) not found for input stream #0:0"; 7: "Decoding requested, but no decoder found
# for: av1"): a limit of this ffmpeg, not a verdict on the file.
_NO_DECODER = re.compile(r"Decoder \(codec [^)]*\) not found|no decoder found for")
# What ffmpeg says (strerror) when our side failed it: the disk, memory, permissions. Not
# the file's doing: tried again next run, unlike a file it refused.
_OUR_SIDE = re.compile(
    r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied"
    r"|Input/output error|Cannot allocate memory|Too many open files"
)


def _transport_stream(src: Path) -> bool:
    """``src`` begins as an MPEG transport stream: the sync byte 0x47 at each 188-byte
    packet (or at byte 4 of each 192-byte one, with its time code), over the first two.
    ``*.ts`` names TypeScript sources as well as recordings and HLS segments; ffmpeg
    failed on every source, and a failed probe sent its file to be fetched again, on
    every run. One that cannot be read is left to the actions to report."""
    try:
        with open(src, "rb") as fh:
            head = fh.read(2 * 192)
    except OSError:
        return True
    return any(
        len(head) > first + size and all(head[i] == 0x47 for i in range(first, len(head), size))
        for first, size in ((0, 188), (4, 192))
    )


def _changed_ns(st: os.stat_result) -> int:
    """When the source last changed on disk.

    Its mtime alone is the server's date, which can be older than the outputs of
    the version before; replacing it (a download's rename and utime) also moves
    its ctime, which nothing else of ours touches (an unchanged file is left
    alone).  Outputs are dated with this same value, so no two clocks are compared.
    """
    return max(st.st_mtime_ns, st.st_ctime_ns)


_COARSEST_NS = 2_000_000_000
"""FAT's two seconds: a multiple of every file system's time step (ext2/3 with small
inodes and HFS+ keep seconds, exFAT 10 ms, others less)."""


def _date(made: Path, changed_ns: int) -> None:
    """Date an output as its source's change, or just after where that cannot be kept.

    A file system with a coarse time step stores the date rounded down, older than
    the source: the output would look stale, and be made again, on every run.  There
    it is dated at the next multiple of two seconds instead, which all keep exactly.
    """
    os.utime(made, ns=(changed_ns, changed_ns))
    if made.stat().st_mtime_ns < changed_ns:
        up = -(-changed_ns // _COARSEST_NS) * _COARSEST_NS
        os.utime(made, ns=(up, up))


def _whole(out: Path) -> bool:
    """Not an empty file or directory (what a damaged output looks like)."""
    try:
        if out.is_dir():
            with os.scandir(out) as entries:
                return next(entries, None) is not None
        return out.stat().st_size > 0
    except OSError:
        return False


def _fresh(out: Path, changed_ns: int) -> bool:
    try:
        return out.stat().st_mtime_ns >= changed_ns and _whole(out)
    except OSError:
        return False


_OPTIONS_READ = {"thumbnails": ("count",), "transcode": ("crf", "preset"), "custom": ("args",)}
"""What each action reads of its options and its output's name does not show (a
thumbnails directory is named by its size, a transcode by its height: another value,
another output). The actions missing here have no options."""


def made_with(rule: PostRule) -> str | None:
    """The line that says what made a ``rule``'s output (see the module's docstring), or
    None for an action without options."""
    read = _OPTIONS_READ.get(rule.action)
    if read is None:
        return None
    o, shown = rule.options, []
    if rule.action == "thumbnails":
        shown.append(f"size={o.size[0]}x{o.size[1]}")
    elif rule.action == "transcode":
        shown.append(f"height={o.height}")
    shown += [f"{k}={getattr(o, k)!r}" for k in read]
    return " ".join([rule.action, *shown]) + "\n"


def _options_file(out: Path) -> Path:
    return out.with_name(f".{out.name}.options")


def _same_options(out: Path, line: str | None) -> bool:
    """Was the (fresh) output ``out`` made with the options ``line`` describes? Without a
    record of them (made before records were kept) it is taken as made so, and one is
    written: a change of the options from then on makes it again."""
    if line is None:
        return True
    record = _options_file(out)
    try:
        return record.read_text(encoding="utf-8") == line
    except FileNotFoundError:
        _write_options(out, line)
        return True
    except (OSError, UnicodeDecodeError):
        return False  # unreadable: made again, and the record with it


def _write_options(out: Path, line: str | None) -> None:
    if line is None:
        return
    record = _options_file(out)
    tmp = record.with_name(f"{TMP_PREFIX}{os.getpid()}-{record.name}")
    try:
        tmp.write_text(line, encoding="utf-8")
        os.replace(tmp, record)
    except OSError:  # (the output stands; it is taken as made with these next time)
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return
    for entry in entries:
        pid = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if (
            entry.name.startswith(TMP_PREFIX)
            and pid.isdigit()
            and int(pid) != os.getpid()
            and not _pid_alive(int(pid))
        ):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:  # an options record being written
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


class _Once:
    """``read()``, called by the first task that needs it; its answer kept for the others
    (the tasks of one source share its duration)."""

    def __init__(self, read: Callable[[], float | None]) -> None:
        self._read: Callable[[], float | None] | None = read
        self._value: float | None = None
        self._lock = threading.Lock()

    def __call__(self) -> float | None:
        with self._lock:
            if self._read is not None:
                self._value, self._read = self._read(), None
            return self._value


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
        failed: Mapping[str, FailedPost] | None = None,
        retry_failed: bool = False,
    ) -> None:
        self._ff = ffmpeg
        self._rules = tuple(rules)
        self._dest = Path(dest).absolute()
        self._derived = Path(derived).absolute()
        check_derived(self._dest, self._derived)
        self._timeout = timeout
        self._runner = runner
        self._failed = dict(failed or {})
        self._retry_failed = retry_failed
        self._pool = ThreadPoolExecutor(jobs or os.cpu_count() or 2, thread_name_prefix="post")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._finished: list[PostOutcome] = []
        self._inflight: set[str] = set()
        self._counts = dict.fromkeys(PostCounts.__struct_fields__, 0)
        self._crash: BaseException | None = None
        self._closed = False

    @property
    def counts(self) -> PostCounts:
        with self._lock:
            return PostCounts(**self._counts)

    def submit(self, rel: str, *, force: bool = False) -> int:
        """Queue the stale outputs of ``DEST/<rel>``; the number queued.

        Fresh outputs are reported as skipped by :meth:`poll`, and those in ``failed``
        (the pool's) for this same input and rule as failed before, unless the pool
        was made to ``retry_failed``.  ``force`` ignores both and first removes the
        outputs already there (all of ``DERIVED/<rel>/``, those of other rules too):
        pass it for a file this run fetched, so that an interrupted remake leaves
        them missing (made next run), never those of the previous version.
        """
        if self._closed:
            raise RuntimeError("PostPool.submit() after close() or cancel()")
        tasks = plan_post(self._rules, rel)
        if force:
            self._remove_all(rel)
        if not tasks:
            return 0
        src = self._dest / rel
        if rel.lower().endswith(".ts") and not _transport_stream(src):
            return 0  # TypeScript (or any text) named like a recording: not media
        try:
            st = src.stat()
        except OSError as exc:
            for t in tasks:
                self._finish(t, PostStatus.FAILED, error=f"cannot read {rel}: {exc.strerror}")
            return 0
        changed = _changed_ns(st)
        length = _Once(functools.partial(media_seconds, self._ff, src, self._stop))
        queued = 0
        for task in tasks:
            out = self._derived / task.output
            with self._lock:
                if task.output in self._inflight:
                    continue
                if force:
                    self._remove(task)
                elif _fresh(out, changed) and _same_options(out, made_with(task.rule)):
                    self._counts["skipped"] += 1
                    skipped = PostOutcome(
                        rel,
                        task.rule.action,
                        PostStatus.SKIPPED,
                        (task.output,),
                        custom=task.custom,
                        output=task.output,
                    )
                    self._finished.append(skipped)
                    continue
                elif self._failed_before(task, st.st_size, changed):
                    self._counts["failed_before"] += 1
                    before = self._failed[task.output]
                    self._finished.append(
                        PostOutcome(
                            rel,
                            task.rule.action,
                            PostStatus.FAILED_BEFORE,
                            error=before.error,
                            custom=task.custom,
                            output=task.output,
                        )
                    )
                    continue
                self._inflight.add(task.output)
                self._counts["queued"] += 1
            fut = self._pool.submit(self._execute, task, src, changed, st.st_size, length)
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

    @property
    def closed(self) -> bool:
        return self._closed

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

    def _made_by(self, rule: PostRule) -> str:
        """What a failure is recorded against, beside its input: the rule's action and
        options, its timeout (the default's terms: by the input), and this ffmpeg."""
        line = (made_with(rule) or rule.action).rstrip("\n")
        timeout = rule.timeout or self._timeout or DEFAULT_TIMEOUT
        version = ".".join(map(str, self._ff.version)) or "unknown"
        return f"{line} timeout={timeout} ffmpeg={self._ff.path} {version}"

    def _failed_before(self, task: PostTask, size: int, changed: int) -> bool:
        before = self._failed.get(task.output)
        return (
            before is not None
            and not self._retry_failed
            and (before.size, before.changed_ns) == (size, changed)
            and before.made_by == self._made_by(task.rule)
        )

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
        undecodable: bool = False,
        failure: FailedPost | None = None,
    ) -> None:
        outcome = PostOutcome(
            task.source, task.rule.action, status, outputs, error, seconds, undecodable,
            task.custom, task.output, failure,
        )  # fmt: skip
        with self._lock:
            if ran:
                self._counts["running"] -= 1
                self._inflight.discard(task.output)
            self._counts[status.name.lower()] += 1
            self._finished.append(outcome)

    def _limit(self, task: PostTask, size: int, length: _Once) -> float:
        """The task's timeout: its rule's, else the pool's, else by its input's size and,
        for an action whose work follows it, duration (read once for all its tasks)."""
        explicit = task.rule.timeout or self._timeout
        if explicit:
            return explicit
        return default_timeout(size, length() if task.rule.action in BY_DURATION else None)

    def _execute(self, task: PostTask, src: Path, changed: int, size: int, length: _Once) -> None:
        with self._lock:
            self._counts["queued"] -= 1
            self._counts["running"] += 1
        started = time.monotonic()
        status, error, undecodable, again = PostStatus.FAILED, None, False, False
        outputs: tuple[str, ...] = ()
        try:
            outputs = self._make(task, src, changed, self._limit(task, size, length))
            status = PostStatus.DONE
        except _NothingToTake as exc:
            status, error = PostStatus.SKIPPED, exc.message
        except PostProcessError as exc:
            error = f"{exc.message}\n{exc.tail}".strip()
            undecodable = isinstance(exc, _Undecodable)
            # (an undecodable file is fetched again, and then made again: not recorded)
            again = isinstance(exc, PostTimeout | _Refused)
        except (OSError, UnsafePath) as exc:
            error = str(exc)
        if status is not PostStatus.DONE:  # (skipped: an older version's output is stale)
            self._discard(task)
        if status is PostStatus.FAILED and self._stop.is_set():
            self._dropped(task)  # killed by cancel(): not done, and not a failure either
            return
        seconds = time.monotonic() - started
        failure = None
        if again and error is not None:
            made_by = self._made_by(task.rule)
            failure = FailedPost(
                task.output, task.source, size, changed, made_by, error, time.time()
            )
        self._finish(
            task,
            status,
            outputs=outputs,
            error=error,
            ran=True,
            seconds=seconds,
            undecodable=undecodable,
            failure=failure,
        )

    def _dropped(self, task: PostTask) -> None:
        with self._lock:
            self._counts["running"] -= 1
            self._inflight.discard(task.output)

    def _discard(self, task: PostTask) -> None:
        # A queued output is stale (or its source was fetched again), so what is on
        # disk was made from an older version of the source.  Left in place after a
        # failed remake it would look fresh next run (a probe.ok vouching for a file
        # that no longer decodes): remove it, and directories that leaves empty.
        # Under the lock, so a sibling task's mkdir + rename never loses its parent.
        with self._lock:
            self._remove(task)

    def _remove(self, task: PostTask) -> None:
        # With the lock held: an output, its options' record, and the directories their
        # removal leaves empty.
        out = self._derived / task.output
        with contextlib.suppress(OSError, UnsafePath):
            if made_with(task.rule) is not None:
                _remove_below(self._derived, _options_file(out))
            _remove_below(self._derived, out)

    def _remove_all(self, rel: str) -> None:
        # A source fetched again: every output of the old version goes, not only those of
        # this run's rules (thumbnails of another size, an action since dropped), which
        # nothing would ever look at again, and which keep showing the old version.
        with self._lock:
            if any(o.startswith(f"{rel}/") for o in self._inflight):
                return  # (its outputs are being made: they are of this version)
            with contextlib.suppress(OSError, UnsafePath):
                _remove_below(self._derived, self._derived / rel)

    def _argv(self, task: PostTask, src: Path, out: Path, outdir: Path) -> list[str]:
        o, action = task.rule.options, task.rule.action
        if action == "thumbnails":
            return thumbnails_argv(self._ff, src, outdir, size=o.size, count=o.count)
        if action == "probe":
            return probe_argv(self._ff, src)
        if action == "transcode":
            return transcode_argv(self._ff, src, out, height=o.height, crf=o.crf, preset=o.preset)
        if action == "remux":
            return remux_argv(self._ff, src, out)
        if action == "audio":
            return audio_argv(self._ff, src, out)
        return custom_argv(self._ff, o.args, src=src, out=out, outdir=outdir)

    def _make(self, task: PostTask, src: Path, changed: int, limit: float) -> tuple[str, ...]:
        final = self._derived / task.output
        _inside(final.parent, self._derived)
        tmp = self._tempdir()
        _sweep(final.parent)  # left there by versions that made their temporaries beside
        try:
            made = tmp / final.name
            if task.is_dir:
                # Not tmp itself, which mkdtemp makes 0700: as any directory, per umask.
                made.mkdir()
            self._produce(task, src, made, tmp, limit)
            # The source's change as seen when queued: if it changes while ffmpeg
            # runs, this output is already stale for the next run.
            _date(made, changed)
            self._publish(task, made, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tidy()
        if task.is_dir:
            return tuple(f"{task.output}/{n}" for n in sorted(os.listdir(final)))
        return (task.output,)

    def _tempdir(self) -> Path:
        # At the top of the tree, named by us alone: the paths ffmpeg gets hold no
        # character of the server's ('%' is a pattern to image2, in the directories
        # too), and the rename into DERIVED/<rel>/ stays on one file system.  Below
        # STATE_DIR, which no source path may start with (see check_rel).
        staging = self._derived / STATE_DIR
        with self._lock:  # see _discard; and _tidy removes staging when empty
            staging.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=staging))
        _sweep(staging)
        return tmp

    def _tidy(self) -> None:
        with self._lock:
            try:
                (self._derived / STATE_DIR).rmdir()
            except OSError:  # another task's temporary is there (or a live run's)
                pass

    def _produce(self, task: PostTask, src: Path, made: Path, tmp: Path, limit: float) -> None:
        outdir = made if task.is_dir else tmp  # (a custom file rule's side files: dropped)
        result = self._runner(self._argv(task, src, made, outdir), limit, self._stop)
        probe = task.rule.action == "probe"
        if result.returncode > 0 and not probe and _NO_STREAM in result.stderr_tail:
            # (a probe of a file without picture or sound is a failure: nothing decodes)
            raise _NothingToTake("no stream for this action in the file", result.stderr_tail)
        if result.returncode != 0:
            # A probe writes nothing: its exit status speaks of the input alone,
            # unless a signal (not ours: we raise for those) ended it, or this ffmpeg
            # has no decoder for its codec (fetching it again would not help).  Another
            # action's refuses the file (the same would fail the same way), unless
            # ffmpeg names our side (_OUR_SIDE) or a signal ended it.
            if probe and _NO_DECODER.search(result.stderr_tail):
                raise _Refused("this ffmpeg has no decoder for it", result.stderr_tail)
            error: type[PostProcessError] = PostProcessError
            if probe and result.returncode > 0:
                error = _Undecodable
            elif result.returncode > 0 and not _OUR_SIDE.search(result.stderr_tail):
                error = _Refused
            raise error(f"ffmpeg exited with status {result.returncode}", result.stderr_tail)
        if probe:
            if result.stderr_tail:
                raise _Undecodable("decoding reported errors", result.stderr_tail)
            made.write_text(f"decoded by ffmpeg {'.'.join(map(str, self._ff.version))}\n")
        if not _whole(made):  # (an empty one would be redone every run)
            raise _Refused("ffmpeg wrote no output", result.stderr_tail)

    def _publish(self, task: PostTask, made: Path, final: Path) -> None:
        with self._lock:  # see _discard
            final.parent.mkdir(parents=True, exist_ok=True)
            if task.is_dir and os.path.lexists(final):
                # rename() cannot replace a non-empty directory: move the old one aside,
                # into the temporary (removed with it).
                os.replace(final, made.parent / ".old")
            os.replace(made, final)
            # after the output: killed between the two, the new output keeps the old
            # record and is made once more (never an old output with a new record)
            _write_options(final, made_with(task.rule))
