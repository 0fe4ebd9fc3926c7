"""Run by tests/test_keras_tf.py in a subprocess: the seed's TF1 network (conv-BN-ReLU blocks and
a dense BN, ``tf.compat.v1.layers.batch_normalization`` without the ``UPDATE_OPS`` dependency),
trained briefly on the shipped digits, then repaired by :func:`bncal.tf1.recalibrate`.

The reference is independent of TensorFlow: the network's weights run in float64 numpy over all
calibration digits as one batch with batch-statistic normalisation, which is what eval-mode
statistics are (each BN's input statistics when every earlier BN uses its own). Prints one
JSON object for the test to judge.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.compat.v1.layers lives in tf_keras

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bncal.tf1  # noqa: E402
from models.mnist_data import mnist_numpy  # noqa: E402

tf.compat.v1.disable_eager_execution()
tf.config.experimental.enable_op_determinism()
v1 = tf.compat.v1
EPS = 1e-3


def build():
    x = v1.placeholder(tf.float32, (None, 28, 28, 1), name="images")
    y = v1.placeholder(tf.int64, (None,), name="labels")
    training = v1.placeholder(tf.bool, (), name="is_training")
    h = x
    for i, filters in enumerate((8, 16), start=1):
        h = v1.layers.conv2d(h, filters, 3, padding="same", use_bias=False, name=f"conv{i}")
        h = v1.layers.batch_normalization(h, training=training, epsilon=EPS, name=f"bn{i}")
        h = tf.nn.relu(h)
        h = v1.layers.max_pooling2d(h, 2, 2)
    h = v1.layers.flatten(h)
    h = v1.layers.dense(h, 32, use_bias=False, name="fc")
    h = v1.layers.batch_normalization(h, training=training, epsilon=EPS, name="bn_fc")
    logits = v1.layers.dense(tf.nn.relu(h), 10, name="logits")
    loss = v1.losses.sparse_softmax_cross_entropy(y, logits)
    train = v1.train.AdamOptimizer(3e-3).minimize(loss)  # the seed's bug: no UPDATE_OPS dependency
    return x, y, training, logits, train


def reference(weights, x):
    """Float64 numpy: every BN on the statistics of all of ``x`` as one batch; returns them."""
    def conv(h, w):
        padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
        return np.einsum("nhwcij,ijco->nhwo", windows, w, optimize=True)

    def bn(h, name):
        axes = tuple(range(h.ndim - 1))
        mean, var = h.mean(axes), h.var(axes)
        stats[name] = (mean, var)
        return (h - mean) / np.sqrt(var + EPS) * weights[f"{name}/gamma"] + weights[f"{name}/beta"]

    stats = {}
    h = x.astype(np.float64)
    for i in (1, 2):
        h = np.maximum(bn(conv(h, weights[f"conv{i}/kernel"]), f"bn{i}"), 0)
        n, hh, ww, c = h.shape
        h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = bn(h.reshape(len(h), -1) @ weights["fc/kernel"], "bn_fc")
    return stats


def predict(weights, stats, x):
    """Float64 numpy inference with the given BN statistics; the class of each digit."""
    def conv(h, w):
        padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
        return np.einsum("nhwcij,ijco->nhwo", windows, w, optimize=True)

    def bn(h, name):
        mean, var = stats[name]
        return (h - mean) / np.sqrt(var + EPS) * weights[f"{name}/gamma"] + weights[f"{name}/beta"]

    h = x.astype(np.float64)
    for i in (1, 2):
        h = np.maximum(bn(conv(h, weights[f"conv{i}/kernel"]), f"bn{i}"), 0)
        n, hh, ww, c = h.shape
        h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = np.maximum(bn(h.reshape(len(h), -1) @ weights["fc/kernel"], "bn_fc"), 0)
    return np.argmax(h @ weights["logits/kernel"] + weights["logits/bias"], 1)


def main():
    rng = np.random.default_rng(0)
    x_all, y_all = mnist_numpy("calib")
    x_all = x_all.transpose(0, 2, 3, 1)
    order = rng.permutation(len(x_all))
    x_train, y_train = x_all[order], y_all[order]
    x_calib = x_train[:1000]
    x_test, y_test = mnist_numpy("test")
    x_test = x_test.transpose(0, 2, 3, 1)[:500]
    y_test = y_test[:500]
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        x, y, training, logits, train = build()
        # One thread and deterministic ops: the same trained weights on every run.
        session = v1.Session(graph=graph, config=v1.ConfigProto(intra_op_parallelism_threads=1,
                                                                inter_op_parallelism_threads=1))
        session.run(v1.global_variables_initializer())
        for step in range(60):  # batch 128
            i = (step * 128) % (len(x_train) - 128)
            session.run(train, {x: x_train[i:i + 128], y: y_train[i:i + 128], training: True})

        def accuracy():
            return float(np.mean(np.argmax(session.run(logits, {x: x_test, training: False}), 1) == y_test))

        out = {"accuracy_stale": accuracy()}
        weights = {v.op.name: np.asarray(session.run(v), np.float64) for v in v1.global_variables()}
        expected = reference(weights, x_calib)
        batches = [x_calib[i:i + 100] for i in range(0, len(x_calib), 100)]
        report = bncal.tf1.recalibrate(session, x, batches, training=training, mode="eval", tol=0)
        out["report"] = {"layers": [l.name for l in report.layers], "passes": report.passes,
                         "converged": report.converged}
        out["accuracy_recalibrated"] = accuracy()
        out["accuracy_float64"] = float(np.mean(predict(weights, expected, x_test) == y_test))
        errors, variables = {}, bncal.tf1.batchnorm_variables(graph)
        for name, (mean, var) in expected.items():
            got_mean, got_var = (np.asarray(session.run(v), np.float64) for v in variables[name])
            errors[name] = [float(np.max(np.abs(got_mean - mean) / np.sqrt(var))),
                            float(np.max(np.abs(got_var / var - 1)))]
        out["errors"] = errors
        # Train mode (PreciseBN): the first BN's input depends on no BN, so its statistics are the same.
        bncal.tf1.recalibrate(session, x, batches, training=training, mode="train")
        got_mean, got_var = (np.asarray(session.run(v), np.float64) for v in variables["bn1"])
        mean, var = expected["bn1"]
        out["train_bn1_errors"] = [float(np.max(np.abs(got_mean - mean) / np.sqrt(var))),
                                   float(np.max(np.abs(got_var / var - 1)))]
        try:
            bncal.tf1.recalibrate(session, x, [x_calib[:1]], training=training, mode="train")
        except bncal.BncalError as exc:
            out["one_sample_train"] = str(exc)
    out["torch_imported"] = "torch" in sys.modules
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()))
