"""bncal.keras.compiled (one traced forward per batch) against the eager tap and float64, on
Keras's torch backend (the TensorFlow trace itself: tests/test_keras_tf.py)."""

import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

import bncal.keras as bk  # noqa: E402
from bncal.keras import passes, recalibration  # noqa: E402
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
    enter = passes.BatchNormTap.__enter__
    monkeypatch.setattr(passes.BatchNormTap, "__enter__", lambda self: entries.append(1) or enter(self))
    return entries


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compiled_passes_give_the_eager_taps_statistics(mode, monkeypatch, tap_entries):
    x = (np.random.default_rng(3).standard_normal((42, 6, 6, 3)) * 2 + 1).astype("float32")
    compiled, eager = _branchy(), _branchy()
    report = bk.recalibrate(compiled, x, batch_size=16, mode=mode, tol=1e-7)
    assert len(tap_entries) == (0 if mode == "train" else report.passes - 2)  # eval: anchored passes stay eager
    monkeypatch.setattr(recalibration, "compiled_refusal", lambda *a, **k: "asked for the eager tap")
    eager_report = bk.recalibrate(eager, x, batch_size=16, mode=mode, tol=1e-7)
    batches = 3 if mode == "train" else 1  # eval mode reads arrays in chunks of up to 16 MiB
    assert (report.batches, report.samples) == (eager_report.batches, eager_report.samples) == (batches, 42)
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


# ---------------------------------------------------------------------------------------------
# Eval mode: the depth-by-depth sweep (bncal.keras.sweep).

def _repeated_passes(monkeypatch, model, data, **kwargs):
    """The eval-mode statistics by repeated passes alone, the sweep switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(recalibration.KerasRecalibration, "solves_eval", False)
        return bk.recalibrate(model, data, mode="eval", tol=1e-8, max_passes=12, **kwargs)


def _assert_same_statistics(a, b, rtol=1e-5):
    for (mean_a, var_a), (mean_b, var_b) in zip(_statistics(a), _statistics(b)):
        np.testing.assert_allclose(mean_a, mean_b, rtol=rtol, atol=rtol * np.sqrt(var_b).max())
        np.testing.assert_allclose(var_a, var_b, rtol=rtol)


@pytest.mark.parametrize("prior", [0, 30])
def test_the_sweep_reaches_the_repeated_passes_fixed_point_in_one_confirmed_pass(monkeypatch, prior):
    x = (np.random.default_rng(5).standard_normal((42, 6, 6, 3)) * 2 + 1).astype("float32")
    swept, iterated = _branchy(), _branchy()
    report = bk.recalibrate(swept, x, batch_size=16, mode="eval", prior=prior)
    assert (report.passes, report.converged, report.samples) == (2, True, 42)
    assert report.notes[0].startswith("eval mode: exact depth-by-depth sweep (")
    assert report.max_rel_change < 1e-6  # the confirming pass runs the sweep's own steps
    batches = [x[i:i + 16] for i in range(0, 42, 16)]  # as batches: eval mode would take the array whole
    reference = _repeated_passes(monkeypatch, iterated, batches, prior=prior)
    assert reference.converged and reference.passes > 2
    _assert_same_statistics(swept, iterated)


def test_a_small_cache_recomputes_from_the_data_and_a_reordered_reread_is_refused():
    from bncal.keras.passes import calibration_data
    from bncal.keras.sweep import solve_eval_statistics

    model = _branchy()
    x = np.random.default_rng(6).standard_normal((40, 6, 6, 3)).astype("float32")
    found = {}
    for cache_mb in (64, 0):
        result = solve_eval_statistics(model, bk.batchnorm_layers(model), calibration_data(x, 10, reiterable=True),
                                       cache_mb=cache_mb)
        found[cache_mb] = result
    assert found[64].depths == 3 and found[64].batches == 4 and found[64].cached_bytes_peak > 0
    assert found[64].forward_equivalents < 1 < found[0].forward_equivalents  # the head never runs; recomputation
    assert found[0].cached_bytes_peak == 0
    for name, moments in found[64].moments.items():
        np.testing.assert_allclose(found[0].moments[name].mean, moments.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(found[0].moments[name].variance, moments.variance, rtol=1e-6)
    reads = []

    def shuffled():
        reads.append(1)
        return [x[:10], x[10:20]] if len(reads) == 1 else [x[10:20], x[:10]]

    refused = solve_eval_statistics(model, bk.batchnorm_layers(model), shuffled, cache_mb=0)
    assert refused.moments is None and refused.refusal.startswith("the data came back in another order")
    np.testing.assert_array_equal(_np(model.get_layer(index=2).moving_variance), np.ones(5))  # put back


def test_models_the_sweep_cannot_take_fall_back_with_the_reason(monkeypatch):
    x = np.random.default_rng(7).standard_normal((24, 4)).astype("float32")
    keras.utils.set_random_seed(8)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(5), layers.BatchNormalization()])
    inputs = keras.Input((4,))
    nested = keras.Model(inputs, layers.Dense(2)(inner(inputs)))
    shared_bn = layers.BatchNormalization()
    inputs = keras.Input((4,))
    shared = keras.Model(inputs, shared_bn(layers.Dense(4)(shared_bn(inputs))))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.bn = layers.Dense(3), layers.BatchNormalization()

        def call(self, inputs):
            return self.bn(self.dense(inputs))

    subclassed = Subclassed()
    subclassed(x[:2])
    for model, reason in ((nested, "a BatchNormalization inside"), (shared, "is called more than once"),
                          (subclassed, "not a functional or Sequential model")):
        report = bk.recalibrate(model, x, batch_size=8, mode="eval")
        assert report.notes[0].startswith("eval mode ran repeated passes: the depth-by-depth sweep does not apply")
        assert reason in report.notes[0]


@pytest.mark.parametrize("spatial, window", [([32, 32], [4, 32]), ([7, 7], [7, 7]), ([13, 11], [1, 11]),
                                             ([300], [100]), ([6, 6, 6], [3, 6, 6]), ([1, 1], None),
                                             ([131], None)])
def test_the_pooling_window_tiles_the_spatial_axes_in_blocks_of_at_most_128(spatial, window):
    from bncal.keras.compiled import pool_window

    assert pool_window(spatial) == window


def test_unpacking_takes_out_what_rounding_the_mean_to_the_centre_left():
    """A float16 centre 0.25 off a mean of 1000.3: the spread around it is the variance plus
    0.25**2 more, which the host takes out; counts are values per channel."""
    from bncal.keras.compiled import unpack_moments

    mean, variance = np.array([1000.3, -2.0]), np.array([4.0, 0.5])
    centre = mean.astype(np.float16).astype(np.float64)
    assert centre[0] == 1000.5  # float16 holds 1000.5, not 1000.3
    spread = variance + (mean - centre) ** 2
    second_mean = np.array([7.0, 8.0, 9.0])
    packed = np.concatenate([[40.0, 24.0], mean, second_mean, spread, np.ones(3)])
    found = unpack_moments(packed, [("a", 2, "float16"), ("b", 3, "float32")])
    (count, got_mean, got_variance), = found["a"]
    assert count == 20 and np.array_equal(got_mean, mean)
    np.testing.assert_allclose(got_variance, variance, rtol=1e-12)
    (count, got_mean, got_variance), = found["b"]
    rounding = second_mean - second_mean.astype(np.float32)
    assert count == 8 and np.array_equal(got_mean, second_mean) and np.array_equal(got_variance, 1 - rounding ** 2)


def test_eval_mode_reads_arrays_in_equal_chunks_with_the_statistics_of_any_batching(monkeypatch):
    """Eval-mode statistics do not depend on the batching: arrays go in as few equal batches of at
    most EVAL_CHUNK_BYTES of input as cover them (never fewer rows than batch_size), and give the
    statistics of the same data in batches of 16."""
    x = (np.random.default_rng(4).standard_normal((42, 6, 6, 3)) * 2 + 1).astype("float32")
    monkeypatch.setattr(recalibration, "EVAL_CHUNK_BYTES", 20 * x[0].nbytes)  # 20 rows of input
    chunked, batched = _branchy(), _branchy()
    report = bk.recalibrate(chunked, x, batch_size=4, mode="eval", tol=1e-7)
    assert (report.batches, report.samples) == (3, 42)  # 14 + 14 + 14, not 20 + 20 + 2
    assert bk.recalibrate(_branchy(), x, batch_size=32, mode="eval").batches == 2  # 32 + 10: batch_size wins
    bk.recalibrate(batched, [x[i:i + 16] for i in range(0, 42, 16)], mode="eval", tol=1e-7)
    for (mean_a, var_a), (mean_b, var_b) in zip(_statistics(chunked), _statistics(batched)):
        np.testing.assert_allclose(mean_a, mean_b, rtol=1e-5, atol=1e-6 * np.sqrt(var_b).max())
        np.testing.assert_allclose(var_a, var_b, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bfloat16_inputs_are_reduced_in_float32(mode):
    """Under mixed_bfloat16 the BNs see bfloat16 inputs: their moments are taken in float32 (as
    Keras normalises them), in the traced forward and in the sweep alike, so the first BN's
    statistics are its input's float64 ones, not a bfloat16 sum's."""
    keras.utils.set_random_seed(2)
    x = keras.Input((8, 8, 3))
    h = layers.Conv2D(6, 3, padding="same", dtype="mixed_bfloat16")(x)
    h = layers.BatchNormalization(dtype="mixed_bfloat16")(h)
    h = layers.Conv2D(4, 3, dtype="mixed_bfloat16")(layers.ReLU(dtype="mixed_bfloat16")(h))
    model = keras.Model(x, layers.BatchNormalization(dtype="mixed_bfloat16")(h))
    data = (np.random.default_rng(6).standard_normal((40, 8, 8, 3)) * 3 + 20).astype("float32")
    report = bk.recalibrate(model, data, mode=mode, batch_size=8)
    if mode == "eval":
        assert report.notes[0].startswith("eval mode: exact depth-by-depth sweep (")
    first = _np(model.layers[1](data)).reshape(-1, 6)  # the conv's bfloat16 output, widened
    assert keras.backend.standardize_dtype(model.layers[1](data[:1]).dtype) == "bfloat16"
    (mean, var), _ = _statistics(model)
    np.testing.assert_allclose(mean, first.mean(0), rtol=1e-6, atol=1e-7 * np.sqrt(first.var(0)).max())
    np.testing.assert_allclose(var, first.var(0), rtol=1e-6)
