"""Keras ``BatchNormalization(renorm=True)``: the rule of :mod:`bncal.renorm` against Keras's own
training forward, and a never-updated renorm model through inspect, check and recalibrate; and the
Keras check's NOT ENOUGH DATA verdict (issue 21)."""

import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")

import bncal  # noqa: E402
import bncal.keras as bk  # noqa: E402
from bncal.keras.layers import renorm_reference  # noqa: E402
from tests_support import ROOT  # noqa: E402

MNIST_NPZ = ROOT / "models" / "mnist5k.npz"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny eager batches: a second thread only adds contention (30x slower on a loaded 2-core machine).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_keras_renorm_training_forward_is_its_reference_in_float64():
    rng = np.random.default_rng(5)
    channels = 6
    layer = keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmin": 0.7, "rmax": 1.4, "dmax": 0.6},
                                            dtype="float64", center=False, scale=False)
    x = rng.normal(rng.normal(0, 1, channels), rng.uniform(0.4, 2.5, channels), (16, 3, 3, channels))
    layer.build(x.shape)
    layer.renorm_mean.assign(rng.normal(0, 1, channels))
    layer.renorm_stddev.assign(rng.uniform(0.5, 2, channels))
    reference = renorm_reference(layer)
    assert (reference.rmin, reference.rmax, reference.dmax) == (0.7, 1.4, 0.6)
    trained = np.asarray(keras.ops.convert_to_numpy(layer(x, training=True)))
    mean, var = x.reshape(-1, channels).mean(0), x.reshape(-1, channels).var(0)
    m, v = reference.training_statistics(mean, var)
    # Keras's float64 renorm forward rounds somewhere through float32 (about 1e-6 here, clipped or not).
    np.testing.assert_allclose((x - m) / np.sqrt(v + layer.epsilon), trained, rtol=1e-5, atol=1e-5)
    clipped = reference.clipped(mean, var)
    assert clipped.any() and not clipped.all()
    assert np.abs((x - mean) / np.sqrt(var + layer.epsilon) - trained).max() > 0.1  # not plain batch statistics


def _model(renorm: bool):
    """Statistics that never move in training (momentum 1); renorm unclipped (renorm_clipping None)."""
    keras.utils.set_random_seed(0)

    def bn():
        if renorm:
            return keras.layers.BatchNormalization(renorm=True, momentum=1.0, renorm_momentum=1.0)
        return keras.layers.BatchNormalization(momentum=1.0)

    model = keras.Sequential([
        keras.Input((14, 14, 1)), keras.layers.Conv2D(8, 3, use_bias=False), bn(), keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, strides=2, use_bias=False), bn(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(32, use_bias=False), bn(), keras.layers.ReLU(), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def mnist_nhwc():
    data = np.load(MNIST_NPZ)
    x = (data["images"].astype("float32") / 255).reshape(-1, 14, 2, 14, 2).mean((2, 4))[..., None]
    train = np.random.default_rng(0).permutation(data["calib_idx"])  # the index lists are sorted by class
    test = np.random.default_rng(1).permutation(data["test_idx"])
    return x, data["labels"].astype("int64"), train, test


def _accuracy(model, x, y, idx):
    return float(np.mean(np.argmax(model.predict(x[idx], batch_size=250, verbose=0), 1) == y[idx]))


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "plain"])
def test_never_updated_keras_model(mnist_nhwc, renorm):
    x, y, train, test = mnist_nhwc
    model = _model(renorm)
    model.fit(x[train[:1600]], y[train[:1600]], batch_size=32, epochs=2, verbose=0)
    before = _accuracy(model, x, y, test)
    findings = bncal.inspect_model(model).by_rule("BN001")
    assert [f.severity for f in findings] == ["warning" if renorm else "error"]
    if renorm:
        variances = [np.asarray(keras.ops.convert_to_numpy(bn.moving_variance)) for _, bn in bk.batchnorm_layers(model)]
        assert all(np.allclose(v, 1 - 1e-3) for v in variances)  # Keras's never-updated renorm variance
    report = bk.check(model, x[test[:400]], batch_size=50)
    assert report.passed is renorm, report.table()
    bk.recalibrate(model, x[train[1600:2624]])
    after = _accuracy(model, x, y, test)
    if renorm:
        assert before > 0.8 and after == before
        assert bk.check(model, x[test[:400]], batch_size=50).passed
    else:
        assert after > before + 0.1


def test_keras_check_says_not_enough_data_where_the_images_cannot_resolve_the_difference():
    rng = np.random.default_rng(0)

    def images(n):  # one value per channel at all 8x8 positions: not 64 independent samples per image
        return np.broadcast_to(rng.normal(1, 2, (n, 1, 1, 4)), (n, 8, 8, 4)).astype("float32").copy()

    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.BatchNormalization()])
    bk.recalibrate(model, images(128), batch_size=16)
    report = bk.check(model, images(128), batch_size=16)
    (layer,) = report.layers
    assert layer.shift_limit < layer.mean_shift and layer.unresolved, report.table()
    assert report.verdict == "NOT ENOUGH DATA" and not report.passed and report.reasons == []
