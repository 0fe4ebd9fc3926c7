"""The accuracy guard: a model that got worse on held-out labelled data is not written.

``recalibrate`` and ``fold-export`` (``--guard DATA``; library: ``guard=``) and
:func:`bncal.assert_deployable` score the model on a held-out labelled set with a metric
(default top-1 accuracy; ``--metric file.py:function``) and refuse the result when its score is
worse than the **baseline** by more than the tolerance (default 0.5 percentage points).

The baseline is the better of two scores of the model as given:

- **before**: in inference mode, as it was before the command (the step must not make it worse);
- **batch statistics**: with every BatchNorm normalising by each guard batch's own statistics,
  what training computed (the moving statistics stay untouched; dropout stays off). A model
  whose moving statistics are stale scores far below it (the shipped MNIST CNN: 10 % against
  97 %), so a stale model, or one recalibrated on data of another distribution, is refused by
  ``fold-export`` too, where before and after are the same model. Batches of one sample, and
  batch renormalisation layers (whose training forward is not plain batch statistics), have no
  such score; the report says so.

The result scored is the recalibrated model (``recalibrate``), or the exported ONNX file in
onnxruntime (``fold-export``), or the model as given (:func:`assert_deployable`).

A metric is ``metric(outputs, labels) -> float``, higher is better, in [0, 1] like an accuracy
(reported in percent, the tolerance in percentage points): ``outputs`` is the model's first
output over the whole guard set (numpy, samples first), ``labels`` the labels, concatenated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import BncalError
from .extras import is_torch_module
from .report import ReportDisplay, format_table, plural

__all__ = ["GuardReport", "DEFAULT_GUARD_TOL", "top1", "load_metric", "guard_batches", "score", "start_guard",
           "run_guard", "guard_model"]

#: Largest drop allowed, in percentage points of the metric.
DEFAULT_GUARD_TOL = 0.5
BEFORE, BATCH_STATS = "before", "batch statistics"


def top1(outputs, labels) -> float:
    """Top-1 accuracy: the fraction of samples whose arg-max over axis 1 is the label (labels as
    class indices, or one-hot / scores over axis 1)."""
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if outputs.ndim != 2:
        raise BncalError(f"top-1 needs outputs of shape (N, classes), the model's first output has shape "
                         f"{outputs.shape}; give --metric file.py:function for other outputs")
    if labels.ndim == 2:
        labels = labels.argmax(1)
    return float(np.mean(outputs.argmax(1) == labels.reshape(-1)))


def load_metric(metric):
    """``(name, function)`` for a metric: None (top-1), a callable, or a ``file.py:function`` spec."""
    if metric is None:
        return "top-1", top1
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    from .specs import resolve_callable

    function = resolve_callable(str(metric), "metric")
    if not callable(function):
        raise BncalError(f"metric {metric} is not a function; give file.py:function taking (outputs, labels)")
    return str(metric), function


def guard_batches(guard, *, batch_size: int | None = None, image_options=None, normalize: bool = False):
    """The guard data as re-iterable ``(inputs, labels)`` batches: a spec for
    :func:`bncal.data.load_labelled_data`, or batches as they are (a one-shot iterator is read
    into a list)."""
    from pathlib import Path

    if isinstance(guard, (str, Path)):
        from .data import load_labelled_data

        return load_labelled_data(guard, batch_size=batch_size, image_options=image_options, normalize=normalize)
    return list(guard) if iter(guard) is guard else guard


@dataclasses.dataclass(repr=False)
class GuardReport(ReportDisplay):
    """The guard's scores (fractions) by what was scored, what was judged against which baseline.

    ``scores`` maps ``"before"``, ``"batch statistics"``, ``"after"`` / ``"onnxruntime"`` (the
    scored result, named by ``judged``) to the metric; ``baseline`` is the key of the better
    reference; ``tol`` the largest drop allowed, in percentage points.
    """

    metric: str
    samples: int
    scores: dict[str, float]
    judged: str
    baseline: str
    tol: float
    notes: list[str] = dataclasses.field(default_factory=list)
    _batches: object = dataclasses.field(default=None, repr=False, compare=False, metadata={"json": False})
    _function: object = dataclasses.field(default=None, repr=False, compare=False, metadata={"json": False})

    def judge(self, label: str, model=None, *, judged: bool = True) -> "GuardReport":
        """Score ``model`` as ``label`` (None: judge a score already taken); when ``judged``, it is
        the result and the baseline becomes the better of the other references."""
        if model is not None:
            self.scores[label], _ = score(model, self._batches, self._function)
        if judged:
            self.judged = label
            references = [key for key in self.scores if key != label and key in self._references]
            self.baseline = max(references, key=lambda key: self.scores[key] if math.isfinite(self.scores[key])
                                else -math.inf, default=label)
        return self

    @property
    def _references(self) -> list[str]:
        first = next(iter(self.scores))  # the model as given, scored first
        return [first, BATCH_STATS]

    @property
    def drop(self) -> float:
        """How far the judged score is below the baseline, in percentage points (negative: above)."""
        return 100.0 * (self.scores[self.baseline] - self.scores[self.judged])

    @property
    def passed(self) -> bool:
        return math.isfinite(self.scores[self.judged]) and self.drop <= self.tol

    def reason(self) -> str:
        """Why the guard failed, in one sentence."""
        return (f"accuracy guard: {self.metric} {self._pct(self.judged)} ({self.judged}) is {self.drop:.2f} points "
                f"below {self._pct(self.baseline)} ({self.baseline}), more than the {self.tol:g} allowed "
                "(--guard-tol)")

    def _pct(self, key: str) -> str:
        return f"{100 * self.scores[key]:.2f} %"

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{verdict}: {self.metric} {self._pct(self.judged)} ({self.judged}) vs {self._pct(self.baseline)} "
                f"({self.baseline}), tolerance {self.tol:g} points ({plural(self.samples, 'sample')})")

    def table(self) -> str:
        rows = [(key, f"{100 * value:.2f} %", "baseline" if key == self.baseline else
                 "judged" if key == self.judged else "") for key, value in self.scores.items()]
        lines = [f"accuracy guard ({self.metric}, {plural(self.samples, 'held-out sample')}):",
                 format_table(rows, ["model", self.metric, "role"])]
        lines += [f"note: {note}" for note in self.notes]
        lines.append(self.summary() if self.passed else f"FAILED: {self.reason()}")
        return "\n".join(lines)


def score(model, batches, metric, *, batch_stats: bool = False) -> tuple[float, int]:
    """``(metric value, samples)`` of ``model`` (a PyTorch module, run in eval mode without
    gradients, or an ONNX model run in onnxruntime) on ``(inputs, labels)`` ``batches``; with
    ``batch_stats`` every BatchNorm normalises by each batch's own statistics (moving
    statistics and train/eval flags untouched). ``metric`` is a function as in the module docstring."""
    from .keras import is_keras_model

    if is_keras_model(model):  # an nn.Module too on Keras's torch backend: ask first
        raise BncalError("the accuracy guard scores PyTorch and ONNX models; score a Keras model on your held-out "
                         "data yourself")
    inputs, labels = [], []
    run = _torch_outputs if is_torch_module(model) else _onnx_outputs
    for index, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise BncalError(f"guard batch {index} is not an (inputs, labels) pair; the guard needs labelled data")
        inputs.append(batch[0])
        labels.append(np.asarray(batch[1].detach().cpu() if hasattr(batch[1], "detach") else batch[1]))
    if not labels:
        raise BncalError("the guard data is empty; give at least one labelled batch")
    got = run(model, inputs, batch_stats)
    value = float(metric(np.concatenate(got), np.concatenate(labels)))
    return value, sum(len(l) for l in labels)


def _torch_outputs(model, inputs, batch_stats: bool) -> list[np.ndarray]:
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from .data import TorchBatches
    from .torch.export import positional_inputs
    from .torch.passes import output_arrays

    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype, device = (parameter.dtype, parameter.device) if parameter is not None else (None, "cpu")
    modes = {m: (m.training, getattr(m, "track_running_stats", None)) for m in model.modules()}
    got = []
    try:
        model.eval()
        if batch_stats:
            for m in model.modules():
                if isinstance(m, _BatchNorm):  # batch statistics, nothing stored (torch skips the update)
                    m.train()
                    m.track_running_stats = False
        with torch.no_grad():
            for batch in TorchBatches(inputs, dtype):
                args, _ = positional_inputs(model, batch)
                out = model(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
                got.append(output_arrays(out)[0])
    finally:
        for m, (training, track) in modes.items():
            m.training = training
            if track is not None:
                m.track_running_stats = track
    return got


def _onnx_outputs(model, inputs, batch_stats: bool) -> list[np.ndarray]:
    from .data import NumpyBatches
    from .onnx.runtime import batch_feeds, ort_session, run

    if batch_stats:
        import onnx_ir as ir

        from .onnx.graphs import make_train_graph

        proto = model if type(model).__name__ == "ModelProto" else ir.serde.serialize_model(model)
        model, _ = make_train_graph(proto)
    session = ort_session(model)
    names = [i.name for i in session.get_inputs()]
    first = session.get_outputs()[0].name
    return [run(session, [first], batch_feeds(batch, names, index), index=index)[0]
            for index, batch in enumerate(NumpyBatches(inputs))]


def _batch_stats_note(model, batches) -> str | None:
    """Why the batch-statistics score cannot be taken, or None when it can."""
    if any(_leading(inputs) < 2 for inputs, _ in batches):
        return "no batch-statistics score: a guard batch holds fewer than 2 samples"
    if is_torch_module(model):
        from .torch.nn import is_batch_renorm

        if any(is_batch_renorm(m) for m in model.modules()):
            return "no batch-statistics score: batch renormalisation layers train with renorm statistics, not batch ones"
    return None


def _leading(inputs) -> int:
    from .data import leading_size

    return leading_size(inputs) or 0


def start_guard(before, guard, *, before_label: str = BEFORE, metric=None, tol: float | None = None,
                batch_size: int | None = None, image_options=None, normalize: bool = False) -> GuardReport:
    """Score ``before`` (the model as given) as ``before_label`` and with batch statistics on
    ``guard`` (:func:`guard_batches`; the other keywords are for a data spec); the result is
    scored afterwards with :meth:`GuardReport.judge` (so a model changed in place can be
    scored before and after without a copy)."""
    name, function = load_metric(metric)
    tol = DEFAULT_GUARD_TOL if tol is None else float(tol)
    if not (math.isfinite(tol) and tol >= 0):
        raise BncalError(f"guard tolerance {tol!r}: give a finite number of points >= 0")
    batches = guard_batches(guard, batch_size=batch_size, image_options=image_options, normalize=normalize)
    scores, notes = {}, []
    scores[before_label], samples = score(before, batches, function)
    note = _batch_stats_note(before, batches)
    if note:
        notes.append(note)
    else:
        scores[BATCH_STATS], _ = score(before, batches, function, batch_stats=True)
    report = GuardReport(metric=name, samples=samples, scores=scores, judged=before_label, baseline=before_label,
                         tol=tol, notes=notes)
    report._batches, report._function = batches, function
    return report


def run_guard(scored: dict[str, object], guard, *, before, judged: str, **options) -> GuardReport:
    """:func:`start_guard` on ``before``, then :meth:`GuardReport.judge` of each model of
    ``scored`` (label -> model), ``judged`` naming the result. Raises nothing for a failed
    guard: the caller decides (``report.passed``)."""
    report = start_guard(before, guard, **options)
    for label, model in scored.items():
        report.judge(label, model, judged=label == judged)
    if judged not in scored:
        report.judge(judged)
    return report


def guarded_step(model, guard, metric=None, tol=None):
    """Before a step that changes ``model`` in place: the guard started on it (its score as given),
    or None without ``guard``; after the step, :func:`finish_step` judges the result."""
    return None if guard is None else start_guard(model, guard, metric=metric, tol=tol)


def finish_step(report: GuardReport | None, result, step_report, *, restore=None) -> None:
    """Judge ``result`` as ``"after"`` against the guard ``report`` started before the step, attach
    it to ``step_report.guard``; if it got worse, call ``restore`` (undoing an in-place step) and
    raise :class:`bncal.errors.DeploymentError` (``exc.report`` the ``step_report``)."""
    from .errors import DeploymentError

    if report is None:
        return
    step_report.guard = report.judge("after", result)
    if not report.passed:
        if restore is not None:
            restore()
        raise DeploymentError(f"{report.reason()}; nothing was written", report=step_report)


def guard_model(model, guard, *, metric=None, tol: float | None = None) -> GuardReport:
    """The guard on ``model`` as it is (:func:`bncal.assert_deployable`): its inference score
    against its batch-statistics score."""
    return run_guard({}, guard, before=model, before_label="inference", judged="inference", metric=metric, tol=tol)
