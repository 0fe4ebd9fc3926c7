"""The CLI's shape: option groups shared by every command, -v/-q anywhere, one name per meaning."""

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from bncal.cli import main
from models import zoo

MODELS = zoo.Path(zoo.__file__).resolve().parent
STALE_ONNX = MODELS / "mnist_cnn_stale.onnx"
SPEC = f"{MODELS / 'zoo.py'}:mnist_cnn"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_every_option_of_every_command_has_help():
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{name} {param.opts}"
    assert all(p.help for p in main.params if isinstance(p, click.Option))


@pytest.mark.parametrize("command", ["recalibrate", "check", "fold-export", "inspect", "demo"])
def test_verbosity_and_force_on_every_command(command):
    opts = {o for p in main.commands[command].params if isinstance(p, click.Option) for o in p.opts}
    assert {"-v", "--verbose", "-q", "--quiet", "--force"} <= opts


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_subcommand(where):
    args = ["inspect", STALE_ONNX]
    result = CliRunner().invoke(main, [str(a) for a in (["-q", *args] if where == "before" else [*args, "-q"])])
    # BN001 (an error) fails inspect; -q leaves no report, only the verdict line on stderr.
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "FAILED: onnx model, 7 BN layers: 1 error (BN001); worst BN001 error: moving statistics never updated "
        "(0.1, 0.4 and 5 more)"]
    code, output = run(*args)
    assert code == 1 and output.startswith("layer")


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_subcommand(tmp_path, where):
    args = ["inspect", SPEC, "--weights", tmp_path / "missing.safetensors"]
    code, output = run(*args)
    assert code == 1 and "Traceback" not in output and "does not exist" in output
    code, output = run(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert code == 1 and "Traceback" in output and output.strip().splitlines()[-1].startswith("error: ")


def test_quiet_commands_still_say_their_verdict_on_stderr(tmp_path):
    """-q: nothing on stdout, one verdict line on stderr naming the worst item; the same line ends the report."""
    data = f"{MODELS / 'zoo.py'}:heldout_batches"
    quiet = CliRunner().invoke(main, ["check", str(STALE_ONNX), "--data", data, "-q"])
    assert quiet.exit_code == 1 and quiet.stdout == ""
    [line] = quiet.stderr.splitlines()
    assert line.startswith("FAILED: 7 of 7 BatchNorm layers have moving statistics off their data (worst 1.3: ")
    assert "output differs between inference and train mode" in line and "output output" not in line
    loud = CliRunner().invoke(main, ["check", str(STALE_ONNX), "--data", data])
    assert loud.stdout.strip().splitlines()[-1] == line and quiet.stderr.strip() not in loud.stderr
    folded = tmp_path / "folded.onnx"
    quiet = CliRunner().invoke(main, ["fold-export", str(STALE_ONNX), "-o", str(folded), "--input-shape", "2,1,28,28",
                                      "--allow", "BN001", "-q"])
    assert quiet.exit_code == 0 and quiet.stdout == "" and folded.exists()
    [line] = quiet.stderr.splitlines()
    assert line.startswith(f"PASSED: folded 7 of 7 BN layers, 0 BatchNormalization left -> {folded}; worst output")
    assert "of its scale (tolerance |actual - reference| <= 0.0001 * max|reference|)" in line


def test_fold_export_reports_the_elapsed_time_of_the_whole_run(tmp_path, monkeypatch):
    """'wrote ... in X s' counts loading too (slowed here by a known 0.6 s), not the fold-export step alone."""
    import re
    import time

    import bncal.loading

    real = bncal.loading.load_any
    monkeypatch.setattr(bncal.loading, "load_any", lambda *a, **k: (time.sleep(0.6), real(*a, **k))[1])
    folded = tmp_path / "folded.onnx"
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["fold-export", str(STALE_ONNX), "-o", str(folded), "--input-shape", "2,1,28,28",
                                       "--allow", "BN001"])
    wall = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    seconds = float(re.fullmatch(rf"wrote {re.escape(str(folded))} \(\d+ bytes\) in ([0-9.]+) s",
                                 result.stdout.strip().splitlines()[-1]).group(1))
    assert 0.6 <= seconds <= wall + 0.01


def test_inspect_train_batch_size_and_its_deprecated_alias(tmp_path):
    reports = {}
    for option in ("--train-batch-size", "--batch-size"):
        out = tmp_path / f"{option.strip('-')}.json"
        code, output = run("inspect", STALE_ONNX, option, 16, "--dataset-size", 4000, "--report-json", out)
        assert code == 1, output  # BN001
        assert ("deprecated" in output) == (option == "--batch-size")
        reports[option] = json.loads(out.read_text())
        assert reports[option].pop("argv")[3] == option
    assert reports["--train-batch-size"] == reports["--batch-size"]
    assert "BN040" in {f["rule_id"] for f in reports["--train-batch-size"]["findings"]}  # batch 16: renormalisation
    assert "--batch-size" not in run("inspect", "--help")[1]
    code, output = run("inspect", STALE_ONNX, "--batch-size", 16, "--train-batch-size", 32)
    assert code == 2 and "disagree" in output


def test_the_model_kind_is_decided_once_in_the_library(tmp_path):
    from bncal.loading import load_any, model_kind

    assert model_kind(STALE_ONNX).name == "onnx" and model_kind(SPEC).name == "torch"
    loaded = load_any(STALE_ONNX)
    assert loaded.kind == "onnx" and loaded.files == (STALE_ONNX,) and loaded.model.graph.node
    loaded = load_any(SPEC, weights=MODELS / "mnist_cnn_stale.safetensors")
    assert loaded.kind == "torch" and loaded.files == (MODELS / "zoo.py", MODELS / "mnist_cnn_stale.safetensors")


@pytest.mark.parametrize("command", [[], ["recalibrate"], ["check"], ["fold-export"], ["inspect"], ["demo"]])
def test_help_is_fast_and_imports_neither_torch_nor_onnx(command):
    code = ("import sys; from bncal.cli import main\ntry:\n    main(%r + ['--help'])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'onnx' in sys.modules, 'onnxruntime' in sys.modules)" % command)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("False False False"), result.stdout + result.stderr


def test_python_dash_m_bncal():
    result = subprocess.run([sys.executable, "-m", "bncal", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "fold-export" in result.stdout


def test_onnx_commands_run_without_torch(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32))
    script = ("import sys; sys.modules['torch'] = None  # any 'import torch' now fails\n"
              "from bncal.cli import main\n"
              "main(sys.argv[1:], prog_name='bncal')\n")
    for argv in (["recalibrate", STALE_ONNX, "--data", tmp_path / "x.npy", "-o", tmp_path / "r.onnx"],
                 ["fold-export", tmp_path / "r.onnx", "--data", tmp_path / "x.npy", "-o", tmp_path / "f.onnx"]):
        result = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "f.onnx").exists()
