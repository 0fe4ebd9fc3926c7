"""Helpers shared by the tests: running the CLI, locating files."""

import shutil
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def torchrun_command(nproc: int) -> list[str]:
    """torchrun from this interpreter's environment, standalone on 127.0.0.1."""
    exe = Path(sys.executable).with_name("torchrun")
    base = [str(exe)] if exe.exists() else [shutil.which("torchrun") or "torchrun"]
    return base + ["--standalone", f"--nproc-per-node={nproc}"]


def randomize_bn(net, seed=0):
    """Distinct, non-default BN parameters and statistics (so no two initializers are equal)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return net


class Reshuffled:
    """A loader that yields its batches in a new (seeded) order on every pass."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def __iter__(self):
        import torch

        self.epoch += 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.epoch))
        return iter([self.batches[i] for i in order])
