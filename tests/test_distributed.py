"""Two gloo ranks on one machine end with the statistics one process computes over the union."""

import os
import subprocess

import torch

import bncal
from tests_support import TESTS_DIR, torchrun_command

from _distributed_worker import shards
from test_recalibrate import _cnn


def test_two_ranks_match_one_process(tmp_path):
    prefix = str(tmp_path / "out")
    cmd = torchrun_command(2) + [str(TESTS_DIR / "_distributed_worker.py"), prefix]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    union, _ = shards()
    for mode in ("train", "eval"):
        single = _cnn()
        report = bncal.recalibrate(single, union, mode=mode, tol=1e-7)
        ranks = [torch.load(f"{prefix}.{mode}.rank{r}.pt", weights_only=True) for r in (0, 1)]
        for saved in ranks:
            assert saved["world_size"] == 2
            assert saved["samples"] == report.samples and saved["batches"] == report.batches
            for key, value in single.state_dict().items():
                if "running" in key:
                    torch.testing.assert_close(saved["state"][key], value, rtol=1e-6, atol=1e-7, msg=f"{mode} {key}")
        for key in ranks[0]["state"]:  # every rank holds the same statistics, bit for bit
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
