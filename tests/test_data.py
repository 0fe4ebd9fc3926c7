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
