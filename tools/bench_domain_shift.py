"""Adapting BN statistics to corrupted digits: Schneider et al. 2020's result, on the shipped MNIST CNN.

Protocol (numbers in README.md, "Adapting to a new domain"):

1. Source model: the shipped ``mnist_cnn_stale`` recalibrated in eval mode on the 4000 clean
   calibration digits (``bncal.recalibrate``). Its moving statistics are the source statistics.
2. Shifted domains (``models/corruptions.py``): 6 corruptions x 3 severities of the 1000
   held-out digits (the test sets), and the same corruptions of the 4000 calibration digits
   (with other noise draws): the pool the unlabelled target samples are drawn from.
3. For each test set, ``n`` target samples (n = 8, 32, 128, 1024) drawn at random from its pool
   (``--repeats`` draws per n, the errors averaged), and the model adapted in eval mode with
   ``prior=N``: N = 0 is full adaptation (the target statistics alone), and the prior's N is
   chosen per n on the held-out corruptions (impulse noise, speckle noise, pixelate), from
   ``--grid``, as the paper chooses it on ImageNet-C's held-out corruptions.
4. Top-1 error on each test set; the mean corruption error is the plain mean over the 18 sets
   (the paper's mCE further divides by AlexNet's errors, which have no counterpart here).

``--paths onnx`` repeats step 3 with ``bncal.recalibrate_onnx`` on the shipped ONNX file (after
the same clean recalibration, in onnxruntime) for the first draw of every n, and compares
errors and statistics with PyTorch's on the same draws. ``--paths keras`` runs the whole protocol
on the shipped Keras CNN (another network, so other numbers; its N chosen on its own).

    python tools/bench_domain_shift.py --paths torch,onnx,keras --plot tools/readme/domain-shift.png

That is about 30 minutes of a loaded 2-core machine. To split it: one run chooses N (its log
line "N per n"), then runs per n with ``--sizes n --priors n:N,...`` (each writes ``--json``),
joined by ``--merge *.json --plot ...``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402

import bncal  # noqa: E402
from models import corruptions as C  # noqa: E402
from models import zoo  # noqa: E402

TEST_SEED, POOL_SEED = 100, 200


class Domains:
    """The corrupted test sets and target pools, built once (pixels -> normalised NCHW float32)."""

    def __init__(self, kinds):
        test, self.labels = C.pixels("test")
        pool, _ = C.pixels("calib")
        self.clean = C.normalise(test)
        self.sets = {}
        for kind in kinds:
            for s in C.SEVERITIES:
                self.sets[kind, s] = (C.normalise(C.corrupt(test, kind, s, seed=TEST_SEED + s)),
                                      C.normalise(C.corrupt(pool, kind, s, seed=POOL_SEED + s)))

    def draw(self, key, n, repeat):
        pool = self.sets[key][1]
        rng = np.random.default_rng([repeat, n, list(self.sets).index(key)])
        return pool[rng.permutation(len(pool))[:n]]


class TorchPath:
    name = "PyTorch"

    def __init__(self):
        torch.set_num_threads(1)  # small batches: one thread is fastest on a shared machine
        self.source = zoo.mnist_cnn_stale()
        bncal.recalibrate(self.source, zoo.calibration_batches(), mode="eval")

    def adapt(self, target, prior):
        model = copy.deepcopy(self.source)
        bncal.recalibrate(model, [torch.from_numpy(target)], mode="eval", prior=prior)
        return model

    def error(self, model, x, labels):
        with torch.no_grad():
            logits = model.eval()(torch.from_numpy(x))
        return float((logits.argmax(1).numpy() != labels).mean())

    def statistics(self, model):
        return [np.concatenate([bn.running_mean.double().numpy(), bn.running_var.double().numpy()])
                for _, bn in bncal.torch.recalibration.batchnorm_layers(model)]


class OnnxPath:
    name = "ONNX"

    def __init__(self):
        import onnx

        stale = onnx.load(str(ROOT / "models" / "mnist_cnn_stale.onnx"))
        self.source, _ = bncal.recalibrate_onnx(stale, [x.numpy() for x in zoo.calibration_batches()], mode="eval")

    def adapt(self, target, prior):
        return bncal.recalibrate_onnx(self.source, [target], mode="eval", prior=prior)[0]

    def error(self, model, x, labels):
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
        return float((logits.argmax(1) != labels).mean())

    def statistics(self, model):
        from bncal.onnx.graphs import find_batchnorms
        from onnx import numpy_helper

        values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        return [np.concatenate([values[i.mean_initializer], values[i.var_initializer]])
                for i in find_batchnorms(model) if i.handled]


class KerasPath:
    name = "Keras"

    def __init__(self):
        import bncal.keras as bk
        from models import keras_zoo

        self.bk = bk
        self.source = bk.load_model(keras_zoo.MNIST_KERAS_STALE)
        bk.recalibrate(self.source, keras_zoo.calibration_nhwc(), mode="eval", batch_size=None)
        self.weights = self.source.get_weights()

    def adapt(self, target, prior):
        self.source.set_weights(self.weights)  # one model, its statistics reset (a clone per run is slow)
        self.bk.recalibrate(self.source, [_nhwc(target)], mode="eval", prior=prior, batch_size=None)
        return self.source

    def error(self, model, x, labels):
        logits = np.asarray(model.predict(_nhwc(x), batch_size=500, verbose=0))
        return float((logits.argmax(1) != labels).mean())


def _nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def mean_errors(path, domains, sizes, priors, repeats):
    """``{(n, N): mean error over the sets}`` and ``{(key, n, N): error}`` (averaged over
    ``repeats(n)`` draws)."""
    per_set = {}
    for key, (test, _) in domains.sets.items():
        for n in sizes:
            for prior in priors:
                errors = [path.error(path.adapt(domains.draw(key, n, r), prior), test, domains.labels)
                          for r in range(repeats(n))]
                per_set[key, n, prior] = float(np.mean(errors))
        print(f"  {path.name} {key[0]} {key[1]}: " + ", ".join(f"n={n} N={p:g} {per_set[key, n, p]:.3f}"
                                                            for n in sizes for p in priors), flush=True)
    means = {(n, prior): float(np.mean([per_set[key, n, prior] for key in domains.sets]))
             for n in sizes for prior in priors}
    return means, per_set


def run_protocol(path, evaluated, held_out, sizes, grid, repeats, log, chosen=None):
    """Source errors, the choice of N per n on ``held_out`` (unless ``chosen`` gives it), and the
    errors of full adaptation and of the chosen prior on ``evaluated``."""
    t0 = time.perf_counter()
    source_errors = {key: path.error(path.source, test, evaluated.labels) for key, (test, _) in evaluated.sets.items()}
    clean = path.error(path.source, evaluated.clean, evaluated.labels)
    held_means = {}
    if chosen is None:
        held_means, _ = mean_errors(path, held_out, sizes, grid, lambda n: 1)
        chosen = {n: min((p for p in grid if p > 0), key=lambda p: held_means[n, p]) for n in sizes}
        log(f"{path.name}: held-out corruptions, mean error by n and N: "
            + "; ".join(f"n={n}: " + ", ".join(f"{p:g}:{held_means[n, p]:.3f}" for p in grid) for n in sizes))
    log(f"{path.name}: N per n: {chosen}")
    per_set = {}
    for n in sizes:
        for prior in sorted({0, chosen[n]}):
            _, found = mean_errors(path, evaluated, [n], [prior], repeats)
            per_set.update(found)
    result = {
        "path": path.name, "clean_error": clean, "chosen_prior": {str(n): chosen[n] for n in sizes},
        "held_out_mean_error": {f"{n},{p:g}": v for (n, p), v in held_means.items()},
        "source": {f"{k},{s}": v for (k, s), v in source_errors.items()},
        "full": {f"{k},{s},{n}": per_set[(k, s), n, 0] for (k, s) in evaluated.sets for n in sizes},
        "prior": {f"{k},{s},{n}": per_set[(k, s), n, chosen[n]] for (k, s) in evaluated.sets for n in sizes},
        "seconds": time.perf_counter() - t0,
    }
    result["mean"] = {"source": float(np.mean(list(source_errors.values()))),
                      **{f"full,{n}": float(np.mean([per_set[key, n, 0] for key in evaluated.sets])) for n in sizes},
                      **{f"prior,{n}": float(np.mean([per_set[key, n, chosen[n]] for key in evaluated.sets]))
                         for n in sizes}}
    return result


def compare_onnx(torch_path, onnx_path, evaluated, sizes, chosen, log):
    """ONNX vs PyTorch on the first draw of every n, full adaptation and the chosen prior, at the
    strongest severity of every corruption."""
    worst_stat, worst_error, runs = 0.0, 0.0, 0
    for key, (test, _) in evaluated.sets.items():
        if key[1] != C.SEVERITIES[-1]:
            continue
        for n in sizes:
            for prior in sorted({0, chosen[n]}):
                target = evaluated.draw(key, n, 0)
                a, b = torch_path.adapt(target, prior), onnx_path.adapt(target, prior)
                for sa, sb in zip(torch_path.statistics(a), onnx_path.statistics(b)):
                    worst_stat = max(worst_stat, float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-3))))
                worst_error = max(worst_error, abs(torch_path.error(a, test, evaluated.labels)
                                                   - onnx_path.error(b, test, evaluated.labels)))
                runs += 1
    log(f"ONNX vs PyTorch, {runs} adaptations: largest relative difference of a statistic {worst_stat:.2e}, "
        f"largest difference of a test error {worst_error:.4f}")
    return {"runs": runs, "max_rel_stat_diff": worst_stat, "max_error_diff": worst_error}


def merged(results):
    """Results of one path run apart (by n) joined, the means recomputed over the sets."""
    out = {}
    for r in results:
        if r["path"] not in out:
            out[r["path"]] = json.loads(json.dumps(r))
            continue
        into = out[r["path"]]
        for field in ("chosen_prior", "held_out_mean_error", "full", "prior"):
            into[field].update(r[field])
        into["seconds"] += r["seconds"]
    for r in out.values():
        sets = list(r["source"])
        r["mean"] = {"source": float(np.mean(list(r["source"].values())))}
        for n in r["chosen_prior"]:
            for setting in ("full", "prior"):
                r["mean"][f"{setting},{n}"] = float(np.mean([r[setting][f"{key},{n}"] for key in sets]))
    return list(out.values())


def markdown(result, sizes):
    chosen = result["chosen_prior"]
    head = (["corruption", "severity", "source"] + [f"full, n={n}" for n in sizes]
            + [f"prior N={chosen[str(n)]:g}, n={n}" for n in sizes])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in result["source"]:
        kind, s = key.split(",")
        cells = [kind.replace("_", " "), s, f"{100 * result['source'][key]:.1f}"]
        cells += [f"{100 * result['full'][f'{key},{n}']:.1f}" for n in sizes]
        cells += [f"{100 * result['prior'][f'{key},{n}']:.1f}" for n in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    mean = result["mean"]
    cells = ["**mean**", "", f"**{100 * mean['source']:.1f}**"]
    cells += [f"**{100 * mean[f'full,{n}']:.1f}**" for n in sizes] + [f"**{100 * mean[f'prior,{n}']:.1f}**" for n in sizes]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = {"PyTorch": "-", "Keras": "--"}
    for result in results:
        mean, style, name = result["mean"], styles.get(result["path"], ":"), result["path"]
        ax.plot(sizes, [100 * mean["source"]] * len(sizes), style, color="0.5", label=f"{name}: source statistics")
        ax.plot(sizes, [100 * mean[f"full,{n}"] for n in sizes], style, marker="o", color="C3",
                label=f"{name}: full adaptation (prior 0)")
        how = "chosen on held-out corruptions" if result["held_out_mean_error"] else "given (--priors)"
        ax.plot(sizes, [100 * mean[f"prior,{n}"] for n in sizes], style, marker="s", color="C0",
                label=f"{name}: prior, N {how}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("target samples n")
    ax.set_ylabel("mean corruption error (%)")
    ax.set_title("MNIST CNNs, 6 corruptions x 3 severities")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="torch", help="comma-separated: torch, onnx, keras")
    parser.add_argument("--sizes", default="8,32,128,1024")
    parser.add_argument("--grid", default="0,8,16,32,64", help="priors N tried on the held-out corruptions")
    parser.add_argument("--repeats", type=int, default=1,
                        help="target draws per n below 1024 and test set (the held-out choice of N: 1)")
    parser.add_argument("--large-repeats", type=int, default=1, help="target draws for n >= 1024")
    parser.add_argument("--keras-repeats", type=int, default=1, help="--repeats for the Keras path")
    parser.add_argument("--priors", metavar="n:N,...",
                        help="N per n instead of each path's own choice on the held-out corruptions (to split a run "
                             "by n into processes after the choice; --merge joins them)")
    parser.add_argument("--plot", type=Path, help="write the error-vs-n figure here")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: print and plot the results of earlier --json files (paths run apart)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    grid = [float(v) for v in args.grid.split(",")]
    paths = args.paths.split(",")
    log = lambda text: print(text, flush=True)  # noqa: E731
    repeats = lambda small: lambda n: small if n < 1024 else args.large_repeats  # noqa: E731

    if args.merge:
        results = merged([r for path in args.merge for r in json.loads(path.read_text())["results"]])
        sizes = sorted(int(n) for n in results[0]["chosen_prior"])
        for result in results:
            log(markdown(result, sizes))
        report(results, sizes, args.plot, log)
        return
    chosen = args.priors and {int(n): float(p) for n, p in (v.split(":") for v in args.priors.split(",")) if int(n) in sizes}
    evaluated, held_out = Domains(C.EVALUATED), Domains({} if chosen else C.HELD_OUT)
    results, extra = [], {}
    if "torch" in paths or "onnx" in paths:
        torch_path = TorchPath()
        results.append(run_protocol(torch_path, evaluated, held_out, sizes, grid, repeats(args.repeats), log,
                                    chosen=chosen))
        log(markdown(results[-1], sizes))
    if "onnx" in paths:
        chosen = {n: results[0]["chosen_prior"][str(n)] for n in sizes}
        extra["onnx_vs_torch"] = compare_onnx(torch_path, OnnxPath(), evaluated, sizes, chosen, log)
    if "keras" in paths:
        results.append(run_protocol(KerasPath(), evaluated, held_out, sizes, grid, repeats(args.keras_repeats), log,
                                    chosen=chosen))
        log(markdown(results[-1], sizes))
    if args.json:
        args.json.write_text(json.dumps({"results": results, **extra}, indent=1))
    report(results, sizes, args.plot, log)


def report(results, sizes, plot_path, log):
    for result in results:
        mean = result["mean"]
        log(f"{result['path']}: clean {100 * result['clean_error']:.1f} %, mean corruption error: source "
            f"{100 * mean['source']:.1f} %, full adaptation "
            + ", ".join(f"n={n} {100 * mean[f'full,{n}']:.1f}" for n in sizes) + " %; prior "
            + ", ".join(f"n={n} (N={result['chosen_prior'][str(n)]:g}) {100 * mean[f'prior,{n}']:.1f}"
                        for n in sizes) + f" % ({result['seconds']:.0f} s)")
    if plot_path:
        plot(results, sizes, plot_path)
        log(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
