"""Two gloo ranks on one machine end with the statistics one process computes over the union."""

import os
import subprocess

import numpy as np
import torch

import bncal
from tests_support import TESTS_DIR, torchrun_command

from _distributed_worker import MODES, shards
from test_model_libraries import _act_net
from test_recalibrate import _cnn


def test_two_ranks_match_one_process(tmp_path):
    prefix = str(tmp_path / "out")
    cmd = torchrun_command(2) + [str(TESTS_DIR / "_distributed_worker.py"), prefix]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    union, _ = shards()
    for mode in MODES:
        single = _act_net(sync=True) if mode == "sync" else _cnn()
        report = bncal.recalibrate(single, union, mode="train" if mode == "sync" else mode, tol=1e-7)
        ranks = [torch.load(f"{prefix}.{mode}.rank{r}.pt", weights_only=True) for r in (0, 1)]
        for saved in ranks:
            assert saved["world_size"] == 2
            assert saved["samples"] == report.samples and saved["batches"] == report.batches
            for key, value in single.state_dict().items():
                if "running" in key:
                    torch.testing.assert_close(saved["state"][key], value, rtol=1e-6, atol=1e-7, msg=f"{mode} {key}")
        for key in ranks[0]["state"]:  # every rank holds the same statistics, bit for bit
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key


def test_onnx_two_ranks_match_one_process(tmp_path):
    """recalibrate_onnx on two gloo ranks (library and CLI) equals one process over the union."""
    import json

    import onnx

    from bncal.data import ArrayBatches
    from bncal.onnx.recalibration import recalibrate_onnx
    from test_onnx_recalibrate import assert_stats_close, data, export, first_bn_net, stored

    model = export(first_bn_net(), [(2, 3, 9, 9)])
    onnx.save(model, tmp_path / "m.onnx")
    x = data(61)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = str(tmp_path / "out")
    library = subprocess.run(torchrun_command(2) + [str(TESTS_DIR / "_distributed_onnx_worker.py"), str(tmp_path / "m.onnx"),
                                                    str(tmp_path / "x.npy"), prefix],
                             capture_output=True, text=True, timeout=240, env=env)
    assert library.returncode == 0, library.stderr[-3000:]
    cli = subprocess.run(torchrun_command(2) + ["-m", "bncal", "recalibrate", str(tmp_path / "m.onnx"), "--data",
                                                str(tmp_path / "x.npy"), "--batch-size", "7", "--mode", "eval",
                                                "--tol", "1e-7", "-o", str(tmp_path / "cli.onnx"),
                                                "--report-json", str(tmp_path / "cli.json")],
                         capture_output=True, text=True, timeout=240, env=env)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "on 2 ranks" in cli.stdout and cli.stdout.count("wrote") == 1

    # One process over the union: the shards of both ranks, in rank order.
    union = [b for r in (0, 1) for b in ArrayBatches({"x": x}, batch_size=7, rank=r, world_size=2)]
    for mode in ("train", "eval"):
        single, report = recalibrate_onnx(model, union, mode=mode, tol=1e-7)
        expected = stored(single)
        ranks = [dict(np.load(f"{prefix}.{mode}.rank{r}.npz")) for r in (0, 1)]
        for r in (0, 1):
            summary = json.loads(open(f"{prefix}.{mode}.rank{r}.json").read())
            after = summary.pop("after")
            assert summary == {"world_size": 2, "samples": 61, "batches": report.batches, "passes": report.passes}
            if mode == "train":  # one pass: the same batch statistics, merged in another order
                for layer in report.layers:
                    np.testing.assert_allclose(after[layer.name][0], layer.after.mean, rtol=1e-12, atol=1e-12)
                    np.testing.assert_allclose(after[layer.name][1], layer.after.var, rtol=1e-12)
        # Eval passes feed float32 statistics back, so merge-order rounding may move one float32 ulp.
        results = [stored_arrays(model, ranks[r]) for r in (0, 1)]
        if mode == "eval":
            results.append(stored(onnx.load(tmp_path / "cli.onnx")))  # the CLI ran eval mode
        for statistics in results:
            for name in expected:
                assert_stats_close(statistics[name], expected[name], 1e-6 if mode == "train" else 1e-5)
        for name in ranks[0]:  # every rank holds the same statistics, bit for bit
            assert np.array_equal(ranks[0][name], ranks[1][name]), name
    cli_report = json.loads((tmp_path / "cli.json").read_text())
    assert cli_report["world_size"] == 2 and cli_report["samples"] == 61


def stored_arrays(model, initializers):
    """``{bn name: (mean, var)}`` read from saved initializer arrays of a copy of ``model``."""
    from bncal.onnx.graphs import find_batchnorms

    return {i.name: (initializers[i.mean_initializer].astype(np.float64), initializers[i.var_initializer].astype(np.float64))
            for i in find_batchnorms(model) if i.handled}
