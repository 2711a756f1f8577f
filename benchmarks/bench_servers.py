"""5,000 files in 50 directories served by each real server, fetch against rclone.

    python benchmarks/bench_servers.py [--procs 4] [--connections 8] [--kinds nginx,apache,...]

Each server (tests/servers.py: nginx, Apache, lighttpd, Caddy, python http.server) serves the
same tree on 127.0.0.1; each tool mirrors it once into an empty directory, and the result is
compared file by file (sha256) with the source. Prints wall time, files/s and whether the copy
is identical. Issue 2's done-criterion: byte-identical copies from every listing format.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import KINDS, serve, unavailable  # noqa: E402
from tests.trees import make_simple_tree, tree_manifest  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--kinds", default="nginx,apache,lighttpd,caddy,python")
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    try:
        src = work / "src"
        make_simple_tree(src, files=5000, dirs=50)
        expected = tree_manifest(src)
        for kind in ns.kinds.split(","):
            if kind not in KINDS or unavailable(kind):
                print(
                    f"{kind:9s} skipped: {unavailable(kind) if kind in KINDS else 'unknown kind'}"
                )
                continue
            with serve(kind, src, work / f"srv-{kind}") as srv:
                tools = {
                    "fetch": [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--procs", str(ns.procs),
                              "--max-connections", str(ns.connections), "-q", "--dest"],
                    "rclone": ["rclone", "--config", "/dev/null", "copy", "--http-url", srv.url, ":http:",
                               "--transfers", str(ns.connections), "--checkers", str(ns.connections), "-q"],
                }  # fmt: skip
                for tool, argv in tools.items():
                    if shutil.which(argv[0]) is None:
                        continue
                    dest = work / f"{kind}-{tool}"
                    t0 = time.perf_counter()
                    r = subprocess.run([*argv, str(dest)], capture_output=True, timeout=600)
                    wall = time.perf_counter() - t0
                    same = tree_manifest(dest) == expected if dest.exists() else False
                    print(f"{kind:9s} {tool:7s} {wall:6.2f} s {5000 / wall:6.0f} files/s "
                          f"exit {r.returncode} identical={same}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
