"""Throughput of ONNX BatchNorm recalibration (train mode) against plain onnxruntime inference.

Exports a ResNet-style CNN (``models/zoo.py:resnet_small``, 20 BatchNorms) to ONNX with its
BatchNorms kept (TorchScript exporter, ``training=TrainingMode.PRESERVE``; the default eval
export folds Conv+BN), then times, over the same batches, in interleaved repetitions:

- ``inference``: one pass of a plain inference session (:func:`bncal.onnx.runtime.ort_session` at
  level ``all``, the level of recalibration's own sessions and onnxruntime's default; created
  beforehand, so its runs are warm);
- ``recalibrate``: ``recalibrate_onnx(model, batches, mode="train")`` end to end (graph
  derivation, session creation, one pass, writing the statistics), in the form the CPU gets;
- ``recalibrate (previous)`` with ``--compare-with GIT_REF``: the same call of bncal as
  committed at that ref (imported side by side as ``bncal_previous``);
- one warm pass of each derived graph's session alone, to show where the time goes: the train
  graph in both forms (``batchnorm``: training-mode BatchNormalization; ``arithmetic``:
  ReduceMean/Sub/ReduceSumSquare and an inference BatchNormalization, what GPU providers get),
  at level ``all`` and ``basic``, and the eval-mode statistics graph in both forms;
- two normalisation floors: the model with every BN normalising with per-channel values fed
  as graph inputs, so that no statistics are computed at all, as an inference
  BatchNormalization (``BN kernel``) or as ``Mul`` + ``Add`` (elementwise ops onnxruntime runs
  on all its threads). Values that are not constant keep onnxruntime from folding the BN into
  its Conv and from keeping its NCHWc (blocked) layout around it, as in every train graph:
  no statistics form that normalises with the batch's own statistics runs faster than these;
- the train graph (``batchnorm`` form) at 1 intra-op thread with 2 batches in flight (two
  ``session.run`` calls at once), a scheduling option rather than a form.

Prints, per row, the median wall time over the repeats with its range, the fastest repeat
over inference's fastest (the least disturbed runs on a shared machine), and the median
process CPU time, each divided by the inference pass's. ``--threads`` sets onnxruntime's
intra-op threads of the inference session and the per-graph sessions (default:
onnxruntime's, what recalibration's own sessions use, which take no thread count; ``--threads
1`` compares work at equal resources, and is steadier on a loaded machine).
Why no faster exact CPU form was found (onnxruntime 1.32; the figures are this benchmark's):

No faster exact form was found for onnxruntime's CPU provider (1.32). Its NCHWc transformer
(``onnxruntime/core/optimizer/nchwc_transformer.cc``) keeps the blocked layout only through
Conv and BatchNormalization with constant parameters, pools, Relu/Sigmoid/Tanh, and
Add/Sum/Mul/Concat whose inputs are all blocked and of one shape; a normalisation with
per-channel values computed in the graph therefore runs in NCHW, between a reorder out of
and one back into the blocked layout, with the Add+Relu it would fuse left apart. That
alone, with no statistics computed (this benchmark's ``normalisation floor`` rows), cost 1.06-1.13x inference at 1 intra-op thread and
1.17-1.28x at 2 on its ResNet-style net, the ``"batchnorm"`` form 1.18-1.21x and 1.25-1.41x.
Statistics cheaper than the op's two single-threaded passes are not exact: float32
``ReduceSumSquare`` over 131,072 values per channel was 2.6e-5 off (relative), per-sample
``GlobalAveragePool`` sums 2.5e-6 sd, and ``E[x^2] - E[x]^2`` cancels. Writing onnxruntime's
private ``com.microsoft.nchwc`` ops into the graph (each BN as the depthwise NCHWc Conv the
transformer makes of it, fed weights computed from moments taken by its NCHWc
GlobalAveragePool, float64 across samples) keeps the layout and agreed with the op to 6e-7
there, but took 1.17x and 1.29x where the ``"batchnorm"`` form took 1.19x and 1.29x: no
gain worth ops internal to onnxruntime and specific to the CPU's block size (and those
per-sample sums are the imprecise ones above at large spatial sizes).

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
from concurrent.futures import ThreadPoolExecutor
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


def normalisation_floor(model, kind: str):
    """``model`` with every BN normalising with per-channel values fed as graph inputs
    (defaults: the model's own), so no statistics are computed: ``kind`` ``"bn"`` keeps the
    inference BatchNormalization reading them, ``"muladd"`` replaces it by ``Mul(X, a) + c``."""
    import onnx
    from onnx import helper, numpy_helper

    from bncal.onnx.graphs import find_batchnorms

    floor = onnx.ModelProto()
    floor.CopyFrom(model)
    graph = floor.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def fed(value, name):
        graph.initializer.append(numpy_helper.from_array(value, name))
        graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape)))
        return name

    replaced = {}
    for info in (info for info in find_batchnorms(model) if info.handled):
        node = graph.node[info.node_index]
        if kind == "bn":
            node.input[3] = fed(values[info.mean_initializer], f"floor.{info.name}.mean")
            node.input[4] = fed(values[info.var_initializer], f"floor.{info.name}.var")
            continue
        a = fed(np.ones((info.channels, 1, 1), np.float32), f"floor.{info.name}.a")
        c = fed(np.zeros((info.channels, 1, 1), np.float32), f"floor.{info.name}.c")
        replaced[info.node_index] = [helper.make_node("Mul", [info.input, a], [f"floor.{info.name}.ax"]),
                                     helper.make_node("Add", [f"floor.{info.name}.ax", c], [info.output])]
    nodes = [n for i, node in enumerate(graph.node) for n in replaced.get(i, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    return floor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (x1, x2, x4, x8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare-with", metavar="GIT_REF", help="also time bncal as committed at this git ref")
    parser.add_argument("--no-graphs", action="store_true", help="skip the per-graph passes")
    parser.add_argument("--threads", type=int, help="intra-op threads of the inference and per-graph sessions "
                        "(default: onnxruntime's, as recalibration's own sessions)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bncal.onnx.recalibration import recalibrate_onnx
    from bncal.onnx.runtime import ort_session, statistics_form

    model = export_resnet(args.size, args.width)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((args.batch_size, 3, args.size, args.size)).astype(np.float32)
               for _ in range(args.batches)]
    inference = ort_session(model, optimization_level="all", threads=args.threads)  # recalibration's level
    output_names = [o.name for o in inference.get_outputs()]

    def infer():
        for x in batches:
            inference.run(output_names, {"x": x})

    default_threads = "" if args.threads is None else ", default threads"  # its sessions take no thread count
    runs = {"inference": infer, f"recalibrate ({statistics_form(None)} form on CPU{default_threads})":
            lambda: recalibrate_onnx(model, batches, mode="train")}
    if args.compare_with:
        previous = previous_module(args.compare_with, "onnx_recalibrate")
        runs[f"recalibrate (previous, {args.compare_with}{default_threads})"] = (
            lambda: previous.recalibrate_onnx(model, batches, mode="train"))
    if not args.no_graphs:
        from bncal.onnx.graphs import make_stats_graph, make_train_graph

        def graph_pass(session):
            names = [o.name for o in session.get_outputs()]
            return lambda: [session.run(names, {"x": x}) for x in batches]

        def in_flight(session, count=2):
            names, pool = [o.name for o in session.get_outputs()], ThreadPoolExecutor(count)
            return lambda: list(pool.map(lambda x: session.run(names, {"x": x}), batches))

        for form in ("batchnorm", "arithmetic"):
            graph, _ = make_train_graph(model, expose_stats=True, keep_model_outputs=False, form=form)
            for level in ("all", "basic"):
                runs[f"train graph pass, {form}, level {level}"] = graph_pass(
                    ort_session(graph, optimization_level=level, threads=args.threads))
        for form in ("batchnorm", "arithmetic"):
            graph, _ = make_stats_graph(model, keep_model_outputs=False, form=form)
            runs[f"eval stats graph pass, {form}"] = graph_pass(ort_session(graph, optimization_level="all",
                                                                            threads=args.threads))
        for kind, label in (("bn", "BN kernel"), ("muladd", "Mul+Add")):
            runs[f"normalisation floor, {label}"] = graph_pass(
                ort_session(normalisation_floor(model, kind), optimization_level="all", threads=args.threads))
        graph, _ = make_train_graph(model, expose_stats=True, keep_model_outputs=False, form="batchnorm")
        runs["train graph, batchnorm, 1 thread x 2 in flight"] = in_flight(
            ort_session(graph, optimization_level="all", threads=1))

    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for name, fn in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    samples = args.batches * args.batch_size
    threads = "onnxruntime's default" if args.threads is None else args.threads
    print(f"resnet_small(width={args.width}), {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
          f"onnxruntime {ort.__version__}, intra-op threads {threads}, {args.repeats} interleaved repeats; "
          "ratios to the inference pass's median (process CPU time counts onnxruntime's spinning threads)")
    base, cpu_base = statistics.median(times["inference"]), statistics.median(cpu_times["inference"])
    for name, values in times.items():
        median, cpu = statistics.median(values), statistics.median(cpu_times[name])
        ratios = sorted(v / base for v in values)
        best = min(values) / min(times["inference"])  # the least disturbed runs of a shared machine
        print(f"  {name:56s} wall {median * 1e3:7.1f} ms {samples / median:6.0f} samples/s {median / base:.3f}x "
              f"(range {ratios[0]:.3f} to {ratios[-1]:.3f}, best/best {best:.3f}x)  cpu {cpu / cpu_base:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
