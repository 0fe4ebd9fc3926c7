"""Does ``bncal inspect`` predict what ``fold-export`` does? Count it on random architectures.

For each PyTorch model: the decisions ``bncal inspect`` shows (``bncal.analyze_foldability`` on
the model) against ``fold-export``'s graph fold (``bncal.fold_export_torch(module_fold=False)``:
one export with every BN kept -- BN and linear nodes named after their modules -- the graph fold
``bncal.fold_onnx``, and the
parity check against PyTorch in onnxruntime, which raises if a fold is wrong). A BN agrees when
both fold it the same way into the same op, or both keep it. The models are
``models/random_nets.py`` branches, packed several per model so that one export covers many.

Only public names of ``bncal`` are used, so the same script measures an older checkout::

    python tools/fold_agreement.py [--architectures 500] [--per-model 10] [--first-seed 0]
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compare(model, inputs) -> list[tuple[str, tuple, tuple, str, str]]:
    """``(bn, inspect's (direction, target), fold-export's, inspect's reason, fold-export's)``
    per BN; a BN missing from one side shows ``("absent",)`` there."""
    import bncal

    predicted = {d.bn: d for d in bncal.analyze_foldability(model, inputs)}
    # The graph fold alone (fold-export folds in the module first, with the rules compared here).
    graph_only = {"module_fold": False} if "module_fold" in inspect.signature(bncal.fold_export_torch).parameters else {}
    _, report = bncal.fold_export_torch(model, inputs, latency_batches=(), **graph_only)
    done = {d.bn: d for d in report.decisions}
    rows = []
    for name in [*predicted, *(n for n in done if n not in predicted)]:
        p, d = predicted.get(name), done.get(name)
        rows.append((name, (p.direction, p.target) if p else ("absent",), (d.direction, d.target) if d else ("absent",),
                     p.reason if p else None, d.reason if d else None))
    return rows


def main(argv=None) -> int:
    import torch

    from models.random_nets import INPUT_SHAPE, packed_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", type=int, default=500)
    parser.add_argument("--per-model", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=10, help="disagreements to print")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    seeds = range(args.first_seed, args.first_seed + args.architectures)
    rows, disagreeing_architectures = [], set()
    for start in range(0, len(seeds), args.per_model):
        chunk = seeds[start:start + args.per_model]
        for row in compare(packed_model(chunk), (x,)):
            rows.append(row)
            if row[1] != row[2]:
                disagreeing_architectures.add(chunk[int(row[0].split(".")[1])])
    bns = len(rows)
    predicted = sum(r[1][0] is not None and r[1][0] != "absent" for r in rows)
    done = sum(r[2][0] is not None and r[2][0] != "absent" for r in rows)
    wrong = [r for r in rows if r[1] != r[2]]
    print(f"{len(seeds)} architectures, {bns} BatchNorms: inspect folds {predicted}, fold-export folds {done}; "
          f"{len(wrong)} BNs in {len(disagreeing_architectures)} architectures disagree")
    for name, p, d, p_reason, d_reason in wrong[:args.show]:
        print(f"  {name}: inspect {p} ({p_reason}); fold-export {d} ({d_reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
