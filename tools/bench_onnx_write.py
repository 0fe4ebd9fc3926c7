"""Writing a large onnx_ir model as one file: bncal's writer against onnx_ir's own ``ir.save``.

``bncal.onnx.io.save_onnx`` writes an ``onnx_ir.Model`` (what torch's exporter builds, its
initializers the PyTorch model's own tensors) with a hand-written protobuf layout: the graph
without its large initializers, then each of those as a ``ModelProto.graph`` field of its own,
``raw_data`` written straight from the tensor's memory. It stays only while it beats onnx_ir's
own writer; this measures both on the same model, side by side:

- ``bncal``: ``bncal.onnx.io.save_onnx(model, path)`` (the fold-export write);
- ``ir.save``: ``onnx_ir.save(model, path)``, one file, no external data;
- ``ir.save external``: ``onnx_ir.save(model, path, external_data=...)``, the layout torch's
  exporter writes by default (graph file plus a data file), for reference.

The model: an MLP of ``--layers`` Linear(``--width``, ``--width``) layers exported with
``torch.onnx.export(dynamo=True)`` (default 8 x 4096 x 4096 float32: 537 MB), so its
initializers are torch tensors as in fold-export. Each writer runs in a fresh process per round
(rounds interleaved, the export cached as a state dict under the temporary folder): wall time
of the write alone, and the growth of the process's peak RSS during the write (what the writer
holds beyond the model). Both files are checked to be the same model (every initializer equal).

    python tools/bench_onnx_write.py [--rounds 3] [--layers 8] [--width 4096]

Measured (2026-12, 2 cores shared with other work, 3 rounds, 512 MiB model): bncal 6.8 s median
(5.4-8.9), peak RSS +0 MiB; ``ir.save`` 34.2 s (29.8-56.4), +322 MiB, 5.0x bncal; ``ir.save``
with external data 7.4 s (2.7-10.6), 1.09x, but two files. Before this writer (VGG-11, 530 MB),
fold-export made a ``ModelProto`` (2.9 s) and serialized it (1.5-3.0 s) against 1.5 s for the
whole export: the copies this writer avoids.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITERS = ("bncal", "ir.save", "ir.save external")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _exported_model(layers: int, width: int, cache: Path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()
    weights = cache / f"mlp_{layers}x{width}.pt"
    if weights.exists():
        net.load_state_dict(torch.load(weights, weights_only=True))
    else:
        torch.save(net.state_dict(), weights)
    return torch.onnx.export(net, (torch.zeros(2, width),), dynamo=True, optimize=False, verbose=False).model


def _one_write(writer: str, layers: int, width: int, cache: Path, out: Path) -> dict:
    """Run in a fresh process: export, then time one writer."""
    model = _exported_model(layers, width, cache)
    before = _peak_rss_bytes()
    start = time.perf_counter()
    if writer == "bncal":
        from bncal.onnx.io import save_onnx

        save_onnx(model, out)
    else:
        import onnx_ir as ir

        if writer == "ir.save":
            ir.save(model, out)
        else:
            ir.save(model, out, external_data=out.name + ".data")
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.parent.glob(out.name + "*"))
    return {"writer": writer, "seconds": seconds, "rss_growth_mb": (_peak_rss_bytes() - before) / 2**20,
            "bytes": size}


def _same_model(a: Path, b: Path) -> bool:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ta = {t.name: numpy_helper.to_array(t) for t in ma.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in mb.graph.initializer}
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta) and \
        [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("WRITER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        writer, folder = args.child
        result = _one_write(writer, args.layers, args.width, Path(folder).parent, Path(folder) / "model.onnx")
        print(json.dumps(result))
        return 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results: dict[str, list[dict]] = {w: [] for w in WRITERS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for writer in WRITERS:
                folder = Path(tmp) / f"{writer.replace(' ', '_')}_{round_index}"
                folder.mkdir()
                done = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--width",
                                       str(args.width), "--child", writer, str(folder)],
                                      capture_output=True, text=True, env=env, check=True)
                results[writer].append(json.loads(done.stdout.strip().splitlines()[-1]))
            same = _same_model(Path(tmp) / f"bncal_{round_index}" / "model.onnx",
                               Path(tmp) / f"ir.save_{round_index}" / "model.onnx")
            if not same:
                raise SystemExit("bncal's file and ir.save's file hold different models")
            for writer in WRITERS:
                folder = Path(tmp) / f"{writer.replace(' ', '_')}_{round_index}"
                for f in folder.iterdir():
                    f.unlink()
    size_mb = results["bncal"][0]["bytes"] / 2**20
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), {size_mb:.0f} MiB; {args.rounds} rounds, "
          "fresh process per write, rounds interleaved; files checked equal")
    print(f"{'writer':<18} {'write s (median)':>17} {'range':>15} {'peak RSS growth MiB (median)':>29}")
    base = statistics.median(r["seconds"] for r in results["bncal"])
    for writer in WRITERS:
        seconds = [r["seconds"] for r in results[writer]]
        growth = statistics.median(r["rss_growth_mb"] for r in results[writer])
        median = statistics.median(seconds)
        print(f"{writer:<18} {median:>17.2f} {min(seconds):>7.2f}-{max(seconds):<7.2f} {growth:>29.0f}"
              f"   ({median / base:.2f}x bncal)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
