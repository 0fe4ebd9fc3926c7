"""inspect predicts fold-export: one rulebook decides both.

``bncal inspect`` shows :func:`bncal.analyze_foldability` on the PyTorch model; ``fold-export``'s
graph fold (:func:`bncal.fold_export_torch` with ``module_fold=False``) exports it with every BN
kept, folds the graph with :func:`bncal.fold_onnx` and proves the result against PyTorch in onnxruntime. For every BN the
two must agree: folded or not, the direction, and the op it goes into. Checked on every model of
``models/zoo.py``, on the cases where they used to disagree, and on seeded random architectures.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from bncal import fold
from models import random_nets, zoo
from tests_support import ROOT, randomize_bn

_spec = importlib.util.spec_from_file_location("fold_agreement", ROOT / "tools" / "fold_agreement.py")
fold_agreement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fold_agreement)


def assert_agreement(model, inputs) -> dict[str, tuple]:
    """inspect's and fold-export's decisions per BN; fails on the first BN they disagree on."""
    rows = fold_agreement.compare(model, inputs)
    disagreeing = [row for row in rows if row[1] != row[2]]
    assert not disagreeing, "\n".join(f"{n}: inspect {p} ({pr}); fold-export {d} ({dr})"
                                      for n, p, d, pr, dr in disagreeing)
    return {name: predicted for name, predicted, *_ in rows}


@pytest.mark.parametrize("factories, shape", [
    ((zoo.mnist_cnn, zoo.mnist_cnn_stale), (2, 1, 28, 28)),
    ((zoo.resnet_small, zoo.mobilenet_small, zoo.resnet18_like), (1, 3, 32, 32)),
], ids=["mnist", "rgb"])
def test_zoo_models(factories, shape):
    # Side by side on one input, so that one export covers them.
    model = random_nets.Branches([randomize_bn(factory()) for factory in factories]).eval()
    decisions = assert_agreement(model, (torch.randn(shape),))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted(decisions) == sorted(bns)
    assert all(direction == "into-preceding" for direction, _ in decisions.values())


class Permuted(nn.Module):
    """A tf2onnx-like NHWC round trip: permute to channels-last and back (a Transpose pair)."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)


class SameTypeCast(nn.Module):
    def forward(self, x):
        return x.float()


def _case(*layers):
    return random_nets.randomize_batchnorms(nn.Sequential(*layers), 0).eval()


MEASURED = {
    # inspect used to fold this BN into the reflect-padded Conv; fold-export kept it ("feeds Pad").
    "bn-relu-reflect-conv": (_case(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4),
                                   nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")),
                             {"2": ("into-following", "3")}),
    **{f"padding-0-{mode}": (_case(nn.Conv2d(3, 4, 3, padding=0, padding_mode=mode), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=0, padding_mode=mode)),
                             {"1": ("into-preceding", "0"), "3": ("into-following", "4")})
       for mode in ("reflect", "replicate", "circular")},
    "transpose-pairs": (_case(nn.Conv2d(3, 4, 3), Permuted(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                              Permuted(), nn.Conv2d(4, 5, 1)),
                        {"2": ("into-preceding", "0"), "4": ("into-following", "6")}),
    "identity": (_case(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                       nn.Identity(), nn.Conv2d(4, 5, 1)),
                 {"2": ("into-preceding", "0"), "4": ("into-following", "6")}),
    "same-type-cast": (_case(nn.Conv2d(3, 4, 3), SameTypeCast(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                             SameTypeCast(), nn.Conv2d(4, 5, 1)),
                       {"2": ("into-preceding", "0"), "4": ("into-following", "6")}),
}


def test_cases_that_used_to_disagree():
    cases = list(MEASURED.values())
    model = random_nets.Branches([case for case, _ in cases]).eval()
    expected = {f"branches.{i}.{bn}": (direction, f"branches.{i}.{target}")
                for i, (_, outcomes) in enumerate(cases) for bn, (direction, target) in outcomes.items()}
    assert assert_agreement(model, (torch.randn(2, 3, 9, 9),)) == expected


RANDOM_SEEDS = range(48)
PER_MODEL = 24  # architectures per export: the export is the slow part


@pytest.mark.parametrize("first", RANDOM_SEEDS[::PER_MODEL])
def test_random_architectures(first):
    seeds = range(first, first + PER_MODEL)
    model = random_nets.packed_model(seeds)
    x = torch.randn(random_nets.INPUT_SHAPE, generator=torch.Generator().manual_seed(first))
    decisions = assert_agreement(model, (x,))
    assert any(d == "into-preceding" for d, _ in decisions.values())
    # fold-export proved its folds in onnxruntime; bncal.fold's are exact in PyTorch too.
    with torch.no_grad():
        want, got = model(x), fold(model, (x,)).model(x)
    for w, g in zip(want, got):
        assert (w - g).abs().max() <= 1e-5 * w.abs().max()


class _ActBN(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: the activation lives in the BN's own forward."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class _ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.conv(x))))


def test_module_limits_are_the_one_documented_exception():
    # bncal.fold writes into modules, so it refuses what only a module cannot do; the exported
    # graph has no such limit and fold-export folds (and proves) it. inspect says why.
    model = random_nets.Branches([_case(nn.Conv2d(3, 3, 1), _ActBN(3)), randomize_bn(_ConvTwice())]).eval()
    rows = {name: (p, d, reason) for name, p, d, reason, _ in fold_agreement.compare(model, (torch.randn(2, 3, 5, 5),))}
    assert rows["branches.0.1"][:2] == ((None, None), ("into-preceding", "branches.0.0"))
    assert "_ActBN overrides forward" in rows["branches.0.1"][2]
    assert rows["branches.1.bn"][0] == (None, None) and rows["branches.1.bn"][1][0] == "into-preceding"
    assert "its module is called more than once (2 times)" in rows["branches.1.bn"][2]
