"""Benchmark and exactness figures for bncal.recalibrate (PyTorch path), measured side by side.

Speed: wall time of ``bncal.recalibrate`` (train mode), of a bare no_grad loop with BN in
train mode (the floor: train-mode BN must reduce its input), and of torch's
``swa_utils.update_bn`` (and fvcore's ``update_bn_stats`` where installed), each divided by a
plain ``torch.no_grad()`` eval forward over the same data; the runs are interleaved round by
round so machine noise hits all alike. Printed: the median ratio over the rounds and its
range, and bncal's time over the bare loop's in the same round.

Memory (``--memory``): peak resident memory growth of each method, each run in a fresh
process (torch allocates through the C allocator, so tracemalloc sees none of it): the model
and data are built and one batch is run first, the peak is then reset to the current RSS
(``/proc/self/clear_refs``), the method runs, and the growth is the new peak (VmHWM) minus the
RSS before it.

Exactness: on MNIST batches ordered by class (the case that breaks per-batch averaging),
the first BN's statistics against the float64 population statistics, and every BN's in eval
mode against the fixed point of a one-batch train-mode forward, with the number of passes.

    python tools/bench_recalibrate.py [--rounds 5] [--batches 8] [--batch-size 32] [--size 64] [--memory] [--clock cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bncal  # noqa: E402
from bncal.torch.recalibration import batchnorm_layers  # noqa: E402
from models import zoo  # noqa: E402
from _previous import previous_module  # noqa: E402  (tools/ is this script's folder)
from torch import nn  # noqa: E402


def plain_forward(model, batches):
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)


def bare_train_mode_loop(model, batches):
    """The floor for any exact train-mode method: a no_grad loop with only BN in train mode."""
    model.eval()
    for _, bn in batchnorm_layers(model):
        bn.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def run_update_bn(model, batches):
    torch.optim.swa_utils.update_bn(batches, model)


def run_bncal(model, batches):
    bncal.recalibrate(model, batches)


def run_bncal_eval(model, batches):
    """Eval mode: the depth-by-depth sweep (its cache within the default ``cache_mb``) and one
    confirming eval pass; ``max_passes=3`` caps the anchored passes where the sweep does not apply
    (a ``--compare-with`` ref from before the sweep: one train-mode pass, two anchored eval passes)."""
    bncal.recalibrate(model, batches, mode="eval", max_passes=3)


def run_previous(model, batches):
    PREVIOUS[0].recalibrate(model, batches)


def run_previous_eval(model, batches):
    PREVIOUS[0].recalibrate(model, batches, mode="eval", max_passes=3)


PREVIOUS: list = []  # [module, git ref] of --compare-with, once imported


def run_fvcore(model, batches):
    from fvcore.nn.precise_bn import update_bn_stats

    update_bn_stats(model, iter(batches), num_iters=len(batches))


RUNNERS = {"plain no_grad eval forward": plain_forward, "bare train-mode BN loop": bare_train_mode_loop,
           "bncal.recalibrate": run_bncal, "swa_utils.update_bn": run_update_bn,
           "fvcore update_bn_stats": run_fvcore, "bncal.recalibrate eval (max 3 passes)": run_bncal_eval,
           "bncal.recalibrate (previous)": run_previous,
           "bncal.recalibrate eval (max 3 passes, previous)": run_previous_eval}


def available(name: str) -> bool:
    if "previous" in name:
        return bool(PREVIOUS)
    if name != "fvcore update_bn_stats":
        return True
    try:
        import fvcore.nn.precise_bn  # noqa: F401
    except ImportError:
        return False
    return True


def setup(n_batches: int, batch_size: int, size: int):
    torch.manual_seed(0)
    model = zoo.resnet18_like(num_classes=10)
    batches = [torch.randn(batch_size, 3, size, size) for _ in range(n_batches)]
    return model, batches


CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (this process's CPU time, which
# other processes on a shared machine disturb less; the methods run in this process alone)


def timed(fn, model, batches) -> float:
    start = CLOCK[0]()
    fn(model, batches)
    return CLOCK[0]() - start


def speed(rounds: int, n_batches: int, batch_size: int, size: int) -> dict[str, list[float]]:
    """Per method, its time over the plain eval forward's in each round; and bncal over the bare loop."""
    model, batches = setup(n_batches, batch_size, size)
    runners = {name: RUNNERS[name] for name in ("bare train-mode BN loop", "bncal.recalibrate", "swa_utils.update_bn",
                                                "fvcore update_bn_stats", "bncal.recalibrate (previous)")
               if available(name)}
    copies = {name: copy.deepcopy(model) for name in runners}
    plain_forward(model, batches[:1])  # warm up allocators and kernels
    for name, fn in runners.items():
        fn(copies[name], batches[:2])
    ratios = {name: [] for name in runners}
    ratios["bncal / bare loop"] = []
    fastest = {}
    for _ in range(rounds):
        seconds = {}
        for name, fn in runners.items():
            base = timed(plain_forward, model, batches)
            seconds[name] = timed(fn, copies[name], batches)
            ratios[name].append(seconds[name] / base)
        for name, value in seconds.items():
            fastest[name] = min(fastest.get(name, value), value)
        # Same round: the two methods' own times, not a ratio of two ratios over two bases.
        ratios["bncal / bare loop"].append(seconds["bncal.recalibrate"] / seconds["bare train-mode BN loop"])
        if "bncal.recalibrate (previous)" in seconds:
            ratios.setdefault("previous bncal / bare loop", []).append(
                seconds["bncal.recalibrate (previous)"] / seconds["bare train-mode BN loop"])
    # Noise on a shared machine only adds time: the fastest run of each is the steadiest figure.
    ratios["bncal / bare loop, fastest runs"] = [fastest["bncal.recalibrate"] / fastest["bare train-mode BN loop"]]
    return ratios


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_growth(name: str, n_batches: int, batch_size: int, size: int) -> float:
    """Peak RSS growth (MB) of one method in this process (see the module docstring)."""
    model, batches = setup(n_batches, batch_size, size)
    plain_forward(copy.deepcopy(model), batches[:1])  # thread pools, kernels, allocator arenas
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    before = _status_mb("VmRSS:")
    RUNNERS[name](model, batches)
    return _status_mb("VmHWM:") - before


def memory(rounds: int, n_batches: int, batch_size: int, size: int, threads: int) -> dict[str, list[float]]:
    """Per method, its peak RSS growth in ``rounds`` fresh processes (methods interleaved)."""
    names = [name for name in RUNNERS if available(name)]
    growth = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--memory-of", name, "--batches", str(n_batches), "--batch-size",
                   str(batch_size), "--size", str(size), "--threads", str(threads)]
            if PREVIOUS:
                cmd += ["--compare-with", PREVIOUS[1]]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
            growth[name].append(json.loads(result.stdout.strip().splitlines()[-1])["growth_mb"])
    return growth


def median_and_range(values, unit="x", digits=3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return (f"{statistics.median(values):.{digits}f}{unit} (range {min(values):.{digits}f} to "
            f"{max(values):.{digits}f}, {len(values)} rounds)")


def population(x):
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


def fixed_point(model, x):
    ref = copy.deepcopy(model).double().eval()  # dropout off, as during recalibration
    for _, bn in batchnorm_layers(ref):
        bn.train()
    inputs = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for _, bn in batchnorm_layers(ref)]
    with torch.no_grad():
        ref(x.double())
    for h in hooks:
        h.remove()
    return [population(t) for t in inputs]


def layer_errors(model, reference):
    out = []
    for (_, bn), (mean, var) in zip(batchnorm_layers(model), reference):
        out.append(max(float(((bn.running_mean.double() - mean).abs() / var.clamp_min(1e-12).sqrt()).max()),
                       float(((bn.running_var.double() - var).abs() / var.clamp_min(1e-12)).max())))
    return out


def exactness(batch_size: int) -> dict:
    """Errors on the demo CNN with MNIST calibration data sorted by class."""
    x, y = zoo.mnist_arrays("calib")
    order = torch.argsort(y, stable=True)
    x = x[order][:1000]
    batches = list(x.split(batch_size))
    torch.manual_seed(0)
    model = zoo.mnist_cnn()
    reference = fixed_point(model, x)
    mean, var = reference[0]  # no BN acts before the first one: these are its population statistics

    def first_error(m):
        bn = batchnorm_layers(m)[0][1]
        return max(float(((bn.running_mean.double() - mean).abs() / var.sqrt()).max()),
                   float(((bn.running_var.double() - var).abs() / var).max()))

    results = {}
    a = copy.deepcopy(model)
    bncal.recalibrate(a, batches)
    results["bncal train: first BN error"] = first_error(a)
    b = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, b)
    results["update_bn: first BN error"] = first_error(b)
    c = copy.deepcopy(model)
    report = bncal.recalibrate(c, batches, mode="eval", tol=1e-6)
    results["bncal eval: max error over all BNs"] = max(layer_errors(c, reference))
    results["bncal eval: passes"] = report.passes
    results["bncal train: max error over all BNs vs fixed point"] = max(layer_errors(a, reference))
    results["update_bn: max error over all BNs vs fixed point"] = max(layer_errors(b, reference))
    return results


def eval_passes(batch_size: int = 32) -> dict:
    """Passes eval mode needs for tol 1e-5 on deeper nets (random data, BN given random affine)."""
    out = {}
    for factory in (zoo.resnet_small, zoo.mobilenet_small):
        torch.manual_seed(0)
        model = factory()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
        x = torch.randn(256, 3, 32, 32)
        reference = fixed_point(model, x)
        report = bncal.recalibrate(model, list(x.split(batch_size)), mode="eval", tol=1e-5)
        out[factory.__name__] = (len(reference), report.passes, max(layer_errors(model, reference)))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory growth (fresh processes)")
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--compare-with", metavar="GIT_REF",
                        help="also run bncal as committed at this git ref, side by side (e.g. HEAD~3)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one method's growth, in this process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    if args.compare_with:
        PREVIOUS[:] = [previous_module(args.compare_with, "recalibration"), args.compare_with]
    if args.memory_of:
        print(json.dumps({"growth_mb": memory_growth(args.memory_of, args.batches, args.batch_size, args.size)}))
        return
    print(f"ResNet-18-like, {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
          f"{args.threads} threads")
    if not args.skip_speed:
        print(f"{args.clock} time / plain no_grad eval forward, interleaved rounds (median, range):")
        for name, ratios in speed(args.rounds, args.batches, args.batch_size, args.size).items():
            print(f"  {name:28s} {median_and_range(ratios)}")
    if args.memory:
        print("peak RSS growth over the method, each run in a fresh process (median, range):")
        for name, values in memory(args.memory_rounds, args.batches, args.batch_size, args.size, args.threads).items():
            print(f"  {name:44s} {median_and_range(values, ' MB', 0)}")
    if args.skip_exactness:
        return
    print("exactness on MNIST calibration data ordered by class (batch 32), demo CNN:")
    for name, value in exactness(32).items():
        print(f"  {name:52s} {value:.2e}" if isinstance(value, float) else f"  {name:52s} {value}")
    print("eval mode, tol 1e-5, 256 random 3x32x32 inputs in batches of 32:")
    for name, (layers, passes, error) in eval_passes(32).items():
        print(f"  {name:16s} {layers} BN layers: {passes} passes, max error vs fixed point {error:.1e}")


if __name__ == "__main__":
    main()
