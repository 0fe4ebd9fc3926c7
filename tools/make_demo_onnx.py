"""Write models/mnist_cnn_stale.onnx: the stale demo CNN exported with its BatchNorms kept.

The ONNX twin of models/mnist_cnn_stale.safetensors, for the ONNX examples (recalibrating an
ONNX model without its source, checking it in onnxruntime):

    python tools/make_demo_onnx.py
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bncal.torch.export import export_onnx  # noqa: E402
from models import zoo  # noqa: E402

if __name__ == "__main__":
    out = ROOT / "models" / "mnist_cnn_stale.onnx"
    export_onnx(zoo.mnist_cnn_stale(), (torch.zeros(2, 1, 28, 28),), out, keep_batchnorm=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
