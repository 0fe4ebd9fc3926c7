"""`bncal check` and ONNX `bncal recalibrate` from the command line, on the shipped stale MNIST model."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bncal.cli import main
from bncal.torch.export import export_onnx
from models import zoo

MODEL = str(zoo.Path(zoo.__file__).resolve().parent / "zoo.py") + ":mnist_cnn"
WEIGHTS = str(zoo.MNIST_STALE_CKPT)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    x, _ = zoo.mnist_arrays("calib")
    idx = np.random.default_rng(0).permutation(len(x))[:512]
    np.save(root / "calib.npy", x.numpy()[idx])
    stale = zoo.mnist_cnn_stale()
    onnx.save(export_onnx(stale, (torch.randn(2, 1, 28, 28),), keep_batchnorm=True), root / "stale.onnx")
    return root


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_stale_onnx_fails_check_and_passes_after_onnx_recalibration(files):
    code, output = run("check", files / "stale.onnx", "--data", files / "calib.npy", "--batch-size", 64)
    assert code == 1 and "FAILED" in output and "7 of 7 BatchNorm layers" in output
    out = files / "fixed.onnx"
    code, output = run("recalibrate", files / "stale.onnx", "--data", files / "calib.npy", "-o", out, "--force",
                       "--providers", "cpu")
    assert code == 0, output
    code, output = run("check", out, "--data", files / "calib.npy", "--batch-size", 64, "--report-json", files / "c.json",
                       "--plot", files / "c.png", "--providers", "CPUExecutionProvider")
    assert code == 0, output
    assert (files / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert output.strip().splitlines()[-1] == "PASSED"
    assert json.loads((files / "c.json").read_text())["check"]["passed"] is True
    # Only the statistics changed: same nodes, same names.
    a, b = onnx.load(files / "stale.onnx"), onnx.load(out)
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]


def test_stale_pytorch_fails_and_passes_after_recalibration_with_parity(files):
    code, output = run("check", MODEL, "--weights", WEIGHTS, "--data", files / "calib.npy", "--batch-size", 64)
    assert code == 1 and "PyTorch eval vs onnxruntime" in output and "FAILED" in output
    fixed = files / "fixed.safetensors"
    code, output = run("recalibrate", MODEL, "--weights", WEIGHTS, "--data", files / "calib.npy", "-o", fixed, "--force", "-q")
    assert code == 0, output
    code, output = run("check", MODEL, "--weights", fixed, "--data", files / "calib.npy", "--batch-size", 64)
    assert code == 0, output
    assert "0.1 " in output  # layers reported by their PyTorch module names


def test_onnx_and_pytorch_recalibration_agree(files):
    from safetensors.torch import load_file

    torch_out, onnx_out = files / "agree.safetensors", files / "agree.onnx"
    for model, out, extra in [(MODEL, torch_out, ["--weights", WEIGHTS]), (files / "stale.onnx", onnx_out, [])]:
        code, output = run("recalibrate", model, *extra, "--data", files / "calib.npy", "--batch-size", 50, "-o", out, "--force")
        assert code == 0, output
    state = load_file(str(torch_out))
    graph = onnx.load(onnx_out)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    bn = next(n for n in graph.graph.node if n.op_type == "BatchNormalization" and n.name == "0.1")
    np.testing.assert_allclose(values[bn.input[3]], state["0.1.running_mean"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values[bn.input[4]], state["0.1.running_var"].numpy(), rtol=1e-5)


@pytest.mark.parametrize("case", ["truncated", "garbage", "wrong-shape", "wrong-rank"])
def test_bad_onnx_inputs_one_line_and_no_output(files, tmp_path, case):
    model, data = files / "stale.onnx", files / "calib.npy"
    if case == "truncated":
        model = tmp_path / "t.onnx"
        model.write_bytes((files / "stale.onnx").read_bytes()[:5000])
    elif case == "garbage":
        model = tmp_path / "g.onnx"
        model.write_bytes(b"not an onnx model at all")
    elif case == "wrong-shape":
        data = tmp_path / "d.npy"
        np.save(data, np.zeros((8, 1, 30, 30), np.float32))
    elif case == "wrong-rank":
        data = tmp_path / "d.npy"
        np.save(data, np.zeros((8, 28, 28), np.float32))
    out = tmp_path / "out.onnx"
    for command in (["recalibrate", model, "--data", data, "-o", out], ["check", model, "--data", data]):
        code, output = run(*command)
        assert code == 1, output
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert not out.exists()


def test_a_file_with_a_fixed_batch_reads_file_data_in_that_batch_size(files):
    """A graph exported with batch 4 (as other exporters and the ONNX zoo do): without
    --batch-size, file data comes in batches of 4, the same as asking for them."""
    from onnx import numpy_helper

    model = onnx.load(files / "stale.onnx")
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 4
    fixed = files / "batch4.onnx"
    onnx.save(model, fixed)
    code, output = run("recalibrate", fixed, "--data", files / "calib.npy", "-o", files / "b4_default.onnx")
    assert code == 0 and "batches of 4" in output and "in 128 batches" in output, output
    code, output = run("recalibrate", fixed, "--data", files / "calib.npy", "--batch-size", 4, "-o",
                       files / "b4_given.onnx")
    assert code == 0, output
    default, given = (onnx.load(files / f"b4_{k}.onnx").graph.initializer for k in ("default", "given"))
    for a, b in zip(default, given):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    code, output = run("check", files / "b4_default.onnx", "--data", files / "calib.npy")
    assert code == 0 and "PASSED" in output and "(128 batches, 512 samples)" in output, output
    code, output = run("check", fixed, "--data", files / "calib.npy", "--batch-size", 32)
    assert code == 1 and "expected shape (4, 1, 28, 28)" in output and "--batch-size 4" in output, output


def test_a_factory_spec_without_weights_is_blamed_as_freshly_initialised(files):
    code, output = run("check", MODEL, "--data", files / "calib.npy", "--batch-size", 64, "--max-samples", 256)
    assert code == 1 and "freshly initialised" in output
    (failed,) = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert failed.startswith("FAILED") and "likely cause: the freshly initialised model" in failed
    assert "recalibrate them" not in failed


def test_input_off_at_the_first_bn_only_is_blamed_on_preprocessing(files):
    import bncal

    x = np.load(files / "calib.npy")[:256]
    model = zoo.mnist_cnn_stale()
    bncal.recalibrate(model, [torch.from_numpy(x[i:i + 64]) for i in range(0, len(x), 64)], mode="eval")
    onnx.save(export_onnx(model, (torch.randn(2, 1, 28, 28),), keep_batchnorm=True), files / "fixed_eval.onnx")
    np.save(files / "unscaled.npy", x * 255)  # pixels 0..255: the /255 of training left out
    code, output = run("check", files / "fixed_eval.onnx", "--data", files / "unscaled.npy", "--batch-size", 64)
    (failed,) = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert code == 1 and failed.startswith("FAILED: 1 of 7 BatchNorm layers"), output
    assert "preprocessed" in failed and "--mean/--std" in failed and "NHWC vs NCHW" in failed
    assert "recalibrate them" not in failed


def test_a_spec_with_renorm_layers_is_checked_in_pytorch(files, tmp_path):
    (tmp_path / "renorm_net.py").write_text(
        "import torch\nfrom bncal.torch.nn import BatchRenorm2d\n\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), BatchRenorm2d(4), torch.nn.ReLU(),\n"
        "                               torch.nn.Conv2d(4, 4, 3), BatchRenorm2d(4), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(4 * 24 * 24, 10))\n")
    code, output = run("check", f"{tmp_path / 'renorm_net.py'}:net", "--data", files / "calib.npy", "--batch-size", 64,
                       "--max-samples", 256)
    assert "checked in PyTorch, not in onnxruntime" in output and "PyTorch eval vs onnxruntime" not in output
    # Never trained: its warm-up bounds r = 1, d = 0 make it plain BN, freshly initialised, and blamed as such.
    (failed,) = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert code == 1 and "likely cause: the freshly initialised model" in failed
