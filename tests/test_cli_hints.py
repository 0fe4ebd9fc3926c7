"""Errors that say what to do: a factory name's typo, a channel count that does not fit --input-shape, a file
already folded, channels-last arrays; and no false warning for a whole pickled model."""

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from bncal.cli import main
from models import zoo

MODELS = zoo.Path(zoo.__file__).resolve().parent
STALE_ONNX = MODELS / "mnist_cnn_stale.onnx"
SPEC = f"{MODELS / 'zoo.py'}:mnist_cnn"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_a_factory_names_typo_gets_did_you_mean():
    code, _, err = run("inspect", f"{MODELS / 'zoo.py'}:mnist_cn")
    assert code == 1 and err.startswith(f"error: {MODELS / 'zoo.py'} has no attribute 'mnist_cn'")
    assert f"; did you mean {MODELS / 'zoo.py'}:mnist_cnn (or " in err and err.count("\n") == 1
    code, _, err = run("inspect", f"{MODELS / 'zoo.py'}:zzz_nothing_like_it")
    assert code == 1 and "did you mean" not in err


def test_a_channel_count_that_does_not_fit_names_input_shape_and_the_shape_to_give(tmp_path):
    for command in (["inspect"], ["fold-export", "-o", tmp_path / "f.onnx"]):
        code, _, err = run(*command, SPEC, "--weights", zoo.MNIST_STALE_CKPT, "--input-shape", "2,3,28,28")
        assert code == 1 and err.startswith("error: --input-shape 2,3,28,28: the model fails on inputs of this shape (")
        assert "the model expects 1 channel: give --input-shape 2,1,28,28" in err, err
    assert not (tmp_path / "f.onnx").exists()


def test_an_onnx_file_without_batchnorm_asks_whether_it_was_already_folded(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "folded.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32))
    for command, done in (("check", "checked"), ("recalibrate", "recalibrated")):
        extra = ["-o", tmp_path / "r.onnx"] if command == "recalibrate" else []
        code, _, err = run(command, tmp_path / "folded.onnx", "--data", tmp_path / "x.npy", *extra)
        assert code == 1 and "no BatchNormalization node at all: was it already folded" in err
        assert f"The statistics are {done} on the model before folding" in err


def test_channels_last_arrays_get_the_transpose_not_the_image_folder_hint(tmp_path):
    nhwc = tmp_path / "nhwc.npy"
    np.save(nhwc, np.random.default_rng(0).standard_normal((64, 28, 28, 1)).astype(np.float32))
    runs = [("check", STALE_ONNX, "--data", nhwc),
            ("recalibrate", SPEC, "--weights", zoo.MNIST_STALE_CKPT, "--data", nhwc, "-o", tmp_path / "r.safetensors")]
    for argv in runs:
        code, _, err = run(*argv)
        assert code == 1 and "the data looks channels-last (shape (32, 28, 28, 1), 1 channel on the last axis)" in err
        assert "save the array as x.transpose(0, 3, 1, 2)" in err and "--channels" not in err


def test_a_whole_pickled_model_is_not_called_freshly_initialised(tmp_path):
    net = zoo.mnist_cnn_stale()
    torch.save(net, tmp_path / "whole.pt")
    x, _ = zoo.mnist_arrays("calib")
    np.save(tmp_path / "x.npy", x.numpy()[:64])
    code, _, err = run("recalibrate", tmp_path / "whole.pt", "--allow-pickle", "--data", tmp_path / "x.npy",
                       "-o", tmp_path / "fixed.safetensors")
    assert code == 0, err
    assert "no --weights" not in err and "freshly initialised" not in err
    code, _, err = run("recalibrate", SPEC, "--data", tmp_path / "x.npy", "-o", tmp_path / "fresh.safetensors")
    assert code == 0 and "warning: no --weights given; recalibrating the factory's freshly initialised model" in err
