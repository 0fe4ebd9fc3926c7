"""The batch-composition test on the Keras path: the same policy as PyTorch and ONNX (bncal.calibration).

Class-ordered batches make train-mode statistics, and check's train-mode reference, depend on the
batching; recalibrate warns and check says so instead of blaming the statistics. Keras lays images
out channels last, and the test reads them that way.
"""

import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")

import bncal.keras as bk  # noqa: E402
from bncal.calibration import BatchComposition  # noqa: E402
from models import keras_zoo  # noqa: E402


def test_channels_last_inputs_give_the_statistic_of_channels_first_ones():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=i % 3, size=(16, 5, 5, 3)).astype(np.float32) for i in range(10)]
    last, first = BatchComposition(), BatchComposition()
    for b in batches:
        last.add(b, channel_axis=-1)
        first.add(np.moveaxis(b, -1, 1))
    # The per-sample means are float32 sums taken in another order (a matrix product channels last).
    assert last.result().statistic == pytest.approx(first.result().statistic, rel=1e-6)


@pytest.fixture(scope="module")
def digits():
    """500 held-out digits, class-ordered and shuffled."""
    x, y = keras_zoo.mnist_nhwc("test")
    x, y = x[:500], y[:500]
    order = np.argsort(y, kind="stable")
    return x[order], x[np.random.default_rng(0).permutation(len(x))]


def _batches(x, size=50):
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_keras_recalibrate_warns_of_class_ordered_batches_in_train_mode(digits):
    ordered, shuffled = digits
    warned = bk.recalibrate(keras_zoo.mnist_keras_stale(), _batches(ordered), mode="train")
    assert len(warned.warnings) == 1 and "far from random draws" in warned.warnings[0]
    assert bk.recalibrate(keras_zoo.mnist_keras_stale(), _batches(shuffled), mode="train").warnings == []
    # Eval-mode statistics do not depend on the batching: nothing to warn of.
    assert bk.recalibrate(keras_zoo.mnist_keras_stale(), _batches(ordered), mode="eval", max_passes=2).warnings == []


def test_keras_check_names_the_batching_not_the_statistics(digits):
    ordered, shuffled = digits
    model = keras_zoo.mnist_keras_stale()
    bk.recalibrate(model, [shuffled], mode="train")  # one batch of all 500: their population statistics
    report = bk.check(model, _batches(ordered))
    assert report.warnings and "far from random draws" in report.warnings[0]
    assert report.verdict == "FAILED" and "shuffle the data" in report.reasons[-1]
    assert not any("recalibrate them" in reason for reason in report.reasons)
    assert bk.check(model, _batches(shuffled)).passed
