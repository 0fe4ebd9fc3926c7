"""bncal as committed at another git ref, importable beside the working tree's, for benchmarks
that measure the current code and a previous commit side by side in one run."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def previous_module(ref: str, module: str):
    """``bncal.<module>`` as committed at git ``ref``, imported as ``bncal_previous.<module>``."""
    folder = Path(tempfile.mkdtemp(prefix="bncal-previous-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "bncal"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "bncal").rename(folder / "bncal_previous")
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"bncal_previous.{module}")
