"""BN folding: seeded random architectures with known outcomes, plus targeted refusals.

Every case checks the numbers (folded vs original eval model, in float32 and float64), the exact
set of folded BNs with their targets, the refusal reasons, and that the user's model is untouched.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from bncal.errors import BncalError
from bncal.folding import ChannelAffine, analyze_foldability, fold

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

PRE, POST, AFFINE = "into-preceding", "into-following", "to-affine"


# ----------------------------------------------------------------------------- helpers

def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    sign = torch.randint(0, 2, (m.num_features,), generator=gen) * 2 - 1
                    m.weight.copy_(sign * (torch.rand(m.num_features, generator=gen) + 0.5))
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    return model


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m), m.training) for n, m in model.named_modules()])


def assert_untouched(model: nn.Module, before) -> None:
    state, structure = before
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def assert_parity(reference: nn.Module, folded: nn.Module, inputs, rel: float) -> None:
    reference = copy.deepcopy(reference).eval()
    with torch.no_grad():
        want, got = reference(*inputs), folded(*inputs)
    scale = want.abs().max().item()
    err = (want - got).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x output scale {scale:.3g}"


def check_fold(model: nn.Module, inputs, expected: dict, *, bn_to_affine=False):
    """Fold in float32 and float64; check parity, decisions and that ``model`` is untouched."""
    before = snapshot(model)
    result = fold(model, inputs, bn_to_affine=bn_to_affine)
    assert_untouched(model, before)
    assert not result.model.training
    assert_parity(model, result.model, inputs, 1e-5)

    got = {d.bn: (d.direction, d.target) for d in result.decisions}
    want = {}
    for name, (direction, target, reason) in expected.items():
        if bn_to_affine and direction is None and reason in AFFINE_ABLE:
            direction, target = AFFINE, name
        want[name] = (direction, target)
    assert got == want, result.table()
    for d in result.decisions:
        reason = expected[d.bn][2]
        if reason is None:
            assert d.reason is None
        else:
            assert reason in d.reason, (d.bn, d.reason)

    # Folded BNs are gone from the module tree; affine ones are ChannelAffine.
    modules = dict(result.model.named_modules())
    for d in result.decisions:
        kind = {PRE: nn.Identity, POST: nn.Identity, AFFINE: ChannelAffine}.get(d.direction, nn.modules.batchnorm._BatchNorm)
        assert isinstance(modules[d.bn], kind), (d.bn, modules[d.bn])

    # float64: the folding itself is exact up to float64 rounding.
    model64 = copy.deepcopy(model).double()
    inputs64 = tuple(x.double() for x in inputs)
    assert_parity(model64, fold(model64, inputs64, bn_to_affine=bn_to_affine).model, inputs64, 1e-12)
    return result


# Refusal reasons that still allow an equivalent ChannelAffine.
USED_ELSEWHERE = "used elsewhere"
CALLED_TWICE = "called more than once"
ZERO_PADDING = "pads with zeros"
NO_STATS = "no running statistics"
OVERRIDES = "overrides forward"
AFFINE_ABLE = {USED_ELSEWHERE, CALLED_TWICE, ZERO_PADDING}


# ----------------------------------------------------------------------------- random architectures

class BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BN subclass whose forward adds an activation."""

    def forward(self, x):
        return F.relu(super().forward(x))


def _pick_groups(rng, c_in, c_out):
    options = [g for g in (1, 2, c_in) if c_in % g == 0 and c_out % g == 0]
    return rng.choice(options)


class ConvBN(nn.Module):
    """conv -> BN -> relu with random groups/dilation/stride/padding mode/bias: folds back."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        c_out = rng.choice([4, 6, 8])
        k, dil = rng.choice([1, 3]), rng.choice([1, 2])
        pad = dil * (k // 2) if rng.random() < 0.7 else 0
        if size - dil * (k - 1) < 4:
            pad = dil * (k // 2)  # keep the size for later valid convs
        mode = rng.choice(["zeros", "reflect", "circular", "replicate"]) if pad else "zeros"
        stride = rng.choice([1, 2]) if size >= 8 else 1
        self.conv = CONV[d](c, c_out, k, stride=stride, padding=pad, dilation=dil, padding_mode=mode,
                            groups=_pick_groups(rng, c, c_out), bias=rng.random() < 0.5)
        self.bn = BN[d](c_out, affine=rng.random() < 0.7)
        self.out = c_out
        self.expected = {"bn": (PRE, "conv", None)}

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ConvTransposeBN(nn.Module):
    """Grouped ConvTranspose -> BN (weight layout (in, out/groups, k...)): folds back."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        groups = rng.choice([g for g in (1, 2) if c % g == 0])
        c_out = groups * rng.choice([2, 3, 4])  # out/groups differs from in/groups
        stride = 2 if size <= 5 else 1
        self.up = CONV_T[d](c, c_out, rng.choice([1, 2, 3]), stride=stride, groups=groups,
                            bias=rng.random() < 0.5, dilation=rng.choice([1, 2]))
        self.bn = BN[d](c_out, affine=rng.random() < 0.7)
        self.out = c_out
        self.expected = {"bn": (PRE, "up", None)}

    def forward(self, x):
        return F.relu(self.bn(self.up(x)))


class BNThenConv(nn.Module):
    """relu -> BN -> conv without zero padding (or reflect/circular padded): folds forward."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        c_out = rng.choice([4, 6])
        if size >= 6 and rng.random() < 0.5:
            conv = dict(kernel_size=3, padding=rng.choice([0, "valid"]))
        else:
            conv = dict(kernel_size=3, padding=1, padding_mode=rng.choice(["reflect", "circular", "replicate"]))
        self.bn = BN[d](c, affine=rng.random() < 0.7)
        self.conv = CONV[d](c, c_out, groups=_pick_groups(rng, c, c_out), bias=rng.random() < 0.5,
                            stride=rng.choice([1, 2]) if size >= 6 else 1, **conv)
        self.out = c_out
        self.expected = {"bn": (POST, "conv", None)}

    def forward(self, x):
        return self.conv(self.bn(F.relu(x)))


class BNThenPaddedConv(nn.Module):
    """relu -> BN -> zero-padded conv: the shift would be lost at the borders, refused."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.bn = BN[d](c)
        self.conv = CONV[d](c, c, 3, padding=1)
        self.out = c
        self.expected = {"bn": (None, None, ZERO_PADDING)}

    def forward(self, x):
        return self.conv(self.bn(F.relu(x)))


class SharedOutput(nn.Module):
    """conv output feeds BN and a skip branch: folding would change the skip, refused."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.conv = CONV[d](c, c, 3, padding=1)
        self.bn = BN[d](c)
        self.out = c
        self.expected = {"bn": (None, None, USED_ELSEWHERE)}

    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.bn(y)) + 0.5 * y


class ConvCalledTwice(nn.Module):
    """One conv module applied twice, then BN: folding would change the first call, refused."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.conv = CONV[d](c, c, 3, padding=1)
        self.bn = BN[d](c)
        self.out = c
        self.expected = {"bn": (None, None, CALLED_TWICE)}

    def forward(self, x):
        return F.relu(self.bn(self.conv(F.relu(self.conv(x)))))


class BNCalledTwice(nn.Module):
    """One BN module after two different convs: no single conv can absorb it, refused."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.conv1 = CONV[d](c, c, 3, padding=1)
        self.conv2 = CONV[d](c, c, 1)
        self.bn = BN[d](c)
        self.out = c
        self.expected = {"bn": (None, None, CALLED_TWICE)}

    def forward(self, x):
        return F.relu(self.bn(self.conv2(F.relu(self.bn(self.conv1(x))))))


class Residual(nn.Module):
    """ResNet basic block: both BNs fold back into their convs."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.conv1 = CONV[d](c, c, 3, padding=1, bias=False)
        self.bn1 = BN[d](c)
        self.conv2 = CONV[d](c, c, 3, padding=1, bias=False)
        self.bn2 = BN[d](c)
        self.out = c
        self.expected = {"bn1": (PRE, "conv1", None), "bn2": (PRE, "conv2", None)}

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class NoStats(nn.Module):
    """BN without running statistics normalises with batch statistics: refused."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.conv = CONV[d](c, c, 1)
        self.bn = BN[d](c, track_running_stats=False)
        self.out = c
        self.expected = {"bn": (None, None, NO_STATS)}

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ActBN(nn.Module):
    """A BN subclass with an activation in its forward (2-D only): refused."""

    def __init__(self, rng, d, c, size):
        super().__init__()
        self.conv = CONV[d](c, c, 1)
        self.bn = BNAct(c) if d == 2 else BN[d](c)
        self.out = c
        self.expected = {"bn": (None, None, OVERRIDES) if d == 2 else (PRE, "conv", None)}

    def forward(self, x):
        return self.bn(self.conv(x))


BLOCKS = [ConvBN, ConvTransposeBN, BNThenConv, BNThenPaddedConv, SharedOutput, ConvCalledTwice,
          BNCalledTwice, Residual, NoStats, ActBN]


def _flatten_variant(x, variant):
    if variant == 0:
        return torch.flatten(x, 1)
    if variant == 1:
        return x.view(x.size(0), -1)
    return x.reshape(x.shape[0], -1)


class Net(nn.Module):
    """A random trunk of blocks and a random head; ``expected`` maps BN names to outcomes."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.dims = d = 1 + seed % 3
        size = {1: 12, 2: 8, 3: 6}[d]
        c = 4
        self.input_shape = (3, c) + (size,) * d
        x = torch.zeros(self.input_shape)
        kinds = [BLOCKS[seed % len(BLOCKS)], ConvBN, rng.choice(BLOCKS)]
        self.blocks = nn.ModuleList()
        self.expected = {}
        for i, kind in enumerate(kinds):
            block = kind(rng, d, c, size)
            self.blocks.append(block)
            with torch.no_grad():
                x = block(x)
            c, size = block.out, x.shape[-1]
            self.expected.update({f"blocks.{i}.{k}": (dr, t and f"blocks.{i}.{t}", r)
                                  for k, (dr, t, r) in block.expected.items()})
        self.head_kind = seed % 3
        self.flatten_variant = rng.randrange(3)
        if self.head_kind == 0:    # BN -> flatten -> Linear: folds forward, expanded over space
            self.head_bn = BN[d](c)
            self.fc = nn.Linear(c * x[0, 0].numel(), 5)
            self.expected["head_bn"] = (POST, "fc", None)
        elif self.head_kind == 1:  # pool -> Linear -> BN1d: folds back
            self.fc = nn.Linear(c, 6)
            self.head_bn = nn.BatchNorm1d(6)
            self.expected["head_bn"] = (PRE, "fc", None)
        else:                      # pool -> BN1d -> Linear: folds forward
            self.head_bn = nn.BatchNorm1d(c)
            self.fc = nn.Linear(c, 5)
            self.expected["head_bn"] = (POST, "fc", None)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        x = F.relu(x)
        if self.head_kind == 0:
            return self.fc(_flatten_variant(self.head_bn(x), self.flatten_variant))
        x = x.flatten(2).mean(-1)
        if self.head_kind == 1:
            return self.head_bn(self.fc(x))
        return self.fc(self.head_bn(x))


def _random_case(seed):
    torch.manual_seed(seed)
    net = randomize_bn(Net(seed), seed).train()  # the user's model may be left in train mode
    inputs = (torch.randn(net.input_shape, generator=torch.Generator().manual_seed(seed)),)
    return net, inputs


@pytest.mark.parametrize("seed", range(20))
def test_random_architectures_fold_exactly(seed):
    net, inputs = _random_case(seed)
    result = check_fold(net, inputs, net.expected)
    assert analyze_foldability(net, inputs) == result.decisions


@pytest.mark.parametrize("seed", range(0, 20, 3))
def test_random_architectures_bn_to_affine(seed):
    net, inputs = _random_case(seed)
    check_fold(net, inputs, net.expected, bn_to_affine=True)


# ----------------------------------------------------------------------------- targeted cases

def _eval_model(*layers):
    return randomize_bn(nn.Sequential(*layers), 0).eval()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_conv_transpose(dims):
    # torch's fuse_conv_bn_eval(transpose=True) gets this layout wrong (FACTS).
    model = _eval_model(CONV_T[dims](6, 9, 3, stride=2, groups=3, dilation=2), BN[dims](9))
    x = torch.randn((2, 6) + (4,) * dims)
    check_fold(model, (x,), {"1": (PRE, "0", None)})


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular", "replicate"])
def test_padding_modes(mode):
    # Non-zero padding modes copy BN outputs, so a BN before such a conv folds forward too.
    model = _eval_model(nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode=mode), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1, padding_mode=mode))
    after = (None, None, ZERO_PADDING) if mode == "zeros" else (POST, "4", None)
    check_fold(model, (torch.randn(2, 3, 5, 6),), {"1": (PRE, "0", None), "3": after})


def test_conv_called_twice_keeps_its_weights():
    net = randomize_bn(ConvCalledTwice(random.Random(0), 2, 4, 6), 1).eval()
    result = fold(net, (torch.randn(2, 4, 6, 6),))
    assert torch.equal(result.model.conv.weight, net.conv.weight)
    assert torch.equal(result.model.conv.bias, net.conv.bias)


def test_chained_bns_fold_into_one_conv():
    model = _eval_model(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    check_fold(model, (torch.randn(2, 3, 6, 6),), {"1": (PRE, "0", None), "2": (PRE, "0", None)})


def test_conv_absorbs_bn_on_both_sides():
    model = _eval_model(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))
    check_fold(model, (torch.randn(2, 4, 5, 5),), {"1": (POST, "2", None), "3": (PRE, "2", None)})


def test_folds_across_eval_identities():
    # Dropout and Identity do nothing in eval mode, so BN folds across them.
    model = _eval_model(nn.Conv2d(3, 4, 3), nn.Dropout2d(0.3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.Identity(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 3 * 3, 5),
                        nn.ReLU(), nn.BatchNorm1d(5), nn.Dropout(0.1), nn.Linear(5, 2))
    check_fold(model, (torch.randn(2, 3, 5, 5),),
               {"2": (PRE, "0", None), "4": (POST, "8", None), "10": (POST, "12", None)})


def test_linear_bn1d_needs_channels_in_dim_1():
    # Linear on (N, L, F) then BN1d normalises L, not the Linear's features.
    model = _eval_model(nn.Linear(6, 4), nn.BatchNorm1d(4))
    check_fold(model, (torch.randn(3, 4, 6),), {"1": (None, None, "dims")})
    model = _eval_model(nn.Linear(6, 4), nn.BatchNorm1d(4))
    check_fold(model, (torch.randn(3, 6),), {"1": (PRE, "0", None)})


def test_nn_flatten_into_linear():
    model = _eval_model(nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 5, 2))
    check_fold(model, (torch.randn(2, 3, 4, 5),), {"1": (POST, "3", None)})


def test_untraceable_model_is_refused_whole():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if x.sum() > 0 else -y  # data-dependent control flow

    model = randomize_bn(Branchy(), 0).eval()
    for affine in (False, True):
        result = check_fold(model, (torch.randn(2, 3, 4, 4),), {"bn": (None, None, "could not be traced")},
                            bn_to_affine=affine)
    assert "could not be traced" in result.table()


def test_conv_subclass_with_own_forward_is_refused():
    class StdConv(nn.Conv2d):  # weight standardisation in forward, as timm's StdConv2d
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias)

    model = _eval_model(StdConv(3, 4, 3), nn.BatchNorm2d(4))
    check_fold(model, (torch.randn(2, 3, 5, 5),), {"1": (None, None, "StdConv overrides forward")})


def test_mixed_dtypes_are_refused():
    model = _eval_model(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[0].to(torch.bfloat16)
    decisions = analyze_foldability(model, (torch.randn(2, 3, 4, 4, dtype=torch.bfloat16),))
    assert decisions[0].target is None and "mixed dtypes" in decisions[0].reason


class ConvBNSpare(nn.Module):
    def __init__(self, spare=None):
        super().__init__()
        self.conv, self.bn, self.spare = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), spare

    def forward(self, x):
        return self.bn(self.conv(x))


def test_aliased_bn_is_replaced_under_every_name():
    model = ConvBNSpare()
    model.spare = model.bn  # same module under a second name; forward calls it once
    model = randomize_bn(model, 0).eval()
    result = fold(model, (torch.randn(2, 3, 4, 4),))
    assert isinstance(result.model.bn, nn.Identity) and isinstance(result.model.spare, nn.Identity)
    assert_parity(model, result.model, (torch.randn(2, 3, 4, 4),), 1e-5)


def test_weights_read_elsewhere_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)) + F.linear(x, self.fc.weight)

    model = randomize_bn(Tied(), 0).eval()
    check_fold(model, (torch.randn(3, 4),), {"bn": (None, None, "read elsewhere")})


def test_unused_bn_and_model_without_bn():
    assert fold(nn.Conv2d(3, 4, 1), (torch.randn(1, 3, 2, 2),)).decisions == []
    model = randomize_bn(ConvBNSpare(nn.BatchNorm2d(4)), 0).eval()
    decisions = analyze_foldability(model, torch.randn(1, 3, 2, 2))  # a lone tensor is accepted
    assert [(d.bn, d.target) for d in decisions] == [("bn", "conv"), ("spare", None)]
    assert "not called" in decisions[1].reason


def test_model_that_cannot_run_on_meta_is_run_for_real():
    class CpuConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            x = x * torch.linspace(0.5, 1.5, x.shape[1]).reshape(-1, 1, 1)  # a CPU tensor
            return self.fc(torch.flatten(self.bn(x), 1))

    model = randomize_bn(CpuConstant(), 0).eval()
    check_fold(model, (torch.randn(2, 3, 4, 4),), {"bn": (POST, "fc", None)})


def test_uninitialised_lazy_model_is_refused():
    model = nn.Sequential(nn.LazyConv2d(4, 1), nn.BatchNorm2d(4))
    with pytest.raises(BncalError, match="lazy"):
        fold(model, (torch.randn(2, 3, 4, 4),))
    model(torch.randn(2, 3, 4, 4))
    check_fold(randomize_bn(model, 0).eval(), (torch.randn(2, 3, 4, 4),), {"1": (PRE, "0", None)})


def test_bad_example_inputs_raise(capfd):
    model = _eval_model(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(BncalError, match="example inputs"):
        fold(model, (torch.randn(2, 5, 4, 4),))
    assert capfd.readouterr() == ("", "")  # fx's ShapeProp would print a traceback here


def test_table_lists_every_bn():
    net, inputs = _random_case(4)
    table = fold(net, inputs).table()
    for name in net.expected:
        assert name in table


class _NHWCRoundTrip(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1).contiguous().transpose(1, 3).transpose(2, 3)


class _Float(nn.Module):
    def forward(self, x):
        return x.float()


class _FunctionalDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


def test_folds_across_layout_round_trips_and_functional_dropout():
    # What the exporter drops or emits as Transpose/Identity, the rules see through here too.
    model = _eval_model(nn.Conv2d(3, 4, 3), _NHWCRoundTrip(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                        _FunctionalDropout(), nn.Conv2d(4, 5, 1))
    check_fold(model, (torch.randn(2, 3, 6, 6),), {"2": (PRE, "0", None), "4": (POST, "6", None)})


def test_a_cast_folds_only_to_the_same_type():
    model = _eval_model(nn.Conv2d(3, 4, 3), _Float(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), _Float(),
                        nn.Conv2d(4, 5, 1))
    x = torch.randn(2, 3, 6, 6)
    result = fold(model, (x,))
    assert [(d.direction, d.target) for d in result.decisions] == [(PRE, "0"), (POST, "6")]
    assert_parity(model, result.model, (x,), 1e-5)
    (decision,) = analyze_foldability(_eval_model(nn.Conv2d(3, 4, 3).double(), _Float(), nn.BatchNorm2d(4)), (x.double(),))
    assert not decision.folded and "casts float64 to float32" in decision.reason


def test_a_permute_that_moves_the_channels_is_refused():
    class ChannelsLast(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 1, 3)

    model = _eval_model(nn.Conv2d(3, 4, 1), ChannelsLast(), nn.BatchNorm2d(5), nn.ReLU())
    check_fold(model, (torch.randn(2, 3, 5, 6),), {"2": (None, None, "channels on its axis 2")})


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_zero_with_a_padding_mode_folds_both_ways(mode):
    # The exporter emits an all-zero Pad for these; it commutes with the BN.
    model = _eval_model(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=0, padding_mode=mode), nn.BatchNorm2d(4))
    check_fold(model, (torch.randn(2, 3, 6, 6),), {"0": (POST, "1", None), "2": (PRE, "1", None)})
