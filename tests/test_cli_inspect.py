"""`bncal inspect` from the command line, on the shipped stale model (PyTorch and ONNX)."""

import json

from click.testing import CliRunner

from bncal.cli import main
from models import zoo

MODELS = zoo.Path(zoo.__file__).resolve().parent


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_inspect_pytorch_and_onnx_find_the_same_problems(tmp_path):
    code, output = run("inspect", f"{MODELS / 'zoo.py'}:mnist_cnn", "--weights", MODELS / "mnist_cnn_stale.safetensors",
                       "--input-shape", "2,1,28,28", "--batch-size", "16", "--report-json", tmp_path / "t.json")
    assert code == 0, output
    torch_rules = {f["rule_id"] for f in json.loads((tmp_path / "t.json").read_text())["findings"]}
    assert {"BN001", "BN030", "BN040"} <= torch_rules
    code, output = run("inspect", MODELS / "mnist_cnn_stale.onnx", "--report-json", tmp_path / "o.json")
    assert code == 0, output
    onnx_report = json.loads((tmp_path / "o.json").read_text())
    assert "BN001" in {f["rule_id"] for f in onnx_report["findings"]}
    assert len(onnx_report["layers"]) == 7


def test_inspect_strict_exit_status(tmp_path):
    spec = f"{MODELS / 'zoo.py'}:mnist_cnn"
    stale = MODELS / "mnist_cnn_stale.safetensors"
    code, output = run("inspect", spec, "--weights", stale, "--strict", "error")
    assert code == 1 and "BN001 error" in output
    fixed = tmp_path / "fixed.safetensors"
    assert run("recalibrate", spec, "--weights", stale, "--data", f"{MODELS / 'zoo.py'}:calibration_batches",
               "-o", fixed, "-q")[0] == 0
    code, output = run("inspect", spec, "--weights", fixed, "--strict", "error")
    assert code == 0 and "BN001" not in output
    assert run("inspect", spec, "--weights", fixed, "--strict", "warning")[0] == 1  # BN030: dropout before BN
