"""bncal for TensorFlow users, on Keras's TensorFlow backend, without torch.

Runs where TensorFlow is installed (``pip install tensorflow-cpu``, and ``tf_keras`` for the
Keras 2 file); skipped elsewhere, e.g. in bncal's main CI venv, whose Keras runs on torch. Keras
reads its backend once per process, so the work happens in a subprocess
(``tests/_keras_tf_worker.py``) that makes torch unimportable.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests_support import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="needs TensorFlow (pip install tensorflow-cpu tf_keras)")


def _worker(script: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / script), *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def without_torch(tmp_path_factory):
    return _worker("_keras_tf_worker.py", tmp_path_factory.mktemp("keras_tf"))


def test_nothing_imports_torch_and_keras_runs_on_tensorflow(without_torch):
    assert without_torch["backend"] == "tensorflow" and without_torch["torch_imported"] is False
    assert without_torch["not_keras"] == "recalibrating a PyTorch model needs PyTorch: pip install 'bncal[torch]'"


@pytest.mark.parametrize("origin", ["keras3", "keras2"])
def test_legacy_h5_files_are_inspected_checked_and_repaired(without_torch, origin):
    if origin not in without_torch["files"]:
        pytest.skip("needs tf_keras for a Keras 2 file")
    record = without_torch["files"][origin]
    code, output = record["inspect"]
    assert code == 0 and "BN010 warning" in output and "needs the form" not in output, output
    code, output = record["check_before"]
    assert code == 1 and "FAILED: 5 of 5 BatchNorm layers" in output, output
    code, output = record["recalibrate"]
    assert code == 0 and "recalibrated 5 BatchNorm layers from 1000 samples" in output, output
    assert "PyTorch" not in output
    code, output = record["check_after"]
    assert code == 0 and output.strip().endswith("PASSED"), output
    assert record["accuracy_before"] < 0.3 and record["accuracy_after"] > 0.95


def test_both_origins_give_the_same_statistics(without_torch):
    files = without_torch["files"]
    if "keras2" not in files:
        pytest.skip("needs tf_keras for a Keras 2 file")
    for a, b in zip(files["keras3"]["statistics"], files["keras2"]["statistics"]):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_top_level_calls_hand_the_keras_model_over(without_torch):
    top = without_torch["top_level"]
    assert top["recalibrated"] == 5 and top["inspect_source"] == "keras" and top["accuracy"] > 0.95


def test_an_unbatched_tf_data_dataset_is_refused_in_one_line(without_torch):
    assert without_torch["unbatched"] == ("calibration batch 0 has shape (28, 28, 1) where the model takes ('batch', "
                                          "28, 28, 1): it is one sample, not a batch; batch the data (a tf.data "
                                          "dataset: dataset.batch(64))")


@pytest.mark.parametrize("jit", [False, True])
def test_inverse_decay_momentum_reaches_the_compiled_train_step(without_torch, jit):
    """fit's compiled step (a graph; XLA with jit_compile) reads the scheduled momentum at every
    step: the moving averages follow m <- mom_t m + (1 - mom_t) batch, mom_t = min(1 - 0.8**(t/2), 0.9)."""
    result = without_torch["callbacks"]
    run = result[f"jit={jit}"]
    mean, var = result["expected"]
    np.testing.assert_allclose(run["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["var"], var, rtol=1e-5, atol=1e-6)
    assert np.abs(np.subtract(run["mean"], result["constant_momentum_mean"])).max() > 0.5  # what 0.99 would give
    assert run["momentum_after"] == 0.99 and run["weights_same"] and not run["run_eagerly"]


def test_recalibrate_on_train_end_leaves_the_exact_statistics(without_torch):
    result = without_torch["callbacks"]["recalibrated"]
    np.testing.assert_allclose(result["mean"], result["reference"][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result["var"], result["reference"][1], rtol=1e-6)
    assert result["samples"] == 40


def test_a_tf_keras_model_in_memory_is_recalibrated_like_the_keras_3_one(without_torch):
    """Keras 2's BatchNormalization holds the same variables: the same statistics as Keras 3's
    (tested against float64 in tests/test_keras.py) on the same weights and data."""
    if "tf_keras" not in without_torch:
        pytest.skip("needs tf_keras")
    result = without_torch["tf_keras"]
    assert result["handed_over"] and result["layers"] == 5 and result["accuracy"] > 0.95
    statistics = result["statistics"]
    for (mean_2, var_2), (mean_3, var_3) in zip(statistics[:5], statistics[5:]):
        np.testing.assert_allclose(mean_2, mean_3, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var_2, var_3, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_traced_forward_gives_the_eager_taps_statistics(without_torch, mode):
    """Train: one tf.function, traced for the batches of 16 and once more for the short last one.
    Eval: the depth-by-depth sweep and one confirming pass through its own traced steps."""
    result = without_torch["compiled"][mode]
    assert result["samples"] == 50 and result["converged"]
    if mode == "train":
        assert result["traces"] == 2 and result["passes"] == 1
    else:
        assert result["passes"] == 2 and result["notes"][0].startswith("eval mode: exact depth-by-depth sweep (")
    for (mean_a, var_a), (mean_b, var_b) in zip(result["compiled"], result["eager"]):
        np.testing.assert_allclose(mean_a, mean_b, rtol=1e-5, atol=1e-6 * np.sqrt(var_b).max())
        np.testing.assert_allclose(var_a, var_b, rtol=1e-5)
    np.testing.assert_allclose(result["compiled"][0][0], result["reference"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result["compiled"][0][1], result["reference"][1], rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="tf.compat.v1.layers needs tf_keras")
def test_the_seeds_tf1_graph_is_repaired_to_its_float64_exact_accuracy():
    """conv-BN-ReLU blocks and a dense BN, trained without the UPDATE_OPS dependency (moving
    statistics still 0/1): bncal.tf1.recalibrate writes the float64 eval-mode statistics, computed
    independently in numpy, into the graph's variables."""
    result = _worker("_tf1_worker.py")
    assert result["report"] == {"layers": ["bn1", "bn2", "bn_fc"], "passes": 4, "converged": True}
    for name, (mean_error_sd, var_error) in result["errors"].items():
        assert mean_error_sd < 1e-5 and var_error < 1e-5, (name, mean_error_sd, var_error)
    assert result["accuracy_stale"] < result["accuracy_float64"] - 0.2
    # float32 graph against float64 numpy: at most one of the 500 digits may sit on a decision boundary
    assert abs(result["accuracy_recalibrated"] - result["accuracy_float64"]) <= 0.002
    assert result["accuracy_float64"] > 0.9
    assert max(result["train_bn1_errors"]) < 1e-5
    assert "only one value per channel" in result["one_sample_train"]
    assert result["torch_imported"] is False


def test_the_pooled_moments_hold_float32s_floor(without_torch):
    """Block sums by average pooling (at most 128 values each in float32, float64 beyond), the
    variance around the mean rounded to float32 and corrected on the host: the mean within about
    one float32 rounding of itself plus 1e-7 sd, the variance within 3e-7, even 1000 sd off zero."""
    cases = without_torch["kernels"]["moments"]
    assert [case["pools"] for case in cases[::4]] == [2] * 7 + [0]  # one per pass where there is space to pool
    for case in cases:
        assert case["count"] == case["rows"], case["shape"]
        allowed = 1e-7 * np.asarray(case["sd"]) + 2.5e-7 * np.asarray(case["abs_mean"])
        assert np.all(np.asarray(case["mean_error"]) <= allowed), (case["shape"], case["offset"])
        assert case["var_error"] < 3e-7, (case["shape"], case["offset"], case["var_error"])


def test_the_fused_normalisation_is_kerass_formula(without_torch):
    """One FusedBatchNormV3 in inference mode for ranks 2 to 5, without centre or scale, at epsilon
    1e-5 (which tf.nn.fused_batch_norm would raise to 1.001e-5)."""
    for case in without_torch["kernels"]["normalised"]:
        assert case["error"] < 1e-6 * case["scale"], case


def test_a_models_statistics_are_read_and_assigned_in_one_call_and_then_freed(without_torch):
    bulk = without_torch["kernels"]["bulk"]
    assert bulk == {"variables": 104, "traced": True, "assigned": True, "read": True, "freed": True}
