"""Write tools/readme/check-plot.png: the README's figure of `bncal check --plot`, stale vs recalibrated.

The shipped stale ONNX model and its recalibration (onnxruntime only, on the calibration digits),
each checked on the held-out digits and drawn in one figure by :func:`bncal.plot.plot_check`:

    python tools/make_readme_plot.py
"""

import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bncal import check_onnx, recalibrate_onnx  # noqa: E402
from bncal.plot import plot_check  # noqa: E402
from models import zoo  # noqa: E402

if __name__ == "__main__":
    out = ROOT / "tools" / "readme" / "check-plot.png"
    stale = onnx.load(str(ROOT / "models" / "mnist_cnn_stale.onnx"))
    heldout = [x.numpy() for x in zoo.heldout_batches()]
    fixed, _ = recalibrate_onnx(stale, [x.numpy() for x in zoo.calibration_batches()])
    plot_check({"stale statistics": check_onnx(stale, heldout), "recalibrated": check_onnx(fixed, heldout)}, out,
               model="mnist_cnn_stale.onnx")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
