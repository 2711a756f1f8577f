"""Deterministic, incompressible benchmark trees, cached under ``benchmarks/work/trees``.

A file's bytes are a pure function of its relative path (``random.Random``
seeded with the path), so a tree rebuilt anywhere is byte-identical, and the
cached ``manifest.json`` (path → size, sha256) is what every result is checked
against.

Shapes (``scale`` is divided for ``--quick``-style smaller runs):

- ``small``: 5,000 files of 1–64 KiB in 50 Debian-pool-like directories
  (``pool/main/l/libfoo3/libfoo3_1.2+dfsg-1~deb12u1_amd64.deb``).
- ``large``: 8 × 128 MiB.
- ``mixed``: an RPM-repository shape, ~3,000 files, log-normal sizes plus a
  few 24–70 MiB files, ~0.7 GiB, with ``repodata/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SHAPES", "Tree", "build_tree", "file_bytes"]

KiB = 1024
MiB = 1024 * KiB
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_STEMS = (
    "acl", "bash", "coreutils", "dpkg", "expat", "fontconfig", "glib2.0", "gnutls28", "heimdal",
    "icu", "jansson", "krb5", "lz4", "mesa", "ncurses", "openssl", "pcre2", "python3.11",
    "qtbase-opensource-src", "readline", "sqlite3", "systemd", "tar", "util-linux", "vim",
    "wayland", "xz-utils", "yajl", "zlib", "zstd",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Tree:
    name: str
    root: Path
    files: dict[str, tuple[int, str]]
    """Relative path → (size, sha256 hex)."""

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


TREE_MTIME = 1_700_000_000.0  # 2023-11-14


def file_bytes(rel: str, size: int) -> bytes:
    """The content of ``rel``: ``size`` pseudo-random (incompressible) bytes seeded by the path."""
    return random.Random(rel).randbytes(size)


def _small(scale: float) -> list[tuple[str, int]]:
    rng = random.Random("small")
    n_files, n_dirs = max(50, int(5000 * scale)), 50
    dirs = []
    for d in range(n_dirs):
        stem = f"{_STEMS[d % len(_STEMS)]}{'' if d < len(_STEMS) else d}"
        first = "lib" + stem[0] if stem.startswith("lib") else stem[0]
        dirs.append((f"pool/main/{first}/{stem}", stem))
    out = []
    for i in range(n_files):
        path, stem = dirs[i % n_dirs]
        ver = f"{i % 7}.{i % 13}.{i}"
        arch = ("amd64", "arm64", "all", "i386")[i % 4]
        name = f"{stem}-pkg{i // n_dirs}_{ver}+dfsg-{i % 3 + 1}~deb12u{i % 5}_{arch}.deb"
        out.append((f"{path}/{name}", rng.randint(1 * KiB, 64 * KiB)))
    return out


def _large(scale: float) -> list[tuple[str, int]]:
    size = max(MiB, int(128 * MiB * scale))
    return [(f"iso/disk{i}.img", size) for i in range(8)]


def _mixed(scale: float) -> list[tuple[str, int]]:
    rng = random.Random("mixed")
    n = max(30, int(3000 * scale))
    out = []
    for i in range(n):
        # log-normal with a median of 48 KiB (mean ~110 KiB), capped at 8 MiB: ~330 MiB of
        # packages; the big ones below add ~380 MiB
        size = min(8 * MiB, int(math.exp(rng.gauss(math.log(48 * KiB), 1.3))))
        letter = _LETTERS[i % 26]
        name = f"{letter}{_STEMS[i % len(_STEMS)]}-{i % 9}.{i % 17}.{i}-{i % 4 + 1}.el9.x86_64.rpm"
        out.append((f"Packages/{letter}/{name}", max(512, size)))
    for j in range(max(1, int(8 * scale))):
        size = int(rng.uniform(24, 70) * MiB * max(scale, 1 / 64))
        out.append((f"images/install-{j}.img", size))
    for meta in ("repomd.xml", "primary.xml.zst", "filelists.xml.zst", "other.xml.zst"):
        out.append((f"repodata/{meta}", rng.randint(4 * KiB, 2 * MiB)))
    return out


SHAPES = {"small": _small, "large": _large, "mixed": _mixed}


def build_tree(name: str, work: Path, scale: float = 1.0) -> Tree:
    """Build (or reuse from the cache) tree ``name`` under ``work/trees``, with its manifest."""
    tag = name if scale == 1.0 else f"{name}-x{scale:g}"
    root = work / "trees" / tag
    manifest_path = work / "trees" / f"{tag}.manifest.json"
    shape = SHAPES[name](scale)
    if manifest_path.exists() and root.is_dir():
        files = {k: (v[0], v[1]) for k, v in json.loads(manifest_path.read_text()).items()}
        if {rel: size for rel, (size, _) in files.items()} == dict(shape):
            return Tree(tag, root, files)  # the cached tree is this shape (it may have changed)
    if root.exists():
        shutil.rmtree(root)
    files = {}
    for rel, size in shape:
        data = file_bytes(rel, size)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # dated long ago, as a mirror's files are (a file fetched within 90 s of its
        # change is asked again by the next run: see fetcher.plan.racy)
        os.utime(path, (TREE_MTIME, TREE_MTIME))
        files[rel] = (size, hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(files, indent=0, sort_keys=True))
    return Tree(tag, root, files)
