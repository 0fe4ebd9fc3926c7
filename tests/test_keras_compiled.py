"""bncal.keras.compiled (one traced forward per batch) against the eager tap and float64, on
Keras's torch backend (the TensorFlow trace itself: tests/test_keras_tf.py)."""

import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

import bncal.keras as bk  # noqa: E402
from bncal.keras import _passes, recalibration  # noqa: E402
from bncal.errors import BncalError  # noqa: E402
from bncal.keras.compiled import compiled_refusal  # noqa: E402


def _np(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def _branchy(seed=11):
    """Two BN depths and a residual join: a BN after the join sees both branches."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 3))
    a = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(5, 3, padding="same")(x)))
    b = layers.BatchNormalization()(layers.Conv2D(5, 1)(x))
    joined = layers.Add()([layers.Conv2D(5, 3, padding="same")(a), b])
    out = layers.ReLU()(layers.BatchNormalization()(joined))
    head = layers.Dense(4)(layers.BatchNormalization()(layers.Dense(7)(layers.Flatten()(out))))
    return keras.Model(x, head)


def _statistics(model):
    return [(_np(bn.moving_mean), _np(bn.moving_variance)) for _, bn in bk.batchnorm_layers(model)]


@pytest.fixture
def tap_entries(monkeypatch):
    """How many eager BatchNormTap passes ran."""
    entries = []
    enter = _passes.BatchNormTap.__enter__
    monkeypatch.setattr(_passes.BatchNormTap, "__enter__", lambda self: entries.append(1) or enter(self))
    return entries


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compiled_passes_give_the_eager_taps_statistics(mode, monkeypatch, tap_entries):
    x = (np.random.default_rng(3).standard_normal((42, 6, 6, 3)) * 2 + 1).astype("float32")
    compiled, eager = _branchy(), _branchy()
    report = bk.recalibrate(compiled, x, batch_size=16, mode=mode, tol=1e-7)
    assert len(tap_entries) == (0 if mode == "train" else report.passes - 2)  # eval: anchored passes stay eager
    monkeypatch.setattr(recalibration, "compiled_refusal", lambda *a, **k: "asked for the eager tap")
    eager_report = bk.recalibrate(eager, x, batch_size=16, mode=mode, tol=1e-7)
    assert (report.batches, report.samples) == (eager_report.batches, eager_report.samples) == (3, 42)
    assert [l.values_per_channel for l in report.layers] == [l.values_per_channel for l in eager_report.layers]
    for (mean_a, var_a), (mean_b, var_b) in zip(_statistics(compiled), _statistics(eager)):
        np.testing.assert_allclose(mean_a, mean_b, rtol=1e-5, atol=1e-6 * np.sqrt(var_b).max())
        np.testing.assert_allclose(var_a, var_b, rtol=1e-5)
    # The BN in front, independently: float64 statistics of its input over all the data.
    conv = compiled.get_layer(index=1)
    h = _np(conv(x)).reshape(-1, 5)
    np.testing.assert_allclose(_statistics(compiled)[0][0], h.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_statistics(compiled)[0][1], h.var(0), rtol=1e-6)


def test_which_models_keep_the_eager_tap():
    model = _branchy()
    found = bk.batchnorm_layers(model)
    assert compiled_refusal(found, custom_forward=False, renorm=False) is None
    assert compiled_refusal(found, custom_forward=True, renorm=False) == "a custom forward_fn"
    assert compiled_refusal(found, custom_forward=False, renorm=True).startswith("batch renormalisation")

    class OwnCall(layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=training, mask=mask) * 2

    own = OwnCall()
    own.build((None, 3))
    assert compiled_refusal([("own", own)], custom_forward=False, renorm=False) == "own (OwnCall) has its own call"


def test_an_error_in_a_compiled_eval_pass_puts_the_statistics_back():
    model = _branchy()
    before = _statistics(model)
    x = np.random.default_rng(4).standard_normal((20, 6, 6, 3)).astype("float32")
    reads = []

    def data():  # the train pass reads good data, the first (compiled) eval pass a NaN batch
        reads.append(1)
        return [x[:10], x[10:]] if len(reads) == 1 else [x[:10], np.full((10, 6, 6, 3), np.nan, "float32")]

    with pytest.raises(BncalError, match="NaN"):
        bk.recalibrate(model, data, mode="eval")
    assert len(reads) == 2
    for (mean_a, var_a), (mean_b, var_b) in zip(_statistics(model), before):
        np.testing.assert_array_equal(mean_a, mean_b)
        np.testing.assert_array_equal(var_a, var_b)
