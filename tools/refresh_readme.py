"""Rerun the README's console commands and write their real output back into it.

Each ```console block's ``$ `` lines run in order in one scratch folder that holds the
repository's ``models/`` (as tests/test_readme.py runs them), with this environment's
``bncal`` first on PATH; the lines after a command, up to the next command or the end of the
block, are replaced by what it printed on stdout (a command shows stderr where it says
``2>&1``, as a user's shell would). Run it after a change to what a command prints, then read the diff::

    .venv/bin/python tools/refresh_readme.py            # rewrite README.md
    .venv/bin/python tools/refresh_readme.py --check    # exit 1 if any output changed
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(```console\n)(.*?)(```)", re.S)


def _environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.pop("FORCE_COLOR", None)
    return env


def _run(command: str, cwd: Path, env: dict) -> list[str]:
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"README command failed ({result.returncode}): {command}\n{result.stdout}{result.stderr}")
    return result.stdout.rstrip("\n").splitlines()


def refresh(text: str, workdir: Path) -> str:
    env = _environment()

    def block(match: re.Match) -> str:
        lines, out = match.group(2).splitlines(), []
        for line in lines:
            if line.startswith("$ "):
                out.append(line)
                out.extend(_run(line[2:], workdir, env))
            elif not out:  # text before the first command stays
                out.append(line)
        return match.group(1) + "\n".join(out) + "\n" + match.group(3)

    return _BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        (workdir / "models").symlink_to(ROOT / "models", target_is_directory=True)
        new = refresh(old, workdir)
    if args.check:
        print("README.md is up to date" if new == old else "README.md outputs changed")
        return int(new != old)
    readme.write_text(new)
    print(f"rewrote {readme}" if new != old else "README.md was up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
