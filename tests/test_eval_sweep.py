"""The eval-mode sweep (bncal.torch.eval_sweep) against the one-batch fixed point in float64."""

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from bncal.torch.eval_sweep import solve_eval_statistics
from bncal.torch.recalibration import batchnorm_layers
from models import zoo
from tests_support import Reshuffled


def _one_batch_fixed_point(net, batch):
    """Every BN's input statistics in one forward of all data as one batch, in float64: BNs in
    train mode (momentum None), every other module in eval mode."""
    ref = copy.deepcopy(net).double().eval()
    inputs = {}
    for name, bn in batchnorm_layers(ref):
        bn.train()
        bn.momentum = None
        bn.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0]))
    args = batch if isinstance(batch, tuple) else (batch,)
    with torch.no_grad():
        ref(*(a.double() for a in args))
    return {name: (x.mean([0, *range(2, x.dim())]), x.var([0, *range(2, x.dim())], unbiased=False))
            for name, x in inputs.items()}


def _max_error(moments, reference):
    """Largest mean error in units of the reference sd, and relative variance error."""
    assert set(moments) == set(reference)
    worst = 0.0
    for name, (mean, var) in reference.items():
        m = moments[name]
        worst = max(worst, float(((torch.from_numpy(m.mean) - mean).abs() / var.sqrt()).max()),
                    float(((torch.from_numpy(m.variance) - var).abs() / var).max()))
    return worst


def _solve(net, batches, **kw):
    return solve_eval_statistics(net, batchnorm_layers(net), batches, device="cpu", **kw)


def _assert_same_moments(a, b, rtol=1e-6):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name].mean, b[name].mean, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(a[name].variance, b[name].variance, rtol=rtol, atol=0)
        assert a[name].count == b[name].count


def _randomized(net, seed=0):
    """BN affine parameters away from 1/0, so upstream statistics matter downstream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in batchnorm_layers(net):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    return net


def _cnn():
    torch.manual_seed(1)
    return _randomized(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 7 * 7, 5)))


NETS = {
    "cnn": (_cnn, (3, 16, 16)),
    "resnet_small": (lambda: _randomized(zoo.resnet_small(width=8)), (3, 16, 16)),
    "mobilenet_small": (lambda: _randomized(zoo.mobilenet_small()), (3, 32, 32)),
    "mnist_cnn (dropout before BN1d)": (lambda: _randomized(zoo.mnist_cnn()), (1, 28, 28)),
}


@pytest.mark.parametrize("name", list(NETS))
def test_sweep_reaches_the_one_batch_fixed_point(name):
    make, shape = NETS[name]
    torch.manual_seed(2)
    net, x = make(), torch.randn(48, *shape) * 2 + 0.5
    result = _solve(net, list(x.split(16)))
    assert result.refusal is None and result.moments is not None
    assert _max_error(result.moments, _one_batch_fixed_point(net, x)) < 1e-5
    assert result.samples == 48 and result.batches == 3 and result.data_passes == 1
    # Every node runs once, the head never, plus a two-sample probe and the moment reductions.
    assert 1.0 <= result.forward_equivalents < 1.2


def test_sweep_is_split_invariant_and_its_statistics_give_the_one_batch_output():
    net = _cnn()
    torch.manual_seed(3)
    x = torch.randn(90, 3, 16, 16) * 2 + 0.5
    a = _solve(net, list(torch.split(x, [32, 32, 26])))
    b = _solve(net, list(torch.split(x, [7, 50, 33])))
    _assert_same_moments(a.moments, b.moments)
    model = copy.deepcopy(net)
    for name, bn in batchnorm_layers(model):
        bn.running_mean.copy_(torch.from_numpy(a.moments[name].mean))
        bn.running_var.copy_(torch.from_numpy(a.moments[name].variance))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), copy.deepcopy(net).train()(x), rtol=1e-4, atol=1e-4)


def test_the_model_is_left_as_it_was():
    net = zoo.mnist_cnn()
    net.train()
    net[0].eval()  # mixed modes must come back as they were
    modes = {m: m.training for m in net.modules()}
    state = copy.deepcopy(net.state_dict())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    result = _solve(net, list(torch.randn(20, 1, 28, 28).split(10)))
    assert result.moments is not None
    assert {m: m.training for m in net.modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))


def test_spilling_to_disk_gives_the_in_memory_result_within_budget(tmp_path):
    net, x = _randomized(zoo.resnet_small(width=8)), torch.randn(40, 3, 16, 16)
    batches = list(x.split(8))
    in_memory = _solve(net, batches)
    budget_mb = 0.05
    spilled = _solve(net, batches, cache_mb=budget_mb, spill_dir=tmp_path)
    assert spilled.moments is not None and spilled.spilled_bytes_peak > 0
    assert spilled.cached_bytes_peak <= budget_mb * 2**20 < in_memory.cached_bytes_peak
    assert spilled.data_passes == 1 and spilled.recomputed_batch_steps == 0
    _assert_same_moments(spilled.moments, in_memory.moments, rtol=1e-12)
    assert os.listdir(tmp_path) == []


def test_the_spill_directory_is_removed_when_the_graph_fails(tmp_path):
    net = zoo.resnet_small(width=8)
    batches = [torch.randn(8, 3, 16, 16)] * 3 + [torch.randn(8, 2, 16, 16)]  # the last one fails
    result = _solve(net, batches, cache_mb=0.01, spill_dir=tmp_path)
    assert result.moments is None and "failed on batch 3" in result.refusal
    assert os.listdir(tmp_path) == []


def test_recomputing_from_checkpoints_gives_the_in_memory_result_within_budget():
    net, x = _randomized(zoo.resnet_small(width=8)), torch.randn(40, 3, 16, 16)
    batches = list(x.split(8))
    in_memory = _solve(net, batches)
    budget_mb = in_memory.cached_bytes_peak / 2**20 / 2
    tight = _solve(net, batches, cache_mb=budget_mb, max_forward_equivalents=20)
    assert tight.moments is not None and tight.recomputed_batch_steps > 0
    assert tight.cached_bytes_peak <= budget_mb * 2**20
    assert tight.forward_equivalents > in_memory.forward_equivalents
    _assert_same_moments(tight.moments, in_memory.moments, rtol=1e-12)


def test_a_budget_below_one_frontier_refuses_or_recomputes_from_the_data():
    net, x = _randomized(zoo.resnet_small(width=8)), torch.randn(24, 3, 16, 16)
    batches = list(x.split(8))
    refused = _solve(net, batches, cache_mb=0)
    assert refused.moments is None and "cache_mb" in refused.refusal and "spill_dir" in refused.refusal
    recomputed = _solve(net, batches, cache_mb=0, max_forward_equivalents=1000)
    assert recomputed.moments is not None and recomputed.cached_bytes_peak == 0
    assert recomputed.data_passes == recomputed.depths
    _assert_same_moments(recomputed.moments, _solve(net, batches).moments, rtol=1e-12)


def test_data_read_again_in_another_order_is_refused_but_read_once_it_is_fine():
    net, x = _cnn(), torch.randn(48, 3, 16, 16)
    loader = Reshuffled(list(x.split(8)))
    assert _solve(net, loader).moments is not None  # everything cached: read once
    result = _solve(net, loader, cache_mb=0, max_forward_equivalents=1000)
    assert result.moments is None and "another order" in result.refusal


def test_an_iterator_is_solved_when_it_fits_and_refused_when_it_does_not():
    net, x = _cnn(), torch.randn(48, 3, 16, 16)
    solved = _solve(net, iter(list(x.split(8))))
    assert _max_error(solved.moments, _one_batch_fixed_point(net, x)) < 1e-5
    refused = _solve(net, iter(list(x.split(8))), cache_mb=0, max_forward_equivalents=1000)
    assert refused.moments is None and "cannot be read again" in refused.refusal


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.bn(x)))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) if x.sum() > 0 else self.bn(-x)


class _ReadAfterInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        h = self.conv(x)
        h.relu_()
        return self.bn(h)  # reads h after the in-place op changed it


@pytest.mark.parametrize("net,reason", [
    (_Shared(), "called 2 times"),
    (_DataDependent(), "torch.fx cannot trace"),
    (_ReadAfterInPlace(), "reads afterwards"),
])
def test_refusals_say_why(net, reason):
    result = _solve(net, [torch.randn(4, 3, 8, 8)] * 2)
    assert result.moments is None and reason in result.refusal


def test_a_custom_forward_fn_is_refused():
    result = _solve(_cnn(), [torch.randn(4, 3, 16, 16)], forward_fn=lambda model, batch: model(batch))
    assert result.moments is None and "forward_fn" in result.refusal


class _Reordered(nn.Module):
    """An in-place op at depth 0 on a value a depth-2 node read earlier: segments run it first,
    so it must run out of place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv0, self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv0(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(h)))) + h
        z = torch.relu_(h)
        return self.bn3(z + out)


def test_in_place_ops_run_out_of_place_where_segments_reorder_them():
    net = _randomized(_Reordered())
    x = torch.randn(32, 3, 8, 8) - 0.3
    result = _solve(net, list(x.split(8)))
    assert _max_error(result.moments, _one_batch_fixed_point(net, x)) < 1e-5


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.a, self.b, self.mix = nn.Linear(5, 6), nn.Linear(3, 6), nn.Linear(6, 6)
        self.bn_a, self.bn_b, self.bn = nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.BatchNorm1d(6)

    def forward(self, x, y, scale: float = 2.0):
        return self.bn(self.mix(self.bn_a(self.a(x)) * scale + self.bn_b(self.b(y))))


def test_tuple_and_dict_batches_under_the_default_call():
    net = _randomized(_TwoInputs())
    x, y = torch.randn(30, 5) + 1, torch.randn(30, 3) * 3
    reference = _one_batch_fixed_point(net, (x, y))
    as_tuples = _solve(net, list(zip(x.split(10), y.split(10))))
    as_dicts = _solve(net, [{"x": a, "y": b} for a, b in zip(x.split(10), y.split(10))])
    assert _max_error(as_tuples.moments, reference) < 1e-5
    _assert_same_moments(as_dicts.moments, as_tuples.moments, rtol=1e-12)


def test_max_samples_and_progress():
    net, x = _cnn(), torch.randn(40, 3, 16, 16)
    done = []
    result = _solve(net, list(x.split(8)), max_samples=20, progress=done.append)
    assert result.samples == 20 and result.batches == 3
    assert _max_error(result.moments, _one_batch_fixed_point(net, x[:20])) < 1e-5
    assert done == list(range(1, result.depths * result.batches + 1))


def test_a_hook_the_trace_would_lose_is_refused():
    net = _cnn()
    net.register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # changes the input: must not be lost
    result = _solve(net, [torch.randn(4, 3, 16, 16)])
    assert result.moments is None and "hooks" in result.refusal


def test_a_bare_batchnorm_is_its_input_population():
    bn = nn.BatchNorm1d(3)
    x = torch.randn(50, 3, 7) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1) + 3.0
    result = solve_eval_statistics(bn, [("<root>", bn)], list(torch.split(x, [16, 16, 16, 2])), device="cpu")
    m = result.moments["<root>"]
    xd = x.double()
    np.testing.assert_allclose(m.mean, xd.mean([0, 2]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(m.variance, xd.var([0, 2], unbiased=False).numpy(), rtol=1e-6)
    assert m.count == 50 * 7
