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
    assert code == 1, output  # BN001 is an error: inspect fails by default (and still writes its report)
    torch_rules = {f["rule_id"] for f in json.loads((tmp_path / "t.json").read_text())["findings"]}
    assert {"BN001", "BN030", "BN040"} <= torch_rules
    code, output = run("inspect", MODELS / "mnist_cnn_stale.onnx", "--report-json", tmp_path / "o.json")
    assert code == 1, output
    onnx_report = json.loads((tmp_path / "o.json").read_text())
    assert "BN001" in {f["rule_id"] for f in onnx_report["findings"]}
    assert len(onnx_report["layers"]) == 7


def test_inspect_exit_status_errors_by_default_strict_for_warnings(tmp_path):
    spec = f"{MODELS / 'zoo.py'}:mnist_cnn"
    stale = MODELS / "mnist_cnn_stale.safetensors"
    for strict in ([], ["--strict", "error"]):
        code, output = run("inspect", spec, "--weights", stale, *strict)
        assert code == 1 and "BN001 error" in output
    fixed = tmp_path / "fixed.safetensors"
    assert run("recalibrate", spec, "--weights", stale, "--data", f"{MODELS / 'zoo.py'}:calibration_batches",
               "-o", fixed, "-q")[0] == 0
    for strict in ([], ["--strict", "error"]):
        code, output = run("inspect", spec, "--weights", fixed, *strict)
        assert code == 0 and "BN001" not in output and "BN030 warning" in output
    assert run("inspect", spec, "--weights", fixed, "--strict", "warning")[0] == 1  # BN030: dropout before BN


def test_momentum_zero_signal_in_table_evidence_and_json(tmp_path):
    """Statistics at their initial values although num_batches_tracked is 131: training ran at momentum 0."""
    import torch

    from bncal.torch.loading import save_state_dict

    net = zoo.mnist_cnn()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    net.train()
    with torch.no_grad():
        for _ in range(131):
            net(torch.randn(4, 1, 28, 28))
    net[0][1].num_batches_tracked.zero_()  # one layer whose counter was reset: no signal there
    save_state_dict(net, tmp_path / "frozen.safetensors")
    code, output = run("inspect", f"{MODELS / 'zoo.py'}:mnist_cnn", "--weights", tmp_path / "frozen.safetensors",
                       "--report-json", tmp_path / "r.json")
    assert code == 1
    assert "never updated (131 batches tracked)" in output
    assert "counted 131 training batches (num_batches_tracked) without moving their statistics" in output
    layers = {l["name"]: l for l in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert layers["0.4"]["num_batches_tracked"] == 131 and layers["0.4"]["momentum_zero_signal"] is True
    assert layers["0.1"]["num_batches_tracked"] == 0 and layers["0.1"]["momentum_zero_signal"] is False
    assert all(l["stats"] == "never updated" for l in layers.values())


def test_report_json_carries_version_command_and_argv(tmp_path):
    import bncal
    from bncal.report import JSON_SCHEMA_VERSION

    argv = ["inspect", str(MODELS / "mnist_cnn_stale.onnx"), "--report-json", str(tmp_path / "r.json")]
    assert run(*argv)[0] == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bncal_version"] == bncal.__version__ and report["schema_version"] == JSON_SCHEMA_VERSION == 2
    assert report["command"] == "inspect" and report["argv"] == ["bncal", *argv]
    assert list(report)[:4] == ["bncal_version", "schema_version", "command", "argv"] and "findings" in report
