"""Check an ONNX model's BatchNorm statistics against its data, in onnxruntime.

A BN computes one thing in training (normalise with the batch's statistics) and another at
inference (normalise with the stored moving statistics). The two agree only when the moving
statistics are those of the data the BN sees. :func:`check_onnx` runs the inference graph and
the train-mode graph (:func:`bncal.onnx_graphs.make_train_graph`, statistics exposed) on the
same calibration batches and reports:

- per BN layer (exact, the primary test): the moving statistics against the population
  statistics of the layer's input over all batches (merged exactly by
  :class:`bncal.stats.ChannelMoments`): the largest mean shift in units of
  ``sqrt(population var + eps)`` and the variance ratio ``(moving var + eps) / (population var
  + eps)`` farthest from 1. Both are measured in the units that matter: how much the BN's
  normalised output moves.
- per model output: agreement of inference-mode and train-mode outputs. Even perfect moving
  statistics leave differences from batch-to-batch noise of the batch statistics, so this
  part uses loose thresholds (see :class:`CheckThresholds`).

The verdict needs neither onnx nor onnxruntime: :func:`assess_layer`, :class:`OutputAgreement`
and :meth:`CheckReport.from_checks` take numbers from any framework; only :func:`check_onnx`
imports the ONNX modules, when called.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np

from .errors import BncalError
from .report import ReportDisplay, SkippedLayer, format_table, plural, summarize_shift
from .stats import ChannelMoments

__all__ = ["CheckThresholds", "LayerCheck", "OutputCheck", "CheckReport", "OutputAgreement", "assess_layer",
           "check_onnx"]


@dataclasses.dataclass(frozen=True)
class CheckThresholds:
    """Limits for :func:`check_onnx`; a model passes when every layer and output is within them.

    ``max_mean_shift`` (0.1): largest per-channel ``|moving mean - population mean| /
    sqrt(population var + eps)``: the BN output moves by that many of its own standard
    deviations (times ``|scale|``). Stale statistics are typically off by 0.3 to several units
    (the shipped stale MNIST CNN: 6).

    ``max_var_log_ratio`` (0.2): largest per-channel ``|log((moving var + eps) / (population
    var + eps))|``, i.e. the moving variance within -18 % / +22 % of the population one (the
    BN output's scale within about 10 %). The stale MNIST CNN: 2.9.

    ``noise_allowance`` (3.0): the population statistics are themselves estimated from the
    check's n values per channel, with standard errors ``1/sqrt(n)`` (mean shift, in sd) and
    ``sqrt(2/n)`` (log variance). Each layer's limits are widened by this many standard errors,
    so checking on held-out data does not fail layers that see few values: a BatchNorm1d
    recalibrated on 1024 MNIST digits and checked on 512 others measures a shift of 0.12 and
    a log variance ratio of 0.17 from sampling alone (limits there: 0.23 and 0.39); a conv
    layer with 25,000 values per channel gets 0.12 and 0.23.

    ``min_top1_agreement`` (0.8): for ``(N, classes)`` float outputs, the fraction of samples
    whose arg-max is the same in inference and train mode. Train mode itself depends on the
    batch, so a perfect model does not reach 1: measured 0.98 to 1.0 for the recalibrated
    MNIST CNN at batch sizes 16 to 64, 0.91 for a randomly initialised ResNet at batch 32
    (its logits have tiny margins); 0.0 to 0.21 for stale models.

    ``max_output_rel_error`` (0.5): ``rms(inference - train output) / rms(train output)`` over
    all batches. Measured 0.12 to 0.24 (MNIST CNN, batch 64 to 16) and 0.06 (ResNet, batch
    32) once recalibrated, 0.97 and 1.2 when stale.

    The layer test is the precise one; the output tests catch what it cannot see (a BN bncal
    had to skip, a wrong graph) and need batches drawn at random from the data: batches that
    each hold one class have batch statistics far from the population, and train mode then
    disagrees with any inference model.
    """

    max_mean_shift: float = 0.1
    max_var_log_ratio: float = 0.2
    noise_allowance: float = 3.0
    min_top1_agreement: float = 0.8
    max_output_rel_error: float = 0.5


@dataclasses.dataclass
class LayerCheck:
    """One BN layer: moving statistics against the population statistics of its input.

    ``shift_limit`` and ``log_ratio_limit`` are the thresholds after the noise allowance for
    this layer's ``samples`` (values per channel).
    """

    name: str
    channels: int
    samples: int
    mean_shift: float
    var_ratio: float
    shift_limit: float
    log_ratio_limit: float
    passed: bool


@dataclasses.dataclass
class OutputCheck:
    """One model output: inference mode against train mode.

    ``rel_error`` is ``rms(inference - train) / rms(train)``; ``max_abs_error`` the largest
    element difference; ``top1_agreement`` is None unless the output is ``(N, classes)``.
    """

    name: str
    max_abs_error: float
    rel_error: float
    top1_agreement: float | None
    passed: bool


@dataclasses.dataclass(repr=False)
class CheckReport(ReportDisplay):
    """The outcome of a check: ``passed``, the ``reasons`` it failed, the details.

    Built by :meth:`from_checks` (by :func:`check_onnx`, and by any other framework's check).
    """

    passed: bool
    reasons: list[str]
    layers: list[LayerCheck]
    outputs: list[OutputCheck]
    skipped: list[SkippedLayer]
    thresholds: CheckThresholds
    batches: int
    samples: int

    @classmethod
    def from_checks(cls, layers: list[LayerCheck], outputs: list[OutputCheck], skipped: list[SkippedLayer],
                    thresholds: CheckThresholds, batches: int, samples: int) -> "CheckReport":
        """The verdict over per-layer (:func:`assess_layer`) and per-output
        (:meth:`OutputAgreement.check`) results: passed when every one passed; one reason for
        the failed layers (naming the worst), one per failed output."""
        reasons = []
        bad = [l for l in layers if not l.passed]
        if bad:
            worst = max(bad, key=lambda l: l.mean_shift if math.isfinite(l.mean_shift) else math.inf)
            reasons.append(f"{len(bad)} of {len(layers)} BatchNorm layers have moving statistics off their data "
                           f"(worst {worst.name}: mean shift {worst.mean_shift:.3g} sd, var ratio "
                           f"{worst.var_ratio:.3g}); recalibrate them")
        for o in outputs:
            if not o.passed:
                detail = f"relative error {o.rel_error:.3g}" + (
                    "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.3g}")
                reasons.append(f"output {o.name} differs between inference and train mode ({detail})")
        return cls(passed=not reasons, reasons=reasons, layers=list(layers), outputs=list(outputs),
                   skipped=list(skipped), thresholds=thresholds, batches=batches, samples=samples)

    @property
    def verdict(self) -> str:
        return "PASSED" if self.passed else "FAILED"

    def summary(self) -> str:
        """``FAILED: 7 of 7 BN layers off their data, 1 of 1 output off train mode (1000 samples)``."""
        bad_layers = sum(not l.passed for l in self.layers)
        bad_outputs = sum(not o.passed for o in self.outputs)
        if self.passed:
            return (f"PASSED: {plural(len(self.layers), 'BN layer')} and {plural(len(self.outputs), 'output')} "
                    f"within limits ({plural(self.samples, 'sample')})")
        return (f"FAILED: {bad_layers} of {plural(len(self.layers), 'BN layer')} off their data, {bad_outputs} of "
                f"{plural(len(self.outputs), 'output')} off train mode ({plural(self.samples, 'sample')})")

    def table(self) -> str:
        """Layer table, output table, skipped layers, thresholds, then the verdict line."""
        t = self.thresholds
        layer_rows = [(l.name, l.channels, l.samples, l.mean_shift, l.shift_limit, l.var_ratio,
                       f"{math.exp(-l.log_ratio_limit):.3g}..{math.exp(l.log_ratio_limit):.3g}",
                       "pass" if l.passed else "FAIL") for l in self.layers]
        output_rows = [(o.name, o.max_abs_error, o.rel_error, o.top1_agreement, "pass" if o.passed else "FAIL")
                       for o in self.outputs]
        parts = [
            format_table(layer_rows, ["layer", "channels", "samples", "max |shift| (sd)", "limit", "var ratio",
                                      "allowed", "result"]),
            "",
            format_table(output_rows, ["output", "max abs err", "rel err (rms)", "top-1 agree", "result"]),
        ]
        parts += [f"skipped {s.name}: {s.reason}" for s in self.skipped]
        parts.append(
            f"thresholds: shift <= {t.max_mean_shift:g} sd, |log var ratio| <= {t.max_var_log_ratio:g} "
            f"(+ {t.noise_allowance:g} standard errors of the check's own estimate), "
            f"top-1 agreement >= {t.min_top1_agreement:g}, output rel error <= {t.max_output_rel_error:g} "
            f"({self.batches} batches, {self.samples} samples)")
        parts.append(self.verdict if self.passed else f"FAILED: {'; '.join(self.reasons)}")
        return "\n".join(parts)


def assess_layer(name: str, channels: int, moving_mean, moving_var, data_moments: ChannelMoments, eps: float,
                 thresholds: CheckThresholds) -> LayerCheck:
    """One BN's moving statistics against the population statistics of its input (``data_moments``).

    The limits are ``thresholds``' widened by ``noise_allowance`` standard errors of the
    check's own estimate from ``data_moments.count`` values per channel. NaN/Inf moving
    statistics, or a moving variance with ``var + eps <= 0``, count as infinitely far (failed).
    """
    moving_mean = np.asarray(moving_mean, np.float64).reshape(-1)
    moving_var = np.asarray(moving_var, np.float64).reshape(-1)
    if not (np.isfinite(moving_mean).all() and np.isfinite(moving_var).all()) or (moving_var + eps <= 0).any():
        shift, ratio = math.inf, math.inf
    else:
        shift, ratio = summarize_shift(moving_mean, moving_var, data_moments.mean, data_moments.variance, eps)
    count = data_moments.count
    shift_limit = thresholds.max_mean_shift + thresholds.noise_allowance / math.sqrt(count)
    log_ratio_limit = thresholds.max_var_log_ratio + thresholds.noise_allowance * math.sqrt(2.0 / count)
    finite = math.isfinite(shift) and math.isfinite(ratio) and ratio > 0
    passed = finite and shift <= shift_limit and abs(math.log(ratio)) <= log_ratio_limit
    return LayerCheck(name, channels, count, shift, ratio, shift_limit, log_ratio_limit, passed)


class OutputAgreement:
    """Streaming agreement of one output between inference and train mode, over all batches.

    :meth:`add` each batch's two arrays (any framework's, as numpy-convertible values), then
    :meth:`check` gives the :class:`OutputCheck`: ``rms(inference - train) / rms(train)``, the
    largest element difference, and for ``(N, classes)`` float outputs the fraction of samples
    with the same arg-max.
    """

    def __init__(self):
        self.max_abs_error = 0.0
        self.diff_sq = self.ref_sq = 0.0
        self.count = 0
        self.agree = self.rows = 0
        self.classifier = True
        self.finite = True

    def add(self, inferred, trained) -> None:
        a = np.asarray(inferred, np.float64)
        b = np.asarray(trained, np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            self.finite = False
        diff = np.abs(a - b)
        if diff.size:
            worst = math.inf if np.isnan(diff).any() else float(diff.max())
            self.max_abs_error = max(self.max_abs_error, worst)
        self.diff_sq += float(np.sum(np.square(diff)))
        self.ref_sq += float(np.sum(np.square(b)))
        self.count += diff.size
        if a.ndim == 2 and a.shape[1] >= 2 and np.issubdtype(np.asarray(inferred).dtype, np.floating):
            self.agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            self.rows += a.shape[0]
        else:
            self.classifier = False

    @property
    def rel_error(self) -> float:
        if not self.finite:
            return math.inf
        if self.count == 0:
            return 0.0
        scale = math.sqrt(self.ref_sq / self.count)
        error = math.sqrt(self.diff_sq / self.count)
        return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)

    @property
    def top1_agreement(self) -> float | None:
        return self.agree / self.rows if self.classifier and self.rows else None

    def check(self, name: str, thresholds: CheckThresholds) -> OutputCheck:
        """This output's :class:`OutputCheck` under ``thresholds``."""
        rel, agreement = self.rel_error, self.top1_agreement
        passed = math.isfinite(rel) and rel <= thresholds.max_output_rel_error
        if agreement is not None:
            passed = passed and agreement >= thresholds.min_top1_agreement
        return OutputCheck(name, self.max_abs_error, rel, agreement, passed)


def check_onnx(
    model,
    batches: Iterable,
    *,
    thresholds: CheckThresholds = CheckThresholds(),
    max_samples: int | None = None,
    providers: list[str] | None = None,
    progress: bool | Callable[[int], None] = False,
) -> CheckReport:
    """Compare an ONNX model's moving BN statistics and inference outputs with train mode on ``batches``.

    ``model`` is an ``onnx.ModelProto``. One pass over the data (a one-shot iterator is fine);
    batches as for :func:`bncal.onnx_recalibrate.recalibrate_onnx` (see
    :mod:`bncal.runtime`). Batches should be drawn at random and hold 16 or more samples for
    the output tests to be meaningful (see :class:`CheckThresholds`).

    Raises:
        BncalError: no BN to check, data not matching the model, NaN/Inf in the data, or a
            batch giving a BN one value per channel (train mode is undefined there).
    """
    import onnx
    from onnx import numpy_helper

    from .onnx_graphs import find_batchnorms
    from .runtime import BatchStream, StatisticsSession, ort_session, run

    if not isinstance(model, onnx.ModelProto):
        raise BncalError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the file with onnx.load first")
    infos = find_batchnorms(model)
    skipped = [SkippedLayer(i.name, i.skip_reason) for i in infos if not i.handled]
    if not any(i.handled for i in infos):
        detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
        raise BncalError(f"the model has no inference BatchNormalization to check{detail}")
    stream = BatchStream(model, batches, reread=False, max_samples=max_samples, progress=progress)
    output_names = [o.name for o in model.graph.output]
    inference = ort_session(model, optimization_level="all", providers=providers)
    train = StatisticsSession.train_graph(model, outputs=output_names, providers=providers)

    moments: dict[str, ChannelMoments] = {}
    agreement = {name: OutputAgreement() for name in output_names}
    for index, feeds in stream:
        inferred = run(inference, output_names, feeds, index=index)
        trained, _ = train.collect(feeds, index, moments, single_value_fix=(
            "check with batches of 2 or more samples (32+ is better)"))
        for name, a, b in zip(output_names, inferred, trained):
            agreement[name].add(a, b)

    initializers = {init.name: init for init in model.graph.initializer}
    layers = [assess_layer(info.name, info.channels, numpy_helper.to_array(initializers[info.mean_initializer]),
                           numpy_helper.to_array(initializers[info.var_initializer]), moments[info.name],
                           info.epsilon, thresholds)
              for info in train.infos]
    outputs = [agreement[name].check(name, thresholds) for name in output_names]
    return CheckReport.from_checks(layers, outputs, skipped, thresholds, stream.batches, stream.samples)
