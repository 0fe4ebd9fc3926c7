"""Run by tests/test_keras_tf.py in a subprocess: bncal on Keras's TensorFlow backend with torch
made unimportable (a meta-path finder refuses it), as a TensorFlow user without PyTorch has it.

Legacy ``.h5`` files of Keras 3 and (with tf_keras installed) Keras 2 origin go through
``bncal inspect``, ``check`` and ``recalibrate -o .keras``; the top-level calls hand a Keras model
over. Prints one JSON object of what happened, for the test to judge.
"""

import importlib.abc
import json
import os
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import bncal  # noqa: E402
import bncal.keras as bk  # noqa: E402
from bncal.cli import main  # noqa: E402
from models import keras_zoo  # noqa: E402

CALIBRATION, HELDOUT = 1000, 500


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=250, verbose=0), 1) == y))


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def main_(folder: Path) -> dict:
    import keras

    out = {"backend": keras.backend.backend(), "files": {}}
    x, _ = keras_zoo.mnist_nhwc("calib")
    x = x[np.random.default_rng(0).permutation(len(x))[:CALIBRATION]]
    x_test, y_test = keras_zoo.mnist_nhwc("test")
    pick = np.random.default_rng(1).permutation(len(x_test))[:HELDOUT]
    x_test, y_test = x_test[pick], y_test[pick]
    np.save(folder / "calib.npy", x)
    np.save(folder / "test.npy", x_test)

    stale = keras_zoo.mnist_keras_stale()
    stale.save(folder / "keras3.h5")
    files = {"keras3": folder / "keras3.h5"}
    if importlib.util.find_spec("tf_keras") is not None:
        import tf_keras

        old = keras_zoo.mnist_keras_cnn(keras_module=tf_keras)
        old.set_weights(stale.get_weights())
        old.save(folder / "keras2.h5")
        files["keras2"] = folder / "keras2.h5"
    for origin, path in files.items():
        record = out["files"][origin] = {}
        record["accuracy_before"] = accuracy(bk.load_model(path), x_test, y_test)
        record["inspect"] = cli("inspect", path, "--train-batch-size", 2000, "--dataset-size", 4000)
        record["check_before"] = cli("check", path, "--data", folder / "test.npy", "--batch-size", 100)
        fixed = folder / f"{origin}-fixed.keras"
        record["recalibrate"] = cli("recalibrate", path, "--data", folder / "calib.npy", "--batch-size", 250,
                                    "--mode", "eval", "-o", fixed)
        record["check_after"] = cli("check", fixed, "--data", folder / "test.npy", "--batch-size", 100)
        model = bk.load_model(fixed)
        record["accuracy_after"] = accuracy(model, x_test, y_test)
        record["statistics"] = [np.asarray(bn.moving_variance).tolist() for _, bn in bk.batchnorm_layers(model)]

    if "keras2" in files:  # a tf.keras (Keras 2) model in memory, against the same model in Keras 3
        import tf_keras

        old = keras_zoo.mnist_keras_cnn(keras_module=tf_keras)
        old.set_weights(stale.get_weights())
        new = keras_zoo.mnist_keras_stale()
        report = bncal.recalibrate(old, x, mode="eval")
        bk.recalibrate(new, x, mode="eval", batch_size=32)
        out["tf_keras"] = {"handed_over": bk.is_keras_model(old), "layers": len(report.layers),
                           "accuracy": accuracy(old, x_test, y_test),
                           "statistics": [[np.asarray(v).tolist() for v in (bn.moving_mean, bn.moving_variance)]
                                          for m in (old, new) for _, bn in bk.batchnorm_layers(m)]}

    # The top-level calls, on a model in memory.
    model = keras_zoo.mnist_keras_stale()
    report = bncal.recalibrate(model, x, mode="train")
    out["top_level"] = {"recalibrated": len(report.layers), "accuracy": accuracy(model, x_test, y_test),
                        "inspect_source": bncal.inspect_model(model, batch_size=2000, dataset_size=4000).source}
    import tensorflow as tf

    try:  # an unbatched tf.data dataset yields single samples
        bk.recalibrate(model, tf.data.Dataset.from_tensor_slices(x[:8]))
    except bncal.BncalError as exc:
        out["unbatched"] = str(exc)
    try:
        bncal.recalibrate(object(), [np.zeros(2)])
    except bncal.MissingExtra as exc:
        out["not_keras"] = str(exc)
    out["callbacks"] = callbacks()
    out["compiled"] = compiled()
    out["kernels"] = kernels()
    out["torch_imported"] = "torch" in sys.modules
    return out


def callbacks() -> dict:
    """The momentum schedule inside compiled train steps (a graph, and XLA), against the formula
    in float64; and the recalibration at the end of fit, against the data's float64 statistics."""
    import keras

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((48, 3)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 2.0]).astype("float32")
    y = np.zeros((48, 1), "float32")
    schedule = bk.InverseDecayMomentum(base=0.8, step_scale=2, ceiling=0.9)
    mean, var, constant = np.zeros(3), np.ones(3), np.zeros(3)
    for step in range(6):  # 6 batches of 8, in order
        batch = x[8 * step:8 * step + 8].astype(np.float64)
        m = schedule.momentum(step)
        mean, var = m * mean + (1 - m) * batch.mean(0), m * var + (1 - m) * batch.var(0)
        constant = 0.99 * constant + 0.01 * batch.mean(0)
    out = {"expected": [mean.tolist(), var.tolist()], "constant_momentum_mean": constant.tolist()}
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(momentum=0.99),
                                  keras.layers.Dense(1)])
        model.compile("sgd", "mse", jit_compile=jit)
        weights = len(model.weights)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[bk.InverseDecayMomentum(base=0.8, step_scale=2, ceiling=0.9)])
        bn = model.layers[0]
        out[f"jit={jit}"] = {"mean": np.asarray(bn.moving_mean).tolist(), "var": np.asarray(bn.moving_variance).tolist(),
                             "momentum_after": bn.momentum, "weights_same": len(model.weights) == weights,
                             "run_eagerly": bool(model.run_eagerly)}
    recalibrate = bk.RecalibrateOnTrainEnd(x[:40], mode="eval", batch_size=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[recalibrate])
    bn = model.layers[0]
    out["recalibrated"] = {"mean": np.asarray(bn.moving_mean).tolist(), "var": np.asarray(bn.moving_variance).tolist(),
                           "reference": [x[:40].astype(np.float64).mean(0).tolist(),
                                         x[:40].astype(np.float64).var(0).tolist()],
                           "samples": recalibrate.report.samples}
    return out


def compiled() -> dict:
    """Train- and eval-mode recalibration through the traced forward (bncal.keras.compiled) and
    through the eager tap, on a small branching model; and the first BN's float64 reference."""
    import keras
    from keras import layers

    from bncal.keras import compiled as engine, recalibration

    def model():
        keras.utils.set_random_seed(11)
        x = keras.Input((6, 6, 3))
        a = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(5, 3, padding="same")(x)))
        b = layers.BatchNormalization()(layers.Conv2D(5, 1)(x))
        out = layers.ReLU()(layers.BatchNormalization()(layers.Add()([layers.Conv2D(5, 3, padding="same")(a), b])))
        return keras.Model(x, layers.Dense(4)(layers.BatchNormalization()(layers.Dense(7)(layers.Flatten()(out)))))

    x = (np.random.default_rng(3).standard_normal((50, 6, 6, 3)) * 2 + 1).astype("float32")
    batches = [x[:16], x[16:32], x[32:48], x[48:]]
    stats = lambda m: [[np.asarray(v, np.float64).tolist() for v in (bn.moving_mean, bn.moving_variance)]
                       for _, bn in bk.batchnorm_layers(m)]
    out = {}
    for mode in ("train", "eval"):
        fast = model()
        report = bk.recalibrate(fast, batches, mode=mode, tol=1e-7)
        traces = sum(f.traces for kept in engine._FORWARDS.get(fast, {}).values() for f in [kept])
        refusal = recalibration.compiled_refusal
        recalibration.compiled_refusal = lambda *a, **k: "asked for the eager tap"
        try:
            slow = model()
            bk.recalibrate(slow, batches, mode=mode, tol=1e-7)
        finally:
            recalibration.compiled_refusal = refusal
        h = np.asarray(fast.get_layer(index=1)(x), np.float64).reshape(-1, 5)
        out[mode] = {"compiled": stats(fast), "eager": stats(slow), "traces": traces, "samples": report.samples,
                     "passes": report.passes, "converged": report.converged, "notes": report.notes,
                     "reference": [h.mean(0).tolist(), h.var(0).tolist()]}
    return out


def kernels() -> dict:
    """TensorFlow's kernels in the traced forward against float64, on inputs of awkward shapes
    and far-off means: the pooled moments (through the packing the forward returns), the fused
    normalisation, and the bulk reads and assigns of a model's statistics variables."""
    import gc
    import weakref

    import keras
    import tensorflow as tf

    from bncal.keras import compiled as engine, layers as bn_layers

    rng = np.random.default_rng(5)
    moments = []
    for shape in [(32, 32, 32, 16), (32, 7, 7, 8), (16, 13, 11, 4), (8, 300, 3), (4, 6, 6, 6, 4), (1, 4, 4, 8),
                  (2, 2, 2, 8), (64, 12)]:
        bn = keras.layers.BatchNormalization()
        bn.build(shape)
        channels = shape[-1]
        for offset in (0.0, 3.0, 100.0, 1000.0):
            sd = np.exp(rng.uniform(-3, 3, channels))
            x = (rng.standard_normal(shape) * sd + offset * sd * rng.choice([-1, 1], channels)).astype("float32")
            traced = {}

            def packed(t):
                flat, traced["layout"] = engine.pack_moments([("bn", engine.channel_moments(bn, t))])
                return flat

            function = tf.function(packed)
            flat = function(tf.constant(x)).numpy()
            graph = function.get_concrete_function(tf.constant(x)).graph
            [(count, mean, var)] = engine.unpack_moments(flat, traced["layout"])["bn"]
            wide = x.astype(np.float64).reshape(-1, channels)
            moments.append({"shape": list(shape), "offset": offset, "count": count, "rows": len(wide),
                            "pools": sum(op.type in ("AvgPool", "AvgPool3D") for op in graph.get_operations()),
                            "mean_error": np.abs(mean - wide.mean(0)).tolist(), "sd": np.sqrt(wide.var(0)).tolist(),
                            "abs_mean": np.abs(wide.mean(0)).tolist(),
                            "var_error": (np.abs(var - wide.var(0)) / wide.var(0)).max()})
    normalised = []
    for shape, center, scale, epsilon in [((8, 5, 5, 6), True, True, 1e-3), ((8, 5, 5, 6), False, False, 1e-5),
                                          ((8, 9, 6), True, True, 1e-5), ((4, 3, 3, 3, 6), True, False, 1e-3),
                                          ((16, 6), False, True, 1e-3)]:
        bn = keras.layers.BatchNormalization(center=center, scale=scale, epsilon=epsilon)
        bn.build(shape)
        if scale:
            bn.gamma.assign(rng.uniform(0.5, 2, 6).astype("float32"))
        if center:
            bn.beta.assign(rng.uniform(-1, 1, 6).astype("float32"))
        x = rng.standard_normal(shape).astype("float32") * 3 + 2
        mean, var = rng.uniform(1, 3, 6).astype("float32"), rng.uniform(4, 16, 6).astype("float32")
        y = tf.function(lambda t: engine.normalise(bn, t, mean, var))(tf.constant(x)).numpy()
        gamma = np.asarray(bn.gamma, np.float64) if scale else 1.0
        beta = np.asarray(bn.beta, np.float64) if center else 0.0
        reference = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + epsilon) * gamma + beta
        normalised.append({"shape": list(shape), "error": float(np.abs(y - reference).max()),
                           "scale": float(np.abs(reference).max())})
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4)
    variables = [v for _, bn in bk.batchnorm_layers(model) for v in (bn.moving_mean, bn.moving_variance)]
    values = [rng.standard_normal(v.shape).astype("float32") for v in variables]
    bn_layers.assign_values(variables, values)
    read = bn_layers.variable_values(variables)
    bulk = {"variables": len(variables), "traced": bn_layers._bulk_io(variables) is not None,
            "assigned": all(np.array_equal(np.asarray(v), value) for v, value in zip(variables, values)),
            "read": all(np.array_equal(a, value) for a, value in zip(read, values))}
    held = weakref.ref(variables[0].value)
    del model, variables, read
    gc.collect()
    bulk["freed"] = held() is None
    return {"moments": moments, "normalised": normalised, "bulk": bulk}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main_(Path(sys.argv[1]))))
