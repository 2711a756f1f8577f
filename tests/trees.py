"""Deterministic file trees for integration tests, and a manifest to compare them.

A manifest maps each relative POSIX path below a root to the SHA-256 hex digest
of a file's bytes, or to ``None`` for a directory::

    src_manifest = make_hard_tree(src)
    ...  # mirror src through a server into dest
    assert tree_manifest(dest) == tree_manifest(src)

Names are ``str``; a name that is not valid UTF-8 on disk keeps its bytes as
surrogate escapes (``os.fsdecode``), so it still compares equal to itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import unicodedata
from pathlib import Path

__all__ = [
    "BIG_FILE",
    "HARD_NAMES",
    "LONG_NAME",
    "MANY_COUNT",
    "NFC_NAME",
    "NFD_NAME",
    "make_hard_tree",
    "make_simple_tree",
    "tree_manifest",
]

Manifest = dict[str, str | None]

NFC_NAME = unicodedata.normalize("NFC", "café.txt")
NFD_NAME = unicodedata.normalize("NFD", "café.txt")
LONG_NAME = "ü" * 96 + "long.bin"
"""A name of exactly 200 UTF-8 bytes (96 two-byte letters, then 8 ASCII)."""
assert len(LONG_NAME.encode()) == 200 and NFC_NAME != NFD_NAME

HARD_NAMES: tuple[str, ...] = (
    "with space.txt",
    "  two leading and trailing spaces  ",
    NFC_NAME,
    NFD_NAME,
    "日本語のファイル.txt",
    "emoji 🎉.txt",
    "100%.txt",
    "literal%20percent-twenty.txt",
    "per%cent%2Fslash%zz.txt",
    "hash#tag.txt",
    "question?mark.txt",
    "a?b=c&d=e.txt",
    "amp&ersand.txt",
    "plus+sign.txt",
    "semi;colon.txt",
    "-leading-dash.txt",
    "--double-dash",
    "~tilde",
    "quote'single.txt",
    "brackets[1](2){3}.txt",
    'double "quotes" <angle> brackets.txt',
    "colon:name.txt",
    "at@sign!dollar$comma,equals=.txt",
    ".hidden",
    LONG_NAME,
)
"""The top directory's hostile file names (each holds a few bytes of its own)."""

MANY_COUNT = 3000
BIG_FILE = "big/twenty-mib.bin"
_BIG_SIZE = 20 << 20
_NESTING = 10


SETTLED = 1_700_000_000.0  # 2023-11-14: long before any run


def settled(root: Path, when: float = SETTLED) -> Path:
    """Every file below ``root`` dated ``when``, as a mirror's files are: a file changed
    less than a minute before the run that fetched it is asked for again by the next
    (fetcher.plan.racy), which a test of an unchanged re-run does not mean to test."""
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (when, when))
    return root


def make_hard_tree(root: Path) -> Manifest:
    """Build the integration tree of hostile names below ``root``; return its manifest.

    Contents: every name of :data:`HARD_NAMES` at the top (spaces, NFC and NFD
    ``café`` as two distinct files, ``%``, ``#``, ``?``, ``&``, ``+``, ``;``,
    leading ``-``, ``:``, ``"<>``, a 200-byte name, a dot-file), two empty files, two empty
    directories (one a dot-directory), ten levels of nesting, a directory of
    :data:`MANY_COUNT` files, and a 20 MiB incompressible file at
    :data:`BIG_FILE`.  Every byte is a pure function of the path.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in HARD_NAMES:
        _write(root / name, f"{name}\n".encode())
    _write(root / "empty.txt", b"")
    _write(root / "sub dir" / "empty file", b"")
    _write(root / "sub dir" / "ünïcödé dir" / "x#y?z.txt", b"nested hostile\n")
    (root / "empty-dir").mkdir()
    (root / ".empty-dot-dir").mkdir()
    _write(root / ".dot-dir" / ".inner", b"dot dir file\n")
    deep = root.joinpath("deep", *(f"level{i}" for i in range(1, _NESTING + 1)))
    _write(deep / "leaf.txt", b"ten levels down\n")
    many = root / "many"
    many.mkdir()
    for i in range(MANY_COUNT):
        (many / f"file{i:05d}.txt").write_bytes(b"%d\n" % i)
    _write(root / BIG_FILE, random.Random(20).randbytes(_BIG_SIZE))
    return tree_manifest(root)


def make_simple_tree(
    root: Path,
    files: int = 5000,
    dirs: int = 50,
    min_size: int = 1024,
    max_size: int = 65536,
    seed: int = 0,
) -> Manifest:
    """Build ``files`` random-content files spread over ``dirs`` directories; return the manifest.

    Layout: ``dNNN/fNNNNNN.bin``, file ``i`` in directory ``i % dirs``; sizes are
    uniform in ``[min_size, max_size]``.  The same arguments build the same tree.
    """
    if dirs < 1 or files < 0 or not 0 <= min_size <= max_size:
        raise ValueError("need dirs >= 1, files >= 0 and 0 <= min_size <= max_size")
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(dirs):
        (root / f"d{d:03d}").mkdir(exist_ok=True)
    for i in range(files):
        size = rng.randint(min_size, max_size)
        (root / f"d{i % dirs:03d}" / f"f{i:06d}.bin").write_bytes(rng.randbytes(size))
    return tree_manifest(root)


def tree_manifest(root: Path, *, skip_top: tuple[str, ...] = (".fetcher",)) -> Manifest:
    """Map each path below ``root`` to its file's SHA-256 hex digest, or ``None`` for a directory.

    Top-level entries named in ``skip_top`` (the mirror's private ``.fetcher``)
    are left out.  A symbolic link maps to ``"symlink:" + target``; it is not
    followed.
    """
    manifest: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        if not prefix:
            dirnames[:] = [d for d in dirnames if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            key = prefix + name
            if os.path.islink(path):
                manifest[key] = "symlink:" + os.readlink(path)
            elif os.path.isdir(path):
                manifest[key] = None
            else:
                manifest[key] = _sha256(path)
    return dict(sorted(manifest.items()))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
