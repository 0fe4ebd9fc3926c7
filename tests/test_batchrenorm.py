import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncal.errors import BncalError
from bncal.torch.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, convert_to_batchnorm, convert_to_batchrenorm

MNIST_NPZ = Path(__file__).resolve().parents[1] / "models" / "mnist5k.npz"


def _paired(num_features=5, momentum=0.1, **kw):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(num_features, momentum=momentum).double()
    renorm = BatchRenorm2d(num_features, momentum=momentum, **kw).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
    renorm.load_state_dict(bn.state_dict())
    return bn, renorm


def test_is_a_batchnorm_with_identical_state_dict_keys():
    for cls, ref in [(BatchRenorm1d, nn.BatchNorm1d), (BatchRenorm2d, nn.BatchNorm2d), (BatchRenorm3d, nn.BatchNorm3d)]:
        layer = cls(4)
        assert isinstance(layer, _BatchNorm)
        assert list(layer.state_dict()) == list(ref(4).state_dict())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batchnorm_when_rmax_1_and_dmax_0(momentum):
    bn, renorm = _paired(momentum=momentum, rmax=1.0, dmax=0.0, warmup_start=0,
                         rmax_warmup_end=0, dmax_warmup_end=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = (torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64) * 3 + 2).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        grad = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
        y_bn, y_rn = bn(x), renorm(x2)
        torch.testing.assert_close(y_rn, y_bn, rtol=1e-12, atol=1e-12)
        y_bn.backward(grad)
        y_rn.backward(grad)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(renorm.weight.grad, bn.weight.grad)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(getattr(renorm, name), buf, rtol=1e-12, atol=1e-12)
    bn.eval(), renorm.eval()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(renorm(x), bn(x), rtol=1e-12, atol=1e-12)


def _reference_step(x, weight, bias, mean, var, eps, momentum, rmax, dmax):
    """Ioffe 2017, Algorithm 1, in float64 numpy, channels on axis 1."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu_b = x.mean(axis=axes)
    var_b = x.var(axis=axes)
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(var + eps)
    r_raw = sigma_b / sigma
    d_raw = (mu_b - mean) / sigma
    r = np.clip(r_raw, 1 / rmax, rmax)
    d = np.clip(d_raw, -dmax, dmax)
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    y = x_hat * weight.reshape(shape) + bias.reshape(shape)
    n = x.size // x.shape[1]
    new_mean = (1 - momentum) * mean + momentum * mu_b
    new_var = (1 - momentum) * var + momentum * var_b * n / (n - 1)
    return y, new_mean, new_var, (r != r_raw), (d != d_raw)


def test_matches_float64_reference_with_clipping_active():
    rng = np.random.default_rng(0)
    channels, rmax, dmax, momentum = 8, 1.5, 0.5, 0.2
    layer = BatchRenorm2d(channels, momentum=momentum, rmax=rmax, dmax=dmax, warmup_start=0,
                          rmax_warmup_end=0, dmax_warmup_end=0).double()
    mean = rng.normal(0, 2, channels)
    var = rng.uniform(0.05, 20, channels)
    weight, bias = rng.uniform(0.5, 2, channels), rng.normal(0, 1, channels)
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(mean))
        layer.running_var.copy_(torch.from_numpy(var))
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    r_clipped, d_clipped = np.zeros(channels, bool), np.zeros(channels, bool)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, (4, channels, 5, 5))
        y_ref, mean, var, rc, dc = _reference_step(x, weight, bias, mean, var, 1e-5, momentum, rmax, dmax)
        r_clipped |= rc
        d_clipped |= dc
        y = layer(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12, atol=1e-12)
    # The test means something only if both clipped and unclipped channels occurred.
    assert r_clipped.any() and not r_clipped.all()
    assert d_clipped.any() and not d_clipped.all()
    assert int(layer.num_batches_tracked) == 3


def test_warmup_relaxes_bounds_linearly():
    layer = BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_start=10, rmax_warmup_end=20, dmax_warmup_end=30)
    assert [layer.current_rmax(s) for s in (0, 10, 15, 20, 100)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [layer.current_dmax(s) for s in (0, 10, 20, 30, 100)] == [0.0, 0.0, 2.5, 5.0, 5.0]
    defaults = BatchRenorm1d(2)  # the paper's ImageNet schedule
    assert (defaults.momentum, defaults.rmax, defaults.dmax) == (0.01, 3.0, 5.0)
    assert (defaults.warmup_start, defaults.rmax_warmup_end, defaults.dmax_warmup_end) == (5000, 40000, 25000)


def _formula_with_constant_r_d(x, weight, bias, mean, var, eps, rmax, dmax, detach):
    mu_b = x.mean(dim=(0, 2, 3), keepdim=True)
    sigma_b = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + eps)
    sigma = torch.sqrt(var.view(1, -1, 1, 1) + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax)
    d = ((mu_b - mean.view(1, -1, 1, 1)) / sigma).clamp(-dmax, dmax)
    if detach:
        r, d = r.detach(), d.detach()
    return ((x - mu_b) / sigma_b * r + d) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_no_gradient_flows_through_r_and_d():
    torch.manual_seed(0)
    layer = BatchRenorm2d(4, rmax=2.0, dmax=1.0, warmup_start=0, rmax_warmup_end=0, dmax_warmup_end=0).double()
    with torch.no_grad():
        layer.running_mean.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.uniform_(0.5, 2.0)
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    layer(x).backward(upstream)

    grads = {}
    for detach in (True, False):
        xr = x.detach().clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        _formula_with_constant_r_d(xr, w, b, mean, var, layer.eps, 2.0, 1.0, detach).backward(upstream)
        grads[detach] = (xr.grad, w.grad, b.grad)
    torch.testing.assert_close(x.grad, grads[True][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, grads[True][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, grads[True][2], rtol=1e-10, atol=1e-12)
    # With r and d differentiable the input gradient would differ: the check above has teeth.
    assert not torch.allclose(grads[False][0], grads[True][0], rtol=1e-6, atol=1e-8)


def test_eval_forward_is_plain_batch_norm():
    layer = BatchRenorm1d(3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
        layer.weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
    layer.eval()
    x = torch.randn(7, 3)
    expected = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    assert torch.equal(layer(x), expected)
    assert int(layer.num_batches_tracked) == 0


def test_rejects_a_single_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm1d(3)(torch.randn(1, 3))


def _digits():
    """(x, y) from the repository's MNIST subset, 14x14 average-pooled; synthetic if absent."""
    if MNIST_NPZ.exists():
        data = np.load(MNIST_NPZ)
        x = torch.from_numpy(data["images"][data["calib_idx"]]).float() / 255
        y = torch.from_numpy(data["labels"][data["calib_idx"]]).long()
        return F.avg_pool2d(x, 2).flatten(1), y
    gen = torch.Generator().manual_seed(0)  # ten Gaussian clusters in 196 dimensions
    centres = torch.randn(10, 196, generator=gen)
    y = torch.randint(0, 10, (4000,), generator=gen)
    return centres[y] + 1.5 * torch.randn(4000, 196, generator=gen), y


@pytest.fixture
def one_thread():
    # Tiny batches: a second thread only adds contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trains_at_batch_size_4(one_thread):
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(196, 64, bias=False),
                          BatchRenorm1d(64, warmup_start=50, rmax_warmup_end=200, dmax_warmup_end=150),
                          nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(600):
        idx = order[step * 4:(step + 1) * 4]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-100:]) < 0.5 * np.mean(losses[:100])
    model.eval()
    held = order[2400:3400]  # not trained on
    with torch.no_grad():
        accuracy = (model(x[held]).argmax(1) == y[held]).float().mean().item()
    assert accuracy > 0.7


def _mixed_model():
    return nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3),
        nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, momentum=0.3),
    )


def _train_a_little(model):
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    return model


def test_convert_round_trip_keeps_weights_and_statistics():
    model = _train_a_little(_mixed_model())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    renorm = convert_to_batchrenorm(model, rmax=2.0)
    assert [type(m) for m in renorm.modules() if isinstance(m, _BatchNorm)] == [BatchRenorm2d, BatchRenorm2d, BatchRenorm1d]
    assert all(type(m) is not BatchRenorm2d for m in model.modules())  # the original is a copy source only
    assert renorm[5].momentum == 0.3 and renorm[2][0].rmax == 2.0 and renorm.training
    back = convert_to_batchnorm(renorm)
    assert [type(m) for m in back.modules() if isinstance(m, _BatchNorm)] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    for converted in (renorm, back):
        state = converted.state_dict()
        assert list(state) == list(original)
        for key, value in original.items():
            assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 8, 8)
    outputs = [m.eval()(x) for m in (model, renorm, back)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_convert_in_place_and_refusals():
    model = _mixed_model()
    assert convert_to_batchrenorm(model, inplace=True) is model
    assert isinstance(model[0], BatchRenorm2d)
    assert isinstance(convert_to_batchrenorm(nn.BatchNorm1d(3)), BatchRenorm1d)

    class BatchNormAct(nn.BatchNorm2d):  # a subclass with its own forward is left alone
        def forward(self, x):
            return F.relu(super().forward(x))

    assert type(convert_to_batchrenorm(nn.Sequential(BatchNormAct(3)))[0]) is BatchNormAct
    with pytest.raises(BncalError, match="track_running_stats"):
        convert_to_batchrenorm(nn.BatchNorm1d(3, track_running_stats=False))


def test_exports_to_onnx_as_batchnormalization_with_parity():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = convert_to_batchrenorm(_train_a_little(_mixed_model())).eval()
    x = torch.randn(4, 3, 8, 8)
    buffer = io.BytesIO()
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter is deprecated but 20x faster
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    proto = onnx.load_from_string(buffer.getvalue())
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    # The exporter folds the Conv+BN pair; the BN before the Conv and the BN after Linear remain.
    assert len(bns) == 2
    momenta = sorted(a.f for n in bns for a in n.attribute if a.name == "momentum")
    assert momenta == pytest.approx([0.7, 0.9])  # ONNX = 1 - PyTorch momentum
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


# --- Which statistics a renorm layer's training forward used (bncal.renorm) ------------------------------------


def _renorm_forward_float64(x, mean, std, eps, rmin, rmax, dmax):
    """Ioffe 2017's training forward x_hat (no affine), float64 numpy, channels on axis 1."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu_b, sigma_b = x.mean(axis=axes), np.sqrt(x.var(axis=axes) + eps)
    r = np.clip(sigma_b / std, rmin, rmax)
    d = np.clip((mu_b - mean) / std, -dmax, dmax)
    return (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)


def test_training_statistics_reproduce_the_renorm_forward_in_float64():
    from bncal.renorm import RenormReference
    from bncal.stats import batch_moments

    rng = np.random.default_rng(3)
    channels, eps = 12, 1e-5
    mean, std = rng.normal(0, 1, channels), rng.uniform(0.5, 2, channels)
    x = rng.normal(rng.normal(0, 1.5, channels)[None, :, None, None], rng.uniform(0.3, 3, channels)[None, :, None, None],
                   (6, channels, 4, 4))
    reference = RenormReference(mean, std, eps, rmin=1 / 1.6, rmax=1.6, dmax=0.8)
    _, mu_b, var_b = batch_moments(x)
    m, v = reference.training_statistics(mu_b, var_b)
    shape = (1, -1, 1, 1)
    inference = (x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps)
    expected = _renorm_forward_float64(x, mean, std, eps, 1 / 1.6, 1.6, 0.8)
    np.testing.assert_allclose(inference, expected, rtol=1e-12, atol=1e-12)
    clipped = reference.clipped(mu_b, var_b)
    assert clipped.any() and not clipped.all()  # both cases occur: the test has teeth
    # Unclipped channels: the renorm averages themselves, whatever the batch.
    np.testing.assert_array_equal(m[~clipped], mean[~clipped])
    np.testing.assert_allclose(v[~clipped], std[~clipped] ** 2 - eps, rtol=1e-14)


def test_batchrenorm_layer_training_forward_is_its_reference():
    rng = np.random.default_rng(4)
    layer = BatchRenorm2d(6, rmax=1.5, dmax=0.5, warmup_start=0, rmax_warmup_end=0, dmax_warmup_end=0,
                          momentum=0.0).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(rng.normal(0, 1, 6)))
        layer.running_var.copy_(torch.from_numpy(rng.uniform(0.3, 3, 6)))
        layer.num_batches_tracked.fill_(7)
    reference = layer.training_reference()
    assert (reference.rmax, reference.dmax, reference.rmin) == (1.5, 0.5, 1 / 1.5)
    x = torch.from_numpy(rng.normal(0.5, 1.5, (5, 6, 3, 3)))
    trained = layer.train()(x).detach()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    m, v = reference.training_statistics(mean.numpy(), var.numpy())
    inferred = F.batch_norm(x, torch.from_numpy(m), torch.from_numpy(v), layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(inferred, trained, rtol=1e-12, atol=1e-12)


def _mnist_14():
    data = np.load(MNIST_NPZ)
    x = F.avg_pool2d(torch.from_numpy(data["images"]).float() / 255, 2)
    return x, torch.from_numpy(data["labels"]).long(), data["calib_idx"], data["test_idx"]


def _small_cnn(renorm: bool):
    """A small CNN whose statistics never move in training (momentum 0); renorm with unclipped r and d."""
    torch.manual_seed(0)
    unclipped = dict(momentum=0.0, rmax=1e6, dmax=1e6, warmup_start=0, rmax_warmup_end=0, dmax_warmup_end=0)
    bn2 = (lambda c: BatchRenorm2d(c, **unclipped)) if renorm else (lambda c: nn.BatchNorm2d(c, momentum=0.0))
    bn1 = (lambda c: BatchRenorm1d(c, **unclipped)) if renorm else (lambda c: nn.BatchNorm1d(c, momentum=0.0))
    return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), bn2(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, bias=False),
                         bn2(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 5, 32, bias=False), bn1(32), nn.ReLU(),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def never_updated_models():
    """{renorm: (model, x, y, calibration batches, held-out batches)}, trained 150 steps of 32 (about 2 s each)."""
    x, y, train_idx, test_idx = _mnist_14()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = {}
    for renorm in (True, False):
        model = _small_cnn(renorm)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(150):
            idx = torch.from_numpy(train_idx)[torch.randint(0, len(train_idx), (32,), generator=gen)]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[renorm] = model.eval()
    torch.set_num_threads(threads)
    calib_idx = np.random.default_rng(0).permutation(train_idx)[:512]
    held_idx = np.random.default_rng(1).permutation(test_idx)[:400]  # both index lists are sorted by class
    return (models, x, y, [x[calib_idx[i:i + 64]] for i in range(0, 512, 64)],
            [x[held_idx[i:i + 50]] for i in range(0, 400, 50)], test_idx)


def _accuracy(model, x, y, idx):
    with torch.no_grad():
        return (model.eval()(x[idx]).argmax(1) == y[idx]).float().mean().item()


def test_never_updated_renorm_model_keeps_its_accuracy_and_passes_check(never_updated_models, one_thread):
    import copy

    from bncal import inspect_model, recalibrate
    from bncal.torch.check import check_torch

    models, x, y, calib, held, test_idx = never_updated_models
    model = copy.deepcopy(models[True])
    trained = _accuracy(model, x, y, test_idx)
    assert trained > 0.85
    findings = inspect_model(model).by_rule("BN001")
    assert [f.severity for f in findings] == ["warning"] and "batch renormalisation" in findings[0].evidence
    report = check_torch(model, held)
    assert report.passed, report.table()
    assert any("renorm averages" in n for n in report.notes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = recalibrate(model, calib)
    assert _accuracy(model, x, y, test_idx) == trained
    for key, value in model.state_dict().items():  # the renorm averages are kept, the step counter too
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)
    assert any("kept as their inference statistics" in n for n in rec.notes)
    # Teeth: population statistics (what plain recalibration writes) would change what the network computes.
    plain = convert_to_batchnorm(models[True])
    recalibrate(plain, calib)
    assert _accuracy(plain, x, y, test_idx) < trained - 0.03  # measured 0.880 against 0.931


def test_stale_plain_model_still_fails_check_and_is_repaired(never_updated_models, one_thread):
    import copy

    from bncal import inspect_model, recalibrate
    from bncal.torch.check import check_torch

    models, x, y, calib, held, test_idx = never_updated_models
    model = copy.deepcopy(models[False])
    stale = _accuracy(model, x, y, test_idx)
    assert [f.severity for f in inspect_model(model).by_rule("BN001")] == ["error"]
    before = check_torch(model, held)
    assert not before.passed and "recalibrate them" in before.reasons[0]
    recalibrate(model, calib)
    assert _accuracy(model, x, y, test_idx) > stale + 0.1
    after = check_torch(model, held)
    assert after.passed, after.table()


def test_renorm_in_its_warm_up_recalibrates_as_plain_batchnorm():
    from bncal import recalibrate

    # num_batches_tracked 3 < warmup_start 5000: r = 1, d = 0 in training, i.e. plain BN on batch statistics.
    plain = _train_a_little(_mixed_model())
    renorm = convert_to_batchrenorm(plain)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 3, 8, 8, generator=gen) * 2 + 1 for _ in range(4)]
    recalibrate(plain, data)
    report = recalibrate(renorm, data)
    state = renorm.state_dict()
    for key, value in plain.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    assert any("clipped on this data in 3 of 3 channels" in n for n in report.notes)
    assert int(renorm[0].num_batches_tracked) == 3  # its warm-up step is no recalibration's business
