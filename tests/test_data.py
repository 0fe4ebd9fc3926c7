"""Data specs: .npy, .npz by input name, image folders, user functions, rank shards."""

import numpy as np
import pytest
from PIL import Image

from bncal.data import ImageOptions, load_data
from bncal.errors import BncalError


def test_npy_batches_cover_every_sample_once_and_shard_by_rank(tmp_path):
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "x.npy", x)
    batches = list(load_data(tmp_path / "x.npy", batch_size=4, shuffle=False))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), x)
    shards = [np.concatenate(list(load_data(tmp_path / "x.npy", batch_size=3, rank=r, world_size=3, shuffle=False)))
              for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), x)  # contiguous, disjoint, complete


def test_npz_gives_dicts_by_input_name(tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((5, 2), np.float32), mask=np.ones((5, 1), np.int64))
    batch = next(iter(load_data(tmp_path / "d.npz", batch_size=5)))
    assert set(batch) == {"image", "mask"} and batch["mask"].dtype == np.int64
    np.savez(tmp_path / "bad.npz", a=np.zeros((5, 2)), b=np.zeros((4, 2)))
    with pytest.raises(BncalError, match="differ in length"):
        load_data(tmp_path / "bad.npz")


def test_image_folder_resized_and_normalised(tmp_path):
    rng = np.random.default_rng(0)
    pixels = []
    for i in range(3):
        array = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        pixels.append(array)
        Image.fromarray(array).save(tmp_path / f"img{i}.png")
    options = ImageOptions(size=None, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch = next(iter(load_data(tmp_path, batch_size=8, image_options=options, shuffle=False)))
    assert batch.shape == (3, 3, 6, 8)
    expected = (pixels[0].transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(batch[0], expected, rtol=1e-6, atol=1e-6)
    resized = next(iter(load_data(tmp_path, batch_size=8, image_options=ImageOptions(size=(4, 4), channels=1))))
    assert resized.shape == (3, 1, 4, 4)


def test_function_spec_gets_batch_size(tmp_path):
    (tmp_path / "feed.py").write_text("import numpy as np\n"
                                      "def batches(batch_size=2):\n"
                                      "    return [np.full((batch_size, 1), i, np.float32) for i in range(5)]\n")
    data = load_data(f"{tmp_path / 'feed.py'}:batches", batch_size=3)
    assert [b.shape[0] for b in data] == [3] * 5
    odd = load_data(f"{tmp_path / 'feed.py'}:batches", batch_size=3, rank=1, world_size=2)
    assert [float(b[0, 0]) for b in odd] == [1.0, 3.0]


@pytest.mark.parametrize("spec,match", [("missing.npy", "does not exist"), ("nofile.py:f", "does not exist"),
                                        ("data.txt", "does not exist")])
def test_bad_specs(tmp_path, spec, match):
    with pytest.raises(BncalError, match=match):
        load_data(tmp_path / spec if ":" not in spec else str(tmp_path / spec))


# ------------------------------------------------------------------------------------------------
# Order: file data is shuffled with a fixed seed, batch by batch from the permuted index


def test_file_data_is_shuffled_by_a_seeded_permutation_read_sorted_per_batch(tmp_path):
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "x.npy", x)
    order = np.random.default_rng(7).permutation(10)
    data = load_data(tmp_path / "x.npy", batch_size=4, seed=7)
    batches = list(data)
    assert [len(b) for b in batches] == [4, 4, 2]
    for batch, rows in zip(batches, (order[:4], order[4:8], order[8:])):
        np.testing.assert_array_equal(batch, x[np.sort(rows)])  # memory-mapped rows read in sorted order
    assert all(np.array_equal(a, b) for a, b in zip(batches, data))  # the same order on every pass
    assert "shuffled with seed 7" in data.description and "batches of 4" in data.description
    shards = [np.concatenate(list(load_data(tmp_path / "x.npy", batch_size=2, rank=r, world_size=3, seed=7)))
              for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)[:, 0]), x[:, 0])  # disjoint and complete
    default, order = list(load_data(tmp_path / "x.npy", batch_size=5)), np.random.default_rng(0).permutation(10)
    np.testing.assert_array_equal(np.concatenate(default), x[np.concatenate([np.sort(order[:5]), np.sort(order[5:])])])


def test_npz_inputs_pick_arrays_by_name_and_mnist5k_works_as_shipped():
    from models import zoo

    data = load_data(zoo.MNIST_NPZ, inputs="images", normalize=True, shuffle=False, batch_size=1000,
                     image_options=ImageOptions(preset="mnist", channels=1))
    first = next(iter(data))
    expected, _ = zoo.mnist_arrays("all")
    assert first.dtype == np.float32 and first.shape == (1000, 1, 28, 28)
    np.testing.assert_allclose(first, expected.numpy()[:1000], rtol=0, atol=2e-6)
    assert "arrays images" in data.description
    with pytest.raises(BncalError, match=r"differ in length.*--inputs NAME"):
        load_data(zoo.MNIST_NPZ)
    with pytest.raises(BncalError, match="pick them by name, e.g. --inputs images"):
        load_data(zoo.MNIST_NPZ, inputs=0)
    with pytest.raises(BncalError, match="holds no array 'x'; it holds images, labels, calib_idx, test_idx"):
        load_data(zoo.MNIST_NPZ, inputs="x")
    with pytest.raises(BncalError, match="--normalize scales uint8/uint16 pixel arrays"):
        load_data(zoo.MNIST_NPZ, inputs="calib_idx", normalize=True)
    raw = next(iter(load_data(zoo.MNIST_NPZ, inputs="images")))
    assert raw.dtype == np.uint8  # without --normalize arrays are passed as they are


def test_npz_with_labels_gives_the_chosen_inputs(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((6, 2), np.float32), y=np.arange(6), meta=np.zeros((6, 3), np.float32))
    assert next(iter(load_data(tmp_path / "d.npz", inputs="x"))).shape == (6, 2)
    both = next(iter(load_data(tmp_path / "d.npz", inputs=["meta", "x"])))
    assert list(both) == ["meta", "x"]


# ------------------------------------------------------------------------------------------------
# Image folders


def _gradient(h, w):
    """An RGB image whose red channel is the column index and green the row index."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.arange(w)[None, :]
    image[..., 1] = np.arange(h)[:, None]
    return image


def test_image_folder_with_class_subfolders_resize_crop_and_preset(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.fromarray(_gradient(40, 60)).save(tmp_path / label / "a.jpg", quality=100)
        Image.fromarray(_gradient(40, 60)).save(tmp_path / label / "b.PNG")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(_gradient(5, 5)).save(tmp_path / ".hidden" / "skip.png")
    (tmp_path / "notes.txt").write_text("not an image")
    # Shorter side 20 (so 20 x 30), then the central 10 x 16: rows 5..14, columns 7..22 of the resized image.
    options = ImageOptions(resize=20, crop=(10, 16), preset="imagenet")
    data = load_data(tmp_path, image_options=options, shuffle=False)
    batch = next(iter(data))
    assert batch.shape == (4, 3, 10, 16)
    assert "2 class subfolders, labels not used" in data.description and "preset imagenet" in data.description
    png = batch[1]  # cat/b.PNG, lossless
    red = png[0] * 0.229 + 0.485  # undo the preset: pixels / 255
    green = png[1] * 0.224 + 0.456
    # Downscaling 60 -> 30 columns by 2: resized column j covers source columns 2j, 2j + 1 (mean 2j + 0.5).
    np.testing.assert_allclose(red[0] * 255, 2 * np.arange(7, 23) + 0.5, atol=0.6)
    np.testing.assert_allclose(green[:, 0] * 255, 2 * np.arange(5, 15) + 0.5, atol=0.6)


def test_image_folder_refusals_name_the_file_and_the_option(tmp_path):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "a.png")
    Image.fromarray(_gradient(6, 8)).save(tmp_path / "b.png")
    with pytest.raises(BncalError, match=r"images differ in size.*--image-size H W, or --resize N with --crop H W"):
        list(load_data(tmp_path))
    with pytest.raises(BncalError, match=r"b.png is 6x8 pixels after resizing, smaller than --crop 7 7"):
        list(load_data(tmp_path, image_options=ImageOptions(crop=(7, 7)), shuffle=False))
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])  # truncated
    with pytest.raises(BncalError, match=r"cannot read image .*c.png: .*; remove or replace the file"):
        list(load_data(tmp_path, image_options=ImageOptions(size=(4, 4))))
    with pytest.raises(BncalError, match="give --preset imagenet or --mean/--std, not both"):
        ImageOptions(preset="imagenet", mean=(0.5,))
    with pytest.raises(BncalError, match="unknown normalisation preset 'cifar'"):
        ImageOptions(preset="cifar")
    with pytest.raises(BncalError, match="there are no inputs to pick; drop --inputs"):
        load_data(tmp_path, inputs=0)


# ------------------------------------------------------------------------------------------------
# Data functions: their own batching unless a batch size is given


def test_data_function_batches_as_it_likes_unless_given_a_batch_size(tmp_path):
    (tmp_path / "feed.py").write_text("import numpy as np\n"
                                      "def batches(batch_size=64):\n"
                                      "    return [np.zeros((batch_size, 1), np.float32)] * 3\n"
                                      "def fixed():\n"
                                      "    return [np.zeros((5, 1), np.float32)] * 2\n")
    own = load_data(f"{tmp_path / 'feed.py'}:batches")
    assert [len(b) for b in own] == [64] * 3
    assert own.description.endswith("its own batching (no batch size passed), batches of up to 64 samples, "
                                    "in the order it gives")
    given = load_data(f"{tmp_path / 'feed.py'}:batches", batch_size=16)
    assert [len(b) for b in given] == [16] * 3 and "called with batch_size=16" in given.description
    assert [len(b) for b in load_data(f"{tmp_path / 'feed.py'}:fixed")] == [5, 5]
    with pytest.raises(BncalError, match="takes no batch_size argument.*drop --batch-size"):
        load_data(f"{tmp_path / 'feed.py'}:fixed", batch_size=8)


# ------------------------------------------------------------------------------------------------
# Picking inputs, and hints for data that does not fit the model


def test_select_inputs_by_position_and_key_re_iterable():
    from bncal.data import select_inputs

    pairs = [(np.ones((2, 3)), np.array([0, 1])), (np.zeros((1, 3)), np.array([2]))]
    picked = select_inputs(pairs, 0)
    assert [b.shape for b in picked] == [(2, 3), (1, 3)] and len(picked) == 2
    assert [b.shape for b in picked] == [(2, 3), (1, 3)]  # a second pass
    dicts = [{"image": np.ones((2, 3)), "meta": np.ones((2, 1)), "label": np.zeros(2)}]
    assert list(next(iter(select_inputs(dicts, "meta,image")))) == ["meta", "image"]
    fresh = select_inputs(lambda: iter(pairs), [0, 1])
    assert len(list(fresh)) == len(list(fresh)) == 2  # a function returning batches is called per pass
    with pytest.raises(BncalError, match=r"batch 0 has keys \['image', 'meta', 'label'\], not 'x'"):
        list(select_inputs(dicts, "x"))
    with pytest.raises(BncalError, match=r"picked by position \(--inputs 0; library: inputs=0\), not by key 'x'"):
        list(select_inputs(pairs, "x"))
    with pytest.raises(BncalError, match="no position 2"):
        list(select_inputs(pairs, 2))
    assert select_inputs(pairs, None) is pairs


@pytest.mark.parametrize("batch,message,hint", [
    ((np.ones((4, 3)), np.arange(4)), "", "--inputs 0 (library: inputs=0)"),
    ((np.ones((4, 3)), np.ones((4, 2)), np.arange(4)), "", "--inputs 0,1 (library: inputs=(0,1))"),
    ((np.ones((4, 3)), np.ones(4)), "", None),  # float second values are not labels
    ({"x": np.ones((4, 3)), "y": np.arange(4)}, "forward() got an unexpected keyword argument 'y'", "--inputs KEY"),
    (np.zeros((2, 1, 4, 4), np.uint8), "Input type (unsigned char) and bias type (float) should be the same",
     "pass --normalize"),
    (np.zeros((2, 3, 4, 4), np.float32), "expected input[2, 3, 4, 4] to have 1 channels, but got 3 channels instead",
     "give --channels 1"),
])
def test_input_hints_name_the_option_that_fixes_the_data(batch, message, hint):
    from bncal.data import input_hint

    got = input_hint(batch, message)
    assert (hint in got) if hint else got == ""


def test_torch_labels_are_recognised():
    import torch

    from bncal.data import input_hint

    assert "--inputs 0" in input_hint((torch.ones(4, 3), torch.arange(4)))
    assert input_hint((torch.ones(4, 3), torch.arange(5))) == ""  # not one label per sample


# ------------------------------------------------------------------------------------------------
# Progress: the total number of batches, and the pass


def test_progress_bar_shows_the_total_and_the_pass(monkeypatch):
    import tqdm.auto

    from bncal.progress import DataPass, pass_label

    bars = []

    class Bar:
        def __init__(self, **kwargs):
            bars.append(kwargs)

        def update(self, n):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    data = [np.zeros((2, 1))] * 3
    list(DataPass(data, lambda b, i, r: (b, len(b)), progress=True, description=pass_label(2, 8)))
    list(DataPass(iter(data), lambda b, i, r: (b, len(b)), progress=True))
    assert bars[0]["total"] == 3 and bars[0]["desc"] == "pass 2 of at most 8"
    assert bars[1]["total"] is None and bars[1]["desc"] is None  # a generator has no length
    assert pass_label(1, 1) is None and pass_label(1, None) == "pass 1"


def test_eval_mode_progress_names_each_pass(monkeypatch):
    import torch

    import bncal

    labels = []
    monkeypatch.setattr("bncal.driver.DataPass.__init__", _recording_init(labels))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 2, 1),
                              torch.nn.BatchNorm2d(2))
    data = [torch.randn(4, 1, 3, 3) for _ in range(2)]
    # A custom forward_fn: no depth-by-depth sweep, eval mode runs its passes over the data.
    report = bncal.recalibrate(net, data, mode="eval", tol=0.0, max_passes=3, progress=lambda done: None,
                               forward_fn=lambda model, batch: model(batch))
    # From pass 3 on the label adds the overall estimate (the time of pass 2, times the passes left).
    assert report.passes == 3 and labels[:2] == ["pass 1 of at most 3", "pass 2 of at most 3"]
    assert labels[2].startswith("pass 3 of at most 3, ~") and labels[2].endswith(" s left")
    labels.clear()
    # The sweep is pass 1 (its own progress counts batch steps); the confirming eval pass is numbered, and
    # finds the sweep's statistics bit for bit (one moments kernel), so even tol=0 stops there.
    report = bncal.recalibrate(net, data, mode="eval", tol=0.0, max_passes=3, progress=lambda done: None)
    assert any("depth-by-depth sweep" in note for note in report.notes)
    assert report.passes == 2 and report.max_rel_change == 0 and labels[1:] == ["pass 2 of at most 3"]
    labels.clear()
    bncal.recalibrate(net, data, progress=lambda done: None)
    assert labels == [None]


def _recording_init(labels):
    from bncal.progress import DataPass

    original = DataPass.__init__

    def init(self, *args, description=None, **kwargs):
        labels.append(description)
        original(self, *args, description=description, **kwargs)
    return init
