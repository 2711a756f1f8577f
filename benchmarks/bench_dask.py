"""The Dask executor's overhead: local processes against a Dask LocalCluster, same cap.

::

    python benchmarks/bench_dask.py [--files 2000] [--delay 0.025] [--max-connections 8]
                                    [--rounds 3] [--workers 2]

Builds a small-files tree (``--files`` files of 1–16 KiB in 20 directories),
serves it from the fault server on 127.0.0.1 with ``--delay`` seconds of
injected latency on every file request (listings are not delayed), and runs the
real CLI in-process (``fetcher.cli.main``) into a fresh DEST each time:

* local: ``fetch --mirror URL --dest D --max-connections N``;
* dask:  the same plus ``--executor dask --scheduler tcp://127.0.0.1:PORT``, against a
  ``distributed.LocalCluster`` of ``--workers`` worker processes started once.

The two alternate for ``--rounds`` rounds; medians and the ratio dask/local are
printed.  With latency dominating, both are bound by N connections × delay, so
the ratio is the engine's cost per shard (task round trips, pickling outcomes,
per-task client start-up, and per-shard rather than streaming dispatch).
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fetcher.cli import main  # noqa: E402
from tests.faultserver import Fault, FaultServer  # noqa: E402
from tests.trees import make_simple_tree, tree_manifest  # noqa: E402

DIRS = 20


def run(argv: list[str]) -> float:
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    t0 = time.perf_counter()
    code = main(argv, console)
    took = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"fetch exited {code}:\n{console.file.getvalue()[-3000:]}")  # type: ignore[attr-defined]
    return took


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--delay", type=float, default=0.025)
    ap.add_argument("--max-connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import distributed

    work = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    try:
        src = make_simple_tree(
            work / "www" / "s", files=args.files, dirs=DIRS, min_size=1024, max_size=16 * 1024
        )
        with (
            FaultServer(root=work / "www") as srv,
            distributed.LocalCluster(
                n_workers=args.workers,
                threads_per_worker=2,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",  # (None is the default, :8787: shared)
            ) as cluster,
        ):
            for d in range(DIRS):
                srv.persist(f"/s/d{d:03d}/f*", Fault.delay(args.delay))
            base = [
                "--mirror",
                srv.url + "s/",
                "-q",
                "--max-connections",
                str(args.max_connections),
            ]
            ways = {
                "local": base,
                "dask": [*base, "--executor", "dask", "--scheduler", cluster.scheduler_address],
            }
            times: dict[str, list[float]] = {k: [] for k in ways}
            for r in range(args.rounds):
                for name, argv in ways.items():
                    dest = work / f"{name}-{r}"
                    took = run([*argv, "--dest", str(dest)])
                    if tree_manifest(dest) != src:
                        raise SystemExit(f"{name} round {r}: tree differs from the source")
                    times[name].append(took)
                    shutil.rmtree(dest)
                    print(f"round {r + 1} {name:5s} {took:6.2f} s", flush=True)
        print()
        for argv in ways.values():
            shown = [a.replace(srv.url, "http://127.0.0.1:PORT/") for a in argv]
            print("command:", shlex.join(["fetch", *shown, "--dest", "DEST"]))
        med = {k: statistics.median(v) for k, v in times.items()}
        floor = args.files * args.delay / args.max_connections
        print(
            f"\n{args.files} files of 1-16 KiB, {args.delay * 1000:.0f} ms per file, "
            f"--max-connections {args.max_connections}, {args.workers} Dask workers; "
            f"latency floor {floor:.2f} s"
        )
        for k, m in med.items():
            print(f"  {k:5s} median {m:6.2f} s  ({args.files / m:6.0f} files/s)  runs {times[k]}")
        print(f"  ratio dask/local = {med['dask'] / med['local']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_bench()
