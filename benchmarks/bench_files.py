"""How much does the way a file is finalised cost?  (No network: disk and kernel only.)

16 threads write 5,000 files of 32 KiB into 50 directories, three ways:

- ``one-partial-dir``: create in one shared ``partial/`` directory, then
  ``os.replace`` across directories into place (what fetch does today);
- ``same-dir-temp``: create a hidden temporary name in the target directory,
  then rename within that directory;
- ``tmpfile-link``: an unnamed file in the target directory (``O_TMPFILE``, Linux)
  linked to its final name when complete: nothing is left behind by a crash and
  no rename crosses directories (the filesystem-wide rename lock);
- ``direct``: write the final name in place (what wget2 does; unsafe, the floor).

::

    python benchmarks/bench_files.py [--threads 16] [--files 5000] [--runs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODES = ("one-partial-dir", "same-dir-temp", "tmpfile-link", "direct")
BASE = Path(__file__).resolve().parent / "work" / "bench-files"


def run(mode: str, threads: int, files: int, data: bytes) -> tuple[float, float]:
    shutil.rmtree(BASE, ignore_errors=True)
    (BASE / "partial").mkdir(parents=True)
    for d in range(50):
        (BASE / f"d{d}").mkdir()
    os.sync()
    base = str(BASE)

    def one(i: int) -> None:
        final = f"{base}/d{i % 50}/f{i}.bin"
        if mode == "direct":
            with open(final, "wb") as f:
                f.write(data)
            return
        if mode == "tmpfile-link":
            fd = os.open(f"{base}/d{i % 50}", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
            try:
                os.write(fd, data)
                # a src_dir_fd makes os.link call linkat(AT_SYMLINK_FOLLOW), which links
                # the file behind /proc's fd entry (plain link(2) would refuse: EXDEV)
                os.link(f"/proc/self/fd/{fd}", final, src_dir_fd=fd, follow_symlinks=True)
            finally:
                os.close(fd)
            return
        if mode == "one-partial-dir":
            tmp = f"{base}/partial/" + hashlib.sha1(final.encode()).hexdigest()
        else:
            tmp = f"{base}/d{i % 50}/.f{i}.bin.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)

    t0, c0 = time.perf_counter(), os.times()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(files)))
    c1 = os.times()
    return time.perf_counter() - t0, (c1.user - c0.user) + (c1.system - c0.system)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    data = os.urandom(32768)
    try:
        for _ in range(args.runs):
            for mode in MODES:
                if mode == "tmpfile-link" and not hasattr(os, "O_TMPFILE"):
                    continue
                wall, cpu = run(mode, args.threads, args.files, data)
                print(f"{mode:16} wall {wall:5.2f} s  cpu {cpu:5.2f} s", flush=True)
    finally:
        shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    main()
