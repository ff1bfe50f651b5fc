"""The split tests' helpers: the codec that stores weights as they are, and a folder's files as bytes (for tests
in any folder: tests/, the rootdir conftest's folder, is on sys.path)."""

from __future__ import annotations

from pathlib import Path

from strategies.compression.configs import NoCompressionConfig
from strategies.compression.none import NoCompression


def codec() -> NoCompression:
    return NoCompression(NoCompressionConfig())


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
