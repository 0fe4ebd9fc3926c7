"""Throughput of ONNX BatchNorm recalibration (train mode) against plain onnxruntime inference.

Exports a ResNet-style CNN (``models/zoo.py:resnet_small``, 20 BatchNorms) to ONNX with its
BatchNorms kept (TorchScript exporter, ``training=TrainingMode.PRESERVE``; the default eval
export folds Conv+BN), then times, over the same batches, in interleaved repetitions:

- ``inference``: one pass of a plain inference session (:func:`bncal.runtime.ort_session` at
  level ``all``, the level of recalibration's own sessions and onnxruntime's default; created
  beforehand, so its runs are warm);
- ``recalibrate``: ``recalibrate_onnx(model, batches, mode="train")`` end to end (graph
  derivation, session creation, one pass, writing the statistics), in the form the CPU gets;
- ``recalibrate (previous)`` with ``--compare-with GIT_REF``: the same call of bncal as
  committed at that ref (imported side by side as ``bncal_previous``);
- one warm pass of each derived graph's session alone, to show where the time goes: the train
  graph in both forms (``batchnorm``: training-mode BatchNormalization; ``arithmetic``:
  ReduceMean/Sub/ReduceSumSquare and an inference BatchNormalization, what GPU providers get),
  at level ``all`` and ``basic``, and the eval-mode statistics graph in both forms.

Prints each median over the repeats with its range, divided by the inference pass's median.
Run from the repository root::

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

from _previous import previous_module  # noqa: E402  (tools/ is this script's folder)


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
    parser.add_argument("--compare-with", metavar="GIT_REF", help="also time bncal as committed at this git ref")
    parser.add_argument("--no-graphs", action="store_true", help="skip the per-graph passes")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bncal.onnx_recalibrate import recalibrate_onnx
    from bncal.runtime import StatisticsSession, ort_session, statistics_form

    model = export_resnet(args.size, args.width)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((args.batch_size, 3, args.size, args.size)).astype(np.float32)
               for _ in range(args.batches)]
    inference = ort_session(model, optimization_level="all")  # the level recalibration's sessions use
    output_names = [o.name for o in inference.get_outputs()]

    def infer():
        for x in batches:
            inference.run(output_names, {"x": x})

    runs = {"inference": infer, f"recalibrate ({statistics_form(None)} form on CPU)":
            lambda: recalibrate_onnx(model, batches, mode="train")}
    if args.compare_with:
        previous = previous_module(args.compare_with, "onnx_recalibrate")
        runs[f"recalibrate (previous, {args.compare_with})"] = lambda: previous.recalibrate_onnx(model, batches,
                                                                                                 mode="train")
    if not args.no_graphs:
        from bncal.onnx_graphs import make_train_graph

        def graph_pass(session):
            names = [o.name for o in session.get_outputs()]
            return lambda: [session.run(names, {"x": x}) for x in batches]

        for form in ("batchnorm", "arithmetic"):
            train = StatisticsSession.train_graph(model, form=form).session
            runs[f"train graph pass, {form}, level all"] = graph_pass(train)
            graph, _ = make_train_graph(model, expose_stats=True, keep_model_outputs=False, form=form)
            runs[f"train graph pass, {form}, level basic"] = graph_pass(ort_session(graph, optimization_level="basic"))
        for form in ("batchnorm", "arithmetic"):
            runs[f"eval stats graph pass, {form}"] = graph_pass(StatisticsSession.stats_graph(model, form=form).session)

    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    samples = args.batches * args.batch_size
    print(f"resnet_small(width={args.width}), {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
          f"onnxruntime {ort.__version__}, {args.repeats} interleaved repeats; ratios to the inference pass's median")
    base = statistics.median(times["inference"])
    for name, values in times.items():
        median = statistics.median(values)
        ratios = sorted(v / base for v in values)
        print(f"  {name:44s} median {median * 1e3:8.1f} ms  {samples / median:7.0f} samples/s  "
              f"{median / base:.3f}x (range {ratios[0]:.3f} to {ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
