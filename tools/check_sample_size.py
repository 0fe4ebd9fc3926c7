"""Does ``check`` tell too few samples from stale statistics? The issue-21 EfficientNetB0 case.

Keras ``EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10)`` is recalibrated (train
mode, batches of 32) on ``--samples`` smooth random images and checked on as many others of the
same distribution, at each ``--batches`` size: the statistics are right, so the check should say
PASSED or NOT ENOUGH DATA, never FAILED. Then the power side, at batches of 32: the model never
recalibrated, and recalibrated on images of lower contrast (20 and 30 against 40): those must
still FAIL. Prints the verdict and the layer counts (pass / more data / batch too small / FAIL).

    KERAS_BACKEND=torch PYTHONPATH=. python tools/check_sample_size.py [--samples 128] [--batches 32 64]

Measured (2 torch threads, about 3 s per check; issue 21): before the allowance for the moving
statistics' own error and for many channels, batch 32 FAILED with 8 of 49 layers and batch 64 with
14; after, NOT ENOUGH DATA at both (9 and 14 layers "more data"). Never run by the tests.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")


def images(n, seed, contrast=40.0):
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
    return (smooth * contrast + 128 + rng.normal(scale=10, size=smooth.shape)).astype(np.float32)


def counts(report) -> str:
    layers = report.layers
    fail = sum(not l.passed and not l.unresolved and not l.needed_batch for l in layers)
    return (f"{sum(l.passed for l in layers)} pass / {sum(l.unresolved for l in layers)} more data / "
            f"{sum(bool(l.needed_batch) for l in layers)} batch too small / {fail} FAIL of {len(layers)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args()
    import keras

    import bncal.keras as bk

    def model(calibration=None):
        keras.utils.set_random_seed(0)
        net = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10)
        if calibration is not None:
            bk.recalibrate(net, [calibration[i:i + 32] for i in range(0, len(calibration), 32)], mode="train")
        return net

    n = args.samples
    other = images(n, 2)
    right = model(images(n, 1))
    for batch in args.batches:
        report = bk.check(right, [other[i:i + batch] for i in range(0, n, batch)])
        print(f"right statistics, batches of {batch}: {counts(report)}\n  {report.verdict_line()}")
    for label, calibration in (("never recalibrated", None), ("recalibrated at contrast 20", images(n, 1, 20.0)),
                               ("recalibrated at contrast 30", images(n, 1, 30.0))):
        report = bk.check(model(calibration), [other[i:i + 32] for i in range(0, n, 32)])
        print(f"{label}, batches of 32: {counts(report)}\n  {report.verdict_line()}")


if __name__ == "__main__":
    main()
