"""Order never decides the result: class-ordered vs shuffled data, and the batch-composition test."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import bncal
from bncal.calibration import BatchComposition, order_warning
from bncal.cli import main
from bncal.data import TorchBatches, load_data
from models import zoo

MODEL = str(zoo.HERE / "zoo.py") + ":mnist_cnn"
STALE = str(zoo.MNIST_STALE_CKPT)
MNIST = dict(channels=1, mean=(zoo.MNIST_MEAN,), std=(zoo.MNIST_STD,))


def _anova_by_hand(batches):
    """The mean over channels of the one-way ANOVA F ratio of per-sample channel means, computed
    directly from its definition (float64, no merging)."""
    means = [np.asarray(b, np.float64).reshape(len(b), b.shape[1], -1).mean(-1) for b in batches]
    everything = np.concatenate(means)
    total, count = everything.mean(0), len(everything)
    between = sum(len(m) * (m.mean(0) - total) ** 2 for m in means) / (len(means) - 1)
    within = sum(((m - m.mean(0)) ** 2).sum(0) for m in means) / (count - len(means))
    return float(np.mean(between / within))


def test_batch_composition_is_the_anova_ratio_and_its_limit():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 4, 5)) + shift for n, shift in
               zip([7, 9, 4, 8, 8, 6, 5, 9, 3], [0, 0.2, -0.1, 0.5, 0, 0, 0.3, -0.4, 0.1])]
    composition = BatchComposition()
    for b in batches:
        composition.add(b.astype(np.float32))
    composition.add(np.zeros((4, 2), np.int64))  # integer inputs are not judged
    result = composition.result()
    assert result.statistic == pytest.approx(_anova_by_hand(batches), rel=1e-5)
    n, b = sum(len(x) for x in batches), len(batches)
    assert result.limit == pytest.approx(1 + BatchComposition.SPREAD * np.sqrt(2 / (b - 1) + 2 / (n - b)))
    assert result.batches == b
    torch_composition = BatchComposition()  # torch tensors give the same numbers
    for x in batches:
        torch_composition.add(torch.from_numpy(x.astype(np.float32)))
    assert torch_composition.result().statistic == pytest.approx(result.statistic, rel=1e-6)


def test_too_few_batches_or_single_samples_are_not_judged():
    few = BatchComposition()
    for _ in range(BatchComposition.MIN_BATCHES - 1):
        few.add(np.random.default_rng(0).standard_normal((4, 2)))
    assert few.result() is None and order_warning(few, "check") is None
    singles = BatchComposition()
    for i in range(20):
        singles.add(np.full((1, 2), float(i)))
    assert singles.result() is None


@pytest.fixture(scope="module")
def digits():
    """The 1000 held-out digits, class-ordered as in the file, and their labels."""
    x, y = zoo.mnist_arrays("test")
    return x.numpy(), y.numpy()


@pytest.mark.parametrize("batch_size", [8, 32, 128])
def test_shuffled_mnist_never_warns_and_class_ordered_mnist_always_does(digits, batch_size):
    x, _ = digits

    def result(rows):
        composition = BatchComposition()
        for lo in range(0, len(rows), batch_size):
            composition.add(x[rows[lo:lo + batch_size]])
        return composition.result()

    ordered = result(np.arange(len(x)))
    assert not ordered.exchangeable and ordered.statistic > 1.5 * ordered.limit
    rng = np.random.default_rng(1)
    shuffled = [result(rng.permutation(len(x))) for _ in range(20)]
    assert all(r.exchangeable and r.statistic < 0.75 * r.limit for r in shuffled)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits):
    """The held-out digits as PNGs: one subfolder per class (sorted path order is class order),
    and the same images under shuffled flat names."""
    root = tmp_path_factory.mktemp("folders")
    x, y = digits
    with np.load(zoo.MNIST_NPZ) as d:
        pixels = d["images"][d["test_idx"]]
    rank = np.random.default_rng(20240501).permutation(len(y))  # not bncal's own seeds: that would undo it
    for i, (image, label) in enumerate(zip(pixels, y)):
        (root / "ordered" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(root / "ordered" / str(label) / f"{i:04d}.png")
        (root / "shuffled").mkdir(exist_ok=True)
        Image.fromarray(image[0]).save(root / "shuffled" / f"{rank[i]:04d}.png")
    return root


def _statistics(folder, **options):
    model = zoo.mnist_cnn_stale()
    data = load_data(folder, image_options=bncal.data.ImageOptions(**MNIST), **options)
    report = bncal.recalibrate(model, TorchBatches(data))
    return report


def _gap(a, b) -> float:
    """The largest per-channel difference of two reports' statistics: mean shift in sd, |log var ratio|."""
    worst = 0.0
    for la, lb in zip(a.layers, b.layers):
        sd = np.sqrt(lb.after.var + 1e-5)
        worst = max(worst, float(np.max(np.abs(la.after.mean - lb.after.mean) / sd)),
                    float(np.max(np.abs(np.log((la.after.var + 1e-5) / (lb.after.var + 1e-5))))))
    return worst


def test_class_ordered_folder_gives_the_statistics_of_shuffled_images(folders):
    ordered = _statistics(folders / "ordered")
    shuffled = _statistics(folders / "shuffled")
    # The first BN sees the input through one conv only: its population statistics do not depend on order.
    np.testing.assert_allclose(ordered.layers[0].after.mean, shuffled.layers[0].after.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ordered.layers[0].after.var, shuffled.layers[0].after.var, rtol=1e-5)
    # Deeper train-mode statistics depend on the batches; the ordered folder's differ from the shuffled
    # images' by no more than other shuffles of the same images differ from each other.
    reshuffles = [_statistics(folders / "shuffled", seed=seed) for seed in (1, 2, 3)]
    spread = max(_gap(a, b) for a, b in [(shuffled, reshuffles[0]), (reshuffles[0], reshuffles[1]),
                                         (reshuffles[1], reshuffles[2])])
    assert _gap(ordered, shuffled) <= 2 * spread
    assert not ordered.warnings and not shuffled.warnings
    # In file order the same folder gives one-class batches: off by far more, and the report says why.
    in_file_order = _statistics(folders / "ordered", shuffle=False)
    assert _gap(in_file_order, shuffled) > 4 * spread
    assert len(in_file_order.warnings) == 1 and "far from random draws" in in_file_order.warnings[0]
    assert "--mode eval" in in_file_order.warnings[0]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_recalibrate_in_file_order_warns_on_stderr_and_reports_the_order(folders, tmp_path):
    image = ["--channels", "1", "--preset", "mnist"]
    code, out, err = run("recalibrate", MODEL, "--weights", STALE, "--data", folders / "ordered", *image, "--no-shuffle",
                         "-o", tmp_path / "a.safetensors", "--report-json", tmp_path / "a.json")
    assert code == 0, err
    assert err.startswith("warning: the calibration batches are far from random draws of the data (between-batch F = ")
    assert "shuffle it (bncal shuffles .npy/.npz/image folders unless --no-shuffle" in err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["warnings"] and "in file order, batches of 32" in report["notes"][-1]
    assert "10 class subfolders, labels not used" in report["notes"][-1]
    code, out, err = run("recalibrate", MODEL, "--weights", STALE, "--data", folders / "ordered", *image,
                         "-o", tmp_path / "b.safetensors")
    assert code == 0 and "warning" not in err, err
    assert "note: data: image folder" in out and "shuffled with seed 0 (--no-shuffle keeps file order)" in out


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    """The stale MNIST CNN recalibrated on the (shuffled) calibration split, and class-sorted held-out digits."""
    root = tmp_path_factory.mktemp("checked")
    model = zoo.mnist_cnn_stale()
    bncal.recalibrate(model, zoo.calibration_batches())
    bncal.save_state_dict(model, root / "fixed.safetensors")
    x, _ = zoo.mnist_arrays("test")
    np.save(root / "sorted.npy", x.numpy())
    return root


def test_check_on_class_ordered_data_warns_instead_of_blaming_the_statistics(recalibrated):
    weights, data = recalibrated / "fixed.safetensors", recalibrated / "sorted.npy"
    code, out, err = run("check", MODEL, "--weights", weights, "--data", data, "--no-shuffle")
    assert code == 1
    assert err.startswith("warning: the check's batches are far from random draws of the data")
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("FAILED: the batches are far from random draws") and "recalibrate" not in verdict
    assert "shuffle the data and check again" in verdict
    code, out, err = run("check", MODEL, "--weights", weights, "--data", data)  # the same file, shuffled by default
    assert code == 0 and "warning" not in err, out + err
    assert out.strip().splitlines()[-1] == "PASSED"


def test_check_still_blames_a_stale_first_layer_on_ordered_data(recalibrated):
    code, out, err = run("check", MODEL, "--weights", STALE, "--data", recalibrated / "sorted.npy", "--no-shuffle")
    assert code == 1 and "far from random draws" in err
    verdict = out.strip().splitlines()[-1]
    assert "1 of 7 BatchNorm layers have moving statistics off their data (worst 0.1" in verdict
    assert "shuffle the data and check again" in verdict


def test_check_verdict_on_batches_far_from_random_blames_only_the_first_layer():
    from bncal.checking import CheckReport, CheckThresholds, LayerCheck, OutputCheck

    def layer(name, passed):
        return LayerCheck(name, 4, 1000, 0.01 if passed else 2.0, 1.0, 0.2, 0.3, passed)

    t = CheckThresholds()
    warning = "the check's batches are far from random draws of the data"
    deep_fail = [layer("a", True), layer("b", False)]
    bad_output = [OutputCheck("out", 1.0, 0.9, 0.2, False)]
    plain = CheckReport.from_checks(deep_fail, bad_output, [], t, 8, 1000)
    assert not plain.passed and len(plain.reasons) == 2 and "recalibrate them" in plain.reasons[0]
    assert plain.summary().startswith("FAILED: 1 of 2 BN layers off their data")
    unjudged = CheckReport.from_checks(deep_fail, bad_output, [], t, 8, 1000, batching_warning=warning)
    assert not unjudged.passed and unjudged.warnings == [warning]
    assert unjudged.reasons == ["the batches are far from random draws of the data (see the warning), so train mode "
                                "on them cannot be compared with inference; shuffle the data and check again"]
    assert unjudged.summary() == "FAILED: batches far from random draws (1000 samples)"
    first_fail = CheckReport.from_checks([layer("a", False), layer("b", True)], [], [], t, 8, 1000,
                                         batching_warning=warning)
    assert not first_fail.passed and first_fail.reasons[0].startswith("1 of 2 BatchNorm layers")
    assert first_fail.summary() == "FAILED: batches far from random draws, first BN layer a off its data (1000 samples)"
    clean = CheckReport.from_checks([layer("a", True), layer("b", True)], [], [], t, 8, 1000, batching_warning=warning)
    assert clean.passed and clean.warnings == [warning]  # nothing failed: nothing to blame on the batches
