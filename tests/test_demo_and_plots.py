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


def _drawn_figure(monkeypatch):
    """The figure the next plot function draws (captured where it is closed)."""
    import matplotlib.pyplot as plt

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (drawn.append(fig), close(fig)))
    return drawn


def _ring_layers(ax, n_layers):
    """Layer indices ringed in red on ``ax`` (the unfilled markers drawn over points outside their band)."""
    import numpy as np

    rings = [c for c in ax.collections if len(c.get_facecolors()) == 0 or not np.any(c.get_facecolors()[:, 3])]
    return sorted({int(round(x)) for c in rings for x, _ in c.get_offsets()} & set(range(n_layers)))


def test_check_plot_draws_each_layer_against_its_band_and_marks_failures(tmp_path, monkeypatch):
    import math

    from matplotlib.colors import to_hex

    from bncal.check import CheckReport, CheckThresholds, LayerCheck, OutputCheck
    from bncal.plot import plot_check

    layers = [LayerCheck("ok", 4, 400, 0.05, 1.1, 0.25, 0.41, True),
              LayerCheck("shifted", 4, 400, 0.6, 1.0, 0.25, 0.41, False),
              LayerCheck("squeezed", 4, 100, 0.01, 0.4, 0.4, 0.62, False)]
    report = CheckReport.from_checks(layers, [OutputCheck("y", 1.0, 0.1, 1.0, True)], [], CheckThresholds(), 2, 64)
    drawn = _drawn_figure(monkeypatch)
    path = plot_check({"moving vs data": report}, tmp_path / "c.png", model="net.onnx")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = drawn[-1]
    top, bottom = fig.axes[:2]
    assert fig._suptitle.get_text() == "net.onnx: bncal check: FAILED (2 of 3 layers off their data)"
    # The bands: per layer, shift up to its limit, variance ratio within exp(+-log_ratio_limit).
    top_bars, bottom_bars = top.patches, bottom.patches
    assert [round(b.get_y() + b.get_height(), 9) for b in top_bars] == [0.25, 0.25, 0.4]
    assert [(round(b.get_y(), 9), round(b.get_y() + b.get_height(), 9)) for b in bottom_bars] == [
        (round(math.exp(-l.log_ratio_limit), 9), round(math.exp(l.log_ratio_limit), 9)) for l in layers]
    # Rings where a point leaves its band, red names for the failed layers.
    assert _ring_layers(top, 3) == [1] and _ring_layers(bottom, 3) == [2]
    colours = [to_hex(label.get_color()) for label in bottom.get_xticklabels()]
    assert colours[0] != colours[1] == colours[2] == "#c62828"
    points = top.collections[0].get_offsets()  # the series, drawn before its rings
    assert [round(y, 9) for _, y in points] == [0.05, 0.6, 0.01]


def test_recalibrate_plot_shows_old_against_new_only(tmp_path, monkeypatch):
    """No 'after' series: it would be 0 shift and ratio 1 by construction."""
    import bncal
    from bncal.plot import plot_recalibration

    from models import zoo

    drawn = _drawn_figure(monkeypatch)
    report = bncal.recalibrate(zoo.mnist_cnn_stale(), zoo.calibration_batches()[:8])
    plot_recalibration(report, tmp_path / "r.png", model="mnist_cnn")
    fig = drawn[-1]
    top, bottom = fig.axes[:2]
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels[0] == "old statistics vs recalibrated" and labels[1] == "outside its band" and len(labels) == 3
    series = [c for c in top.collections if c.get_label() == "old statistics vs recalibrated"]
    assert len(series) == 1
    assert [round(y, 6) for _, y in series[0].get_offsets()] == [round(l.mean_shift, 6) for l in report.layers]
    ratios = bottom.collections[0].get_offsets()
    assert [round(y, 6) for _, y in ratios] == [round(l.var_ratio, 6) for l in report.layers]
    title = fig._suptitle.get_text().replace("\n", " ")
    assert title.startswith("mnist_cnn: recalibrated 7 BN layers (train mode, 1024 samples)")
    assert "7 of 7 held statistics outside the check's limits" in title
