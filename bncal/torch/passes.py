"""The pieces of a PyTorch data pass shared by recalibration, the eval sweep and the PyTorch check.

How a batch calls a model (:func:`default_call`, :func:`default_forward`) and what it returns
(:func:`output_tensors`), how a batch is
prepared for a pass (:func:`prepare_batch`: on the device, finite, cut to a sample limit,
fingerprinted), and how one BN's moments are merged call by call during a pass
(:class:`LayerMoments`). Kept apart from :mod:`bncal.torch.recalibration` so that the modules built on
them import them from below, not from each other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..calibration import NONFINITE_DATA
from ..errors import BncalError
from ..stats import ChannelMoments

__all__ = ["default_call", "default_forward", "prepare_batch", "describe_batch", "channel_moments", "LayerMoments", "output_tensors",
           "output_arrays"]


def default_call(batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the default call convention: a tensor is one input, a tuple/list
    holds positional inputs, a dict keyword inputs."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def default_forward(model: nn.Module, batch):
    """Call ``model`` on one batch by :func:`default_call`. For ``(inputs, labels)`` loaders pass
    ``inputs=0`` to :func:`recalibrate` (or a ``forward_fn``)."""
    args, kwargs = default_call(batch)
    return model(*args, **kwargs)


def prepare_batch(batch, device, limit):
    """Move tensors to ``device``, check they are finite, cut to ``limit`` samples.

    Returns ``((batch, first), size)``, ``first`` the first floating tensor as given (else the
    first tensor; None without any): what the driver fingerprints and tests the composition on
    (:mod:`bncal.driver`). Finiteness costs one sum in the tensor's own dtype (no copy); only a
    sum that is not finite is looked at element by element.
    """
    sizes, floating, other = [], [], []

    def visit(x):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            if x.dim() > 0 and limit is not None and x.shape[0] > limit:
                x = x[:limit]
            if x.dim() > 0:
                sizes.append(x.shape[0])
            if x.is_floating_point():
                if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
                    raise BncalError(NONFINITE_DATA)
            (floating if x.is_floating_point() else other).append(x)
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: visit(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(visit(v) for v in x)
        return x

    batch = visit(batch)
    first = (floating or other or [None])[0]
    return (batch, first), (sizes[0] if sizes else 1)


def describe_batch(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return ", ".join(f"{k}: {describe_batch(v)}" for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return ", ".join(describe_batch(v) for v in batch)
    return type(batch).__name__


def channel_moments(x: torch.Tensor):
    """Per-channel mean and biased variance of a BN input over every axis but 1, in two passes
    (on CPU much faster than ``torch.var_mean`` over those axes, and as exact)."""
    y = x.reshape(x.shape[0], x.shape[1], -1)
    mean = y.mean((0, 2))
    return mean, (y - mean[:, None]).square_().mean((0, 2))


class LayerMoments:
    """One BN's moments during a pass, merged call by call (:meth:`ChannelMoments.merge`, in
    place) into float64 accumulators on the BN's device; in eval passes also each call's
    ``(mean, variance)``, which the next pass anchors on (:meth:`previous`).

    Nothing recorded outlives a call except into tensors allocated once per recalibration:
    the accumulators, and two record buffers of ``(calls, 2, channels)`` (this pass's and the
    previous one's, swapped per pass, grown only when a pass has more calls than any before).
    Small tensors kept across a forward would sit between its large activations in the C
    allocator's heap and keep it from reusing their space (on ResNet-18 that grew the peak memory
    of a pass several-fold).
    The pass syncs with the device once, at its end (:meth:`result`).
    """

    def __init__(self, channels: int, device):
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        self.moments = ChannelMoments(0, zeros, zeros.clone())
        self.records = self.previous_records = None
        self.calls = self.previous_calls = 0
        self.recording = False

    def start_pass(self, *, record: bool, expected_calls: int) -> None:
        """Reset the moments; with ``record``, keep this pass's calls (room for ``expected_calls``)."""
        self.moments.count = 0
        self.records, self.previous_records = self.previous_records, self.records
        self.calls, self.previous_calls = 0, (self.calls if self.recording else 0)
        self.recording = record
        if record and self.previous_records is not None and self.records is None:
            self.records = torch.empty_like(self.previous_records)
        if record and self.records is not None and self.records.shape[0] < expected_calls:
            self.records = self.records.new_empty((expected_calls, *self.records.shape[1:]))
        self._expected = expected_calls

    def add(self, count: int, mean, biased_var) -> None:
        if self.recording:
            if self.records is None or self.records.dtype != mean.dtype or self.calls == self.records.shape[0]:
                self._grow(mean)
            self.records[self.calls, 0].copy_(mean)
            self.records[self.calls, 1].copy_(biased_var)
            self.calls += 1
        mean = mean.to(torch.float64)
        self.moments.merge(ChannelMoments(count, mean, biased_var.to(torch.float64) * count))

    def _grow(self, like) -> None:
        """Room for more calls, or for calls in another dtype (autocast); keeps the calls so far."""
        old = self.records
        rows = max(self._expected, 2 * (0 if old is None else old.shape[0]), 1)
        self.records = like.new_empty((rows, 2, like.shape[0]))
        if old is not None:
            self.records[:self.calls].copy_(old[:self.calls])

    def previous(self, call: int):
        """Call ``call``'s ``(mean, variance)`` in the previous eval pass, or None."""
        if call >= self.previous_calls:
            return None
        return self.previous_records[call, 0], self.previous_records[call, 1]

    def result(self) -> ChannelMoments:
        m = self.moments
        return ChannelMoments(m.count, m.mean.cpu().numpy().copy(), m.m2.cpu().numpy().copy())


def output_tensors(value) -> list[torch.Tensor]:
    """A model's outputs as their tensor leaves, in the order the exporters emit them (tuples and
    lists in order, dicts in insertion order; other leaves are not graph outputs)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    return []


def output_arrays(value) -> list[np.ndarray]:
    """:func:`output_tensors` as numpy arrays (detached, on the CPU)."""
    return [t.detach().cpu().numpy() for t in output_tensors(value)]
