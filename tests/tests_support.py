"""Helpers shared by the tests: running the CLI, locating files."""

import shutil
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def torchrun_command(nproc: int) -> list[str]:
    """torchrun from this interpreter's environment, standalone on 127.0.0.1."""
    exe = Path(sys.executable).with_name("torchrun")
    base = [str(exe)] if exe.exists() else [shutil.which("torchrun") or "torchrun"]
    return base + ["--standalone", f"--nproc-per-node={nproc}"]
