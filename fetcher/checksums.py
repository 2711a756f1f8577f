"""Published checksum files (``SHA256SUMS`` and friends): find them, parse them (pure).

Two formats are read: GNU coreutils (``<hex>  name`` or ``<hex> *name``, the
algorithm given by the file's name) and BSD tags (``SHA256 (name) = <hex>``,
as in Fedora's ``CHECKSUM`` files).  Only names in the same directory count.

    >>> parse_sums("SHA256SUMS", "9f86d081884c7d65  a.iso\\n")
    {}
    >>> parse_sums("SHA256SUMS", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 *a.iso\\n")
    {'a.iso': ('sha256', '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08')}
"""

from __future__ import annotations

import re

__all__ = ["MAX_SUMS_BYTES", "is_sums_file", "parse_sums"]

MAX_SUMS_BYTES = 16 << 20

_BY_NAME = {
    "SHA256SUMS": "sha256",
    "SHA512SUMS": "sha512",
    "SHA1SUMS": "sha1",
    "MD5SUMS": "md5",
    "sha256sum.txt": "sha256",
    "sha512sum.txt": "sha512",
    "CHECKSUM": None,
}
_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_GNU = re.compile(r"^\\?([0-9a-fA-F]+) [ *](.+)$")
_BSD = re.compile(r"^(MD5|SHA1|SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)$")
# Preference when one file is listed by several files: the strongest digest wins.
_STRENGTH = {"md5": 0, "sha1": 1, "sha256": 2, "sha512": 3}


def is_sums_file(name: str) -> bool:
    return name in _BY_NAME or name.endswith("-CHECKSUM")


def parse_sums(filename: str, text: str) -> dict[str, tuple[str, str]]:
    """Map each plain name (no '/') to ``(algorithm, hexdigest)``; bad lines are skipped."""
    default = _BY_NAME.get(filename)
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        line = line.strip()
        algo: str | None
        m = _BSD.match(line)
        if m:
            algo, name, digest = m.group(1).lower(), m.group(2), m.group(3)
        else:
            g = _GNU.match(line)
            if not g or default is None:
                continue
            algo, digest, name = default, g.group(1), g.group(2)
        if len(digest) != _HEX_LEN[algo] or "/" in name or name in ("", ".", ".."):
            continue
        old = out.get(name)
        if old is None or _STRENGTH[algo] > _STRENGTH[old[0]]:
            out[name] = (algo, digest.lower())
    return out
