"""The sha256 of a file, read in blocks (a 90 MB weights file is not held in memory at once): what
exported artifacts and pinned pretrained weights record of the files they depend on."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The file's sha256, as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
