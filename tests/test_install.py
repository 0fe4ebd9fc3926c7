"""Install by need: the base package serves ONNX files without torch; a missing extra is named in one line.

``test_base_install_serves_onnx_without_torch`` builds this checkout's wheel, installs it into a
fresh venv with pip (the constraints file, no extras: pip may need the network) and runs there
the README's console blocks marked for the base install (ONNX recalibrate, check and fold-export
on the shipped ``.npz`` digits), exactly as written. The other tests run in this environment and check what is imported.
"""

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from tests_support import ROOT

MODELS = ROOT / "models"
STALE_ONNX = MODELS / "mnist_cnn_stale.onnx"
OPTIONAL = ("torch", "onnxscript", "safetensors", "PIL", "matplotlib")
# pip's words when it cannot reach an index (no network here): the test is skipped, not failed.
_OFFLINE = ("No matching distribution found", "Could not find a version", "NewConnectionError",
            "Network is unreachable", "Temporary failure in name resolution", "ConnectionError",
            "Max retries exceeded", "ReadTimeoutError")


def _mnist_npy(folder: Path) -> tuple[Path, Path]:
    """Calibration and held-out digits as float32 .npy files, normalised as models/zoo.py does, shuffled."""
    from models import zoo

    npz = np.load(zoo.MNIST_NPZ)
    images = (npz["images"].astype(np.float32) / 255 - zoo.MNIST_MEAN) / zoo.MNIST_STD
    rng = np.random.default_rng(0)
    paths = []
    for name, index in (("calib", npz["calib_idx"]), ("test", npz["test_idx"])):
        path = folder / f"{name}.npy"
        np.save(path, images[rng.permutation(index)])
        paths.append(path)
    return paths[0], paths[1]


def _base_install_commands() -> list[tuple[str, list[str]]]:
    """``(command, documented output lines)`` of each README console block marked for the base install."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- base install: tests/test_install.py runs the next block without torch -->\n"
                        r"```console\n(.*?)```", readme, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands:
                commands[-1][1].append(line)
    return commands


def _run(argv, **kwargs):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)


def test_base_install_serves_onnx_without_torch(tmp_path):
    # The wheel, built from a copy of the sources with this environment's setuptools (nothing downloaded).
    source = tmp_path / "src"
    shutil.copytree(ROOT / "bncal", source / "bncal", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", source,
                  "-w", tmp_path / "wheel"])
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("bncal-*.whl"))

    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    installed = _run([python, "-m", "pip", "install", "-q", "-c", ROOT / "tools" / "constraints.txt", wheel])
    if installed.returncode != 0 and any(word in installed.stderr for word in _OFFLINE):
        pytest.skip(f"pip cannot reach a package index: {installed.stderr.strip().splitlines()[-1]}")
    assert installed.returncode == 0, installed.stderr[-3000:]
    absent = _run([python, "-c", f"import importlib.util as u; print([m for m in {OPTIONAL!r} if u.find_spec(m)])"])
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr  # the base install brought no extra

    # Exactly the README's base-install commands, with this venv's bncal first on PATH.
    bncal = bin_dir / "bncal"
    work = tmp_path / "work"
    work.mkdir()
    (work / "models").symlink_to(MODELS, target_is_directory=True)
    env = {**os.environ, "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("PYTHONPATH", None)
    commands = _base_install_commands()
    assert len(commands) >= 4 and all("zoo.py" not in command for command, _ in commands)
    for command, documented in commands:
        result = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        status = [line for line in documented if line.startswith("exit status:")]
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        if status:
            assert status[0] in result.stdout, command
        if documented:
            assert result.stdout.splitlines()[0].split() == documented[0].split(), command
            assert result.stdout.split()[-1] == documented[-1].split()[-1], command  # the verdict (or exit status)
    fixed, test = work / "mnist_cnn_fixed.onnx", MODELS / "mnist_heldout.npz"

    # What needs an extra says which, in one line.
    result = _run([bncal, "inspect", f"{MODELS / 'zoo.py'}:mnist_cnn"], cwd=work)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: " + f"{MODELS / 'zoo.py'}:mnist_cnn (a PyTorch model) needs PyTorch: "
                                     "pip install 'bncal[torch]'")
    result = _run([bncal, "check", fixed, "--data", test, "--normalize", "--preset", "mnist", "--plot", work / "p.png"],
                  cwd=work)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --plot needs matplotlib: pip install 'bncal[plot]'"
    # bncal.recalibrate itself imports without torch (it hands Keras models over); a PyTorch model needs it.
    result = _run([python, "-c", "import bncal; bncal.recalibrate(object(), [])"], cwd=work)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "bncal.extras.MissingExtra: recalibrating a PyTorch model needs PyTorch: pip install 'bncal[torch]'")
    assert sorted(p.name for p in work.iterdir()) == ["mnist_cnn_fixed.onnx", "mnist_cnn_fixed_folded.onnx", "models"]


_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nIMPORTED " + " ".join(m for m in %r if m in sys.modules) + "\\n"))
if sys.argv[1:] == ["import"]:
    import bncal
else:
    from bncal.cli import main
    main(sys.argv[1:], prog_name="bncal")
"""


def _imported(argv) -> tuple[int, set[str], str]:
    result = _run([sys.executable, "-c", _PROBE % (OPTIONAL,), *argv], cwd=ROOT)
    line = [l for l in result.stderr.splitlines() if l.startswith("IMPORTED")][-1]
    return result.returncode, set(line.split()[1:]), result.stdout + result.stderr


def test_import_help_and_every_onnx_command_leave_the_extras_alone(tmp_path):
    """With every extra installed: ``import bncal``, ``--help`` and the ONNX commands import none of them."""
    calib, test = _mnist_npy(tmp_path)
    fixed, folded = tmp_path / "fixed.onnx", tmp_path / "folded.onnx"
    runs = [
        (["import"], 0),
        (["--help"], 0),
        (["inspect", STALE_ONNX, "--report-json", tmp_path / "i.json"], 1),  # BN001: an error
        (["recalibrate", STALE_ONNX, "--data", calib, "-o", fixed, "--report-json", tmp_path / "r.json"], 0),
        (["check", fixed, "--data", test, "--report-json", tmp_path / "c.json"], 0),
        (["fold-export", fixed, "--data", test, "-o", folded, "--report-json", tmp_path / "f.json"], 0),
    ]
    for argv, status in runs:
        code, imported, output = _imported(argv)
        assert code == status, f"{argv}\n{output[-2000:]}"
        assert imported == set(), f"{argv} imported {imported}"
    assert folded.exists()


def test_missing_extras_are_named_in_one_line(tmp_path):
    """torch hidden (sys.modules['torch'] = None): PyTorch specs, the demo and the library name the extra."""
    script = ("import sys; sys.modules['torch'] = None  # any 'import torch' now fails\n"
              "from bncal.cli import main\nmain(sys.argv[1:], prog_name='bncal')\n")
    spec = f"{MODELS / 'zoo.py'}:mnist_cnn"
    cases = [
        (["inspect", spec], f"error: {spec} (a PyTorch model) needs PyTorch: pip install 'bncal[torch]'"),
        (["check", STALE_ONNX, "--data", f"{MODELS / 'zoo.py'}:heldout_batches"],  # the data file imports torch
         "error: this needs PyTorch: pip install 'bncal[torch]'"),
        (["demo", "--out", tmp_path / "demo"], "error: this needs PyTorch: pip install 'bncal[torch]'"),
    ]
    for argv, line in cases:
        result = _run([sys.executable, "-c", script, *argv], cwd=ROOT)
        assert result.returncode == 1 and result.stderr.strip() == line, f"{argv}\n{result.stderr[-2000:]}"
    library = _run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\nimport bncal\n"
                    "try:\n    bncal.fold\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)"], cwd=ROOT)
    assert library.stdout.strip() == "MissingExtra bncal.fold needs PyTorch: pip install 'bncal[torch]'"


def test_extras_table_matches_pyproject():
    """Every extra bncal.extras names exists in pyproject.toml, and installs the module it is named for."""
    import tomllib

    from bncal.extras import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (_, extra) in EXTRAS.items():
        if extra == "keras" and "keras" not in extras:  # added with bncal/keras/
            continue
        wanted = {"PIL": "pillow"}.get(module, module)
        assert any(re.match(rf"{wanted}\b", req) for req in extras[extra]), (module, extra, extras[extra])
    # dev (the test suite) pulls every extra but TensorFlow, whose tests skip without it.
    own = [req for req in extras["dev"] if req.startswith("bncal[")]
    assert len(own) == 1 and set(own[0][6:-1].split(",")) >= set(extras) - {"dev", "all", "tf"}
