"""fetch's own processes do not import httpx's command-line client; a library user's do."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from fetcher.procs import worker_context

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
