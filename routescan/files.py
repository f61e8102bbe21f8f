"""Writing files so that a crash never leaves half of one where a whole one is expected."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. When the block ends normally it replaces
    ``path`` in one rename; when it raises, the temporary file is removed and ``path`` is untouched.
    (A path, not a handle, so Parquet and zip writers that open files themselves can use it too.)"""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
