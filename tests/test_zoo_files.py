"""The kinds of ONNX files people deploy, through fold-export, check and recalibrate with the defaults.

Stand-ins for the ONNX model zoo and other exporters (tools/bench_zoo.py measures the real
architectures): graphs with a fixed batch size (1 and 4), logits of scale 1e4, an IR 3 graph
(every initializer also a graph input), and a model whose only BatchNorms are in training mode.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bncal.cli import main
from models import other_exporters
from tests_support import randomize_bn


def tiny_net(logit_scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    randomize_bn(net)
    with torch.no_grad():
        net[-1].weight.mul_(logit_scale)
        net[-1].bias.mul_(logit_scale)
    return net.eval()


def torchscript_export(net, batch: int, opset: int = 13, training=torch.onnx.TrainingMode.PRESERVE):
    """What the model zoo's files look like: TorchScript exporter, fixed batch, BatchNorm nodes kept."""
    return other_exporters.torchscript_file(net, torch.zeros(batch, 3, 8, 8), opset=opset, training=training)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    onnx.save(torchscript_export(tiny_net(), 1), root / "batch1.onnx")
    onnx.save(torchscript_export(tiny_net(), 4), root / "batch4.onnx")
    onnx.save(torchscript_export(tiny_net(logit_scale=3e3), 1), root / "logits1e4.onnx")
    onnx.save(other_exporters.as_ir3(torchscript_export(tiny_net(), 1, opset=9)), root / "ir3.onnx")
    train = tiny_net().train()
    onnx.save(torchscript_export(train, 4, opset=17, training=torch.onnx.TrainingMode.TRAINING), root / "train4.onnx")
    # Before opset 14 a training-mode BatchNormalization is one with more than one output.
    onnx.save(torchscript_export(train, 4, opset=13, training=torch.onnx.TrainingMode.TRAINING), root / "train4_opset13.onnx")
    np.save(root / "x.npy", np.random.default_rng(0).normal(0.5, 2.0, (48, 3, 8, 8)).astype(np.float32))
    return root


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def bn_count(path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("name, batch, extra", [
    ("batch1", 1, []), ("batch4", 4, []), ("logits1e4", 1, []), ("ir3", 1, ["--constant-initializer-inputs"]),
])
def test_fold_export_check_recalibrate_with_the_defaults(files, name, batch, extra):
    source, out = files / f"{name}.onnx", files / f"{name}.folded.onnx"
    assert bn_count(source) == 2
    # fold-export with the defaults: the model's own input shape, no latency, written, 0 BN left.
    code, output = run("fold-export", source, "-o", out, "--force", *extra)
    assert code == 0, output
    assert bn_count(out) == 0 and "0 BatchNormalization left" in output and "PASSED" in output
    assert "latency" not in output
    # --latency: sizes the fixed batch cannot take are skipped with a note, never an error.
    code, output = run("fold-export", source, "-o", out, "--force", "--latency", *extra)
    assert code == 0, output
    assert f"ORT latency batch {batch} (ms)" in output and "skipped: the model's batch size is fixed at" in output
    # --data batches of 8 are cut to the model's batch size, for the verification and the check.
    code, output = run("fold-export", source, "--data", files / "x.npy", "--batch-size", 8, "-o", out, "--force", *extra)
    assert f"batches of 8 samples were cut into batches of {batch}" in output
    assert code == 1 and "moving statistics do not match" in output  # randomised statistics: stale
    # recalibrate and check at the model's batch size.
    fixed = files / f"{name}.recalibrated.onnx"
    code, output = run("recalibrate", source, "--data", files / "x.npy", "--batch-size", batch, "-o", fixed, "--force")
    assert code == 0, output
    code, output = run("check", fixed, "--data", files / "x.npy", "--batch-size", batch)
    assert code == 0, output
    assert ("not judged" if batch == 1 else "batch spread") in output
    code, output = run("fold-export", fixed, "--data", files / "x.npy", "--batch-size", 8, "-o", out, "--force", *extra)
    assert code == 0, output


def test_large_logits_pass_by_scale_where_a_fixed_atol_would_not(files):
    from bncal.folding.export import fold_export_onnx

    model = onnx.load(files / "logits1e4.onnx")
    _, report = fold_export_onnx(model)
    (out,) = report.comparison.outputs
    assert 1e3 < out.scale < 1e5 and report.passed
    assert out.required_scale_tol < 1e-6 and out.max_abs_error == pytest.approx(out.required_scale_tol * out.scale)
    code, output = run("fold-export", files / "logits1e4.onnx", "-o", files / "strict.onnx", "--force", "--atol", "1e-7")
    assert code == 1 and "the folded model does not match the original" in output.splitlines()[-1]


def test_training_mode_only_with_data_says_there_is_nothing_to_check(files):
    out = files / "train.folded.onnx"
    code, output = run("fold-export", files / "train4.onnx", "--data", files / "x.npy", "-o", out, "--force")
    assert code == 1 and "refusing to export it: BN005 error" in output and not out.exists(), output
    code, output = run("fold-export", files / "train4.onnx", "--data", files / "x.npy", "-o", out, "--force",
                       "--allow", "BN005")
    assert code == 0, output
    assert out.exists() and bn_count(out) == 2
    assert "2 BatchNormalization left" in output and "training-mode BatchNormalization" in output
    assert "note: nothing to check" in output and "the train/inference check was skipped" in output
    assert output.strip().splitlines()[-1].startswith(f"wrote {out}")
    # check and recalibrate have nothing to do: one line that says why, exit 1, nothing written.
    reason = "already in training mode: it normalises with batch statistics and never uses moving ones"
    code, output = run("check", files / "train4.onnx", "--data", files / "x.npy", "--batch-size", 4)
    assert code == 1 and output.strip().splitlines()[-1].startswith(
        "error: the model has no inference BatchNormalization to check") and reason in output
    fixed = files / "train.recalibrated.onnx"
    code, output = run("recalibrate", files / "train4.onnx", "--data", files / "x.npy", "--batch-size", 4, "-o", fixed)
    assert code == 1 and "no inference BatchNormalization whose statistics bncal can update" in output
    assert reason in output and not fixed.exists()


def test_an_old_opset_training_graph_is_never_written_changed(files):
    """Opset 13: a BN with five outputs runs in training mode in onnxruntime even when the extra
    outputs are unused. Whatever the fold decides, verification must not let a changed model out."""
    out = files / "train13.folded.onnx"
    # BN005 (training-mode BN) is allowed: what is tested here is the verification behind the gate.
    code, output = run("fold-export", files / "train4_opset13.onnx", "-o", out, "--force", "--allow", "BN005")
    if code == 0:
        assert bn_count(out) == 2, output
    else:
        assert "the folded model does not match the original" in output.splitlines()[-1] and not out.exists()


def test_a_fixed_batch_of_one_under_a_bn1d_names_the_way_out(tmp_path):
    """Train mode cannot run a BN1d at a fixed batch of 1 (one value per channel): the error says
    what works instead, not "use batches of 2", which such a file cannot take."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    randomize_bn(net)
    source = tmp_path / "head1.onnx"
    onnx.save(torchscript_export(net.eval(), 1), source)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    code, output = run("recalibrate", source, "--data", tmp_path / "x.npy", "--mode", "train", "-o", tmp_path / "o.onnx")
    assert code == 1 and "fixed at 1: use mode 'eval'" in output.strip().splitlines()[-1]
    code, output = run("recalibrate", source, "--data", tmp_path / "x.npy", "--mode", "eval", "-o", tmp_path / "o.onnx")
    assert code == 0, output
    code, output = run("check", source, "--data", tmp_path / "x.npy")
    assert code == 1 and "check a copy exported with a dynamic or larger batch size" in output.strip().splitlines()[-1]


def test_statistics_shared_through_identity_nodes_are_folded():
    """The TorchScript exporter deduplicates equal initializers: BNs whose statistics were never
    updated read one shared tensor through Identity nodes. Those are constants: folded, and the
    Identity nodes that fed only them go too."""
    from bncal.folding.export import fold_export_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU()).eval()
    model = torchscript_export(net, 1)
    assert [n.op_type for n in model.graph.node].count("Identity") >= 4
    folded, report = fold_export_onnx(model, allow=["BN001"])  # never updated: that is what makes them shared
    assert report.passed and all(d.folded for d in report.decisions)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    onnx.checker.check_model(folded)
