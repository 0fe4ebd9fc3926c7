"""Keras recalibration cost against ``model.predict`` over the same batches, side by side.

For each keras.applications family (``weights=None``, BN statistics left at Keras's initial
0/1, ``--classes`` outputs) and the same random calibration images:

- predict:  ``model.predict(x, batch_size=B)`` (Keras's compiled inference forward), the unit;
- train:    ``bncal.keras.recalibrate(model, x, mode="train", batch_size=B)``;
- eval:     ``bncal.keras.recalibrate(model, x, mode="eval", batch_size=B)``, with its passes.

Each timing is the median over ``--rounds``, after one warm-up predict (graph tracing). The
targets of issue 23 are train <= 1.2x predict and eval <= 2 forward-equivalents; this script
measures where the Keras path stands (the same number of BN calls, the same data).

    KERAS_BACKEND=tensorflow PYTHONPATH=. /work/venvs/tf/bin/python tools/bench_keras.py \\
        [--size 96] [--samples 256] [--batch 64] [--families ResNet50 MobileNetV2 ...] [--json out.json]

Needs Keras (any backend; the issue's numbers are for TensorFlow). Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FAMILIES = ("ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121")


def _median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(family: str, *, size: int, samples: int, batch: int, classes: int, rounds: int) -> dict:
    import keras
    import numpy as np

    import bncal.keras as bk

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, family)(weights=None, input_shape=(size, size, 3), classes=classes)
    x = np.random.default_rng(0).uniform(0, 255, (samples, size, size, 3)).astype("float32")
    model.predict(x[:batch], batch_size=batch, verbose=0)  # trace the predict function once
    predict = _median_seconds(lambda: model.predict(x, batch_size=batch, verbose=0), rounds)
    reports = {}

    def run(mode):
        reports[mode] = bk.recalibrate(model, x, mode=mode, batch_size=batch)

    train = _median_seconds(lambda: run("train"), rounds)
    evaluation = _median_seconds(lambda: run("eval"), rounds)
    return {"family": family, "bn_layers": len(bk.batchnorm_layers(model)), "predict_s": predict,
            "train_s": train, "train_x_predict": train / predict, "eval_s": evaluation,
            "eval_x_predict": evaluation / predict, "eval_passes": reports["eval"].passes,
            "backend": keras.backend.backend()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'family':<15} {'BNs':>4} {'predict s':>10} {'train s':>9} {'train/pred':>10} {'eval s':>8} "
          f"{'eval/pred':>9} {'passes':>6}")
    for family in args.families:
        row = bench(family, size=args.size, samples=args.samples, batch=args.batch, classes=args.classes,
                    rounds=args.rounds)
        rows.append(row)
        print(f"{family:<15} {row['bn_layers']:>4} {row['predict_s']:>10.2f} {row['train_s']:>9.2f} "
              f"{row['train_x_predict']:>10.2f} {row['eval_s']:>8.2f} {row['eval_x_predict']:>9.2f} "
              f"{row['eval_passes']:>6}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
