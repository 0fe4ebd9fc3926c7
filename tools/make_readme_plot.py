"""Write the README's figures into tools/readme/, from the shipped stale ONNX model and its recalibration.

- ``check-plot.png``: `bncal check --plot` stale vs recalibrated, each checked on the held-out digits
  (:func:`bncal.plot.plot_check`);
- ``channels-plot.png``: the stale model's failing layers per channel (``report.plot(kind="channels")``,
  :func:`bncal.plot.plot_channels`);
- ``fold-export-plot.png``: `bncal fold-export --plot` of the recalibrated model, each output's error
  against its tolerance (:func:`bncal.plot.plot_fold_export`).

onnxruntime only (the calibration and held-out digits of ``models/mnist5k.npz``)::

    python tools/make_readme_plot.py
"""

import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bncal import check_onnx, recalibrate_onnx  # noqa: E402
from bncal.folding.export import fold_export_onnx  # noqa: E402
from bncal.plot import plot_check  # noqa: E402


def _digits(name: str) -> list[np.ndarray]:
    """The .npz digits as the model takes them (``--normalize --preset mnist``), in shuffled batches of 128."""
    pixels = np.load(ROOT / "models" / name)["input"].astype(np.float32) / 255
    x = (pixels - 0.1307) / 0.3081
    x = x[np.random.default_rng(0).permutation(len(x))]
    return [x[i:i + 128] for i in range(0, len(x), 128)]


if __name__ == "__main__":
    out = ROOT / "tools" / "readme"
    name = "mnist_cnn_stale.onnx"
    stale = onnx.load(str(ROOT / "models" / name))
    heldout = _digits("mnist_heldout.npz")
    fixed, _ = recalibrate_onnx(stale, _digits("mnist_calib.npz"))
    before, after = check_onnx(stale, heldout), check_onnx(fixed, heldout)
    plot_check({"stale statistics": before, "recalibrated": after}, out / "check-plot.png", model=name)
    before.plot(out / "channels-plot.png", kind="channels", model=name)
    _, folded = fold_export_onnx(fixed, verify_feeds=[{"input": batch} for batch in heldout[:3]])
    folded.plot(out / "fold-export-plot.png", model="mnist_cnn_fixed.onnx")
    for path in sorted(out.glob("*.png")):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
