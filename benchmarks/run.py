"""Benchmark ``fetch`` side by side with rclone, wget2, lftp and aria2c.

Every tool mirrors the same tree from the same nginx (autoindex, 127.0.0.1),
optionally behind :mod:`benchmarks.proxy` for a round-trip time, at the same
number of connections N.  Runs are interleaved tool by tool; each result is
checked against the tree's manifest (size and sha256).  Reported per tool:
wall time, files/s, MB/s, CPU seconds of the whole process tree (``wait4``
rusage via GNU time: user+sys including waited-for descendants, plus the
rusage of descendants orphaned on the way, which this process reaps as the
tree's child subreaper), peak RSS
(largest single process from rusage, and the sampled sum over the process
tree), and the requests nginx logged during the run.

::

    python benchmarks/run.py --quick                 # < 10 min on 2 cores
    python benchmarks/run.py                         # the full suite: 5 runs on loopback and of the re-sync, 3 at the RTT
    python benchmarks/run.py --scenarios small,large --runs 5 --connections 16

Scenarios: ``small``, ``large``, ``mixed`` (plain loopback), ``small-rtt``,
``mixed-rtt`` (behind the proxy at ``--rtt-ms``), ``small-tls``, ``large-tls``
(plain loopback, nginx speaking HTTPS with a certificate of the suite's own CA,
which every tool is given to check it against), ``held`` (``small`` from the
suite's fault server with one file in 50 answered after a second, as a CDN's
cache misses are), ``resync`` (an unchanged
re-sync of ``small`` at the RTT: the second run is timed), ``scale`` (a
200,000-file ``--dry-run`` against a generated listing server: peak RSS).

For profiling, ``python benchmarks/run.py --serve small`` serves a tree with
nginx (add ``--rtt-ms`` to put the proxy in front) and prints its URL::

    py-spy record --subprocesses --gil -f raw -o prof.txt -- \
        fetch --mirror URL --dest /tmp/d --max-connections 16 -q
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.trees import Tree, build_tree  # noqa: E402
from tests.servers import serve  # noqa: E402

WORK = HERE / "work"
DEST_ROOT = WORK / "dest"
"""Where the tools write (``--dest-root``): the benchmark disk unless told otherwise."""
PEERS = ("rclone", "wget2", "lftp", "aria2c")
FETCHES = ("fetch", "fetch-p1")
"""fetch as it ships, and with ``--pipeline 1``: one request per connection at a time, as
the peers send them (the like-for-like comparison)."""
VARIANT_FLAGS = {"fetch": [], "fetch-p1": ["--pipeline", "1"], "fetch-s4": ["--segments", "4"]}
"""Every fetch row there is; ``fetch-s4`` (big files in 4 ranges, opt-in as in fetch) runs
only when named with ``--tools``."""
TOOLS = (*VARIANT_FLAGS, *PEERS)
ALL_SCENARIOS = (
    "small", "large", "small-rtt", "mixed-rtt", "mixed", "small-tls", "large-tls", "held",
    "resync", "scale",
)  # fmt: skip
QUICK_SCENARIOS = ("small", "large", "small-rtt", "resync", "scale")
FULL_SCENARIOS = (
    "small", "large", "small-rtt", "mixed-rtt", "small-tls", "large-tls", "held", "resync",
    "scale",
)  # fmt: skip
HELD_EVERY = 50
"""``held``: one file in this many (every 50th by path) is answered after :data:`HELD_FOR`."""
HELD_FOR = 1.0
TOOL_TIMEOUT = 900.0


# --- measuring one process tree -------------------------------------------------


@dataclass(slots=True)
class Measure:
    tool: str
    scenario: str
    run: int
    wall: float
    cpu: float
    maxrss_mib: float
    """Largest single process's peak RSS (rusage ru_maxrss over the tree)."""
    tree_rss_mib: float
    """Peak of the sampled sum of RSS over the process tree (every 50 ms)."""
    exit_code: int
    requests: int = 0
    files: int = 0
    bytes: int = 0
    ok: bool = False
    problems: str = ""
    argv: list[str] = field(default_factory=list)
    load: float = 0.0
    """1-minute load average when the run started (other work on the machine skews results)."""

    @property
    def files_per_s(self) -> float:
        return self.files / self.wall if self.wall else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.wall if self.wall else 0.0


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


def measure(
    argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, log: Path | None = None
) -> tuple[float, float, float, float, int]:
    """Run ``argv``; return (wall, cpu user+sys, max single RSS MiB, peak tree RSS MiB, exit).

    The tool runs under GNU ``time``: its rusage (from ``wait4``) then covers the
    whole waited-for process tree, and ``ru_maxrss`` starts from ``time``'s small
    image rather than this (large) process's high-water mark, which a child
    forked from here would inherit.
    """
    usage = WORK / "usage.txt"
    usage.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "wb")) if log else subprocess.DEVNULL
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage), *argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            start_new_session=True,
        )
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            with contextlib.suppress(psutil.Error):
                ps = psutil.Process(proc.pid)
                while not done.wait(0.05):
                    peak[0] = max(peak[0], _tree_rss(ps))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(TOOL_TIMEOUT, lambda: _kill_group(proc.pid))
        timer.daemon = True
        timer.start()
        try:
            code = proc.wait()
        except BaseException:  # ^C or SIGTERM: the tool (in its own session) goes too
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
            done.set()
        wall = time.perf_counter() - t0
        sampler.join()
        orphan_cpu, orphan_rss_kib = _reap_orphans(proc.pid)
        _kill_group(proc.pid)  # daemons a tool left behind (none expected)
    fields = usage.read_text().split()[-3:]
    user, sys_, maxrss_kib = float(fields[0]), float(fields[1]), float(fields[2])
    maxrss_kib = max(maxrss_kib, orphan_rss_kib)
    return wall, user + sys_ + orphan_cpu, maxrss_kib / 1024, peak[0] / 2**20, code


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt the tools' orphans, so that their CPU time can be counted.

    A process whose parent exits first (fetch's multiprocessing fork server and
    the workers forked from it; a resource tracker) is reparented to the nearest
    subreaper, by default init, and its rusage never reaches GNU ``time``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap_orphans(session: int, grace: float = 10.0) -> tuple[float, float]:
    """Wait for the adopted descendants of the tool started as session leader
    ``session``; return their CPU seconds and largest ``ru_maxrss`` (KiB).

    They are given ``grace`` seconds to exit on their own (a fork server leaves
    when its parent's pipe closes); then the session is killed.
    """
    cpu = 0.0
    rss = 0.0
    deadline = time.monotonic() + grace
    while True:
        mine = []
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(child.pid) == session:
                    mine.append(child.pid)
        if not mine:
            return cpu, rss
        for pid in mine:
            with contextlib.suppress(ChildProcessError):
                done, _status, ru = os.wait4(pid, os.WNOHANG)
                if done:
                    cpu += ru.ru_utime + ru.ru_stime
                    rss = max(rss, float(ru.ru_maxrss))
        if time.monotonic() > deadline:
            _kill_group(session)
        time.sleep(0.01)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --- tools ------------------------------------------------------------------------


def compile_fetch() -> None:
    """Write the bytecode of fetch's package, as ``pip install`` does.

    An editable install run with ``PYTHONDONTWRITEBYTECODE=1`` (set on some CI and
    container images) never caches it, so every process of every run would compile
    fetch's sources again: ~0.05 s per process, timed as fetch's start-up.
    """
    spec = importlib.util.find_spec("fetcher")  # what fetch_script() will import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fetch is not installed: pip install -e .")
    package = Path(next(iter(spec.submodule_search_locations)))
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"cannot compile {package}")


def fetch_script() -> str:
    """The ``fetch`` console script of this interpreter's installation.

    ``shutil.which`` may find a version-manager shim first (pyenv's is a bash
    script that spends ~0.4 s choosing an interpreter), which would be timed
    as fetch's own start-up.  The peers are plain binaries; so is this.
    """
    own = Path(sys.executable).parent / "fetch"
    return str(own) if own.exists() else shutil.which("fetch") or "fetch"


def tool_argv(
    tool: str, url: str, dest: Path, n: int, url_list: Path, ca: Path | None = None
) -> list[str]:
    """The command for ``tool``; ``ca``: the CA file an https server's certificate is
    checked against (every tool verifies it, none is told to skip the check)."""
    if tool in VARIANT_FLAGS:
        return [
            fetch_script(),
            *VARIANT_FLAGS[tool],
            "--mirror",
            url,
            "--dest",
            str(dest),
            "--max-connections",
            str(n),
            "-q",  # --procs as it ships: 4 processes of 4 connections at N = 16
            *(["--ca-cert", str(ca)] if ca else []),
        ]
    if tool == "rclone":
        return [
            "rclone",
            "--config",
            "/dev/null",
            *(["--ca-cert", str(ca)] if ca else []),
            "copy",
            "--http-url",
            url,
            ":http:",
            str(dest),
            "--transfers",
            str(n),
            "--checkers",
            str(n),
            "-q",
        ]
    if tool == "wget2":
        # URL is the server root, so -nH alone makes DEST/<tree>; listings land as index.html
        return [
            "wget2",
            "-r",
            "-np",
            "-nH",
            "--robots=off",
            "--max-threads",
            str(n),
            *([f"--ca-certificate={ca}"] if ca else []),
            "-q",
            "-P",
            str(dest),
            url,
        ]
    if tool == "lftp":
        script = (
            (f"set ssl:ca-file {shlex.quote(str(ca))}; " if ca else "")
            + f"set net:max-retries 2; set cmd:fail-exit yes; "
            f"mirror --parallel={n} {url} {shlex.quote(str(dest))}"
        )
        return ["lftp", "-c", script]
    if tool == "aria2c":
        return [
            "aria2c",
            "-j",
            str(n),
            "-x",
            "1",
            "-i",
            str(url_list),
            "-d",
            str(dest),
            "-q",
            "--file-allocation=none",
            "--auto-file-renaming=false",
            "--allow-overwrite=true",
            "--console-log-level=error",
            "--summary-interval=0",
            *([f"--ca-certificate={ca}"] if ca else []),
        ]
    raise ValueError(tool)


def installed_tools() -> list[str]:
    return [*FETCHES, *(t for t in PEERS if shutil.which(t))]


def tool_version(tool: str) -> str:
    flag = {"rclone": "version"}.get(tool, "--version")
    exe = fetch_script() if tool in VARIANT_FLAGS else tool
    try:
        out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


# --- verification -------------------------------------------------------------------


def verify(tree: Tree, dest: Path) -> tuple[bool, str]:
    missing = bad = 0
    for rel, (size, digest) in tree.files.items():
        path = dest / rel
        try:
            if path.stat().st_size != size:
                bad += 1
                continue
        except OSError:
            missing += 1
            continue
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                bad += 1
    if missing or bad:
        return False, f"{missing} missing, {bad} wrong of {len(tree.files)}"
    return True, ""


def write_url_list(tree: Tree, url: str, path: Path) -> None:
    lines = []
    for rel in sorted(tree.files):
        lines.append(f"{url}{quote(rel)}\n  out={rel}\n")
    path.write_text("".join(lines))


# --- servers ------------------------------------------------------------------------


@contextlib.contextmanager
def proxied(upstream_port: int, delay_ms: float) -> Iterator[int]:
    """Run benchmarks/proxy.py in its own process; yield its port."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "proxy.py"),
            "--upstream",
            str(upstream_port),
            "--delay-ms",
            str(delay_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.match(r"listening (\d+)", line)
        if not m:
            raise RuntimeError(f"proxy did not start: {line!r}")
        yield int(m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


# --- scenarios ----------------------------------------------------------------------


def run_mirror_scenario(
    name: str,
    tree: Tree,
    tools: list[str],
    runs: int,
    n: int,
    rtt_ms: float | None,
    results: list[Measure],
    limit_rate: str | None = None,
    tls: bool = False,
) -> None:
    """``tls``: nginx speaks HTTPS, with a certificate of the suite's own CA (every
    tool is given the CA file), on plain loopback."""
    pem, ca = make_certificates(WORK / "tls") if tls else (None, None)
    with serve("nginx", tree.root, WORK / "servers", limit_rate=limit_rate, tls=pem) as srv:
        ctx = proxied(srv.port, rtt_ms / 2) if rtt_ms else contextlib.nullcontext(srv.port)
        with ctx as port:
            url = f"{srv.scheme}://127.0.0.1:{port}/"
            url_list = WORK / f"{name}.urls"
            write_url_list(tree, url, url_list)
            for r in range(runs):
                order = tools[r % len(tools) :] + tools[: r % len(tools)]
                for tool in order:
                    m = one_run(name, tool, r, tree, url, url_list, n, srv.access_log, ca=ca)
                    results.append(m)
                    _print_measure(m)


def make_certificates(where: Path) -> tuple[Path, Path]:
    """A CA of the suite's own and a certificate it signed for 127.0.0.1: the server's
    PEM (key and chain) and the CA's, made once and kept in ``where``."""
    pem, ca_pem = where / "server.pem", where / "ca.pem"
    if not (pem.exists() and ca_pem.exists()):
        import trustme

        where.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        ca.cert_pem.write_to_path(str(ca_pem))
    return pem, ca_pem


def one_run(
    scenario: str,
    tool: str,
    r: int,
    tree: Tree,
    url: str,
    url_list: Path,
    n: int,
    access_log: Path | Callable[[], int],
    dest: Path | None = None,
    fresh: bool = True,
    keep: bool = False,
    ca: Path | None = None,
) -> Measure:
    """One run of ``tool``, checked; ``access_log``: nginx's (its lines are the requests),
    or what counts the requests another server answered."""
    requests = access_log if callable(access_log) else lambda: log_lines(access_log)
    dest = dest or DEST_ROOT / tool
    if fresh and dest.exists():
        shutil.rmtree(dest)
    os.sync()  # the last run's dirty pages are not this run's to write back
    dest.mkdir(parents=True, exist_ok=True)
    argv = tool_argv(tool, url, dest, n, url_list, ca)
    before = requests()
    load = os.getloadavg()[0]
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    wall, cpu, rss, tree_rss, code = measure(
        argv, cwd=WORK, log=logs / f"{scenario}-{tool}-{r}.log"
    )
    time.sleep(0.2)  # nginx logs a request after answering it
    m = Measure(
        tool,
        scenario,
        r,
        wall,
        cpu,
        rss,
        tree_rss,
        code,
        argv=argv,
        requests=requests() - before,
        files=len(tree.files),
        bytes=tree.total_bytes,
        load=load,
    )
    m.ok, m.problems = verify(tree, dest)
    if not keep and DEST_ROOT != WORK / "dest":  # (memory, on tmpfs): not kept once checked
        shutil.rmtree(dest, ignore_errors=True)
    if code != 0:
        m.problems = (m.problems + f"; exit {code}").lstrip("; ")
    return m


def run_resync(
    tree: Tree,
    tools: list[str],
    runs: int,
    n: int,
    rtt_ms: float,
    results: list[Measure],
    limit_rate: str | None = None,
) -> None:
    """Each tool's first run fills its own DEST (untimed); then the unchanged re-syncs are
    measured, the tools interleaved run by run as in the other scenarios."""
    nginx = serve("nginx", tree.root, WORK / "servers", limit_rate=limit_rate)
    with nginx as srv, proxied(srv.port, rtt_ms / 2) as port:
        url = f"http://127.0.0.1:{port}/"
        url_list = WORK / "resync.urls"
        write_url_list(tree, url, url_list)
        for tool in tools:
            one_run(
                "resync-first", tool, 0, tree, url, url_list, n, srv.access_log,
                DEST_ROOT / f"resync-{tool}", keep=True,
            )  # fmt: skip
        for r in range(runs):
            for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:
                m = one_run(
                    "resync", tool, r, tree, url, url_list, n, srv.access_log,
                    DEST_ROOT / f"resync-{tool}", fresh=False, keep=True,
                )  # fmt: skip
                m.bytes = 0
                results.append(m)
                _print_measure(m)


def run_held(tree: Tree, tools: list[str], runs: int, n: int, results: list[Measure]) -> None:
    """``small`` from the suite's fault server (in this process, threaded, on 127.0.0.1),
    one file in :data:`HELD_EVERY` answered only after :data:`HELD_FOR` seconds, as a CDN
    answers a cache miss or a busy mirror a read from a cold disk. A client that queues
    requests behind a held answer waits with them."""
    from tests.faultserver import Fault, FaultServer

    with FaultServer(root=tree.root) as srv:
        for rel in sorted(tree.files)[::HELD_EVERY]:
            srv.persist("/" + rel, Fault.delay(HELD_FOR))  # (the path as decoded)
        url = srv.url
        url_list = WORK / "held.urls"
        write_url_list(tree, url, url_list)
        for r in range(runs):
            for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:
                m = one_run("held", tool, r, tree, url, url_list, n, lambda: len(srv.requests))
                results.append(m)
                _print_measure(m)


def run_scale(files_per_dir: int, dirs: int, n: int, results: list[Measure]) -> None:
    """A dry run over a generated listing-only tree: plan memory and listing throughput."""
    from tests.faultserver import FaultServer

    with FaultServer() as srv:
        srv.add_generated_tree("/gen/", dirs=dirs, files_per_dir=files_per_dir)
        dest = DEST_ROOT / "scale"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        argv = [*tool_argv("fetch", srv.url + "gen/", dest, n, dest / "unused"), "--dry-run"]
        load = os.getloadavg()[0]
        wall, cpu, rss, tree_rss, code = measure(argv, cwd=WORK, log=WORK / "logs" / "scale.log")
        m = Measure(
            "fetch",
            "scale",
            0,
            wall,
            cpu,
            rss,
            tree_rss,
            code,
            argv=argv,
            load=load,
            requests=len(srv.requests),
            files=dirs * files_per_dir,
            ok=code == 0,
            problems="" if code == 0 else f"exit {code}",
        )
        results.append(m)
        _print_measure(m)


def physical_limits(large: Tree, rtt_ms: float) -> dict[str, str]:
    limits: dict[str, str] = {}
    biggest = max(large.files, key=lambda rel: large.files[rel][0])
    size = large.files[biggest][0]

    def curl(port: int, scheme: str = "http", *more: str) -> str:
        out = subprocess.run(
            [
                "curl",
                "-s",
                *more,
                "-o",
                "/dev/null",
                "-w",
                "%{speed_download} %{time_total}",
                f"{scheme}://127.0.0.1:{port}/{quote(biggest)}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        ).stdout.split()
        speed = float(out[0])
        return f"{speed / 2**30:.2f} GiB/s ({size >> 20} MiB in {float(out[1]):.2f} s)"

    with serve("nginx", large.root, WORK / "servers") as srv:
        curl(srv.port)  # warm the page cache
        limits["wire: curl -o /dev/null, one file, direct"] = curl(srv.port)
        with proxied(srv.port, 0) as port:
            limits["proxy ceiling: curl through the proxy, 0 ms"] = curl(port)
        with proxied(srv.port, rtt_ms / 2) as port:
            limits[f"proxy ceiling: curl through the proxy, {rtt_ms:g} ms RTT"] = curl(port)
    pem, ca = make_certificates(WORK / "tls")
    with serve("nginx", large.root, WORK / "servers", tls=pem) as srv:
        limits["wire over TLS: curl -o /dev/null, one file, https"] = curl(
            srv.port, "https", "--cacert", str(ca)
        )
    target = DEST_ROOT / "dd.bin"
    DEST_ROOT.mkdir(parents=True, exist_ok=True)
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=1024", "conv=fdatasync"],
        capture_output=True,
        text=True,
    )
    target.unlink(missing_ok=True)
    last = dd.stderr.strip().splitlines()[-1] if dd.stderr.strip() else "?"
    limits["disk: dd 1 GiB bs=1M conv=fdatasync"] = last
    for k, v in limits.items():
        print(f"  {k}: {v}", flush=True)
    return limits


# --- reporting ----------------------------------------------------------------------


def _print_measure(m: Measure) -> None:
    state = "ok" if m.ok else f"FAILED ({m.problems})"
    print(
        f"  {m.scenario:<10} {m.tool:<7} run {m.run}: {m.wall:7.2f} s  cpu {m.cpu:6.2f} s  "
        f"rss {m.maxrss_mib:5.0f}/{m.tree_rss_mib:5.0f} MiB  req {m.requests:6d}  "
        f"load {m.load:4.1f}  "
        f"{state}",
        flush=True,
    )


def summarise(results: list[Measure]) -> list[dict[str, object]]:
    rows = []
    keys = sorted(
        {(m.scenario, m.tool) for m in results},
        key=lambda k: (ALL_SCENARIOS.index(k[0]), TOOLS.index(k[1])),
    )
    for scenario, tool in keys:
        ms = [m for m in results if (m.scenario, m.tool) == (scenario, tool)]
        wall = statistics.median(m.wall for m in ms)
        files, nbytes = ms[0].files, ms[0].bytes
        rows.append(
            {
                "scenario": scenario,
                "tool": tool,
                "runs": len(ms),
                "ok": all(m.ok for m in ms),
                "wall": wall,
                "files_per_s": files / wall if wall else 0.0,
                "mb_per_s": nbytes / 1e6 / wall if wall and nbytes else 0.0,
                "cpu": statistics.median(m.cpu for m in ms),
                "cpu_ms_per_file": 1000 * statistics.median(m.cpu for m in ms) / files
                if files
                else 0,
                "cpu_s_per_gib": statistics.median(m.cpu for m in ms) / (nbytes / 2**30)
                if nbytes
                else 0.0,
                "maxrss_mib": max(m.maxrss_mib for m in ms),
                "tree_rss_mib": max(m.tree_rss_mib for m in ms),
                "requests": int(statistics.median(m.requests for m in ms)),
                "problems": "; ".join(sorted({m.problems for m in ms if m.problems})),
            }
        )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    head = (
        "| scenario | tool | runs | ok | wall s | files/s | MB/s | CPU s | CPU ms/file | "
        "CPU s/GiB | peak RSS MiB (1 proc / tree) | requests |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        ok = "yes" if r["ok"] else f"**no** ({r['problems']})"
        body += (
            f"| {r['scenario']} | {r['tool']} | {r['runs']} | {ok} | {r['wall']:.2f} | "
            f"{r['files_per_s']:.0f} | {r['mb_per_s']:.0f} | {r['cpu']:.2f} | "
            f"{r['cpu_ms_per_file']:.2f} | {r['cpu_s_per_gib']:.2f} | "
            f"{r['maxrss_mib']:.0f} / {r['tree_rss_mib']:.0f} | {r['requests']} |\n"
        )
    return head + body


def ratios(rows: list[dict[str, object]]) -> str:
    out = (
        "| scenario | fetch wall s | best peer | peer wall s | fetch speed ÷ best peer | "
        "fetch --pipeline 1 ÷ best peer | fetch CPU ÷ rclone CPU |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for scenario in ALL_SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        fetch = next((r for r in mine if r["tool"] == "fetch"), None)
        p1 = next((r for r in mine if r["tool"] == "fetch-p1"), None)
        peers = [r for r in mine if r["tool"] not in VARIANT_FLAGS and r["ok"]]
        if fetch is None or not peers:
            continue
        best = min(peers, key=lambda r: r["wall"])
        if not fetch["ok"]:  # a failed run's time is no speed: say so, not a ratio
            out += f"| {scenario} | failed | {best['tool']} | {best['wall']:.2f} | **failed** | — | — |\n"
            continue
        rcl = next((r for r in peers if r["tool"] == "rclone"), None)
        cpu = f"{fetch['cpu'] / rcl['cpu']:.2f}×" if rcl and rcl["cpu"] else "—"
        like = f"{best['wall'] / p1['wall']:.2f}×" if p1 and p1["ok"] else "—"
        out += (
            f"| {scenario} | {fetch['wall']:.2f} | {best['tool']} | {best['wall']:.2f} | "
            f"**{best['wall'] / fetch['wall']:.2f}×** | {like} | {cpu} |\n"
        )
    return out


def machine() -> dict[str, str]:
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout
    return {
        "nproc": str(os.cpu_count()),
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")
            ),
            "?",
        ),
        "memory": free.splitlines()[1] if free else "?",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "filesystem": subprocess.run(
            ["df", "-hT", str(WORK)], capture_output=True, text=True
        ).stdout.splitlines()[-1],
    }


# --- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fetch vs rclone, wget2, lftp, aria2c")
    p.add_argument(
        "--quick", action="store_true", help=f"1 run each of {','.join(QUICK_SCENARIOS)}"
    )
    p.add_argument("--scenarios", help=f"comma list of {','.join(ALL_SCENARIOS)}")
    p.add_argument("--tools", help=f"comma list (default: the installed ones of {TOOLS})")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument(
        "--runs",
        type=int,
        help="runs of every tool per scenario (default: 5 on loopback and of the re-sync, 3 at the RTT; 1 with --quick)",
    )
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--no-limits", action="store_true", help="skip curl / dd / proxy ceilings")
    p.add_argument(
        "--server-limit-rate",
        metavar="RATE",
        help="nginx limit_rate per connection (e.g. 20m), as a busy mirror caps each client",
    )
    p.add_argument("--serve", metavar="TREE", help="only serve TREE (small, large, mixed) until ^C")
    p.add_argument(
        "--dest-root",
        metavar="DIR",
        type=Path,
        help="write every tool's DEST (and dd's test file) under DIR, e.g. /dev/shm to take the"
        " disk out of the loopback figures (default: benchmarks/work/dest)",
    )
    args = p.parse_args(argv)
    if args.dest_root is not None:
        global DEST_ROOT
        DEST_ROOT = args.dest_root.resolve() / "fetch-bench"
    # SIGTERM (a `timeout` around the suite, a closed session) unwinds like ^C, so nginx
    # and the proxy are stopped, not orphaned (they were, but for --serve)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if args.serve else 143))
    if args.serve:
        WORK.mkdir(exist_ok=True)
        t = build_tree(args.serve, WORK)
        with serve("nginx", t.root, WORK / "servers", limit_rate=args.server_limit_rate) as srv:
            delayed = (
                proxied(srv.port, args.rtt_ms / 2)
                if "--rtt-ms" in (argv or sys.argv)
                else contextlib.nullcontext(srv.port)
            )
            with delayed as port:
                print(
                    f"http://127.0.0.1:{port}/  ({len(t.files)} files; access log "
                    f"{srv.access_log}); ^C to stop",
                    flush=True,
                )
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
        return 0
    become_subreaper()
    compile_fetch()

    scenarios = (
        args.scenarios.split(",")
        if args.scenarios
        else list(QUICK_SCENARIOS if args.quick else FULL_SCENARIOS)
    )
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    runs = args.runs or (1 if args.quick else 3)
    # Loopback runs take a second and move by +-20 % from one to the next: more of them.
    loop_runs = args.runs or (1 if args.quick else 5)
    tools = args.tools.split(",") if args.tools else installed_tools()
    n, rtt = args.connections, args.rtt_ms
    WORK.mkdir(exist_ok=True)
    started = time.time()
    print(
        f"fetch benchmarks: scenarios {','.join(scenarios)}; tools {','.join(tools)}; "
        f"N={n}; RTT {rtt:g} ms; {loop_runs} run(s) each on loopback, {runs} at the RTT"
        + (f"; nginx limit_rate {args.server_limit_rate}" if args.server_limit_rate else ""),
        flush=True,
    )

    results: list[Measure] = []
    limits: dict[str, str] = {}
    trees: dict[str, Tree] = {}

    def tree(name: str) -> Tree:
        if name not in trees:
            t0 = time.time()
            trees[name] = build_tree(name, WORK)
            t = trees[name]
            print(
                f"tree {name}: {len(t.files)} files, {t.total_bytes / 2**20:.0f} MiB "
                f"({time.time() - t0:.1f} s)",
                flush=True,
            )
        return trees[name]

    if not args.no_limits:
        print("physical limits:", flush=True)
        limits = physical_limits(tree("large"), rtt)
    for s in scenarios:
        print(f"scenario {s}:", flush=True)
        if s in ("small", "large", "mixed"):
            run_mirror_scenario(
                s, tree(s), tools, loop_runs, n, None, results, args.server_limit_rate
            )
        elif s in ("small-tls", "large-tls"):
            run_mirror_scenario(
                s, tree(s.split("-")[0]), tools, loop_runs, n, None, results,
                args.server_limit_rate, tls=True,
            )  # fmt: skip
        elif s in ("small-rtt", "mixed-rtt"):
            run_mirror_scenario(
                s, tree(s.split("-")[0]), tools, runs, n, rtt, results, args.server_limit_rate
            )
        elif s == "held":
            run_held(tree("small"), tools, runs, n, results)
        elif s == "resync":
            rs_tools = [t for t in ("fetch", "rclone", "lftp") if t in tools]
            # five runs, as on loopback: a re-sync takes a fraction of a second of CPU, and
            # moves with the machine's moment as the loopback runs do
            run_resync(tree("small"), rs_tools, loop_runs, n, rtt, results, args.server_limit_rate)
        elif s == "scale":
            run_scale(100, 2000, n, results)

    if args.dest_root is not None:
        shutil.rmtree(DEST_ROOT, ignore_errors=True)
    rows = summarise(results)
    table, ratio = markdown(rows), ratios(rows)
    print("\n" + table + "\n" + ratio, flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    report = {
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "started_utc": stamp,
        "seconds": time.time() - started,
        "machine": machine(),
        "versions": {t: tool_version(t) for t in tools},
        "limits": limits,
        "rows": rows,
        "runs": [asdict(m) for m in results],
    }
    out = WORK / f"results-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    (WORK / f"results-{stamp}.md").write_text(
        f"command: `{report['command']}`\n\n"
        + table
        + "\n"
        + ratio
        + "\n"
        + "\n".join(f"- {k}: {v}" for k, v in limits.items())
        + "\n"
    )
    print(f"wrote {out} (+ .md) in {time.time() - started:.0f} s", flush=True)
    # 1 when a run of fetch went wrong; a peer's failed run is its own, shown in the tables
    # (rclone lost files over TLS in one suite: fetch's results were all good)
    return 0 if all(m.ok for m in results if m.tool in VARIANT_FLAGS) else 1


if __name__ == "__main__":
    sys.exit(main())
