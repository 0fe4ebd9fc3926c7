"""Train ``mnist_cnn`` the way a user who forgot to update BatchNorm's moving statistics would.

During training every BN normalises with the statistics of the current batch, as usual, but
its running (moving) statistics are never updated: each BN's ``momentum`` is set to 0.0, so
``running_mean`` stays 0 and ``running_var`` stays 1. This mimics a TensorFlow 1.x model whose
``UPDATE_OPS`` were never run. The weights are fine; inference (eval mode) is near chance.
``num_batches_tracked`` (which PyTorch increments even at momentum 0) is reset to 0 before
saving, so the checkpoint reads as "never updated" throughout.

Writes ``models/mnist_cnn_stale.safetensors`` (float32 state dict of
``models/zoo.py:mnist_cnn``) and prints held-out accuracies:

- eval mode with the stale statistics (what a deployed model would do);
- train mode (batch statistics over shuffled held-out batches of 128, dropout on), and the same
  with dropout off;
- a sanity check that recalibration can repair it (not a bncal call): running statistics reset
  and re-estimated with ``momentum=None`` (cumulative average over batches) on the calibration
  split, once with the whole model in train mode (dropout on, like
  ``torch.optim.swa_utils.update_bn``) and once with only the BN layers in train mode.

Reproducible: fixed seeds, 2 threads, ``torch.use_deterministic_algorithms(True)``.
Run from the repository root::

    python tools/train_demo.py            # about 20-30 s on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402

SEED = 0
EPOCHS = 4
BATCH = 64
LR = 2e-3


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def accuracy(model: nn.Module, split: str, batch_size: int = 128) -> float:
    correct = total = 0
    for x, y in zoo.mnist_batches(split, batch_size, shuffle=True, seed=1):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


@torch.no_grad()
def sanity_recalibrate(model: nn.Module, dropout_on: bool) -> nn.Module:
    """Cumulative-average re-estimate of the running statistics over the calibration split."""
    m = copy.deepcopy(model).eval()
    for bn in bn_layers(m):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    if dropout_on:
        m.train()
    for x in zoo.calibration_batches(batch_size=128):
        m(x)
    return m.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the stale-statistics mnist_cnn demo checkpoint.")
    ap.add_argument("-o", "--out", type=Path, default=zoo.MNIST_STALE_CKPT)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)

    model = zoo.mnist_cnn()
    for bn in bn_layers(model):
        bn.momentum = 0.0  # the forgotten update: running stats never move
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=args.epochs * -(-4000 // BATCH))
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    for epoch in range(args.epochs):
        seen = loss_sum = 0.0
        for x, y in zoo.mnist_batches("calib", BATCH, shuffle=True, seed=100 + epoch):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f}")
    t_train = time.perf_counter() - t0

    for bn in bn_layers(model):
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        bn.num_batches_tracked.zero_()
        bn.momentum = 0.1

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes metadata from a hash map, so with several keys
    # their order (and the file's bytes) would change from run to run.
    save_file(state, str(args.out), metadata={"description": (
        "models/zoo.py:mnist_cnn written by `python tools/train_demo.py`; trained with batch "
        "statistics, BN running stats never updated (mean 0, var 1); data: models/mnist5k.npz "
        "calib split, MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0")})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")

    model.eval()
    acc_eval = accuracy(model, "test")
    model.train()
    torch.manual_seed(SEED)
    acc_train = accuracy(model, "test")
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    acc_batch_nodrop = accuracy(model, "test")
    model.eval()

    torch.manual_seed(SEED)
    acc_recal_drop = accuracy(sanity_recalibrate(model, dropout_on=True), "test")
    acc_recal_nodrop = accuracy(sanity_recalibrate(model, dropout_on=False), "test")

    print("held-out accuracy (1000 digits):")
    print(f"  eval mode, stale running stats (0/1)          {acc_eval:.4f}")
    print(f"  train mode, batch stats, dropout on (bs 128)  {acc_train:.4f}")
    print(f"  batch stats, dropout off (bs 128)             {acc_batch_nodrop:.4f}")
    print(f"  sanity recal, whole model train (dropout on)  {acc_recal_drop:.4f}")
    print(f"  sanity recal, BN only in train (dropout off)  {acc_recal_nodrop:.4f}")
    print(f"training {t_train:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
