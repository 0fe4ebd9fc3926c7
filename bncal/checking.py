"""The verdict of a check of BatchNorm statistics against data: per layer, per output, and the report.

A BN computes one thing in training (normalise with the batch's statistics) and another at
inference (normalise with the stored moving statistics). The two agree only when the moving
statistics are those of the data the BN sees. A check (:func:`bncal.driver.run_check`, for
every framework) runs the model in inference and in train mode on the same batches and reports:

- per BN layer (exact, the primary test): the moving statistics against the population
  statistics of the layer's input over all batches (merged exactly by
  :class:`bncal.stats.ChannelMoments`): the largest mean shift in units of
  ``sqrt(population var + eps)`` and the variance ratio ``(moving var + eps) / (population var
  + eps)`` farthest from 1. Both are measured in the units that matter: how much the BN's
  normalised output moves.
- per model output: agreement of inference-mode and train-mode outputs, measured against what
  batch statistics alone explain. Train mode normalises with each batch's own statistics, so
  even perfect moving statistics leave differences that grow as batches shrink. The check
  therefore also runs train mode on a second batching of the same samples (consecutive batches
  A, B re-paired as ``A[:half] + B[half:]`` and ``B[:half] + A[half:]``: every sample keeps half
  its batch-mates) and compares ``rms(inference - train)`` with ``rms(train - train')``: the
  re-paired batch's statistics differ from the original's by as much as, with exact moving
  statistics, the original's differ from the population (half the batch is new, so the
  expected spread is the same). An exactly recalibrated model measures a ratio near 1 (0.89 to
  1.03 on the MNIST CNN at batches of 8 to 64), a stale one 2.6 to 7.5 (see :class:`CheckThresholds`).

Batches too small to judge: train mode departs from inference even with exact moving
statistics, by a systematic part that shrinks about as ``1 / batch size`` (each BN upstream
normalises with its batch's statistics; a layer deep in a net at 3x3 pixels sees few values per
batch) on top of the batch noise the tests allow for. The check therefore also runs
train mode on consecutive batches merged two by two (:class:`BatchSizeProbe`). A layer or output
that fails at batch ``n`` but passes once the trend from ``n`` to ``2n`` is followed to larger
batches is reported as judged at too small a batch, with the batch size at which it would be
judged (``needed_batch``), instead of failing: verdict ``BATCH TOO SMALL``, ``passed`` False.

Normalisation a converter lowered to arithmetic (:mod:`bncal.onnx.lowered`: no
BatchNormalization node, the statistics folded into constants) cannot be checked. The report
lists it as ``unchecked`` and never says PASSED as if it had seen every normalisation layer:
when everything it could check passed, the verdict is ``INCOMPLETE`` ("PASSED for N of M
normalisation layers; K lowered to arithmetic by the converter could not be checked") and
``passed`` is False, so ``bncal check`` exits 1 (``--allow-unchecked`` accepts it).

The verdict needs no framework: :func:`assess_layer`, :class:`OutputAgreement` and
:meth:`CheckReport.from_checks` take numbers from any framework's check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from .data import leading_size
from .limits import CheckThresholds
from .report import (ReportDisplay, SkippedLayer, channel_shift, describe_nonfinite, format_table, output_label, plural,
                     summarize_shift)
from .stats import ChannelMoments

__all__ = ["CheckThresholds", "LayerCheck", "BatchSpread", "BatchSizeProbe", "OutputCheck", "CheckReport",
           "OutputAgreement", "PairedOutputs", "assess_layer", "unresolved_allowance", "input_off", "split_batch",
           "rebatch_pair", "unpair"]


RECALIBRATE_ADVICE = "recalibrate them"
PREPROCESSING_CHECKS = ("check --preset or --mean/--std, the channel order (RGB vs BGR) and the layout "
                        "(NHWC vs NCHW)")
#: Only the first BN off its data, the later ones fitting theirs: the input differs, not the statistics.
PREPROCESSING_CAUSE = ("only the first BatchNorm layer is off and the layers after it fit their data, so the input "
                       f"is likely preprocessed otherwise than in training: {PREPROCESSING_CHECKS}")
#: :func:`input_off` tells an input scaled or shifted as a whole: the first BN's input standard deviation
#: off by this factor or more, or its mean off by this many of the moving standard deviations, ...
INPUT_SCALE_FACTOR = 3.0
INPUT_MEAN_SHIFT = 3.0
#: ... in at least this fraction of its channels, all in the same direction.
INPUT_OFF_FRACTION = 0.9
FALLBACK_OUTPUT_LIMITS = (0.8, 0.5)  # (min top-1 agreement, max rel error) where no second batching exists


@dataclasses.dataclass
class LayerCheck:
    """One BN layer: moving statistics against the population statistics of its input.

    ``shift_limit`` and ``log_ratio_limit`` are the thresholds after the noise allowance for
    this layer's ``values_per_channel`` (samples times spatial positions; the report's
    ``samples`` counts samples). ``nonfinite`` says which statistics held a NaN or inf, or a
    variance with ``var + eps <= 0`` (the layer then fails), else None. ``data_factor``: see
    :attr:`unresolved`. ``needed_batch``: for a layer that failed only because the batches were
    too small (:class:`BatchSizeProbe`), the batch size it needs.
    """

    name: str
    channels: int
    values_per_channel: int
    mean_shift: float
    var_ratio: float
    shift_limit: float
    log_ratio_limit: float
    passed: bool
    nonfinite: str | None = None
    data_factor: float | None = None
    needed_batch: int | None = None
    #: The moving statistics are their initial values (mean 0, variance 1 in every channel): never updated.
    initial_statistics: bool = False
    #: Per channel (:func:`bncal.report.channel_shift`), what ``mean_shift``/``var_ratio`` are the worst
    #: of; for :func:`bncal.plot.plot_channels`, not part of the JSON report (None where not computed).
    channel_mean_shift: np.ndarray | None = dataclasses.field(default=None, repr=False, metadata={"json": False})
    channel_var_ratio: np.ndarray | None = dataclasses.field(default=None, repr=False, metadata={"json": False})

    @property
    def unresolved(self) -> bool:
        """Off its limits, but by no more than the check's own data can resolve (see
        :func:`assess_layer`): not enough data to judge; ``data_factor`` times the check's
        samples would be enough."""
        return not self.passed and self.data_factor is not None


@dataclasses.dataclass
class OutputCheck:
    """One model output: inference mode against train mode.

    ``rel_error`` is ``rms(inference - train) / rms(train)``; ``max_abs_error`` the largest
    element difference; ``top1_agreement`` is None unless the output is ``(N, classes)``. The
    re-batched reference (None where no second batching exists): ``batch_rel_error`` is
    ``rms(train - train') / rms(train)``, ``spread_ratio`` is ``rms(inference - train) /
    rms(train - train')`` over the same samples, ``batch_top1_agreement`` the arg-max agreement
    of train and train'. ``criterion`` says which test decided: ``"batch spread"``, ``"fixed
    limits"`` or ``"not judged"`` (batches of one sample). ``nonfinite`` says which mode's
    outputs held NaN or inf and how many elements (the output then fails), else None.
    """

    name: str
    max_abs_error: float
    rel_error: float
    top1_agreement: float | None
    passed: bool
    batch_rel_error: float | None = None
    spread_ratio: float | None = None
    batch_top1_agreement: float | None = None
    criterion: str = "fixed limits"
    top1_limit: float | None = None
    nonfinite: str | None = None
    needed_batch: int | None = None  # failed only because the batches were too small: the size it needs
    #: The spread ratio allowed: ``max_spread_ratio`` times :meth:`OutputAgreement.moving_error_factor`.
    spread_limit: float | None = None

    def problem(self) -> str:
        """What differs, in a few words (for the report's reasons)."""
        if self.nonfinite:
            return self.nonfinite
        if self.spread_ratio is not None:
            detail = (f"rms difference {self.spread_ratio:.3g}x what batch statistics alone explain "
                      f"(relative error {self.rel_error:.3g} vs {self.batch_rel_error:.3g} between two batchings)")
            if self.top1_agreement is not None:
                detail += (f", top-1 agreement {self.top1_agreement:.3g} vs {self.batch_top1_agreement:.3g} "
                           f"(at least {self.top1_limit:.3g} needed)")
            return detail
        return f"relative error {self.rel_error:.3g}" + (
            "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.3g}")


@dataclasses.dataclass(repr=False)
class CheckReport(ReportDisplay):
    """The outcome of a check: ``passed``, the ``reasons`` it failed, the details.

    ``unchecked`` lists the normalisation layers the check knows of but could not check
    (lowered to arithmetic by a converter), ``unchecked_count`` their number; with any of them
    ``passed`` is False and :attr:`verdict` is ``INCOMPLETE`` when all else passed.
    Built by :meth:`from_checks` (by :func:`bncal.driver.run_check`, for every framework).
    """

    passed: bool
    reasons: list[str]
    layers: list[LayerCheck]
    outputs: list[OutputCheck]
    skipped: list[SkippedLayer]
    thresholds: CheckThresholds
    batches: int
    samples: int
    unchecked: list[SkippedLayer] = dataclasses.field(default_factory=list)
    unchecked_count: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: A PyTorch model's check runs on its ONNX export: PyTorch eval vs onnxruntime on that graph
    #: (:func:`check`), a :class:`bncal.verify.ComparisonReport`; None for ONNX and Keras models.
    parity: object | None = None

    def with_parity(self, parity) -> "CheckReport":
        """This report with the export's parity attached; a failed parity fails the check too."""
        reasons, passed = list(self.reasons), self.passed
        if not parity.passed:
            reasons.append("PyTorch eval and onnxruntime disagree on the exported graph (see the parity table); "
                           "the check of that graph does not speak for the PyTorch model")
            passed = False
        return dataclasses.replace(self, parity=parity, reasons=reasons, passed=passed)

    @classmethod
    def from_checks(cls, layers: list[LayerCheck], outputs: list[OutputCheck], skipped: list[SkippedLayer],
                    thresholds: CheckThresholds, batches: int, samples: int,
                    unchecked: list[SkippedLayer] = (), batching_warning: str | None = None) -> "CheckReport":
        """The verdict over per-layer (:func:`assess_layer`) and per-output
        (:meth:`OutputAgreement.check`) results: passed when every one passed and nothing is
        ``unchecked``; one reason for the failed layers (naming the worst), one per failed output.

        ``batching_warning`` (:func:`bncal.calibration.order_warning`) says the batches are far
        from random draws: train mode on them differs from inference whatever the statistics,
        so only the first layer (whose input no other BN affects) is still blamed, and any
        other failure becomes one reason asking for shuffled data; the warning goes to
        ``warnings``.

        Before advising recalibration it names other causes: layers off by no more than their
        batches resolve (:attr:`LayerCheck.unresolved`) are not failures (verdict ``NOT ENOUGH
        DATA`` when nothing else failed), and only the first BN off, every later one fitting its
        data, blames preprocessing (:data:`PREPROCESSING_CAUSE`), and so does a first BN whose
        input is off as a whole (:func:`input_off`) whatever the later layers do. :meth:`blame`
        names a cause the caller knows of."""
        reasons = []
        if batching_warning:  # the batches' spread is then not sampling error: no layer is unresolved by it
            for layer in layers:
                layer.data_factor = None
        too_small = [c for c in [*layers, *outputs] if not c.passed and c.needed_batch]
        bad = [l for l in layers if not l.passed and not l.unresolved and not l.needed_batch]
        advice = RECALIBRATE_ADVICE
        off = input_off(layers[0]) if layers and layers[0] in bad else None
        if off:
            advice = (f"likely cause: the first BatchNorm layer's input {off}, as an input scaled or shifted as a "
                      "whole makes it, so the input is likely preprocessed otherwise than in training: "
                      f"{PREPROCESSING_CHECKS}"
                      + ("; judge the other layers again once it matches" if len(bad) > 1 else ""))
        elif len(layers) >= 2 and bad == [layers[0]] and not batching_warning:
            advice = f"likely cause: {PREPROCESSING_CAUSE}"
        unjudged = bool([l for l in bad if l is not layers[0]] or [o for o in outputs if not o.passed])
        broken = [l for l in bad if l.nonfinite]  # failed whatever the batching
        if batching_warning:
            bad = [l for l in bad if l is layers[0]]
        if broken:
            reasons.append(f"{len(broken)} of {len(layers)} BatchNorm layers have non-finite or negative statistics ("
                           + "; ".join(f"{l.name}: {l.nonfinite}" for l in broken[:3])
                           + (" and more" if len(broken) > 3 else "") + ")")
        bad = [l for l in bad if not l.nonfinite]
        if bad:
            worst = max(bad, key=lambda l: l.mean_shift if math.isfinite(l.mean_shift) else math.inf)
            reasons.append(f"{len(bad)} of {len(layers)} BatchNorm layers have moving statistics off their data "
                           f"(worst {worst.name}: mean shift {worst.mean_shift:.3g} sd, var ratio "
                           f"{worst.var_ratio:.3g}); {advice}")
        for o in outputs:
            if o.nonfinite:  # whatever the batching
                reasons.append(f"{output_label(o.name)} holds non-finite values ({o.nonfinite})")
            elif not o.passed and not o.needed_batch and not batching_warning:
                reasons.append(f"{output_label(o.name)} differs between inference and train mode ({o.problem()})")
        if batching_warning and unjudged:
            reasons.append("the batches are far from random draws of the data (see the warning), so train mode on them "
                           "cannot be compared with inference; shuffle the data and check again")
        unresolved = [l for l in layers if l.unresolved]
        return cls(passed=not (reasons or unjudged or unchecked or unresolved or too_small), reasons=reasons,
                   layers=list(layers),
                   outputs=list(outputs), skipped=list(skipped), thresholds=thresholds, batches=batches,
                   samples=samples, unchecked=list(unchecked), unchecked_count=len(unchecked),
                   warnings=[batching_warning] if batching_warning else [])

    def blame(self, cause: str) -> None:
        """Name ``cause``, a setup problem the caller knows of (a freshly initialised model), as
        the likely cause of off statistics instead of advising recalibration; also a warning."""
        self.warnings.append(cause)
        self.reasons = [r.replace(RECALIBRATE_ADVICE, f"likely cause: {cause}") for r in self.reasons]

    @property
    def too_small(self) -> list:
        """The layers and outputs that failed only because the batches were too small to judge them."""
        return [c for c in [*self.layers, *self.outputs] if not c.passed and c.needed_batch]

    def _too_small_line(self) -> str:
        names = [c.name for c in self.too_small]
        batch = self.samples / self.batches if self.batches else 0
        return (f"batch too small to judge {', '.join(names[:4])}{' and more' if len(names) > 4 else ''}: at batches "
                f"of {batch:.3g} train mode departs from inference by what the batch size alone explains; check with "
                f"batches of {max(c.needed_batch for c in self.too_small)} or more")

    @property
    def verdict(self) -> str:
        """``PASSED``; ``INCOMPLETE`` (all it checked passed, some normalisation it could not
        check); ``NOT ENOUGH DATA`` (nothing failed, but some layers are off by no more than the
        data resolves: :attr:`LayerCheck.unresolved`); ``FAILED``."""
        if self.passed:
            return "PASSED"
        if self.reasons:
            return "FAILED"
        if self.too_small:
            return "BATCH TOO SMALL"
        return "NOT ENOUGH DATA" if any(l.unresolved for l in self.layers) else "INCOMPLETE"

    def unresolved_line(self) -> str | None:
        """Which layers the check's data cannot judge and how many samples would (None if none)."""
        unresolved = [l for l in self.layers if l.unresolved]
        if not unresolved:
            return None
        names = ", ".join(l.name for l in unresolved[:4]) + (" and more" if len(unresolved) > 4 else "")
        return (f"{len(unresolved)} of {len(self.layers)} BatchNorm layers differ from their data by no more than the "
                f"check's {plural(self.samples, 'sample')} can resolve ({names}): not enough data to judge them, not "
                f"evidence of stale statistics; about {math.ceil(max(l.data_factor for l in unresolved) * self.samples)} "
                "samples would tell" + self._moving_samples_note())

    def _moving_samples_note(self) -> str:
        ratio = self.thresholds.moving_samples_ratio
        if math.isinf(ratio):
            return ""
        return " (to check with, and as many to recalibrate on)" if ratio == 1 else \
            f" (to check with, and {ratio:g} times as many to recalibrate on)"

    def _unchecked_line(self) -> str:
        k = self.unchecked_count
        return (f"{k} lowered to arithmetic by the converter could not be checked "
                f"({', '.join(s.name for s in self.unchecked[:4])}{' and more' if k > 4 else ''}): recalibrate the "
                "model before converting it, and convert it again (bncal inspect: BN060)")

    def summary(self) -> str:
        """``FAILED: 7 of 7 BN layers off their data, 1 of 1 output off train mode (1000 samples)``;
        ``INCOMPLETE: ... within limits, 1 lowered BN unchecked (...)`` when some could not be checked;
        ``NOT ENOUGH DATA: 2 of 7 BN layers need more samples to judge (128 samples)``."""
        bad_layers = sum(not l.passed for l in self.layers)
        bad_outputs = sum(not o.passed for o in self.outputs)
        unchecked = f", {plural(self.unchecked_count, 'lowered BN')} unchecked" if self.unchecked else ""
        if not self.reasons and self.too_small:
            return f"BATCH TOO SMALL: {self._too_small_line()}{unchecked} ({plural(self.samples, 'sample')})"
        if not self.reasons and self.verdict == "NOT ENOUGH DATA":
            unresolved = sum(l.unresolved for l in self.layers)
            return (f"NOT ENOUGH DATA: {unresolved} of {plural(len(self.layers), 'BN layer')} need more samples to judge "
                    f"({plural(self.samples, 'sample')})")
        if not self.reasons:
            return (f"{self.verdict}: {plural(len(self.layers), 'BN layer')} and {plural(len(self.outputs), 'output')} "
                    f"within limits{unchecked} ({plural(self.samples, 'sample')})")
        if self.warnings:  # only the first layer is judged on such batches (see from_checks)
            first = "" if not self.layers or self.layers[0].passed else f", first BN layer {self.layers[0].name} off its data"
            return f"FAILED: batches far from random draws{first}{unchecked} ({plural(self.samples, 'sample')})"
        return (f"FAILED: {bad_layers} of {plural(len(self.layers), 'BN layer')} off their data, {bad_outputs} of "
                f"{plural(len(self.outputs), 'output')} off train mode{unchecked} ({plural(self.samples, 'sample')})")

    def table(self) -> str:
        """Layer table, output table, skipped layers, thresholds, then the verdict line."""
        t = self.thresholds
        def result(c) -> str:
            if c.passed:
                return "pass"
            if c.needed_batch:
                return f"batch < {c.needed_batch}"
            return "more data" if getattr(c, "unresolved", False) else "FAIL"

        layer_rows = [(l.name, l.channels, l.values_per_channel, l.mean_shift, l.shift_limit, l.var_ratio,
                       f"{math.exp(-l.log_ratio_limit):.3g}..{math.exp(l.log_ratio_limit):.3g}",
                       result(l)) for l in self.layers]
        output_rows = [(o.name, o.max_abs_error, o.rel_error, o.batch_rel_error, o.spread_ratio, o.top1_agreement,
                        o.batch_top1_agreement, o.criterion, result(o)) for o in self.outputs]
        parts = [
            format_table(layer_rows, ["layer", "channels", "values/channel", "max |shift| (sd)", "limit", "var ratio",
                                      "allowed", "result"], name="layers"),
            "",
            format_table(output_rows, ["output", "max abs err", "rel err (rms)", "rel err train/train'", "spread ratio",
                                       "top-1 agree", "top-1 train/train'", "criterion", "result"], name="outputs"),
        ]
        parts += [f"skipped {s.name}: {s.reason}" for s in self.skipped]
        parts += [f"note: {note}" for note in self.notes]
        if self.unresolved_line() and self.verdict != "NOT ENOUGH DATA":
            parts.append(f"note: {self.unresolved_line()}")
        fixed = [f"top-1 agreement >= {t.min_top1_agreement:g}"] if t.min_top1_agreement is not None else []
        fixed += [f"output rel error <= {t.max_output_rel_error:g}"] if t.max_output_rel_error is not None else []
        parts.append(
            f"thresholds: shift <= {t.max_mean_shift:g} sd, |log var ratio| <= {t.max_var_log_ratio:g} "
            f"(+ {t.noise_allowance:g} standard errors of the check's own estimate); outputs: rms(inference - train) "
            f"<= {t.max_spread_ratio:g} x rms(train - train on re-paired batches)"
            + "".join(f", {f}" for f in fixed) + f" ({self.batches} batches, {self.samples} samples)")
        parts += [f"unchecked {s.name}: {s.reason}" for s in self.unchecked]
        parts.append(self.verdict_line())
        if self.reasons and self.too_small:
            parts.append(f"also {self._too_small_line()}")
        return "\n".join(parts)

    #: What the per-channel pictures compare (:func:`bncal.plot.plot_channels`).
    ratio_label = "moving / data"
    channel_subject = "moving statistics against the data's"

    def channel_rows(self) -> list[dict]:
        """Per layer: ``{"layer", "mean_shift", "var_ratio", "passed"}``, the middle two per channel (arrays)."""
        return [{"layer": l.name, "mean_shift": l.channel_mean_shift, "var_ratio": l.channel_var_ratio,
                 "passed": l.passed} for l in self.layers if l.channel_mean_shift is not None]

    def plot(self, path=None, *, kind: str = "layers", **options):
        """The check's picture (needs matplotlib): ``kind="layers"`` (:func:`bncal.plot.plot_check`) or
        ``"channels"`` (:func:`bncal.plot.plot_channels`, the failing layers per channel). Returns a
        Figure; ``path`` writes it as a PNG too."""
        from . import plot

        draw = {"layers": plot.plot_check, "channels": plot.plot_channels}
        if kind not in draw:
            raise ValueError(f"kind={kind!r}: give 'layers' or 'channels'")
        return draw[kind](self, path, **options)

    def verdict_line(self) -> str:
        """The table's last line: ``PASSED``, or ``FAILED: ...``/``BATCH TOO SMALL: ...``/``NOT ENOUGH
        DATA: ...``/``INCOMPLETE: ...`` with the reasons (the worst layer named)."""
        if self.verdict == "BATCH TOO SMALL":
            return f"BATCH TOO SMALL: {self._too_small_line()}" + (
                f"; and {self._unchecked_line()}" if self.unchecked else "")
        if self.verdict == "NOT ENOUGH DATA":
            return f"NOT ENOUGH DATA: {self.unresolved_line()}" + (
                f"; and {self._unchecked_line()}" if self.unchecked else "")
        if self.verdict == "INCOMPLETE":
            return (f"INCOMPLETE: PASSED for {len(self.layers)} of {len(self.layers) + self.unchecked_count} "
                    f"normalisation layers; {self._unchecked_line()}")
        if self.unchecked:
            return f"FAILED: {'; '.join(self.reasons)}; and {self._unchecked_line()}"
        return self.verdict if self.passed else f"FAILED: {'; '.join(self.reasons)}"


def input_off(layer: LayerCheck) -> str | None:
    """How a (first) BN's input is off as a whole, in words, or None.

    Preprocessing acts on the input as a whole: ``x`` scaled by ``a`` (pixels 0..255 instead of
    0..1, a missing ``/ std``) scales every channel of the first BN's input by ``|a|`` (the
    layers before it are linear: a convolution, a bias), and ``x`` shifted (a missing ``-
    mean``) moves every channel's mean by the filter's response to the shift. Statistics gone
    stale as the weights changed in training are off channel by channel, some up and some down,
    mostly by a fraction of their standard deviation. So the input is called off when, in at
    least :data:`INPUT_OFF_FRACTION` of the channels, its standard deviation is
    :data:`INPUT_SCALE_FACTOR` or more times larger (or smaller) than the moving variance says,
    all in the same direction, or its mean is :data:`INPUT_MEAN_SHIFT` or more moving standard
    deviations away. Moving statistics at their initial values (mean 0, variance 1: never
    updated, :attr:`LayerCheck.initial_statistics`) say nothing about the input: None.
    """
    if layer.passed or layer.initial_statistics or layer.nonfinite or layer.channel_var_ratio is None:
        return None
    ratio, shift = np.asarray(layer.channel_var_ratio, np.float64), np.asarray(layer.channel_mean_shift, np.float64)
    if not ratio.size or not (np.isfinite(ratio).all() and (ratio > 0).all() and np.isfinite(shift).all()):
        return None
    log_scale = -0.5 * np.log(ratio)  # log(data sd / moving sd) per channel
    median = float(np.median(log_scale))
    limit = math.log(INPUT_SCALE_FACTOR)
    if abs(median) >= limit and np.mean(np.sign(median) * log_scale >= limit) >= INPUT_OFF_FRACTION:
        factor = math.exp(abs(median))
        return (f"has a standard deviation {factor:.3g} times {'larger' if median > 0 else 'smaller'} than its moving "
                f"statistics say (median over its {layer.channels} channels)")
    moving_sd_shift = shift * np.exp(log_scale)  # |data mean - moving mean| / moving sd
    if np.mean(moving_sd_shift >= INPUT_MEAN_SHIFT) >= INPUT_OFF_FRACTION:
        return (f"has its mean {float(np.median(moving_sd_shift)):.3g} moving standard deviations away (median over "
                f"its {layer.channels} channels)")
    return None


class BatchSpread:
    """One BN's per-batch input statistics over a check, for the standard errors of its
    population statistics that the data really has: the values of one sample (the positions of
    an image) are correlated and need not be normal, so ``1 / sqrt(values)`` and
    ``sqrt(2 / values)`` understate them, most in deep layers with few positions per image.

    :meth:`add` each batch's (or call's) per-channel mean and biased variance, and where known
    its values per channel (``count``; without it every batch counts the same). Nothing else is
    needed: the spread of the batch statistics around the population's measures both the
    correlation and the fourth moment.
    """

    #: The layer's pooled estimate weighs as much as this many batches' worth of one channel's
    #: own spread (:meth:`standard_errors`).
    PRIOR_BATCHES = 8

    def __init__(self):
        self.means, self.variances, self.counts = [], [], []

    def add(self, mean, var, count: int | None = None) -> None:
        self.means.append(np.asarray(mean, np.float64).reshape(-1))
        self.variances.append(np.asarray(var, np.float64).reshape(-1))
        self.counts.append(count)

    def standard_errors(self, data_moments: ChannelMoments, eps: float):
        """Per channel, the standard errors of the population mean (in its standard deviations)
        and of its log variance ``log(var + eps)``; None without batches.

        With batch ``b`` holding ``n_b`` of the ``n`` values and statistic ``x_b`` (standardised
        mean, log variance), the population's ``X`` has variance ``sum n_b (x_b - X)^2 / ((B -
        1) n)``: exact in expectation for batches of independent samples (a batch's statistic
        varies as ``1 / n_b``), whatever the correlation within a sample. With few batches that
        is a noisy estimate per channel (``B - 1`` degrees of freedom), so it is shrunk towards
        the layer's mean over its channels (``C (B - 1)`` degrees of freedom), which weighs as
        :attr:`PRIOR_BATCHES` batches: with 2 to 4 batches nearly the layer's value, with many
        each channel's own. Measured on EfficientNetB0 (128 images, batches of 32 and 64) the
        layer's value matches the spread over 5 independent check sets within 10 %. (A check of a
        single batch adds its two halves instead, :func:`bncal.driver.run_check`.) Given one
        batch alone there is no spread: then the errors of ``data_moments.count`` independent normal
        values, ``1 / sqrt(n)`` and ``sqrt(2 / n)``, which understate them where a sample's values
        are correlated or heavy-tailed (so fewer layers are called unresolved, not more).
        """
        batches = len(self.means)
        if not batches or not data_moments.count:
            return None
        if batches == 1:
            count, channels = data_moments.count, data_moments.channels
            return np.full(channels, 1 / math.sqrt(count)), np.full(channels, math.sqrt(2 / count))
        if None in self.counts:
            weights = np.full(batches, 1.0 / batches)
        else:
            weights = np.asarray(self.counts, np.float64) / sum(self.counts)
        sd = np.sqrt(data_moments.variance + eps)
        deviations = ((np.stack(self.means) - data_moments.mean) / sd,
                      np.log(np.stack(self.variances) + eps) - np.log(data_moments.variance + eps))
        errors = []
        for dev in deviations:
            per_channel = (weights[:, None] * dev ** 2).sum(axis=0) / (batches - 1)
            pooled = float(per_channel.mean())
            prior = self.PRIOR_BATCHES
            errors.append(np.sqrt((prior * pooled + (batches - 1) * per_channel) / (prior + batches - 1)))
        return errors[0], errors[1]


def unresolved_allowance(channels: int, thresholds: CheckThresholds) -> float:
    """How many of a layer's own standard errors (:meth:`BatchSpread.standard_errors`) its
    moving statistics may differ from the check's data by sampling alone: the two-sided normal
    quantile at which ``2 * channels`` statistics (a mean and a variance per channel) all stay
    within it with probability ``1 - thresholds.false_alarm`` (Bonferroni), times
    ``sqrt(1 + 1 / thresholds.moving_samples_ratio)`` for the moving statistics' own sampling
    error (independent of the check's). About 5.05 x 1.41 = 7.1 for 1152 channels at the
    defaults; the old fixed 3 was exceeded by chance in about 1 channel of 370."""
    from statistics import NormalDist

    quantile = NormalDist().inv_cdf(1 - thresholds.false_alarm / (4 * max(channels, 1)))
    return quantile * math.sqrt(1 + 1 / thresholds.moving_samples_ratio)


def assess_layer(name: str, channels: int, moving_mean, moving_var, data_moments: ChannelMoments, eps: float,
                 thresholds: CheckThresholds, spread: BatchSpread | None = None) -> LayerCheck:
    """One BN's moving statistics against the population statistics of its input (``data_moments``).

    The limits are ``thresholds``' widened by ``noise_allowance`` standard errors of the
    check's own estimate from ``data_moments.count`` values per channel. NaN/Inf moving or data
    statistics, or a moving variance with ``var + eps <= 0``, count as infinitely far (failed,
    ``nonfinite`` says which).

    With the batches' ``spread`` (:class:`BatchSpread`), a layer off those limits but within
    the thresholds plus :func:`unresolved_allowance` of the standard errors its batches really
    show (every channel) is unresolved (:attr:`LayerCheck.unresolved`): not enough data to
    judge, with the factor of more data (for the check, and in proportion for the moving
    statistics) at which that allowance would shrink to the thresholds. Never for moving
    statistics at their initial values (mean 0, variance 1: never updated, not estimated).
    """
    moving_mean = np.asarray(moving_mean, np.float64).reshape(-1)
    moving_var = np.asarray(moving_var, np.float64).reshape(-1)
    nonfinite = None
    per_channel = channel_shift(moving_mean, moving_var, data_moments.mean, data_moments.variance, eps) or (None, None)
    if not (np.isfinite(moving_mean).all() and np.isfinite(moving_var).all()) or (moving_var + eps <= 0).any():
        shift, ratio = math.inf, math.inf
        bad = [f"moving {what} {text}" for what, text in (("mean", describe_nonfinite(moving_mean)),
                                                         ("variance", describe_nonfinite(moving_var))) if text]
        negative = int((moving_var + eps <= 0).sum())
        bad += [f"moving variance + eps <= 0 in {negative} of {moving_var.size} channels"] if negative else []
        nonfinite = ", ".join(bad)
    elif not (np.isfinite(data_moments.mean).all() and np.isfinite(data_moments.variance).all()):
        shift, ratio = math.inf, math.inf
        nonfinite = "the data reaching it: mean " + (describe_nonfinite(data_moments.mean) or "finite") + \
            ", variance " + (describe_nonfinite(data_moments.variance) or "finite")
    else:
        shift, ratio = summarize_shift(moving_mean, moving_var, data_moments.mean, data_moments.variance, eps)
    count = data_moments.count
    shift_limit = thresholds.max_mean_shift + thresholds.noise_allowance / math.sqrt(count)
    log_ratio_limit = thresholds.max_var_log_ratio + thresholds.noise_allowance * math.sqrt(2.0 / count)
    finite = math.isfinite(shift) and math.isfinite(ratio) and ratio > 0
    passed = finite and shift <= shift_limit and abs(math.log(ratio)) <= log_ratio_limit
    needed = None
    # Initial values (never updated) were not estimated from any data: too few samples cannot explain them.
    initial = bool(moving_mean.size) and not np.any(moving_mean) and bool(np.all(moving_var == 1))
    unjudged = passed or not finite or spread is None or initial
    errors = None if unjudged else spread.standard_errors(data_moments, eps)
    if errors is not None:
        se_mean, se_log = errors
        k = unresolved_allowance(moving_mean.size, thresholds)
        sd = np.sqrt(data_moments.variance + eps)
        shifts = np.abs(moving_mean - data_moments.mean) / sd
        logs = np.abs(np.log((moving_var + eps) / (data_moments.variance + eps)))
        if (np.all(shifts <= thresholds.max_mean_shift + k * se_mean)
                and np.all(logs <= thresholds.max_var_log_ratio + k * se_log)):
            factor = max(float(np.max(k * se_mean / thresholds.max_mean_shift)) ** 2,
                         float(np.max(k * se_log / thresholds.max_var_log_ratio)) ** 2, 1.0)
            needed = factor
    return LayerCheck(name, channels, count, shift, ratio, shift_limit, log_ratio_limit, passed, nonfinite,
                      data_factor=needed, initial_statistics=initial, channel_mean_shift=per_channel[0],
                      channel_var_ratio=per_channel[1])


class BatchSizeProbe:
    """Train mode on the check's batches merged two by two: is a failure the batch size's doing?

    :meth:`add` each batch with its inference and train-mode outputs and its own train-mode
    moments (``{BN name: ChannelMoments}``; ``new_moments()`` gives an empty such dict); every
    two consecutive batches are joined and run in train mode once more (``train(batch, index,
    into)`` merges the joined batch's moments into ``into`` and returns its outputs). Over the samples of the joined pairs it keeps each BN's moments at batch ``n``
    (the check's batches) and ``2n`` (joined), and per output ``rms(inference - train)`` at both.

    With exact moving statistics, train mode departs from inference by batch noise plus a
    systematic part that shrinks as ``1/n``; with wrong statistics by an offset that does not
    shrink. :meth:`needed_batch_for_layer` follows the layer's statistics from ``n`` to ``2n``
    on to larger batches (``s(N) = s_inf + (s(n) - s_inf) n / N``, ``s_inf = 2 s(2n) - s(n)``)
    and returns the smallest batch (up to 64 ``n``) at which :func:`assess_layer` passes, or None
    (it fails at any batch: the statistics are off). :meth:`needed_batch_for_output` fits
    ``rms(inference - train) ~ n^-a`` from the two batch sizes; the batch-spread reference
    ``rms(train - train')`` shrinks as ``n^-1/2``, so for ``a`` above 1/2 the spread ratio falls
    as ``n^(1/2 - a)`` and the batch size where it meets the limit is returned; None for ``a``
    at or below 0.6 (the gap shrinks no faster than noise), and for an output that failed
    another test than the spread ratio (the caller's fixed limits).
    """

    MAX_FACTOR = 64
    MIN_OUTPUT_EXPONENT = 0.6

    def __init__(self, new_moments: Callable, names: list[str], train: Callable):
        self.at_n, self.at_2n = new_moments(), new_moments()  # {BN name: ChannelMoments}
        self.names, self.train = list(names), train
        self.held = None
        self.gap_sq = {name: [0.0, 0.0] for name in self.names}  # sum (inference - train)^2 at n, at 2n
        self.samples = self.pairs = 0

    def add(self, index: int, batch, inferred, trained, moments) -> None:
        if self.held is None:
            self.held = (batch, inferred, trained, moments)
            return
        (a, inf_a, train_a, moments_a), self.held = self.held, None
        len_a, len_b = leading_size(a) or 0, leading_size(batch) or 0
        if min(len_a, len_b) < 2:
            return
        joined = _join(a, batch)
        train_2n = self.train(joined, index, self.at_2n)
        for theirs in (moments_a, moments):
            for name, other in theirs.items():
                self.at_n[name].merge(other)
        for k, name in enumerate(self.names):
            inf = np.concatenate([np.asarray(inf_a[k], np.float64), np.asarray(inferred[k], np.float64)])
            at_n = np.concatenate([np.asarray(train_a[k], np.float64), np.asarray(trained[k], np.float64)])
            at_2n = np.asarray(train_2n[k], np.float64)
            if inf.shape[:1] != (len_a + len_b,) or at_2n.shape != inf.shape:
                continue  # not one row per sample
            self.gap_sq[name][0] += float(np.sum(np.square(inf - at_n)))
            self.gap_sq[name][1] += float(np.sum(np.square(inf - at_2n)))
        self.samples += len_a + len_b
        self.pairs += 1

    @property
    def batch_size(self) -> float:
        """The mean batch size ``n`` of the joined pairs' halves."""
        return self.samples / (2 * self.pairs) if self.pairs else 0.0

    def needed_batch_for_layer(self, check: LayerCheck, moving_mean, moving_var, eps: float,
                               thresholds: CheckThresholds) -> int | None:
        if not self.pairs or check.name not in self.at_n:
            return None
        n, n2 = self.at_n[check.name], self.at_2n[check.name]
        if not (n.count and n2.count):
            return None
        mean_inf, var_inf = 2 * n2.mean - n.mean, np.maximum(2 * n2.variance - n.variance, 0.0)
        for step in range(1, 25):  # N = n * 2^(step/4), up to 64 n
            factor = 2.0 ** (step / 4)
            mean = mean_inf + (n.mean - mean_inf) / factor
            var = var_inf + (n.variance - var_inf) / factor
            moments = ChannelMoments(check.values_per_channel, mean, var * check.values_per_channel)
            if assess_layer(check.name, check.channels, moving_mean, moving_var, moments, eps, thresholds).passed:
                return math.ceil(self.batch_size * factor)
        return None

    def needed_batch_for_output(self, check: OutputCheck, thresholds: CheckThresholds) -> int | None:
        at_n, at_2n = self.gap_sq.get(check.name, (0.0, 0.0))
        ratio = check.spread_ratio
        limit = check.spread_limit or thresholds.max_spread_ratio
        if not (self.pairs and at_n > 0 and at_2n > 0 and ratio is not None and math.isfinite(ratio)
                and ratio > limit):
            return None  # no batch-spread failure (a fixed limit given by the caller, the top-1 count)
        if thresholds.max_output_rel_error is not None and check.rel_error > thresholds.max_output_rel_error:
            return None
        if (thresholds.min_top1_agreement is not None and check.top1_agreement is not None
                and check.top1_agreement < thresholds.min_top1_agreement):
            return None
        exponent = 0.5 * math.log2(at_n / at_2n)  # rms ~ n^-exponent
        if exponent <= self.MIN_OUTPUT_EXPONENT:
            return None
        factor = (ratio / limit) ** (1.0 / (exponent - 0.5))
        return math.ceil(self.batch_size * factor) if factor <= self.MAX_FACTOR else None


def _join(a, b):
    """Two batches as one (arrays, or dicts / tuples of arrays, samples on the first axis)."""
    join = lambda x, y: np.concatenate([np.asarray(x), np.asarray(y)])
    if isinstance(a, dict):
        return {k: join(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return tuple(join(x, y) for x, y in zip(a, b))
    return join(a, b)


def split_batch(batch):
    """A batch's two halves, ``(batch[:n // 2], batch[n // 2:])`` (an array, or a dict / tuple of
    arrays, one per input, first axis the samples)."""
    half = leading_size(batch) // 2
    if isinstance(batch, dict):
        return {k: np.asarray(v)[:half] for k, v in batch.items()}, {k: np.asarray(v)[half:] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(np.asarray(v)[:half] for v in batch), tuple(np.asarray(v)[half:] for v in batch)
    return np.asarray(batch)[:half], np.asarray(batch)[half:]


def rebatch_pair(a, b):
    """A second batching of two batches' samples: ``(A[:ha] + B[hb:], B[:hb] + A[ha:])`` with
    ``ha = len(A) // 2``, ``hb = len(B) // 2``. ``a`` and ``b`` are arrays, or dicts / tuples of
    arrays (one per input, first axis the samples); both batches need 2 samples or more."""
    ha, hb = leading_size(a) // 2, leading_size(b) // 2
    join = lambda x, y: np.concatenate([np.asarray(x), np.asarray(y)])
    if isinstance(a, dict):
        return ({k: join(a[k][:ha], b[k][hb:]) for k in a}, {k: join(b[k][:hb], a[k][ha:]) for k in a})
    if isinstance(a, (tuple, list)):
        return (tuple(join(x[:ha], y[hb:]) for x, y in zip(a, b)), tuple(join(y[:hb], x[ha:]) for x, y in zip(a, b)))
    return join(a[:ha], b[hb:]), join(b[:hb], a[ha:])


def unpair(out_a2, out_b2, len_a: int, len_b: int):
    """Outputs of the re-paired batches of :func:`rebatch_pair` back in the order of A and of B."""
    ha, hb = len_a // 2, len_b // 2
    out_a2, out_b2 = np.asarray(out_a2), np.asarray(out_b2)
    return (np.concatenate([out_a2[:ha], out_b2[hb:]]), np.concatenate([out_b2[:hb], out_a2[ha:]]))


class PairedOutputs:
    """Per-output :class:`OutputAgreement` over a stream of batches, any framework's.

    :meth:`add` each batch with its inference and train-mode outputs (lists in ``names``
    order); consecutive batches are paired, and ``train_outputs(batch, index)`` (train mode,
    moving statistics untouched, the same output list) runs on their re-paired batches
    (:func:`rebatch_pair`) to give the second batching the outputs are judged against. Data of a
    single batch is judged against train mode on its two halves where the caller gives their
    outputs (:meth:`add_halves`): a half's statistics differ from the whole batch's by as much as
    the whole batch's differ from the population's (variance ``s^2 / n`` both), as a re-paired
    batch's do. A batch left without a pair otherwise, or a pair with a batch of one sample, is
    compared without a second batching.
    """

    def __init__(self, names: list[str], train_outputs: Callable):
        self.names, self.train_outputs = list(names), train_outputs
        self.agreement = {name: OutputAgreement() for name in self.names}
        self.held = None  # (index, batch, inferred, trained) waiting for its pair

    def add(self, index: int, batch, inferred, trained) -> None:
        if self.held is None:
            self.held = (index, batch, inferred, trained)
            return
        (i, a, inf_a, train_a), self.held = self.held, None
        len_a, len_b = leading_size(a) or 0, leading_size(batch) or 0
        if min(len_a, len_b) < 2:
            self._add_unpaired(inf_a, train_a)
            self._add_unpaired(inferred, trained)
            return
        a2, b2 = rebatch_pair(a, batch)
        out_a2, out_b2 = self.train_outputs(a2, i), self.train_outputs(b2, index)
        for k, name in enumerate(self.names):
            rows_a, rows_b = np.shape(train_a[k])[:1], np.shape(trained[k])[:1]
            if rows_a != (len_a,) or rows_b != (len_b,):  # not one row per sample: no second batching
                self.agreement[name].add(inf_a[k], train_a[k])
                self.agreement[name].add(inferred[k], trained[k])
                continue
            again_a, again_b = unpair(out_a2[k], out_b2[k], len_a, len_b)
            self.agreement[name].add(inf_a[k], train_a[k], again_a)
            self.agreement[name].add(inferred[k], trained[k], again_b)

    def add_halves(self, half_outputs) -> None:
        """Judge the batch waiting for its pair (the only one) against ``half_outputs``: train
        mode's outputs on its two halves (:func:`split_batch`), in order."""
        _, batch, inferred, trained = self.held
        self.held = None
        size = leading_size(batch)
        for k, name in enumerate(self.names):
            if np.shape(trained[k])[:1] != (size,):  # not one row per sample: no second batching
                self.agreement[name].add(inferred[k], trained[k])
                continue
            again = np.concatenate([np.asarray(outputs[k]) for outputs in half_outputs])
            self.agreement[name].add(inferred[k], trained[k], again)

    def _add_unpaired(self, inferred, trained) -> None:
        for name, a, b in zip(self.names, inferred, trained):
            self.agreement[name].add(a, b)

    def checks(self, thresholds: CheckThresholds) -> list[OutputCheck]:
        """Each output's :class:`OutputCheck`, after adding a batch still waiting for its pair."""
        if self.held is not None:
            self._add_unpaired(*self.held[2:])
            self.held = None
        return [self.agreement[name].check(name, thresholds) for name in self.names]


class OutputAgreement:
    """Streaming agreement of one output between inference and train mode, over all batches.

    :meth:`add` each batch's arrays (any framework's, as numpy-convertible values): inference
    and train-mode outputs, and where there is one the train-mode output of the same samples in
    a second batching (:func:`rebatch_pair`, :func:`unpair`). :meth:`check` gives the
    :class:`OutputCheck` under the thresholds (see :class:`CheckThresholds`).
    """

    def __init__(self):
        self.max_abs_error = 0.0
        self.diff_sq = self.ref_sq = 0.0
        self.count = 0
        self.agree = self.rows = 0
        self.classifier = True
        self.largest_batch = 0
        self.samples = self.batches = 0
        # mode -> [NaN, inf, elements]
        self.nonfinite = {"inference": [0, 0, 0], "train": [0, 0, 0], "re-paired train": [0, 0, 0]}
        # Over the samples that have a second batching: inference-vs-train and train-vs-train'.
        self.paired_diff_sq = self.paired_ref_sq = self.batch_diff_sq = 0.0
        self.paired_count = self.paired_rows = 0
        self.paired_disagree = self.batch_disagree = 0

    def add(self, inferred, trained, retrained=None) -> None:
        a = np.asarray(inferred, np.float64)
        b = np.asarray(trained, np.float64)
        self._count_nonfinite("inference", a)
        self._count_nonfinite("train", b)
        diff = np.abs(a - b)
        if diff.size:
            worst = math.inf if np.isnan(diff).any() else float(diff.max())
            self.max_abs_error = max(self.max_abs_error, worst)
        self.diff_sq += float(np.sum(np.square(diff)))
        self.ref_sq += float(np.sum(np.square(b)))
        self.count += diff.size
        self.largest_batch = max(self.largest_batch, a.shape[0] if a.ndim else 1)
        self.samples += a.shape[0] if a.ndim else 1
        self.batches += 1
        classifier = a.ndim == 2 and a.shape[1] >= 2 and np.issubdtype(np.asarray(inferred).dtype, np.floating)
        if classifier:
            self.agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            self.rows += a.shape[0]
        else:
            self.classifier = False
        if retrained is None:
            return
        c = np.asarray(retrained, np.float64)
        self._count_nonfinite("re-paired train", c)
        self.paired_diff_sq += float(np.sum(np.square(diff)))
        self.paired_ref_sq += float(np.sum(np.square(b)))
        self.batch_diff_sq += float(np.sum(np.square(b - c)))
        self.paired_count += diff.size
        if classifier:
            top_train = np.argmax(b, axis=1)
            self.paired_disagree += int(np.sum(np.argmax(a, axis=1) != top_train))
            self.batch_disagree += int(np.sum(np.argmax(c, axis=1) != top_train))
            self.paired_rows += a.shape[0]

    def _count_nonfinite(self, mode: str, values: np.ndarray) -> None:
        counts = self.nonfinite[mode]
        counts[0] += int(np.isnan(values).sum())
        counts[1] += int(np.isinf(values).sum())
        counts[2] += values.size

    @property
    def finite(self) -> bool:
        return not any(nan or inf for nan, inf, _ in self.nonfinite.values())

    def nonfinite_text(self) -> str | None:
        """``"inference mode: 12 of 40 elements non-finite (12 NaN, 0 inf)"``, or None when all are finite."""
        parts = [f"{mode} mode: {nan + inf} of {size} elements non-finite ({nan} NaN, {inf} inf)"
                 for mode, (nan, inf, size) in self.nonfinite.items() if nan or inf]
        return "; ".join(parts) or None

    @property
    def rel_error(self) -> float:
        return self._ratio(self.diff_sq, self.ref_sq) if self.count else 0.0

    @property
    def top1_agreement(self) -> float | None:
        return self.agree / self.rows if self.classifier and self.rows else None

    def _ratio(self, num_sq: float, den_sq: float) -> float:
        if not self.finite:
            return math.inf
        if den_sq > 0:
            return math.sqrt(num_sq / den_sq)
        return 0.0 if num_sq == 0 else math.inf

    def moving_error_factor(self, thresholds: CheckThresholds) -> float:
        """How much larger ``rms(inference - train)`` is expected than ``rms(train - train')``
        with moving statistics that are right but estimated from a sample themselves:
        ``sqrt(1 + n / M)`` for batches of ``n`` and ``M = moving_samples_ratio`` times the
        check's samples. A batch's statistics differ from the population's with variance ``v /
        n``, the moving ones with ``v / M`` more, while re-pairing half a batch moves its
        statistics with variance ``v / n`` (see :class:`CheckThresholds`)."""
        if not self.batches or not self.samples:
            return 1.0
        batch = self.samples / self.batches
        return math.sqrt(1 + batch / (thresholds.moving_samples_ratio * self.samples))

    def check(self, name: str, thresholds: CheckThresholds) -> OutputCheck:
        """This output's :class:`OutputCheck` under ``thresholds``."""
        rel, agreement = self.rel_error, self.top1_agreement
        out = OutputCheck(name, self.max_abs_error, rel, agreement, passed=math.isfinite(rel) and self.finite,
                          nonfinite=self.nonfinite_text())
        if self.paired_count:
            out.criterion = "batch spread"
            out.batch_rel_error = self._ratio(self.batch_diff_sq, self.paired_ref_sq)
            out.spread_ratio = self._ratio(self.paired_diff_sq, self.batch_diff_sq)
            out.spread_limit = thresholds.max_spread_ratio * self.moving_error_factor(thresholds)
            out.passed = out.passed and out.spread_ratio <= out.spread_limit
            if agreement is not None and self.paired_rows:
                out.batch_top1_agreement = 1 - self.batch_disagree / self.paired_rows
                allowed = out.spread_limit * self.batch_disagree
                allowed += 3 * math.sqrt(allowed + 1)
                out.top1_limit = max(0.0, 1 - allowed / self.paired_rows)
                out.passed = out.passed and self.paired_disagree <= allowed
        elif self.largest_batch <= 1:
            out.criterion = "not judged"
        else:
            min_agreement, max_rel = FALLBACK_OUTPUT_LIMITS
            out.passed = out.passed and rel <= max_rel and (agreement is None or agreement >= min_agreement)
        if thresholds.max_output_rel_error is not None:
            out.passed = out.passed and rel <= thresholds.max_output_rel_error
        if thresholds.min_top1_agreement is not None and agreement is not None:
            out.passed = out.passed and agreement >= thresholds.min_top1_agreement
        return out
