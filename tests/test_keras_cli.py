"""Keras models through the CLI (inspect, check, recalibrate -o OUT.keras), the factory hand-over,
the library hand-over, image folders in the model's layout, and Keras's own ONNX export: a
stranger's file whose BNs are lowered to arithmetic.

Expected statistics come from bncal.keras.recalibrate on the same arrays (itself tested against
float64 references in tests/test_keras.py) and from the layers' own variables; Keras runs on
the torch backend (set before keras is imported).
"""

import json
import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
from click.testing import CliRunner  # noqa: E402
from keras import layers  # noqa: E402

import bncal  # noqa: E402
import bncal.keras as bk  # noqa: E402
from bncal.calibration import DataOrder  # noqa: E402
from bncal.cli import main  # noqa: E402
from bncal.errors import BncalError  # noqa: E402
from bncal.loading import load_any, model_kind  # noqa: E402
from tests_support import ROOT  # noqa: E402

assert keras.backend.backend() == "torch"

FACTORY_SOURCE = """
import keras
from keras import layers

def make(width=4):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 2)), layers.Conv2D(width, 3, padding="same", use_bias=False),
                             layers.BatchNormalization(), layers.ReLU(), layers.Flatten(), layers.Dense(5),
                             layers.BatchNormalization(), layers.Dense(3)])

def channels_first():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((1, 6, 6)), layers.Conv2D(3, 3, data_format="channels_first"),
                             layers.BatchNormalization(axis=1), layers.Flatten(), layers.Dense(2)])
"""


def _np(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def _stats(model):
    return [(_np(bn.moving_mean), _np(bn.moving_variance)) for _, bn in bk.batchnorm_layers(model)]


def _stale(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, bn in bk.batchnorm_layers(model):
        c = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.uniform(-2, 2, c).astype("float32"))
        bn.moving_variance.assign(rng.uniform(3, 6, c).astype("float32"))
    return model


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def project(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY_SOURCE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_test_keras_nets", tmp_path / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    model = _stale(nets.make())
    model.save(tmp_path / "stale.keras")
    model.save_weights(tmp_path / "stale.weights.h5")
    x = (np.random.default_rng(1).standard_normal((40, 6, 6, 2)) * 1.5 + 0.5).astype("float32")
    np.save(tmp_path / "data.npy", x)
    return tmp_path, nets, x


def _assert_stats_equal(actual, expected):
    assert len(actual) == len(expected)
    for (mean_a, var_a), (mean_e, var_e) in zip(actual, expected):
        np.testing.assert_allclose(mean_a, mean_e, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(var_a, var_e, rtol=1e-6, atol=1e-9)


def test_recalibrate_keras_file_writes_keras_and_leaves_the_input_alone(project):
    path, nets, x = project
    stale = path / "stale.keras"
    before = stale.read_bytes()
    out = path / "fixed.keras"
    code, output = run("recalibrate", stale, "--data", path / "data.npy", "--batch-size", 8, "--mode", "eval",
                       "-o", out, "--report-json", path / "report.json")
    assert code == 0, output
    assert "recalibrated 2 BatchNorm layers from 40 samples in 5 batches" in output and f"wrote {out}" in output
    assert stale.read_bytes() == before
    expected = bk.load_model(stale)
    bk.recalibrate(expected, x, batch_size=8, mode="eval")
    _assert_stats_equal(_stats(bk.load_model(out)), _stats(expected))
    assert json.loads((path / "report.json").read_text())["mode"] == "eval"
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".bncal")) == []


@pytest.mark.parametrize("case", ["same-as-input", "exists", "suffix", "nan", "pickle-only-weights"])
def test_recalibrate_refusals_write_nothing(project, case):
    path, _, x = project
    stale = path / "stale.keras"
    out = path / "fixed.keras"
    args = ["recalibrate", stale, "--data", path / "data.npy", "-o", out]
    expected_code, expected = 1, None
    if case == "same-as-input":
        args[-1] = stale
        expected = "also an input"
    elif case == "exists":
        out.write_bytes(b"keep me")
        expected = "--force"
    elif case == "suffix":
        args[-1] = path / "fixed.safetensors"
        expected_code, expected = 2, "give -o OUT.keras"
    elif case == "nan":
        bad = x.copy()
        bad[3, 0, 0, 0] = np.nan
        np.save(path / "bad.npy", bad)
        args[3] = path / "bad.npy"
        expected = "NaN or Inf"
    else:
        args += ["--weights", path / "stale.weights.h5"]
        expected = "holds its weights"
    before = stale.read_bytes()
    code, output = run(*args)
    assert code == expected_code, output
    assert expected in output, output
    if expected_code == 1:
        assert output.startswith("error: ") and output.strip().count("\n") == 0, output
    assert stale.read_bytes() == before
    assert out.exists() == (case == "exists") and (case != "exists" or out.read_bytes() == b"keep me")
    assert not (path / "fixed.safetensors").exists()
    assert [p.name for p in path.iterdir() if p.name.startswith(".bncal")] == []


def test_check_and_inspect_a_keras_file(project):
    path, _, x = project
    code, output = run("check", path / "stale.keras", "--data", path / "data.npy", "--batch-size", 20,
                       "--report-json", path / "stale.json")
    assert code == 1 and "FAILED: 2 of 2 BatchNorm layers" in output, output
    code, output = run("recalibrate", path / "stale.keras", "--data", path / "data.npy", "--batch-size", 8,
                       "--mode", "eval", "-o", path / "fixed.keras", "--quiet")
    assert code == 0, output
    # One batch of all the data: train mode normalises with exactly the statistics eval mode computed.
    code, output = run("check", path / "fixed.keras", "--data", path / "data.npy", "--batch-size", 40)
    assert code == 0 and output.strip().endswith("PASSED"), output
    saved = json.loads((path / "stale.json").read_text())["check"]
    assert saved["passed"] is False and saved["unchecked_count"] == 0 and len(saved["layers"]) == 2

    code, output = run("inspect", path / "stale.keras", "--train-batch-size", 2000, "--dataset-size", 4000,
                       "--report-json", path / "inspect.json")
    assert code == 0, output
    report = json.loads((path / "inspect.json").read_text())
    assert (report["source"], report["graph"]) == ("keras", "keras sequential")
    assert [l["momentum_tf"] for l in report["layers"]] == [0.99, 0.99]
    assert "BN010 warning" in output and "BatchNormalization(momentum=0.6)" in output
    code, output = run("inspect", path / "stale.keras", "--train-batch-size", 2000, "--dataset-size", 4000,
                       "--strict", "warning")
    assert code == 1


def test_legacy_h5_files_go_through_inspect_check_and_recalibrate(project):
    """A Keras 3 model saved in the legacy HDF5 format: read by Keras's loader (safe mode), written
    to .keras or, when asked, .h5; the statistics those of the library on the same arrays."""
    path, _, x = project
    stale = bk.load_model(path / "stale.keras")
    stale.save(path / "stale.h5")
    before = (path / "stale.h5").read_bytes()
    assert model_kind(path / "stale.h5").name == "keras" and model_kind(path / "stale.hdf5").name == "keras"
    code, output = run("inspect", path / "stale.h5", "--train-batch-size", 2000, "--dataset-size", 4000)
    assert code == 0 and "BN010 warning" in output and "needs the form" not in output, output
    code, output = run("check", path / "stale.h5", "--data", path / "data.npy", "--batch-size", 20)
    assert code == 1 and "FAILED: 2 of 2 BatchNorm layers" in output, output
    expected = bk.load_model(path / "stale.keras")
    bk.recalibrate(expected, x, batch_size=8, mode="eval")
    for out in (path / "fixed.keras", path / "fixed.h5"):
        code, output = run("recalibrate", path / "stale.h5", "--data", path / "data.npy", "--batch-size", 8,
                           "--mode", "eval", "-o", out)
        assert code == 0 and f"wrote {out}" in output and "PyTorch" not in output, output
        _assert_stats_equal(_stats(bk.load_model(out)), _stats(expected))
    assert (path / "stale.h5").read_bytes() == before
    assert [p.name for p in path.iterdir() if p.name.startswith(".bncal")] == []
    code, output = run("recalibrate", path / "stale.h5", "--data", path / "data.npy", "-o", path / "fixed.pt")
    assert code == 2 and "give -o OUT.keras (or OUT.h5" in output, output


def test_weights_only_files_and_tensorflow_exports_say_what_works(project):
    path, _, _ = project
    (path / "exported").mkdir()
    (path / "exported" / "saved_model.pb").write_bytes(b"")
    (path / "frozen.pb").write_bytes(b"")
    cases = {path / "stale.weights.h5": "holds weights only (model.save_weights); give the factory",
             path / "exported": "is a TensorFlow SavedModel, whose BatchNorm statistics are constants",
             path / "frozen.pb": "is a frozen TensorFlow graph"}
    for model, expected in cases.items():
        for args in (["inspect", model], ["recalibrate", model, "--data", path / "data.npy", "-o", path / "o.keras"]):
            code, output = run(*args)
            assert code == 1 and output.startswith("error: ") and expected in output, output
            assert output.strip().count("\n") == 0 and "needs the form" not in output, output
    assert not (path / "o.keras").exists()


def test_factory_spec_returning_a_keras_model_is_handed_over(project):
    path, _, x = project
    spec = f"{path}/nets.py:make"
    assert model_kind(spec).name == "torch"  # from the text alone: a factory could return either
    loaded = load_any(spec, weights=path / "stale.weights.h5")
    assert loaded.kind == "keras" and isinstance(loaded.model, keras.Model)
    assert set(loaded.files) == {path / "nets.py", path / "stale.weights.h5"}
    _assert_stats_equal(_stats(loaded.model), _stats(bk.load_model(path / "stale.keras")))
    assert isinstance(bncal.load_model(spec), keras.Model)
    _assert_stats_equal(_stats(bncal.load_model(spec, weights=path / "stale.weights.h5")), _stats(loaded.model))

    out = path / "from_factory.keras"
    code, output = run("recalibrate", spec, "--weights", path / "stale.weights.h5", "--data", path / "data.npy",
                       "--batch-size", 10, "--no-shuffle", "-o", out)
    assert code == 0, output
    expected = bk.load_model(path / "stale.keras")  # train mode depends on the batching: same batches, file order
    bk.recalibrate(expected, x, batch_size=10)
    _assert_stats_equal(_stats(bk.load_model(out)), _stats(expected))

    code, output = run("recalibrate", spec, "--weights", path / "stale.weights.h5", "--data", path / "data.npy",
                       "-o", path / "w.safetensors")
    assert code == 1 and "gives a keras.Model" in output and "give -o OUT.keras" in output, output
    assert not (path / "w.safetensors").exists()
    code, output = run("inspect", spec, "--weights", path / "data.npy")
    assert code == 1 and ".weights.h5" in output, output
    code, output = run("check", spec, "--weights", path / "stale.weights.h5", "--data", path / "data.npy",
                       "--batch-size", 20)
    assert code == 1 and "FAILED" in output, output


def test_lambda_layers_load_only_with_allow_pickle(tmp_path):
    inputs = keras.Input((3,))
    h = layers.Lambda(lambda t: t * 2.0)(inputs)
    keras.Model(inputs, layers.BatchNormalization()(h)).save(tmp_path / "lambda.keras")
    code, output = run("inspect", tmp_path / "lambda.keras")
    assert code == 1 and "Lambda" in output and "--allow-pickle" in output, output
    code, output = run("inspect", tmp_path / "lambda.keras", "--allow-pickle")
    assert code == 1 and "BN001 error" in output, output  # loaded; never updated is an error


def test_fold_export_says_what_to_do_with_a_keras_model(project):
    path, _, _ = project
    for model in (path / "stale.keras", f"{path}/nets.py:make"):
        code, output = run("fold-export", model, "--input-shape", "2,6,6,2", "-o", path / "out.onnx")
        assert code == 1 and "not a Keras model" in output and "model.export" in output, output
        assert not (path / "out.onnx").exists()


def _write_images(folder, images):
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("factory", ["channels_last", "channels_first"])
def test_image_folders_come_in_the_models_layout(project, factory):
    path, nets, _ = project
    images = np.random.default_rng(2).integers(0, 256, (12, 6, 6), dtype=np.uint8)
    _write_images(path / "images", images)
    pixels = images.astype(np.float32)[..., None] / 255.0  # grayscale, mean 0 std 1: x / 255
    if factory == "channels_last":
        model = keras.Sequential([keras.Input((6, 6, 1)), layers.Conv2D(3, 3), layers.BatchNormalization(),
                                  layers.Flatten(), layers.Dense(2)])
        arrays = pixels
    else:
        model = nets.channels_first()
        arrays = pixels.transpose(0, 3, 1, 2)
    model.save(path / "image_model.keras")
    out = path / "image_fixed.keras"
    code, output = run("recalibrate", path / "image_model.keras", "--data", path / "images", "--channels", 1,
                       "--batch-size", 4, "-o", out)
    assert code == 0, output
    bk.recalibrate(model, arrays, batch_size=4)
    _assert_stats_equal(_stats(bk.load_model(out)), _stats(model))


def test_the_library_hands_a_keras_model_over(project):
    path, nets, x = project
    model, expected = nets.make(), nets.make()
    batches = [x[:16], x[16:]]
    report = bncal.recalibrate(model, batches, mode="eval")
    reference = bk.recalibrate(expected, batches, mode="eval")
    assert (report.passes, len(report.layers)) == (reference.passes, 2)
    _assert_stats_equal(_stats(model), _stats(expected))
    with pytest.raises(BncalError, match="bncal.keras.recalibrate.*leave device and process_group unset"):
        bncal.recalibrate(model, batches, device="cpu")
    assert bncal.inspect_model(model).source == "keras"


def test_eval_mode_falls_back_to_plain_passes_when_the_order_changes(project, monkeypatch):
    """Anchored repeated passes (the depth-by-depth sweep, which needs none, switched off)."""
    from bncal.keras import recalibration

    monkeypatch.setattr(recalibration.KerasRecalibration, "solves_eval", False)
    _, nets, x = project
    fixed, shuffled = nets.make(), nets.make()
    batches = [x[i:i + 8] for i in range(0, 40, 8)]
    calls = {"n": 0}

    def reshuffled():
        calls["n"] += 1
        order = np.random.default_rng(calls["n"]).permutation(len(batches))
        return [batches[i] for i in order]

    reference = bk.recalibrate(fixed, batches, mode="eval", tol=1e-7, max_passes=30)
    report = bk.recalibrate(shuffled, reshuffled, mode="eval", tol=1e-7, max_passes=30)
    assert reference.notes == [] and report.converged
    assert report.notes == [DataOrder.NOTE]
    for (mean_a, var_a), (mean_b, var_b) in zip(_stats(shuffled), _stats(fixed)):
        np.testing.assert_allclose(mean_a, mean_b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var_a, var_b, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Keras's own ONNX export of the shipped model: every BN lowered to Sub -> Mul -> Add.

@pytest.fixture(scope="module")
def keras_export(tmp_path_factory):
    from models import keras_zoo

    model = bk.load_model(keras_zoo.MNIST_KERAS_STALE)
    x, _ = keras_zoo.mnist_nhwc("test")
    model(x[:2])  # Keras exports only a model that has been called
    path = tmp_path_factory.mktemp("keras_export") / "mnist_keras.onnx"
    model.export(str(path), format="onnx", verbose=False)
    return model, path, x[:64]


def test_keras_export_lowers_every_bn_and_bncal_finds_them(keras_export):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from bncal import check_onnx
    from bncal.onnx.lowered import find_lowered_normalisations

    model, path, x = keras_export
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0],
                               _np(model(x, training=False)), rtol=1e-4, atol=1e-4)

    found = find_lowered_normalisations(proto)
    bns = bk.batchnorm_layers(model)
    assert [f.ops for f in found] == [("Sub", "Mul", "Add")] * 5
    assert [f.after.split()[0] for f in found] == ["Conv"] * 4 + ["MatMul"]
    assert [f.channels for f in found] == [bn.moving_mean.shape[0] for _, bn in bns]
    # What each chain subtracts is that BN's moving mean: the statistics are folded, not gone.
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    for lowered, (_, bn) in zip(found, bns):
        np.testing.assert_allclose(values[nodes[lowered.nodes[0]].input[1]].reshape(-1), _np(bn.moving_mean),
                                   rtol=1e-6)

    code, output = run("inspect", path)
    assert code == 0 and "BN060 warning: normalisation lowered to arithmetic by the converter" in output, output
    assert "5 normalisation layers with no BatchNormalization node" in output
    with pytest.raises(BncalError, match="no inference BatchNormalization to check; it holds 5 normalisation"):
        check_onnx(proto, [x])
    np.save(path.parent / "x.npy", x)
    code, output = run("recalibrate", path, "--data", path.parent / "x.npy", "-o", path.parent / "out.onnx")
    assert code == 1 and "lowered to arithmetic" in output and "bncal recalibrate model.keras" in output, output


# ---------------------------------------------------------------------------------------------
# The shipped stale CNN repaired from the command line, as the README shows it.

def _accuracy(model, x, y, *, batch_statistics=False):
    """Held-out accuracy in inference mode, or with batch statistics (train-mode BN, dropout off;
    the moving statistics a train-mode call updates are put back)."""
    import torch

    dropouts = [l for l in model.layers if isinstance(l, layers.Dropout)]
    rates = [l.rate for l in dropouts]
    saved = [_np(v).copy() for v in model.non_trainable_variables]
    for layer in dropouts:
        layer.rate = 0.0
    try:
        with torch.no_grad():
            logits = np.concatenate([_np(model(x[i:i + 500], training=batch_statistics))
                                     for i in range(0, len(x), 500)])
    finally:
        for variable, value in zip(model.non_trainable_variables, saved):
            variable.assign(value.astype(variable.dtype))
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return float((logits.argmax(1) == y).mean())


def test_cli_repairs_the_shipped_model_and_its_keras_export_keeps_the_repair(tmp_path):
    import onnxruntime as ort

    from models import keras_zoo

    x_test, y_test = keras_zoo.mnist_nhwc("test")
    order = np.random.default_rng(1).permutation(len(y_test))  # sorted by class: batch statistics need a mix
    x_test, y_test = x_test[order], y_test[order]
    stale = bk.load_model(keras_zoo.MNIST_KERAS_STALE)
    before = _accuracy(stale, x_test, y_test)
    reference = _accuracy(stale, x_test, y_test, batch_statistics=True)
    out = tmp_path / "mnist_keras_fixed.keras"
    code, output = run("recalibrate", keras_zoo.MNIST_KERAS_STALE, "--data",
                       f"{ROOT / 'models' / 'keras_zoo.py'}:calibration_nhwc", "--batch-size", 200, "--mode", "eval",
                       "-o", out)
    assert code == 0 and "recalibrated 5 BatchNorm layers from 4000 samples in 20 batches" in output, output
    fixed = bk.load_model(out)
    after = _accuracy(fixed, x_test, y_test)
    assert before < 0.35 and reference > 0.95 and after >= reference - 0.01, (before, reference, after)

    # Keras's own export folds the recalibrated statistics into constants: the same accuracy in
    # onnxruntime, and inspect still says (a warning, exit 0) that they can no longer be checked.
    keras_zoo.export_onnx(tmp_path / "fixed.onnx", fixed)
    session = ort.InferenceSession(str(tmp_path / "fixed.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x_test})[0]
    assert abs(float((logits.argmax(1) == y_test).mean()) - after) <= 0.002
    code, output = run("inspect", tmp_path / "fixed.onnx")
    assert code == 0 and "BN060 warning" in output and "5 normalisation layers" in output, output
