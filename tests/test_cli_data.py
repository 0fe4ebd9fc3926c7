"""Data as users have it, on every command: (inputs, labels) loaders, .npz with labels, multi-input
dict batches in any key order, a data function's own batch size, and the hints for data that does
not fit the model."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import bncal
from bncal.cli import main

SOURCE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn_meta = nn.Linear(5, 4), nn.BatchNorm1d(4)
        self.head = nn.Linear(8, 3)

    def forward(self, image, meta):
        a = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        b = torch.relu(self.bn_meta(self.fc(meta)))
        return self.head(torch.cat([a, b], 1))


def two_inputs():
    torch.manual_seed(0)
    return TwoInputs()


def _pairs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 3, (96,), generator=g)


def loader(batch_size=16):
    """A DataLoader of (images, labels), as training code has it."""
    x, y = _pairs()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


def _dicts(keys):
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(6):
        values = {"image": torch.randn(16, 3, 8, 8, generator=g), "meta": torch.randn(16, 5, generator=g) + 3}
        batches.append({k: values[k] for k in keys})
    return batches


def image_first():
    return _dicts(["image", "meta"])


def meta_first():
    return _dicts(["meta", "image"])
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_cli")
    (root / "tiny.py").write_text(SOURCE)
    namespace: dict = {}
    exec(compile(SOURCE, str(root / "tiny.py"), "exec"), namespace)
    save_file(namespace["build"]().state_dict(), str(root / "w.safetensors"))
    save_file(namespace["two_inputs"]().state_dict(), str(root / "w2.safetensors"))
    x, y = namespace["_pairs"]()
    np.savez(root / "xy.npz", x=x.numpy(), y=y.numpy())
    np.save(root / "u8.npy", np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8))
    (root / "rgb").mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "rgb" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny():
    """The project's functions, in this process."""
    namespace: dict = {}
    exec(compile(SOURCE, "tiny.py", "exec"), namespace)
    return namespace


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_dataloader_of_inputs_and_labels_needs_inputs_0_and_then_works_everywhere(project, tiny, tmp_path):
    spec, weights, data = f"{project}/tiny.py:build", project / "w.safetensors", f"{project}/tiny.py:loader"
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", data, "-o", tmp_path / "a.safetensors")
    assert code == 1
    line = _error(err)
    assert "forward() takes 2 positional arguments but 3 were given" in line
    assert "the batch looks like (inputs, labels): give the inputs only, with --inputs 0" in line
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", data, "--inputs", "0",
                         "-o", tmp_path / "a.safetensors", "--report-json", tmp_path / "a.json")
    assert code == 0, err
    # The loader's own batch size (16) is kept: 96 samples in 6 batches, and the report says so.
    assert "from 96 samples in 6 batches" in out
    note = json.loads((tmp_path / "a.json").read_text())["notes"][-1]
    assert note.endswith("its own batching (no batch size passed), batches of up to 16 samples, in the order it "
                         "gives, inputs 0 of each batch")
    # The same as the library's selector beside forward_fn.
    model = tiny["build"]()
    bncal.recalibrate(model, tiny["loader"](), inputs=0)
    written = load_file(str(tmp_path / "a.safetensors"))
    torch.testing.assert_close(written["1.running_var"], model[1].running_var, rtol=1e-6, atol=1e-7)
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", data, "--inputs", "0", "--batch-size", 32,
                         "-o", tmp_path / "b.safetensors")
    assert code == 0 and "in 3 batches" in out, err  # given: passed to the loader function
    fixed = tmp_path / "a.safetensors"
    for command in (["check", spec, "--weights", fixed], ["fold-export", spec, "--weights", fixed, "-o", tmp_path / "m.onnx"]):
        code, out, err = run(*command, "--data", data, "--inputs", "0")
        assert "error" not in err, err
        assert code in (0, 1) and "PASSED" in out


def test_npz_with_labels_works_with_inputs_on_every_command(project, tmp_path):
    spec, weights, data = f"{project}/tiny.py:build", project / "w.safetensors", project / "xy.npz"
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", data, "-o", tmp_path / "a.safetensors")
    assert code == 1 and "got an unexpected keyword argument" in err and "--inputs KEY" in err
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", data, "--inputs", "x",
                         "-o", tmp_path / "a.safetensors")
    assert code == 0, err
    fixed = tmp_path / "a.safetensors"
    code, out, err = run("fold-export", spec, "--weights", fixed, "--data", data, "--inputs", "x", "-o", tmp_path / "f.onnx")
    assert code == 0, err
    unfolded = bncal.export_onnx(bncal.load_model(spec, weights=fixed), (torch.randn(2, 3, 8, 8),), keep_batchnorm=True)
    onnx.save(unfolded, tmp_path / "m.onnx")
    for command in (["check", tmp_path / "m.onnx"], ["check", spec, "--weights", fixed],
                    ["recalibrate", tmp_path / "m.onnx", "-o", tmp_path / "r.onnx"]):
        code, out, err = run(*command, "--data", data)
        assert code == 1 and "--inputs KEY" in _error(err), err
        code, out, err = run(*command, "--data", data, "--inputs", "x")
        assert code == 0, out + err


def test_dict_batches_in_either_key_order_through_recalibrate_check_and_fold_export(project, tiny, tmp_path):
    spec, weights = f"{project}/tiny.py:two_inputs", project / "w2.safetensors"
    states = []
    for order in ("image_first", "meta_first"):
        data = f"{project}/tiny.py:{order}"
        out_path = tmp_path / f"{order}.safetensors"
        code, out, err = run("recalibrate", spec, "--weights", weights, "--data", data, "-o", out_path)
        assert code == 0, err
        states.append(load_file(str(out_path)))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    fixed = tmp_path / "image_first.safetensors"
    reports = []
    for order in ("image_first", "meta_first"):
        data = f"{project}/tiny.py:{order}"
        code, out, err = run("check", spec, "--weights", fixed, "--data", data, "--report-json", tmp_path / f"{order}.json",
                             "--min-top1-agreement", 0, "--max-output-rel-error", 10)
        assert code == 0, out + err
        reports.append(json.loads((tmp_path / f"{order}.json").read_text())["check"]["layers"])
        for names in ([], ["--input-names", "pixels,extra"]):
            onnx_out = tmp_path / f"{order}{len(names)}.onnx"
            code, out, err = run("fold-export", spec, "--weights", fixed, "--data", data, *names, "-o", onnx_out,
                                 "--no-check")
            assert code == 0, out + err
            assert [i.name for i in onnx.load(onnx_out).graph.input] == (["pixels", "extra"] if names else ["image", "meta"])
    assert reports[0] == reports[1]
    # The exported graph's inputs are named after forward(self, image, meta): ONNX recalibration and check
    # feed dict batches by name, whatever their key order.
    model = bncal.load_model(spec, weights=weights)
    example = tuple(tiny["image_first"]()[0].values())
    onnx.save(bncal.export_onnx(model, example, keep_batchnorm=True), tmp_path / "two.onnx")
    code, out, err = run("recalibrate", tmp_path / "two.onnx", "--data", f"{project}/tiny.py:meta_first",
                         "-o", tmp_path / "two_fixed.onnx")
    assert code == 0, err
    from onnx import numpy_helper

    stats = {numpy_helper.to_array(t).tobytes() for t in onnx.load(tmp_path / "two_fixed.onnx").graph.initializer}
    expected = states[0]["bn_meta.running_var"].numpy()
    assert any(np.allclose(np.frombuffer(s, np.float32)[:4], expected, rtol=1e-5) for s in stats if len(s) == 16)
    code, out, err = run("check", tmp_path / "two_fixed.onnx", "--data", f"{project}/tiny.py:image_first",
                         "--min-top1-agreement", 0, "--max-output-rel-error", 10)
    assert code == 0, out + err


def test_input_shapes_by_name_for_multi_input_models(project, tmp_path):
    spec, weights = f"{project}/tiny.py:two_inputs", project / "w2.safetensors"
    code, out, err = run("fold-export", spec, "--weights", weights, "--input-shapes", "meta:[2,5] image:[2,3,8,8]",
                         "-o", tmp_path / "n.onnx", "--allow", "BN001")  # fresh statistics: this test is about shapes
    assert code == 0, err
    assert [i.name for i in onnx.load(tmp_path / "n.onnx").graph.input] == ["image", "meta"]
    code, out, err = run("fold-export", tmp_path / "n.onnx", "--input-shapes", "meta:[3,5]", "--input-shapes",
                         "image:[3,3,8,8]", "-o", tmp_path / "n2.onnx", "--allow", "BN001")
    assert code == 0, err
    code, out, err = run("fold-export", tmp_path / "n.onnx", "--input-shapes", "meta:[3,5]", "-o", tmp_path / "n3.onnx",
                         "--allow", "BN001")
    assert code == 1 and "no shape for the model's input ['image']" in _error(err)
    code, out, err = run("inspect", spec, "--weights", weights, "--input-shapes", "picture:[2,3,8,8]")
    assert code == 1 and "names ['picture'], which the model does not have" in _error(err)
    code, out, err = run("inspect", spec, "--input-shape", "2,3,8,8", "--input-shapes", "meta:[2,5]")
    assert code == 2 and "not both" in err


def test_pixels_channels_and_image_options_name_their_fix(project, tmp_path):
    spec, weights = f"{project}/tiny.py:build", project / "w.safetensors"
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", project / "u8.npy", "-o", tmp_path / "a.pt")
    assert code == 1 and "pass --normalize" in _error(err)
    code, out, err = run("recalibrate", spec, "--weights", weights, "--data", project / "u8.npy", "--normalize",
                         "--mean", "0.5", "--std", "0.25", "-o", tmp_path / "a.pt")
    assert code == 0, err
    onnx.save(bncal.export_onnx(bncal.load_model(spec, weights=weights), (torch.randn(2, 3, 8, 8),), keep_batchnorm=True),
              tmp_path / "m.onnx")
    code, out, err = run("check", tmp_path / "m.onnx", "--data", project / "u8.npy")
    assert code == 1 and "expected dtype float32, got uint8" in err and "pass --normalize" in err
    gray = tmp_path / "gray.onnx"
    one = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    onnx.save(bncal.export_onnx(one, (torch.randn(2, 1, 8, 8),), keep_batchnorm=True), gray)
    code, out, err = run("check", gray, "--data", project / "rgb")
    assert code == 1 and "give --channels 1" in _error(err)
    code, out, err = run("check", gray, "--data", project / "rgb", "--channels", "1")
    assert "error" not in err, err
    code, out, err = run("check", tmp_path / "m.onnx", "--data", project / "u8.npy", "--mean", "0.5")
    assert code == 2 and "--mean applies to image folders, and --mean/--std/--preset to .npy/.npz pixels with --normalize" in err
    code, out, err = run("check", tmp_path / "m.onnx", "--data", f"{project}/tiny.py:loader", "--resize", "8")
    assert code == 2 and "--resize applies to image folders" in err


def test_shipped_mnist5k_npz_calibrates_as_shipped_with_inputs_and_normalize(tmp_path):
    from models import zoo

    spec, stale = str(zoo.HERE / "zoo.py") + ":mnist_cnn", zoo.MNIST_STALE_CKPT
    code, out, err = run("recalibrate", spec, "--weights", stale, "--data", zoo.MNIST_NPZ, "-o", tmp_path / "a.safetensors")
    assert code == 1 and "--inputs NAME" in _error(err)
    code, out, err = run("recalibrate", spec, "--weights", stale, "--data", zoo.MNIST_NPZ, "--inputs", "images",
                         "-o", tmp_path / "a.safetensors")
    assert code == 1 and "pass --normalize" in _error(err)  # uint8 pixels fed to a float model
    code, out, err = run("recalibrate", spec, "--weights", stale, "--data", zoo.MNIST_NPZ, "--inputs", "images",
                         "--normalize", "--preset", "mnist", "--no-shuffle", "--batch-size", 500,
                         "-o", tmp_path / "a.safetensors")
    assert code == 0, err
    assert "from 5000 samples in 10 batches" in out
    assert "far from random draws" in err  # the file is sorted by class: one class per batch, and it says so
    # The same statistics as the library on the same normalised pixels in the same batches (float64 reference).
    x, _ = zoo.mnist_arrays("all")
    model = zoo.mnist_cnn_stale()
    bncal.recalibrate(model, list(x.split(500)))
    written = load_file(str(tmp_path / "a.safetensors"))
    for name in ("0.1.running_mean", "0.1.running_var", "0.11.running_var", "1.3.running_mean", "1.3.running_var"):
        torch.testing.assert_close(written[name], model.state_dict()[name], rtol=1e-4, atol=1e-5)
