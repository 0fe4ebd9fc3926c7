"""Check a Keras model's BatchNormalization statistics against its data.

The verdict is the ONNX check's (:mod:`bncal.checking`: :func:`~bncal.checking.assess_layer`,
:class:`~bncal.checking.OutputAgreement`, :meth:`~bncal.checking.CheckReport.from_checks`), the
thresholds and the table the same. Per batch the model runs twice, eagerly:

- inference mode, as deployed (``training=False``, every BN on its moving statistics);
- train mode in bncal's sense: every BN normalises with its batch statistics, Dropout and
  every other layer stay in inference mode. Each BN's input is reduced to float64 moments
  there (:class:`bncal.keras._passes.BatchNormTap`) and merged over all batches.

Per layer the moving statistics are compared with those population statistics; per model
output, inference with train mode, judged against train mode on a second batching of the same
samples (:class:`bncal.checking.PairedOutputs`, as in the ONNX check). A ``trainable=False`` layer (Keras runs it in inference
mode in training too) keeps its moving statistics in both runs and is listed as skipped. A
``renorm=True`` layer runs its own training forward in train mode (normalisation by its renorm
averages where r and d are not clipped, :mod:`bncal.renorm`), and its moving statistics are
judged against what reproduces that forward on the population, not against batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..calibration import BatchComposition, order_warning
from ..checking import BatchSpread, CheckReport, CheckThresholds, PairedOutputs, assess_layer
from ..errors import BncalError
from ..report import SkippedLayer
from ..stats import ChannelMoments
from ._backend import import_keras
from ._passes import BatchNormTap, batch_pass, calibration_data, default_forward, run_forward
from ..renorm import renorm_notes
from .layers import batchnorm_layers, moving_statistics, renorm_reference, require_model
from .recalibration import FROZEN_REASON

__all__ = ["check"]


def check(
    model,
    data: Iterable | np.ndarray,
    *,
    thresholds: CheckThresholds = CheckThresholds(),
    batch_size: int | None = 32,
    forward_fn: Callable | None = None,
    max_samples: int | None = None,
    progress: bool | Callable[[int], None] = False,
) -> CheckReport:
    """Compare ``model``'s moving BN statistics and inference outputs with train mode on ``data``.

    ``data``, ``batch_size``, ``forward_fn``, ``max_samples`` and ``progress`` as for
    :func:`bncal.keras.recalibrate` (one pass: a one-shot iterator is fine). Batches should be
    drawn at random and hold 16 or more samples for the output tests to mean something (see
    :class:`bncal.checking.CheckThresholds`). The model is not modified.

    Raises:
        BncalError: not a built Keras model, no BN to check, empty or non-finite data, a batch
            giving a BN one value per channel (train mode is undefined there), a failing forward.
    """
    keras = import_keras()
    require_model(model)
    source = calibration_data(data, batch_size, reiterable=False)
    forward_fn = forward_fn or default_forward
    skipped, layers = [], []
    for name, bn in batchnorm_layers(model):
        (skipped.append(SkippedLayer(name, FROZEN_REASON)) if not bn.trainable else layers.append((name, bn)))
    if not layers:
        detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
        raise BncalError(f"the model has no BatchNormalization layer to check{detail}")

    def batch_statistics(name, call, count, mean, var):
        if count < 2:
            raise BncalError(f"a batch gives BatchNormalization {name} only {count} value per channel, so train "
                             "mode is undefined; check with batches of 2 or more samples (32+ is better)")
        reference = references.get(name)
        return (mean, var) if reference is None else reference.training_statistics(mean, var)

    moving = {name: moving_statistics(bn) for name, bn in layers}
    references = {name: renorm_reference(bn) for name, bn in layers if renorm_reference(bn) is not None}
    moments = {name: ChannelMoments.empty(moving[name].mean.shape[0]) for name, _ in layers}
    spreads = {name: BatchSpread() for name, _ in layers}
    def train_outputs(inputs, index):  # a second batching's: its statistics are not merged
        with BatchNormTap(layers, batch_statistics):
            return _outputs(keras, run_forward(forward_fn, model, inputs, index))

    paired = None
    composition = BatchComposition()
    current = batch_pass(source, max_samples=max_samples, progress=progress, composition=composition)
    for index, (inputs, _) in current:
        inferred = _outputs(keras, run_forward(forward_fn, model, inputs, index))
        with BatchNormTap(layers, batch_statistics) as tap:  # the moving statistics come back after it
            trained = _outputs(keras, run_forward(forward_fn, model, inputs, index))
        for name, m in tap.moments().items():
            moments[name].merge(m)
            spreads[name].add(m.mean, m.variance)
        paired = paired or PairedOutputs(_output_names(model, len(inferred)), train_outputs)
        paired.add(index, inputs, inferred, trained)
    checks = []
    for name, bn in layers:
        if moments[name].count == 0:
            skipped.append(SkippedLayer(name, "never reached by the data: nothing to compare with"))
            continue
        reference = references[name].training_moments(moments[name]) if name in references else moments[name]
        checks.append(assess_layer(name, moments[name].channels, moving[name].mean, moving[name].var, reference,
                                   bn.epsilon, thresholds, spreads[name]))
    outputs = paired.checks(thresholds) if paired else []
    report = CheckReport.from_checks(checks, outputs, skipped, thresholds, current.batches, current.samples,
                                     batching_warning=order_warning(composition, "check"))
    report.notes += renorm_notes([(name, reference, moments[name]) for name, reference in references.items()
                                  if moments[name].count], "check")
    return report


def _outputs(keras, value) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in keras.tree.flatten(value)]


def _output_names(model, count: int) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) == count:
        return [str(n) for n in names]
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
