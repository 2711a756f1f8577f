"""Thumbnails made while the mirror downloads, against thumbnails made after it.

::

    python benchmarks/bench_post_overlap.py [--clips 12] [--seconds 4] [--rounds 3]
                                            [--rate RATE] [--max-connections N]

Makes ``--clips`` H.264/AAC clips (640x360, one key frame a second; copies of
one, so every file is the same work) with ffmpeg, serves them from nginx on
127.0.0.1 (the fault server when nginx is missing) and runs the real CLI
(``python -m fetcher``) in two ways:

* overlapped: ``fetch --mirror URL --dest D --post thumbnails --limit-rate R``;
* sequential: ``fetch --mirror URL --dest D --limit-rate R``, then
  ``fetch --mirror URL --dest D --post thumbnails`` on the unchanged mirror,
  which downloads nothing and only post-processes.

A local server delivers the clips faster than ffmpeg can read them, so a
bandwidth cap stands in for the network.  ``R`` comes from a calibration:
the post-processing time ``P`` of a run that only post-processes (less the
time of a run that does nothing), so the capped download takes about ``P``
too -- the case where overlapping matters most (ideal ratio 0.5).  The two
ways alternate for ``--rounds`` rounds; the medians and their ratio are
printed (target: overlapped <= 0.75 x sequential), and also the ratio with
one do-nothing run's time (start-up, crawl, state) taken off each run, so the
fixed cost of the sequential way's second process does not flatter the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.media import ffmpeg_exe  # noqa: E402
from tests.servers import ServerUnavailable, serve  # noqa: E402

RUN_TIMEOUT = 300.0


def make_clips(root: Path, n: int, seconds: float) -> int:
    """``n`` clips below ``root`` (a few per directory); their total size."""
    exe = ffmpeg_exe()
    assert exe is not None
    first = root / "clips-0" / "clip-00.mp4"
    first.parent.mkdir(parents=True)
    # testsrc2 moves more than testsrc: about 2 Mbit/s, a plausible size
    src = f"testsrc2=size=640x360:rate=25:duration={seconds}"
    argv = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", src,
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "64k", "-f", "mp4", f"file:{first}"]  # fmt: skip
    subprocess.run(argv, stdin=subprocess.DEVNULL, check=True, timeout=120)
    total = 0
    for i in range(n):
        path = root / f"clips-{i // 4}" / f"clip-{i:02d}.mp4"
        if path != first:
            path.parent.mkdir(exist_ok=True)
            shutil.copyfile(first, path)  # the same work for ffmpeg, all distinct files
        total += path.stat().st_size
    return total


@contextlib.contextmanager
def server(root: Path, workdir: Path) -> Iterator[tuple[str, str]]:
    try:
        with serve("nginx", root, workdir) as srv:
            yield srv.url, "nginx"
            return
    except ServerUnavailable:
        pass
    from tests.faultserver import FaultServer

    with FaultServer(root=root) as fs:
        yield fs.url, "fault server (nginx not found)"


def fetch(url: str, dest: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    """Run the CLI; its wall time and the job's JSON report."""
    rep = dest.parent / f"{dest.name}.report.json"
    argv = [sys.executable, "-m", "fetcher", "--mirror", url, "--dest", str(dest), "--quiet",
            "--report", str(rep), *extra]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}")
    job: dict[str, Any] = json.loads(rep.read_text())["jobs"][0]
    return wall, job


def check(job: dict[str, Any], fetched: int, made: int) -> None:
    files, done = job["fetched"]["files"], job["post"].get("thumbnails done", 0)
    if (files, done) != (fetched, made):
        raise SystemExit(f"unexpected run: fetched {files}, thumbnails done {done}; "
                         f"wanted {fetched} and {made}: {job['post']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=12, help="number of clips (default 12)")
    ap.add_argument("--seconds", type=float, default=4, help="length of each clip (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each way (default 3)")
    ap.add_argument("--rate", help="--limit-rate for the downloads (default: calibrated)")
    ap.add_argument("--max-connections", type=int, help="passed to fetch (default: fetch's own, 8)")
    args = ap.parse_args(argv)
    if ffmpeg_exe() is None:
        print("ffmpeg not found (apt-get install ffmpeg)", file=sys.stderr)
        return 2
    n = args.clips
    conn = ("--max-connections", str(args.max_connections)) if args.max_connections else ()
    with tempfile.TemporaryDirectory(prefix="bench-post-") as tmp_name:
        tmp = Path(tmp_name)
        total = make_clips(tmp / "srv", n, args.seconds)
        with server(tmp / "srv", tmp / "server") as (url, kind):
            print(f"{n} clips of {args.seconds:g} s, 640x360, {total / 2**20:.1f} MiB, from {kind}")
            print(f"{os.cpu_count()} CPUs; ffmpeg pool: default (CPU count)")

            # calibration: post-processing alone, and a run with nothing to do
            cal = tmp / "cal" / "dest"
            check(fetch(url, cal)[1], n, 0)
            t_post, job = fetch(url, cal, "--post", "thumbnails")
            check(job, 0, n)
            t_noop, job = fetch(url, cal)
            check(job, 0, 0)
            post_work = max(t_post - t_noop, 0.05)
            rate = args.rate or f"{max(total / post_work / 1024, 64):.0f}k"
            print(f"calibration: post-only run {t_post:.2f} s, no-op run {t_noop:.2f} s "
                  f"-> ffmpeg work ~{post_work:.2f} s -> --limit-rate {rate}")  # fmt: skip

            overlapped: list[float] = []
            sequential: list[float] = []
            for r in range(args.rounds):
                # alternate which way goes first, so drift hurts both alike
                for way in ("overlapped", "sequential")[:: 1 if r % 2 == 0 else -1]:
                    dest = tmp / f"{way}-{r}" / "dest"
                    if way == "overlapped":
                        wall, job = fetch(
                            url, dest, *conn, "--limit-rate", rate, "--post", "thumbnails"
                        )
                        check(job, n, n)
                        overlapped.append(wall)
                        print(f"  round {r + 1} overlapped  {wall:6.2f} s")
                    else:
                        t_dl, job = fetch(url, dest, *conn, "--limit-rate", rate)
                        check(job, n, 0)
                        t_pp, job = fetch(url, dest, *conn, "--post", "thumbnails")
                        check(job, 0, n)
                        sequential.append(t_dl + t_pp)
                        print(f"  round {r + 1} sequential  {t_dl + t_pp:6.2f} s "
                              f"(download {t_dl:.2f} + post {t_pp:.2f})")  # fmt: skip

    o, s = statistics.median(overlapped), statistics.median(sequential)
    print(f"median overlapped {o:.2f} s, sequential {s:.2f} s: ratio {o / s:.2f} (target <= 0.75)")
    # Take one do-nothing run's time off each run: what is left is download + ffmpeg work.
    ow, sw = o - t_noop, s - 2 * t_noop
    if ow > 0 and sw > 0:
        print(f"without start-up/crawl ({t_noop:.2f} s a run): ratio {ow / sw:.2f}")
    print("command: python benchmarks/bench_post_overlap.py " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
