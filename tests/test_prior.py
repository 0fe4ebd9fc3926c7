"""``prior=N`` (Schneider et al. 2020's source prior) against float64 references, in both modes and
on the PyTorch, ONNX and Keras paths.

The references are written from the paper's definition, not from bncal's passes: each BN's new
statistics are ``N/(N+n)`` times the model's current ones plus ``n/(N+n)`` times those of its
input, ``n`` the number of samples. In eval mode the reference is the paper's adapted network
itself: one float64 forward of all samples as one batch in which every BN computes its input's
statistics, mixes them and normalises with the mix.
"""

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import bncal
from bncal.errors import BncalError
from bncal.onnx.recalibration import recalibrate_onnx
from bncal.torch.recalibration import batchnorm_layers
from bncal.stats import ChannelMoments, mix_with_source
from test_onnx_recalibrate import bn_modules, data, export, first_bn_net, split, stored

PRIOR = 40.0
SIZES = [16, 16, 16, 12]


def _moments(a: torch.Tensor):
    a = a.double()
    dims = [0] + list(range(2, a.dim()))
    return a.mean(dims), a.var(dims, unbiased=False)


def _torch_reference(net, x: np.ndarray, prior: float, mode: str, sizes=SIZES):
    """``[(mean, var)]`` per BN in float64: the mixed statistics the paper's definition gives."""
    ref = copy.deepcopy(net).double()
    w = prior / (prior + len(x))
    source = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bn_modules(ref)]
    inputs = {i: [] for i in range(len(source))}

    def mixed(i):
        mean, var = _moments(torch.cat(inputs[i]))
        return w * source[i][0] + (1 - w) * mean, w * source[i][1] + (1 - w) * var

    def adapted(i):  # eval: normalise with the mix of this very input (all samples in one batch)
        def hook(bn, args):
            inputs[i].append(args[0])
            bn.running_mean[...], bn.running_var[...] = mixed(i)
        return hook

    record = lambda i: lambda bn, args: inputs[i].append(args[0])  # noqa: E731
    hooks = [bn.register_forward_pre_hook(adapted(i) if mode == "eval" else record(i))
             for i, bn in enumerate(bn_modules(ref))]
    ref.train(mode == "train")
    with torch.no_grad():
        for batch in ([x] if mode == "eval" else split(x, sizes)):
            ref(torch.from_numpy(batch).double())
    for h in hooks:
        h.remove()
    return [mixed(i) for i in range(len(source))]


def _assert_close(got, expected, tol):
    """Means in units of the standard deviation, variances relative."""
    for (mean, var), (ref_mean, ref_var) in zip(got, expected):
        ref_mean, ref_var = np.asarray(ref_mean, np.float64), np.asarray(ref_var, np.float64)
        assert np.max(np.abs(np.asarray(mean, np.float64) - ref_mean) / np.sqrt(ref_var)) < tol
        np.testing.assert_allclose(np.asarray(var, np.float64), ref_var, rtol=tol)


@pytest.fixture(scope="module")
def net():
    return first_bn_net()


@pytest.fixture(scope="module")
def x():
    return data(n=sum(SIZES))


def test_mix_is_the_papers_formula_and_zero_weight_leaves_the_target():
    target = ChannelMoments.empty(2).add_array(np.array([[1.0, 10.0], [3.0, 14.0]]))
    mixed = mix_with_source([0.0, 0.0], [1.0, 1.0], target, 0.25)
    np.testing.assert_allclose(mixed.mean, [0.75 * 2.0, 0.75 * 12.0])
    np.testing.assert_allclose(mixed.variance, [0.25 + 0.75 * 1.0, 0.25 + 0.75 * 4.0])
    assert mixed.count == target.count
    np.testing.assert_array_equal(mix_with_source([5.0, 5.0], [9.0, 9.0], target, 0.0).mean, target.mean)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_prior_matches_the_float64_reference(net, x, mode):
    model = copy.deepcopy(net)
    batches = [torch.from_numpy(b) for b in split(x, SIZES)]
    report = bncal.recalibrate(model, batches, mode=mode, prior=PRIOR, tol=1e-8, max_passes=10)
    assert report.converged
    got = [(bn.running_mean, bn.running_var) for _, bn in batchnorm_layers(model)]
    expected = _torch_reference(net, x, PRIOR, mode)
    _assert_close(got, expected, 2e-5)
    # The prior is visible: without it the first BN (the raw input, mean 3) would hold the data's mean.
    assert abs(float(got[0][0][0]) - float(x[:, 0].mean())) > 0.5
    assert any(note.startswith("prior 40:") for note in report.notes)


def test_torch_prior_zero_is_todays_recalibration(net, x):
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    batches = [torch.from_numpy(v) for v in split(x, SIZES)]
    bncal.recalibrate(a, batches, mode="eval", tol=1e-8)
    bncal.recalibrate(b, batches, mode="eval", tol=1e-8, prior=0)
    for (_, p), (_, q) in zip(batchnorm_layers(a), batchnorm_layers(b)):
        assert torch.equal(p.running_mean, q.running_mean) and torch.equal(p.running_var, q.running_var)


def test_torch_eval_prior_without_the_sweep_reaches_the_same_fixed_point(net, x):
    """A custom forward_fn hides the call from the sweep: the plain passes carry the prior alone."""
    model = copy.deepcopy(net)
    batches = [torch.from_numpy(b) for b in split(x, SIZES)]
    report = bncal.recalibrate(model, batches, mode="eval", prior=PRIOR, tol=1e-9, max_passes=10,
                               forward_fn=lambda m, b: m(b))
    assert report.converged and report.passes > 2
    _assert_close([(bn.running_mean, bn.running_var) for _, bn in batchnorm_layers(model)],
                  _torch_reference(net, x, PRIOR, "eval"), 2e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_onnx_prior_matches_the_float64_reference(net, x, mode):
    proto = export(copy.deepcopy(net), [(2, 3, 9, 9)])
    new_model, report = recalibrate_onnx(proto, split(x, SIZES), mode=mode, prior=PRIOR, tol=1e-8, max_passes=10)
    assert report.converged
    got = list(stored(new_model).values())
    _assert_close(got, _torch_reference(net, x, PRIOR, mode), 2e-5)


@pytest.mark.parametrize("prior", [-1.0, float("nan"), "many"])
def test_bad_prior_is_refused_in_one_line(net, x, prior):
    with pytest.raises(BncalError, match="prior must be a finite number >= 0"):
        bncal.recalibrate(copy.deepcopy(net), [torch.from_numpy(x)], prior=prior)


def test_prior_refuses_non_finite_current_statistics(net, x):
    model = copy.deepcopy(net)
    bn_modules(model)[1].running_var[0] = float("nan")
    with pytest.raises(BncalError, match="non-finite ones; use prior 0"):
        bncal.recalibrate(model, [torch.from_numpy(x)], prior=PRIOR)


# ------------------------------------------------------------------------------------------------
# Keras: a Dense/BN network whose float64 forward is a few lines of numpy. The first BN sees the
# 4x4 positions of each sample (n counts samples, not positions), the Dense layers act per position.

def _keras_net():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    import bncal.keras as bk
    from keras import layers

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4, 4, 3)), layers.BatchNormalization(), layers.Dense(5),
                              layers.BatchNormalization(), layers.ReLU(), layers.Dense(4, use_bias=False),
                              layers.BatchNormalization()])
    rng = np.random.default_rng(6)
    for _, bn in bk.batchnorm_layers(model):
        c = bn.moving_mean.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        bn.beta.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))
        bn.moving_mean.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
    return model, bk


def _np(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _keras_reference(model, bk, x, prior, mode, sizes):
    """The float64 forward of :func:`_keras_net` by hand, BN by BN, with the paper's mix."""
    bns = [bn for _, bn in bk.batchnorm_layers(model)]
    source = [(_np(bn.moving_mean), _np(bn.moving_variance)) for bn in bns]
    gammas, betas = [_np(bn.gamma) for bn in bns], [_np(bn.beta) for bn in bns]
    dense1_w, dense1_b, dense2_w = _np(model.layers[1].kernel), _np(model.layers[1].bias), _np(model.layers[4].kernel)
    w = prior / (prior + len(x))
    inputs = [[] for _ in bns]

    def bn(i, h):
        inputs[i].append(h)
        if mode == "train":
            mean, var = h.reshape(-1, h.shape[-1]).mean(0), h.reshape(-1, h.shape[-1]).var(0)
        else:
            mean, var = mixed(i)
        return (h - mean) / np.sqrt(var + bns[i].epsilon) * gammas[i] + betas[i]

    def mixed(i):
        h = np.concatenate(inputs[i]).reshape(-1, inputs[i][0].shape[-1])
        return w * source[i][0] + (1 - w) * h.mean(0), w * source[i][1] + (1 - w) * h.var(0)

    for batch in ([x] if mode == "eval" else np.split(x, np.cumsum(sizes)[:-1])):
        h = bn(0, batch.astype(np.float64))
        h = np.maximum(bn(1, h @ dense1_w + dense1_b), 0)
        bn(2, h @ dense2_w)
    return [mixed(i) for i in range(len(bns))]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_keras_prior_matches_the_float64_reference(mode):
    model, bk = _keras_net()
    x = np.random.default_rng(7).normal(2.0, 3.0, (60, 4, 4, 3)).astype(np.float32)
    reference = _keras_reference(model, bk, x, PRIOR, mode, SIZES)
    report = bk.recalibrate(model, np.split(x, np.cumsum(SIZES)[:-1]), mode=mode, prior=PRIOR, batch_size=None,
                            tol=1e-8, max_passes=10)
    assert report.converged
    got = [(_np(bn.moving_mean), _np(bn.moving_variance)) for _, bn in bk.batchnorm_layers(model)]
    _assert_close(got, reference, 2e-5)


def test_cli_prior_on_an_onnx_file_matches_the_float64_reference(net, x, tmp_path):
    import onnx
    from click.testing import CliRunner

    from bncal.cli import main

    onnx.save(export(copy.deepcopy(net), [(2, 3, 9, 9)]), str(tmp_path / "model.onnx"))
    np.save(tmp_path / "target.npy", x)
    result = CliRunner().invoke(main, ["recalibrate", str(tmp_path / "model.onnx"), "--data", str(tmp_path / "target.npy"),
                                       "--no-shuffle", "--batch-size", "16", "--mode", "eval", "--prior", "40",
                                       "--tol", "1e-8", "-o", str(tmp_path / "adapted.onnx")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "note: prior 40: the model's statistics weigh N/(N+n) = 0.4" in result.output
    got = list(stored(onnx.load(str(tmp_path / "adapted.onnx"))).values())
    _assert_close(got, _torch_reference(net, x, PRIOR, "eval"), 2e-5)


def test_corruptions_stay_images_and_blur_is_the_separable_gaussian():
    from models import corruptions

    images = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    for kind in [*corruptions.EVALUATED, *corruptions.HELD_OUT]:
        for severity in corruptions.SEVERITIES:
            out = corruptions.corrupt(images, kind, severity, seed=1)
            assert out.shape == images.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
            np.testing.assert_array_equal(out, corruptions.corrupt(images, kind, severity, seed=1))
    sigma, radius = 2.0, 6
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), -1, images[0, 0].astype(np.float64))
    expected = np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, rows)
    np.testing.assert_allclose(corruptions.corrupt(images, "blur", 3)[0, 0], np.clip(expected, 0, 1), atol=1e-6)
