"""Benchmark BatchNorm folding at ONNX export: bncal against what torch and onnxruntime do alone.

For five eval-mode models whose BatchNorms carry seeded, nontrivial statistics (random running
mean/var, weight and bias) -- ``models/zoo.py``'s ``resnet_small`` (3x32x32), ``mobilenet_small``
(3x32x32, depthwise convs), ``mnist_cnn`` (1x28x28, Linear -> Dropout -> BatchNorm1d head), a
small decoder (ConvTranspose2d + BatchNorm2d, one ConvTranspose with groups=4) and an MLP
(Linear + BatchNorm1d) -- it writes one ONNX file per method:

- ``bncal``: ``bncal.folding.export.fold_export_torch`` (one export with every BN kept, graph fold,
  verification in onnxruntime);
- ``torch default``: ``torch.onnx.export(model, x, f, external_data=False)`` with the defaults
  (``dynamo=True, optimize=True``: onnxscript's rewrite rules may fold BN);
- ``torchscript``: ``torch.onnx.export(..., dynamo=False)`` (default constant folding);
- ``ORT fusion``: an unfolded export (``bncal.torch.export.export_onnx(keep_batchnorm=True)``) that
  onnxruntime optimises at ``ORT_ENABLE_BASIC``, saved via ``SessionOptions.optimized_model_filepath``.

Every export has a dynamic batch axis (example batch 2). Per model and method it reports the
BatchNormalization nodes left in the file (for ``ORT fusion``: in ORT's saved optimised graph), the
node count, the max abs error against the PyTorch eval output on a seeded batch of 8 divided by
the output's scale (max |reference|), and the onnxruntime latency at batch 1 and 32. All sessions
use optimisation level "basic" and the same thread count; the methods are measured in turn within
each round (order rotated per round) and the median over rounds is reported.

It also times ``fold_export_torch`` end to end (export, graph fold, verification;
``latency_batches=()``) against the default ``torch.onnx.export`` alone on ``resnet_small``,
interleaved over several rounds after one warm-up each, and reports the median ratio (target <= 1.5x).

Regenerate from the repository root (about 2-3 minutes on 2 shared CPU cores; ``--quick`` for
fewer rounds)::

    python tools/bench_fold.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("bncal", "torch default", "torchscript", "ORT fusion")
EXAMPLE_BATCH = 2
CHECK_BATCH = 8
LATENCY_BATCHES = (1, 32)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

def _decoder():
    from torch import nn

    return nn.Sequential(
        nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 3, 3, padding=1), nn.BatchNorm2d(3),
    )


def _mlp():
    from torch import nn

    return nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def build_models() -> list[tuple[str, object, tuple[int, ...]]]:
    """``(name, eval-mode model, input shape without batch)``, BN statistics randomised with a seed."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from models import zoo

    specs = [
        ("resnet_small", zoo.resnet_small, (3, 32, 32)),
        ("mobilenet_small", zoo.mobilenet_small, (3, 32, 32)),
        ("mnist_cnn", zoo.mnist_cnn, (1, 28, 28)),
        ("decoder (ConvT, g=4)", _decoder, (32, 8, 8)),
        ("mlp (Linear+BN1d)", _mlp, (64,)),
    ]
    out = []
    for i, (name, factory, shape) in enumerate(specs):
        torch.manual_seed(100 + i)
        model = factory()
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    n = m.num_features
                    m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.3 + 1.7 * torch.rand(n, generator=g))
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.3 * torch.randn(n, generator=g))
        out.append((name, model.eval(), shape))
    return out


# --------------------------------------------------------------------------------------------
# exports (each returns an onnx.ModelProto; the file is written under `folder`)
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet():
    """Swallow the exporters' "[torch.onnx] ..." prints, warnings and log lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_bncal(model, x, path):
    from bncal.folding.export import fold_export_torch

    with quiet():
        proto, _report = fold_export_torch(model, (x,), path, latency_batches=())
    return proto


def export_torch_default(model, x, path):
    import onnx
    import torch

    with quiet():
        torch.onnx.export(model, (x,), str(path), external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return onnx.load(str(path))


def export_torchscript(model, x, path):
    import onnx
    import torch

    with quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(str(path))


def export_ort_fusion(model, x, path):
    import onnx
    import onnxruntime as ort

    from bncal.torch.export import export_onnx

    with quiet():
        unfolded = export_onnx(model, (x,), keep_batchnorm=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(unfolded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


EXPORTERS = {"bncal": export_bncal, "torch default": export_torch_default,
             "torchscript": export_torchscript, "ORT fusion": export_ort_fusion}


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------

def session(proto, threads):
    from bncal.onnx.runtime import ort_session

    return ort_session(proto, optimization_level="basic", threads=threads)  # "basic" for all


def bn_count(proto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


def relative_error(sess, reference: np.ndarray, x: np.ndarray) -> float:
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x})[0]
    if got.shape != reference.shape:
        return float("nan")
    return float(np.max(np.abs(got.astype(np.float64) - reference)) / max(np.max(np.abs(reference)), 1e-30))


def latency(sessions: dict, shape, rounds: int, repeat: int) -> dict[str, dict[int, float]]:
    """Median ms per method and batch; methods measured in turn within a round, order rotated."""
    from bncal.onnx.runtime import measure_latency

    rng = np.random.default_rng(0)
    labels = list(sessions)
    out = {label: {} for label in labels}
    for batch in LATENCY_BATCHES:
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        samples = {label: [] for label in labels}
        for r in range(rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                sess = sessions[label]
                feeds = {sess.get_inputs()[0].name: x}
                samples[label].append(measure_latency(sess, feeds, warmup=1, repeat=repeat)["median_ms"])
        for label in labels:
            out[label][batch] = statistics.median(samples[label])
    return out


def bench_model(name, model, shape, folder: Path, args) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(7)
    x_example = torch.randn((EXAMPLE_BATCH, *shape), generator=g)
    x_check = torch.randn((CHECK_BATCH, *shape), generator=g)
    with torch.no_grad():
        reference = model(x_check).double().numpy()
    rows, sessions = {}, {}
    for method, exporter in EXPORTERS.items():
        row = {"model": name, "method": method}
        rows[method] = row
        path = folder / f"{name.split()[0]}.{method.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            proto = exporter(model, x_example, path)
        except Exception as exc:  # report, keep benchmarking the others
            row["note"] = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        row["export_s"] = time.perf_counter() - start
        row["bn"] = bn_count(proto)
        row["nodes"] = len(proto.graph.node)
        try:
            sessions[method] = session(proto, args.threads)
            row["rel_err"] = relative_error(sessions[method], reference, x_check.numpy())
        except Exception as exc:
            row["note"] = f"onnxruntime failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            sessions.pop(method, None)
    for method, by_batch in latency(sessions, shape, args.rounds, args.repeat).items():
        for batch, ms in by_batch.items():
            rows[method][f"ms{batch}"] = ms
    return list(rows.values())


def time_exports(folder: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of fold_export_torch and of the default torch.onnx.export, interleaved per round."""
    import torch

    from models import zoo

    torch.manual_seed(0)
    model = build_models()[0][1]  # resnet_small with its randomised statistics
    x = torch.randn((EXAMPLE_BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    calls = {
        "bncal": lambda: export_bncal(model, x, folder / "timing.bncal.onnx"),
        "default": lambda: export_torch_default(model, x, folder / "timing.default.onnx"),
    }
    for call in calls.values():  # warm-up: the first dynamo export in a process is several x slower
        call()
    times = {k: [] for k in calls}
    for r in range(rounds):
        for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            start = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - start)
    return times["bncal"], times["default"]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def _fmt(value, spec):
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    return format(value, spec)


def print_table(rows: list[dict]) -> None:
    headers = ["model", "method", "BN left", "nodes", "max err/scale", "ms b=1", "ms b=32", "export s"]
    cells = []
    for r in rows:
        cells.append([r["model"], r["method"], _fmt(r.get("bn"), "d"), _fmt(r.get("nodes"), "d"),
                      _fmt(r.get("rel_err"), ".1e"), _fmt(r.get("ms1"), ".3f"), _fmt(r.get("ms32"), ".3f"),
                      _fmt(r.get("export_s"), ".2f")])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda c: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
    print(line(headers))
    print(line(["-" * w for w in widths]))
    previous = None
    for r, c in zip(rows, cells):
        if previous is not None and r["model"] != previous:
            print()
        previous = r["model"]
        print(line(c))
    print("(export s: one call each; the very first export of the process, resnet_small/bncal, includes "
          "the exporter's warm-up)")
    for r in rows:
        if r.get("note"):
            print(f"note: {r['model']} / {r['method']}: {r['note']}")


def print_summary(rows: list[dict], bncal_s, default_s, err_limit: float) -> None:
    print("\nSummary")
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        left = [f"{r['model']} ({r['bn']})" for r in mine if r.get("bn")]
        bad = [f"{r['model']} ({r['rel_err']:.1e})" for r in mine
               if r.get("rel_err") is not None and not r["rel_err"] <= err_limit]
        failed = [r["model"] for r in mine if r.get("note")]
        print(f"  {method:13s}  BN left in: {', '.join(left) or 'none'}; "
              f"error > {err_limit:g} of scale: {', '.join(bad) or 'none'}"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    speedups = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model}
        for batch in LATENCY_BATCHES:
            a, b = by["bncal"].get(f"ms{batch}"), by["ORT fusion"].get(f"ms{batch}")
            if a and b:
                speedups.append(b / a)
    if speedups:
        print(f"  latency, ORT fusion / bncal (all models and batches): median {statistics.median(speedups):.2f}x, "
              f"range {min(speedups):.2f}-{max(speedups):.2f}x (>1: bncal faster)")
    ratios = [b / d for b, d in zip(bncal_s, default_s)]
    ratio = statistics.median(ratios)
    print(f"  export time on resnet_small, {len(ratios)} interleaved rounds after warm-up:")
    print(f"    fold_export_torch (export + graph fold + verification): median {statistics.median(bncal_s):.2f} s "
          f"[{', '.join(f'{t:.2f}' for t in bncal_s)}]")
    print(f"    torch.onnx.export default alone:                                  median {statistics.median(default_s):.2f} s "
          f"[{', '.join(f'{t:.2f}' for t in default_s)}]")
    print(f"    median ratio {ratio:.2f}x (target <= 1.5x): {'MET' if ratio <= 1.5 else 'NOT MET'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency and timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--keep", type=Path, default=None, help="write the ONNX files here instead of a temp dir")
    args = parser.parse_args(argv)
    args.rounds, args.repeat, timing_rounds = (3, 5, 2) if args.quick else (7, 10, 5)
    err_limit = 1e-5

    start = time.perf_counter()
    import onnxruntime
    import torch

    print(f"bench_fold: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{os.cpu_count()} CPUs, ORT level basic, {args.threads} thread(s), latency: median of "
          f"{args.rounds} rounds x {args.repeat} runs; error on a seeded batch of {CHECK_BATCH}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name, model, shape in build_models():
            rows += bench_model(name, model, shape, folder, args)
        bncal_s, default_s = time_exports(folder, timing_rounds)
    print_table(rows)
    print_summary(rows, bncal_s, default_s, err_limit)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
