"""Check a PyTorch model's BatchNorm statistics against its data, in PyTorch itself.

The verdict is the ONNX check's (:mod:`bncal.checking`: :func:`~bncal.checking.assess_layer`,
:class:`~bncal.checking.PairedOutputs`, :meth:`~bncal.checking.CheckReport.from_checks`). The ONNX
check runs an exported graph, in which a batch renormalisation layer (:mod:`bncal.nn`) is a
plain BatchNormalization, so its train mode would normalise with batch statistics, which is not
what that layer did in training. Here every BN runs in eval mode, fed per batch the statistics
its training forward normalises with: the batch's own, or for a renorm layer the statistics that
reproduce its renorm forward (:mod:`bncal.renorm`); every other module stays in eval mode too,
as in recalibration. A renorm layer's moving statistics are judged against that forward on the
population.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ._progress import DataPass
from .calibration import BatchComposition, order_warning
from .checking import BatchSpread, CheckReport, CheckThresholds, PairedOutputs, assess_layer
from .data import select_inputs
from .errors import BncalError, first_line
from .recalibration import batchnorm_layers, renorm_references
from .torch_passes import default_forward, output_tensors, prepare_batch
from .renorm import renorm_notes
from .report import SkippedLayer
from .stats import ChannelMoments

__all__ = ["check_torch"]


def check_torch(model: torch.nn.Module, batches: Iterable, *, thresholds: CheckThresholds = CheckThresholds(),
                forward_fn: Callable | None = None, inputs=None, max_samples: int | None = None,
                progress: bool | Callable[[int], None] = False) -> CheckReport:
    """Compare ``model``'s moving BN statistics and inference outputs with train mode on ``batches``.

    Batches as for :func:`bncal.recalibrate` (one pass: a one-shot iterator is fine; ``inputs``
    picks the model inputs, ``forward_fn(model, batch)`` calls the model). Batches should be
    drawn at random and hold 16 or more samples (see :class:`bncal.checking.CheckThresholds`);
    batches far from random draws are named in ``warnings``, as in :func:`bncal.checking.check_onnx`. The
    model is left as it was: modes, statistics and weights.

    Raises:
        BncalError: no BN with moving statistics, empty or non-finite data, a batch giving a BN
            one value per channel, a forward failing on the data.
    """
    forward_fn = forward_fn or default_forward
    layers, skipped = [], []
    for name, bn in batchnorm_layers(model):
        if bn.track_running_stats and bn.running_mean is not None:
            layers.append((name, bn))
        else:
            skipped.append(SkippedLayer(name, "created with track_running_stats=False: it has no moving statistics"))
    if not layers:
        raise BncalError("the model has no BatchNorm layer with moving statistics to check")
    references = renorm_references(layers)
    device = next(iter(model.parameters()), next(iter(model.buffers()), torch.empty(0))).device
    moments = {name: ChannelMoments.empty(bn.num_features) for name, bn in layers}
    spreads = {name: BatchSpread() for name, _ in layers}
    moving = {name: (bn.running_mean.detach().clone(), bn.running_var.detach().clone()) for name, bn in layers}

    def outputs(batch, index) -> list[np.ndarray]:
        try:
            with torch.no_grad():
                value = forward_fn(model, batch)
        except BncalError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise BncalError(f"the model failed on batch {index}: {first_line(exc)}") from exc
        return [t.detach().cpu().double().numpy() for t in output_tensors(value)]

    def train_outputs(batch, index, merge=False):
        def hook(name, bn):
            def pre(module, args):
                x = args[0].detach()
                count = x.numel() // x.shape[1]
                if count < 2:
                    raise BncalError(f"batch {index} gives BatchNorm {name} one value per channel, so train mode is "
                                     "undefined; check with batches of 2 or more samples (32+ is better)")
                var, mean = torch.var_mean(x.double(), dim=[0, *range(2, x.dim())], correction=0)
                mean, var = mean.cpu().numpy(), var.cpu().numpy()
                if merge:
                    moments[name].add_batch(count, mean, var)
                    spreads[name].add(mean, var)
                if name in references:
                    mean, var = references[name].training_statistics(mean, var)
                module.running_mean.copy_(torch.from_numpy(mean))
                module.running_var.copy_(torch.from_numpy(var))
            return bn.register_forward_pre_hook(pre)

        handles = [hook(name, bn) for name, bn in layers]
        try:
            return outputs(_to_device(batch, device), index)
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for name, bn in layers:
                    bn.running_mean.copy_(moving[name][0])
                    bn.running_var.copy_(moving[name][1])

    paired, composition = None, BatchComposition()
    current = DataPass(select_inputs(batches, inputs),
                       lambda batch, index, remaining: prepare_batch(batch, device, remaining, fingerprint=False,
                                                                composition=composition),
                       max_samples=max_samples, progress=progress)
    with _all_eval(model):
        for index, (batch, _) in current:
            inferred = outputs(batch, index)
            trained = train_outputs(batch, index, merge=True)
            if paired is None:
                names = ["output"] if len(inferred) == 1 else [f"output_{i}" for i in range(len(inferred))]
                paired = PairedOutputs(names, train_outputs)
            paired.add(index, _numpy(batch), inferred, trained)
    checks = []
    for name, bn in layers:
        m = moments[name]
        if m.count == 0:
            skipped.append(SkippedLayer(name, "never reached by the data: nothing to compare with"))
            continue
        reference = references[name].training_moments(m) if name in references else m
        checks.append(assess_layer(name, m.channels, moving[name][0].double().cpu().numpy(),
                                   moving[name][1].double().cpu().numpy(), reference, bn.eps, thresholds,
                                   spreads[name]))
    report = CheckReport.from_checks(checks, paired.checks(thresholds) if paired else [], skipped, thresholds,
                                     current.batches, current.samples,
                                     batching_warning=order_warning(composition, "check"))
    report.notes += renorm_notes([(name, ref, moments[name]) for name, ref in references.items()
                                  if moments[name].count], "check")
    return report


@contextlib.contextmanager
def _all_eval(model):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _numpy(batch):
    """A batch's tensors as numpy arrays, for :func:`bncal.checking.rebatch_pair`."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().numpy()
    if isinstance(batch, dict):
        return {k: _numpy(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return tuple(_numpy(v) for v in batch)
    return batch


def _to_device(batch, device):
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch).to(device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
