"""ONNX export: onnxruntime outputs against PyTorch, dynamic batch, names, train-mode graphs."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from bncal.errors import BncalError
from bncal.torch.export import export_onnx, export_train_mode_onnx
from bncal.folding import fold


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    return model


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc, self.bn_fc = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.shared = nn.Conv2d(8, 8, 1)  # applied twice: its BN cannot be folded
        self.bn_shared = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = self.bn_shared(self.shared(F.relu(self.shared(x))))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _assert_close(got, want, rel=1e-5):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max(), scale)


def _bn_modes(proto):
    """training_mode of every BatchNormalization node (0 when the attribute is absent)."""
    return [next((a.i for a in n.attribute if a.name == "training_mode"), 0)
            for n in proto.graph.node if n.op_type == "BatchNormalization"]


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return randomize_bn(SmallCNN()).train()  # the user's model may be in train mode


def test_export_matches_pytorch_with_dynamic_batch(cnn, tmp_path, capfd):
    state = copy.deepcopy(cnn.state_dict())
    path = tmp_path / "model.onnx"
    proto = export_onnx(cnn, (torch.randn(2, 3, 16, 16),), path)
    assert capfd.readouterr() == ("", "")  # the exporter's chatter is silenced

    assert cnn.training and all(torch.equal(v, state[k]) for k, v in cnn.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # one file, no temporaries
    assert onnx.load(path) == proto
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert _dims(proto.graph.input[0]) == ["batch", 3, 16, 16]
    assert all(mode == 0 for mode in _bn_modes(proto))

    session, reference = _session(proto), copy.deepcopy(cnn).eval()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            want = reference(x).numpy()
        [got] = session.run(None, {"input": x.numpy()})
        _assert_close(got, want)


def test_a_one_sample_example_is_traced_at_batch_two_and_the_export_takes_any_batch(cnn):
    from bncal.torch.export import traced_batch

    x, meta = torch.randn(1, 3, 16, 16), 7
    doubled = traced_batch((x, meta))
    assert doubled[0].shape == (2, 3, 16, 16) and torch.equal(doubled[0][1], x[0]) and doubled[1] == 7
    two = (torch.randn(2, 3, 16, 16),)
    assert traced_batch(two) is two
    proto = export_onnx(cnn, (x,))
    assert _dims(proto.graph.input[0]) == ["batch", 3, 16, 16]
    session, reference = _session(proto), copy.deepcopy(cnn).eval()
    for batch in (1, 2, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            want = reference(x).numpy()
        [got] = session.run(None, {"input": x.numpy()})
        _assert_close(got, want)


@pytest.mark.parametrize("bn_to_affine", [False, True])
def test_folded_export_has_no_batchnorm(cnn, bn_to_affine):
    x = torch.randn(2, 3, 16, 16)
    result = fold(cnn, (x,), bn_to_affine=bn_to_affine)
    refused = [d.bn for d in result.decisions if d.direction is None]
    assert refused == ([] if bn_to_affine else ["bn_shared"])
    proto = export_onnx(result.model, (x,))
    ops = [n.op_type for n in proto.graph.node]
    if bn_to_affine:
        # Nothing is left to onnxscript: the affine map is one Mul and one Add.
        assert "BatchNormalization" not in ops and ops.count("Mul") == 1 and ops.count("Add") >= 2
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = copy.deepcopy(cnn).eval()(x).numpy()
    _assert_close(_session(proto).run(None, {"input": x.numpy()})[0], want)


@pytest.mark.parametrize("dynamo", [True, False])
def test_keep_batchnorm_exports_every_bn(cnn, dynamo):
    proto = export_onnx(cnn, (torch.randn(2, 3, 16, 16),), dynamo=dynamo, keep_batchnorm=True)
    assert _bn_modes(proto) == [0] * 5
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = copy.deepcopy(cnn).eval()(x).numpy()
    _assert_close(_session(proto).run(None, {"input": x.numpy()})[0], want)


def test_keep_batchnorm_rules_are_the_default_minus_the_bn_fusions():
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common

    from bncal.torch.export import rewrite_rules_keeping_batchnorm

    rules = rewrite_rules_keeping_batchnorm()
    fusions = [common.fuse_batchnorm_into_conv_rule, common.fuse_batchnorm_into_conv_transpose_rule,
               common.fuse_batchnorm_into_gemm_rule]
    default = list(rewriter._DEFAULT_REWRITE_RULES)
    assert all(any(f is r for r in default) for f in fusions)
    assert rules == [r for r in default if not any(r is f for f in fusions)]
    assert not [r.name for r in rules if "BatchNorm" in (r.name or "")]


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)

    def forward(self, x, y):
        z = self.bn(self.conv(x))
        return {"features": z, "pair": (z.sum(-1) + y, y * 2)}


@pytest.mark.parametrize("dynamo", [True, False])
def test_several_inputs_and_nested_outputs(dynamo):
    model = randomize_bn(TwoInTwoOut()).eval()
    example = (torch.randn(1, 2, 7), torch.randn(1, 4))  # batch 1 example must still export a batch axis
    proto = export_onnx(model, example, dynamo=dynamo)
    assert [i.name for i in proto.graph.input] == ["x", "y"]  # forward(self, x, y)
    assert [o.name for o in proto.graph.output] == ["features", "pair_0", "pair_1"]  # the dict keys, nested by position
    assert _dims(proto.graph.output[0])[0] == "batch"

    x, y = torch.randn(4, 2, 7), torch.randn(4, 4)
    with torch.no_grad():
        out = model(x, y)
    got = _session(proto).run(None, {"x": x.numpy(), "y": y.numpy()})
    for g, w in zip(got, [out["features"], *out["pair"]]):
        _assert_close(g, w.numpy())


def test_custom_names_and_static_batch():
    model = randomize_bn(TwoInTwoOut()).eval()
    proto = export_onnx(model, (torch.randn(2, 2, 7), torch.randn(2, 4)), dynamo=False,
                        input_names=["x", "y"], output_names=["f", "s", "d"], dynamic_batch=False)
    assert [i.name for i in proto.graph.input] == ["x", "y"]
    assert [o.name for o in proto.graph.output] == ["f", "s", "d"]
    assert _dims(proto.graph.input[0]) == [2, 2, 7]


def test_wrong_name_count_is_refused():
    with pytest.raises(BncalError, match="1 output names given for 3"):
        export_onnx(TwoInTwoOut().eval(), (torch.randn(2, 2, 7), torch.randn(2, 4)), output_names=["a"])


def test_train_mode_export_matches_pytorch_train_mode(cnn):
    model = nn.Sequential(cnn.stem, nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))  # no dropout: deterministic
    model = randomize_bn(model, 1).eval()
    state = copy.deepcopy(model.state_dict())
    proto = export_train_mode_onnx(model, (torch.randn(4, 3, 8, 8),))
    assert not model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _bn_modes(proto) == [1, 1]

    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        want = copy.deepcopy(model).train()(x).numpy()  # normalised with batch statistics
    got = _session(proto).run(["output"], {"input": x.numpy()})[0]
    _assert_close(got, want)
