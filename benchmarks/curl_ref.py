"""A reference point for ``small``: libcurl's multi interface driven from Python.

Not a peer and not part of ``run.py``: like aria2c it is given the URL list (it does
not crawl, keeps no state and checks nothing), and it needs pycurl, which fetch does
not. It answers one question for the ``small`` gap in ``RESULTS.md``: what the
per-file cost of Python comes to when the HTTP work is done in C. Each process runs
one ``CurlMulti`` with its share of the connections; each file is written to
``NAME.part`` and renamed when complete. It runs beside fetch and wget2 on the same
nginx-served tree, interleaved run by run, each result checked against the manifest::

    python -m pip install pycurl
    python benchmarks/curl_ref.py --runs 5 --dest-root /dev/shm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

WORK = Path(__file__).resolve().parent / "work"
CONNECTIONS = 16
LAYOUTS = ((1, 16), (2, 8), (4, 4))
"""(processes, handles each) for the libcurl runs: always CONNECTIONS in all."""


def _get_shard(base: str, paths: list[str], dest: Path, handles: int) -> None:
    """One process: ``paths`` below ``base`` into ``dest``, ``handles`` transfers at a time."""
    import pycurl

    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, handles)
    free = []
    for _ in range(handles):
        c = pycurl.Curl()
        c.setopt(pycurl.BUFFERSIZE, 256 * 1024)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.CONNECTTIMEOUT, 10)
        c.setopt(pycurl.TIMEOUT, 60)
        free.append(c)
    todo = list(reversed(paths))
    made: set[str] = set()
    busy: dict[Any, tuple[str, Any]] = {}
    while todo or busy:
        while todo and free:
            c, rel = free.pop(), todo.pop()
            parent = os.path.join(dest, os.path.dirname(rel))
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            out = open(os.path.join(dest, rel + ".part"), "wb")  # noqa: SIM115 - closed when done
            c.setopt(pycurl.URL, base + quote(rel))
            c.setopt(pycurl.WRITEDATA, out)
            busy[c] = (rel, out)
            multi.add_handle(c)
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = multi.info_read()
            for c, _errno, message in failed:
                raise SystemExit(f"{busy[c][0]}: {message}")
            for c in ok:
                rel, out = busy.pop(c)
                out.close()
                if c.getinfo(pycurl.RESPONSE_CODE) != 200:
                    raise SystemExit(f"{rel}: HTTP {c.getinfo(pycurl.RESPONSE_CODE)}")
                os.replace(os.path.join(dest, rel + ".part"), os.path.join(dest, rel))
                multi.remove_handle(c)
                free.append(c)
            if not queued:
                break
        if busy:
            multi.select(1.0)


def get_all(base: str, dest: Path, procs: int, handles: int) -> int:
    """Every file of the ``small`` tree, split over ``procs`` forked processes."""
    import multiprocessing

    # the manifest the parent just checked: nothing of the suite is imported here, so this
    # process starts as a bare interpreter (with the suite's imports, 0.16 s more)
    paths = sorted(json.loads((WORK / "trees" / "small.manifest.json").read_text()))
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=_get_shard, args=(base, paths[i::procs], dest, handles))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)  # each transfer times out after 60 s
        if w.is_alive():
            w.kill()
            w.join()
    return max((w.exitcode if w.exitcode is not None else 1) for w in workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="rounds of every variant (interleaved)")
    p.add_argument("--dest-root", type=Path, help="write the destinations under DIR")
    p.add_argument(
        "--get", nargs=4, metavar=("URL", "DEST", "PROCS", "HANDLES"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.get:
        url, dest, procs, handles = args.get
        return get_all(url, Path(dest), int(procs), int(handles))
    try:
        import pycurl  # noqa: F401
    except ImportError:
        raise SystemExit("this reference needs pycurl: python -m pip install pycurl") from None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.ab import interleaved, report
    from benchmarks.run import become_subreaper, compile_fetch, tool_argv
    from benchmarks.trees import build_tree
    from tests.servers import serve

    compile_fetch()
    become_subreaper()
    tree = build_tree("small", WORK)
    root = (args.dest_root or WORK / "dest").resolve() / "curl-ref"
    with serve("nginx", tree.root, WORK / "servers") as srv:
        here = Path.cwd()
        fetch = tool_argv("fetch", srv.url, root / "d", CONNECTIONS, Path("/dev/null"))
        variants: dict[str, tuple[list[str], Path]] = {"fetch": (fetch, here)}
        if shutil.which("wget2"):
            wget2 = tool_argv("wget2", srv.url, root / "d", CONNECTIONS, Path())
            variants["wget2"] = (wget2, here)
        for procs, handles in LAYOUTS:
            get = [sys.executable, __file__, "--get", srv.url, str(root / "d"), str(procs)]
            variants[f"libcurl multi {procs}×{handles}"] = ([*get, str(handles)], here)
        rows = interleaved(variants, args.runs, root / "d", tree)
    shutil.rmtree(root, ignore_errors=True)
    report(rows)  # medians, ÷ fetch's
    return 0


if __name__ == "__main__":
    sys.exit(main())
