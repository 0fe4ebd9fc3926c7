"""Keep the README true: run every command and code block it shows.

Console blocks: each ``$ `` line runs in a shell, in order, in a scratch folder that holds the
repository's ``models/`` (so relative paths work as from the repository root), with this
environment's ``bncal``/``torchrun`` first on PATH. A command must exit 0; a documented
``exit status: N`` line must match, and so must the whole shape of the documented output
(:func:`_shape`: every line, numbers aside, so a changed table header, a new row or another
verdict line shows up here). Python blocks are saved as scripts in a folder outside the
repository and run there. The quickstart's two commands are checked against ``.ci/run`` and the
demo is run.
"""

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests_support import ROOT

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _env():
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme")
    (path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    return path


def test_quickstart_is_two_commands_and_ci_runs_the_second(workdir):
    quickstart = README.split("## Quickstart", 1)[1]
    commands = [line for line in _blocks("sh")[0].splitlines() if line.strip()]
    assert quickstart.index("```sh") < quickstart.index("##")
    assert len(commands) == 2
    setup, demo = commands[0].rsplit(" && ", 1)
    assert commands[1].startswith(setup + " && ")
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == commands[1]
    assert demo == ".venv/bin/bncal demo"
    result = subprocess.run(["bncal", "demo", "--out", str(workdir / "demo")], cwd=workdir, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "demo finished" in result.stdout


def _console_commands():
    out = []
    for block in _blocks("console"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                following = []
                for rest in lines[i + 1:]:
                    if rest.startswith("$ "):
                        break
                    following.append(rest)
                out.append((line[2:], following))
    return out


_NUMBER = re.compile(r"(?<!\w)(?<!\w\.)[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w])")


def _shape(lines: list[str]) -> list[str]:
    """Each line with its numbers as ``#`` and its runs of spaces as one: what stays the same
    from run to run (headers, names, words, verdicts, row counts) while measured values and
    column widths move."""
    shaped = [" ".join(_NUMBER.sub("#", line).split()) for line in lines]
    while shaped and not shaped[-1]:
        shaped.pop()
    return shaped


def test_shape_keeps_words_and_drops_numbers():
    assert _shape(["0.1    8   784000   0.03274  0.815..1.23  FAIL", "wrote x.onnx (196323 bytes) in 9.5 s", ""]) == \
        ["# # # # #..# FAIL", "wrote x.onnx (# bytes) in # s"]
    assert _shape(["layer1.0.bn1  1e-05"]) != _shape(["layer1.0.bn2  1e-05"])


def test_console_commands_run_as_documented(workdir):
    commands = _console_commands()
    assert len(commands) >= 6
    for command, documented in commands:
        result = subprocess.run(command, shell=True, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        status = [l for l in documented if l.startswith("exit status:")]
        if status:
            assert status[0] in result.stdout, command
        # The documented output is what the command prints, line for line, numbers aside.
        if documented and documented[0].strip():
            expected, actual = _shape(documented), _shape(result.stdout.splitlines())
            assert actual == expected, f"{command}: output differs from the README (tools/refresh_readme.py " \
                f"rewrites it):\n" + "\n".join(difflib.unified_diff(expected, actual, "README", "actual", lineterm=""))


def test_python_blocks_run_as_saved_scripts_from_any_directory(tmp_path):
    """Each block saved as a file in a folder outside the repository, run there as a user would:
    this environment's python, nothing of the repository on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    assert not tmp_path.resolve().is_relative_to(ROOT.resolve())
    for i, block in enumerate(_blocks("python")):
        script = tmp_path / f"readme_example_{i}.py"
        script.write_text(block)
        result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        # A comment that shows what a print prints must be true.
        for shown in re.findall(r"^print\(repr\(\w+\)\)\s+# (<.*>)$", block, flags=re.M):
            assert shown in result.stdout.splitlines(), (shown, result.stdout[-2000:])
