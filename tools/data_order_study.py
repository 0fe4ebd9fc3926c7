"""Does the order of calibration data decide the result? Class-ordered vs shuffled MNIST, via the CLI.

Builds, in a scratch folder, the shipped digits as users keep them: an image folder with one
subfolder per class (ImageFolder layout; sorted path order is class order), the same images
under shuffled file names, and class-sorted / shuffled ``.npy`` files. Then runs the ``bncal``
commands on them and reports:

- ``recalibrate`` (train mode) of the stale MNIST CNN from each folder: the head BN's (``1.3``)
  variance against the one from the shuffled folder (the ratio farthest from 1 over channels),
  and the first BN's largest mean difference;
- ``check`` of a correctly recalibrated model (``calibration_batches``, shuffled) on held-out
  digits from the ordered folder, the shuffled folder, the class-sorted ``.npy`` and the
  shuffled ``.npy``: verdict, top-1 agreement and any warning;
- the notes and warnings of each report, where this bncal gives them (the data read and its
  order; batches far from random draws).

Extra options for every command (``--no-shuffle`` on a bncal that shuffles) go after ``--``:

    python tools/data_order_study.py [--keep DIR] [-- EXTRA OPTIONS]

``--calibrate`` instead measures :class:`bncal.calibration.BatchComposition` on the digits
(numpy only, no model): for batch sizes 2 to 512 and the held-out (1000), calibration (4000)
and whole (5000) sets, the largest statistic over ``--shuffles`` random orders and the
smallest in class order, each as a fraction of the limit:

    python tools/data_order_study.py --calibrate [--shuffles 300]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def write_folders(out: Path, images: np.ndarray, labels: np.ndarray, seed: int = 20240501) -> tuple[Path, Path]:
    """``ordered/<class>/<i>.png`` and ``shuffled/<random rank>.png`` (the same pixels)."""
    from PIL import Image

    ordered, shuffled = out / "ordered", out / "shuffled"
    rank = np.random.default_rng(seed).permutation(len(images))
    for i, (pixels, label) in enumerate(zip(images, labels)):
        (ordered / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[0]).save(ordered / str(label) / f"{i:05d}.png")
        shuffled.mkdir(exist_ok=True)
        Image.fromarray(pixels[0]).save(shuffled / f"{rank[i]:05d}.png")
    return ordered, shuffled


def bncal(*args, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("bncal")
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True)


def head_ratio(a: dict, b: dict, layer: str) -> float:
    """``var_a / var_b`` of ``layer``, the per-channel ratio farthest from 1 (log scale)."""
    va = np.asarray(next(l for l in a["layers"] if l["name"] == layer)["after"]["var"])
    vb = np.asarray(next(l for l in b["layers"] if l["name"] == layer)["after"]["var"])
    ratio = (va + 1e-5) / (vb + 1e-5)
    return float(ratio[np.argmax(np.abs(np.log(ratio)))])


def first_mean_gap(a: dict, b: dict) -> float:
    la, lb = a["layers"][0], b["layers"][0]
    return float(np.max(np.abs(np.asarray(la["after"]["mean"]) - np.asarray(lb["after"]["mean"]))
                        / np.sqrt(np.asarray(lb["after"]["var"]) + 1e-5)))


def calibrate(shuffles: int) -> int:
    """Shuffled vs class-ordered MNIST through BatchComposition, as fractions of its limit."""
    sys.path.insert(0, str(ROOT))
    from bncal.calibration import BatchComposition

    with np.load(ROOT / "models" / "mnist5k.npz") as d:
        images, calib, test = d["images"], d["calib_idx"], d["test_idx"]
    x = ((images.astype(np.float32) / 255 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    sets = {"held-out": test, "calibration": calib, "all": np.arange(len(x))}

    def outcome(rows, batch_size):
        composition = BatchComposition()
        for lo in range(0, len(rows), batch_size):
            composition.add(x[rows[lo:lo + batch_size]])
        return composition.result()

    rng = np.random.default_rng(0)
    worst_shuffled, best_ordered = 0.0, float("inf")
    print(f"{'set':12s} {'batch':>5s} {'batches':>7s} {'limit':>6s} {'shuffled max F':>14s} {'(/limit)':>8s} "
          f"{'ordered F':>9s} {'(/limit)':>8s}")
    for name, rows in sets.items():
        for batch_size in (2, 4, 8, 16, 32, 64, 128, 256, 512):
            ordered = outcome(rows, batch_size)  # file order: sorted by class
            if ordered is None:
                continue
            shuffled = max(outcome(rng.permutation(rows), batch_size).statistic for _ in range(shuffles))
            worst_shuffled = max(worst_shuffled, shuffled / ordered.limit)
            best_ordered = min(best_ordered, ordered.statistic / ordered.limit)
            print(f"{name:12s} {batch_size:5d} {ordered.batches:7d} {ordered.limit:6.3g} {shuffled:14.3g} "
                  f"{shuffled / ordered.limit:8.3f} {ordered.statistic:9.3g} {ordered.statistic / ordered.limit:8.3f}")
    print(f"largest shuffled statistic: {worst_shuffled:.3f} of the limit; smallest class-ordered: {best_ordered:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the files here and keep them")
    parser.add_argument("--calibrate", action="store_true", help="measure the exchangeability statistic only")
    parser.add_argument("--shuffles", type=int, default=300, help="random orders per setting (--calibrate)")
    parser.add_argument("extra", nargs="*", help="options added to every command (after --)")
    options = parser.parse_args()
    if options.calibrate:
        return calibrate(options.shuffles)
    work = options.keep or Path(tempfile.mkdtemp(prefix="bncal-order-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "models").exists() or (work / "models").symlink_to(ROOT / "models", target_is_directory=True)
    with np.load(ROOT / "models" / "mnist5k.npz") as d:
        images, labels, calib, test = d["images"], d["labels"], d["calib_idx"], d["test_idx"]
    calib_ordered, calib_shuffled = write_folders(work / "calib", images[calib], labels[calib])
    test_ordered, test_shuffled = write_folders(work / "test", images[test], labels[test])
    normalised = ((images[test].astype(np.float32) / 255 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    np.save(work / "test_sorted.npy", normalised)
    np.save(work / "test_shuffled.npy", normalised[np.random.default_rng(1).permutation(len(test))])
    image_options = ["--channels", "1", "--mean", str(MNIST_MEAN), "--std", str(MNIST_STD)]
    extra = list(options.extra)
    model = ["models/zoo.py:mnist_cnn", "--weights", "models/mnist_cnn_stale.safetensors"]

    reports = {}
    for name, folder in (("ordered", calib_ordered), ("shuffled", calib_shuffled)):
        result = bncal("recalibrate", *model, "--data", folder, *image_options, *extra, "-o", f"recal_{name}.safetensors",
                       "--report-json", f"recal_{name}.json", "--force", "-q", cwd=work)
        if result.returncode:
            print(f"recalibrate from {name} folder failed: {result.stderr.strip()}")
            return 1
        reports[name] = json.loads((work / f"recal_{name}.json").read_text())
        for line in result.stderr.strip().splitlines():
            print(f"  recalibrate {name}: {line}")
    print(f"recalibrate (train mode), ordered vs shuffled folder: head BN 1.3 variance ratio "
          f"{head_ratio(reports['ordered'], reports['shuffled'], '1.3'):.3g}, first BN largest mean gap "
          f"{first_mean_gap(reports['ordered'], reports['shuffled']):.3g} sd")
    for name in reports:
        print(f"  {name}: notes {reports[name].get('notes', [])}; warnings {reports[name].get('warnings', [])}")

    fixed = bncal("recalibrate", *model, "--data", "models/zoo.py:calibration_batches", "-o", "fixed.safetensors",
                  "--force", "-q", cwd=work)
    if fixed.returncode:
        print(f"recalibrate from calibration_batches failed: {fixed.stderr.strip()}")
        return 1
    # check exports the factory spec itself, with its BNs kept.
    for name, data, opts in (("ordered folder", test_ordered, image_options), ("shuffled folder", test_shuffled, image_options),
                             ("class-sorted .npy", work / "test_sorted.npy", []),
                             ("shuffled .npy", work / "test_shuffled.npy", [])):
        result = bncal("check", "models/zoo.py:mnist_cnn", "--weights", "fixed.safetensors", "--data", data, *opts,
                       *extra, "--report-json", "check.json", "--force", cwd=work)
        if not (work / "check.json").exists():
            print(f"check on {name} failed: {result.stderr.strip()}")
            continue
        report = json.loads((work / "check.json").read_text())["check"]
        top1 = report["outputs"][0]["top1_agreement"]
        worst = max(report["layers"], key=lambda l: abs(math.log(l["var_ratio"])))
        print(f"check on {name}: {'PASSED' if report['passed'] else 'FAILED'}, top-1 agreement {top1:.3g}, "
              f"worst var ratio {worst['var_ratio']:.3g} ({worst['name']}), exit {result.returncode}")
        for key in ("notes", "warnings"):
            if report.get(key):
                print(f"  {key}: {report[key]}")
        for line in result.stderr.strip().splitlines():
            print(f"  stderr: {line}")
        if report["reasons"]:
            print(f"  reasons: {report['reasons']}")
        (work / "check.json").unlink()
    if options.keep is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
