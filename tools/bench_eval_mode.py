"""Eval-mode recalibration: repeated passes vs the topological sweep (bncal.torch.eval_sweep), side by side.

For each net, with BN statistics reset as if never updated, the same calibration inputs, and
one plain ``torch.no_grad()`` eval forward over them as the time unit (each run sits between two
plain forwards and is divided by their mean; the median over ``--rounds`` is reported):

- passes:   ``bncal.recalibrate(mode="eval")`` through a custom ``forward_fn``, which always takes
            the repeated (anchored) passes;
- sweep:    :func:`bncal.torch.eval_sweep.solve_eval_statistics` alone (forward-equivalents it counts,
            peak frontier cache);
- sweep+1:  ``bncal.recalibrate(mode="eval")`` as it runs by default: the sweep's statistics as
            the start of the fixed-point loop, which then runs one confirming eval pass (it
            iterates on if that pass moved anything by more than ``tol``).

Errors: the largest mean error in units of the sd, and relative variance error, over every BN,
against the one-batch fixed point computed in float64 (every BN in train mode over all inputs
as one batch, every other module in eval mode).

    python tools/bench_eval_mode.py                      # models/zoo.py nets
    PYTHONPATH=. /work/tvenv/bin/python tools/bench_eval_mode.py --torchvision [--size 128]

torchvision is only imported with ``--torchvision`` (never a dependency of bncal).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bncal  # noqa: E402
from bncal.torch.eval_sweep import solve_eval_statistics  # noqa: E402
from bncal.torch.recalibration import batchnorm_layers  # noqa: E402
from models import zoo  # noqa: E402

METHODS = ("passes", "sweep", "sweep+1")
TORCHVISION = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121")


def zoo_nets(samples: int):
    """(name, model, inputs) for the project's own nets."""
    mnist = zoo.mnist_arrays("calib")[0][:samples]
    torch.manual_seed(0)
    yield "zoo.mnist_cnn_stale (MNIST)", zoo.mnist_cnn_stale(), mnist
    for name, make, size in (("zoo.resnet_small", zoo.resnet_small, 32), ("zoo.mobilenet_small", zoo.mobilenet_small, 32)):
        torch.manual_seed(0)
        yield name, make(), torch.randn(samples, 3, size, size)


def torchvision_nets(samples: int, size: int, names):
    import torchvision

    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        for _, bn in batchnorm_layers(model):
            bn.reset_running_stats()
        yield f"torchvision {name}", model, torch.randn(samples, 3, size, size)


def fixed_point(model, x) -> dict:
    """{name: (mean, var)} of every BN input in one float64 train-mode-BN forward of all of ``x``."""
    ref = copy.deepcopy(model).double().eval()
    stats = {}

    def hook(name):
        def record(module, args):
            dims = [0, *range(2, args[0].dim())]
            stats[name] = (args[0].mean(dims), args[0].var(dims, unbiased=False))
        return record

    for name, bn in batchnorm_layers(ref):
        bn.train()
        bn.momentum = None
        bn.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        ref(x.double())
    return stats


def errors(found: dict, reference: dict) -> tuple[float, float]:
    """Largest |mean error| / sd and |variance error| / variance over all BNs."""
    mean_err = var_err = 0.0
    for name, (mean, var) in reference.items():
        m, v = found[name]
        var = var.clamp_min(1e-30)
        mean_err = max(mean_err, float(((torch.as_tensor(m).double() - mean).abs() / var.sqrt()).max()))
        var_err = max(var_err, float(((torch.as_tensor(v).double() - var).abs() / var).max()))
    return mean_err, var_err


def buffers(model) -> dict:
    return {name: (bn.running_mean, bn.running_var) for name, bn in batchnorm_layers(model)}


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start) -> tuple[float, float]:
    """(wall, CPU) seconds since ``start``: CPU time of this process suffers less from other load."""
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def plain_forward(model, batches) -> tuple[float, float]:
    model.eval()
    start = clock()
    with torch.no_grad():
        for x in batches:
            model(x)
    return since(start)


def run_passes(model, batches, tol):
    report = bncal.recalibrate(model, batches, mode="eval", tol=tol, forward_fn=lambda m, b: m(b))
    return {"passes": report.passes, "converged": report.converged}


def run_sweep(model, batches, cache_mb):
    result = solve_eval_statistics(model, batchnorm_layers(model), batches, device="cpu", cache_mb=cache_mb)
    if result.moments is None:
        return {"refusal": result.refusal}, None
    found = {name: (m.mean, m.variance) for name, m in result.moments.items()}
    return {"fe": result.forward_equivalents, "depths": result.depths,
            "cache_mib": result.cached_bytes_peak / 2**20, "data_passes": result.data_passes}, found


def run_sweep_then_confirm(model, batches, tol, cache_mb):
    """recalibrate(mode="eval") as wired: the sweep first, the fixed-point loop confirms."""
    report = bncal.recalibrate(model, batches, mode="eval", tol=tol, cache_mb=cache_mb)
    return {"passes": report.passes, "converged": report.converged, "change": report.max_rel_change}


def measure(name, model, x, batch_size, tol, cache_mb, rounds, only=METHODS) -> dict:
    """Each method ``rounds`` times, each run between two plain forwards; median time ratios."""
    batches = list(x.split(batch_size))
    reference = fixed_point(model, x)
    plain_forward(model, batches[:1])  # warm up
    methods = {"passes": lambda m: run_passes(m, batches, tol),
               "sweep": lambda m: run_sweep(m, batches, cache_mb),
               "sweep+1": lambda m: run_sweep_then_confirm(m, batches, tol, cache_mb)}
    methods = {label: fn for label, fn in methods.items() if label in only}
    row = {"model": name, "bn": len(reference), "samples": len(x)}
    ratios, plains = {label: [] for label in methods}, [plain_forward(model, batches)]
    for _ in range(rounds):
        for label, fn in methods.items():
            work = copy.deepcopy(model)
            start = clock()
            out = fn(work)
            elapsed = since(start)
            plains.append(plain_forward(model, batches))
            ratios[label].append([e / ((a + b) / 2) for e, a, b in zip(elapsed, plains[-1], plains[-2])])
            out, found = out if label == "sweep" else (out, buffers(work))
            err = {} if found is None else dict(zip(("err_mean_sd", "err_var_rel"), errors(found, reference)))
            row[label] = {**out, **err}
    row["plain_seconds"] = statistics.median(p[0] for p in plains)
    for label in methods:
        row[label]["x_plain"] = statistics.median(r[0] for r in ratios[label])
        row[label]["x_plain_cpu"] = statistics.median(r[1] for r in ratios[label])
    return row


def table(rows) -> str:
    head = ("| model | BN | depths | plain forward s | passes: passes, time x plain (wall/CPU), err sd / var | "
            "sweep: fwd-equiv, time x plain (wall/CPU), err sd / var, cache MiB | "
            "sweep+1: passes, time x plain (wall/CPU), err sd / var |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        p, s, c = (r.get(label) for label in METHODS)
        sweep = ("-" if s is None else f"refused: {s['refusal']}" if "refusal" in s else
                 f"{s['fe']:.2f}, {_times(s)}, {_errs(s)}, {s['cache_mib']:.0f}")
        passes = "-" if p is None else f"{p['passes']}, {_times(p)}, {_errs(p)}"
        confirmed = "-" if c is None else f"{c['passes']}, {_times(c)}, {_errs(c)}"
        depths = "-" if s is None else s.get("depths", "-")
        lines.append(f"| {r['model']} | {r['bn']} | {depths} | {r['plain_seconds']:.2f} | {passes} | {sweep} | {confirmed} |")
    return "\n".join(lines)


def _times(cell) -> str:
    return f"{cell['x_plain']:.2f}x / {cell['x_plain_cpu']:.2f}x"


def _errs(cell) -> str:
    return f"{cell['err_mean_sd']:.1e} / {cell['err_var_rel']:.1e}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torchvision", action="store_true", help="also torchvision families (weights=None)")
    parser.add_argument("--only-torchvision", action="store_true")
    parser.add_argument("--models", nargs="*", default=list(TORCHVISION), help="torchvision model names")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="torchvision input size (3 x size x size)")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--cache-mb", type=float, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="rounds for the zoo nets (torchvision: 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning threads under load)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = [] if args.only_torchvision else [(*net, args.rounds) for net in zoo_nets(args.samples)]
    if args.torchvision or args.only_torchvision:
        nets += [(*net, 1) for net in torchvision_nets(args.samples, args.size, args.models)]
    rows = []
    for name, model, x, rounds in nets:
        rows.append(measure(name, model, x, args.batch_size, args.tol, args.cache_mb, rounds, args.methods))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{args.samples} inputs in batches of {args.batch_size}, tol {args.tol:g}, {torch.get_num_threads()} threads")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
