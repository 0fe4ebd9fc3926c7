"""Exact BatchNorm statistics for TensorFlow 1 graphs (``tf.compat.v1``), written into their variables.

The mistake this repairs is TF1's best known: ``tf.compat.v1.layers.batch_normalization`` adds
its moving-average updates to the ``UPDATE_OPS`` collection, and a train op built without
``tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS))`` never
runs them: ``moving_mean``/``moving_variance`` stay 0 and 1 and inference is wrong. No converter
helps afterwards (tf2onnx, a frozen graph: the statistics are folded into constants), so the
variables are repaired in the graph, from calibration data, before saving or freezing::

    import bncal.tf1
    with tf.compat.v1.Session(graph=graph) as session:
        saver.restore(session, "model.ckpt")
        report = bncal.tf1.recalibrate(session, images, data, training=is_training, mode="eval")
        saver.save(session, "model-recalibrated.ckpt")

How: each BN is found by its ``moving_mean``/``moving_variance`` variables; its input is the
float tensor that enters its name scope from outside (the layer's ``x``; through the
``training`` switch of ``tf.cond`` too). The graph is run on each batch, fetching every BN's
input, whose float64 moments are merged over batches (:mod:`bncal.stats`, every axis but the
channel axis counts as samples, batches weigh by their size). ``mode="train"`` feeds
``training=True``: every BN normalises with its batch statistics (PreciseBN), and nothing is
updated since no update op runs. ``mode="eval"`` feeds ``training=False`` and iterates the
statistics to the fixed point where each BN's are those of its input when every earlier BN
uses its new ones, i.e. one forward of all the data as one batch
(:func:`bncal.stats.fixed_point_passes`, exact after one pass per BN depth). The population
(biased) variance is stored, as everywhere in bncal. The passes and the report are every path's
(:func:`bncal.driver.run_recalibration`); :class:`TF1Recalibration` is the TF1 backend. Needs TensorFlow (``pip install
'bncal[tf]'``); nothing else in bncal does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np

from .calibration import NONFINITE_DATA, check_mode, one_value_error
from .driver import BNLayer, RecalibrationBackend, run_recalibration
from .errors import BncalError, one_line
from .extras import require
from .report import LayerStats, RecalibrationReport
from .stats import ChannelMoments, batch_moments

__all__ = ["recalibrate", "batchnorm_variables"]

_DEFAULT_EPSILON = 1e-3  # tf.compat.v1.layers.batch_normalization's
_VARIABLE_READS = {"VariableV2", "VarHandleOp", "ReadVariableOp", "Const", "Identity"}


def batchnorm_variables(graph) -> dict[str, tuple]:
    """``{scope: (moving_mean, moving_variance)}`` of every BN of ``graph`` (global variables
    named ``<scope>/moving_mean`` and ``<scope>/moving_variance``), in creation order."""
    tf = require("tensorflow", "bncal.tf1")
    with graph.as_default():
        variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
    found = {}
    for name, variable in variables.items():
        if name.endswith("/moving_mean"):
            scope = name[: -len("/moving_mean")]
            variance = variables.get(scope + "/moving_variance")
            if variance is not None:
                found[scope] = (variable, variance)
    return found


def _is_variable_value(tensor, scope: str) -> bool:
    """Whether ``tensor`` is a variable's value or a constant (not the BN's data)."""
    op = tensor.op
    while op.type == "Identity" and op.inputs:
        op = op.inputs[0].op
    return op.type in _VARIABLE_READS or op.name.startswith(scope + "/")


def _layer_input(graph, scope: str):
    """The float tensor that enters ``scope``'s ops from outside (the BN's ``x``)."""
    candidates = {}
    for op in graph.get_operations():
        if not op.name.startswith(scope + "/"):
            continue
        for tensor in op.inputs:
            if tensor.dtype.is_floating and not tensor.op.name.startswith(scope + "/") \
                    and not _is_variable_value(tensor, scope):
                candidates[tensor.name] = tensor
    if len(candidates) != 1:
        shown = ", ".join(sorted(candidates)) or "none"
        raise BncalError(f"cannot tell which tensor is the input of BatchNorm {scope} (found {shown}); pass "
                         "bn_inputs={scope: tensor}")
    return next(iter(candidates.values()))


def _epsilon(graph, scope: str) -> float:
    for op in graph.get_operations():
        if op.name.startswith(scope + "/") and op.type.startswith("FusedBatchNorm"):
            return float(op.get_attr("epsilon"))
    return _DEFAULT_EPSILON


def recalibrate(
    session,
    inputs,
    data: Iterable | Callable[[], Iterable],
    *,
    training=None,
    mode: str = "eval",
    bn_inputs: dict | None = None,
    feed: dict | None = None,
    max_samples: int | None = None,
    tol: float = 1e-5,
    max_passes: int | None = None,
) -> RecalibrationReport:
    """Recompute the moving statistics of every BatchNorm in ``session.graph`` from ``data`` and
    write them into its ``moving_mean``/``moving_variance`` variables (in ``session``).

    Args:
        session: a ``tf.compat.v1.Session`` whose graph holds the model, variables initialised
            or restored. Only the moving statistics change (``variable.load``); save them with
            your ``tf.compat.v1.train.Saver`` afterwards.
        inputs: the input placeholder, or a list of them (each batch then a tuple in that order).
        data: an iterable of batches (arrays, or tuples for several inputs; ``(x, y)`` with one
            input uses ``x``), or a zero-argument function returning one. ``eval`` mode reads
            it several times: not a one-shot iterator.
        training: the boolean placeholder the graph's BNs take as ``training`` (fed True in
            ``train`` mode, False in ``eval`` mode); None for a graph built for inference
            (``eval`` mode only).
        mode: ``"eval"`` (default): the statistics of one forward of all the data as one batch,
            the right ones before deployment. ``"train"``: PreciseBN, every BN on its batch
            statistics, for training that goes on with these batch sizes.
        bn_inputs: ``{scope: tensor}`` for BNs whose input is not found automatically.
        feed: further ``feed_dict`` entries for every run (a dropout rate, say).

    Raises:
        BncalError: no BN variables, an input that cannot be found, a train mode without
            ``training``, empty or non-finite data, a run that fails.
    """
    check_mode(mode)
    if mode == "train" and training is None:
        raise BncalError("mode 'train' feeds training=True to the BNs: pass the graph's training placeholder as "
                         "training=, or use mode 'eval'")
    backend = TF1Recalibration(session, inputs, training=training, bn_inputs=bn_inputs, feed=feed,
                               one_value_ok=(mode == "eval"))
    return run_recalibration(backend, data, mode=mode, tol=tol, max_passes=max_passes, max_samples=max_samples)


class TF1Recalibration(RecalibrationBackend):
    """The TF1 part of a recalibration (:func:`bncal.driver.run_recalibration`): every pass runs the
    graph on each batch, fetching every BN's input; a train pass feeds ``training=True`` (every BN
    on its batch statistics, no update op runs), an eval pass writes the statistics to normalise
    with into the moving variables and feeds ``training=False``. One ``session.run`` sees no
    statistics of the same pass, so eval passes are never anchored (plain fixed-point passes)."""

    channel_axis = -1  # TensorFlow lays channels last
    anchors = False

    def __init__(self, session, inputs, *, training, bn_inputs, feed, one_value_ok: bool):
        graph = session.graph
        self.session, self.training, self.feed, self.one_value_ok = session, training, feed or {}, one_value_ok
        self.variables = batchnorm_variables(graph)
        if not self.variables:
            raise BncalError("the graph has no BatchNorm variables (<scope>/moving_mean and <scope>/moving_variance)")
        self.placeholders = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        self.tensors = {scope: (bn_inputs or {}).get(scope) or _layer_input(graph, scope) for scope in self.variables}
        self.layers = [BNLayer(scope, _epsilon(graph, scope), LayerStats(
            *(np.asarray(session.run(v), np.float64).reshape(-1) for v in pair))) for scope, pair in self.variables.items()]
        self.skipped, self.notes, self.calls_per_forward = [], [], {}
        self.moments: dict[str, ChannelMoments] = {}
        self.train_pass = True

    def prepare(self, batch, index, remaining):
        values = _batch_values(batch, len(self.placeholders))
        if remaining is not None:
            values = [v[:remaining] for v in values]
        first = next((v for v in values if np.issubdtype(v.dtype, np.floating)), values[0])
        return (values, first), len(values[0])

    @contextlib.contextmanager
    def prepared(self):
        try:
            yield self
        except BaseException:
            _write(self.session, self.variables, {layer.name: layer.moving for layer in self.layers})
            raise

    def start_pass(self, statistics, may_anchor=False) -> None:
        self.train_pass, self.moments = statistics is None, {}
        if statistics is not None:
            _write(self.session, self.variables, {name: LayerStats(m.mean, m.variance)
                                                  for name, m in statistics.items() if m.count})

    def run_batch(self, values, index, anchored) -> None:
        feed_dict = dict(self.feed)
        feed_dict.update(zip(self.placeholders, values))
        if self.training is not None:
            feed_dict[self.training] = self.train_pass
        try:
            fetched = self.session.run(self.tensors, feed_dict=feed_dict)
        except Exception as exc:  # noqa: BLE001 -- TensorFlow's OpErrors are none of Python's own kinds
            raise BncalError(f"the graph failed on calibration batch {index} (input shapes "
                             f"{', '.join(str(np.shape(v)) for v in values)}): {one_line(exc)}") from exc
        for layer in self.layers:
            x = fetched[layer.name]
            channels = layer.moving.mean.shape[0]
            count, mean, var = batch_moments(x, x.ndim - 1 if x.shape[-1] == channels else 1)
            if self.train_pass and self.training is not None and count < 2 and not self.one_value_ok:
                raise one_value_error(index, "use batches of 2 or more samples, or mode 'eval'", layer.name, count)
            self.moments.setdefault(layer.name, ChannelMoments.empty(channels)).add_batch(count, mean, var)
            self.calls_per_forward[layer.name] = 1

    def end_pass(self):
        return self.moments

    def write(self, statistics, batches) -> None:
        _write(self.session, self.variables, {name: LayerStats(m.mean, m.variance) for name, m in statistics.items()})


def _batch_values(batch, n_inputs: int) -> list[np.ndarray]:
    if isinstance(batch, dict):
        raise BncalError("give TF1 calibration batches as arrays or tuples in the order of inputs=, not dicts")
    if isinstance(batch, (tuple, list)):
        values = list(batch)[:n_inputs] if n_inputs == 1 else list(batch)
    else:
        values = [batch]
    if len(values) < n_inputs:
        raise BncalError(f"a calibration batch holds {len(values)} arrays for {n_inputs} inputs")
    values = [np.asarray(v) for v in values[:n_inputs]]
    for v in values:
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            raise BncalError(NONFINITE_DATA)
    return values


def _write(session, variables, statistics: dict[str, LayerStats]) -> None:
    for scope, stats in statistics.items():
        mean_var, var_var = variables[scope]
        mean_var.load(np.asarray(stats.mean).astype(mean_var.dtype.base_dtype.as_numpy_dtype), session)
        var_var.load(np.asarray(stats.var).astype(var_var.dtype.base_dtype.as_numpy_dtype), session)
