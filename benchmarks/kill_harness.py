"""Kill real runs at varied moments and check DEST after each (randomized; not in the suite).

    PYTHONPATH=. python benchmarks/kill_harness.py --iterations 60 --seed 1
    PYTHONPATH=. python benchmarks/kill_harness.py --segments 3 --rate 3145728

A fault server on 127.0.0.1 serves a tree of small files in nested directories, three
big ones (trickled at ``--rate``, so a kill lands mid-body) and repository metadata
(``dists/stable/Release`` + ``Packages.gz``, ``repodata/repomd.xml`` + its primary),
changed upstream now and then with a big file and a small one, and a file removed. Each
iteration starts ``python -m fetcher`` in its own process group, with ``--delete`` or
``--procs`` at random, and stops it after a delay (5 ms to 2.5 s), after N requests,
or just after its metadata is asked for (the end of a run): SIGKILL of the group,
SIGKILL of the coordinator alone (``coord-now``: the next run starts at once, beside
its orphaned workers), SIGTERM of the coordinator or the group. Then:

- every file under its final name is a version the server has served, whole;
- a ``Release`` / ``repomd.xml`` names no index that DEST holds with other bytes;
- no process of the killed run's group is alive 10 s later;
- a dry run now and then exits 0;
- now and then a complete run (``--delete --force``) exits 0, leaves DEST equal to the
  served tree and nothing in ``.fetcher/partial`` or ``.fetcher/staged``, and asks to
  resume (``Range`` + ``If-Range``) every partial file that had a sidecar.

Exit status 1 when anything was found; each finding is printed as it happens.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.faultserver import Fault, FaultServer
from tests.test_churn import _release, _repomd  # (the repository shapes the tests serve)
from tests.trees import tree_manifest

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
OLD = 1_700_000_000.0


def set_metadata(www: Path, gen: int, when: float) -> None:
    (www / "repodata").mkdir(parents=True, exist_ok=True)
    suite = www / "dists" / "stable"
    (suite / "main" / "binary-amd64").mkdir(parents=True, exist_ok=True)
    for old in (www / "repodata").glob("*-primary.xml.gz"):
        old.unlink()
    primary = gzip.compress(b"primary gen %d\n" % gen * (50 + gen), mtime=0)
    href, xml = _repomd(primary)
    (www / href).write_bytes(primary)
    (www / "repodata" / "repomd.xml").write_bytes(xml)
    packages = gzip.compress(b"Package: p%d\n" % gen * (40 + gen), mtime=0)
    (suite / "main" / "binary-amd64" / "Packages.gz").write_bytes(packages)
    (suite / "Release").write_bytes(_release(packages))
    for p in [www / href, www / "repodata" / "repomd.xml", suite / "Release",
              suite / "main" / "binary-amd64" / "Packages.gz"]:  # fmt: skip
        os.utime(p, (when, when))


def build(www: Path, rng: random.Random) -> None:
    for d in range(6):
        for k in range(12):
            p = www / f"d{d}" / f"s{k % 3}" / f"f{d}_{k}.bin"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(rng.randint(0, 40_000)))
    (www / "big").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (www / "big" / f"b{i}.iso").write_bytes(rng.randbytes((3 + i) * MIB + 12345))
    (www / "empty").mkdir(exist_ok=True)
    for p in www.rglob("*"):
        os.utime(p, (OLD, OLD))
    set_metadata(www, 0, OLD)


def pgrp_members(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = rest[0], int(rest[2])
        if pgrp == pgid and state not in ("Z", "X"):
            out.append(int(name))
    return out


def check_dest(dest: Path, ever: dict[str, set[str]], problems: list[str], tag: str) -> None:
    have = tree_manifest(dest)
    for path, digest in have.items():
        if digest is None:
            continue
        if path not in ever:
            problems.append(f"{tag}: extra file {path}")
        elif digest not in ever[path]:
            problems.append(
                f"{tag}: {path} differs from served (size {(dest / path).stat().st_size})"
            )
    rel = dest / "dists" / "stable" / "Release"
    if rel.exists():
        for m in re.finditer(r"^ ([0-9a-f]{64}) +(\d+) (\S+)$", rel.read_text(), re.M):
            f = dest / "dists" / "stable" / m.group(3)
            if f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() != m.group(1):
                problems.append(f"{tag}: Release names {m.group(3)} with other bytes")
    md = dest / "repodata" / "repomd.xml"
    if md.exists():
        t = md.read_text()
        for m in re.finditer(
            r'<checksum type="sha256">([0-9a-f]+)</checksum><location href="([^"]+)"', t
        ):
            f = dest / m.group(2)
            if f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() != m.group(1):
                problems.append(f"{tag}: repomd names {m.group(2)} with other bytes")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1.5 * MIB)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--segments", type=int, default=0)
    ap.add_argument("--hows", default="delay,delay,requests,meta")
    ap.add_argument("--modes", default="group,group,coord,coord-now,term,term-group")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="killh-"))
    www = tmp / "www"
    build(www, rng)
    seg: list[str] = []
    if a.segments:
        (www / "big" / "seg.iso").write_bytes(rng.randbytes(18 * MIB + 777))
        os.utime(www / "big" / "seg.iso", (OLD, OLD))
        seg = ["--segments", str(a.segments), "--max-connections", "8"]
    dest = tmp / "d"
    problems: list[str] = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    gen = 0
    shown = 0
    ever: dict[str, set[str]] = {}
    stats: dict[str, int] = {}
    with FaultServer(root=www) as srv, tempfile.TemporaryFile() as errfile:
        srv.persist("/big/*", Fault.trickle(a.rate))
        for it in range(a.iterations):
            # sometimes: change metadata (and a file) upstream, so a kill can land between
            # the publication of a new index and of the Release that names it
            if rng.random() < 0.4:
                gen += 1
                set_metadata(www, gen, OLD + gen * 3600)
                f = www / "d1" / "s0" / "f1_0.bin"
                f.write_bytes(rng.randbytes(rng.randint(100, 30000)))
                os.utime(f, (OLD + gen * 3600, OLD + gen * 3600))
            if rng.random() < 0.35:
                # a big file rewritten upstream: fetched again, through a partial file
                b = rng.choice(sorted((www / "big").glob("*.iso")))
                b.write_bytes(rng.randbytes(b.stat().st_size + rng.randint(-1000, 1000)))
                gen += 1
                os.utime(b, (OLD + gen * 3600, OLD + gen * 3600))
            if rng.random() < 0.08:
                shutil.rmtree(dest, ignore_errors=True)
            if rng.random() < 0.15:
                # a file vanishes upstream (for --delete)
                victims = sorted(www.glob("d5/*/*.bin"))
                if victims:
                    victims[0].unlink()
            served = tree_manifest(www)
            for k, v in served.items():
                if v is not None:
                    ever.setdefault(k, set()).add(v)
            mode = rng.choice(a.modes.split(","))
            how = rng.choice(a.hows.split(","))
            delay = rng.choice([0.005, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 1.8, 2.5])
            nreq = rng.randint(1, 160)
            extra = []
            if rng.random() < 0.4:
                extra.append("--delete")
            if rng.random() < 0.3:
                extra += ["--procs", str(rng.randint(1, 4))]
            srv.reset_stats()
            argv = [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
                    "-q", *seg, *extra]  # fmt: skip
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=errfile, start_new_session=True)  # fmt: skip
            t0 = time.monotonic()
            if how == "delay":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(delay)
            elif how == "meta":
                # the end of the run: metadata is fetched last, then published, then state
                while time.monotonic() - t0 < 30 and proc.poll() is None:
                    if srv.count(path="/dists/stable/Release") or srv.count(
                        path="/repodata/repomd.xml"
                    ):
                        break
                    time.sleep(0.001)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(rng.uniform(0, 0.06))
            else:
                while time.monotonic() - t0 < 20 and proc.poll() is None:
                    if srv.count() >= nreq:
                        break
                    time.sleep(0.002)
            finished = proc.poll() is not None
            key = f"{mode}/{how}" + ("/finished" if finished else "")
            stats[key] = stats.get(key, 0) + 1
            pgid = proc.pid
            if not finished:
                if mode == "group":
                    os.killpg(pgid, signal.SIGKILL)
                elif mode in ("coord", "coord-now"):
                    os.kill(proc.pid, signal.SIGKILL)
                elif mode == "term":
                    os.kill(proc.pid, signal.SIGTERM)
                else:
                    os.killpg(pgid, signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                problems.append(f"it{it} {key}: run did not end 30 s after {mode}")
                os.killpg(pgid, signal.SIGKILL)
                rc = proc.wait()
            # (a file, not a pipe: a survivor holding a pipe's end would block the read)
            errfile.seek(0)
            err = errfile.read().decode(errors="replace")
            errfile.seek(0)
            errfile.truncate()
            if mode.startswith("term") and not finished and rc not in (130, 0, 1) and delay >= 0.3:
                problems.append(f"it{it} {key}: SIGTERM after {delay}s gave rc {rc}: {err[-500:]}")
            if "Traceback" in err:
                problems.append(f"it{it} {key}: traceback: {err[-1500:]}")
            deadline = time.monotonic() + (0 if mode == "coord-now" else 10)
            left = pgrp_members(pgid)
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = pgrp_members(pgid)
            if left and mode != "coord-now":
                problems.append(f"it{it} {key}: survivors {left} 10 s after the kill")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            check_dest(dest, ever, problems, f"it{it} {key} rc={rc} after kill")
            left_files = (
                sorted(os.listdir(dest / ".fetcher")) if (dest / ".fetcher").exists() else []
            )
            for name in ("state.sqlite-journal", "publishing"):
                if name in left_files:
                    stats["left-" + name] = stats.get("left-" + name, 0) + 1
            if left_files and rng.random() < 0.3:
                dr = subprocess.run(
                    [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
                     "-q", "--dry-run"], cwd=REPO, env=env, capture_output=True, timeout=60,
                )  # fmt: skip
                stats["dry-runs"] = stats.get("dry-runs", 0) + 1
                if dr.returncode != 0:
                    problems.append(
                        f"it{it}: dry run rc {dr.returncode}: {dr.stderr.decode()[-800:]}"
                    )
            if rng.random() < 0.35 or it == a.iterations - 1 or mode == "coord-now":
                # a complete run: resumes, finishes byte for byte, leaves nothing behind
                part = dest / ".fetcher" / "partial"
                partials = (
                    {p.name: p.stat().st_size for p in part.glob("*")} if part.exists() else {}
                )
                srv.reset_stats()
                r = subprocess.run(
                    [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
                     "-q", "--delete", "--force", *seg], cwd=REPO, env=env, capture_output=True,
                    timeout=120,
                )  # fmt: skip
                if r.returncode != 0:
                    problems.append(
                        f"it{it}: completing run rc {r.returncode}: {r.stderr.decode()[-1500:]}"
                    )
                got = tree_manifest(dest)
                if got != served:
                    diff = {k for k in set(got) | set(served) if got.get(k) != served.get(k)}
                    problems.append(f"it{it}: after completing run differs: {sorted(diff)[:10]}")
                for sub in ("partial", "staged"):
                    d = dest / ".fetcher" / sub
                    if d.exists() and any(d.iterdir()):
                        problems.append(f"it{it}: leftovers in {sub}: {os.listdir(d)}")
                for rel in sorted(served):
                    h = hashlib.sha256(rel.encode()).hexdigest()[:32]
                    sz = partials.get(h + ".part", 0)
                    if sz < 64 * 1024 or h + ".json" not in partials:
                        continue
                    stats["resume-candidates"] = stats.get("resume-candidates", 0) + 1
                    reqs = [q for q in srv.requests if q.path == "/" + rel]
                    if any(q.status == 206 for q in reqs):
                        stats["resumed-206"] = stats.get("resumed-206", 0) + 1
                    elif any(q.headers.get("range") and q.headers.get("if-range") for q in reqs):
                        # asked to resume; 200: the file changed upstream since the partial
                        stats["resume-asked-200"] = stats.get("resume-asked-200", 0) + 1
                    else:
                        problems.append(
                            f"it{it}: partial of {rel} ({sz} B) not resumed: "
                            f"{[(q.status, q.headers.get('range'), q.headers.get('if-range')) for q in reqs]}"
                        )
            if mode == "coord-now":
                deadline = time.monotonic() + 10
                while pgrp_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if pgrp_members(pgid):
                    problems.append(f"it{it} {key}: survivors 10 s after the kill")
                check_dest(dest, ever, problems, f"it{it} {key} after orphans ended")
            for p in problems[shown:]:
                print(p, flush=True)
            shown = problems_seen = len(problems)
            print(f"it{it} {key} delay={delay} nreq={nreq} extra={extra} rc={rc} "
                  f"problems={problems_seen}", flush=True)  # fmt: skip
    print("stats:", stats)
    print("problems:", len(problems))
    for p in problems:
        print(" ", p)
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print("kept", tmp)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
