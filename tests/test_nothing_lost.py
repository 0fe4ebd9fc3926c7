"""Nothing lost, part 2: outputs that appear during a run, partial commits, a rank killed under
torchrun, images read at their own bit depth, symlinked image folders, and the messages of
inputs that are not what they claim to be.

Every case is built here: a tiny model factory in a file, its weights, arrays, images written
with Pillow (16-bit colour PNGs byte by byte). The CLI runs in-process through click's
CliRunner; a file-size limit and torchrun need subprocesses.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from test_bad_inputs import SOURCE, _subprocess_env, error_line, run, run_refused, snapshot

EXTRA = textwrap.dedent("""
    import os, sys, signal

    class NoOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            self.bn(x)

    class HalfOutput(NoOutput):
        def forward(self, x):
            return self.bn(x), None

    def no_output():
        return NoOutput()

    def half_output():
        return HalfOutput()

    def exits(batch_size=8):
        sys.exit(3)

    def labelled(batch_size=8):
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(2)]

    def another_writer(batch_size=8):
        # A second run with the same output finishing first: the file appears while this run works.
        for path in os.environ["BNCAL_OTHER_WRITES"].split(os.pathsep):
            if path.endswith("/"):
                os.mkdir(path)
            else:
                with open(path, "w") as f:
                    f.write("the other run's file")
        return batches(batch_size)

    def rank1_killed(batch_size=8):
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return batches(batch_size)
""")


@pytest.fixture
def project(tmp_path):
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "p"
    d.mkdir()
    (d / "tiny.py").write_text(SOURCE + EXTRA)
    namespace: dict = {}
    exec(compile(SOURCE, str(d / "tiny.py"), "exec"), namespace)
    save_file(namespace["build"]().state_dict(), str(d / "w.safetensors"))
    rng = np.random.default_rng(0)
    np.save(d / "data.npy", (rng.standard_normal((16, 3, 8, 8)) * 2 + 1).astype(np.float32))
    torch.manual_seed(0)
    return d


def recalibrate(d, *extra):
    return run("recalibrate", d / "tiny.py:build", "--weights", d / "w.safetensors", *extra)


def staging_left(d: Path) -> list[str]:
    return [str(p) for p in d.rglob(".bncal-*")]


# 1. Outputs created exclusively, committed all or nothing ---------------------------------------

def test_an_output_that_appears_during_the_run_is_not_replaced(project, monkeypatch):
    out = project / "same.safetensors"
    monkeypatch.setenv("BNCAL_OTHER_WRITES", str(out))
    code, output = recalibrate(project, "--data", project / "tiny.py:another_writer", "-o", out)
    assert code == 1, output
    line = error_line(code, output)
    assert line.startswith(f"error: -o {out} was created at ") and "by another process" in line, line
    assert line.endswith("nothing was written: pass --force to replace it, or give another path"), line
    assert out.read_text() == "the other run's file"
    assert staging_left(project) == []
    # With --force the run replaces it, as asked.
    code, output = recalibrate(project, "--data", project / "tiny.py:another_writer", "-o", out, "--force", "-q")
    assert code == 0, output
    from safetensors.numpy import load_file

    assert "1.running_mean" in load_file(str(out))
    assert staging_left(project) == []


def test_outputs_are_committed_all_or_nothing(project, monkeypatch):
    (project / "a").mkdir()
    (project / "b").mkdir()
    out, report = project / "a" / "out.safetensors", project / "b" / "r.json"
    monkeypatch.setenv("BNCAL_OTHER_WRITES", str(report))
    before = snapshot(project)
    code, output = recalibrate(project, "--data", project / "tiny.py:another_writer", "-o", out, "--report-json", report)
    assert code == 1, output
    assert f"--report-json {report} was created at" in error_line(code, output)
    after = snapshot(project)
    assert after.pop("b/r.json") and after == before  # -o was placed first and taken back
    # With --force a file that cannot be placed (a folder appeared at its path) restores the one replaced.
    report.unlink()
    out.write_bytes(b"previous result")
    monkeypatch.setenv("BNCAL_OTHER_WRITES", str(report) + "/")
    code, output = recalibrate(project, "--data", project / "tiny.py:another_writer", "-o", out, "--report-json", report,
                               "--force")
    assert code == 1 and f"error: cannot write {report}: Is a directory" == error_line(code, output), output
    assert out.read_bytes() == b"previous result"
    assert staging_left(project) == []


def test_output_plan_takes_back_placed_outputs_in_the_library(tmp_path):
    from bncal.errors import BncalError
    from bncal.outputs import OutputPlan, write_text

    plan = OutputPlan()
    first, second = plan.add(tmp_path / "1.txt", "-o"), plan.add(tmp_path / "2.txt", "--report-json")
    plan.check()
    with pytest.raises(BncalError, match=r"--report-json .*2\.txt was created at .* by another process"):
        with plan:
            write_text(first, "one")
            write_text(second, "two")
            (tmp_path / "2.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.txt"]
    assert (tmp_path / "2.txt").read_text() == "theirs"


def test_a_directory_that_refuses_the_commit_takes_back_the_placed_outputs(tmp_path, monkeypatch):
    """The issue's case: b/ made unwritable during the run. Root ignores permissions, so the file
    system's refusal is played by os.link (and by rmdir, which leaves the emptied folder)."""
    import errno
    import shutil

    from bncal.errors import BncalError
    from bncal.outputs import OutputPlan, write_text

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plan = OutputPlan()
    first, second = plan.add(tmp_path / "a" / "out.txt", "-o"), plan.add(tmp_path / "b" / "r.json", "--report-json")
    plan.check()
    real_link, real_rmdir = os.link, os.rmdir

    def refuse_in_b(call):
        def refused(path, *args, **kwargs):
            if Path(path).parent == tmp_path / "b" or Path(args[0] if args else "").parent == tmp_path / "b":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return call(path, *args, **kwargs)
        return refused

    with pytest.raises(BncalError) as caught:
        with plan:
            write_text(first, "one")
            write_text(second, "two")
            monkeypatch.setattr(os, "link", refuse_in_b(real_link))
            monkeypatch.setattr(os, "rmdir", refuse_in_b(real_rmdir))
    message = str(caught.value)
    assert message.startswith(f"cannot write {second}: Permission denied; the temporary folder {tmp_path / 'b'}/.bncal-")
    assert message.endswith("could not be removed either (its directory is not writable now): remove it by hand")
    assert list((tmp_path / "a").iterdir()) == []  # -o was placed first and taken back
    monkeypatch.undo()
    left = list((tmp_path / "b").iterdir())
    assert len(left) == 1 and list(left[0].iterdir()) == []  # emptied; only the folder itself stayed
    shutil.rmtree(left[0])


def test_a_rank_killed_under_torchrun_leaves_no_staging_folder(project):
    from tests_support import torchrun_command

    before = snapshot(project)
    result = subprocess.run(torchrun_command(2) + ["-m", "bncal", "recalibrate", str(project / "tiny.py:build"), "--weights",
                                                   str(project / "w.safetensors"), "--data",
                                                   str(project / "tiny.py:rank1_killed"), "-o",
                                                   str(project / "out.safetensors")],
                            capture_output=True, text=True, timeout=240, env={**_subprocess_env(), "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "SIGKILL" in result.stderr or "Signal 9" in result.stderr, result.stderr[-3000:]
    assert snapshot(project) == before, result.stderr[-3000:]


def test_sighup_removes_the_staging_folders_like_sigterm(tmp_path):
    from bncal.outputs import OutputPlan, Terminated, terminate_on_sigterm, write_text

    def unhandled(signum, frame):  # instead of the default action, which would end the test run
        raise AssertionError("SIGHUP reached the process's own handler: bncal did not catch it")

    plan = OutputPlan()
    plan.add(tmp_path / "out.txt", "-o")
    previous = signal.signal(signal.SIGHUP, unhandled)
    try:
        with pytest.raises(Terminated) as caught:
            with terminate_on_sigterm(), plan:
                write_text(tmp_path / "out.txt", "half")
                assert staging_left(tmp_path)
                os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert caught.value.signal_name == "SIGHUP" and caught.value.signum == signal.SIGHUP
    assert list(tmp_path.iterdir()) == []


# 3. Images at their own bit depth ---------------------------------------------------------------

def _png(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written byte by byte (Pillow writes no 16-bit colour): ``pixels`` (H, W, C)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _read_folder(folder, **options):
    from bncal.data import ImageOptions, load_data

    return np.concatenate(list(load_data(folder, shuffle=False, image_options=ImageOptions(**options))))


def test_images_are_read_at_their_own_bit_depth(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65536, (6, 8), dtype=np.uint16)
    gray16[0, 0], gray16[0, 1] = 0, 65535
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    bits = rng.integers(0, 2, (6, 8)).astype(bool)
    cases = {  # file -> (how to write it, expected RGB in [0, 1] as float64)
        "gray16.png": (lambda p: Image.fromarray(gray16).save(p), np.repeat(gray16[None] / 65535.0, 3, 0)),
        "gray16.tif": (lambda p: Image.fromarray(gray16).save(p), np.repeat(gray16[None] / 65535.0, 3, 0)),
        "rgb.png": (lambda p: Image.fromarray(rgb).save(p), rgb.transpose(2, 0, 1) / 255.0),
        "rgba.png": (lambda p: Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(p), rgb.transpose(2, 0, 1) / 255.0),
        "gray_alpha.png": (lambda p: Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(p),
                           np.repeat(rgb[None, ..., 0] / 255.0, 3, 0)),
        "bilevel.png": (lambda p: Image.fromarray(bits).save(p), np.repeat(bits[None].astype(float), 3, 0)),
    }
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    looked_up = np.asarray(palette.convert("RGB")).transpose(2, 0, 1) / 255.0
    cases["palette.png"] = (lambda p: palette.save(p, transparency=3), looked_up)
    for name, (write, expected) in cases.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        write(folder / name)
        got = _read_folder(folder)[0]
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).max() < 1e-6, name
    # One channel: 16-bit gray exactly; 8-bit RGB by Pillow's ITU-R 601-2 luma.
    assert np.abs(_read_folder(tmp_path / "gray16_png", channels=1)[0, 0] - gray16 / 65535.0).max() < 1e-6
    luma = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    assert np.abs(_read_folder(tmp_path / "rgb_png", channels=1)[0, 0] - luma).max() < 1e-6
    # Resized in floating point: the mean of a constant 16-bit image stays exact.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.full((6, 8), 40000, np.uint16)).save(flat / "f.png")
    assert np.allclose(_read_folder(flat, size=(3, 4)), 40000 / 65535.0, atol=1e-6)


def test_images_bncal_cannot_read_exactly_are_refused_by_name(tmp_path):
    from PIL import Image

    from bncal.errors import BncalError

    rng = np.random.default_rng(2)
    writers = {
        "rgb16.png": (lambda p: _png(p, rng.integers(0, 65536, (4, 4, 3)), 2), "is 16-bit RGB (PNG)"),
        "rgba16.png": (lambda p: _png(p, rng.integers(0, 65536, (4, 4, 4)), 6), "is 16-bit RGBA (PNG)"),
        "gray_alpha16.png": (lambda p: _png(p, rng.integers(0, 65536, (4, 4, 2)), 4), "is 16-bit LA (PNG)"),
        "float.tif": (lambda p: Image.fromarray(np.ones((4, 4), np.float32)).save(p), "is mode F: 32-bit floating-point"),
        "int32.tif": (lambda p: Image.fromarray(np.ones((4, 4), np.int32)).save(p), "is mode I: 32-bit integer"),
        "cmyk.tif": (lambda p: Image.new("CMYK", (4, 4)).save(p), "is mode CMYK"),
    }
    for name, (write, words) in writers.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        write(folder / name)
        with pytest.raises(BncalError) as caught:
            _read_folder(folder)
        message = str(caught.value)
        assert message.startswith(f"image {folder / name} {words}"), message
        assert "convert it to 8-bit RGB/grayscale or 16-bit grayscale PNG" in message


def test_a_16_bit_folder_recalibrates_with_its_real_statistics(tmp_path):
    """The issue's case: 16-bit PNGs once read saturated (99 % of pixels 1.0). Through the CLI, the
    recalibrated running mean of a BN right after the input is the pixels' own mean."""
    from PIL import Image
    from safetensors.numpy import load_file

    rng = np.random.default_rng(3)
    (tmp_path / "imgs").mkdir()
    pixels = rng.integers(0, 20000, (4, 8, 8), dtype=np.uint16)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "net.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.BatchNorm2d(1))\n")
    code, output = run("recalibrate", tmp_path / "net.py:build", "--data", tmp_path / "imgs", "--channels", "1",
                       "-o", tmp_path / "out.safetensors", "-q")
    assert code == 0, output
    mean = load_file(str(tmp_path / "out.safetensors"))["0.running_mean"]
    assert abs(float(mean[0]) - pixels.astype(np.float64).mean() / 65535.0) < 1e-6


# 4. Symlinked class folders and files -----------------------------------------------------------

def _class_folders(root: Path) -> Path:
    from PIL import Image

    for name, value in (("a", 10), ("b", 200)):
        (root / "store" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((4, 4, 3), value + i, np.uint8)).save(root / "store" / name / f"{i}.png")
    (root / "imgs").mkdir()
    (root / "imgs" / "a").mkdir()
    for i in range(4):
        (root / "imgs" / "a" / f"{i}.png").symlink_to(root / "store" / "a" / f"{i}.png")  # symlinked files
    (root / "imgs" / "b").symlink_to(Path("..") / "store" / "b")  # a symlinked class folder
    return root / "imgs"


def test_symlinked_class_folders_and_files_are_followed(tmp_path):
    imgs = _class_folders(tmp_path)
    values = sorted(float(v) for v in _read_folder(imgs)[:, 0, 0, 0] * 255)
    assert values == pytest.approx([10, 11, 12, 13, 200, 201, 202, 203])
    # A data file reached through the link is an input: no output may overwrite it.
    (tmp_path / "net.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.BatchNorm2d(3))\n")
    code, output = run("check", tmp_path / "net.py:build", "--data", imgs, "--plot", tmp_path / "store" / "b" / "0.png",
                       "--force")
    assert code == 1 and "is also an input of this run" in error_line(code, output), output


def test_a_loop_of_links_and_a_broken_link_are_refused_by_name(tmp_path):
    from bncal.errors import BncalError

    imgs = _class_folders(tmp_path)
    (tmp_path / "store" / "b" / "up").symlink_to(Path(".."))
    with pytest.raises(BncalError, match=r"links back to .*store.*, a folder it is inside \(a loop\); remove the link"):
        _read_folder(imgs)
    (tmp_path / "store" / "b" / "up").unlink()
    (imgs / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(BncalError, match=r"gone\.png is a link to .*nowhere\.png, which does not exist"):
        _read_folder(imgs)


# 5. A malformed shape is a usage error ----------------------------------------------------------

@pytest.mark.parametrize("shape", ["input:[2,1,28", "input:2,1,28]", "input:[2,1,28)", "input:[[2,1,28]]"])
def test_malformed_input_shapes_are_usage_errors(project, shape):
    code, output = run("fold-export", project / "tiny.py:build", "--input-shapes", shape, "-o", project / "o.onnx")
    assert code == 2, output
    assert "brackets" in error_line(code, output) and "input:[1,3,224,224]" in output


# 6. Messages that name the problem and the fix --------------------------------------------------

def _write_keras_lookalikes(d: Path) -> None:
    (d / "empty.keras").write_bytes(b"")
    (d / "text.keras").write_text("not a model\n")
    (d / "legacy.keras").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    import zipfile

    with zipfile.ZipFile(d / "whole.zip", "w") as archive:
        archive.writestr("config.json", "{}" * 200)
    (d / "cut.keras").write_bytes((d / "whole.zip").read_bytes()[:-30])


def _write_onnx_lookalikes(d: Path) -> None:
    import onnx
    from onnx import helper, numpy_helper

    (d / "tensor.onnx").write_bytes(numpy_helper.from_array(np.ones((2, 3), np.float32), "x").SerializeToString())
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.ones(4000, np.float32), "w")])
    whole = helper.make_model(graph).SerializeToString()
    (d / "cut.onnx").write_bytes(whole[:len(whole) // 2])
    (d / "empty.onnx").write_bytes(b"")
    (d / "notes.onnx").write_text("model goes here\n")
    (d / "image.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))


MESSAGES = [
    # (id, argv, setup, exit status, the line's words)
    ("keras-empty", ["inspect", "{d}/empty.keras"], _write_keras_lookalikes, 1,
     "{d}/empty.keras is empty (0 bytes); was the save interrupted? Save the model again"),
    ("keras-text", ["inspect", "{d}/text.keras"], _write_keras_lookalikes, 1,
     "{d}/text.keras is not a .keras file: a .keras file is a zip archive"),
    ("keras-cut-zip", ["inspect", "{d}/cut.keras"], _write_keras_lookalikes, 1,
     "{d}/cut.keras is not a .keras file: a .keras file is a zip archive and this one"),
    ("keras-hdf5", ["inspect", "{d}/legacy.keras"], _write_keras_lookalikes, 1,
     "{d}/legacy.keras is an HDF5 file (the legacy .h5 format) named .keras; re-save it"),
    ("onnx-tensorproto", ["inspect", "{d}/tensor.onnx"], _write_onnx_lookalikes, 1,
     "{d}/tensor.onnx is not an ONNX model: it is a serialized TensorProto (one tensor 'x' of shape 2x3"),
    ("onnx-truncated", ["inspect", "{d}/cut.onnx"], _write_onnx_lookalikes, 1,
     "{d}/cut.onnx is not an ONNX model: it starts as one but ends early or is damaged"),
    ("onnx-empty", ["inspect", "{d}/empty.onnx"], _write_onnx_lookalikes, 1,
     "{d}/empty.onnx is not an ONNX model: it is empty (0 bytes); export or download it again"),
    ("onnx-text", ["inspect", "{d}/notes.onnx"], _write_onnx_lookalikes, 1,
     "{d}/notes.onnx is not an ONNX model: it is a text file; give the .onnx model file"),
    ("onnx-png", ["inspect", "{d}/image.onnx"], _write_onnx_lookalikes, 1,
     "{d}/image.onnx is not an ONNX model: it is a PNG image; give the .onnx model file"),
    ("inputs-minus-1-labels", ["recalibrate", "{d}/tiny.py:build", "--data", "{d}/tiny.py:labelled", "--inputs", "-1",
                               "-o", "{d}/out.safetensors"], None, 1,
     "--inputs -1 picks position 1 (counted from the end) of batch 0, one integer per sample: that looks like class "
     "labels, while position 0 holds floating-point data; give --inputs 0"),
    ("inputs-1-labels", ["recalibrate", "{d}/tiny.py:build", "--data", "{d}/tiny.py:labelled", "--inputs", "1",
                         "-o", "{d}/out.safetensors"], None, 1, "--inputs 1 picks position 1 of batch 0"),
    ("forward-none", ["fold-export", "{d}/tiny.py:no_output", "--input-shape", "2,3,8,8", "--allow", "BN001", "-o",
                      "{d}/o.onnx"], None, 1,
     "the model's forward returned None, so there is nothing to export or compare; return the output tensor(s)"),
    ("forward-tuple-none", ["fold-export", "{d}/tiny.py:half_output", "--input-shape", "2,3,8,8", "--allow", "BN001",
                            "-o", "{d}/o.onnx"],
     None, 1, "the model's forward returned a tuple holding None at [1]; an exported graph's outputs are tensors"),
    ("check-forward-none", ["check", "{d}/tiny.py:half_output", "--data", "{d}/data.npy"], None, 1,
     "the model's forward returned a tuple holding None at [1]"),
    ("data-sys-exit", ["recalibrate", "{d}/tiny.py:build", "--data", "{d}/tiny.py:exits", "-o", "{d}/out.safetensors"],
     None, 1, "the data function {d}/tiny.py:exits called sys.exit(3); a data function returns (or yields) batches: "
              "raise an exception to report a problem"),
]


@pytest.mark.parametrize("case", MESSAGES, ids=[c[0] for c in MESSAGES])
def test_message_names_the_problem_and_the_fix(project, case):
    name, argv, setup, expected_code, words = case
    if setup:
        setup(project)
    line = run_refused(project, argv, expected_code, words)
    assert "(run with -v" not in line or name.startswith("data"), line


def test_negative_positions_count_from_the_end(project):
    from bncal.data import select_batch

    batch = (np.zeros((4, 3), np.float32), np.ones((4, 2), np.float32), np.arange(4))
    assert select_batch(batch, (-2,)) is batch[1]
    assert select_batch(batch, (0, -2)) == (batch[0], batch[1])


def test_ctrl_c_while_starting_is_one_error_line(project, monkeypatch):
    import bncal.distributed

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bncal.distributed, "environment", interrupted)
    code, output = recalibrate(project, "--data", project / "data.npy", "-o", project / "out.safetensors")
    assert code == 1
    assert error_line(code, output) == "error: interrupted while starting; nothing was written"
    assert "Aborted!" not in output


def test_sys_exit_in_a_model_factory_names_where(project):
    (project / "quits.py").write_text("import sys\ndef build():\n    sys.exit(4)\n")
    code, output = run("inspect", project / "quits.py:build")
    assert code == 1
    assert error_line(code, output).startswith(f"error: {project / 'quits.py'}:3 (build) called sys.exit(4); nothing "
                                               "was written: that code should return its result")


def test_a_full_disk_while_spilling_names_the_spill_directory(tmp_path):
    """A real failed write (a file-size limit, EFBIG), where torch's writer says "[enforce fail ...]"."""
    import resource

    import torch

    from bncal.torch.sweep_cache import Checkpoints
    from bncal.errors import BncalError

    checkpoints = Checkpoints(0, tmp_path, "cpu")  # no memory budget: every checkpoint goes to disk
    checkpoints.add(8, 0.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # smaller than the 8 KiB being spilled
    try:
        with pytest.raises(BncalError) as caught:
            checkpoints.store(0, 1, [torch.zeros(8, 4, 8, 8)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        checkpoints.close()
    assert str(caught.value).startswith(f"cannot spill the sweep's activations to the spill directory {tmp_path} ("), caught.value
    assert str(caught.value).endswith("free space there, give another --spill-dir (spill_dir=), or raise --cache-mb "
                                      "(cache_mb=)")
    assert checkpoints.step[0] == -1 and list(tmp_path.iterdir()) == []
