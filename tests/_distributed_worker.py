"""Run under torchrun by test_distributed.py: recalibrate one shard per rank, save the result."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/
from test_model_libraries import _act_net  # noqa: E402
from test_model_libraries import _act_net  # noqa: E402
from test_recalibrate import _cnn  # noqa: E402

import bncal  # noqa: E402


#: "sync": timm-style SyncBatchNormAct layers (activation and DropBlock inside), train mode.
MODES = ("train", "eval", "sync")


def shards():
    torch.manual_seed(5)
    batches = [torch.randn(n, 3, 16, 16) * 1.5 + 0.3 for n in (16, 7, 16, 9, 3)]
    return batches, {0: batches[:3], 1: batches[3:]}


def main(out_prefix):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _, by_rank = shards()
    for mode in MODES:
        net = _act_net(sync=True) if mode == "sync" else _cnn()
        report = bncal.recalibrate(net, by_rank[rank], mode="train" if mode == "sync" else mode, tol=1e-7)
        torch.save({"state": net.state_dict(), "samples": report.samples, "batches": report.batches,
                    "world_size": report.world_size}, f"{out_prefix}.{mode}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
