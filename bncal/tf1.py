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
(biased) variance is stored, as everywhere in bncal. Needs TensorFlow (``pip install
'bncal[tf]'``); nothing else in bncal does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .calibration import NEVER_REACHED, LayerResult, build_report, check_mode, data_source, require_finite
from .errors import BncalError, one_line
from .extras import require
from .report import LayerStats, RecalibrationReport, SkippedLayer
from .stats import ChannelMoments, batch_moments, fixed_point_passes

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
    graph = session.graph
    variables = batchnorm_variables(graph)
    if not variables:
        raise BncalError("the graph has no BatchNorm variables (<scope>/moving_mean and <scope>/moving_variance)")
    if mode == "train" and training is None:
        raise BncalError("mode 'train' feeds training=True to the BNs: pass the graph's training placeholder as "
                         "training=, or use mode 'eval'")
    placeholders = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    tensors = {scope: (bn_inputs or {}).get(scope) or _layer_input(graph, scope) for scope in variables}
    before = {scope: LayerStats(*(np.asarray(session.run(v), np.float64).reshape(-1) for v in pair))
              for scope, pair in variables.items()}
    source = data_source(data, reread=(mode == "eval"))
    counts = {"batches": 0, "samples": 0}

    def run_pass(is_training: bool) -> dict[str, ChannelMoments]:
        moments: dict[str, ChannelMoments] = {}
        counts["batches"] = counts["samples"] = 0
        for index, batch in enumerate(source()):
            if max_samples is not None and counts["samples"] >= max_samples:
                break
            values = _batch_values(batch, len(placeholders))
            if max_samples is not None:
                values = [v[: max_samples - counts["samples"]] for v in values]
            feed_dict = dict(feed or {})
            feed_dict.update(zip(placeholders, values))
            if training is not None:
                feed_dict[training] = is_training
            try:
                fetched = session.run(tensors, feed_dict=feed_dict)
            except Exception as exc:  # noqa: BLE001 -- TensorFlow's OpErrors are none of Python's own kinds
                raise BncalError(f"the graph failed on calibration batch {index} (input shapes "
                                 f"{', '.join(str(np.shape(v)) for v in values)}): {one_line(exc)}") from exc
            for scope, x in fetched.items():
                channels = before[scope].mean.shape[0]
                axis = x.ndim - 1 if x.shape[-1] == channels else 1
                count, mean, var = batch_moments(x, axis)
                if is_training and count < 2:
                    raise BncalError(f"a batch gives BatchNorm {scope} only {count} value per channel, so its batch "
                                     "statistics are undefined in mode 'train'; use batches of 2 or more, or mode 'eval'")
                moments.setdefault(scope, ChannelMoments.empty(channels)).add_batch(count, mean, var)
            counts["batches"] += 1
            counts["samples"] += len(values[0])
        if counts["batches"] == 0:
            raise BncalError("the calibration data is empty; give at least one batch")
        return moments

    def eval_pass(stats: dict[str, ChannelMoments]) -> dict[str, ChannelMoments]:
        _write(session, variables, stats)
        return run_pass(False)

    try:
        moments, passes, converged, change = fixed_point_passes(
            lambda: run_pass(training is not None), eval_pass, mode=mode, tol=tol, max_passes=max_passes)
        for scope, m in moments.items():
            require_finite(scope, m)
    except BaseException:
        for scope, (mean_var, var_var) in variables.items():  # put the statistics back
            mean_var.load(before[scope].mean.astype(mean_var.dtype.base_dtype.as_numpy_dtype), session)
            var_var.load(before[scope].var.astype(var_var.dtype.base_dtype.as_numpy_dtype), session)
        raise
    _write(session, variables, moments)
    results, skipped = [], []
    for scope in variables:
        m = moments.get(scope)
        if m is None or m.count == 0:
            skipped.append(SkippedLayer(scope, NEVER_REACHED))
            continue
        results.append(LayerResult(scope, before[scope], m, _epsilon(graph, scope)))
    return build_report(mode=mode, layers=results, skipped=skipped, batches=counts["batches"],
                        samples=counts["samples"], passes=passes, converged=converged, max_rel_change=change,
                        notes=[])


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
            raise BncalError("the calibration data contains NaN or Inf values; clean or filter it first")
    return values


def _write(session, variables, moments) -> None:
    for scope, m in moments.items():
        if m.count == 0:
            continue
        mean_var, var_var = variables[scope]
        mean_var.load(m.mean.astype(mean_var.dtype.base_dtype.as_numpy_dtype), session)
        var_var.load(m.variance.astype(var_var.dtype.base_dtype.as_numpy_dtype), session)
