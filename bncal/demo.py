"""The whole story on real data: a model whose moving statistics were never updated, repaired.

On the shipped MNIST CNN (``models/``): accuracy with the stale statistics, what ``inspect``
finds, exact recalibration on the calibration split, accuracy afterwards on held-out digits,
fold-export to ONNX with its parity proof, and the train/inference check in onnxruntime
before and after. Calibration and held-out digits are disjoint, so the accuracies are honest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from .errors import BncalError
from .report import ReportDisplay, format_table

__all__ = ["DemoResult", "run_demo", "default_models_dir", "demo_inputs", "demo_outputs"]

_RECALIBRATED = "mnist_cnn_recalibrated.safetensors"
_FOLDED = "mnist_cnn_folded.onnx"


def default_models_dir() -> Path:
    """The repository's ``models/`` folder (the demo runs from a source checkout)."""
    return Path(__file__).resolve().parents[1] / "models"


def demo_inputs(models_dir=None) -> list[Path]:
    """The files the demo reads: the model source, its checkpoint and the MNIST digits."""
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    return [models_dir / "zoo.py", models_dir / "mnist_cnn_stale.safetensors", models_dir / "mnist5k.npz"]


def demo_outputs(out_dir) -> list[Path]:
    """The files the demo writes into ``out_dir``: the recalibrated weights and the folded ONNX model."""
    return [Path(out_dir) / _RECALIBRATED, Path(out_dir) / _FOLDED]


@dataclasses.dataclass(repr=False)
class DemoResult(ReportDisplay):
    """Figures of one demo run (accuracies on the held-out split, in [0, 1])."""

    accuracy_stale: float
    accuracy_train_mode: float
    accuracy_recalibrated: float
    check_before_passed: bool
    check_after_passed: bool
    fold_export_passed: bool
    files: dict[str, int]
    latency_ms: dict
    seconds: float

    @property
    def passed(self) -> bool:
        """The demo's end: a verified export of a model whose statistics match its data."""
        return self.fold_export_passed and self.check_after_passed

    def summary(self) -> str:
        """``PASSED: held-out accuracy 10.1 % stale -> 97.7 % recalibrated``."""
        return (f"{'PASSED' if self.passed else 'FAILED'}: held-out accuracy {self.accuracy_stale:.1%} stale -> "
                f"{self.accuracy_recalibrated:.1%} recalibrated")

    def table(self) -> str:
        """The demo's figures, one per row."""
        verdict = lambda ok: "pass" if ok else "FAIL"
        rows = [("held-out accuracy, stale statistics", f"{self.accuracy_stale:.1%}"),
                ("held-out accuracy, batch statistics (train mode)", f"{self.accuracy_train_mode:.1%}"),
                ("held-out accuracy, recalibrated", f"{self.accuracy_recalibrated:.1%}"),
                ("check before recalibration", verdict(self.check_before_passed)),
                ("check after recalibration", verdict(self.check_after_passed)),
                ("fold-export parity", verdict(self.fold_export_passed))]
        rows += [(f"{name} (bytes)", size) for name, size in self.files.items()]
        return "\n".join([format_table(rows, ["", "value"], name="figures"), f"demo finished in {self.seconds:.1f} s",
                          "PASSED" if self.passed else "FAILED"])


def _accuracy(model, x, y, *, batch_stats: bool = False, batch_size: int = 128) -> float:
    """Top-1 accuracy; with ``batch_stats`` BN normalises with batch statistics (dropout off)."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    modes = {m: m.training for m in model.modules()}
    model.eval()
    if batch_stats:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
                m.track_running_stats_backup, m.momentum_backup = m.track_running_stats, m.momentum
                m.momentum = 0.0  # leave the stored statistics alone
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(y), batch_size):
                logits = model(x[start:start + batch_size])
                correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    finally:
        for m, training in modes.items():
            m.training = training
            if hasattr(m, "momentum_backup"):
                m.momentum = m.momentum_backup
                del m.momentum_backup, m.track_running_stats_backup
    return correct / len(y)


def run_demo(out_dir, *, models_dir=None, plot: str | Path | None = None, echo: Callable[[str], None] = lambda s: None,
             batch_size: int = 128) -> DemoResult:
    """Run the demo, writing its files to ``out_dir``; ``echo`` receives the narrative lines."""
    import torch

    from .onnx.check import check_onnx
    from .torch.export import export_onnx
    from .folding.export import fold_export_torch
    from .folding import analyze_foldability
    from .inspect import RULES, inspect_model
    from .specs import resolve_callable
    from .torch.loading import load_model, save_state_dict
    from .outputs import staged_size
    from .torch.recalibration import recalibrate

    start = time.perf_counter()
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    zoo_file, weights, _ = demo_inputs(models_dir)
    if not zoo_file.is_file() or not weights.is_file():
        raise BncalError(f"the demo needs models/zoo.py and models/mnist_cnn_stale.safetensors (looked in {models_dir}); "
                         "run it from a source checkout or pass --models-dir")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, onnx_path = demo_outputs(out_dir)
    generator = torch.Generator().manual_seed(0)

    mnist_arrays = resolve_callable(f"{zoo_file}:mnist_arrays", "data")
    x_calib, _ = mnist_arrays("calib")
    x_test, y_test = mnist_arrays("test")
    x_calib = x_calib[torch.randperm(len(x_calib), generator=generator)]  # the file is sorted by class
    perm = torch.randperm(len(x_test), generator=generator)
    x_test, y_test = x_test[perm], y_test[perm]
    calib_batches = list(x_calib.split(batch_size))
    test_feeds = [b.numpy() for b in x_test.split(100)]
    spec = f"{zoo_file}:mnist_cnn"
    model = load_model(spec, weights=weights)

    echo(f"bncal demo: {spec} with {weights.name}, trained with batch statistics while its moving statistics were "
         f"never updated; MNIST digits: {len(x_calib)} for calibration, {len(x_test)} held out.\n")
    acc_stale = _accuracy(model, x_test, y_test)
    acc_train = _accuracy(model, x_test, y_test, batch_stats=True)
    echo(f"1. held-out accuracy, eval mode (stored statistics):    {acc_stale:6.1%}   <- deployed behaviour")
    echo(f"   held-out accuracy, batch statistics (train mode):   {acc_train:6.1%}   <- what training saw\n")

    example = (x_test[:2],)
    findings = inspect_model(model, example_inputs=example, fold_decisions=analyze_foldability(model, example)).findings
    echo("2. bncal inspect finds:")
    for f in findings:
        echo(f"   {f.rule_id} {f.severity:7s} {RULES[f.rule_id][1]} ({', '.join(f.layers[:3])}{', ...' if len(f.layers) > 3 else ''})")
    echo("")

    stale_onnx = export_onnx(model, example, keep_batchnorm=True)
    check_before = check_onnx(stale_onnx, test_feeds)
    worst = max(check_before.layers, key=lambda l: l.mean_shift)
    echo(f"3. bncal check (onnxruntime, held-out data): {check_before.verdict}; worst layer {worst.name}: "
         f"mean shift {worst.mean_shift:.2f} sd, variance ratio {worst.var_ratio:.2f}\n")

    report = recalibrate(model, calib_batches)
    weights_out = save_state_dict(model, weights_path)
    echo(f"4. bncal recalibrate: {len(report.layers)} BN layers from {report.samples} calibration digits "
         f"({report.batches} batches, dropout off, one pass):")
    echo("\n".join("   " + line for line in report.table().splitlines()))
    acc_fixed = _accuracy(model, x_test, y_test)
    echo(f"\n   held-out accuracy, eval mode, recalibrated:         {acc_fixed:6.1%}   "
         f"(batch statistics gave {acc_train:.1%})\n")

    verify = [tuple([b]) for b in x_test[:300].split(100)]
    _, folded = fold_export_torch(model, example, onnx_path, verify_batches=verify, latency_batches=(1, 32))
    echo(f"5. bncal fold-export -> {onnx_path.name}: folded {sum(d.folded for d in folded.decisions)} of "
         f"{len(folded.decisions)} BN layers, {folded.bn_left} BatchNormalization left")
    echo("\n".join("   " + line for line in folded.table().splitlines()))
    echo("")

    check_after = check_onnx(export_onnx(model, example, keep_batchnorm=True), test_feeds)
    worst_after = max(check_after.layers, key=lambda l: l.mean_shift)
    echo(f"6. bncal check after recalibration: {check_after.verdict}; worst layer {worst_after.name}: "
         f"mean shift {worst_after.mean_shift:.3f} sd, variance ratio {worst_after.var_ratio:.3f}")
    top1 = [o.top1_agreement for o in check_after.outputs if o.top1_agreement is not None]
    if top1:
        echo(f"   inference vs train mode top-1 agreement: {top1[0]:.1%}")

    if plot:
        from .plot import plot_check

        plot_check({"stale statistics": check_before, "recalibrated": check_after}, plot, model="demo: mnist_cnn")
        echo(f"   per-layer plot: {plot}")
    files = {p.name: staged_size(p) for p in (weights, weights_out, onnx_path)}
    seconds = time.perf_counter() - start
    echo("\nfiles: " + ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in files.items()))
    echo(f"demo finished in {seconds:.1f} s")
    return DemoResult(acc_stale, acc_train, acc_fixed, check_before.passed, check_after.passed, folded.passed,
                      files, folded.latency_ms, seconds)
