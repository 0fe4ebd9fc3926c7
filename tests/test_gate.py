"""The deployment gate: known BatchNorm failures refused, no PASSED on NaN, the accuracy guard, assert_deployable."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import bncal
from bncal import check_onnx
from bncal.data import load_labelled_data
from bncal.errors import DeploymentError
from bncal.folding.export import fold_export_onnx
from models import zoo
from test_cli_check import run

MODELS = Path(zoo.__file__).resolve().parent
STALE_SPEC = [f"{MODELS}/zoo.py:mnist_cnn", "--weights", str(MODELS / "mnist_cnn_stale.safetensors")]
STALE_ONNX = MODELS / "mnist_cnn_stale.onnx"


def _conv_bn(var=(1.0, 0.5, 2.0), weight_nan=False, training_bn=False):
    """x (N, 2, 4, 4) -> Conv 1x1 -> BatchNormalization (3 channels) [-> a training-mode BN]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    if weight_nan:
        w[0, 0, 0, 0] = np.nan
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(3, np.float32), "s"),
             numpy_helper.from_array(np.full(3, 0.1, np.float32), "b"),
             numpy_helper.from_array(np.full(3, 0.2, np.float32), "m"),
             numpy_helper.from_array(np.asarray(var, np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y" if not training_bn else "h"], name="bn")]
    if training_bn:
        nodes.append(helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn_train",
                                      training_mode=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Held-out digits as a guard set (.npz with labels) and a data function of inverted digits
    (another distribution)."""
    d = tmp_path_factory.mktemp("gate")
    x, y = zoo.mnist_arrays("test")
    np.savez(d / "heldout.npz", images=x.numpy(), labels=y.numpy())
    (d / "other.py").write_text("from models import zoo\n\n\ndef inverted():\n"
                                "    return [-b for b in zoo.calibration_batches()]\n")
    return d


def test_the_stale_shipped_model_is_refused_by_fold_export_unless_allowed(tmp_path):
    out = tmp_path / "m.onnx"
    for model in (STALE_SPEC + ["--input-shape", "2,1,28,28"], [str(STALE_ONNX)]):
        code, output = run("fold-export", *model, "-o", out)
        last = output.strip().splitlines()[-1]
        assert code == 1 and last.startswith("error: refusing to export it: BN001 error, moving statistics never "
                                             "updated: 7 of 7 BN layers still hold the initial statistics"), output
        assert "fix: estimate the statistics on training data" in last and "--allow BN001" in last
        assert not out.exists() and list(tmp_path.iterdir()) == []
    for model in (STALE_SPEC + ["--input-shape", "2,1,28,28"], [str(STALE_ONNX)]):
        code, output = run("fold-export", *model, "-o", out, "--allow", "BN001", "--force")
        assert code == 0 and out.exists() and "note: BN001 allowed: moving statistics never updated" in output, output
    # The library refuses the same way, and accepts the same keyword.
    with pytest.raises(DeploymentError, match="BN001") as caught:
        fold_export_onnx(onnx.load(STALE_ONNX))
    assert caught.value.report.inspect.by_rule("BN001")
    _, report = fold_export_onnx(onnx.load(STALE_ONNX), allow="BN001")
    assert report.passed and any(n.startswith("BN001 allowed") for n in report.notes)


def test_a_negative_variance_is_refused_and_nan_outputs_never_pass(tmp_path):
    negative, nan_weights = tmp_path / "negative.onnx", tmp_path / "nan.onnx"
    onnx.save(_conv_bn(var=(1.0, -0.5, 2.0)), negative)
    onnx.save(_conv_bn(weight_nan=True), nan_weights)
    out = tmp_path / "out.onnx"
    code, output = run("fold-export", negative, "-o", out)
    assert code == 1 and "error: refusing to export it: BN002 error, degenerate moving statistics" in output, output
    assert "--allow BN002" in output and not out.exists()
    # Accepted, the variance makes NaN on both sides: the comparison fails on them, it does not match them.
    for model, allow in ((negative, ["--allow", "BN002"]), (nan_weights, [])):
        code, output = run("fold-export", model, "-o", out, *allow)
        last = output.strip().splitlines()[-1]
        assert code == 1 and "FAILED" in output and "PASSED" not in output, output
        assert "output y: non-finite values (reference: " in last and "elements non-finite" in last, last
        assert not out.exists()
    # The check names the non-finite values too, by output and count, and the layer whose input they reach.
    feeds = [{"x": np.random.default_rng(i).standard_normal((8, 2, 4, 4)).astype(np.float32)} for i in range(2)]
    report = check_onnx(_conv_bn(weight_nan=True), feeds)
    assert not report.passed and report.verdict == "FAILED"
    assert any(r.startswith("output y holds non-finite values (inference mode: 256 of 768 elements non-finite "
                            "(256 NaN, 0 inf)") for r in report.reasons), report.reasons
    assert any("non-finite or negative statistics (bn: the data reaching it" in r for r in report.reasons)
    with pytest.raises(DeploymentError, match=r"^not deployable: check FAILED: 1 of 1 BatchNorm layers have non-finite"):
        bncal.assert_deployable(_conv_bn(weight_nan=True), data=feeds)


def test_recalibrate_repairs_never_updated_statistics_but_not_a_training_mode_bn(tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 2, 4, 4)).astype(np.float32))
    model = tmp_path / "m.onnx"
    onnx.save(_conv_bn(var=(1.0, 1.0, 1.0), training_bn=True), model)
    out = tmp_path / "fixed.onnx"
    code, output = run("recalibrate", model, "--data", data, "-o", out)
    assert code == 1 and "error: refusing to write it: BN005 error" in output and not out.exists(), output
    code, output = run("recalibrate", model, "--data", data, "-o", out, "--allow", "BN005")
    assert code == 0 and out.exists() and "BN005 allowed" in output, output


def test_the_guard_accepts_a_repaired_model_and_refuses_one_that_got_worse(shipped, tmp_path):
    guard = ["--guard", shipped / "heldout.npz"]
    fixed = tmp_path / "fixed.onnx"
    code, output = run("recalibrate", STALE_ONNX, "--data", f"{MODELS}/zoo.py:calibration_batches", "-o", fixed, *guard)
    assert code == 0 and fixed.exists(), output
    assert "before            10.00 %" in output and "after             97.70 %  judged" in output
    assert "PASSED: top-1 97.70 % (after) vs 97.30 % (batch statistics), tolerance 0.5 points (1000 samples)" in output
    worse = tmp_path / "worse.onnx"
    other = ["--data", f"{shipped}/other.py:inverted"]
    code, output = run("recalibrate", fixed, *other, "-o", worse, *guard)
    last = output.strip().splitlines()[-1]
    assert code == 1 and not worse.exists(), output
    assert last.startswith("error: accuracy guard: top-1 65.50 % (after) is 32.20 points below 97.70 % (before)"), last
    code, output = run("recalibrate", fixed, *other, "-o", worse, *guard, "--guard-tol", "40")
    assert code == 0 and worse.exists(), output
    # fold-export: the worse model is refused against its own batch statistics, the repaired one passes.
    out = tmp_path / "out.onnx"
    code, output = run("fold-export", worse, "-o", out, *guard)
    assert code == 1 and not out.exists(), output
    assert "error: accuracy guard: top-1 65.50 % (onnxruntime) is 31.80 points below 97.30 % (batch statistics)" in output
    code, output = run("fold-export", fixed, "-o", out, *guard)
    assert code == 0 and out.exists() and "PASSED: top-1 97.70 % (onnxruntime) vs 97.70 % (before)" in output, output


# In-memory (images, labels) batches of 250 held-out digits: PyTorch runs them in 4 calls.
GUARD_BATCHES = list(zoo.mnist_batches("test", batch_size=250))
BATCH_STATS_250 = 0.979  # the shipped model's held-out top-1 with the statistics of these batches


def test_assert_deployable_fails_on_the_shipped_example_until_it_is_recalibrated():
    model = bncal.load_model(f"{MODELS}/zoo.py:mnist_cnn", weights=MODELS / "mnist_cnn_stale.safetensors")
    heldout = zoo.heldout_batches(batch_size=100)[:4]
    with pytest.raises(DeploymentError) as caught:
        bncal.assert_deployable(model, guard=GUARD_BATCHES)
    report = caught.value.report
    assert isinstance(caught.value, bncal.BncalError) and not report.passed and report.check is None
    assert report.inspect.by_rule("BN001") and not report.guard.passed and report.guard.scores["inference"] == 0.1
    assert len(report.reasons) == 2 and report.reasons[0].startswith("refusing to pass it as deployable: BN001")
    bncal.recalibrate(model, zoo.calibration_batches())
    report = bncal.assert_deployable(model, data=heldout, guard=GUARD_BATCHES)
    assert report.passed and report.check.passed and report.guard.scores["inference"] == pytest.approx(0.977)


def test_labelled_data_from_class_folders_and_npz(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4), 60 * label + i, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    batches = list(load_labelled_data(tmp_path / "imgs", shuffle=False, batch_size=3))
    assert [b[1].tolist() for b in batches] == [[0, 0, 1], [1]] and batches[0][0].shape == (3, 3, 4, 4)
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2), np.float32), labels=np.arange(5, dtype=np.uint8), idx=np.arange(3))
    (x, labels), = load_labelled_data(tmp_path / "d.npz", normalize=False, batch_size=8, shuffle=False)
    assert x.shape == (5, 2) and labels.tolist() == [0, 1, 2, 3, 4] and labels.dtype == np.int64
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((5, 2)))
    with pytest.raises(bncal.BncalError, match="holds no 'labels' array"):
        load_labelled_data(tmp_path / "nolabels.npz")
    with pytest.raises(bncal.BncalError, match="is not in a class subfolder"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "loose.png")
        load_labelled_data(tmp_path / "imgs")


def test_library_recalibrate_with_a_guard_puts_the_statistics_back_when_the_model_got_worse():
    model = zoo.mnist_cnn_stale()
    report = bncal.recalibrate(model, zoo.calibration_batches(), guard=GUARD_BATCHES)
    assert report.guard.passed and report.guard.scores == pytest.approx(
        {"before": 0.100, "batch statistics": BATCH_STATS_250, "after": 0.977})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeploymentError, match=r"accuracy guard: top-1 65\.\d0 % \(after\)") as caught:
        bncal.recalibrate(model, [-b for b in zoo.calibration_batches()], guard=GUARD_BATCHES)
    guard = caught.value.report.guard
    assert not guard.passed and guard.baseline == "batch statistics" and guard.scores["before"] == pytest.approx(0.977)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing changed
