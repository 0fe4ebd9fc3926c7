"""Check an ONNX model's BatchNorm statistics against its data, in onnxruntime.

The check's policy and verdict are :func:`bncal.driver.run_check`'s; here onnxruntime runs the
inference graph and the train-mode graph (:func:`bncal.onnx.graphs.make_train_graph`, each BN's
batch statistics exposed as outputs) on the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..checking import CheckReport, CheckThresholds
from ..data import select_inputs
from ..driver import BNLayer, CheckBackend, run_check
from ..errors import BncalError
from .lowered import find_lowered_normalisations, no_batchnorm_hint
from .view import find_batchnorms
from ..report import LayerStats, SkippedLayer
from .runtime import StatisticsSession, first_floating, fixed_batch_size, input_specs, ort_session, run, validated_feeds

__all__ = ["check_onnx"]


def check_onnx(
    model,
    batches: Iterable,
    *,
    thresholds: CheckThresholds = CheckThresholds(),
    max_samples: int | None = None,
    providers: list[str] | None = None,
    progress: bool | Callable[[int], None] = False,
    inputs=None,
) -> CheckReport:
    """Compare an ONNX model's moving BN statistics and inference outputs with train mode on ``batches``.

    ``model`` is an ``onnx.ModelProto``. One pass over the data (a one-shot iterator is fine);
    batches as for :func:`bncal.onnx.recalibration.recalibrate_onnx` (see
    :mod:`bncal.onnx.runtime`). Batches should be drawn at random and hold 16 or more samples for
    the output tests to be meaningful (see :class:`bncal.checking.CheckThresholds`); batches far
    from random draws (:class:`bncal.calibration.BatchComposition`) are named in ``warnings`` and
    the verdict, instead of blaming the statistics. ``inputs`` picks the model inputs out of
    each batch (:func:`bncal.data.select_inputs`).

    Raises:
        BncalError: no BN to check, data not matching the model, NaN/Inf in the data, or a
            batch giving a BN one value per channel (train mode is undefined there).
    """
    return run_check(OnnxCheck(model, providers), select_inputs(batches, inputs), thresholds=thresholds,
                     max_samples=max_samples, progress=progress)


class OnnxCheck(CheckBackend):
    """The onnxruntime part of a check: the inference session and the train graph's session."""

    def __init__(self, model, providers=None):
        if not isinstance(model, onnx.ModelProto):
            raise BncalError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the file with onnx.load "
                             "first")
        infos = find_batchnorms(model)
        self.skipped = [SkippedLayer(i.name, i.skip_reason) for i in infos if not i.handled]
        if not any(i.handled for i in infos):
            detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in self.skipped)})" if self.skipped else ""
            raise BncalError(f"the model has no inference BatchNormalization to check{detail}"
                             f"{no_batchnorm_hint(model, 'checked')}")
        lowered = find_lowered_normalisations(model)
        self.unchecked = [SkippedLayer(l.name, f"{l.describe()}: {l.reason}, its statistics folded into constants")
                          for l in lowered if not l.frozen]
        self.skipped += [SkippedLayer(l.name, f"{l.describe()}: {l.reason}") for l in lowered if l.frozen]
        self.specs = input_specs(model)
        self.names = [o.name for o in model.graph.output]
        self.inference = ort_session(model, optimization_level="all", providers=providers)
        self.session = StatisticsSession.train_graph(model, outputs=self.names, providers=providers)
        initializers = {init.name: init for init in model.graph.initializer}
        self.layers = [BNLayer(info.name, info.epsilon, LayerStats(
            numpy_helper.to_array(initializers[info.mean_initializer]).astype(np.float64).reshape(-1),
            numpy_helper.to_array(initializers[info.var_initializer]).astype(np.float64).reshape(-1)))
            for info in self.session.infos]
        # A graph with a fixed batch size cannot run two batches joined: no batch-size probe there.
        fixed_batch = fixed_batch_size(self.specs)
        self.joinable = fixed_batch is None
        self.single_value_fix = ("the model's batch size is fixed at 1, so its train mode cannot be run: check a "
                                 "copy exported with a dynamic or larger batch size" if fixed_batch == 1 else
                                 "check with batches of 2 or more samples (32+ is better)")

    def prepare(self, batch, index, remaining):
        feeds, size = validated_feeds(batch, self.specs, index, remaining)
        return (feeds, first_floating(feeds)), size

    def output_names(self, count):
        return self.names

    def infer(self, feeds, index):
        return run(self.inference, self.names, feeds, index=index)

    def train(self, feeds, index):
        moments = self.session.new_moments()
        outputs, _ = self.session.collect(feeds, index, moments, single_value_fix=self.single_value_fix)
        return outputs, moments.layers
