"""Pytest fixtures for the test servers and trees (the conftest imports them).

- ``hard_tree``: the session's :func:`tests.trees.make_hard_tree` (root and
  manifest); shared, so treat it as read-only.
- ``server_kind``: parametrised over every real server kind; skips a kind
  whose binary is missing.
- ``served``: a factory ``served(kind, root, **options) -> Served``; every
  server it starts stops at teardown.  Or use ``serve`` directly:
  ``with serve("nginx", root, tmp_path) as srv: ...``.
- ``fault_server``: a started :class:`FaultServer` with no root; teardown
  fails the test if a handler raised unexpectedly.
- ``tls``: a trustme CA with server and client ``ssl.SSLContext`` for 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from tests.faultserver import FaultServer
    from tests.servers import KINDS, Served, free_port, serve, unavailable
    from tests.trees import make_hard_tree
except ImportError:  # tests/ itself is on sys.path, not its parent
    from faultserver import FaultServer  # type: ignore[no-redef]
    from servers import KINDS, Served, free_port, serve, unavailable  # type: ignore[no-redef]
    from trees import make_hard_tree  # type: ignore[no-redef]

__all__ = [
    "KINDS",
    "TLS",
    "HardTree",
    "fault_server",
    "free_port",
    "hard_tree",
    "serve",
    "served",
    "server_kind",
    "tls",
]


@dataclass(frozen=True, slots=True)
class HardTree:
    root: Path
    manifest: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class TLS:
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_pem: Path


@pytest.fixture(scope="session")
def hard_tree(tmp_path_factory: pytest.TempPathFactory) -> HardTree:
    root = tmp_path_factory.mktemp("hard") / "tree"
    return HardTree(root, make_hard_tree(root))


@pytest.fixture(params=KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    reason = unavailable(kind)
    if reason is not None:
        pytest.skip(reason)
    return kind


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    with contextlib.ExitStack() as stack:

        def start(kind: str, root: Path, **options: object) -> Served:
            return stack.enter_context(serve(kind, root, tmp_path / "servers", **options))  # type: ignore[arg-type]

        yield start


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv
    assert not srv.errors, "fault server handler errors:\n" + "\n".join(srv.errors)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    pem = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return TLS(server, client, pem)
