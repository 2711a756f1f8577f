"""Shared fixtures: real servers, the fault server, trees (see tests/fixtures_servers.py)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from fetcher.cli import main
from tests.fixtures_servers import (  # noqa: F401 - fixtures are found by name
    fault_server,
    hard_tree,
    served,
    server_kind,
    tls,
)


class Run:
    """The result of ``main(argv)``: exit code and everything it printed."""

    def __init__(self, code: int, output: str) -> None:
        self.code = code
        self.output = output

    def __repr__(self) -> str:
        return f"Run(code={self.code}, output=...{self.output[-2000:]!r})"


@pytest.fixture
def run_fetch() -> Callable[..., Run]:
    """Call the CLI in-process with an injected console; returns code and output."""

    def call(*argv: str | Path) -> Run:
        buf = io.StringIO()
        console = Console(file=buf, width=200, force_terminal=False, color_system=None)
        code = main([str(a) for a in argv], console)
        return Run(code, buf.getvalue())

    return call
