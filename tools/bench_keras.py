"""Keras recalibration cost against ``model.predict`` over the same batches, side by side.

For each keras.applications family (``weights=None``, BN statistics left at Keras's initial
0/1, ``--classes`` outputs) and the same random calibration images:

- predict:  ``model.predict(x, batch_size=B)`` (Keras's compiled inference forward), the unit;
- keras train: Keras's own train-mode forward over the same batches (``model(x, training=True)``,
  traced once), what any train-mode pass costs at least;
- train:    ``bncal.keras.recalibrate(model, x, mode="train", batch_size=B)``;
- eval:     ``bncal.keras.recalibrate(model, x, mode="eval", batch_size=B)``, with its passes and
  forward-equivalents (the sweep's, from its report note, plus one per further pass).

``first`` columns: the first call of each on a fresh model, graph tracing included (predict's
first call traces its predict function the same way). The other columns: the median over
``--rounds`` of later calls, every trace reused (bncal keeps its traced forwards with the model),
and the ratios of the fastest rounds (on a shared machine the least disturbed estimate; the
medians move by 20 % from run to run there).
The targets of issue 23 are train <= 1.2x predict and eval <= 2 forward-equivalents.

    KERAS_BACKEND=tensorflow PYTHONPATH=. /work/venvs/tf/bin/python tools/bench_keras.py \\
        [--size 64] [--samples 128] [--batch 32] [--rounds 3] [--families ResNet50 MobileNetV2 ...] [--json out.json]

Needs Keras (any backend; the issue's numbers are for TensorFlow). Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _forward_equivalents(report) -> float:
    """The sweep's forward-equivalents (its note) plus one per later pass; passes when no sweep ran."""
    for note in report.notes:
        found = re.search(r"sweep \(([0-9.]+) forward-equivalents", note)
        if found:
            return float(found.group(1)) + report.passes - 1
    return float(report.passes)


def _keras_train_forward(keras, model, x, batch: int):
    """Keras's own train-mode forward over the batches: ``model(x, training=True)``, traced once
    (``tf.function`` on TensorFlow) like predict's forward; every BN normalises with its batch
    statistics and updates its moving averages. What any train-mode pass costs at least."""
    forward = lambda inputs: model(inputs, training=True)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        forward = tf.function(forward, autograph=False)
    return lambda: [keras.ops.convert_to_numpy(forward(x[start:start + batch]))
                    for start in range(0, len(x), batch)]


def bench(family: str, *, size: int, samples: int, batch: int, classes: int, rounds: int) -> dict:
    import keras
    import numpy as np

    import bncal.keras as bk

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(0, 255, (samples, size, size, 3)).astype("float32")
    row = {"family": family, "backend": keras.backend.backend()}
    calls, reports = {}, {}
    for mode in ("predict", "keras_train", "train", "eval"):  # a fresh model for each first call
        model = getattr(keras.applications, family)(weights=None, input_shape=(size, size, 3), classes=classes)
        if mode == "predict":
            calls[mode] = lambda model=model: model.predict(x, batch_size=batch, verbose=0)
        elif mode == "keras_train":
            calls[mode] = _keras_train_forward(keras, model, x, batch)
        else:
            calls[mode] = lambda model=model, mode=mode: bk.recalibrate(model, x, mode=mode, batch_size=batch)
        row[f"{mode}_first_s"], reports[mode] = _timed(calls[mode])
        row["bn_layers"] = len(bk.batchnorm_layers(model))
    times = {mode: [] for mode in calls}
    for _ in range(rounds):  # interleaved, so a busy spell of the machine touches all of them alike
        for mode, call in calls.items():
            seconds, reports[mode] = _timed(call)
            times[mode].append(seconds)
    for mode in calls:
        row[f"{mode}_s"] = statistics.median(times[mode])
        row[f"{mode}_min_s"] = min(times[mode])
    report = reports["eval"]
    row.update(eval_passes=report.passes, eval_forward_equivalents=_forward_equivalents(report),
               eval_notes=report.notes)
    for mode in ("keras_train", "train", "eval"):
        row[f"{mode}_x_predict"] = row[f"{mode}_s"] / row["predict_s"]
        row[f"{mode}_min_x_predict"] = row[f"{mode}_min_s"] / row["predict_min_s"]
        row[f"{mode}_first_x_predict"] = row[f"{mode}_first_s"] / row["predict_first_s"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'family':<15} {'BNs':>4} {'predict s':>10} {'keras train/pred':>16} {'train s':>8} {'train/pred':>10} "
          f"{'eval s':>7} {'eval/pred':>9} {'passes':>6} {'fwd-eq':>6} | fastest rounds: {'keras train':>11} "
          f"{'train':>6} {'eval':>6} | first calls: {'predict':>7} {'train':>6} {'eval':>6}")
    for family in args.families:
        row = bench(family, size=args.size, samples=args.samples, batch=args.batch, classes=args.classes,
                    rounds=args.rounds)
        rows.append(row)
        print(f"{family:<15} {row['bn_layers']:>4} {row['predict_s']:>10.2f} {row['keras_train_x_predict']:>16.2f} "
              f"{row['train_s']:>8.2f} {row['train_x_predict']:>10.2f} {row['eval_s']:>7.2f} "
              f"{row['eval_x_predict']:>9.2f} {row['eval_passes']:>6} {row['eval_forward_equivalents']:>6.2f} | "
              f"{'':15} {row['keras_train_min_x_predict']:>11.2f} {row['train_min_x_predict']:>6.2f} "
              f"{row['eval_min_x_predict']:>6.2f} | {'':13}{row['predict_first_s']:>7.2f} {row['train_first_s']:>6.2f} "
              f"{row['eval_first_s']:>6.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
