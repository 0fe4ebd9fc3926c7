"""Throughput of ONNX BatchNorm recalibration (train mode) against plain onnxruntime inference.

Exports a ResNet-style CNN (``models/zoo.py:resnet_small``, 20 BatchNorms) to ONNX with its
BatchNorms kept (TorchScript exporter, ``training=TrainingMode.PRESERVE``; the default eval
export folds Conv+BN), then times, over the same batches and interleaved repetitions:

- ``recalibrate_onnx(model, batches, mode="train")`` end to end (graph derivation, session
  creation, one pass, writing the statistics);
- one pass of a plain inference session (:func:`bncal.runtime.ort_session` at level ``all``,
  the level of recalibration's own sessions and onnxruntime's default; created beforehand).

Prints the medians and their ratio. The ratio grows as convolutions get cheaper relative to
the elementwise work a train-mode BN adds (its own pass, plus the Add/Relu and NCHWc layout
reorders that onnxruntime can no longer fuse around it). Measured with onnxruntime 1.32 on 2
shared CPU cores: 1.1-1.35x at width 32, 1.3-2.4x at width 16 (in onnxruntime's profiler,
kernel time only, 1.17x and 1.35x). Run from the repository root::

    .venv/bin/python tools/bench_onnx_recalibrate.py [--batches 32] [--batch-size 32] [--size 32] [--width 32]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_resnet(size: int, width: int = 32):
    import onnx
    import torch

    from models.zoo import resnet_small

    torch.manual_seed(0)
    net = resnet_small(num_classes=10, width=width)
    with torch.no_grad():  # stats away from the data's, so the recalibration has work to do
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(2, 3, size, size),), buffer, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    model = onnx.load_from_string(buffer.getvalue())
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 20, "BatchNorms were folded"
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (x1, x2, x4, x8)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bncal.onnx_recalibrate import recalibrate_onnx
    from bncal.runtime import ort_session

    model = export_resnet(args.size, args.width)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((args.batch_size, 3, args.size, args.size)).astype(np.float32)
               for _ in range(args.batches)]
    inference = ort_session(model, optimization_level="all")  # the level recalibration's sessions use
    output_names = [o.name for o in inference.get_outputs()]

    def infer():
        for x in batches:
            inference.run(output_names, {"x": x})

    def recalibrate():
        recalibrate_onnx(model, batches, mode="train")

    infer(), recalibrate()  # warm-up
    times = {"inference": [], "recalibrate": []}
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, fn in (("inference", infer), ("recalibrate", recalibrate)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    samples = args.batches * args.batch_size
    print(f"resnet_small(width={args.width}), {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
          f"onnxruntime {ort.__version__}, {args.repeats} interleaved repeats")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:12s} median {median * 1e3:8.1f} ms  min {min(values) * 1e3:8.1f} ms  "
              f"{samples / median:8.0f} samples/s")
    ratio = statistics.median(times["recalibrate"]) / statistics.median(times["inference"])
    print(f"ratio recalibrate / inference (medians): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
