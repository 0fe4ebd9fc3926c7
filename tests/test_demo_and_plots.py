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
    plot_recalibration(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(BncalError, match=r"bncal\[plot\]"):
        plot_recalibration(report, tmp_path / "r2.png")
    assert not (tmp_path / "r2.png").exists()


def _ring_layers(ax, n_layers):
    """Layer indices ringed in red on ``ax`` (the unfilled markers drawn over points outside their band)."""
    import numpy as np

    rings = [c for c in ax.collections if len(c.get_facecolors()) == 0 or not np.any(c.get_facecolors()[:, 3])]
    return sorted({int(round(x)) for c in rings for x, _ in c.get_offsets()} & set(range(n_layers)))


def test_check_plot_draws_each_layer_against_its_band_and_marks_failures(tmp_path):
    import math

    from matplotlib.colors import to_hex

    from bncal.checking import CheckReport, CheckThresholds, LayerCheck, OutputCheck
    from bncal.plot import plot_check

    layers = [LayerCheck("ok", 4, 400, 0.05, 1.1, 0.25, 0.41, True),
              LayerCheck("shifted", 4, 400, 0.6, 1.0, 0.25, 0.41, False),
              LayerCheck("squeezed", 4, 100, 0.01, 0.4, 0.4, 0.62, False)]
    report = CheckReport.from_checks(layers, [OutputCheck("y", 1.0, 0.1, 1.0, True)], [], CheckThresholds(), 2, 64)
    fig = plot_check({"moving vs data": report}, tmp_path / "c.png", model="net.onnx")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


def test_recalibrate_plot_shows_old_against_new_only():
    """No 'after' series: it would be 0 shift and ratio 1 by construction."""
    import bncal
    from bncal.plot import plot_recalibration

    from models import zoo

    report = bncal.recalibrate(zoo.mnist_cnn_stale(), zoo.calibration_batches()[:8])
    fig = plot_recalibration(report, model="mnist_cnn")
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


def _failing_check_report():
    """A check report whose layer 'shifted' fails on channel 2 only, with its per-channel figures."""
    import numpy as np

    from bncal.checking import CheckReport, CheckThresholds, LayerCheck, OutputCheck

    layers = [LayerCheck("ok", 3, 400, 0.05, 1.1, 0.25, 0.41, True, channel_mean_shift=np.array([0.01, 0.05, 0.02]),
                         channel_var_ratio=np.array([1.0, 1.1, 0.95])),
              LayerCheck("shifted", 4, 400, 0.6, 1.3, 0.25, 0.41, False,
                         channel_mean_shift=np.array([0.01, 0.02, 0.6, 0.03]),
                         channel_var_ratio=np.array([1.0, 1.3, 0.9, 1.05]))]
    return CheckReport.from_checks(layers, [OutputCheck("y", 1.0, 0.1, 1.0, True)], [], CheckThresholds(), 2, 64)


_NOTEBOOK = r"""
import sys, pickle
import matplotlib
matplotlib.use("svg")  # the user's backend: anything but Agg
import matplotlib.pyplot as plt
from bncal import plot

report = pickle.loads(bytes.fromhex(sys.argv[1]))
rc = dict(matplotlib.rcParams)
mine, ax = plt.subplots()
ax.plot([0, 1, 2], [2, 1, 3], label="mine")
figures = [plot.plot_check(report), report.plot(kind="channels"), plot.plot_check(report, "layers.png")]
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert plt.get_fignums() == [mine.number] and plt.gcf() is mine and plt.gca() is ax  # bncal's figures are not pyplot's
assert dict(matplotlib.rcParams) == rc
assert [l.get_label() for l in ax.get_lines()] == ["mine"]
later, later_ax = plt.subplots()  # the user's next plot works as before
later_ax.plot([1, 2], [3, 4])
later.savefig("later.svg")
assert plt.get_fignums() == [mine.number, later.number]
# Drawing into the user's own axes returns the user's figure.
grid, (top, bottom) = plt.subplots(2, 1)
assert report.plot(axes=(top, bottom)) is grid and top.collections and grid._suptitle is None
print("intact", [type(f).__name__ for f in figures])
"""


def test_plots_leave_the_users_matplotlib_state_intact(tmp_path):
    """Notebook-style: a user's figure and backend survive bncal.plot; bncal returns Figures of its own."""
    import pickle
    import subprocess
    import sys

    from tests_support import ROOT

    report = _failing_check_report()
    result = subprocess.run([sys.executable, "-c", _NOTEBOOK, pickle.dumps(report).hex()], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "intact ['Figure', 'Figure', 'Figure']"
    assert (tmp_path / "later.svg").stat().st_size > 0 and (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_channel_plot_shows_each_channel_of_the_failing_layers():
    import numpy as np

    report = _failing_check_report()
    fig = report.plot(kind="channels", model="net.onnx")
    shift_ax, ratio_ax = fig.axes[:2]
    shift, ratio = shift_ax.images[0].get_array(), ratio_ax.images[0].get_array()
    assert shift.shape == ratio.shape == (1, 4)  # only the failing layer, one column per channel
    np.testing.assert_allclose(shift[0], [0.01, 0.02, 0.6, 0.03])
    np.testing.assert_allclose(ratio[0], [1.0, 1.3, 0.9, 1.05])
    assert [t.get_text() for t in shift_ax.get_yticklabels()] == ["shifted"]
    assert "per-channel statistics of 1 failing layer" in fig._suptitle.get_text()
    both = report.plot(kind="channels", layers=["ok", "shifted"])
    padded = both.axes[0].images[0].get_array()
    assert padded.shape == (2, 4) and padded.mask[0].tolist() == [False, False, False, True]  # 3 channels, 1 blank
    with pytest.raises(BncalError, match="no layer nope in the report; its layers: ok, shifted"):
        report.plot(kind="channels", layers=["nope"])


def test_recalibration_channels_match_the_statistics_they_come_from():
    """The per-channel figures behind the max: |new - old| / sqrt(new var + eps) and (old + eps) / (new + eps)."""
    import numpy as np
    import torch

    import bncal

    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(64, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 1.0, -3.0])
    layer = bncal.recalibrate(bn, [x.float()]).layers[0]
    mean, var = x.mean(0).numpy(), x.var(0, unbiased=False).numpy()
    np.testing.assert_allclose(layer.channel_mean_shift, np.abs(mean) / np.sqrt(var + bn.eps), rtol=1e-5)
    np.testing.assert_allclose(layer.channel_var_ratio, (1 + bn.eps) / (var + bn.eps), rtol=1e-5)
    assert layer.mean_shift == pytest.approx(layer.channel_mean_shift.max())


def test_fold_export_plot_draws_each_outputs_error_against_its_tolerance(tmp_path):
    import onnx

    from bncal.folding.export import fold_export_onnx
    from models import zoo

    stale = zoo.Path(zoo.__file__).resolve().parent / "mnist_cnn_stale.onnx"
    _, report = fold_export_onnx(onnx.load(str(stale)), input_shapes=[(4, 1, 28, 28)], allow=["BN001"])
    fig = report.plot(model="mnist_cnn_stale.onnx")
    [ax] = fig.axes
    [tolerance] = [line for line in ax.get_lines() if line.get_label().startswith("tolerance")]
    assert list(tolerance.get_ydata()) == [1e-4, 1e-4]  # the default scale tolerance, in units of the scale
    o = report.comparison.outputs[0]
    [points] = [c for c in ax.collections if c.get_label() == "fold: median, p99, max"]
    ys = sorted(y for _, y in points.get_offsets())
    assert ys[-1] == pytest.approx(o.max_abs_error / o.scale) == pytest.approx(o.required_scale_tol)
    assert "fold-export: PASSED" in fig._suptitle.get_text()
    out, png = tmp_path / "f.onnx", tmp_path / "f.png"
    result = CliRunner().invoke(main, ["fold-export", str(stale), "--input-shape", "4,1,28,28", "-o", str(out),
                                       "--allow", "BN001", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.exists()
