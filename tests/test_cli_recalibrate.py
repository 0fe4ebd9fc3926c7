"""`bncal recalibrate` end to end, and each bad input giving one clear line and no output file."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bncal.cli import main

MODEL_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    def build(width=4):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.Flatten(), nn.Linear(width * 8 * 8, 2))

    def no_bn():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

    def batches(batch_size=8):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(batch_size, 3, 8, 8, generator=g) * 2 + 1 for _ in range(3)]
""")


@pytest.fixture
def project(tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL_SOURCE)
    sys.path.insert(0, str(tmp_path))
    import importlib

    tiny = importlib.import_module("tiny")
    importlib.reload(tiny)
    sys.path.remove(str(tmp_path))
    save_file(tiny.build().state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(tiny.build().state_dict(), tmp_path / "w.pt")
    data = torch.cat(tiny.batches()).numpy()
    np.save(tmp_path / "data.npy", data)
    return tmp_path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_npy_data_end_to_end_with_json_report(project):
    out = project / "out.safetensors"
    code, output = run("recalibrate", project / "tiny.py:build", "--weights", project / "w.safetensors",
                       "--data", project / "data.npy", "--batch-size", 5, "-o", out, "--report-json", project / "r.json")
    assert code == 0, output
    assert "recalibrated 1 BatchNorm layers from 24 samples in 5 batches" in output
    x = torch.from_numpy(np.load(project / "data.npy")).double()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    state = load_file(str(project / "w.safetensors"))
    conv.weight.data, conv.bias.data = state["0.weight"].double(), state["0.bias"].double()
    h = conv(x).detach()
    new = load_file(str(out))
    torch.testing.assert_close(new["1.running_mean"].double(), h.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new["1.running_var"].double(), h.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=0)
    report = json.loads((project / "r.json").read_text())
    assert report["mode"] == "train" and report["layers"][0]["values_per_channel"] == 24 * 64


def test_function_data_eval_mode_and_pt_output(project):
    out = project / "out.pt"
    code, output = run("recalibrate", project / "tiny.py:build", "--weights", project / "w.pt",
                       "--data", project / "tiny.py:batches", "--mode", "eval", "-o", out, "--plot", project / "p.png")
    assert code == 0, output
    assert "converged" in output
    assert (project / "p.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(out, weights_only=True)
    assert int(state["1.num_batches_tracked"]) == 3


@pytest.mark.parametrize("case", ["missing-weights", "corrupt-weights", "other-arch", "bad-shape", "nan", "empty",
                                  "no-bn", "batch1", "exists", "pickle"])
def test_bad_input_one_line_exit_1_no_output(project, case):
    out = project / "out.safetensors"
    model, weights, data = project / "tiny.py:build", project / "w.safetensors", project / "data.npy"
    extra = []
    if case == "missing-weights":
        weights = project / "nope.safetensors"
    elif case == "corrupt-weights":
        weights = project / "bad.safetensors"
        weights.write_bytes((project / "w.safetensors").read_bytes()[:100])
    elif case == "other-arch":
        extra = ["--model-kwargs", '{"width": 6}']
    elif case == "bad-shape":
        data = project / "bad.npy"
        np.save(data, np.zeros((4, 3, 9, 9), np.float32))
    elif case == "nan":
        data = project / "nan.npy"
        np.save(data, np.full((4, 3, 8, 8), np.nan, np.float32))
    elif case == "empty":
        data = project / "empty.npy"
        np.save(data, np.zeros((0, 3, 8, 8), np.float32))
    elif case == "no-bn":
        model, weights = project / "tiny.py:no_bn", None
    elif case == "batch1":
        extra = ["--batch-size", "1"]
        model = project / "tiny.py:build"
        data = project / "flat.npy"
        np.save(data, np.random.default_rng(0).standard_normal((3, 3, 1, 1)).astype(np.float32))
        (project / "flat.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(3))\n")
        model, weights = project / "flat.py:build", None
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "pickle":
        weights = project / "pickled.pt"
        torch.save({"state_dict": torch.nn.Linear(1, 1)}, weights)  # a pickled module inside
    args = ["recalibrate", model, "--data", data, "-o", out, *extra]
    if weights is not None:
        args[2:2] = ["--weights", weights]
    code, output = run(*args)
    assert code == 1, output
    lines = [l for l in output.strip().splitlines() if not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    expected = {"missing-weights": "does not exist", "corrupt-weights": "corrupt", "other-arch": "do not fit the model",
                "bad-shape": "failed on calibration batch", "nan": "NaN or Inf", "empty": "empty",
                "no-bn": "no BatchNorm", "batch1": "one value per channel", "exists": "--force",
                "pickle": "--allow-pickle"}[case]
    assert expected in lines[0]
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()
    assert not list(project.glob(".out.safetensors.*"))  # no temporary left behind


def test_force_replaces_and_input_never_overwritten(project):
    weights = project / "w.safetensors"
    before = weights.read_bytes()
    code, output = run("recalibrate", project / "tiny.py:build", "--weights", weights, "--data", project / "data.npy",
                       "-o", weights, "--force")
    assert code == 1 and "also an input" in output
    assert weights.read_bytes() == before


def test_module_entry_point_prints_no_traceback_and_verbose_does(project):
    args = [sys.executable, "-m", "bncal", "recalibrate", str(project / "tiny.py:build"), "--weights",
            str(project / "missing.safetensors"), "--data", str(project / "data.npy"), "-o", str(project / "o.safetensors")]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and quiet.stderr.strip().startswith("error:") and "Traceback" not in quiet.stderr
    loud = subprocess.run(args[:3] + ["-v"] + args[3:], capture_output=True, text=True, timeout=120)
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    usage = subprocess.run([sys.executable, "-m", "bncal", "recalibrate"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_help_does_not_import_torch():
    code = "import sys; from bncal.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'onnx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("False False"), result.stdout


def test_torchrun_cli_shards_data_and_rank0_writes(project):
    from tests_support import torchrun_command

    out = project / "dist.safetensors"
    cmd = torchrun_command(2) + ["-m", "bncal", "recalibrate", str(project / "tiny.py:build"), "--weights",
                                 str(project / "w.safetensors"), "--data", str(project / "data.npy"), "--batch-size", "5",
                                 "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 ranks" in result.stdout and result.stdout.count("wrote") == 1
    code, _ = run("recalibrate", project / "tiny.py:build", "--weights", project / "w.safetensors",
                  "--data", project / "data.npy", "--batch-size", "5", "-o", project / "single.safetensors")
    single, both = load_file(str(project / "single.safetensors")), load_file(str(out))
    # First BN: the population statistics, whatever the split across ranks.
    torch.testing.assert_close(both["1.running_mean"], single["1.running_mean"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(both["1.running_var"], single["1.running_var"], rtol=1e-6, atol=0)
