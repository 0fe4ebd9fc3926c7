import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bncal.inspect import RULES, inspect_model
from bncal.torch.nn import BatchRenorm2d
from bncal.report import FoldDecision, to_jsonable

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo.py"
# Batch 256 over 50,000 samples: 196 steps per epoch, suggested TF momentum 0.98 (PyTorch 0.02).
FITTING = dict(batch_size=256, dataset_size=50_000, epochs=30)


def _fired(report):
    return sorted({f.rule_id for f in report.findings})


def _calibrated(model, channels_in=3, momentum=None):
    """Give every BN plausible statistics (a few train-mode passes), then eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, channels_in, 8, 8) * 2 + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and momentum is not None:
            m.momentum = momentum
    return model.eval()


def _clean():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 10),
    )


def test_clean_pytorch_model_has_no_findings():
    model = _calibrated(_clean(), momentum=0.02)
    folded = [FoldDecision("1", "0", "into-preceding"), FoldDecision("4", "3", "into-preceding")]
    report = inspect_model(model, fold_decisions=folded, **FITTING)
    assert report.findings == [] and report.max_severity() is None
    assert report.graph == "torch.fx" and report.source == "pytorch"
    assert [(l.name, l.stats, l.fold) for l in report.layers] == [("1", "plausible", "into 0"), ("4", "plausible", "into 3")]
    assert report.layers[0].momentum_tf == pytest.approx(0.98)
    assert "no findings" in report.table()
    json.dumps(to_jsonable(report))


def test_bn001_never_updated_statistics():
    report = inspect_model(_clean())
    (finding,) = report.by_rule("BN001")
    assert finding.severity == "error" and finding.layers == ["1", "4"]
    assert "bncal recalibrate" in finding.fix
    assert report.max_severity() == "error"
    assert {l.stats for l in report.layers} == {"never updated"}


def test_bn001_on_a_real_stale_checkpoint_and_bn030_on_its_head():
    if not ZOO.exists():
        pytest.skip("models/zoo.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("bncal_test_zoo", ZOO)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    model = zoo.mnist_cnn_stale()
    bns = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    head_bn = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]
    report = inspect_model(model)
    assert report.by_rule("BN001")[0].layers == bns
    (dropout,) = report.by_rule("BN030")  # the zoo puts Dropout before its head's BatchNorm1d
    assert dropout.layers == head_bn


def test_bn002_degenerate_statistics():
    model = _calibrated(_clean())
    model[1].running_var[2] = 0.0
    model[4].running_mean[0] = float("nan")
    (finding,) = inspect_model(model).by_rule("BN002")
    assert finding.layers == ["1", "4"] and "1 of 8 variances" in finding.evidence


def test_bn003_and_bn004_statistics_that_cannot_serve_inference():
    model = _calibrated(_clean())
    model[1].momentum = 0.0
    model[4] = nn.BatchNorm2d(8, track_running_stats=False)
    report = inspect_model(model)
    assert report.by_rule("BN003")[0].layers == ["1"]
    assert report.by_rule("BN004")[0].layers == ["4"]
    assert report.layers[1].stats == "not tracked"


@pytest.mark.parametrize("momentum,batch,severity", [(0.5, 32, "warning"), (0.1, 4096, "info"), (None, 256, "warning")])
def test_bn010_momentum_that_does_not_fit(momentum, batch, severity):
    model = _calibrated(_clean())
    for m in (model[1], model[4]):
        m.momentum = momentum
    report = inspect_model(model, batch_size=batch, dataset_size=50_000, epochs=30)
    (finding,) = report.by_rule("BN010")
    assert finding.severity == severity and finding.layers == ["1", "4"]
    if batch == 4096:  # large batches: the inverse-decay schedule is part of the fix
        assert "InverseDecayMomentum" in finding.fix
    assert any("momentum for batch" in n for n in report.notes)
    assert "BN010" not in _fired(inspect_model(model))  # needs batch and dataset size


class _ReluThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.bn(F.relu(self.conv1(x))))


def test_bn020_affine_bn_after_nonlinearity():
    for model in (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)),
                  _ReluThenBN()):
        report = inspect_model(_calibrated(model, momentum=0.02), **FITTING)
        assert _fired(report) == ["BN020"]
        (finding,) = report.findings
        assert finding.severity == "info" and "affine=False" in finding.fix
    # A BN between two nonlinearities needs its scale and shift: silent.
    between = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU())
    assert inspect_model(_calibrated(between)).by_rule("BN020") == []


class _MethodRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6)
        self.bn = nn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)[:, :12])).relu()


def test_bn021_non_affine_bn_before_nonlinearity():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.Flatten(), nn.Sigmoid())
    for model, name in ((seq, "1"), (_MethodRelu(), "bn")):
        (finding,) = inspect_model(_calibrated(model)).by_rule("BN021")
        assert finding.layers == [name] and finding.severity == "warning"
    affine = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    assert inspect_model(_calibrated(affine)).by_rule("BN021") == []


class _ResidualDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x) + F.dropout(x, 0.2, self.training))


def test_bn030_dropout_upstream_through_any_path():
    chain = nn.Sequential(nn.Dropout(0.3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    (finding,) = inspect_model(_calibrated(chain)).by_rule("BN030")
    assert finding.layers == ["2"]  # the BN at index 5 is shielded by the first BN
    (finding,) = inspect_model(_calibrated(_ResidualDropout())).by_rule("BN030")
    assert finding.layers == ["bn"] and "F.dropout" in finding.evidence
    no_op = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert inspect_model(_calibrated(no_op)).by_rule("BN030") == []


def test_bn040_small_batches_suggest_batch_renormalisation():
    model = _calibrated(_clean(), momentum=0.02)
    (finding,) = inspect_model(model, batch_size=16).by_rule("BN040")
    assert finding.layers == ["1", "4"] and "convert_to_batchrenorm" in finding.fix
    model[1] = BatchRenorm2d(8)
    model[1].load_state_dict(_calibrated(_clean())[1].state_dict())
    assert inspect_model(model, batch_size=16).by_rule("BN040")[0].layers == ["4"]
    assert inspect_model(model, batch_size=33).by_rule("BN040") == []


def test_bn050_fold_refusals_from_a_list_or_callable():
    model = _calibrated(_clean())
    decisions = [FoldDecision("1", "0", "into-preceding"),
                 FoldDecision("4", None, None, "conv output is used twice")]
    x = torch.randn(1, 3, 8, 8)
    for given, example in ((decisions, None), (lambda m: decisions, None), (lambda m, e: decisions, x)):
        report = inspect_model(model, fold_decisions=given, example_inputs=example)
        (finding,) = report.by_rule("BN050")
        assert finding.layers == ["4"] and "used twice" in finding.evidence
        assert report.layers[1].fold == "no: conv output is used twice"


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused_relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = self.drop(x)
        return self.head(self.bn(self.conv(x)))


def test_untraceable_model_falls_back_and_says_so():
    model = _calibrated(_Untraceable())
    report = inspect_model(model)
    assert report.graph == "module order" and any("registration order" in n for n in report.notes)
    assert report.by_rule("BN030")[0].layers == ["bn"]
    # Registration order puts the unused ReLU before the BN; the executed order does not.
    assert report.by_rule("BN020") != []
    model.train()
    report = inspect_model(model, example_inputs=torch.ones(1, 3, 8, 8))
    assert report.graph == "execution order" and report.by_rule("BN020") == []
    assert report.by_rule("BN030")[0].layers == ["bn"]
    assert model.training and model.bn.training  # modes restored after the recording pass


def test_rule_table_and_severities():
    assert set(RULES) == {"BN001", "BN002", "BN003", "BN004", "BN005", "BN010", "BN020", "BN021",
                          "BN030", "BN040", "BN050", "BN060"}
    report = inspect_model(_clean(), batch_size=8, dataset_size=1000)
    text = report.table()
    assert "BN001 error" in text and "BN040 info" in text and "note:" in text
    assert [f.severity for f in report.findings] == sorted(
        [f.severity for f in report.findings], key=("error", "warning", "info").index)


# ---------------------------------------------------------------------------------------------
# ONNX: the same rules on graphs built with onnx.helper.

def _onnx(*ops, channels=4, momentum=0.98):
    """Chain ops on a (1, 4, 8, 8) input. An op is a name or ``(name, options)``:
    Conv, Relu, Sigmoid, SiLU, Dropout, Identity, or BN with options mean/var/scale/bias/
    training_mode/momentum."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    for i, op in enumerate(ops):
        op, options = (op, {}) if isinstance(op, str) else op
        out = f"t{i}"
        if op == "Conv":
            w = const(f"w{i}", rng.normal(0, 0.3, (channels, channels, 1, 1)))
            nodes.append(helper.make_node("Conv", [current, w], [out], name=f"conv{i}"))
        elif op == "BN":
            stats = {"scale": rng.uniform(0.5, 2, channels), "bias": rng.normal(0, 1, channels),
                     "mean": rng.normal(0, 1, channels), "var": rng.uniform(0.5, 2, channels)}
            stats.update({k: v for k, v in options.items() if k in stats})
            names = [const(f"{k}{i}", stats[k]) for k in ("scale", "bias", "mean", "var")]
            nodes.append(helper.make_node(
                "BatchNormalization", [current, *names], [out], name=f"bn{i}",
                momentum=options.get("momentum", momentum), epsilon=1e-5,
                training_mode=options.get("training_mode", 0)))
        elif op == "SiLU":
            nodes.append(helper.make_node("Sigmoid", [current], [f"s{i}"], name=f"sigmoid{i}"))
            nodes.append(helper.make_node("Mul", [current, f"s{i}"], [out], name=f"mul{i}"))
        elif op == "Dropout":
            ratio = const(f"ratio{i}", 0.5)
            nodes.append(helper.make_node("Dropout", [current, ratio], [out], name=f"dropout{i}"))
        else:
            nodes.append(helper.make_node(op, [current], [out], name=f"{op.lower()}{i}"))
        current = out
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, channels, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def test_onnx_clean_graph_has_no_findings():
    model = _onnx("Conv", "BN", "Relu", "Conv", "BN", "Relu", "Dropout", "Conv")
    report = inspect_model(model, fold_decisions=[FoldDecision("bn1", "conv0", "into-preceding")], **FITTING)
    assert report.findings == [] and report.source == "onnx"
    assert [(l.name, l.channels, l.stats) for l in report.layers] == [("bn1", 4, "plausible"), ("bn4", 4, "plausible")]
    assert report.layers[0].momentum_torch == pytest.approx(0.02)


@pytest.mark.parametrize("ops,rule,layers,kwargs", [
    (["Conv", ("BN", {"mean": np.zeros(4), "var": np.ones(4)}), "Relu"], "BN001", ["bn1"], {}),
    (["Conv", ("BN", {"var": [1, 0, 1, -1]}), "Relu"], "BN002", ["bn1"], {}),
    (["Conv", ("BN", {"momentum": 1.0, "training_mode": 1}), "Relu"], "BN003", ["bn1"], {}),
    (["Conv", ("BN", {"training_mode": 1}), "Relu"], "BN005", ["bn1"], {}),
    (["Conv", ("BN", {"momentum": 0.5}), "Relu"], "BN010", ["bn1"], dict(batch_size=32, dataset_size=50_000)),
    (["Conv", "Relu", "BN", "Conv"], "BN020", ["bn2"], {}),
    (["Conv", "SiLU", "Identity", "BN", "Conv"], "BN020", ["bn3"], {}),
    (["Conv", ("BN", {"scale": np.ones(4), "bias": np.zeros(4)}), "Relu"], "BN021", ["bn1"], {}),
    (["Dropout", "Conv", "BN", "Relu", "Conv", "BN"], "BN030", ["bn2"], {}),
    (["Conv", "BN", "Relu"], "BN040", ["bn1"], dict(batch_size=16)),
])
def test_onnx_rules_fire(ops, rule, layers, kwargs):
    report = inspect_model(_onnx(*ops), **kwargs)
    (finding,) = report.by_rule(rule)
    assert finding.layers == layers
    assert finding.severity == (RULES[rule][0] if rule != "BN010" else "warning")


def test_onnx_inference_graph_momentum_attribute_is_not_frozen_statistics():
    # Exporters write momentum 1 for PyTorch's momentum=None; only a training graph uses it.
    report = inspect_model(_onnx("Conv", ("BN", {"momentum": 1.0}), "Relu"))
    assert report.by_rule("BN003") == []


def test_onnx_fold_refusal_and_path_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_onnx("Relu", "BN", "Relu"), str(path))
    report = inspect_model(str(path), fold_decisions=[FoldDecision("bn1", None, None, "no Conv next to it")])
    assert report.by_rule("BN050")[0].layers == ["bn1"]


def test_onnx_exported_from_pytorch():
    model = _calibrated(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6),
                                      nn.BatchNorm1d(6, affine=False, momentum=0.3), nn.ReLU()))
    buffer = io.BytesIO()
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter, deprecated but fast
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False)
    report = inspect_model(onnx.load_from_string(buffer.getvalue()), batch_size=8)
    (layer,) = report.layers
    assert layer.momentum_tf == pytest.approx(0.7) and layer.stats == "plausible"
    assert _fired(report) == ["BN021", "BN040"]
