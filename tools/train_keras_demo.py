"""Train the Keras example the way the post warns against: large batches, few steps, momentum 0.99.

``models/keras_zoo.py:mnist_keras_cnn`` is trained on the calibration split of the shipped
digits (4000) with batch 2000 for 10 epochs: 20 steps in all. Keras's default BN momentum 0.99
then leaves ``0.99**20 = 0.82`` of the weight on the initial statistics (mean 0, variance 1):
training (batch statistics) works, inference (moving statistics) does not.

Writes ``models/mnist_keras_stale.keras`` (uncompiled, so no optimizer state) and prints
held-out accuracies (1000 test digits): inference mode with the stored statistics, and batch
statistics (train-mode BN, Dropout off, shuffled held-out batches of 500). ``--momentum 1.0`` trains the
TF1 case instead (the statistics are never updated).

Reproducible: Keras's torch backend, ``keras.utils.set_random_seed(0)``, 2 threads,
``torch.use_deterministic_algorithms(True)``. Run from the repository root::

    python tools/train_keras_demo.py      # about 30-60 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras  # noqa: E402
from models import keras_zoo  # noqa: E402

SEED = 0
EPOCHS = 10
BATCH = 2000
LR = 2e-2


def accuracy(model, x, y, *, training: bool, batch_size: int = 500) -> float:
    """Held-out accuracy; ``training=True`` normalises with batch statistics (Dropout set off,
    moving statistics restored afterwards)."""
    dropouts = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
    rates = [l.rate for l in dropouts]
    saved = [v.numpy().copy() for v in model.non_trainable_variables]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        correct = 0
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits = keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=training))
                correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    finally:
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
        for variable, value in zip(model.non_trainable_variables, saved):
            variable.assign(value)
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--momentum", type=float, default=0.99, help="Keras BN momentum (default 0.99)")
    parser.add_argument("--out", type=Path, default=keras_zoo.MNIST_KERAS_STALE)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    keras.utils.set_random_seed(SEED)
    start = time.perf_counter()
    x, y = keras_zoo.mnist_nhwc("calib")
    x_test, y_test = keras_zoo.mnist_nhwc("test")
    order = np.random.default_rng(1).permutation(len(y_test))  # the split is sorted by class: mix the batches
    x_test, y_test = x_test[order], y_test[order]

    model = keras_zoo.mnist_keras_cnn(momentum=args.momentum)
    model.compile(keras.optimizers.Adam(LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=2)
    trained = time.perf_counter()

    plain = keras_zoo.mnist_keras_cnn(momentum=args.momentum)  # uncompiled twin: no optimizer in the file
    plain.set_weights(model.get_weights())
    plain.save(args.out)
    shown = args.out.resolve().relative_to(ROOT) if args.out.resolve().is_relative_to(ROOT) else args.out
    print(f"wrote {shown} ({args.out.stat().st_size} bytes, {plain.count_params()} parameters)")
    print("held-out accuracy (1000 digits):")
    print(f"  inference mode, moving statistics              {accuracy(plain, x_test, y_test, training=False):.4f}")
    print(f"  batch statistics (bs 500, dropout off)         {accuracy(plain, x_test, y_test, training=True):.4f}")
    print(f"training {trained - start:.1f} s, total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
