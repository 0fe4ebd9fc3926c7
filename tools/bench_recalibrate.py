"""Benchmark and exactness figures for bncal.recalibrate (PyTorch path), measured side by side.

Speed: wall time of ``bncal.recalibrate`` (train mode), of a bare no_grad loop with BN in
train mode (the floor: train-mode BN must reduce its input), and of torch's
``swa_utils.update_bn`` (and fvcore's ``update_bn_stats`` where installed), each divided by a
plain ``torch.no_grad()`` eval forward over the same data; the runs are interleaved round by
round so machine noise hits all alike, and the median ratio is reported.

Exactness: on MNIST batches ordered by class (the case that breaks per-batch averaging),
the first BN's statistics against the float64 population statistics, and every BN's in eval
mode against the fixed point of a one-batch train-mode forward, with the number of passes.

    python tools/bench_recalibrate.py [--rounds 5] [--batches 8] [--batch-size 32] [--size 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bncal  # noqa: E402
from bncal.recalibration import batchnorm_layers  # noqa: E402
from models import zoo  # noqa: E402
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


def run_fvcore(model, batches):
    from fvcore.nn.precise_bn import update_bn_stats

    update_bn_stats(model, iter(batches), num_iters=len(batches))


def timed(fn, model, batches) -> float:
    start = time.perf_counter()
    fn(model, batches)
    return time.perf_counter() - start


def speed(rounds: int, n_batches: int, batch_size: int, size: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = zoo.resnet18_like(num_classes=10)
    batches = [torch.randn(batch_size, 3, size, size) for _ in range(n_batches)]
    runners = {"bare train-mode BN loop": bare_train_mode_loop, "bncal.recalibrate": run_bncal,
               "swa_utils.update_bn": run_update_bn}
    try:
        import fvcore.nn.precise_bn  # noqa: F401

        runners["fvcore update_bn_stats"] = run_fvcore
    except ImportError:
        pass
    copies = {name: copy.deepcopy(model) for name in runners}
    plain_forward(model, batches[:1])  # warm up allocators and kernels
    for name, fn in runners.items():
        fn(copies[name], batches[:2])
    ratios = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            base = timed(lambda m, b: plain_forward(m, b), model, batches)
            ratios[name].append(timed(fn, copies[name], batches) / base)
    return {name: statistics.median(r) for name, r in ratios.items()}


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"ResNet-18-like, {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print("time / plain no_grad eval forward:")
    for name, ratio in speed(args.rounds, args.batches, args.batch_size, args.size).items():
        print(f"  {name:28s} {ratio:.3f}x")
    print("exactness on MNIST calibration data ordered by class (batch 32), demo CNN:")
    for name, value in exactness(32).items():
        print(f"  {name:52s} {value:.2e}" if isinstance(value, float) else f"  {name:52s} {value}")
    print("eval mode, tol 1e-5, 256 random 3x32x32 inputs in batches of 32:")
    for name, (layers, passes, error) in eval_passes(32).items():
        print(f"  {name:16s} {layers} BN layers: {passes} passes, max error vs fixed point {error:.1e}")


if __name__ == "__main__":
    main()
