"""The shipped example data and models under models/: data file, split, stale checkpoint, zoo."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402

BN = nn.modules.batchnorm._BatchNorm


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.fixture(scope="module")
def npz():
    with np.load(zoo.MNIST_NPZ) as d:
        return {k: d[k] for k in d.files}


def test_npz_shapes_and_dtypes(npz):
    assert set(npz) == {"images", "labels", "calib_idx", "test_idx"}
    assert npz["images"].shape == (5000, 1, 28, 28) and npz["images"].dtype == np.uint8
    assert npz["labels"].shape == (5000,) and npz["labels"].dtype == np.uint8
    assert npz["images"].max() == 255 and npz["images"].min() == 0
    assert np.array_equal(np.bincount(npz["labels"], minlength=10), np.full(10, 500))
    assert zoo.MNIST_NPZ.stat().st_size < 2_000_000


def test_split_disjoint_covering_stratified(npz):
    calib, test = npz["calib_idx"], npz["test_idx"]
    assert calib.dtype == np.int64 and test.dtype == np.int64
    assert calib.size == 4000 and test.size == 1000
    assert np.intersect1d(calib, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([calib, test])), np.arange(5000))
    assert np.array_equal(np.bincount(npz["labels"][calib], minlength=10), np.full(10, 400))
    assert np.array_equal(np.bincount(npz["labels"][test], minlength=10), np.full(10, 100))


def test_split_matches_generator():
    spec = importlib.util.spec_from_file_location("make_mnist_subset", ROOT / "tools" / "make_mnist_subset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with np.load(zoo.MNIST_NPZ) as d:
        calib, test = mod.stratified_split(d["labels"], mod.PER_CLASS_TEST, mod.SEED)
        assert np.array_equal(calib, d["calib_idx"]) and np.array_equal(test, d["test_idx"])


def test_mnist_helpers():
    x, y = zoo.mnist_arrays("test")
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (1000,) and y.dtype == torch.int64
    assert torch.isclose(x.min(), torch.tensor(-zoo.MNIST_MEAN / zoo.MNIST_STD))
    assert torch.isclose(x.max(), torch.tensor((1 - zoo.MNIST_MEAN) / zoo.MNIST_STD))
    batches = zoo.calibration_batches()
    assert [b.shape[0] for b in batches] == [128] * 31 + [32]
    assert all(b.shape[1:] == (1, 28, 28) and b.dtype == torch.float32 for b in batches)
    # shuffled: the first batch is not a single class (the file is sorted by class)
    _, yb = next(zoo.mnist_batches("calib", 128))
    assert len(torch.unique(yb)) == 10
    # same seed, same batches
    assert torch.equal(zoo.calibration_batches()[3], batches[3])
    with pytest.raises(ValueError):
        zoo.mnist_arrays("validation")


def test_stale_checkpoint_loads_strict_with_never_updated_stats():
    from safetensors.torch import load_file

    state = load_file(str(zoo.MNIST_STALE_CKPT))
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    model = zoo.mnist_cnn()
    model.load_state_dict(state, strict=True)
    bns = [m for m in model.modules() if isinstance(m, BN)]
    assert len(bns) == 7
    for bn in bns:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0
        # the affine parameters were trained
        assert not torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert zoo.MNIST_STALE_CKPT.stat().st_size < 500_000
    assert not zoo.mnist_cnn_stale().training


def test_mnist_cnn_has_dropout_before_bn1d():
    head = list(zoo.mnist_cnn()[1])
    kinds = [type(m) for m in head]
    i = kinds.index(nn.Dropout)
    assert kinds[i + 1] is nn.BatchNorm1d


@pytest.mark.parametrize(
    "factory, x_shape, out_shape, n_bn, n_conv",
    [
        (zoo.mnist_cnn, (2, 1, 28, 28), (2, 10), 7, 6),
        (zoo.resnet_small, (2, 3, 32, 32), (2, 10), 20, 20),
        (lambda: zoo.resnet_small(num_classes=5, in_channels=1, width=8), (2, 1, 16, 16), (2, 5), 20, 20),
        (lambda: zoo.resnet18_like(num_classes=7), (1, 3, 64, 64), (1, 7), 20, 20),
        (zoo.mobilenet_small, (2, 3, 32, 32), (2, 10), 22, 22),
        (lambda: zoo.mobilenet_small(num_classes=4, in_channels=1, width_mult=0.5), (2, 1, 28, 28), (2, 4), 22, 22),
    ],
)
def test_zoo_forward(factory, x_shape, out_shape, n_bn, n_conv):
    torch.manual_seed(0)
    model = factory()
    assert _count(model, BN) == n_bn
    assert _count(model, nn.Conv2d) == n_conv
    with torch.no_grad():
        assert model.eval()(torch.randn(x_shape)).shape == out_shape
        assert model.train()(torch.randn(x_shape)).shape == out_shape


def test_resnet18_like_matches_torchvision_layout():
    model = zoo.resnet18_like()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision resnet18
    keys = model.state_dict().keys()
    assert "layer2.0.downsample.1.running_var" in keys and "fc.weight" in keys


def test_mobilenet_has_depthwise_convs_and_residuals():
    model = zoo.mobilenet_small()
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 7 and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert sum(m.use_res for m in model.modules() if isinstance(m, zoo.InvertedResidual)) == 3


def test_file_spec_import():
    spec = importlib.util.spec_from_file_location("zoo_by_path", ROOT / "models" / "zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.MNIST_NPZ == zoo.MNIST_NPZ
    assert len(mod.calibration_batches(batch_size=1000)) == 4
