"""bncal.keras against float64 references, on Keras's torch backend.

Keras reads ``KERAS_BACKEND`` once, when it is first imported: it is set here, before any
import of keras, and the module is skipped when keras is not installed.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

import bncal  # noqa: E402
import bncal.keras as bk  # noqa: E402
from bncal.errors import BncalError  # noqa: E402
from bncal.momentum import inverse_decay_tf_momentum  # noqa: E402
from tests_support import ROOT  # noqa: E402

assert keras.backend.backend() == "torch"


def _np(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def _population(h, axis):
    """Float64 mean and biased variance over every axis but ``axis``."""
    h = np.moveaxis(_np(h), axis, -1).reshape(-1, h.shape[axis])
    return h.mean(0), h.var(0)


def _stats(bn):
    return _np(bn.moving_mean), _np(bn.moving_variance)


def _split(x, sizes):
    assert sum(sizes) == len(x)
    return np.split(x, np.cumsum(sizes)[:-1])


def _randomize_bn(model, seed=0):
    """Distinct scales and shifts, and non-default statistics (so restoring them is visible)."""
    rng = np.random.default_rng(seed)
    for _, bn in bk.batchnorm_layers(model):
        c = bn.moving_mean.shape[0]
        if bn.scale:
            bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        if bn.center:
            bn.beta.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))
        bn.moving_mean.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
    return model


# ---------------------------------------------------------------------------------------------
# Train mode: the first BN holds the float64 statistics of its input, for every layer variant.

def _conv_nchw():
    return layers.Conv2D(4, 3, data_format="channels_first")


VARIANTS = {
    "nhwc": ((6, 6, 3), lambda: layers.Conv2D(4, 3), {}),
    "nchw-axis1": ((3, 6, 6), _conv_nchw, {"axis": 1}),
    "dense-2d": ((5,), lambda: layers.Dense(4), {}),
    "conv1d": ((7, 3), lambda: layers.Conv1D(4, 3), {}),
    "conv3d": ((4, 4, 4, 2), lambda: layers.Conv3D(4, 2), {}),
    "no-center-no-scale": ((6, 6, 3), lambda: layers.Conv2D(4, 3), {"center": False, "scale": False}),
    # Clipped to r = 1, d = 0 its training forward is plain BN (unclipped, see test_keras_renorm.py).
    "renorm": ((6, 6, 3), lambda: layers.Conv2D(4, 3),
               {"renorm": True, "renorm_clipping": {"rmin": 1.0, "rmax": 1.0, "dmax": 0.0}}),
    "synchronized": ((6, 6, 3), lambda: layers.Conv2D(4, 3), {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_mode_first_bn_equals_float64_statistics_of_its_input(variant):
    shape, first, kwargs = VARIANTS[variant]
    keras.utils.set_random_seed(0)
    conv = first()
    bn = layers.BatchNormalization(**kwargs)
    model = keras.Sequential([keras.Input(shape), conv, bn, layers.ReLU(), layers.Flatten(), layers.Dense(3)])
    if variant == "synchronized":
        # Keras refuses synchronized=True off TensorFlow; a model configured for TF carries it.
        bn.synchronized = True
        with pytest.raises(NotImplementedError):
            model(np.zeros((2, *shape), "float32"), training=True)  # Keras's own train mode cannot run it
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, *shape)) * 2 + 3).astype("float32")
    renorm_before = [_np(bn.renorm_mean), _np(bn.renorm_stddev)] if variant == "renorm" else None

    report = bk.recalibrate(model, _split(x, [16, 16, 16, 2]))

    axis = bn.axis % (len(shape) + 1)
    mean, var = _population(conv(x), axis)
    got_mean, got_var = _stats(bn)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-6 * np.sqrt(var).max())
    np.testing.assert_allclose(got_var, var, rtol=1e-6)
    assert report.layers[0].values_per_channel == int(np.prod(conv(x).shape)) // var.size  # every axis but the channel's
    assert (report.mode, report.batches, report.samples, report.passes) == ("train", 4, 50, 1)
    if variant == "renorm":
        # Keras derives the moving variance from moving_stddev at each renorm step: keep them consistent.
        np.testing.assert_allclose(_np(bn.moving_stddev), np.sqrt(var + bn.epsilon), rtol=1e-6)
        for before, after in zip(renorm_before, [bn.renorm_mean, bn.renorm_stddev]):
            np.testing.assert_array_equal(_np(after), before)


def test_masked_positions_are_left_out_as_keras_leaves_them_out():
    keras.utils.set_random_seed(20)
    tokens = keras.Input((5,), dtype="int32")
    embedding = layers.Embedding(10, 3, mask_zero=True)
    bn = layers.BatchNormalization()
    model = keras.Model(tokens, layers.GlobalAveragePooling1D()(bn(embedding(tokens))))
    x = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 0, 0], [6, 0, 0, 0, 0], [7, 8, 9, 1, 2]], "int32")
    report = bk.recalibrate(model, x, batch_size=2)
    kept = _np(embedding(x))[x != 0]  # 11 unmasked positions
    assert report.layers[0].values_per_channel == 11
    np.testing.assert_allclose(_stats(bn)[0], kept.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_stats(bn)[1], kept.var(0), rtol=1e-5)


def test_train_mode_first_layer_is_split_invariant():
    model = _randomize_bn(_cnn())
    x = np.random.default_rng(2).standard_normal((64, 8, 8, 3)).astype("float32")
    results = []
    for sizes in ([32, 32], [5, 40, 19]):
        net = _cnn()
        net.set_weights(model.get_weights())
        bk.recalibrate(net, _split(x, sizes))
        results.append(_stats(net.layers[1]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Eval mode: the fixed point is the statistics of one train-mode forward of all the data.

def _cnn(dtype="float32"):
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((8, 8, 3), dtype=dtype),
        layers.Conv2D(6, 3, padding="same", dtype=dtype), layers.BatchNormalization(dtype=dtype), layers.ReLU(dtype=dtype),
        layers.Conv2D(6, 3, padding="same", use_bias=False, dtype=dtype), layers.BatchNormalization(dtype=dtype),
        layers.ReLU(dtype=dtype),
        layers.Conv2D(4, 3, strides=2, dtype=dtype), layers.BatchNormalization(dtype=dtype), layers.ReLU(dtype=dtype),
        layers.Flatten(dtype=dtype), layers.Dense(8, use_bias=False, dtype=dtype),
        layers.BatchNormalization(dtype=dtype), layers.ReLU(dtype=dtype), layers.Dense(5, dtype=dtype),
    ])


def _one_batch_reference(model, x):
    """Keras itself, in float64: one train-mode forward of all of ``x`` with momentum 0 leaves
    each BN's batch statistics in its moving statistics."""
    reference = _cnn("float64")
    reference.set_weights([w.astype(np.float64) for w in model.get_weights()])
    for _, bn in bk.batchnorm_layers(reference):
        bn.momentum = 0.0
    outputs = _np(reference(x.astype(np.float64), training=True))
    return [_stats(bn) for _, bn in bk.batchnorm_layers(reference)], outputs


def _max_error(model, reference):
    worst = 0.0
    for (_, bn), (mean, var) in zip(bk.batchnorm_layers(model), reference):
        got_mean, got_var = _stats(bn)
        worst = max(worst, float(np.max(np.abs(got_mean - mean) / np.sqrt(var))),
                    float(np.max(np.abs(got_var - var) / var)))
    return worst


def test_eval_mode_reaches_the_one_batch_fixed_point_independent_of_split():
    net = _randomize_bn(_cnn())
    x = (np.random.default_rng(4).standard_normal((90, 8, 8, 3)) * 2 + 0.5).astype("float32")
    reference, one_batch_output = _one_batch_reference(net, x)
    assert _max_error(net, reference) > 0.1  # the randomised statistics are far from it
    results = []
    for sizes in ([32, 32, 26], [7, 50, 33]):
        model = _cnn()
        model.set_weights(net.get_weights())
        report = bk.recalibrate(model, _split(x, sizes), mode="eval", tol=1e-7, max_passes=10)
        assert report.converged, report.max_rel_change
        assert report.mode == "eval" and report.passes > 1
        assert _max_error(model, reference) < 1e-5
        results.append(model)
    for (_, a), (_, b) in zip(bk.batchnorm_layers(results[0]), bk.batchnorm_layers(results[1])):
        np.testing.assert_allclose(_stats(a)[0], _stats(b)[0], rtol=1e-5, atol=1e-6)
    # The model in inference mode now computes what the one-batch train-mode forward computed.
    np.testing.assert_allclose(_np(results[0](x, training=False)), one_batch_output, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sequential, functional and subclassed models.

class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = layers.Conv2D(4, 3)
        self.bn1 = layers.BatchNormalization()
        self.dense = layers.Dense(6)
        self.bn2 = layers.BatchNormalization()
        self.out = layers.Dense(3)

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn1(self.conv(x), training=training))
        h = keras.ops.mean(h, axis=(1, 2))  # a keras.ops call between layers: invisible to a layer list
        return self.out(keras.ops.relu(self.bn2(self.dense(h), training=training)))


def _three_kinds():
    keras.utils.set_random_seed(5)
    stack = [layers.Conv2D(4, 3), layers.BatchNormalization(), layers.ReLU(), layers.GlobalAveragePooling2D(),
             layers.Dense(6), layers.BatchNormalization(), layers.ReLU(), layers.Dense(3)]
    sequential = keras.Sequential([keras.Input((6, 6, 2)), *stack])
    inputs = keras.Input((6, 6, 2))
    h = layers.Conv2D(4, 3)(inputs)
    h = keras.ops.relu(layers.BatchNormalization()(h))
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.ReLU()(layers.BatchNormalization()(layers.Dense(6)(h)))
    functional = keras.Model(inputs, layers.Dense(3)(h))
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 6, 6, 2), "float32"))
    weights = [l.get_weights() for l in sequential.layers if l.weights]
    for model in (functional, subclassed):
        for layer, w in zip([l for l in model.layers if l.weights], weights):
            layer.set_weights(w)
    return sequential, functional, subclassed


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequential_functional_and_subclassed_models_agree(mode):
    models = _three_kinds()
    x = np.random.default_rng(6).standard_normal((40, 6, 6, 2)).astype("float32")
    results = []
    for model in models:
        report = bk.recalibrate(model, x, batch_size=16, mode=mode, tol=1e-8)
        assert [l.channels for l in report.layers] == [4, 6]
        results.append([_stats(bn) for _, bn in bk.batchnorm_layers(model)])
    for other in results[1:]:
        for (mean_a, var_a), (mean_b, var_b) in zip(results[0], other):
            np.testing.assert_allclose(mean_b, mean_a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(var_b, var_a, rtol=1e-5)
    # The first BN, independently: float64 statistics of the first conv's output.
    mean, var = _population(models[0].layers[0](x), 3)
    np.testing.assert_allclose(results[0][0][0], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[0][0][1], var, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# What the pass leaves alone.

def test_dropout_is_off_during_the_pass():
    keras.utils.set_random_seed(7)
    dense = layers.Dense(16)
    dropout = layers.Dropout(0.5)
    bn = layers.BatchNormalization()
    model = keras.Sequential([keras.Input((10,)), dense, dropout, bn, layers.ReLU(), layers.Dense(3)])
    x = (np.random.default_rng(8).standard_normal((200, 10)) + 1).astype("float32")
    # Statistics as Keras training leaves them, with dropout on (inflated variance).
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((200, 3), "float32"), batch_size=20, epochs=1, verbose=0)
    bk.recalibrate(model, x, batch_size=32)
    mean, var = _population(dense(x), 1)
    np.testing.assert_allclose(_stats(bn)[0], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_stats(bn)[1], var, rtol=1e-6)
    assert dropout.rate == 0.5


def test_weights_trainable_flags_and_frozen_layers_are_left_alone():
    model = _randomize_bn(_cnn())
    frozen = model.layers[4]
    frozen.trainable = False
    model.layers[0].trainable = False
    statistics = {id(v) for _, bn in bk.batchnorm_layers(model) if bn.trainable
                  for v in (bn.moving_mean, bn.moving_variance)}
    before = {v.path: _np(v) for v in model.weights if id(v) not in statistics}
    flags = [l.trainable for l in model.layers]
    momenta = [bn.momentum for _, bn in bk.batchnorm_layers(model)]
    x = np.random.default_rng(9).standard_normal((30, 8, 8, 3)).astype("float32")

    report = bk.recalibrate(model, x, batch_size=10, mode="eval")

    assert {v.path: _np(v) for v in model.weights if id(v) not in statistics}.keys() == before.keys()
    for v in model.weights:
        if id(v) not in statistics:
            np.testing.assert_array_equal(_np(v), before[v.path])  # includes the frozen BN's statistics
    assert [l.trainable for l in model.layers] == flags
    assert [bn.momentum for _, bn in bk.batchnorm_layers(model)] == momenta
    assert [s.name for s in report.skipped] == [frozen.name] and "trainable=False" in report.skipped[0].reason
    assert len(report.layers) == 3


def test_state_restored_after_an_error():
    model = _randomize_bn(_cnn())
    before = [_stats(bn) for _, bn in bk.batchnorm_layers(model)]
    batches = _split(np.random.default_rng(10).standard_normal((40, 8, 8, 3)).astype("float32"), [16, 16, 8])

    def failing(net, x):
        if x.shape[0] == 8:
            raise RuntimeError("loader broke")
        return net(x, training=False)

    for mode in ("train", "eval"):
        with pytest.raises(BncalError, match="batch 2 .*loader broke"):
            bk.recalibrate(model, batches, mode=mode, forward_fn=failing)
        for (_, bn), (mean, var) in zip(bk.batchnorm_layers(model), before):
            np.testing.assert_array_equal(_stats(bn)[0], mean)
            np.testing.assert_array_equal(_stats(bn)[1], var)
            assert "call" not in bn.__dict__  # the wrapper is gone
    # And the model still recalibrates normally afterwards.
    bk.recalibrate(model, batches)


def test_bad_input_is_refused_in_one_line():
    model = _cnn()
    x = np.random.default_rng(11).standard_normal((8, 8, 8, 3)).astype("float32")
    with pytest.raises(BncalError, match="NaN or Inf"):
        bk.recalibrate(model, np.full((4, 8, 8, 3), np.nan, "float32"))
    with pytest.raises(BncalError, match="one-shot iterator"):
        bk.recalibrate(model, iter([x]), mode="eval")
    with pytest.raises(BncalError, match="only one value per channel"):
        bk.recalibrate(model, [x[:1]])
    with pytest.raises(BncalError, match="empty"):
        bk.recalibrate(model, [])
    with pytest.raises(BncalError, match="no BatchNorm layer"):
        bk.recalibrate(keras.Sequential([keras.Input((3,)), layers.Dense(2)]), np.zeros((4, 3), "float32"))
    with pytest.raises(BncalError, match="keras.Model"):
        bk.recalibrate(object(), x)
    # Single samples, as an unbatched tf.data dataset yields them.
    with pytest.raises(BncalError, match=r"batch 0 has shape \(8, 8, 3\) where the model takes \('batch', 8, 8, 3\): "
                                         r"it is one sample, not a batch; batch the data"):
        bk.recalibrate(model, list(x))
    bk.recalibrate(model, [x[:1]], mode="eval")  # one value per channel is fine for inference statistics


def test_keras_style_batches_and_max_samples():
    model = _cnn()
    x = np.random.default_rng(12).standard_normal((40, 8, 8, 3)).astype("float32")
    y = np.zeros(40, "int64")
    report = bk.recalibrate(model, [(x[:20], y[:20]), (x[20:], y[20:], np.ones(20))], max_samples=30)
    assert (report.batches, report.samples) == (2, 30)
    mean, var = _population(model.layers[0](x[:30]), 3)
    np.testing.assert_allclose(_stats(model.layers[1])[0], mean, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loading and saving.

def test_save_reload_round_trip_is_atomic(tmp_path, monkeypatch):
    model = _randomize_bn(_cnn())
    x = np.random.default_rng(13).standard_normal((30, 8, 8, 3)).astype("float32")
    bk.recalibrate(model, x, batch_size=10)
    path = bk.save_model(model, tmp_path / "recalibrated.keras")
    loaded = bk.load_model(path)
    for (_, a), (_, b) in zip(bk.batchnorm_layers(model), bk.batchnorm_layers(loaded)):
        np.testing.assert_array_equal(_stats(a)[0], _stats(b)[0])
        np.testing.assert_array_equal(_stats(a)[1], _stats(b)[1])
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=1e-6, atol=1e-6)

    # A save that fails halfway leaves the existing file as it was, and no temporary file.
    original = path.read_bytes()

    def broken(model, filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(keras.saving, "save_model", broken)
    with pytest.raises(BncalError, match="disk full"):
        bk.save_model(model, path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recalibrated.keras"]
    with pytest.raises(BncalError, match=r"\.keras"):
        bk.save_model(model, tmp_path / "model.onnx")


def test_loading_is_safe_by_default(tmp_path):
    inputs = keras.Input((3,))
    h = layers.Lambda(lambda t: t * 2.0)(inputs)
    model = keras.Model(inputs, layers.BatchNormalization()(h))
    path = tmp_path / "lambda.keras"
    model.save(path)
    model.save(tmp_path / "lambda.h5")  # the legacy HDF5 format stores the lambda's bytecode too
    for saved in (path, tmp_path / "lambda.h5"):
        with pytest.raises(BncalError, match="Lambda .*safe_mode=False"):
            bk.load_model(saved)
        assert len(bk.batchnorm_layers(bk.load_model(saved, safe_mode=False))) == 1
    with pytest.raises(BncalError, match="does not exist"):
        bk.load_model(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(BncalError, match="is not a .keras file: a .keras file is a zip archive"):
        bk.load_model(tmp_path / "junk.keras")


def test_factory_spec(tmp_path):
    (tmp_path / "nets.py").write_text(
        "import keras\n"
        "def make(width=4):\n"
        "    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(width), keras.layers.BatchNormalization()])\n"
        "def not_a_model():\n"
        "    return 3\n")
    model = bk.load_model(f"{tmp_path}/nets.py:make", model_kwargs='{"width": 7}')
    assert isinstance(model, keras.Model) and model.layers[1].moving_mean.shape == (7,)
    weights = tmp_path / "w.weights.h5"
    _randomize_bn(model).save_weights(weights)
    again = bk.load_model(f"{tmp_path}/nets.py:make", model_kwargs={"width": 7}, weights=weights)
    np.testing.assert_array_equal(_stats(again.layers[1])[0], _stats(model.layers[1])[0])
    with pytest.raises(BncalError, match="not a keras.Model"):
        bk.load_model(f"{tmp_path}/nets.py:not_a_model")
    with pytest.raises(BncalError, match="do not fit"):
        bk.load_model(f"{tmp_path}/nets.py:make", weights=weights)


def _run_python(code: str, keras_home, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(keras_home), **env_extra)  # no user keras.json: Keras would default to TensorFlow
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_backend_defaults_to_torch_without_tensorflow_and_missing_keras_says_how_to_install(tmp_path):
    code = ("import importlib.util, os, bncal.keras as bk\n"
            "assert importlib.util.find_spec('tensorflow') is None\n"
            "print(bk.import_keras().backend.backend(), os.environ['KERAS_BACKEND'])\n")
    result = _run_python(code, tmp_path / "fresh")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["torch", "torch"]
    # A backend the user configured is theirs: bncal does not override it.
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "keras.json").write_text('{"backend": "jax"}')
    code = ("import bncal.keras as bk\nfrom bncal.errors import BncalError\n"
            "try:\n    bk.import_keras()\nexcept BncalError as e:\n    print(e)\n")
    result = _run_python(code, tmp_path / "jax")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KERAS_BACKEND" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    code = ("import sys; sys.modules['keras'] = None\n"
            "import bncal.keras as bk\n"
            "from bncal.errors import BncalError\n"
            "try:\n    bk.recalibrate(None, [])\nexcept BncalError as e:\n    print(e)\n")
    result = _run_python(code, tmp_path / "fresh")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [
        "Keras models need keras 3, which is not installed: pip install 'bncal[keras]'"]


# ---------------------------------------------------------------------------------------------
# Inspect: the same rules, Keras words.

def _graph_model():
    inputs = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, activation="relu", name="conv_relu")(inputs)
    h = layers.BatchNormalization(name="bn_after_act")(h)              # BN020: feeds a linear conv
    h = layers.Conv2D(4, 3, name="conv2")(h)
    h = layers.BatchNormalization(center=False, name="bn_no_center")(h)  # BN021: feeds a ReLU
    h = layers.ReLU(name="relu2")(h)
    h = layers.BatchNormalization(scale=False, name="bn_no_scale")(layers.Conv2D(4, 1, name="conv3")(h))
    h = layers.ReLU(name="relu3")(h)                                  # scale=False before ReLU: fine
    h = layers.Dropout(0.3, name="drop")(layers.Flatten(name="flat")(h))
    h = layers.BatchNormalization(name="bn_after_dropout")(layers.Dense(5, name="fc")(h))  # BN030
    return keras.Model(inputs, layers.Dense(2, name="out")(keras.ops.relu(h)))


def test_inspect_graph_rules_on_a_functional_model():
    model = _graph_model()
    _randomize_bn(model)
    report = bk.inspect(model)
    assert (report.source, report.graph) == ("keras", "keras functional")
    assert {(f.rule_id, tuple(f.layers)) for f in report.findings} == {
        ("BN020", ("bn_after_act",)), ("BN021", ("bn_no_center",)), ("BN030", ("bn_after_dropout",))}
    fixes = {f.rule_id: f.fix for f in report.findings}
    assert "center=False, scale=False" in fixes["BN020"]
    assert "center=True" in fixes["BN021"]
    assert "bncal.keras.recalibrate" in fixes["BN030"]
    assert "conv_relu (activation='relu')" in report.by_rule("BN020")[0].evidence
    # The same rules run on a nested copy (inlined) and through bncal.inspect_model.
    inputs = keras.Input((8, 8, 3))
    wrapper = keras.Model(inputs, layers.Dense(2)(model(inputs)))
    nested = bncal.inspect_model(wrapper)
    assert {f.rule_id for f in nested.findings} == {"BN020", "BN021", "BN030"}
    assert nested.by_rule("BN030")[0].layers == [f"{model.name}/bn_after_dropout"]


def test_inspect_stale_model_and_silence_on_a_clean_one(tmp_path):
    keras.utils.set_random_seed(14)
    stale = keras.Sequential([keras.Input((6,)), layers.Dense(4), layers.BatchNormalization(momentum=1.0),
                              layers.ReLU(), layers.Dense(2)])
    path = tmp_path / "stale.keras"
    stale.save(path)
    report = bk.inspect(path, batch_size=16, dataset_size=1000)
    assert report.graph == "keras sequential"
    rules = {f.rule_id: f for f in report.findings}
    assert set(rules) == {"BN001", "BN003", "BN040"}
    assert rules["BN001"].severity == "error" and "bncal.keras.recalibrate" in rules["BN001"].fix
    assert "BatchNormalization(momentum=1.0)" in rules["BN003"].evidence
    assert "renorm=True" in rules["BN040"].fix
    assert report.layers[0].momentum_tf == 1.0 and report.layers[0].momentum_torch == 0.0

    clean = keras.Sequential([keras.Input((6,)), layers.Dense(4), layers.BatchNormalization(momentum=0.99),
                              layers.ReLU(), layers.Dense(2)])
    bk.recalibrate(clean, np.random.default_rng(15).standard_normal((64, 6)).astype("float32"))
    report = bk.inspect(clean, batch_size=128, dataset_size=50_000)
    assert report.findings == [], report.table()
    renorm = keras.Sequential([keras.Input((6,)), layers.Dense(4), layers.BatchNormalization(renorm=True)])
    bk.recalibrate(renorm, np.random.default_rng(16).standard_normal((64, 6)).astype("float32"))
    assert bk.inspect(renorm, batch_size=16, dataset_size=50_000).by_rule("BN040") == []


def test_inspect_momentum_rule_speaks_keras_on_the_shipped_model():
    report = bk.inspect(ROOT / "models" / "mnist_keras_stale.keras", batch_size=2000, dataset_size=4000, epochs=10)
    (finding,) = report.findings
    assert finding.rule_id == "BN010" and len(finding.layers) == 5
    assert finding.evidence.startswith("momentum 0.99 averages about 100 steps")
    assert finding.fix.startswith("set BatchNormalization(momentum=0.6), or better use inverse decay: "
                                  "the callback bncal.keras.InverseDecayMomentum(ceiling=0.6)")
    assert "(PyTorch)" not in finding.fix



def test_a_momentum_near_one_keeps_its_digits():
    """Keras momentum 0.9997 averages 1/(1 - 0.9997) = 3333 steps: it must not read as momentum 1."""
    model = keras.Sequential([keras.Input((3,)), layers.Dense(4), layers.BatchNormalization(momentum=0.9997)])
    (finding,) = [f for f in bk.inspect(model, batch_size=2000, dataset_size=4000).findings if f.rule_id == "BN010"]
    assert finding.evidence.startswith("momentum 0.9997 averages about 3.33e+03 steps"), finding.evidence

class _RegisteredOutOfOrder(keras.Model):
    """Layers created in another order than ``call`` uses them."""

    def __init__(self):
        super().__init__()
        self.head = layers.Dense(2)
        self.bn = layers.BatchNormalization()
        self.act = layers.ReLU()
        self.body = layers.Dense(4)

    def call(self, x, training=None):
        return self.head(self.bn(self.act(self.body(x)), training=training))


def test_inspect_subclassed_model_follows_the_execution_order():
    model = _RegisteredOutOfOrder()
    x = np.zeros((2, 3), "float32")
    model(x)
    _randomize_bn(model)
    without = bk.inspect(model)
    assert without.graph == "layer order" and any("example_inputs" in n for n in without.notes)
    assert without.findings == []  # in registration order the BN seems to follow the head Dense
    report = bk.inspect(model, example_inputs=x)
    assert report.graph == "execution order"
    (finding,) = report.findings
    assert finding.rule_id == "BN020" and finding.layers == [model.bn.name]
    assert model.act.name in finding.evidence and model.head.name in finding.evidence
    assert all("call" not in l.__dict__ for l in (model.head, model.bn, model.act, model.body))


# ---------------------------------------------------------------------------------------------
# Check: moving against data statistics, inference against train mode.

def test_check_fails_stale_statistics_and_passes_recalibrated_ones():
    net = _randomize_bn(_cnn())
    rng = np.random.default_rng(17)
    x = (rng.standard_normal((256, 8, 8, 3)) + 0.5).astype("float32")
    stale = bk.check(net, x, batch_size=64)
    assert not stale.passed and all(not l.passed for l in stale.layers)
    assert stale.reasons[0].startswith("4 of 4 BatchNorm layers have moving statistics off their data")
    assert stale.layers[0].values_per_channel == 256 * 64  # the second batching's statistics are not merged
    # Outputs are judged against train mode on re-paired batches, as in the ONNX check.
    assert stale.outputs[0].criterion == "batch spread" and stale.outputs[0].spread_ratio > 1.5
    bk.recalibrate(net, x, batch_size=64, mode="eval")
    before = [_stats(bn) for _, bn in bk.batchnorm_layers(net)]
    report = bk.check(net, x, batch_size=64)
    assert report.passed, report.table()
    assert report.outputs[0].criterion == "batch spread" and report.outputs[0].spread_ratio <= 1.5
    assert report.layers[0].mean_shift < 1e-5 and abs(report.layers[0].var_ratio - 1) < 1e-5
    assert [o.name for o in report.outputs] == ["output"]  # a Sequential model names no outputs
    for (_, bn), (mean, var) in zip(bk.batchnorm_layers(net), before):  # the check changed nothing
        np.testing.assert_array_equal(_stats(bn)[0], mean)
    assert "PASSED" in report.table()


# ---------------------------------------------------------------------------------------------
# The inverse-decay callback.

def test_inverse_decay_callback_follows_the_formula():
    keras.utils.set_random_seed(18)
    bn = layers.BatchNormalization(momentum=0.95)
    model = keras.Sequential([keras.Input((3,)), bn, layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: only the statistics move
    x = (np.random.default_rng(19).standard_normal((160, 3)) * 3 + 2).astype("float32")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((bn.momentum, _stats(bn)[0].copy()))

    schedule = bk.InverseDecayMomentum(ceiling=0.9)
    model.fit(x, np.zeros((160, 1), "float32"), batch_size=4, epochs=1, shuffle=False,
              callbacks=[schedule, Record()], verbose=0)
    expected = [min(1 - 0.8 ** (step / 10), 0.9) for step in range(40)]
    np.testing.assert_allclose([m for m, _ in seen], expected, rtol=0, atol=1e-15)
    assert [schedule.momentum(t) for t in range(40)] == [inverse_decay_tf_momentum(t, ceiling_tf=0.9)
                                                          for t in range(40)]
    # Step 0 has momentum 0: the first batch's mean replaces the initial 0 entirely.
    np.testing.assert_allclose(seen[0][1], x[:4].mean(0), rtol=1e-5)
    assert bn.momentum == 0.95  # restored when training ended


# ---------------------------------------------------------------------------------------------
# The shipped example: large batches, few steps, momentum 0.99.

def _accuracy(model, x, y, training=False):
    dropouts = [l for l in model.layers if isinstance(l, layers.Dropout)]
    for layer in dropouts:
        layer.rate = 0.0
    saved = [v.numpy().copy() for v in model.non_trainable_variables]
    import torch

    with torch.no_grad():
        logits = np.concatenate([_np(model(x[i:i + 500], training=training)) for i in range(0, len(x), 500)])
    for variable, value in zip(model.non_trainable_variables, saved):
        variable.assign(value)
    for layer in dropouts:
        layer.rate = 0.5
    return float((logits.argmax(1) == y).mean())


def test_shipped_keras_example_is_repaired():
    from models import keras_zoo

    x, _ = keras_zoo.mnist_nhwc("calib")
    x_test, y_test = keras_zoo.mnist_nhwc("test")
    x = x[np.random.default_rng(0).permutation(len(x))]  # sorted by class: mix the batches
    order = np.random.default_rng(1).permutation(len(y_test))
    x_test, y_test = x_test[order], y_test[order]

    model = bk.load_model(keras_zoo.MNIST_KERAS_STALE)
    stale = _accuracy(model, x_test, y_test)
    batch_statistics = _accuracy(model, x_test, y_test, training=True)
    assert stale < 0.35 and batch_statistics > 0.95, (stale, batch_statistics)
    for mode in ("train", "eval"):
        model = bk.load_model(keras_zoo.MNIST_KERAS_STALE)
        report = bk.recalibrate(model, x, batch_size=200, mode=mode)
        assert report.converged and report.samples == 4000
        assert _accuracy(model, x_test, y_test) >= batch_statistics - 0.01, mode
