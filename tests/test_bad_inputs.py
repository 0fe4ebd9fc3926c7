"""Bad input, every command: the right exit status, one line that names the problem, nothing
written, no temporary file left, and every input's bytes unchanged.

Each case runs in a fresh copy of a small project (a few-layer model factory in a file, its
weights, an ONNX export, arrays, an image folder) through click's CliRunner in-process; only
SIGTERM, resource limits and torchrun need subprocesses.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bncal.cli import main

SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    def build(width=4):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.Flatten(), nn.Linear(width * 8 * 8, 2))

    def broken():
        raise RuntimeError("factory exploded")

    def needs_width(width):
        return build(width)

    def batches(batch_size=8):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(batch_size, 3, 8, 8, generator=g) * 2 + 1 for _ in range(3)]

    def failing_data(batch_size=8):
        raise ValueError("cannot open the dataset")

    def failing_later(batch_size=8):
        yield torch.randn(4, 3, 8, 8)
        raise KeyError("shard 3")

    _SHARED = iter([torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)])

    def one_shot(batch_size=8):
        return _SHARED

    def empty_batch(batch_size=8):
        return [torch.zeros(0, 3, 8, 8)]

    def pairs(batch_size=8):
        return [(torch.randn(4, 3, 8, 8).numpy(), torch.zeros(4, dtype=torch.long).numpy())]

    def transposed():
        torch.manual_seed(0)
        # PyTorch accepts this ConvTranspose; onnxruntime refuses the graph it exports to.
        return nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=1, dilation=2, output_padding=1), nn.BatchNorm2d(4))
""")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    import onnx
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from bncal.torch.export import export_onnx

    root = tmp_path_factory.mktemp("project")
    (root / "tiny.py").write_text(SOURCE)
    namespace: dict = {}
    exec(compile(SOURCE, str(root / "tiny.py"), "exec"), namespace)
    model = namespace["build"]()
    save_file(model.state_dict(), str(root / "w.safetensors"))
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((24, 3, 8, 8)) * 2 + 1).astype(np.float32)
    np.save(root / "data.npy", data)
    np.save(root / "zero_d.npy", np.float32(3.0))
    np.save(root / "one.npy", data[:1])
    onnx.save(export_onnx(model, (torch.from_numpy(data[:2]),), keep_batchnorm=True), root / "m.onnx")
    (root / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "imgs" / f"img{i}.png")
    return root


@pytest.fixture
def project(template, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(template, d)
    return d


def snapshot(d: Path) -> dict[str, str]:
    """Every file and folder under ``d`` (hidden ones included) with a hash of its bytes."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if "__pycache__" in rel:
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def error_line(code: int, output: str) -> str:
    """The one line that names the problem: ``error: ...`` (exit 1) or click's ``Error: ...`` (exit 2)."""
    prefix = "error: " if code == 1 else "Error: "
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def _read_only(d):
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o555)


def _exists(name, content=b"keep me"):
    def setup(d):
        (d / name).write_bytes(content)
    return setup


def _symlink(d):
    (d / "link.safetensors").symlink_to(d / "w.safetensors")


def _hardlink(d):
    os.link(d / "w.safetensors", d / "hard.safetensors")


def _links_into_data_folder(d):
    os.link(d / "imgs" / "img1.png", d / "hard.png")
    (d / "soft.png").symlink_to(d / "imgs" / "img2.png")


def _bomb(d):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "imgs" / "huge.png")


R = ["recalibrate", "{d}/tiny.py:build", "--weights", "{d}/w.safetensors"]
RO = ["recalibrate", "{d}/m.onnx"]
CASES = [
    # (id, argv, exit status, words the message must contain, setup)
    ("report-json-over-model", ["inspect", "{d}/m.onnx", "--report-json", "{d}/m.onnx"], 2, "does not end in .json", None),
    ("report-json-over-weights", R + ["--data", "{d}/data.npy", "-o", "{d}/out.safetensors", "--report-json", "{d}/w.safetensors"],
     2, "does not end in .json", None),
    ("plot-over-data", ["check", "{d}/m.onnx", "--data", "{d}/data.npy", "--plot", "{d}/data.npy"], 2, "does not end in .png", None),
    ("report-exists", ["inspect", "{d}/m.onnx", "--report-json", "{d}/r.json"], 1, "--report-json {d}/r.json already exists; pass --force",
     _exists("r.json")),
    ("output-is-model", RO + ["--data", "{d}/data.npy", "-o", "{d}/m.onnx", "--force"], 1, "is also an input", None),
    ("output-is-spec-file", R + ["--data", "{d}/data.npy", "-o", "{d}/tiny.py", "--force"], 2, "does not end in .safetensors", None),
    ("plot-is-data-image", ["check", "{d}/m.onnx", "--data", "{d}/imgs", "--plot", "{d}/imgs/img0.png", "--force"], 1,
     "is also an input", None),
    ("plot-hardlink-into-data-folder", ["check", "{d}/m.onnx", "--data", "{d}/imgs", "--plot", "{d}/hard.png", "--force"], 1,
     "is also an input of this run ({d}/imgs/img1.png)", _links_into_data_folder),
    ("plot-symlink-into-data-folder", ["check", "{d}/m.onnx", "--data", "{d}/imgs", "--plot", "{d}/soft.png", "--force"], 1,
     "is also an input of this run ({d}/imgs/img2.png)", _links_into_data_folder),
    ("output-symlink-to-weights", R + ["--data", "{d}/data.npy", "-o", "{d}/link.safetensors", "--force"], 1,
     "is also an input", _symlink),
    ("output-hardlink-to-weights", R + ["--data", "{d}/data.npy", "-o", "{d}/hard.safetensors", "--force"], 1,
     "is also an input", _hardlink),
    ("report-dir-missing", R + ["--data", "{d}/data.npy", "-o", "{d}/out.safetensors", "--report-json", "{d}/no/such/dir/r.json"],
     1, "does not exist; create {d}/no/such/dir first", None),
    ("output-dir-read-only", R + ["--data", "{d}/data.npy", "-o", "{d}/ro/out.safetensors"], 1,
     "cannot write to directory {d}/ro", _read_only),
    ("output-name-too-long", R + ["--data", "{d}/data.npy", "-o", "{d}/" + "n" * 300 + ".safetensors"], 1, "File name too long", None),
    # A fresh model's statistics were never updated (BN001): allowed where the case is about something else.
    ("check-fails-after-parity", ["fold-export", "{d}/tiny.py:build", "--data", "{d}/data.npy", "-o", "{d}/out.onnx",
                                  "--allow", "BN001"], 1, "moving statistics do not match", None),
    ("never-updated-refused", ["fold-export", "{d}/tiny.py:build", "--input-shape", "2,3,8,8", "-o", "{d}/out.onnx"], 1,
     "refusing to export it: BN001 error, moving statistics never updated", None),
    ("allow-unknown-rule", ["fold-export", "{d}/m.onnx", "-o", "{d}/out.onnx", "--allow", "BN999"], 2,
     "cannot allow BN999: not a rule of bncal inspect", None),
    ("opset-3", ["fold-export", "{d}/tiny.py:build", "--input-shape", "2,3,8,8", "--opset", "3", "-o", "{d}/out.onnx"], 2,
     "the exporter here produces opsets", None),
    ("opset-not-reachable", ["fold-export", "{d}/tiny.py:build", "--input-shape", "2,3,8,8", "--opset", "12", "-o", "{d}/out.onnx",
                             "--allow", "BN001"], 1, "could not produce opset 12", None),
    ("tol-negative", R + ["--data", "{d}/data.npy", "--mode", "eval", "--tol", "-1", "-o", "{d}/out.safetensors"], 2,
     "'--tol'", None),
    ("factory-raises", ["recalibrate", "{d}/tiny.py:broken", "--data", "{d}/data.npy", "-o", "{d}/out.safetensors"], 1,
     "the model factory {d}/tiny.py:broken failed: RuntimeError: factory exploded (run with -v", None),
    ("factory-type-error-no-kwargs", ["inspect", "{d}/tiny.py:needs_width"], 1, "the model factory {d}/tiny.py:needs_width failed: TypeError", None),
    ("factory-bad-kwargs", ["inspect", "{d}/tiny.py:build", "--model-kwargs", '{"depth": 2}'], 1, "check --model-kwargs", None),
    ("model-kwargs-not-json", ["inspect", "{d}/tiny.py:build", "--model-kwargs", "{depth: 2}"], 2, "not valid JSON", None),
    ("npy-0d", R + ["--data", "{d}/zero_d.npy", "-o", "{d}/out.safetensors"], 1, "zero_d.npy holds a single value", None),
    ("zero-sample-batch", R + ["--data", "{d}/tiny.py:empty_batch", "-o", "{d}/out.safetensors"], 1, "batch 0 holds no samples", None),
    ("data-function-raises", R + ["--data", "{d}/tiny.py:failing_data", "-o", "{d}/out.safetensors"], 1,
     "the data function {d}/tiny.py:failing_data failed: ValueError: cannot open the dataset", None),
    ("data-generator-raises", R + ["--data", "{d}/tiny.py:failing_later", "-o", "{d}/out.safetensors"], 1,
     "failed while producing batch 1: KeyError", None),
    ("one-shot-iterator-eval", R + ["--data", "{d}/tiny.py:one_shot", "--mode", "eval", "-o", "{d}/out.safetensors"], 1,
     "needs a re-iterable", None),
    ("pairs-to-onnx-check", ["check", "{d}/m.onnx", "--data", "{d}/tiny.py:pairs"], 1,
     "batch 0 holds 2 values but the model has 1 inputs", None),
    ("pairs-to-onnx-recalibrate", RO + ["--data", "{d}/tiny.py:pairs", "-o", "{d}/out.onnx"], 1, "give the inputs only", None),
    ("image-bomb", ["check", "{d}/m.onnx", "--data", "{d}/imgs"], 1, "image {d}/imgs/huge.png is too large to decode safely", _bomb),
    ("image-size-0", ["check", "{d}/m.onnx", "--data", "{d}/imgs", "--image-size", "0", "0"], 2, "'--image-size'", None),
    ("std-zero", ["check", "{d}/m.onnx", "--data", "{d}/imgs", "--std", "0"], 2, "--std values must be nonzero", None),
    ("atol-negative", ["fold-export", "{d}/m.onnx", "--atol", "-1", "-o", "{d}/out.onnx"], 2, "'--atol'", None),
    ("atol-nan", ["fold-export", "{d}/m.onnx", "--atol", "nan", "-o", "{d}/out.onnx"], 2, "give a finite number", None),
    ("top1-above-1", ["check", "{d}/m.onnx", "--data", "{d}/data.npy", "--min-top1-agreement", "2"], 2, "at most 1", None),
    ("device-potato", R + ["--data", "{d}/data.npy", "--device", "potato", "-o", "{d}/out.safetensors"], 2,
     "'potato' is not a device", None),
    ("device-cuda-missing", R + ["--data", "{d}/data.npy", "--device", "cuda:7", "-o", "{d}/out.safetensors"], 2,
     "device 'cuda:7'", None),
    ("providers-unknown", RO + ["--data", "{d}/data.npy", "--providers", "cpu,potato", "-o", "{d}/out.onnx"], 2,
     "onnxruntime provider potato is not available here (available: ", None),
    ("providers-for-torch-model", R + ["--data", "{d}/data.npy", "--providers", "cpu", "-o", "{d}/out.safetensors"], 2,
     "--providers applies to .onnx models", None),
    ("recalibrate-torch-to-onnx", R + ["--data", "{d}/data.npy", "-o", "{d}/out.onnx"], 2, "use bncal fold-export", None),
    ("recalibrate-onnx-to-pt", RO + ["--data", "{d}/data.npy", "-o", "{d}/out.pt"], 2, "give -o OUT.onnx", None),
    ("fold-export-suffix", ["fold-export", "{d}/m.onnx", "-o", "{d}/out.pt"], 2, "give -o OUT.onnx", None),
    ("data-missing", RO + ["-o", "{d}/out.onnx"], 2, "--data is required", None),
    ("onnx-with-weights", ["inspect", "{d}/m.onnx", "--weights", "{d}/w.safetensors"], 1, "holds its own weights", None),
    ("transposed-conv-ort-refuses", ["fold-export", "{d}/tiny.py:transposed", "--input-shape", "2,3,8,8", "-o", "{d}/out.onnx",
                                     "--allow", "BN001"], 1, "onnxruntime refused to run node '0' (ConvTranspose) of the ONNX graph: Computed output shape is inconsistent", None),
    ("keep-failed-exists", ["fold-export", "{d}/m.onnx", "-o", "{d}/out.onnx", "--keep-failed"], 1,
     "--keep-failed {d}/out.FAILED-VERIFICATION.onnx already exists", _exists("out.FAILED-VERIFICATION.onnx")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(project, monkeypatch, case):
    name, argv, expected_code, words, setup = case
    if name == "device-cuda-missing":
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    if name == "output-dir-read-only" and os.geteuid() == 0:
        # root ignores directory permissions: let the file system refuse as it would for anyone else.
        import tempfile

        def refuse(*args, dir=None, **kwargs):
            if str(dir).endswith("/ro"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real_mkdtemp(*args, dir=dir, **kwargs)

        real_mkdtemp = tempfile.mkdtemp
        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    if name == "image-bomb":
        from PIL import Image

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # huge.png has 4096 pixels, the others 64
    if setup:
        setup(project)
    run_refused(project, argv, expected_code, words)


def run_refused(project, argv, expected_code: int, words: str) -> str:
    """Run the CLI on ``argv`` (``{d}``: the project folder) and hold it to the contract: the exit
    status, one error line holding ``words``, nothing written, no temporary left, every input
    unchanged. Returns the error line."""
    before = snapshot(project)
    code, output = run(*[a.replace("{d}", str(project)) for a in argv])
    assert code == expected_code, output
    line = error_line(code, output)
    assert words.replace("{d}", str(project)) in line, line
    assert snapshot(project) == before
    return line


def test_big_endian_npy_reads_as_the_same_numbers(project):
    data = np.load(project / "data.npy")
    np.save(project / "big.npy", data.astype(">f4"))
    outputs = {}
    for name in ("data", "big"):
        out = project / f"{name}.onnx"
        code, output = run("recalibrate", project / "m.onnx", "--data", project / f"{name}.npy", "-o", out, "-q")
        assert code == 0, output
        outputs[name] = out.read_bytes()
    assert outputs["data"] == outputs["big"]


def test_verification_failure_keeps_only_the_documented_file(project, monkeypatch):
    import bncal.folding
    from test_fold_export import _make_corrupting_module_fold

    monkeypatch.setattr(bncal.folding, "fold", _make_corrupting_module_fold(bncal.folding.fold))
    before = snapshot(project)
    code, output = run("fold-export", project / "tiny.py:build", "--weights", project / "w.safetensors",
                       "--input-shape", "2,3,8,8", "-o", project / "out.onnx", "--keep-failed",
                       "--report-json", project / "r.json", "--allow", "BN001")
    assert code == 1 and error_line(code, output).startswith("error: the folded model does not match")
    after = snapshot(project)
    assert set(after) - set(before) == {"out.FAILED-VERIFICATION.onnx"}
    assert all(after[k] == v for k, v in before.items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_mode(project, umask):
    old = os.umask(umask)
    try:
        code, output = run("recalibrate", project / "tiny.py:build", "--weights", project / "w.safetensors",
                           "--data", project / "data.npy", "-o", project / "out.safetensors",
                           "--report-json", project / "r.json", "-q")
    finally:
        os.umask(old)
    assert code == 0, output
    for name in ("out.safetensors", "r.json"):
        assert (project / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_write_error_names_the_path_and_leaves_nothing(tmp_path):
    from bncal.errors import BncalError
    from bncal.outputs import OutputPlan, atomic_output

    target = tmp_path / "out.bin"
    with pytest.raises(BncalError, match=r"cannot write .*out\.bin: No space left on device"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
    plan = OutputPlan()
    plan.add(target, "-o")
    with pytest.raises(BncalError):
        with plan:
            with atomic_output(target) as tmp:
                tmp.write_bytes(b"partial")
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert list(tmp_path.iterdir()) == []


def test_output_plan_protects_the_file_behind_a_spec_and_folder_contents(tmp_path):
    from bncal.errors import BncalError
    from bncal.specs import spec_files
    from bncal.outputs import OutputPlan

    (tmp_path / "net.py").write_text("def build(): pass\n")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"png")
    for spec, output in [(f"{tmp_path}/net.py:build", tmp_path / "net.py"),
                         (str(tmp_path / "imgs"), tmp_path / "imgs" / "a" / ".." / "a" / "x.png")]:
        plan = OutputPlan(force=True)
        plan.protect(spec_files(spec))
        plan.add(output, "-o")
        with pytest.raises(BncalError, match="is also an input"):
            plan.check()
    plan = OutputPlan(force=True)
    plan.add(tmp_path / "r.json", "--report-json")
    plan.add(tmp_path / "r.json", "--plot")
    with pytest.raises(BncalError, match="is also the path of --report-json"):
        plan.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "net.py"]


def _subprocess_env():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def test_file_size_limit_names_the_path_and_leaves_nothing(project):
    import resource

    before = snapshot(project)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))  # smaller than the weights file

    result = subprocess.run([sys.executable, "-m", "bncal", "recalibrate", str(project / "tiny.py:build"), "--weights",
                             str(project / "w.safetensors"), "--data", str(project / "data.npy"),
                             "-o", str(project / "out.safetensors")],
                            capture_output=True, text=True, timeout=120, preexec_fn=limit, env=_subprocess_env())
    assert result.returncode == 1, result.stderr
    assert error_line(1, result.stderr) == f"error: cannot write {project / 'out.safetensors'}: File too large"
    assert snapshot(project) == before


def test_sigterm_removes_every_temporary_and_writes_nothing(project):
    (project / "slow.py").write_text(textwrap.dedent("""
        import os, time, torch
        def batches(batch_size=8):
            open(os.environ["BNCAL_MARKER"], "w").close()
            time.sleep(120)
            return [torch.randn(4, 3, 8, 8)]
    """))
    marker = project.parent / "marker"
    before = snapshot(project)
    process = subprocess.Popen([sys.executable, "-m", "bncal", "recalibrate", str(project / "tiny.py:build"), "--weights",
                                str(project / "w.safetensors"), "--data", str(project / "slow.py:batches"),
                                "-o", str(project / "out.safetensors"), "--report-json", str(project / "r.json"),
                                "--plot", str(project / "p.png")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**_subprocess_env(), "BNCAL_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert any(p.name.startswith(".bncal-") for p in project.iterdir())  # the outputs' staging folders
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143
    assert error_line(1, stderr) == "error: terminated (SIGTERM); nothing was written"
    after = snapshot(project)
    after.pop("slow.py"), before.pop("slow.py")
    assert after == before


def test_torchrun_empty_shard_and_failing_rank_are_named(project):
    from tests_support import torchrun_command

    (project / "one_batch.py").write_text("import torch\ndef batches(batch_size=8):\n    return [torch.randn(4, 3, 8, 8)]\n")
    before = snapshot(project)
    base = torchrun_command(2) + ["-m", "bncal", "recalibrate", str(project / "tiny.py:build"), "--weights",
                                  str(project / "w.safetensors"), "-o", str(project / "out.safetensors")]
    env = {**_subprocess_env(), "OMP_NUM_THREADS": "1"}
    samples = subprocess.run(base + ["--data", str(project / "one.npy")], capture_output=True, text=True, timeout=240, env=env)
    assert samples.returncode != 0
    errors = sorted(line for line in samples.stderr.splitlines() if line.startswith("error: "))
    assert errors == [f"error: rank {r}: the data holds 1 sample for 2 ranks, so rank 0 would get none; give at least one "
                      "sample per rank, or run fewer ranks" for r in (0, 1)], samples.stderr[-3000:]
    batches = subprocess.run(base + ["--data", str(project / "one_batch.py:batches")], capture_output=True, text=True,
                             timeout=240, env=env)
    assert batches.returncode != 0
    errors = [line for line in batches.stderr.splitlines() if line.startswith("error: ")]
    failing = f"error: rank 1: the data function {project / 'one_batch.py:batches'} gave 1 batch for 2 ranks, so rank 1 got none"
    assert any(line.startswith(failing) for line in errors), batches.stderr[-3000:]
    # The waiting rank either lost contact (and says so) or was stopped by torchrun; never only gloo's words.
    others = [line for line in errors if line.startswith("error: rank 0:")]
    assert all("another rank stopped" in line or "terminated" in line for line in others), others
    after = snapshot(project)
    after.pop("one_batch.py"), before.pop("one_batch.py")
    assert after == before


def test_sample_limits_split_across_ranks_exactly_or_refuse():
    from bncal.distributed import shard_limit
    from bncal.errors import BncalError

    for total, world in [(10, 3), (7, 7), (1000, 8)]:
        parts = [shard_limit(total, r, world) for r in range(world)]
        assert sum(parts) == total and max(parts) - min(parts) <= 1 and min(parts) >= 1
    assert shard_limit(None, 1, 2) is None
    with pytest.raises(BncalError, match="fewer than the 2 ranks"):
        shard_limit(1, 0, 2)


def test_plot_without_matplotlib_is_refused_before_any_work(project, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    before = snapshot(project)
    code, output = run("recalibrate", project / "tiny.py:build", "--weights", project / "w.safetensors",
                       "--data", project / "tiny.py:failing_data", "-o", project / "out.safetensors", "--plot", project / "p.png")
    assert code == 1  # the data function would fail too: refused before it is called
    assert error_line(code, output) == "error: --plot needs matplotlib: pip install 'bncal[plot]'"
    assert snapshot(project) == before
