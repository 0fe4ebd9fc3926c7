"""Write models/mnist_calib.npz and models/mnist_heldout.npz: the README's data for the base install.

The two splits of ``models/mnist5k.npz`` (4000 calibration digits, 1000 held-out ones; see
``tools/make_mnist_subset.py``) as one uint8 array each, ``(N, 1, 28, 28)``, stored under the name of
the example ONNX model's input (``input``), so that ``--data FILE.npz`` feeds it without ``--inputs``;
``--normalize --preset mnist`` scales the pixels as the model was trained. Rows stay sorted by class:
bncal shuffles file data when it reads it.

    python tools/make_mnist_split_npz.py
"""

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    source = np.load(ROOT / "models" / "mnist5k.npz")
    for name, index in (("mnist_calib.npz", source["calib_idx"]), ("mnist_heldout.npz", source["test_idx"])):
        out = ROOT / "models" / name
        np.savez_compressed(out, input=source["images"][index])
        print(f"wrote {out} ({out.stat().st_size} bytes, {len(index)} digits)")
