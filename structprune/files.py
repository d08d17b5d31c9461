"""The package's one atomic writer: a file is written whole or not at all.

Every file structprune writes in place (a plan, saved weights, the latency cache, a
fine-tuning checkpoint, a re-exported ONNX file) goes through :func:`atomic_write`, so a
reader, or a run that was killed half-way, never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Call ``write`` on a temporary file beside ``path`` (same folder, same suffix, so
    writers that go by the suffix still work), then rename it onto ``path``. On any failure
    the temporary file is removed and ``path`` is left as it was. Returns what ``write``
    returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a written file is not
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


__all__ = ["atomic_write", "atomic_write_text"]
