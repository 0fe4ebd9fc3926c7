"""Benchmark bncal on the BatchNorm modules model libraries build with: timm's BatchNormAct2d (with a
DropBlock), SyncBatchNormAct, frozen BN, RepVGG branches, small batches.

For each family (BN weight/bias and statistics randomised with a fixed seed):

- **recalibration error**: ``bncal.recalibrate`` in train and in eval mode against a float64
  reference (:func:`models.library_lookalikes.float64_bn_statistics`: only the BNs in training
  mode, every drop and activation module in eval mode), the largest error of any BN's mean or
  standard deviation in units of the reference standard deviation;
- **fold-export**: BatchNormalization nodes (frozen BNs counted as BNs) before / left by
  ``bncal.fold_export_torch`` / the floor (:func:`bench_zoo.structural_floor`, on an export with
  every BN kept, frozen ones as BatchNormalization), and its CPU time against
  ``torch.onnx.export`` with a static batch (its default) and with a dynamic batch axis,
  interleaved over ``--rounds`` after a warm-up, median ratios;
- **inspect**: BN050 (cannot be folded) and BN020 (an affine BN whose scale and shift the next
  layer could absorb) findings, which should agree with the fold.

Families: look-alikes of the modules (:mod:`models.library_lookalikes`, plain torch) always; with
``--timm`` timm's own architectures (``pretrained=False``), which need a separate environment (timm
needs torchvision, which does not import beside the CPU torch 2.13 here; ``pip install
torch==2.14.1 torchvision==0.29.1 timm``), with bncal on the path::

    PYTHONPATH=. python tools/bench_model_libraries.py [--timm] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_zoo import interleaved, op_count, quiet, structural_floor  # noqa: E402

BATCH, BATCHES = 8, 4


def lookalike_families() -> dict:
    """name -> (builder, input size): the look-alike nets."""
    import torch
    from torch import nn

    from models.library_lookalikes import (BatchNormAct2d, FrozenBatchNorm2d, RepVGGBlock, SyncBatchNormAct, lcnet_like,
                                           randomize)

    def byob(bn_act):
        def build():
            torch.manual_seed(0)
            layers, c = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), bn_act(16, drop_block=0.2)], 16
            for out in (24, 32, 48):
                layers += [nn.Conv2d(c, out, 3, 2, 1, bias=False), bn_act(out, drop_block=0.2),
                           nn.Conv2d(out, out, 3, 1, 1, bias=False), bn_act(out, drop_block=0.2, act=nn.SiLU)]
                c = out
            return randomize(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)))
        return build

    class Basic(nn.Module):
        def __init__(self, c, norm):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), norm(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), norm(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def frozen_resnet():
        torch.manual_seed(0)
        return randomize(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), FrozenBatchNorm2d(16), nn.ReLU(),
                                       Basic(16, FrozenBatchNorm2d), Basic(16, nn.BatchNorm2d),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))

    def repvgg():
        torch.manual_seed(0)
        return randomize(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                       RepVGGBlock(16), RepVGGBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(16, 10)))

    return {"byob-like (BatchNormAct2d, DropBlock 0.2)": (byob(BatchNormAct2d), 32),
            "the same, SyncBatchNormAct": (byob(SyncBatchNormAct), 32),
            "resnet-like, frozen stem and block": (frozen_resnet, 32),
            "repvgg-like (identity-branch BN)": (repvgg, 32),
            "lcnet-like": (lambda: randomize(lcnet_like()), 32)}


def timm_families() -> dict:
    import timm
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

    from models.library_lookalikes import randomize

    def make(name, convert=None, **kwargs):
        def build():
            model = timm.create_model(name, pretrained=False, **kwargs)
            return randomize(convert(model) if convert else model)
        return build

    return {"gernet_s (drop_block_rate 0.2)": (make("gernet_s", drop_block_rate=0.2), 224),
            "efficientnet_b0, SyncBatchNormAct": (make("efficientnet_b0", convert_sync_batchnorm), 224),
            "resnet50, frozen BN": (make("resnet50", freeze_batch_norm_2d), 224),
            "repvgg_a0": (make("repvgg_a0"), 224),
            "lcnet_050": (make("lcnet_050"), 224)}


def family_row(name: str, build, size: int, rounds: int, folder: Path) -> dict:
    import torch

    import bncal
    from bncal.torch.bn_modules import frozen_batchnorm_layers, unfreeze_batchnorm
    from bncal.torch.export import traced_batch
    from bncal.folding import analyze_foldability
    from bncal.torch.recalibration import batchnorm_layers
    from models.library_lookalikes import error_in_sd, float64_bn_statistics

    model = build().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(BATCH, 3, size, size, generator=g) for _ in range(BATCHES)]
    row = {"family": name, "bn": len(batchnorm_layers(model)), "frozen": len(frozen_batchnorm_layers(model))}
    for mode in ("train", "eval"):
        if not row["bn"]:
            break
        work = copy.deepcopy(model)
        with quiet():
            bncal.recalibrate(work, data, mode=mode, tol=1e-8)
        row[f"{mode}_err"] = error_in_sd(work, float64_bn_statistics(model, data, one_batch=mode == "eval"))
    if row["bn"]:
        bncal.recalibrate(model, data, mode="eval")
    x = data[0][:1]
    times = interleaved({
        "default": lambda: torch.onnx.export(model, (x,), str(folder / "default.onnx")),
        "dynamic": lambda: torch.onnx.export(model, traced_batch((x,)), str(folder / "dynamic.onnx"),
                                             input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},)),
        "bncal": lambda: bncal.fold_export_torch(model, (x,), folder / "bncal.onnx"),
    }, rounds)
    _, report = times["bncal"]["last"]
    kept = bncal.export_onnx(unfreeze_batchnorm(model), (x,), keep_batchnorm=True)  # frozen BNs as BatchNormalization
    inspected = bncal.inspect_model(model, fold_decisions=analyze_foldability(model, x))
    cpu = {k: statistics.median(v["cpu"]) for k, v in times.items()}
    row.update(passed=report.passed, bn_before=op_count(kept), bn_after=report.bn_left, floor=structural_floor(kept),
               bn050=sum(len(f.layers) for f in inspected.by_rule("BN050")),
               bn020=sum(len(f.layers) for f in inspected.by_rule("BN020")),
               static_ratio=statistics.median(a / b for a, b in zip(times["bncal"]["cpu"], times["default"]["cpu"])),
               dynamic_ratio=statistics.median(a / b for a, b in zip(times["bncal"]["cpu"], times["dynamic"]["cpu"])),
               bncal_cpu=cpu["bncal"], default_cpu=cpu["default"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| family | recalibration error (sd): train, eval | BN before / after / floor | inspect BN050, BN020 | "
             "fold-export / torch.onnx.export, CPU: static, dynamic batch |", "|---|---|---|---|---|"]
    for r in rows:
        errors = (f"{r['train_err']:.1e}, {r['eval_err']:.1e}" if "train_err" in r else "only frozen BN")
        lines.append(f"| {r['family']} | {errors} | {r['bn_before']} / {r['bn_after']} / {r['floor']}"
                     f"{'' if r['passed'] else ' FAILED'} | {r['bn050']}, {r['bn020']} | "
                     f"{r['static_ratio']:.2f}x, {r['dynamic_ratio']:.2f}x ({r['bncal_cpu']:.1f} s) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm", action="store_true", help="timm's architectures instead of the look-alikes.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved timing rounds per family (after a warm-up).")
    parser.add_argument("--json", type=Path, help="Also write every figure as JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    families = timm_families() if args.timm else lookalike_families()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (build, size) in families.items():
            rows.append(family_row(name, build, size, args.rounds, Path(folder)))
            print(f"{name}: done", file=sys.stderr)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
