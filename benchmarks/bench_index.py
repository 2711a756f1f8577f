"""A yum repository mirrored from its HTML listings against from its repodata.

::

    python benchmarks/bench_index.py [--packages 500] [--dirs 10] [--delay 0.05] [--rounds 3]

Generates a yum repository on disk (``--packages`` files of 4-16 KiB in
``--dirs`` directories below ``Packages/``, with a hand-written
``repodata/repomd.xml`` and gzip ``primary.xml`` carrying sizes and SHA-256
digests: the layout ``createrepo_c`` writes), serves it from the project's
fault server on 127.0.0.1 with ``--delay`` seconds of latency injected on
every request, and runs the real CLI (``python -m fetcher --config``) into a
fresh DEST with ``index = "html"`` and ``index = "auto"``, alternating, for
``--rounds`` rounds (``--listing-rate`` sets one listing rate for both).
Prints requests (total, and directory listings) and wall time per run, the
medians and the auto/html ratios.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faultserver import Fault, FaultServer


def make_repo(root: Path, packages: int, dirs: int) -> int:
    """Write the repository; returns its file count (packages + metadata)."""
    rng = random.Random(42)
    entries = []
    for i in range(packages):
        href = f"Packages/d{i % dirs:02d}/pkg{i:04d}-1.0-1.noarch.rpm"
        body = rng.randbytes(rng.randint(4096, 16384))
        (root / href).parent.mkdir(parents=True, exist_ok=True)
        (root / href).write_bytes(body)
        entries.append(
            f'<package type="rpm"><name>pkg{i:04d}</name><arch>noarch</arch>'
            f'<checksum type="sha256" pkgid="YES">{hashlib.sha256(body).hexdigest()}</checksum>'
            f'<time file="1700000000" build="1700000000"/><size package="{len(body)}"/>'
            f'<location href="{href}"/></package>'
        )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<metadata xmlns="http://linux.duke.edu/metadata/common" '
        f'xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="{packages}">\n'
        + "\n".join(entries)
        + "\n</metadata>\n"
    ).encode()
    primary = gzip.compress(xml, mtime=0)
    digest = hashlib.sha256(primary).hexdigest()
    href = f"repodata/{digest}-primary.xml.gz"
    (root / "repodata").mkdir()
    (root / href).write_bytes(primary)
    (root / "repodata" / "repomd.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<repomd xmlns="http://linux.duke.edu/metadata/repo"><revision>1700000000</revision>\n'
        f'<data type="primary"><checksum type="sha256">{digest}</checksum>'
        f'<open-checksum type="sha256">{hashlib.sha256(xml).hexdigest()}</open-checksum>'
        f'<location href="{href}"/><timestamp>1700000000</timestamp>'
        f"<size>{len(primary)}</size><open-size>{len(xml)}</open-size></data>\n</repomd>\n"
    )
    return packages + 2


def run_once(
    srv: FaultServer, work: Path, index: str, n: int, extra: str
) -> tuple[float, int, int]:
    dest = work / f"dest-{index}-{n}"
    cfg = work / f"bench-{index}-{n}.toml"
    cfg.write_text(f'[jobs.bench]\nurl = "{srv.url}"\ndest = "{dest}"\nindex = "{index}"\n{extra}')
    srv.reset_stats()
    argv = [sys.executable, "-m", "fetcher", "--config", str(cfg), "--job", "bench", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{index} run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    reqs = srv.requests
    shutil.rmtree(dest)
    return wall, len(reqs), sum(1 for r in reqs if r.path.endswith("/"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packages", type=int, default=500)
    ap.add_argument("--dirs", type=int, default=10)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--listing-rate", type=float, help="listing_rate for both runs (USTC allows 0.5/s)"
    )
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        repo.mkdir()
        files = make_repo(repo, args.packages, args.dirs)
        print(
            f"repository: {files} files ({args.packages} packages in {args.dirs} dirs);"
            f" {args.delay * 1000:.0f} ms injected on every request"
        )
        extra = f"listing_rate = {args.listing_rate}\n" if args.listing_rate else ""
        results: dict[str, list[tuple[float, int, int]]] = {"html": [], "auto": []}
        with FaultServer(root=repo) as srv:
            srv.persist("/*", Fault.delay(args.delay))
            for n in range(args.rounds):
                for index in ("html", "auto") if n % 2 == 0 else ("auto", "html"):
                    r = run_once(srv, work, index, n, extra)
                    results[index].append(r)
                    print(
                        f"round {n + 1} {index:>4}: {r[0]:6.2f} s  {r[1]:4d} requests"
                        f" ({r[2]} listings)"
                    )
        med = {
            k: (
                statistics.median(w for w, _, _ in v),
                statistics.median(q for _, q, _ in v),
                statistics.median(li for _, _, li in v),
            )
            for k, v in results.items()
        }
        for k, (w, q, li) in med.items():
            print(f"median {k:>4}: {w:6.2f} s  {q:5.0f} requests ({li:.0f} listings)")
        h, a = med["html"], med["auto"]
        print(f"auto/html: time {a[0] / h[0]:.2f}, requests {a[1] / h[1]:.2f}")


if __name__ == "__main__":
    main()
