"""The embedded text corpus: the Python standard library's own source files (the byte-level LM's corpus, and
the text family's docstrings).

Every machine with Python has it, so the default experiments need no download. The file list
is sorted and filtered deterministically, and split into train and validation *by file*, so a
validation byte never appears in training. `fingerprint` identifies the exact file list (it
differs between Python patch releases), and is logged by the trainer.
"""
from __future__ import annotations

import hashlib
import pathlib
import sysconfig
import zlib

# Directories whose files are left out: tests (huge, repetitive, and sometimes deliberately
# invalid source), third-party packages, and caches.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# One file in every `_VALIDATION_MODULUS` (chosen by a hash of its path) is validation data.
_VALIDATION_MODULUS = 20


def stdlib_root() -> pathlib.Path:
    """Directory of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: pathlib.Path | None = None) -> list[str]:
    """Sorted relative paths (POSIX form) of the standard library's `.py` files, tests excluded."""
    root = stdlib_root() if root is None else root
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def is_validation_file(relative_path: str) -> bool:
    """Deterministic train/validation split by file (CRC32 of the path, not Python's salted hash)."""
    return zlib.crc32(relative_path.encode("utf-8")) % _VALIDATION_MODULUS == 0


def fingerprint(relative_paths: list[str], root: pathlib.Path) -> str:
    """Short SHA-256 over the file names and sizes: equal fingerprints mean the same corpus."""
    digest = hashlib.sha256()
    for rel in relative_paths:
        digest.update(rel.encode("utf-8"))
        digest.update(str((root / rel).stat().st_size).encode("ascii"))
    return digest.hexdigest()[:16]
