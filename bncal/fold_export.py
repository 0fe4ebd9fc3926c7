"""Fold BatchNorm, export to ONNX, and prove in onnxruntime that nothing changed.

The path for a PyTorch model: one export of the eval-mode model with every BatchNormalization
kept (:func:`bncal.export.export_onnx` with ``keep_batchnorm=True``; BN and linear nodes named
after their modules), then the graph fold (:func:`bncal.folding.fold_onnx`), ``onnx.checker``,
then the folded ONNX model in onnxruntime against the *original* PyTorch model in eval mode on
several batches. The graph fold uses the rulebook that :func:`bncal.analyze_foldability` (what
``bncal inspect`` shows) applies to the PyTorch model, so inspect predicts these decisions. For
an ``.onnx`` input: graph folding, then the folded graph against the original graph, both in
onnxruntime. The output file is written only when the comparison passes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from .errors import BncalError, VerificationError
from .report import FoldDecision, ReportDisplay, format_table, plural

__all__ = ["FoldExportReport", "fold_export_torch", "fold_export_onnx", "torch_onnx_parity", "failed_output_path"]


@dataclasses.dataclass(repr=False)
class FoldExportReport(ReportDisplay):
    """What fold-export did: per-BN decisions, before/after figures, and the parity comparison.

    ``decisions`` has one entry per BatchNormalization of the original graph (for a PyTorch
    model: of its export, named after the PyTorch modules). ``latency_ms`` maps ``"original"``/``"folded"`` to
    ``{batch size: median ms}`` in onnxruntime at the same optimisation level. ``original``
    is the unfolded ONNX model (not part of the JSON report).
    """

    source: str
    output: Path | None
    decisions: list[FoldDecision]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    bytes_before: int
    bytes_after: int
    latency_ms: dict[str, dict[int, float]]
    comparison: object
    seconds: float
    original: object = dataclasses.field(default=None, repr=False, metadata={"json": False})

    @property
    def passed(self) -> bool:
        return bool(self.comparison.passed)

    @property
    def bn_left(self) -> int:
        return self.ops_after.get("BatchNormalization", 0)

    def summary(self) -> str:
        """``PASSED: folded 7 of 7 BN layers, 0 BatchNormalization left -> model.onnx``."""
        folded = sum(d.folded for d in self.decisions)
        target = f" -> {self.output}" if self.output is not None else ""
        return (f"{'PASSED' if self.passed else 'FAILED'}: folded {folded} of {plural(len(self.decisions), 'BN layer')}, "
                f"{self.bn_left} BatchNormalization left{target}")

    def table(self) -> str:
        ops = sorted(set(self.ops_before) | set(self.ops_after), key=lambda k: (-self.ops_before.get(k, 0), k))
        rows = [(op, self.ops_before.get(op, 0), self.ops_after.get(op, 0)) for op in ops]
        rows.append(("file size (bytes)", self.bytes_before, self.bytes_after))
        for batch in sorted(self.latency_ms.get("folded", {})):
            rows.append((f"ORT latency batch {batch} (ms)", self.latency_ms["original"].get(batch),
                         self.latency_ms["folded"][batch]))
        parts = [format_table(rows, ["", "original", "folded"])]
        refused = [d for d in self.decisions if not d.folded]
        folded = len(self.decisions) - len(refused)
        parts.append(f"\nfolded {folded} of {len(self.decisions)} BatchNorm layers; "
                     f"{self.bn_left} BatchNormalization left in the ONNX graph")
        parts += [f"  kept {d.bn}: {d.reason}" for d in refused]
        parts.append("")
        parts.append(self.comparison.table())
        return "\n".join(parts)


def _random_feeds(model, batch_sizes, seed=0) -> dict[int, dict[str, np.ndarray]]:
    """Seeded random feeds for the graph inputs, for latency only."""
    from .runtime import input_specs

    rng = np.random.default_rng(seed)
    out = {}
    for b in batch_sizes:
        feeds = {}
        for name, dtype, dims in input_specs(model):
            if dims is None:
                raise BncalError(f"input {name} has no known shape; latency needs static dims besides the batch")
            shape = [b if i == 0 else d for i, d in enumerate(dims)]
            if any(not isinstance(d, int) for d in shape):
                return {}
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        out[b] = feeds
    return out


def failed_output_path(output) -> Path:
    """Where ``keep_failed`` puts a model that failed verification: ``<stem>.FAILED-VERIFICATION.onnx``."""
    return Path(output).with_name(Path(output).stem + ".FAILED-VERIFICATION.onnx")


def _write_verified(proto, output, comparison, keep_failed: bool):
    from .onnx_io import save_onnx

    if comparison.passed:
        return save_onnx(proto, output)
    if keep_failed:
        save_onnx(proto, failed_output_path(output))
    return None


def fold_export_torch(
    model,
    example_inputs: tuple,
    output=None,
    *,
    verify_batches: list[tuple] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    opset: int | None = None,
    input_names=None,
    output_names=None,
    dynamic_batch: bool = True,
    bn_to_affine: bool = False,
    keep_failed: bool = False,
    latency_batches=(1, 32),
    optimization_level: str = "basic",
    fold_fn=None,
) -> tuple[object, FoldExportReport]:
    """Export a PyTorch model, fold its BatchNorms in the graph, and verify against PyTorch.

    One export of the original eval-mode model with every BatchNormalization kept (so the
    report's "original" column is what the exporter produced), then the graph fold pass
    (:func:`bncal.folding.fold_onnx`; its rules are those of :func:`bncal.analyze_foldability`,
    which sees the PyTorch model as the exporter emits it), then the folded graph in
    onnxruntime against the *original PyTorch model* on ``verify_batches``: tuples of input
    tensors (default: ``example_inputs`` and a batch of another size, which also exercises the
    dynamic batch axis). The model is never modified. When the comparison
    fails, nothing is written to ``output`` (with ``keep_failed`` the failed model goes to
    ``<stem>.FAILED-VERIFICATION.onnx``) and :class:`VerificationError` is raised with the
    report as ``exc.report``. ``fold_fn`` replaces ``fold_onnx`` (tests corrupt a fold with it).
    """
    import torch

    from .export import export_onnx
    from .folding import fold_onnx, op_counts
    from .runtime import compare_latency

    start = time.perf_counter()
    example_inputs = tuple(example_inputs)
    original_proto = export_onnx(model, example_inputs, keep_batchnorm=True, opset=opset, input_names=input_names,
                                 output_names=output_names, dynamic_batch=dynamic_batch)
    proto, decisions = (fold_fn or fold_onnx)(original_proto, bn_to_affine=bn_to_affine)
    if verify_batches is None:
        verify_batches = [example_inputs]
        if dynamic_batch and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs):
            g = torch.Generator().manual_seed(1)
            size = example_inputs[0].shape[0] + 2
            verify_batches.append(tuple(torch.randn((size, *x.shape[1:]), generator=g).to(x.dtype) if x.is_floating_point()
                                        else x[:1].expand(size, *x.shape[1:]).clone() for x in example_inputs))
    comparison = torch_onnx_parity(model, proto, verify_batches, atol=atol, rtol=rtol,
                                   optimization_level=optimization_level)
    feeds_by_batch = _random_feeds(original_proto, latency_batches) if latency_batches else {}
    latency = compare_latency({"original": original_proto, "folded": proto}, feeds_by_batch,
                              optimization_level=optimization_level)
    written = _write_verified(proto, output, comparison, keep_failed) if output is not None else None
    report = FoldExportReport(
        source="pytorch", output=written, decisions=decisions,
        ops_before=op_counts(original_proto), ops_after=op_counts(proto),
        bytes_before=original_proto.ByteSize(), bytes_after=proto.ByteSize(), latency_ms=latency,
        comparison=comparison, seconds=time.perf_counter() - start, original=original_proto)
    _raise_if_failed(report)
    return proto, report


def torch_onnx_parity(model, proto, batches, *, atol: float = 1e-5, rtol: float = 1e-4,
                      optimization_level: str = "basic"):
    """Compare ``model`` in eval mode (PyTorch) with ``proto`` in onnxruntime on ``batches``
    (tuples of input tensors). The model's train/eval flags are restored afterwards."""
    import torch

    from .runtime import ort_session, run_onnx
    from .verify import compare_outputs

    output_names = [o.name for o in proto.graph.output]
    session = ort_session(proto, optimization_level=optimization_level)
    reference, actual = {}, {}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = tuple(batch)
                expected = _flatten_outputs(model(*batch))
                got = run_onnx(session, tuple(x.detach().cpu().numpy() for x in batch))
                for name, value in zip(output_names, expected):
                    reference.setdefault(name, []).append(value)
                    actual.setdefault(name, []).append(got[name])
    finally:
        for m, training in modes.items():
            m.training = training
    return compare_outputs(reference, actual, atol=atol, rtol=rtol)


def fold_export_onnx(
    model,
    output=None,
    *,
    verify_feeds: list[dict] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    bn_to_affine: bool = False,
    keep_failed: bool = False,
    latency_batches=(1, 32),
    optimization_level: str = "basic",
    treat_initializer_inputs_as_constant: bool = False,
    fold_fn=None,
) -> tuple[object, FoldExportReport]:
    """Fold the BatchNorms of an ONNX model and verify the result against the original in onnxruntime.

    ``verify_feeds`` are ``{input name: array}`` dicts (default: seeded random inputs of
    batch sizes 1 and 3 where the input shapes are known). Output and failure handling as
    in :func:`fold_export_torch`.
    """
    from .folding import fold_onnx, op_counts
    from .runtime import compare_latency, ort_session, run_onnx
    from .verify import compare_outputs

    start = time.perf_counter()
    proto, decisions = (fold_fn or fold_onnx)(model, bn_to_affine=bn_to_affine,
                                              treat_initializer_inputs_as_constant=treat_initializer_inputs_as_constant)
    if verify_feeds is None:
        verify_feeds = [f for f in _random_feeds(model, (1, 3), seed=0).values()]
        if not verify_feeds:
            raise BncalError("the model's inputs have dynamic dimensions besides the batch; "
                             "give --data or --input-shape to verify the folded model")
    original_session = ort_session(model, optimization_level="disable")
    folded_session = ort_session(proto, optimization_level=optimization_level)
    reference, actual = {}, {}
    for feeds in verify_feeds:
        expected, got = run_onnx(original_session, feeds), run_onnx(folded_session, feeds)
        for name in expected:
            reference.setdefault(name, []).append(expected[name])
            actual.setdefault(name, []).append(got.get(name))
    comparison = compare_outputs(reference, actual, atol=atol, rtol=rtol)
    feeds_by_batch = _random_feeds(model, latency_batches) if latency_batches else {}
    latency = compare_latency({"original": model, "folded": proto}, feeds_by_batch,
                              optimization_level=optimization_level)
    written = _write_verified(proto, output, comparison, keep_failed) if output is not None else None
    report = FoldExportReport(
        source="onnx", output=written, decisions=decisions,
        ops_before=op_counts(model), ops_after=op_counts(proto), bytes_before=model.ByteSize(),
        bytes_after=proto.ByteSize(), latency_ms=latency, comparison=comparison,
        seconds=time.perf_counter() - start)
    _raise_if_failed(report)
    return proto, report


def _raise_if_failed(report: FoldExportReport) -> None:
    if not report.passed:
        worst = max(report.comparison.outputs, key=lambda o: o.required_atol if o.required_atol == o.required_atol else 0)
        error = VerificationError(
            f"the folded model does not match the original (output {worst.name}: max abs error "
            f"{worst.max_abs_error:.3g}, would need atol {worst.required_atol:.3g}); nothing was written")
        error.report = report
        raise error


def _flatten_outputs(value) -> list[np.ndarray]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, dict):
        value = list(value.values())
    out = []
    for item in value:
        out.extend(_flatten_outputs(item))
    return out
