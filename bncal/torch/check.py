"""Check a PyTorch model's BatchNorm statistics against its data, in PyTorch itself.

The check's policy and verdict are every framework's (:func:`bncal.driver.run_check`). The ONNX
check runs an exported graph, in which a batch renormalisation layer (:mod:`bncal.torch.nn`) is a
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

from ..calibration import one_value_error
from ..checking import CheckReport, CheckThresholds
from ..data import select_inputs
from ..driver import CheckBackend, run_check
from ..errors import BncalError, first_line
from .recalibration import model_device, tracked_batchnorms
from ..stats import ChannelMoments
from .passes import channel_moments, default_forward, output_tensors, prepare_batch

__all__ = ["check_torch"]


def check_torch(model: torch.nn.Module, batches: Iterable, *, thresholds: CheckThresholds = CheckThresholds(),
                forward_fn: Callable | None = None, inputs=None, max_samples: int | None = None,
                progress: bool | Callable[[int], None] = False) -> CheckReport:
    """Compare ``model``'s moving BN statistics and inference outputs with train mode on ``batches``.

    Batches as for :func:`bncal.recalibrate` (one pass: a one-shot iterator is fine; ``inputs``
    picks the model inputs, ``forward_fn(model, batch)`` calls the model). Batches should be
    drawn at random and hold 16 or more samples (see :class:`bncal.checking.CheckThresholds`);
    batches far from random draws are named in ``warnings``, as in :func:`bncal.onnx.check.check_onnx`. The
    model is left as it was: modes, statistics and weights.

    Raises:
        BncalError: no BN with moving statistics, empty or non-finite data, a batch giving a BN
            one value per channel, a forward failing on the data.
    """
    return run_check(TorchCheck(model, forward_fn), select_inputs(batches, inputs), thresholds=thresholds,
                     max_samples=max_samples, progress=progress)


class TorchCheck(CheckBackend):
    """The PyTorch part of a check (:func:`bncal.driver.run_check`): every module in eval mode;
    train mode feeds each BN, in a pre-hook, the statistics its training forward normalises with
    on the batch, and puts the moving statistics back after the forward."""

    def __init__(self, model, forward_fn=None):
        self.model, self.forward_fn = model, forward_fn or default_forward
        self.modules, self.layers, self.skipped = tracked_batchnorms(model, "check")
        self.device = model_device(model)
        self.moving = {name: (bn.running_mean.detach().clone(), bn.running_var.detach().clone())
                       for name, bn in self.modules}

    def prepare(self, batch, index, remaining):
        return prepare_batch(batch, self.device, remaining)

    @contextlib.contextmanager
    def checking(self):
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            yield
        finally:
            for m, training in modes.items():
                m.training = training

    def arrays(self, inputs):
        if isinstance(inputs, torch.Tensor):
            return inputs.detach().cpu().numpy()
        if isinstance(inputs, dict):
            return {k: self.arrays(v) for k, v in inputs.items()}
        if isinstance(inputs, (list, tuple)):
            return tuple(self.arrays(v) for v in inputs)
        return inputs

    def infer(self, inputs, index):
        try:
            with torch.no_grad():
                value = self.forward_fn(self.model, _to_device(inputs, self.device))
        except BncalError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise BncalError(f"the model failed on batch {index}: {first_line(exc)}") from exc
        return [t.detach().cpu().double().numpy() for t in output_tensors(value)]

    def train(self, inputs, index):
        found = {}

        def hook(layer):
            def pre(module, args):
                x = args[0].detach()
                count = x.numel() // x.shape[1]
                if count < 2:
                    raise one_value_error(index, "check with batches of 2 or more samples (32+ is better)",
                                          layer.name, count)
                mean, var = channel_moments(x.double())
                moments = ChannelMoments.empty(x.shape[1])
                moments.add_batch(count, mean.cpu().numpy(), var.cpu().numpy())
                found[layer.name] = found[layer.name].merge(moments) if layer.name in found else moments
                trained = layer.trained_with(moments)
                module.running_mean.copy_(torch.from_numpy(trained.mean))
                module.running_var.copy_(torch.from_numpy(trained.variance))
            return pre

        handles = [bn.register_forward_pre_hook(hook(layer)) for (_, bn), layer in zip(self.modules, self.layers)]
        try:
            return self.infer(inputs, index), found
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for name, bn in self.modules:
                    bn.running_mean.copy_(self.moving[name][0])
                    bn.running_var.copy_(self.moving[name][1])


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
