"""Two (or more) versions of fetch, or settings of it, on the same served tree, interleaved.

The harness behind the per-change figures in ``RESULTS.md``. Each variant is a
checkout of this repository (its ``fetcher`` package is what ``python -m fetcher``
imports when run from there) with optional extra arguments; the variants run in
turn, run by run, so a noisy machine slows them alike, and the medians are
compared. A checkout of an earlier commit is one command away::

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab.py --tree small --runs 8 /tmp/before .
    python benchmarks/ab.py --tree small --runs 6 . ". --procs 2" ". --pipeline 8"
    python benchmarks/ab.py --url http://127.0.0.1:8080/ --dest /dev/shm/ab . /tmp/before
    python benchmarks/ab.py --tree small --resync /tmp/before .

``--resync`` times the second, unchanged run (the first one, untimed, fills DEST).

``--tree`` serves one of the suite's trees with nginx for the duration; the
destination defaults to ``/dev/shm`` (a disk's own noise is larger than most
single changes), ``--dest`` puts it elsewhere. CPU is user+sys of the whole
process tree, as in ``run.py``; each result is checked against the manifest.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import WORK, become_subreaper, measure, verify
from benchmarks.trees import Tree, build_tree
from tests.servers import serve


def _variant(spec: str) -> tuple[Path, list[str]]:
    """``DIR [ARGS...]``: a checkout and the extra fetch arguments to run it with."""
    words = shlex.split(spec)
    checkout = Path(words[0]).resolve()
    if not (checkout / "fetcher" / "__init__.py").is_file():
        raise SystemExit(f"{checkout}: not a checkout of fetch (no fetcher/ package)")
    return checkout, words[1:]


def interleaved(
    commands: dict[str, tuple[list[str], Path]],
    runs: int,
    dest: Path,
    tree: Tree | None,
    untimed_first: bool = False,
) -> list[tuple[str, list[float], list[float]]]:
    """Each command (argv, cwd) ``runs`` times, in turn run by run, ``dest`` removed and the
    disks synced before each; every result checked against ``tree`` when given. With
    ``untimed_first`` each timed run follows an untimed one (a re-sync's first run).
    Returns each command's wall and CPU seconds, in order."""
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    width = max(len(name) for name in commands)
    for r in range(runs):
        for name, (argv, cwd) in commands.items():
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()
            if untimed_first and measure(argv, cwd=cwd)[4] != 0:
                raise SystemExit(f"{name}: run {r}: the untimed first run failed")
            wall, cpu, _, _, code = measure(argv, cwd=cwd)
            if code != 0:
                raise SystemExit(f"{name}: run {r} exited {code}")
            if tree is not None:
                ok, problem = verify(tree, dest)
                if not ok:
                    raise SystemExit(f"{name}: run {r}: {problem}")
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"  run {r}  {name:{width}}  {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    return [(name, walls[name], cpus[name]) for name in commands]


def run(
    url: str,
    dest: Path,
    variants: list[str],
    runs: int,
    connections: int,
    tree: Tree | None,
    resync: bool = False,
) -> list[tuple[str, list[float], list[float]]]:
    commands: dict[str, tuple[list[str], Path]] = {}
    for spec in variants:
        checkout, extra = _variant(spec)
        compileall.compile_dir(checkout / "fetcher", quiet=1)  # as pip install would
        argv = [sys.executable, "-m", "fetcher", "--mirror", url, "--dest", str(dest)]
        argv += ["--max-connections", str(connections), "-q", *extra]
        name, n = spec, 1
        while name in commands:  # the same variant twice (an A/A run) keeps both
            n += 1
            name = f"{spec} ({n})"
        commands[name] = (argv, checkout)
    return interleaved(commands, runs, dest, tree, untimed_first=resync)


def report(rows: list[tuple[str, list[float], list[float]]]) -> None:
    base_wall = statistics.median(rows[0][1])
    base_cpu = statistics.median(rows[0][2])
    print(f"\n{'variant':40} {'wall s':>7} {'÷ first':>8} {'CPU s':>7} {'÷ first':>8}  walls")
    for name, walls, cpus in rows:
        w, c = statistics.median(walls), statistics.median(cpus)
        spread = " ".join(f"{x:.2f}" for x in sorted(walls))
        print(f"{name:40} {w:7.2f} {w / base_wall:7.2f}× {c:7.2f} {c / base_cpu:7.2f}×  {spread}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "variants", nargs="+", help='checkout directories, each optionally with args: ". --procs 2"'
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--tree", choices=("small", "large", "mixed"), help="serve this tree with nginx"
    )
    src.add_argument("--url", help="a tree already served (no manifest check)")
    p.add_argument("--dest", type=Path, default=Path("/dev/shm/fetch-ab"))
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--resync", action="store_true", help="time the second, unchanged run")
    args = p.parse_args(argv)
    become_subreaper()
    with contextlib.ExitStack() as stack:
        tree = None
        url = args.url
        if args.tree:
            WORK.mkdir(exist_ok=True)
            tree = build_tree(args.tree, WORK)
            srv = stack.enter_context(serve("nginx", tree.root, WORK / "servers"))
            url = srv.url
        rows = run(url, args.dest, args.variants, args.runs, args.connections, tree, args.resync)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
