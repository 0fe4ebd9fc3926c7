"""Atomic file output: write beside the destination, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import BncalError

__all__ = ["atomic_output", "check_output_path"]


def check_output_path(path, *, force: bool = False, inputs=()) -> Path:
    """Refuse an output that would overwrite an input, or an existing file without ``force``."""
    path = Path(path)
    for item in inputs:
        if item is not None and Path(item).exists() and path.exists() and path.resolve() == Path(item).resolve():
            raise BncalError(f"output {path} is also an input; write to another path (inputs are never overwritten)")
    if path.exists() and not force:
        raise BncalError(f"output {path} already exists; pass --force to replace it")
    if path.is_dir():
        raise BncalError(f"output {path} is a directory; give a file path")
    if not path.parent.exists():
        raise BncalError(f"output directory {path.parent} does not exist; create it first")
    return path


@contextlib.contextmanager
def atomic_output(path, *, suffix: str = ".tmp"):
    """Yield a temporary path in the destination's directory; rename it to ``path`` on success.

    If the body raises, the temporary file is removed and ``path`` is left as it was.
    ``suffix`` ends the temporary name (for writers that insist on an extension, like Keras).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
