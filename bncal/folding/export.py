"""Fold BatchNorm, export to ONNX, and prove in onnxruntime that nothing changed.

A PyTorch model is folded as a module first (:func:`bncal.folding.fold`, on a copy that shares
the weights it leaves alone), and the folded copy is exported once
(:func:`bncal.torch.export.export_owned_ir`): exporting BatchNorms costs
torch's exporter more than the fold itself (ResNet-18: the folded model exports in about half
the time). The BNs the module fold must keep for reasons of modules only (hooks, a module called
twice, tied weights) are exported as BatchNormalization and folded in the graph
(:func:`bncal.folding.fold_onnx`); both apply one rulebook, the one :func:`bncal.analyze_foldability`
shows, so ``bncal inspect`` predicts these decisions. Verification gives two figures, so that
each difference is blamed on the step that made it:

- **fold**: the folded model against the model, both in PyTorch eval (and, where the graph
  fold changed the export, the folded graph against the export, both in onnxruntime; per
  output the worse of the two);
- **export**: the exported graph in onnxruntime against the module it was exported from, in
  PyTorch eval (an exporter or runtime difference, never reported as a folding error).

An ``.onnx`` input gets the fold figure only (the folded file against the input file). Every
comparison runs onnxruntime with its graph optimisations off, so the files are compared as
written: onnxruntime's own rewrites (Conv+BN fusion at level "basic") would otherwise differ
between the two graphs and show up as an error of the fold. The tolerance is
:class:`bncal.verify.Tolerance` (default: every element within 1e-4 of its output's scale).
The output file is written only when every comparison passes.

Inputs take the model's own static dimensions, the batch included: verification batches
generated for a graph with a dynamic batch axis hold 1 and 2 samples (:data:`VERIFY_BATCH_SIZES`);
a graph with a fixed batch size gets batches of that size (data batches are cut into pieces of
it); other dynamic dimensions come from the data or from ``input_shapes``. Latency is measured
only when asked (``latency_batches``), after verification has passed; a batch size that a
fixed-batch graph cannot take is skipped with a note.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import BncalError, DeploymentError, VerificationError
from ..gate import require_healthy_notes
from ..report import FoldDecision, ReportDisplay, format_table, output_label, plural

__all__ = [
    "FoldExportReport", "fold_export_torch", "fold_export_onnx", "torch_onnx_parity", "failed_output_path",
    "fit_to_batch_size", "example_feeds", "DEFAULT_LATENCY_BATCHES", "VERIFY_BATCH_SIZES",
]

DEFAULT_LATENCY_BATCHES = (1, 32)
VERIFY_BATCH_SIZES = (1, 2)
_VERIFY_LEVEL = "disable"  # the files as written: see the module docstring


@dataclasses.dataclass(repr=False)
class FoldExportReport(ReportDisplay):
    """What fold-export did: per-BN decisions, before/after figures, and the verification.

    ``decisions`` has one entry per BatchNorm (for a PyTorch model: per BN module, named by
    its module path, and per further BatchNormalization node of a module called more than once).
    ``comparison`` is the fold figure, ``export_comparison`` the export figure (None for an ONNX
    input; see the module docstring). ``ops_before`` counts the ops of the unfolded graph (for a
    PyTorch model, whose BNs are folded before the export: the exported graph's, each BN folded
    beforehand counted back as its BatchNormalization); ``bytes_before`` is None where no
    unfolded graph is made (a PyTorch model folded as a module).
    ``latency_ms`` maps ``"original"``/``"folded"`` to ``{batch size: median ms}`` and
    ``latency_range_ms`` to ``{batch size: [fastest, slowest] ms}`` over the same timed runs (both
    empty unless asked for). ``notes`` say what was adapted or skipped (batch sizes a fixed-batch graph cannot
    take); ``step_seconds`` times each step. ``original`` is the unfolded ONNX model: the input,
    or a PyTorch model's export with ``module_fold=False`` (else None; not part of the JSON report).
    ``guard`` is the accuracy guard's :class:`bncal.guard.GuardReport` (None unless asked for).
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
    export_comparison: object = None
    notes: list[str] = dataclasses.field(default_factory=list)
    step_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_range_ms: dict[str, dict[int, list[float]]] = dataclasses.field(default_factory=dict)
    original: object = dataclasses.field(default=None, repr=False, metadata={"json": False})
    guard: object = None

    @property
    def passed(self) -> bool:
        return (bool(self.comparison.passed) and (self.export_comparison is None or bool(self.export_comparison.passed))
                and (self.guard is None or self.guard.passed))

    @property
    def bn_left(self) -> int:
        return self.ops_after.get("BatchNormalization", 0)

    def summary(self) -> str:
        """``PASSED: folded 7 of 7 BN layers, 0 BatchNormalization left -> model.onnx``."""
        folded = sum(d.folded for d in self.decisions)
        target = f" -> {self.output}" if self.output is not None else ""
        return (f"{'PASSED' if self.passed else 'FAILED'}: folded {folded} of {plural(len(self.decisions), 'BN layer')}, "
                f"{self.bn_left} BatchNormalization left{target}")

    def verdict_line(self) -> str:
        """``PASSED: folded 7 of 7 BN layers, ...; worst output logits: max err 3.1e-07 of its scale
        (tolerance scale_tol=0.0001)`` (FAILED with the output farthest from passing)."""
        from ..verify import distance_from_passing

        figures = [c for c in (self.comparison, self.export_comparison) if c is not None]
        worst = [(c, c.worst()) for c in figures if c.worst() is not None]
        line = self.summary()
        if worst:
            comparison, o = max(worst, key=lambda pair: distance_from_passing(pair[1]))
            error = (o.reason if o.reason else f"max err {o.required_scale_tol:.2g} of its scale")
            line += f"; worst {output_label(o.name)}: {error} (tolerance {comparison.tolerance})"
        return line

    def plot(self, path=None, **options):
        """The error per output against its tolerance, for the fold and the export
        (:func:`bncal.plot.plot_fold_export`; needs matplotlib). Returns a Figure; ``path`` writes it too."""
        from ..plot import plot_fold_export

        return plot_fold_export(self, path, **options)

    def _latency_cell(self, label: str, batch: int) -> str | None:
        """``"5.41 (5.2..6.8)"``: the median and the range of the timed runs."""
        median = self.latency_ms.get(label, {}).get(batch)
        if median is None:
            return None
        spread = self.latency_range_ms.get(label, {}).get(batch)
        return f"{median:.3g}" + (f" ({spread[0]:.3g}..{spread[1]:.3g})" if spread else "")

    def table(self) -> str:
        ops = sorted(set(self.ops_before) | set(self.ops_after), key=lambda k: (-self.ops_before.get(k, 0), k))
        rows = [(op, self.ops_before.get(op, 0), self.ops_after.get(op, 0)) for op in ops]
        rows.append(("file size (bytes)", self.bytes_before, self.bytes_after))
        for batch in sorted(self.latency_ms.get("folded", {})):
            rows.append((f"ORT latency batch {batch} (ms)", self._latency_cell("original", batch),
                         self._latency_cell("folded", batch)))
        parts = [format_table(rows, ["", "original", "folded"], name="ops")]
        if self.latency_range_ms:
            parts.append("latency: median (fastest..slowest) of the timed runs, the two models in alternation")
        refused = [d for d in self.decisions if not d.folded]
        folded = len(self.decisions) - len(refused)
        parts.append(f"\nfolded {folded} of {len(self.decisions)} BatchNorm layers; "
                     f"{self.bn_left} BatchNormalization left in the ONNX graph")
        parts += [f"  kept {d.bn}: {d.reason}" for d in refused]
        parts += [f"note: {note}" for note in self.notes]
        if self.source == "onnx":
            fold = "fold: folded graph vs the original file (onnxruntime, optimisations off)"
        elif self.original is not None:  # exported unfolded, folded in the graph alone
            fold = "fold: folded graph vs the unfolded export (onnxruntime, optimisations off)"
            export = "export: unfolded export in onnxruntime vs PyTorch eval"
        else:
            fold = "fold: folded model vs the model (PyTorch eval; graph folds: onnxruntime, optimisations off)"
            export = "export: exported graph in onnxruntime vs the folded model in PyTorch eval"
        parts += ["", fold, self.comparison.table(name="fold")]
        if self.export_comparison is not None:
            parts += ["", export, self.export_comparison.table(name="export")]
        if self.guard is not None:
            parts += ["", self.guard.table()]
        return "\n".join(parts)


def failed_output_path(output) -> Path:
    """Where ``keep_failed`` puts a model that failed verification: ``<stem>.FAILED-VERIFICATION.onnx``."""
    return Path(output).with_name(Path(output).stem + ".FAILED-VERIFICATION.onnx")


# ------------------------------------------------------------------------------------------------
# Shapes: the model's own static dimensions first


def fit_to_batch_size(batches, size: int | None, notes: list[str] | None = None):
    """Yield ``batches`` (tuples/lists/dicts of arrays or tensors, or bare ones) cut into pieces of
    ``size`` samples (None: unchanged). Samples that do not fill a piece are dropped; each change is
    noted once in ``notes``."""
    said = set()

    def note(text):
        if notes is not None and text not in said:
            said.add(text)
            notes.append(text)

    for batch in batches:
        values = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) else [batch]
        count = len(values[0]) if values and getattr(values[0], "ndim", 1) > 0 else None
        if size is None or count is None or count == size:
            yield batch
            continue
        if count < size:
            note(f"a batch of {count} samples was skipped: the model's batch size is fixed at {size}")
            continue
        note(f"batches of {count} samples were cut into batches of {size}, the model's fixed batch size")
        for start in range(0, count - size + 1, size):
            if isinstance(batch, dict):
                yield {k: v[start:start + size] for k, v in batch.items()}
            elif isinstance(batch, (tuple, list)):
                yield type(batch)(v[start:start + size] for v in batch)
            else:
                yield batch[start:start + size]


def example_feeds(model, *, input_shapes=None, batch_sizes=VERIFY_BATCH_SIZES, seed: int = 0) -> list[dict]:
    """Seeded random feeds ``{input name: array}`` for ``model``'s graph inputs, one per batch size.

    Static dimensions are the model's (a fixed batch size replaces ``batch_sizes``: two batches
    of that size); a dynamic batch axis takes each of ``batch_sizes``; any other dynamic
    dimension needs ``input_shapes`` (shapes in graph-input order, or ``{name: shape}``), which
    then give whole shapes (two batches, as given). Floating inputs are standard normal, others 0.
    """
    from ..onnx.runtime import fixed_batch_size, input_specs

    specs = input_specs(model)
    shapes = _shapes_by_name(specs, input_shapes)
    fixed = fixed_batch_size(specs)
    sizes = [None, None] if shapes or fixed is not None else list(batch_sizes)
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        feeds = {}
        for spec in specs:
            shape = shapes.get(spec.name) or _shape_at_batch(spec, size)
            value = rng.standard_normal(shape) if np.issubdtype(spec.dtype, np.floating) else np.zeros(shape)
            feeds[spec.name] = value.astype(spec.dtype)
        out.append(feeds)
    return out


def _shapes_by_name(specs, input_shapes) -> dict[str, tuple]:
    if not input_shapes:
        return {}
    names = [s.name for s in specs]
    if isinstance(input_shapes, dict):
        unknown = [n for n in input_shapes if n not in names]
        missing = [n for n in names if n not in input_shapes]
        if unknown or missing:
            raise BncalError(f"input shapes given for {list(input_shapes)}, the model's inputs are {names}; "
                             "give one shape per input")
        shapes = {n: tuple(input_shapes[n]) for n in names}
    else:
        if len(input_shapes) != len(names):
            raise BncalError(f"{len(input_shapes)} input shapes given for the model's {len(names)} inputs {names}; "
                             "give one per input, in that order")
        shapes = {n: tuple(s) for n, s in zip(names, input_shapes)}
    for spec in specs:
        shape = shapes[spec.name]
        if spec.shape is None:
            continue
        if len(shape) != len(spec.shape):
            raise BncalError(f"input {spec.name!r} has {len(spec.shape)} dimensions, the shape given "
                             f"{shape} has {len(shape)}")
        for axis, (dim, got) in enumerate(zip(spec.shape, shape)):
            if isinstance(dim, int) and dim > 0 and dim != got:
                raise BncalError(f"input {spec.name!r} fixes dimension {axis} at {dim}, the shape given has {got}; "
                                 f"give the model's own size there")
    return shapes


def _shape_at_batch(spec, size: int | None) -> tuple[int, ...]:
    if spec.shape is None:
        raise BncalError(f"input {spec.name!r} has no known shape; give its shape (--input-shape) or --data")
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0 and size is not None:
            shape.append(size)
        else:
            raise BncalError(f"input {spec.name!r} has a dynamic dimension {axis} ({dim or '?'}) besides the batch; "
                             "give its shape (--input-shape) or --data")
    return tuple(shape)


def _latency_feeds(specs, template: dict, batch_sizes, notes: list[str]) -> dict[int, dict]:
    """Feeds for each latency batch size, shaped like the verification feeds ``template``; sizes
    that a fixed batch forbids are skipped with a note (measured at the fixed size instead when
    none is left)."""
    from ..onnx.runtime import fixed_batch_size, static_batch_size

    fixed = fixed_batch_size(specs)
    sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    if fixed is not None:
        refused = [b for b in sizes if b != fixed]
        if refused:
            sizes = [b for b in sizes if b == fixed] or [fixed]
            notes.append(f"latency at batch {', '.join(map(str, refused))} skipped: the model's batch size is fixed "
                         f"at {fixed}" + ("" if fixed in batch_sizes else f" (measured at {fixed})"))
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        feeds = {}
        for spec in specs:
            value = np.asarray(template[spec.name])
            dynamic = static_batch_size(spec) is None
            shape = (size, *value.shape[1:]) if dynamic and value.ndim else value.shape
            feeds[spec.name] = (rng.standard_normal(shape) if np.issubdtype(value.dtype, np.floating)
                                else np.zeros(shape)).astype(value.dtype)
        out[size] = feeds
    return out


# ------------------------------------------------------------------------------------------------
# Steps: timing and progress


class _Steps:
    """Times each step; reports it to ``progress`` (True: a line on stderr; a callable: the message)."""

    def __init__(self, progress):
        self.report = None
        if callable(progress):
            self.report = progress
        elif progress:
            self.report = lambda message: print(f"bncal: {message}", file=sys.stderr, flush=True)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, message: str):
        if self.report is not None:
            self.report(message)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def _session(proto, what: str):
    from ..onnx.runtime import ort_session

    try:
        return ort_session(proto, optimization_level=_VERIFY_LEVEL)
    except BncalError as exc:
        raise BncalError(f"{what}: {exc}") from exc


def _run(session, feeds: dict, what: str) -> dict[str, np.ndarray]:
    from ..onnx.runtime import run

    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, run(session, names, feeds)))
    except BncalError as exc:
        raise BncalError(f"{what}: {exc}") from exc


def _feeds(session, batch) -> dict:
    from ..onnx.runtime import batch_feeds

    feeds = batch_feeds(batch, [i.name for i in session.get_inputs()])
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in feeds.items()}


# ------------------------------------------------------------------------------------------------
# PyTorch models


def fold_export_torch(
    model,
    example_inputs: tuple,
    output=None,
    *,
    verify_batches: list[tuple] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    scale_tol: float | None = None,
    opset: int | None = None,
    input_names=None,
    output_names=None,
    dynamic_batch: bool = True,
    bn_to_affine: bool = False,
    keep_failed: bool = False,
    latency_batches=(),
    optimization_level: str = "basic",
    module_fold: bool = True,
    fold_fn=None,
    progress=False,
    allow=(),
    guard=None,
    metric=None,
    guard_tol: float | None = None,
) -> tuple[object, FoldExportReport]:
    """Fold a PyTorch model's BatchNorms, export it to ONNX, and verify both steps.

    The model is folded as a module (:func:`bncal.folding.fold`, on a copy), the folded copy is
    exported once (:func:`bncal.torch.export.export_owned_ir`, BNs it kept still as BatchNormalization),
    and the exported graph is folded by the same rules (:func:`bncal.folding.fold_onnx`), which
    fold what only a module must refuse (hooks, a module called twice, tied weights). With
    ``module_fold=False`` the model is exported unchanged and folded in the graph alone, and the
    report keeps that unfolded export as ``report.original`` (for a train/inference check).
    On ``verify_batches`` (tuples of input tensors; default ``example_inputs``, with a dynamic
    batch axis followed by one seeded random sample unless the example is one sample, which is
    traced at batch 2 (:func:`bncal.torch.export.traced_batch`): a batch size the export was not
    traced at) two figures are computed under
    ``Tolerance.given(atol, rtol, scale_tol)``: the fold figure (module docstring) and the
    export figure. With a fixed batch (``dynamic_batch=False``) the batches are cut to the
    example's batch size. The model is never modified. When a comparison fails, nothing is
    written to ``output`` (with ``keep_failed`` the model goes to
    ``<stem>.FAILED-VERIFICATION.onnx``) and :class:`VerificationError` is raised with the report
    as ``exc.report``, naming the step that failed. ``latency_batches`` (batch sizes; default
    none) are timed in onnxruntime at ``optimization_level`` after verification passed.
    ``progress``: True prints each step on stderr, a callable gets each step's message.
    ``fold_fn`` replaces ``fold_onnx`` (tests corrupt a fold with it).

    Before anything is exported the model must pass ``bncal inspect``'s rules
    (:func:`bncal.gate.require_healthy`): an error-severity finding (statistics never updated,
    degenerate statistics...) raises :class:`bncal.errors.DeploymentError` unless ``allow``
    names its rule (``allow=["BN001"]``); an allowed one is noted in the report.

    ``guard`` (held-out ``(inputs, labels)`` batches or a labelled data spec, :mod:`bncal.guard`):
    after verification, the exported model is scored in onnxruntime with ``metric`` (default
    top-1) against the model itself and against the model normalising with the guard batches'
    own statistics; worse than the better of the two by more than ``guard_tol`` points (default
    0.5) raises :class:`bncal.errors.DeploymentError` (``exc.report`` this report, its
    ``guard`` filled in) and nothing is written.

    Returns ``(folded, report)``: ``folded`` is the verified model as an ``onnx_ir.Model``, as
    torch's exporter builds it (``onnx_ir.to_proto(folded)`` gives a ``ModelProto``). It is
    never copied into a ``ModelProto`` here: its weights that the fold left alone are the
    model's own tensors, written to the file and given to onnxruntime from their memory
    (:mod:`bncal.onnx.io`; ``tools/bench_fold.py`` measures the cost), so a change to the model's weights afterwards shows in ``folded`` too.
    """
    import onnx_ir as ir
    import torch

    from ..torch.export import export_onnx, export_owned_ir, traced_batch
    from . import check_initialized, fold, fold_onnx, op_counts
    from ..onnx.io import serialized_size

    start = time.perf_counter()
    steps = _Steps(progress)
    notes: list[str] = require_healthy_notes(model, allow=allow, action="export it")
    example_inputs = tuple(example_inputs)
    with steps("fold", "folding BatchNorms in the model"):
        if module_fold:
            # Only exported and run: the copy may share the weights the fold leaves alone.
            module = fold(model, example_inputs, bn_to_affine=bn_to_affine, copy_weights=False)
            work = module.model
        else:
            check_initialized(model)
            module, work = None, copy.deepcopy(model).eval()
        _out_of_place(work)
    with steps("export", "exporting with torch.onnx.export"):
        names = dict(opset=opset, input_names=input_names, output_names=output_names, dynamic_batch=dynamic_batch)
        folded = export_owned_ir(work, example_inputs, keep_batchnorm=True, **names)
    ops_exported = op_counts(folded)
    # A ModelProto of the export only where the graph fold or the caller needs one.
    exported = ir.serde.serialize_model(folded) if module is None or ops_exported.get("BatchNormalization") else None
    graph_decisions, graph_folded = [], False
    if ops_exported.get("BatchNormalization"):
        with steps("fold", "folding the BatchNorms left in the graph"):
            proto, graph_decisions = (fold_fn or fold_onnx)(exported, bn_to_affine=bn_to_affine)
            graph_folded = any(d.folded for d in graph_decisions)
            if graph_folded:
                folded = ir.serde.deserialize_model(proto)
    decisions = _merged_decisions(module.decisions if module is not None else [], graph_decisions)
    tensors = all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs)
    if verify_batches is None:
        verify_batches = [example_inputs]
        traced_at_example = traced_batch(example_inputs) is example_inputs  # else traced at twice its one sample
        if dynamic_batch and tensors and traced_at_example:
            # A batch size the export was not traced at: the example and one seeded sample more.
            g = torch.Generator().manual_seed(1)
            verify_batches = [tuple(torch.cat([x, torch.randn((1, *x.shape[1:]), generator=g).to(x.dtype)
                                               if x.is_floating_point() else x[:1]]) for x in example_inputs)]
    elif not dynamic_batch and tensors:
        verify_batches = list(fit_to_batch_size(verify_batches, example_inputs[0].shape[0], notes))
    with steps("verify", "verifying in onnxruntime"):
        fold_figure, export_figure, feeds = _verify_torch(
            model, None if module is None else module.model, exported if graph_folded else None, folded,
            verify_batches, steps, dict(atol=atol, rtol=rtol, scale_tol=scale_tol))
    report = FoldExportReport(
        source="pytorch", output=None, decisions=decisions, ops_before=_unfolded_op_counts(ops_exported, module),
        ops_after=op_counts(folded), bytes_before=None if module is not None else exported.ByteSize(),
        bytes_after=serialized_size(folded), latency_ms={}, comparison=fold_figure, seconds=0.0,
        export_comparison=export_figure, notes=notes, step_seconds=steps.seconds,
        original=exported if module is None else None)
    unfolded = exported if module is None else (lambda: export_onnx(model, example_inputs, keep_batchnorm=True, **names))
    _finish(report, folded, unfolded, output, feeds, latency_batches, optimization_level, keep_failed, steps, start,
            _guard(model, folded, guard, metric, guard_tol))
    return folded, report


def _out_of_place(module) -> None:
    """Run the activations of ``module`` (a copy fold-export owns) out of place.

    The value is the same and an ONNX graph has no in-place ops anyway, but torch's exporter pays
    for functionalising them under a dynamic batch axis: MobileNetV2's ReLU6(inplace=True) costs
    its decompositions 5.4 s against 1.2 s out of place (2 cores). A forward that reads a tensor
    after an in-place activation changed it would compute something else: the fold figure
    (this copy against the model) or, for a copy exported unfolded, the export figure shows it.
    """
    for sub in module.modules():
        if isinstance(getattr(sub, "inplace", None), bool):
            sub.inplace = False


def _merged_decisions(module_decisions, graph_decisions) -> list[FoldDecision]:
    """One decision per BN: the module fold's where it folded (or the BN never reached the
    graph), else the graph fold's on its node (named after the module); nodes of a module
    called more than once follow their module's entry."""
    by_name = {d.bn: d for d in graph_decisions}
    merged, taken = [], set()
    for d in module_decisions:
        if not d.folded and d.bn in by_name:
            d = by_name[d.bn]
            taken.add(d.bn)
        merged.append(d)
    return merged + [d for d in graph_decisions if d.bn not in taken]


def _unfolded_op_counts(exported_ops: dict[str, int], module) -> dict[str, int]:
    """The op counts of the model's export without any fold: the exported graph's, with each BN
    the module fold removed counted back as the one BatchNormalization it exports as (a BN
    turned into an affine map exports as Mul + Add instead)."""
    from .rules import TO_AFFINE

    counts = dict(exported_ops)
    for d in module.decisions if module is not None else []:
        if not d.folded:
            continue
        counts["BatchNormalization"] = counts.get("BatchNormalization", 0) + 1
        if d.direction == TO_AFFINE:
            for op in ("Mul", "Add"):
                counts[op] -= 1
    return {op: n for op, n in counts.items() if n}


def _verify_torch(model, folded_module, exported, folded, batches, steps, tolerance):
    """The fold and export figures of :func:`fold_export_torch`.

    Fold figure: ``folded_module`` against ``model``, both in PyTorch eval (exact when nothing
    was folded in the module), and, when the graph fold changed ``exported``, the folded graph
    against ``exported`` in onnxruntime: per output the worse of the two. Export figure:
    ``exported`` (the folded graph when the graph fold changed nothing) in onnxruntime against
    the module it was exported from, in PyTorch eval. Sessions run with optimisations off.
    """
    import torch

    from ..torch.passes import output_arrays
    from ..verify import compare_outputs

    folded_session = _session(folded, "onnxruntime cannot load the folded model")
    exported_session = None if exported is None else _session(exported, "onnxruntime cannot load the export")
    names = [o.name for o in folded_session.get_outputs()]
    reference, module_folded, exported_got, graph_folded = {}, {}, {}, {}
    feeds = None
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if steps.report is not None and len(batches) > 1:
                    steps.report(f"verifying batch {index + 1} of {len(batches)}")
                batch = tuple(batch)
                expected = output_arrays(model(*batch))
                if len(expected) != len(names):
                    raise BncalError(f"the model returns {len(expected)} tensors, its export has {len(names)} outputs")
                folded = expected if folded_module is None else output_arrays(folded_module(*batch))
                feeds = _feeds(folded_session, batch)
                got = _run(folded_session, feeds, "the folded model")
                before = got if exported_session is None else _run(exported_session, feeds, "the export")
                for name, value, value_folded in zip(names, expected, folded):
                    reference.setdefault(name, []).append(value)
                    module_folded.setdefault(name, []).append(value_folded)
                    exported_got.setdefault(name, []).append(before[name])
                    graph_folded.setdefault(name, []).append(got.get(name))
    finally:
        for m, training in modes.items():
            m.training = training
    fold_figure = compare_outputs(reference, module_folded, **tolerance)
    if exported_session is not None:
        fold_figure = fold_figure.worse_per_output(compare_outputs(exported_got, graph_folded, **tolerance))
    return fold_figure, compare_outputs(module_folded, exported_got, **tolerance), feeds


def torch_onnx_parity(model, proto, batches, *, atol: float | None = None, rtol: float | None = None,
                      scale_tol: float | None = None, optimization_level: str = "basic"):
    """Compare ``model`` in eval mode (PyTorch) with ``proto`` in onnxruntime on ``batches``
    (tuples of input tensors), under ``Tolerance.given(atol, rtol, scale_tol)``. The model's
    train/eval flags are restored afterwards."""
    import torch

    from ..onnx.runtime import ort_session
    from ..torch.passes import output_arrays
    from ..verify import compare_outputs

    names = [o.name for o in proto.graph.output]
    session = ort_session(proto, optimization_level=optimization_level)
    reference, actual = {}, {}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = tuple(batch)
                got = _run(session, _feeds(session, batch), "the exported model")
                for name, value in zip(names, output_arrays(model(*batch))):
                    reference.setdefault(name, []).append(value)
                    actual.setdefault(name, []).append(got[name])
    finally:
        for m, training in modes.items():
            m.training = training
    return compare_outputs(reference, actual, atol=atol, rtol=rtol, scale_tol=scale_tol)


# ------------------------------------------------------------------------------------------------
# ONNX models


def fold_export_onnx(
    model,
    output=None,
    *,
    verify_feeds: list | None = None,
    input_shapes=None,
    atol: float | None = None,
    rtol: float | None = None,
    scale_tol: float | None = None,
    bn_to_affine: bool = False,
    keep_failed: bool = False,
    latency_batches=(),
    optimization_level: str = "basic",
    treat_initializer_inputs_as_constant: bool = False,
    fold_fn=None,
    progress=False,
    allow=(),
    guard=None,
    metric=None,
    guard_tol: float | None = None,
) -> tuple[object, FoldExportReport]:
    """Fold the BatchNorms of an ONNX model and verify the result against the original in onnxruntime.

    ``verify_feeds`` are batches (``{input name: array}`` dicts, tuples in graph-input order, or
    a bare array for one input), cut to the model's batch size where it fixes one; default:
    :func:`example_feeds` (the model's static dimensions, ``input_shapes`` for dynamic ones).
    Both models run with onnxruntime's optimisations off. Output, failure, latency, progress and
    the health rules (``allow``) and the accuracy guard (``guard``, ``metric``, ``guard_tol``) as in
    :func:`fold_export_torch`.
    """
    from . import fold_onnx, op_counts
    from ..onnx.runtime import fixed_batch_size, input_specs
    from ..verify import compare_outputs

    start = time.perf_counter()
    steps = _Steps(progress)
    notes: list[str] = require_healthy_notes(model, allow=allow, action="export it")
    specs = input_specs(model)
    if verify_feeds is None:
        verify_feeds = example_feeds(model, input_shapes=input_shapes)
    else:
        verify_feeds = list(fit_to_batch_size(verify_feeds, fixed_batch_size(specs), notes))
        if not verify_feeds:
            raise BncalError("no batch to verify on fits the model's fixed batch size; give batches of "
                             f"{fixed_batch_size(specs)} samples or more")
    with steps("fold", "folding BatchNorms in the graph"):
        proto, decisions = (fold_fn or fold_onnx)(model, bn_to_affine=bn_to_affine,
                                                  treat_initializer_inputs_as_constant=treat_initializer_inputs_as_constant)
    with steps("verify", "verifying in onnxruntime"):
        original_session = _session(model, "onnxruntime cannot load the model")
        folded_session = _session(proto, "onnxruntime cannot load the folded model")
        reference, actual = {}, {}
        feeds = None
        for batch in verify_feeds:
            feeds = _feeds(original_session, batch)
            expected = _run(original_session, feeds, "the original model")
            got = _run(folded_session, feeds, "the folded model")
            for name in expected:
                reference.setdefault(name, []).append(expected[name])
                actual.setdefault(name, []).append(got.get(name))
        comparison = compare_outputs(reference, actual, atol=atol, rtol=rtol, scale_tol=scale_tol)
    report = FoldExportReport(
        source="onnx", output=None, decisions=decisions, ops_before=op_counts(model), ops_after=op_counts(proto),
        bytes_before=model.ByteSize(), bytes_after=proto.ByteSize(), latency_ms={}, comparison=comparison,
        seconds=0.0, notes=notes, step_seconds=steps.seconds, original=model)
    _finish(report, proto, model, output, feeds, latency_batches, optimization_level, keep_failed, steps, start,
            _guard(model, proto, guard, metric, guard_tol))
    return proto, report


# ------------------------------------------------------------------------------------------------
# Shared ending: verdict, latency, writing


def _guard(model, exported, guard, metric, tol):
    """The accuracy guard of the exported model, as a callable (None without ``guard``)."""
    if guard is None:
        return None
    from ..guard import run_guard

    return lambda: run_guard({"onnxruntime": exported}, guard, before=model, judged="onnxruntime", metric=metric,
                             tol=tol)


def _finish(report, proto, unfolded, output, feeds, latency_batches, level, keep_failed, steps, start,
            guard=None) -> None:
    """Raise for a failed verification (after keeping the file if asked); else run the accuracy
    ``guard`` (a callable giving its report) and raise if it failed; else measure latency
    (``unfolded``: the model to compare with, or a callable that makes it) and write ``output``."""
    from ..onnx.io import save_onnx
    from ..onnx.runtime import input_specs, latency_runs

    if not report.passed:
        if output is not None and keep_failed:
            save_onnx(proto, failed_output_path(output))
        report.seconds = time.perf_counter() - start
        raise _verification_error(report)
    if guard is not None:
        with steps("guard", "scoring the accuracy guard in onnxruntime"):
            report.guard = guard()
        if not report.guard.passed:
            report.seconds = time.perf_counter() - start
            raise DeploymentError(f"{report.guard.reason()}; nothing was written", report=report)
    if latency_batches:
        with steps("latency", "measuring latency in onnxruntime"):
            unfolded = unfolded() if callable(unfolded) else unfolded
            by_batch = _latency_feeds(input_specs(unfolded), feeds, latency_batches, report.notes)
            runs = latency_runs({"original": unfolded, "folded": proto}, by_batch, optimization_level=level)
            report.latency_ms = {label: {batch: round(statistics.median(times), 3) for batch, times in by_batch.items()}
                                 for label, by_batch in runs.items()}
            report.latency_range_ms = {label: {batch: [round(min(times), 3), round(max(times), 3)]
                                               for batch, times in by_batch.items()} for label, by_batch in runs.items()}
    if output is not None:
        with steps("write", f"writing {output}"):
            report.output = save_onnx(proto, output)
    report.seconds = time.perf_counter() - start


def _verification_error(report: FoldExportReport) -> VerificationError:
    """The error for a failed verification, blaming the step whose figure failed."""
    def worst(comparison) -> str:
        o = comparison.worst()
        if o is None:
            return "no outputs were compared"
        if o.reason:
            return f"{output_label(o.name)}: {o.reason}"
        return (f"{output_label(o.name)}: max abs error {o.max_abs_error:.3g} = {o.required_scale_tol:.3g} of the output's "
                f"scale {o.scale:.3g}, would need atol {o.required_atol:.3g} or rtol {o.required_rtol:.3g}; "
                f"tolerance {comparison.tolerance}")

    if not report.comparison.passed:
        message = f"the folded model does not match the original ({worst(report.comparison)}); nothing was written"
    else:
        fold = report.comparison.worst()
        exact = f" (the fold itself is within {fold.required_scale_tol:.2g} of the scale)" if fold is not None else ""
        message = (f"the export differs from the model it was exported from, in onnxruntime: an exporter or runtime "
                   f"difference, not the fold{exact} ({worst(report.export_comparison)}); nothing was written; "
                   "loosen the tolerance (--scale-tol, --atol/--rtol) if this difference is acceptable")
    error = VerificationError(message)
    error.report = report
    return error
