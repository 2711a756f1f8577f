"""What a log sees while a run goes on (and what the live display shares with it).

:class:`LineReporter` writes a status line every few seconds and one line per
failure, as plain text or JSON lines, for cron, systemd and pipes. The live
bars on a terminal are :class:`fetcher.live.RichReporter`. Reporters take
their stream and clock from the caller, so tests can inject them.

Nothing here imports rich: a run whose output is not a terminal does not import
it at all (its closing summary is plain lines, :func:`fetcher.report.render_plain`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

from fetcher.models import (
    CrawlProblem,
    FileStarted,
    Job,
    Outcome,
    RemoteFile,
    Reporter,
    Retried,
    Status,
)

if TYPE_CHECKING:
    from fetcher.postprocess import PostCounts, PostOutcome

__all__ = ["LineReporter", "Tally", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Tally:
    """What a run has done so far, as its reporters count it."""

    def __init__(self) -> None:
        self.planned_files = 0
        self.planned_bytes = 0
        self.done_files = 0
        self.skipped = 0
        self.failed = 0
        self.retries = 0
        self.bytes = 0
        self.crawling = True

    def finished(self, out: Outcome) -> bool:
        """Count ``out``; True if it is a failure to show. A file interrupted by a stop is
        neither done nor failed (the next run resumes it); one whose worker died comes
        here as failed (the coordinator names why)."""
        if out.status is Status.FAILED and out.error == "interrupted":
            return False
        self.done_files += 1
        if out.status is Status.UNCHANGED:  # a conditional GET's 304: the summary's unchanged
            self.skipped += 1
        if out.status is Status.FAILED:
            self.failed += 1
            return True
        return False


def json_text(doc: Any, indent: int | None = None) -> str:
    """``doc`` as JSON, its text as it is; with a name that is not UTF-8 in it (its bytes
    kept as surrogates, which a UTF-8 file cannot take) as ``\\udcXX`` escapes instead:
    still JSON, nothing lost."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(doc, indent=indent)
    return text


class LineReporter(Reporter):
    """Unattended output: a status line every ``interval`` seconds and one per problem."""

    def __init__(
        self,
        stream: TextIO,
        fmt: str = "text",
        interval: float = 5.0,
        get_time: Callable[[], float] = time.monotonic,
        verbose: bool = False,
        job: str | None = None,
    ) -> None:
        self.stream = stream
        self.job = job
        """The config job this run is (``--config``): every line names it, as one log
        holds the lines of all the jobs run; None for a run of the command line's."""
        self.fmt = fmt
        self.interval = interval
        self.get_time = get_time
        self.verbose = verbose
        self.t = Tally()
        self.start = get_time()
        self.last = self.start
        self.post: PostCounts | None = None
        self.begun = False

    def begin(self) -> None:
        self.begun = True

    def _emit(self, kind: str, text: str, **fields: Any) -> None:
        if self.fmt == "json":
            rec = {"ts": round(time.time(), 3), "event": kind, "job": self.job, **fields}
            self.stream.write(json_text(rec) + "\n")
        else:
            name = f"{self.job}: " if self.job else ""
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name}{text}\n")
        self.stream.flush()

    def _tick(self) -> None:
        now = self.get_time()
        if now - self.last >= self.interval:
            self.last = now
            self.status()

    def status(self) -> None:
        t = self.t
        elapsed = max(self.get_time() - self.start, 1e-9)
        total = "?" if t.crawling else str(t.planned_files)
        self._emit(
            "status",
            f"status: {t.done_files}/{total} files, {human_bytes(t.bytes)} at "
            f"{human_bytes(t.bytes / elapsed)}/s, {t.skipped} unchanged, {t.failed} failed, "
            f"{t.retries} retries{' (crawling)' if t.crawling else ''}"
            + (f"; ffmpeg {self.post.done} done, {self.post.queued + self.post.running} to do, {self.post.failed} failed" if self.post else ""),
            files_done=t.done_files, files_planned=t.planned_files, bytes=t.bytes,
            skipped=t.skipped, failed=t.failed, retries=t.retries, crawling=t.crawling,
            **({"post": msgspec.structs.asdict(self.post)} if self.post else {}),
        )  # fmt: skip

    def planned(self, job: Job) -> None:
        self.t.planned_files += 1
        self.t.planned_bytes += job.file.size or 0
        self._tick()

    def skipped(self, f: RemoteFile) -> None:
        self.t.skipped += 1
        self._tick()

    def skipped_many(self, n: int) -> None:
        self.t.skipped += n
        self._tick()

    def transferred(self, nbytes: int) -> None:
        self.t.bytes += nbytes
        self._tick()

    def started(self, ev: FileStarted) -> None:
        self._tick()

    def finished(self, out: Outcome) -> None:
        if self.t.finished(out):
            self._emit("failed", f"failed: {out.path}: {out.error}", path=out.path, error=out.error)
        elif self.verbose:
            self._emit(
                "done",
                f"{out.status.value}: {out.path}",
                path=out.path,
                status=out.status.value,
                size=out.size,
            )
        self._tick()

    def retried(self, ev: Retried) -> None:
        self.t.retries += 1
        if self.verbose:
            self._emit(
                "retry",
                f"retry {ev.attempt}: {ev.path}: {ev.reason}",
                path=ev.path,
                reason=ev.reason,
            )
        self._tick()

    def problem(self, p: CrawlProblem) -> None:
        self._emit(p.kind, f"{p.kind}: {p.url}: {p.message}", url=p.url, message=p.message)

    def notice(self, message: str) -> None:
        self._emit("notice", message, message=message)

    def crawl_done(self) -> None:
        self.t.crawling = False
        if self.verbose:
            self._emit(
                "crawl_done",
                f"crawl done: {self.t.planned_files} files to fetch",
                files=self.t.planned_files,
            )

    def post_progress(self, c: PostCounts) -> None:
        self.post = c
        self._tick()

    def post_failed(self, out: PostOutcome) -> None:
        self._emit(
            "post_failed",
            f"{out.label} failed: {out.rel}: {out.error}",
            path=out.rel,
            action=out.label,
            error=out.error,
        )

    def summary(self, text: str, fields: dict[str, Any]) -> None:
        """The run's outcome: ``text`` as a line, or ``fields`` as a JSON ``summary`` event."""
        self._emit("summary", text, **fields)

    def close(self) -> None:
        if self.begun:  # (a run that never started has no status: its error or skip says why)
            self.status()
