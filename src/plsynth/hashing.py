"""The project's one hash: sha256 of a file's bytes, and a short digest of JSON-able settings.

Bundles verify files with :func:`sha256_file`; caches, records and engine keys name settings
with :func:`json_digest` (keys sorted, so the same settings give the same digest on any machine).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_digest(value: Any, length: int = 16) -> str:
    """First ``length`` hex digits of the sha256 of ``value`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def text_digest(text: str, length: int = 64) -> str:
    """First ``length`` hex digits of the sha256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]
