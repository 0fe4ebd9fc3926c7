"""Benchmark bncal on the architectures people deploy: torchvision families and ONNX files from other tools.

For each torchvision family (``weights=None``, eval mode, BatchNorm weight/bias randomised with a
fixed seed so that folding is not trivial, then moving statistics recalibrated on random inputs):

- **recalibration**: ``bncal.recalibrate`` (train mode, exact) over 4 random batches against a
  plain ``torch.no_grad()`` eval forward over the same batches (rounds interleaved, median ratio);
- **fold-export**: ``bncal.fold_export_torch`` (module fold, export of the folded model with a
  dynamic batch axis, graph fold of what is left, verification: two figures, no latency) against ``torch.onnx.export(model, x, path)``
  with its defaults alone (``dynamo=True, optimize=True``, a static batch), and against the same
  export with a dynamic batch axis (``dynamic_shapes``); ``fold_export_torch(dynamic_batch=False)``
  (the CLI's ``--static-batch``) against the default too; all writing a file, interleaved over
  ``--rounds`` after one warm-up each; process CPU time (single-threaded by default, so other
  processes on a shared machine disturb it little) and wall-clock time, the median ratio of each;
- BatchNormalization nodes before / after / the floor, and left by the default export
  (onnxscript's rules). The **floor** is counted on the unfolded graph (an export with every BN
  kept, made for this count and not timed), independently of bncal's
  rules: a BN whose input comes from a Conv/ConvTranspose/Gemm/MatMul that feeds nothing else, or
  whose output feeds only an unpadded Conv or a Gemm (directly or through Flatten/Reshape), can
  be folded exactly; the others cannot (e.g. DenseNet's BN after a Concat, before a ReLU);
- the largest error relative to the output's scale (max |reference|), of the fold (folded vs
  unfolded model in PyTorch) and of the export (exported graph in onnxruntime vs PyTorch).

ONNX files exported by other tools stand in for the ONNX model zoo (not downloadable here): the
TorchScript exporter with a fixed batch of 1 and BatchNorms kept (``training=PRESERVE``), and an
IR 3 version of it (opset 9, every initializer also listed as a graph input, folded with
``treat_initializer_inputs_as_constant``), each through ``bncal.fold_export_onnx`` with the
defaults.

torchvision is a benchmark-only dependency: run it from a separate environment that has it, with
bncal on the path (about 2 to 5 minutes per family on 2 shared CPU cores)::

    PYTHONPATH=. /work/tvenv/bin/python tools/bench_zoo.py [--families resnet18,resnet50] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
            "densenet121", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "inception_v3", "convnext_tiny",
            "mnasnet1_0", "vgg11_bn", "resnext50_32x4d", "wide_resnet50_2")
INPUT_SIZE = {"inception_v3": 299}
FACTORY_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                  "inception_v3": {"aux_logits": False, "init_weights": True}}
CALIBRATION_BATCHES, CALIBRATION_BATCH = 4, 2
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --------------------------------------------------------------------------------------------
# models and data


def build(family: str, seed: int = 0):
    import torch
    import torchvision

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(torchvision.models, family)(weights=None, **FACTORY_KWARGS.get(family, {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def batches(family: str, count: int, size: int, seed: int):
    import torch

    side = INPUT_SIZE.get(family, 224)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, side, side, generator=g) for _ in range(count)]


def has_batchnorm(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------------------------
# timing


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def timed(call):
    """``(result, wall seconds, process CPU seconds)`` of ``call()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    with quiet():
        result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def keep_failed_report(call):
    """``call()``, or the report of the VerificationError it raised, as ``(None, report)``."""
    from bncal.errors import VerificationError

    try:
        return call()
    except VerificationError as exc:
        return None, exc.report


def interleaved(calls: dict, rounds: int, warmup: bool = True) -> dict:
    """``{label: {"wall": [...], "cpu": [...], "last": result}}``, the calls alternating per round."""
    if warmup:
        for call in calls.values():
            timed(call)
    out = {k: {"wall": [], "cpu": [], "last": None} for k in calls}
    labels = list(calls)
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            result, wall, cpu = timed(calls[label])
            out[label]["wall"].append(wall)
            out[label]["cpu"].append(cpu)
            out[label]["last"] = result
    return out


def ratio(times: dict, a: str, b: str, kind: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a][kind], times[b][kind]))


# --------------------------------------------------------------------------------------------
# ONNX graph facts, counted independently of bncal's fold rules


def op_count(proto, op: str = "BatchNormalization") -> int:
    return sum(n.op_type == op for n in proto.graph.node)


def structural_floor(proto) -> int:
    """BatchNormalization nodes that no exact fold can remove (see the module docstring)."""
    from onnx import helper

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}

    def sole_consumer(name):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    def unpadded_conv(node) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return node.op_type == "Conv" and not any(attrs.get("pads", [])) and attrs.get("auto_pad", b"NOTSET") in (
            b"NOTSET", b"VALID")

    floor = 0
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        before = producer.get(node.input[0])
        foldable = before is not None and before.op_type in LINEAR and sole_consumer(node.input[0]) is node
        after = sole_consumer(node.output[0])
        while after is not None and after.op_type in ("Flatten", "Reshape"):
            after = sole_consumer(after.output[0])
        foldable = foldable or (after is not None and (after.op_type == "Gemm" or unpadded_conv(after)))
        floor += not foldable
    return floor


def worst_scale_error(comparison) -> float | None:
    if comparison is None or not comparison.outputs:
        return None
    return max(o.required_scale_tol for o in comparison.outputs)


# --------------------------------------------------------------------------------------------
# ONNX files from another exporter


def onnx_file_rows(family: str, model, x) -> list[dict]:
    from bncal.folding.export import fold_export_onnx
    from models.other_exporters import as_ir3, torchscript_file

    rows = []
    try:
        with quiet():
            fixed = torchscript_file(model, x[:1], opset=13)
            ir3 = as_ir3(torchscript_file(model, x[:1], opset=9))
    except Exception as exc:  # noqa: BLE001 - an exporter failure is a row, not a crash
        return [{"family": family, "file": "TorchScript batch 1", "note": f"export failed: {str(exc).splitlines()[0][:100]}"}]
    for label, proto, constant in (("TorchScript batch 1, opset 13", fixed, False),
                                   ("IR 3, opset 9, initializers as inputs", ir3, True)):
        row = {"family": family, "file": label, "bn_before": op_count(proto), "floor": structural_floor(proto)}
        try:
            (_, report), wall, cpu = timed(lambda: keep_failed_report(lambda: fold_export_onnx(
                proto, treat_initializer_inputs_as_constant=constant)))
            row.update(passed=report.passed, bn_after=report.bn_left, fold_err=worst_scale_error(report.comparison), wall=wall, cpu=cpu,
                       scale=max(o.scale for o in report.comparison.outputs))
        except Exception as exc:  # noqa: BLE001
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# one family


def family_row(family: str, rounds: int, folder: Path) -> tuple[dict, list[dict]]:
    import onnx
    import torch

    import bncal
    from bncal.errors import BncalError
    from bncal.torch.export import traced_batch
    from bncal.folding.export import fold_export_torch

    model = build(family)
    data = batches(family, CALIBRATION_BATCHES, CALIBRATION_BATCH, seed=1)
    row = {"family": family, "input": tuple(data[0].shape[1:])}

    def forward():
        with torch.no_grad():
            for b in data:
                model(b)

    if has_batchnorm(model):
        # One recalibration first, so the exported statistics are the data's (and nontrivial).
        times = interleaved({"recalibrate": lambda: bncal.recalibrate(model, data), "forward": forward}, rounds)
        row["recal_ratio_wall"] = ratio(times, "recalibrate", "forward", "wall")
        row["recal_ratio_cpu"] = ratio(times, "recalibrate", "forward", "cpu")
    x = data[0][:1]
    default_path, bncal_path = folder / f"{family}.default.onnx", folder / f"{family}.bncal.onnx"
    times = interleaved({
        "default": lambda: torch.onnx.export(model, (x,), str(default_path)),
        # Traced at batch 2, as bncal traces a dynamic axis (ConvNeXt fails to export at batch 1).
        "dynamic": lambda: torch.onnx.export(model, traced_batch((x,)), str(folder / "dynamic.onnx"),
                                             input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},)),
        "bncal": lambda: keep_failed_report(lambda: fold_export_torch(model, (x,), bncal_path)),
        "bncal_static": lambda: keep_failed_report(lambda: fold_export_torch(model, (x,), folder / "static.onnx",
                                                                             dynamic_batch=False)),
    }, rounds)
    _, report = times["bncal"]["last"]
    row.update(
        passed=report.passed, bn_before=report.ops_before.get("BatchNormalization", 0), bn_after=report.bn_left,
        floor=structural_floor(bncal.export_onnx(model, (x,), keep_batchnorm=True)),
        default_bn=op_count(onnx.load(str(default_path), load_external_data=False)),
        fold_err=worst_scale_error(report.comparison), export_err=worst_scale_error(report.export_comparison),
        scale=max(o.scale for o in report.export_comparison.outputs),
        export_ratio_wall=ratio(times, "bncal", "default", "wall"),
        export_ratio_cpu=ratio(times, "bncal", "default", "cpu"),
        dynamic_ratio_cpu=ratio(times, "bncal", "dynamic", "cpu"),
        static_ratio_cpu=ratio(times, "bncal_static", "default", "cpu"),
        static_ratio_wall=ratio(times, "bncal_static", "default", "wall"),
        default_cpu=statistics.median(times["default"]["cpu"]), bncal_cpu=statistics.median(times["bncal"]["cpu"]),
        default_wall=statistics.median(times["default"]["wall"]), bncal_wall=statistics.median(times["bncal"]["wall"]),
        steps=report.step_seconds,
    )
    try:
        onnx_rows = onnx_file_rows(family, model, x)
    except BncalError as exc:
        onnx_rows = [{"family": family, "file": "-", "note": str(exc)[:160]}]
    return row, onnx_rows


# --------------------------------------------------------------------------------------------
# output


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def markdown(rows: list[dict], onnx_rows: list[dict]) -> str:
    lines = ["| family | BN before / after / floor (default export) | max err / scale: fold, export | "
             "fold-export / torch.onnx.export: CPU (wall) | the same, export with a dynamic batch: CPU | "
             "fold-export with a static batch / torch.onnx.export: CPU (wall) | recalibration / forward: CPU (wall) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['family']} | {r['note']} | | | | | |")
            continue
        recal = (f"{_fmt(r.get('recal_ratio_cpu'), '.2f')}x ({_fmt(r.get('recal_ratio_wall'), '.2f')}x)"
                 if "recal_ratio_wall" in r else "no BN")
        lines.append(
            f"| {r['family']} | {r['bn_before']} / {r['bn_after']} / {r['floor']} ({r['default_bn']}) | "
            f"{_fmt(r['fold_err'], '.1e')}, {_fmt(r['export_err'], '.1e')}{'' if r['passed'] else ' FAILED'} | "
            f"{r['export_ratio_cpu']:.2f}x ({r['export_ratio_wall']:.2f}x; {r['bncal_cpu']:.1f} s vs "
            f"{r['default_cpu']:.1f} s) | {r['dynamic_ratio_cpu']:.2f}x | "
            f"{r['static_ratio_cpu']:.2f}x ({r['static_ratio_wall']:.2f}x) | {recal} |")
    lines += ["", "| family | ONNX file | BN before / after / floor | max err / scale | fold-export s: CPU (wall) |",
              "|---|---|---|---|---|"]
    for r in onnx_rows:
        if "note" in r:
            lines.append(f"| {r['family']} | {r['file']} | {r['note']} | | |")
            continue
        lines.append(f"| {r['family']} | {r['file']} | {r['bn_before']} / {r['bn_after']} / {r['floor']} | "
                     f"{_fmt(r['fold_err'], '.1e')}{'' if r['passed'] else ' FAILED'} | {r['cpu']:.2f} ({r['wall']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="Comma-separated torchvision model names.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved timing rounds per family (after a warm-up).")
    parser.add_argument("--json", type=Path, help="Also write every figure as JSON here.")
    parser.add_argument("--threads", type=int, default=1,
                        help="Threads for torch and onnxruntime (default 1: CPU time then measures work, not the "
                             "spin-waiting of thread pools on a shared machine).")
    args = parser.parse_args(argv)
    import functools

    import torch

    import bncal.onnx.runtime

    torch.set_num_threads(args.threads)
    # Every session bncal opens gets the same thread count (bncal looks ort_session up at call time).
    bncal.onnx.runtime.ort_session = functools.partial(bncal.onnx.runtime.ort_session, threads=args.threads)
    rows, onnx_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for family in [f.strip() for f in args.families.split(",") if f.strip()]:
            start = time.perf_counter()
            try:
                row, more = family_row(family, args.rounds, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one family failing is a row
                row, more = {"family": family, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}, []
            rows.append(row)
            onnx_rows += more
            print(f"{family}: {json.dumps(row, default=str)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
            for r in more:
                print(f"    {json.dumps(r, default=str)}", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps({"torchvision": rows, "onnx_files": onnx_rows}, indent=2, default=str))
    print(markdown(rows, onnx_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
