"""The demo on the shipped model and data, and the per-layer plots."""

import builtins
import json

import pytest
from click.testing import CliRunner

from bncal.cli import main
from bncal.errors import BncalError


def test_demo_repairs_the_stale_model(tmp_path):
    plot = tmp_path / "layers.png"
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out"), "--plot", str(plot),
                                       "--report-json", str(tmp_path / "demo.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "demo.json").read_text())
    assert figures["accuracy_stale"] < 0.3  # near chance with the never-updated statistics
    assert figures["accuracy_train_mode"] > 0.95
    assert abs(figures["accuracy_recalibrated"] - figures["accuracy_train_mode"]) < 0.015
    assert not figures["check_before_passed"] and figures["check_after_passed"] and figures["fold_export_passed"]
    assert (tmp_path / "out" / "mnist_cnn_folded.onnx").exists()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("BN001", "BN030", "FAILED", "PASSED", "0 BatchNormalization left"):
        assert text in result.output


def test_recalibrate_plot_and_missing_matplotlib_message(tmp_path, monkeypatch):
    import torch

    import bncal
    from bncal.plot import plot_recalibration

    bn = torch.nn.BatchNorm1d(3)
    report = bncal.recalibrate(bn, [torch.randn(8, 3) * 2 + 1])
    path = plot_recalibration(report, tmp_path / "r.png")
    assert path.stat().st_size > 1000
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(BncalError, match=r"bncal\[plot\]"):
        plot_recalibration(report, tmp_path / "r2.png")
    assert not (tmp_path / "r2.png").exists()
