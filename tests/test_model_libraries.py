"""The BatchNorm modules model libraries build with (timm's BatchNormAct2d with a DropBlock, its
SyncBatchNormAct, frozen BN of torchvision and timm), through recalibrate, fold, fold-export and
inspect, against float64 references. The modules are look-alikes (models/library_lookalikes.py)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bncal
from bncal.torch.bn_modules import is_frozen_batchnorm, sync_to_batchnorm, unfreeze_batchnorm
from bncal.errors import BncalError
from models.library_lookalikes import (BatchNormAct2d, FrozenBatchNorm2d, FrozenBatchNormAct2d, RepVGGBlock,
                                       SyncBatchNormAct, error_in_sd, float64_bn_statistics, lcnet_like, randomize)


def _act_net(sync: bool = False):
    """Conv -> BN-with-activation (a DropBlock as drop) twice, then a plain BN: every BN after
    the first sees its input through the earlier ones' activations."""
    torch.manual_seed(0)
    bn_act = SyncBatchNormAct if sync else BatchNormAct2d
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn_act(6, drop_block=0.5),
                        nn.Conv2d(6, 6, 3, padding=1), bn_act(6, drop_block=0.5, act=nn.SiLU),
                        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    return randomize(net)


@pytest.mark.parametrize("sync", [False, True], ids=["BatchNormAct2d", "SyncBatchNormAct"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_with_activation_and_dropblock_recalibrates_to_float64(mode, sync):
    net = _act_net(sync)
    torch.manual_seed(1)
    batches = [torch.randn(n, 3, 8, 8) * 2 + 0.5 for n in (16, 16, 9)]
    reference = float64_bn_statistics(net, batches, one_batch=mode == "eval")
    twice = copy.deepcopy(net)
    bncal.recalibrate(net, batches, mode=mode, tol=1e-8)
    assert error_in_sd(net, reference) < 1e-5
    bncal.recalibrate(twice, batches, mode=mode, tol=1e-8)  # no random drop: the same result again
    assert error_in_sd(twice, reference) < 1e-5
    # Modes and classes as they were: the DropBlocks are still in train mode, SyncBatchNorm subclasses intact.
    assert net[1].drop.training and type(net[3]) is (SyncBatchNormAct if sync else BatchNormAct2d)


def test_frozen_batchnorm_is_named_by_recalibrate():
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), FrozenBatchNormAct2d(4))
    with pytest.raises(BncalError, match=r"2 frozen BatchNorm layers \(FrozenBatchNorm2d, FrozenBatchNormAct2d: 1, 3\)"
                                         r".*unfreeze_batchnorm"):
        bncal.recalibrate(frozen, [torch.randn(4, 3, 5, 5)])
    mixed = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    report = bncal.recalibrate(mixed, [torch.randn(4, 3, 5, 5)])
    assert [layer.name for layer in report.layers] == ["3"]
    assert {s.name: s.reason for s in report.skipped}["1"].startswith("a frozen BatchNorm: its statistics are fixed")


def _library_net():
    """Every module kind after a Conv, and a frozen BN with activation after a Linear-free 1x1 Conv."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, drop_block=0.3),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), FrozenBatchNormAct2d(8), nn.Conv2d(8, 4, 1), SyncBatchNormAct(4))
    return randomize(net, seed=3)


def test_fold_folds_bn_with_activation_and_frozen_bn_keeping_the_activation():
    net = _library_net()
    x = torch.randn(3, 3, 8, 8)
    result = bncal.fold(net, (x,))
    assert [(d.bn, d.direction, d.target) for d in result.decisions] == [
        ("1", "into-preceding", "0"), ("3", "into-preceding", "2"), ("6", "into-preceding", "5"),
        ("8", "into-preceding", "7")]
    assert [type(m) for m in result.model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Identity, nn.ReLU, nn.Conv2d,
                                               nn.SiLU, nn.Conv2d, nn.ReLU]
    with torch.no_grad():
        expected = copy.deepcopy(net).double().eval()(x.double())
        got = result.model(x).double()
    assert float((got - expected).abs().max() / expected.std()) < 1e-5
    affine = bncal.fold(nn.Sequential(nn.ReLU(), BatchNormAct2d(8, act=nn.SiLU)), (x[:, :1].expand(3, 8, 8, 8),),
                        bn_to_affine=True)
    assert isinstance(affine.model[1], nn.Sequential) and isinstance(affine.model[1][1], nn.SiLU)


def test_fold_export_leaves_no_frozen_arithmetic():
    net = _library_net()
    _, report = bncal.fold_export_torch(net, (torch.randn(2, 3, 8, 8),))
    assert report.passed and report.bn_left == 0
    assert "Mul" not in report.ops_after or report.ops_after["Mul"] == 1  # the SiLU's x * sigmoid(x) only


def test_unfreeze_and_sync_to_batchnorm_keep_eval_outputs():
    net = _library_net()
    x = torch.randn(2, 3, 8, 8)
    plain = sync_to_batchnorm(unfreeze_batchnorm(net))
    assert type(plain[3]) is nn.BatchNorm2d and not plain[3].training and plain[3].weight.requires_grad
    assert is_frozen_batchnorm(plain[6])  # with an activation: timm's own helper converts it
    assert type(plain[8]) is SyncBatchNormAct  # a subclass keeps its forward
    assert type(sync_to_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)))[0]) is nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-5)
    assert is_frozen_batchnorm(net[3])  # the input is never modified


def test_inspect_lists_frozen_bn_and_agrees_with_the_fold():
    from bncal.folding import analyze_foldability

    net = nn.Sequential(_library_net(), nn.Conv2d(4, 4, 1), nn.ReLU(), RepVGGBlock(4), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    randomize(net, seed=4)
    x = torch.randn(2, 3, 8, 8)
    report = bncal.inspect_model(net, fold_decisions=analyze_foldability(net, x))
    rows = {l.name: l for l in report.layers}
    frozen = rows["0.3"]
    assert frozen.type == "FrozenBatchNorm2d" and frozen.frozen and frozen.stats == "frozen"
    assert "cannot be recalibrated" in frozen.stats_detail and rows["0.6"].frozen
    assert any("0.3, 0.6 are frozen BatchNorms" in n for n in report.notes)
    # Every BN-with-activation and frozen BN folds, so inspect says so; RepVGG's identity BN does not.
    assert all(rows[n].fold == f"into 0.{int(n[2:]) - 1}" for n in ("0.1", "0.3", "0.6", "0.8"))
    (bn050,) = report.by_rule("BN050")
    assert bn050.layers == ["3.identity"] and "remove what the reason names" not in bn050.fix
    # BN020 only where one linear layer absorbs the affine: not on the identity branch summed with two others.
    assert [f.layers for f in report.by_rule("BN020")] == [["5"]]
    assert report.by_rule("BN001") == report.by_rule("BN010") == []


def test_frozen_bn_in_an_export_is_named_not_blamed_on_a_converter():
    from bncal.torch.export import export_onnx

    torch.manual_seed(5)
    net = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                  nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), FrozenBatchNormAct2d(4)), seed=6)
    x = torch.randn(64, 3, 6, 6)
    bncal.recalibrate(net, [x[:32], x[32:]], mode="eval")  # the one trainable BN, exactly
    proto = export_onnx(net, (x[:2],), keep_batchnorm=True)
    report = bncal.check_onnx(proto, [x[:32].numpy(), x[32:].numpy()])
    assert report.verdict == "PASSED" and not report.unchecked and [l.name for l in report.layers] == ["4"]
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == {"1", "7"} and all("frozen BatchNorm (FrozenBatchNorm" in r for r in skipped.values())
    assert "converter" not in report.table()
    inspected = bncal.inspect_model(proto)
    assert inspected.by_rule("BN060") == []
    assert {(l.name, l.type) for l in inspected.layers if l.frozen} == {("1", "FrozenBatchNorm2d"),
                                                                         ("7", "FrozenBatchNormAct2d")}
    only_frozen = export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)), (x[:2],), keep_batchnorm=True)
    with pytest.raises(BncalError, match=r"1 frozen BatchNorm layer \(1\) hold fixed statistics") as error:
        bncal.check_onnx(only_frozen, [x.numpy()])
    assert "converter" not in str(error.value)


class _DictHead(nn.Module):
    """A segmentation-style model returning ``{"out": ..., "aux": ...}`` (torchvision's FCN/DeepLab)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.aux = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return {"out": y, "aux": self.aux(y)}


def test_dict_outputs_keep_their_keys_as_onnx_names():
    from bncal.torch.export import export_onnx

    net = randomize(_DictHead()).eval()
    x = torch.randn(2, 3, 5, 5)
    proto = export_onnx(net, (x,), dynamo=False)
    assert [o.name for o in proto.graph.output] == ["out", "aux"]
    folded, report = bncal.fold_export_torch(net, (x,))
    assert report.passed and [o.name for o in folded.graph.outputs] == ["out", "aux"]


def test_check_says_batch_too_small_for_an_exact_model_and_still_fails_a_stale_one():
    from bncal.torch.export import export_onnx

    data = np.random.default_rng(0).standard_normal((192, 3, 32, 32)).astype(np.float32)
    batches = lambda size: [data[i:i + size] for i in range(0, len(data), size)]
    stale = export_onnx(lcnet_like(), (torch.randn(2, 3, 32, 32),), keep_batchnorm=True, dynamo=False)
    exact, _ = bncal.recalibrate_onnx(stale, batches(32), mode="eval")

    small = bncal.check_onnx(exact, batches(16))
    assert small.verdict == "BATCH TOO SMALL" and not small.passed and not small.reasons
    (layer,) = small.too_small  # the BN after the squeeze-excitation at 2x2 pixels
    assert "10.1" in layer.name and layer.var_ratio > 1.3 and 16 < layer.needed_batch <= 32
    assert f"batches of {layer.needed_batch} or more" in small.table()
    assert bncal.check_onnx(exact, batches(32)).passed
    failed = bncal.check_onnx(stale, batches(16))
    assert failed.verdict == "FAILED" and not failed.too_small
