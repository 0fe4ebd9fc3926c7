"""bncal.recalibrate against float64 references and the cases that break other tools."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncal
from bncal.errors import BncalError
from bncal.torch.recalibration import batchnorm_layers
from tests_support import Reshuffled


def _split(x, sizes):
    assert sum(sizes) == len(x)
    return list(torch.split(x, sizes))


def _population(x: torch.Tensor):
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


@pytest.mark.parametrize("dim,shape", [(1, (3,)), (1, (3, 7)), (2, (3, 5, 6)), (3, (3, 2, 3, 4))])
def test_first_layer_equals_float64_population_statistics(dim, shape):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](3)
    torch.manual_seed(0)
    x = torch.randn(50, *shape) * torch.tensor([1.0, 5.0, 0.1]).view(3, *([1] * (len(shape) - 1))) + 3.0
    report = bncal.recalibrate(bn, _split(x, [16, 16, 16, 2]))
    mean, var = _population(x)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=0)
    assert report.layers[0].values_per_channel == x.numel() // 3
    assert int(bn.num_batches_tracked) == 4
    assert bn.training  # the mode it had before


def _cnn():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 7 * 7, 5),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net


def _fixed_point_reference(net, x):
    """Statistics a train-mode forward of all data as one batch uses, in float64."""
    ref = copy.deepcopy(net).double().train()
    inputs = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for _, bn in batchnorm_layers(ref)]
    with torch.no_grad():
        ref(x.double())
    for h in hooks:
        h.remove()
    return [_population(t) for t in inputs]


def _max_error(net, reference):
    worst = 0.0
    for (_, bn), (mean, var) in zip(batchnorm_layers(net), reference):
        worst = max(worst, float(((bn.running_mean.double() - mean).abs() / var.sqrt()).max()),
                    float(((bn.running_var.double() - var).abs() / var).max()))
    return worst


def test_eval_mode_reaches_the_one_batch_fixed_point_independent_of_split():
    net = _cnn()
    torch.manual_seed(2)
    x = torch.randn(90, 3, 16, 16) * 2 + 0.5
    reference = _fixed_point_reference(net, x)
    results = []
    for sizes in ([32, 32, 26], [7, 50, 33]):
        model = copy.deepcopy(net)
        report = bncal.recalibrate(model, _split(x, sizes), mode="eval", tol=1e-7, max_passes=10)
        assert report.converged, report.max_rel_change
        assert _max_error(model, reference) < 1e-5
        results.append(model)
    for (_, a), (_, b) in zip(batchnorm_layers(results[0]), batchnorm_layers(results[1])):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
    # The eval output then equals the one-batch train-mode output.
    with torch.no_grad():
        one_batch = copy.deepcopy(net).train()(x)
        torch.testing.assert_close(results[0].eval()(x), one_batch, rtol=1e-4, atol=1e-4)


def test_train_mode_first_layer_is_split_independent():
    net = _cnn()
    x = torch.randn(64, 3, 16, 16)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    bncal.recalibrate(a, _split(x, [32, 32]))
    bncal.recalibrate(b, _split(x, [5, 40, 19]))
    torch.testing.assert_close(a[1].running_mean, b[1].running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a[1].running_var, b[1].running_var, rtol=1e-6, atol=0)


def test_dropout_before_bn_is_repaired():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(200, 10) + 1
    # Stats as training with dropout on would leave them: dropout inflates the variance.
    net.train()
    with torch.no_grad():
        for chunk in x.split(20):
            net(chunk)
    bncal.recalibrate(net, x.split(32))
    # Reference: dropout off, BN statistics of Linear(x) in float64.
    with torch.no_grad():
        h = net[0](x).double()
        mean, var = h.mean(0), h.var(0, unbiased=False)
        net.eval()
        expected = net[4](F.relu((h - mean) / torch.sqrt(var + net[2].eps) * net[2].weight.double() + net[2].bias.double()).float())
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(net[1], nn.Dropout) and not net[1].training


def test_modes_momenta_hooks_and_buffers_restored_after_an_exception():
    net = _cnn()
    net.train()
    net[1].momentum = None
    net[4].eval()
    seen = []
    user_hook = net[4].register_forward_hook(lambda m, a, o: seen.append(1))
    modes = {n: m.training for n, m in net.named_modules()}
    momenta = {n: bn.momentum for n, bn in batchnorm_layers(net)}
    buffers = copy.deepcopy({k: v for k, v in net.state_dict().items() if "running" in k or "tracked" in k})
    hook_counts = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in net.named_modules()}

    def failing(model, batch):
        if batch.shape[0] == 3:
            raise RuntimeError("loader broke")
        return model(batch)

    with pytest.raises(BncalError, match="loader broke"):
        bncal.recalibrate(net, [torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)], forward_fn=failing)
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {n: bn.momentum for n, bn in batchnorm_layers(net)} == momenta
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in net.named_modules()} == hook_counts
    for k, v in net.state_dict().items():
        if k in buffers:
            torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    user_hook.remove()


def test_inputs_as_dicts_tuples_and_forward_fn_and_max_samples():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a, self.bn_b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, a, b):
            return self.bn_a(a) + self.bn_b(b)

    a, b = torch.randn(30, 2), torch.randn(30, 2) * 3
    for data, fn in [([{"a": a[:20], "b": b[:20]}, {"a": a[20:], "b": b[20:]}], None),
                     ([(a[:20], b[:20]), (a[20:], b[20:])], None),
                     ([((a[:20], b[:20]), "label"), ((a[20:], b[20:]), "label")], lambda m, batch: m(*batch[0]))]:
        net = TwoInputs()
        bncal.recalibrate(net, data, forward_fn=fn)
        torch.testing.assert_close(net.bn_b.running_var.double(), b.double().var(0, unbiased=False), rtol=1e-6, atol=0)
    net = TwoInputs()
    report = bncal.recalibrate(net, [(a[:20], b[:20]), (a[20:], b[20:])], max_samples=25)
    assert report.samples == 25 and report.layers[0].values_per_channel == 25
    torch.testing.assert_close(net.bn_a.running_mean.double(), a[:25].double().mean(0), rtol=1e-6, atol=1e-7)


class _BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: BN followed by an activation inside forward."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, factor, self.eps)
        return F.relu(x)


def test_subclasses_sync_lazy_untracked_unreached_and_reused_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.act_bn = _BatchNormAct2d(3)
            self.sync_bn = nn.SyncBatchNorm(3)
            self.lazy_bn = nn.LazyBatchNorm2d()
            self.untracked = nn.BatchNorm2d(3, track_running_stats=False)
            self.unused = nn.BatchNorm2d(3)
            self.shared = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.act_bn(x)
            y = self.sync_bn(x) + self.lazy_bn(x) + self.untracked(y)
            return self.shared(y) + self.shared(x)

    net = Net()
    x = torch.randn(12, 3, 4, 4) * 2 + 1
    report = bncal.recalibrate(net, x.split(5))
    mean, var = _population(x)
    for bn in (net.act_bn, net.sync_bn, net.lazy_bn):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=0)
    assert type(net.sync_bn).forward is nn.SyncBatchNorm.forward and "forward" not in vars(net.sync_bn)
    skipped = {s.name: s.reason for s in report.skipped}
    assert "track_running_stats=False" in skipped["untracked"]
    assert "never reached" in skipped["unused"]
    assert torch.equal(net.unused.running_mean, torch.zeros(3)) and torch.equal(net.unused.running_var, torch.ones(3))
    shared = next(l for l in report.layers if l.name == "shared")
    assert shared.calls_per_forward == 2 and any("shared" in n for n in report.notes)
    assert shared.values_per_channel == 2 * x.numel() // 3


@pytest.mark.parametrize("problem,data,match", [
    ("empty", [], "empty"),
    ("nan", [torch.full((4, 3, 8, 8), float("nan"))], "NaN or Inf"),
    ("shape", [torch.randn(4, 5, 8, 8)], "failed on calibration batch 0"),
    ("batch1", [torch.randn(1, 3)], "only one value per channel"),
])
def test_bad_data_gives_clear_errors_and_leaves_the_model_alone(problem, data, match):
    net = _cnn() if problem != "batch1" else nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(BncalError, match=match):
        bncal.recalibrate(net, data)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_without_bn_and_one_shot_iterator_in_eval_mode():
    with pytest.raises(BncalError, match="no BatchNorm"):
        bncal.recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(BncalError, match="several times"):
        bncal.recalibrate(_cnn(), iter([torch.randn(3, 3, 16, 16)]), mode="eval")


def test_report_shift_in_units_of_new_std():
    bn = nn.BatchNorm1d(2)
    x = torch.tensor([[1.0, 10.0], [3.0, 14.0], [5.0, 18.0]])
    report = bncal.recalibrate(bn, [x])
    layer = report.layers[0]
    # New means 3 and 14, new population stds sqrt(8/3) and sqrt(32/3); old means 0.
    expected = max(3 / np.sqrt(8 / 3 + bn.eps), 14 / np.sqrt(32 / 3 + bn.eps))
    assert layer.mean_shift == pytest.approx(expected, rel=1e-6)
    assert layer.var_ratio == pytest.approx((1 + bn.eps) / (32 / 3 + bn.eps), rel=1e-6)
    assert "max |shift|" in report.table()


def test_eval_mode_anchored_passes_beat_one_pass_per_depth():
    """Anchored (Gauss-Seidel) eval passes converge in far fewer passes than BN layers."""
    torch.manual_seed(4)
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(128, 4, 12, 12) + 0.5
    reference = _fixed_point_reference(net, x)
    model = copy.deepcopy(net)
    # A custom forward_fn keeps the depth-by-depth sweep out: this tests the passes it falls back to.
    report = bncal.recalibrate(model, _split(x, [32] * 4), mode="eval", tol=1e-6, forward_fn=_call)
    assert report.converged and report.passes <= 5, report.passes
    assert any("ran repeated passes: the depth-by-depth sweep does not apply" in n for n in report.notes), report.notes
    assert _max_error(model, reference) < 1e-5


def test_eval_mode_sweeps_depth_by_depth_then_confirms_in_one_pass():
    torch.manual_seed(4)
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())])
    x = torch.randn(128, 4, 12, 12) + 0.5
    reference = _fixed_point_reference(net, x)
    model = copy.deepcopy(net)
    report = bncal.recalibrate(model, _split(x, [32] * 4), mode="eval", tol=1e-6)
    assert report.converged and report.passes == 2 and report.samples == 128, (report.passes, report.notes)
    assert any("depth-by-depth sweep" in n for n in report.notes), report.notes
    assert _max_error(model, reference) < 1e-5


def _call(model, batch):
    return model(batch)


def test_eval_mode_with_a_shuffling_loader_falls_back_and_still_converges():
    net = _cnn()
    x = torch.randn(96, 3, 16, 16)
    reference = _fixed_point_reference(net, x)
    model = copy.deepcopy(net)
    report = bncal.recalibrate(model, Reshuffled(_split(x, [32, 32, 32])), mode="eval", tol=1e-7, forward_fn=_call)
    assert any("different order" in n for n in report.notes)
    assert report.converged and _max_error(model, reference) < 1e-5
    # The sweep reads the data once, so a reshuffling loader does not matter to it.
    model = copy.deepcopy(net)
    report = bncal.recalibrate(model, Reshuffled(_split(x, [32, 32, 32])), mode="eval", tol=1e-7)
    assert report.converged and _max_error(model, reference) < 1e-5


def test_eval_mode_accepts_a_function_returning_fresh_batches():
    net = _cnn()
    x = torch.randn(64, 3, 16, 16)
    from_list, from_function = copy.deepcopy(net), copy.deepcopy(net)
    bncal.recalibrate(from_list, _split(x, [32, 32]), mode="eval", tol=1e-7)
    report = bncal.recalibrate(from_function, lambda: iter(_split(x, [32, 32])), mode="eval", tol=1e-7)
    assert report.passes > 1 and report.batches == 2
    for a, b in zip(from_list.modules(), from_function.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    with pytest.raises(BncalError, match="not a single batch"):
        bncal.recalibrate(copy.deepcopy(net), x)
