"""Run under torchrun by test_distributed.py: recalibrate an ONNX model on one shard per rank."""

import json
import sys

import numpy as np
import onnx
import torch.distributed as dist
from onnx import numpy_helper

from bncal.data import ArrayBatches
from bncal.onnx.recalibration import recalibrate_onnx


def main(model_path, data_path, out_prefix):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = onnx.load(model_path)
    batches = ArrayBatches({"x": np.load(data_path)}, batch_size=7, rank=rank, world_size=world)
    # Train mode finds the default group by itself; eval mode is handed it, as a library user would.
    for mode, group in (("train", None), ("eval", dist.group.WORLD)):
        new, report = recalibrate_onnx(model, batches, mode=mode, tol=1e-7, process_group=group)
        np.savez(f"{out_prefix}.{mode}.rank{rank}.npz",
                 **{t.name: numpy_helper.to_array(t) for t in new.graph.initializer})
        with open(f"{out_prefix}.{mode}.rank{rank}.json", "w") as f:
            json.dump({"world_size": report.world_size, "samples": report.samples, "batches": report.batches,
                       "passes": report.passes,
                       "after": {l.name: [l.after.mean.tolist(), l.after.var.tolist()] for l in report.layers}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
