"""Check a Keras model's BatchNormalization statistics against its data.

The check's policy and verdict are every framework's (:func:`bncal.driver.run_check`), the
thresholds and the table the same. Per batch the model runs twice, eagerly:

- inference mode, as deployed (``training=False``, every BN on its moving statistics);
- train mode in bncal's sense: every BN normalises with its batch statistics, Dropout and
  every other layer stay in inference mode. Each BN's input is reduced to float64 moments
  there (:class:`bncal.keras.passes.BatchNormTap`) and merged over all batches.

Per layer the moving statistics are compared with those population statistics; per model
output, inference with train mode, judged against train mode on a second batching of the same
samples (:class:`bncal.checking.PairedOutputs`), and at twice the batch size
(:class:`bncal.checking.BatchSizeProbe`). A ``trainable=False`` layer (Keras runs it in inference
mode in training too) keeps its moving statistics in both runs and is listed as skipped. A
``renorm=True`` layer runs its own training forward in train mode (normalisation by its renorm
averages where r and d are not clipped, :mod:`bncal.renorm`), and its moving statistics are
judged against what reproduces that forward on the population, not against batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..calibration import one_value_error
from ..checking import CheckReport, CheckThresholds
from ..driver import CheckBackend, run_check
from .backend import import_keras
from .passes import BatchNormTap, calibration_data, default_forward, prepare_batch, run_forward
from .layers import require_model, trainable_batchnorms

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
    import_keras()
    require_model(model)
    source = calibration_data(data, batch_size, reiterable=False)
    return run_check(KerasCheck(model, forward_fn), source, thresholds=thresholds, max_samples=max_samples,
                     progress=progress)


class KerasCheck(CheckBackend):
    """The Keras part of a check (:func:`bncal.driver.run_check`): inference is the model's own
    call; train mode runs inside a :class:`~bncal.keras.passes.BatchNormTap` that feeds every
    BN its batch's statistics (a renorm layer its training statistics) and records its input's
    moments."""

    channel_axis = -1  # Keras lays channels last

    def __init__(self, model, forward_fn=None):
        self.keras = import_keras()
        self.model, self.forward_fn = model, forward_fn or default_forward
        self.modules, self.layers, self.skipped = trainable_batchnorms(model, "check")
        self.references = {layer.name: layer.reference for layer in self.layers if layer.reference is not None}

    def prepare(self, batch, index, remaining):
        return prepare_batch(batch, remaining)

    def output_names(self, count):
        names = list(getattr(self.model, "output_names", None) or [])
        return [str(n) for n in names] if len(names) == count else super().output_names(count)

    def arrays(self, inputs):
        return self.keras.tree.map_structure(lambda a: np.asarray(self.keras.ops.convert_to_numpy(a)), inputs)

    def _outputs(self, value) -> list[np.ndarray]:
        return [np.asarray(self.keras.ops.convert_to_numpy(v)) for v in self.keras.tree.flatten(value)]

    def infer(self, inputs, index):
        return self._outputs(run_forward(self.forward_fn, self.model, inputs, index))

    def train(self, inputs, index):
        def batch_statistics(name, call, count, mean, var):
            if count < 2:
                raise one_value_error(index, "check with batches of 2 or more samples (32+ is better)", name, count)
            reference = self.references.get(name)
            return (mean, var) if reference is None else reference.training_statistics(mean, var)

        with BatchNormTap(self.modules, batch_statistics) as tap:  # the moving statistics come back after it
            outputs = self._outputs(run_forward(self.forward_fn, self.model, inputs, index))
        return outputs, tap.moments()
