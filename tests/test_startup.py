"""How fetch's own processes start and end.

They do not import httpx's command-line client (a library user's do), and the
console script ends without tearing the interpreter down, but as an orderly exit would.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fetcher.procs import worker_context
from fetcher.startup import GC_THRESHOLD
from tests.faultserver import FaultServer
from tests.trees import settled

CHECK = "import sys, httpx; print(sys.modules.get('httpx._main', 'absent') is None, httpx.main.__module__)"


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_cli_process_skips_httpx_s_command_line_client() -> None:
    assert _python("import fetcher.cli, fetcher.pipeline; " + CHECK) == "True httpx"


def test_importing_fetch_as_a_library_changes_nothing() -> None:
    # httpx's own main (from httpx._main) when its extras are installed; its stub otherwise
    out = _python("import fetcher.pipeline, fetcher.runner; " + CHECK)
    assert out.startswith("False "), out


GC_CHECK = "import gc; print(gc.get_threshold())"


def test_the_cli_process_paces_the_collector_and_a_library_user_keeps_python_s() -> None:
    default = _python(GC_CHECK)
    assert _python("import fetcher.pipeline, fetcher.runner; " + GC_CHECK) == default
    paced = _python("import fetcher.cli; " + GC_CHECK)
    assert paced == str((GC_THRESHOLD, *ast.literal_eval(default)[1:])) != default


def _report(q: Any) -> None:
    q.put(sys.modules.get("httpx._main", "absent") is None and "httpx" in sys.modules)


def test_workers_fork_from_a_server_that_skipped_it() -> None:
    ctx = worker_context()
    q = ctx.Queue()
    p = ctx.Process(target=_report, args=(q,))
    p.start()
    try:
        assert q.get(timeout=60) is (ctx.get_start_method() == "forkserver")
    finally:
        p.join(timeout=30)
        q.close()
    assert p.exitcode == 0


EXIT_PROGRAM = """
import atexit, sys, threading, time
from fetcher.cli import _exit
out = sys.argv[1]
def late():
    time.sleep(0.3)  # the exit must wait for this thread, as sys.exit would
    with open(out, "a") as fh:
        fh.write("thread ")
threading.Thread(target=late).start()
atexit.register(lambda: open(out, "a").write("atexit"))
print("buffered", end="")  # stdout is a pipe: block-buffered, written only on flush
_exit(3)
"""


def test_the_console_script_exits_like_sys_exit(tmp_path: Any) -> None:
    out = tmp_path / "trace"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROGRAM, str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered"
    assert out.read_text() == "thread atexit"


def test_exit_codes_pass_through_the_console_script() -> None:
    run = [sys.executable, "-m", "fetcher"]
    assert subprocess.run([*run, "--version"], capture_output=True, timeout=60).returncode == 0
    bad = subprocess.run([*run, "--procs", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr


def test_the_cli_imports_rich_only_for_its_output() -> None:
    # rich is a fifth of the CLI's imports: not needed before the workers are forked
    code = "import sys, fetcher.cli, fetcher.pipeline; print(any(m.startswith('rich') for m in sys.modules))"
    assert _python(code) == "False"


def test_a_run_whose_output_is_not_a_terminal_never_imports_rich(tmp_path: Path) -> None:
    # cron, a pipe, a log: plain lines all through, the summary included (~25 ms of CPU)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"a" * 5000)
    code = (
        "import atexit, sys; import fetcher.cli as cli; "
        "atexit.register(lambda: print('rich:', any(m.startswith('rich') for m in sys.modules))); "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    with FaultServer(root=tmp_path / "www") as srv:
        done = subprocess.run(
            [sys.executable, "-c", code, "--mirror", srv.url, "--dest", str(tmp_path / "d"),
             "--procs", "1"],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "rich: False", done.stdout
    assert "  fetched      1  4.9 KiB" in done.stdout, done.stdout


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"FORCE_COLOR": "1"},
        {"FORCE_COLOR": ""},
        {"TTY_COMPATIBLE": "1"},
        {"TTY_COMPATIBLE": "0"},
    ],
)
def test_the_cli_console_is_a_terminal_when_rich_would_say_so(env: dict[str, str]) -> None:
    # stdout is a pipe here: only the environment can make it a terminal, for rich and for us
    code = (
        "from rich.console import Console; from fetcher.cli import _LazyConsole; "
        "lazy = _LazyConsole(); print(lazy.is_terminal, Console().is_terminal, lazy.made)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**clean, **env}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ours, rich_says, made = done.stdout.split()
    assert ours == rich_says
    # unforced, a pipe is answered without making the console (nor importing rich's)
    assert made == ("False" if not env else "True")


def test_on_a_terminal_the_cli_draws_the_live_display(tmp_path: Path) -> None:
    # stdout a terminal: the live bars (rich's Live, given the console itself), then the summary
    import pty
    import select

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"a" * 5000)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    master, slave = pty.openpty()
    chunks: list[bytes] = []
    try:
        with FaultServer(root=tmp_path / "www") as srv:
            argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "1"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "fetcher", *argv], stdin=subprocess.DEVNULL,
                stdout=slave, stderr=slave, env=env,
            )  # fmt: skip
            os.close(slave)
            slave = -1
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: the terminal's other side is closed
                        break
                    if not data:
                        break
                    chunks.append(data)
                elif proc.poll() is not None:
                    break
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    out = b"".join(chunks).decode(errors="replace")
    assert code == 0, out
    assert "Traceback" not in out and "Fatal" not in out, out
    assert "\x1b[" in out  # drawn, with terminal codes
    assert "fetched" in out
    assert (tmp_path / "d" / "a.bin").read_bytes() == b"a" * 5000


def _imports(url: str, dest: Path, module: str = "lxml.etree") -> tuple[bool, str]:
    """Whether a run of fetch (``--procs 1``) imported ``module``, and what it printed."""
    code = (
        "import atexit, sys; import fetcher.cli as cli; "
        f"atexit.register(lambda: print('imported:', {module!r} in sys.modules)); "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--mirror", url, "--dest", str(dest), "--procs", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1] == "imported: True", done.stdout


def test_lxml_is_imported_only_for_a_page_the_nginx_reader_declines(tmp_path: Path) -> None:
    # nginx's autoindex pages go through the line reader: ~8 ms of start-up saved
    from tests.servers import serve

    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    (www / "sub" / "a.bin").write_bytes(b"a" * 3000)
    with serve("nginx", www, tmp_path / "srv") as srv:
        used, out = _imports(srv.url, tmp_path / "d1")
    assert not used and "  fetched      1" in out, out
    assert (tmp_path / "d1" / "sub" / "a.bin").read_bytes() == b"a" * 3000
    with serve("apache", www, tmp_path / "srv2") as srv:  # its markup: the general reader
        used, out = _imports(srv.url, tmp_path / "d2")
    assert used and "  fetched      1" in out, out
    assert (tmp_path / "d2" / "sub" / "a.bin").read_bytes() == b"a" * 3000


def test_a_resync_of_kept_pages_loads_no_listing_reader(tmp_path: Path) -> None:
    # the readers load with the first page parsed (~4 ms of start-up otherwise)
    from tests.servers import serve

    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    (www / "sub" / "a.bin").write_bytes(b"a" * 3000)
    (www / "b.bin").write_bytes(b"b" * 10)
    settled(www)  # (a file just changed is asked for again: plan.racy)
    with serve("nginx", www, tmp_path / "srv") as srv:
        used, out = _imports(srv.url, tmp_path / "d", "fetcher.listing")
        assert used and "  fetched      2" in out, out
        used, out = _imports(srv.url, tmp_path / "d", "fetcher.listing")
        assert not used and "  unchanged    2" in out, out
        (www / "sub" / "c.bin").write_bytes(b"c" * 20)  # a page changed: read it
        used, out = _imports(srv.url, tmp_path / "d", "fetcher.listing")
        assert used and "  fetched      1" in out, out
    assert (tmp_path / "d" / "sub" / "c.bin").read_bytes() == b"c" * 20


def test_a_run_in_which_nothing_fails_loads_no_retry_machinery(tmp_path: Path) -> None:
    # tenacity (~4 ms) loads with the first retry: every first attempt runs bare
    from tests.servers import serve

    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    for i in range(5):
        (www / "sub" / f"{i}.bin").write_bytes(bytes([i]) * 4000)
    with serve("nginx", www, tmp_path / "srv") as srv:
        used, out = _imports(srv.url, tmp_path / "d", "tenacity")
    assert not used and "  fetched      5" in out, out
    assert (tmp_path / "d" / "sub" / "4.bin").read_bytes() == b"\x04" * 4000
