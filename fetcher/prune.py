"""Deletion: files gone upstream, after a complete and clean crawl, within the guard."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from pathlib import Path

from fetcher.config import MirrorJob
from fetcher.errors import UnsafePath
from fetcher.landing import partial_dir, partial_name
from fetcher.models import STATE_DIR, RelPath, Summary
from fetcher.plan import wanted
from fetcher.state import State

__all__ = ["below_any", "drop_partials", "local_files", "not_seen", "prune"]


def local_files(dest: Path, skip: Set[str] = frozenset()) -> Iterator[str]:
    """DEST's files, relative; not in the state directory nor below the directories ``skip``."""
    top = os.fspath(dest)
    below = top if top.endswith("/") else f"{top}/"  # what os.walk puts before a subdirectory
    for root, dirs, files in os.walk(top):
        if root == top:
            dirs[:] = [d for d in dirs if d != STATE_DIR and d not in skip]
            rel_root = ""
        else:
            rel_root = root[len(below) :]
        if rel_root and skip:
            dirs[:] = [d for d in dirs if f"{rel_root}/{d}" not in skip]
        for name in files:
            yield f"{rel_root}/{name}" if rel_root else name


def prune(
    job: MirrorJob,
    s: Summary,
    state: State,
    run_id: int,
    dest: Path,
    *,
    blocked: str | None,
    seen_dirs: set[str],
    derived: Path | None,
    new_dirs: Set[str] = frozenset(),
    unchanged: Set[str] = frozenset(),
    found: Sequence[str] | None = None,
    uncrawled: Set[str] = frozenset(),
) -> None:
    """Vanished files: counted always, removed with ``--delete`` unless ``blocked`` says why
    not (the crawl was not clean, the new repository metadata was held back: see
    ``pipeline._delete_blocked``).

    A local file is vanished when this run's crawl did not see it upstream: its
    ``last_seen`` in the state is another run's, and it is not in ``unchanged`` (the
    files of directories the crawl found as the last run left them, whose rows are
    not written again: 5,000 rows' ``last_seen`` cost 13-18 ms of a re-sync's CPU).
    Files outside the include/exclude selection are never candidates. ``new_dirs``:
    directories this run created (with all below them); whatever is in them this run
    fetched, and they are not looked through (a first run's end does not read back
    every file). ``found``: DEST's files as :func:`local_files` listed them earlier in
    the run (a re-sync does it while its first listings are on their way), instead of
    listing them now; whatever appeared since, this run fetched. A candidate found
    there must still be a file. ``uncrawled``: directories past ``--depth``, whose files
    are out of the run's selection as excluded ones are: never candidates.
    """
    if blocked is not None:
        if job.delete:
            s.notices.append(f"--delete skipped: {blocked}")
        return

    def selected(rel: str, is_dir: bool) -> bool:  # (else never a candidate, nor its dir)
        return wanted(rel, is_dir, job.include, job.exclude) and not (
            uncrawled and (rel in uncrawled or below_any(rel, uncrawled))
        )

    candidates = not_seen(
        local_files(dest, new_dirs) if found is None else found,
        state,
        run_id,
        # (a file where upstream has a directory now is not gone: the directory takes its
        # place, or, someone's file, it stays in the way; a dry run still finds it here)
        skip=lambda rel: rel in unchanged or rel in seen_dirs or not selected(rel, False),
        seen=state.seen_in(run_id),
    )
    if found is not None:
        # listed earlier: still a file of nobody's now (not one of this run's directories,
        # as a file upstream that became one is: see disk.Disk.add_dir)
        candidates = [rel for rel in candidates if _not_a_dir(dest / rel)]
    if not job.delete:
        s.vanished = len(candidates)
        if candidates:
            s.notices.append(
                f"{len(candidates)} local files are no longer upstream (kept; use --delete)"
            )
        return
    total = max(state.count(), len(candidates))
    limit = int(job.max_delete) if job.max_delete >= 1 else int(job.max_delete * total)
    if len(candidates) > limit and not job.force:
        s.notices.append(
            f"refusing to delete {len(candidates)} files: more than --max-delete ({limit}); use --force"
        )
        s.failed.append(("--delete", f"{len(candidates)} deletions over the limit of {limit}"))
        return
    gone: set[str] = set()
    if not job.dry_run:
        # The rows first: a run killed after the files went, before their rows, left rows
        # that no later run would look at (candidates come from DEST's files), for files
        # in neither place. Killed the other way round, a file left without its row is
        # still not upstream, and the next --delete takes it.
        state.forget(candidates)
    for rel in sorted(candidates):  # (else DEST's directory order: reports that differ)
        s.deleted.append(rel)
        if job.dry_run:
            gone.add(rel)
            continue
        if derived is not None:
            from fetcher.postprocess import remove_derived

            try:
                remove_derived(derived, rel)
            except UnsafePath:
                pass  # a name fetch never fetched (a file of the user's): no outputs
            except OSError as exc:
                s.failed.append((rel, f"cannot delete its outputs: {exc.strerror or exc}"))
                continue  # the file stays, and its outputs with it, until a next run
        try:
            (dest / rel).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            s.failed.append((rel, f"cannot delete: {exc.strerror or exc}"))
            continue
        gone.add(rel)

    for rel in _empty_dirs(dest, seen_dirs, gone, lambda d: not selected(d, True)):
        if not job.dry_run:
            try:
                (dest / rel).rmdir()
            except OSError:
                continue  # something appeared in it (or under it) since
        s.deleted_dirs.append(rel + "/")


def drop_partials(dest: Path, failed: Iterable[str]) -> None:
    """Remove the partial files (and sidecars) in DEST's partial directory but those of
    ``failed``, which the next run resumes. For the end of a run whose
    crawl was complete and clean: every other file it listed was planned, and a planned
    file's partial file is resumed and renamed into place, so what is left belongs to
    files gone upstream (or out of the selection) since a run that was killed while
    fetching them, and no run would ever take it up again.
    """
    keep = {partial_name(RelPath(p)).partition(".")[0] for p in failed}
    try:
        entries = list(os.scandir(partial_dir(dest)))
    except OSError:
        return
    for e in entries:
        if e.name.partition(".")[0] not in keep and e.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)


def _not_a_dir(path: Path) -> bool:
    """Something is there, and not a directory (as :func:`local_files` lists)."""
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _not_seen(state: State, run_id: int, paths: list[str]) -> list[str]:
    # one query per 500 local files, not one per file
    seen = state.seen_among(run_id, paths) if paths else set()
    return [p for p in paths if p not in seen]


def _empty_dirs(
    dest: Path, seen_dirs: Set[str], gone: Set[str], kept: Callable[[str], bool]
) -> list[str]:
    """DEST's directories that are not upstream and hold nothing but ``gone`` files (and
    such directories), deepest first; not the state directory, nor those ``kept`` says.

    As ``rsync --delete`` does, this takes empty directories fetch did not make too. A link
    to a directory is not walked into, so the directory holding it stays.
    """
    empty: set[str] = set()
    out: list[str] = []
    for root, dirs, files in os.walk(dest, topdown=False):
        rel = os.path.relpath(root, dest)
        if rel == "." or rel.partition(os.sep)[0] == STATE_DIR:
            continue
        rel = rel.replace(os.sep, "/")
        if rel in seen_dirs or kept(rel):
            continue
        if all(f"{rel}/{n}" in gone for n in files) and all(f"{rel}/{d}" in empty for d in dirs):
            empty.add(rel)
            out.append(rel)
    return out


def not_seen(
    files: Iterable[str],
    state: State,
    run_id: int,
    *,
    skip: Callable[[str], bool],
    seen: Set[str] | None = None,
) -> list[str]:
    """Those of ``files`` (but the ``skip``ped) that run ``run_id`` did not see upstream:
    not in ``seen`` (:meth:`State.seen_in`, when the state is small), else not marked in
    the state, asked 500 at a time."""
    candidates: list[str] = []
    batch: list[str] = []
    for rel in files:
        if skip(rel):
            continue
        if seen is not None:
            if rel not in seen:
                candidates.append(rel)
            continue
        batch.append(rel)
        if len(batch) >= 500:
            candidates += _not_seen(state, run_id, batch)
            batch = []
    return candidates + _not_seen(state, run_id, batch)


def below_any(rel: str, dirs: Set[str]) -> bool:
    """``rel`` is below one of ``dirs`` (relative paths)."""
    d = rel
    while "/" in d:
        d = d.rpartition("/")[0]
        if d in dirs:
            return True
    return False
