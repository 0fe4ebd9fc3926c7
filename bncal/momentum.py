"""BatchNorm momentum: the two conventions, a rule that fits it to batch and dataset size, and
the inverse-decay schedule for large-batch training.

Conventions
-----------
TensorFlow/Keras and ONNX write the moving-average update as::

    moving = momentum_tf * moving + (1 - momentum_tf) * batch_statistic

PyTorch uses the complement, ``momentum_torch = 1 - momentum_tf``::

    running = (1 - momentum_torch) * running + momentum_torch * batch_statistic

PyTorch also accepts ``momentum=None``: a cumulative (equal-weight) average over every batch
since the statistics were reset. It has no constant counterpart in the TF convention, so the
conversions here refuse it.

Fitting the momentum (Ioffe & Szegedy 2015; Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", section 3)
--------------------------------------------------------------------------------------------
An exponential moving average with TF momentum ``beta`` weighs the batch seen ``k`` steps ago
by ``(1 - beta) * beta**k``; its effective window is ``1 / (1 - beta) = 1 / momentum_torch``
steps. Two forces pull on that window. The weights change at every step, so a window that
spans much of an epoch averages statistics of stale models and the result lags behind the
final weights. A window of very few batches is noisy, and the noise is worst when each batch
is small. :func:`suggest_momentum` therefore aims the window at a fixed fraction of an epoch
and clips the result to the range practitioners use::

    steps_per_epoch = ceil(dataset_size / batch_size)
    window          = steps_per_epoch * WINDOW_FRACTION_OF_EPOCH          (1/4 of an epoch)
    momentum_tf     = clip(1 - 1 / window, MIN_TF_MOMENTUM, MAX_TF_MOMENTUM)   ([0.6, 0.99])

Small batches give many steps per epoch and land near the 0.99 ceiling (CIFAR-10 at batch 128:
391 steps, 0.99); large batches give few steps and a lower momentum (batch 2048: 25 steps,
0.84; batch 4096: 13 steps, 0.69), which is the published guidance (0.9-0.99 for small
batches, 0.6-0.85 for large ones).

With few steps a constant momentum has a second problem: the moving averages start at mean 0,
variance 1, and that start still carries weight ``beta ** total_steps`` at the end of
training. TF's remedy for large batches is an inverse-decay momentum that starts at 0 (use
the batch statistics entirely) and rises towards its ceiling, ``1 - 0.8 ** (step / 10)``;
:class:`InverseDecayMomentum` applies it to a PyTorch model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BncalError

__all__ = [
    "torch_to_tf", "tf_to_torch", "MomentumSuggestion", "suggest_momentum", "InverseDecayMomentum",
    "inverse_decay_tf_momentum", "format_momentum",
    "WINDOW_FRACTION_OF_EPOCH", "MIN_TF_MOMENTUM", "MAX_TF_MOMENTUM",
]

#: Fraction of an epoch the moving average's effective window should span.
WINDOW_FRACTION_OF_EPOCH = 0.25
#: TF-convention bounds of a suggestion: window between 2.5 and 100 steps.
MIN_TF_MOMENTUM = 0.6
MAX_TF_MOMENTUM = 0.99
#: Below this TF momentum (window under 10 steps) training counts as large-batch.
LARGE_BATCH_TF_MOMENTUM = 0.9
#: Largest acceptable weight of the initial statistics (mean 0, var 1) at the end of training.
MAX_INITIAL_WEIGHT = 0.01

_CONVENTIONS = ("torch", "tf")


def _check_momentum(value, convention: str) -> float:
    if value is None:
        other = "TF" if convention == "torch" else "PyTorch"
        raise BncalError(f"momentum None (PyTorch's cumulative average) has no {other} equivalent; "
                         "pass a number in [0, 1]")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise BncalError(f"{convention} momentum must lie in [0, 1], got {value}")
    return value


def torch_to_tf(momentum: float) -> float:
    """TF/Keras/ONNX momentum equivalent to a PyTorch one: ``1 - momentum``.

    Raises :class:`BncalError` for values outside [0, 1] and for ``None`` (PyTorch's cumulative
    average, which no constant TF momentum reproduces).
    """
    return 1.0 - _check_momentum(momentum, "torch")


def tf_to_torch(momentum: float) -> float:
    """PyTorch momentum equivalent to a TF/Keras/ONNX one: ``1 - momentum`` (range [0, 1])."""
    return 1.0 - _check_momentum(momentum, "tf")


def format_momentum(momentum: float) -> str:
    """``momentum`` as text with as many digits as tell it apart from 0 and from 1 (3 significant
    digits of both ``m`` and ``1 - m``): 0.99 -> ``0.99``, 0.9997 -> ``0.9997`` (not ``1``, which
    would say the statistics never move), 0.0003 -> ``0.0003``."""
    momentum = float(momentum)
    if not 0.0 < momentum < 1.0:
        return f"{momentum:g}"
    for digits in range(3, 17):
        text = f"{momentum:.{digits}g}"
        if abs(float(text) - momentum) <= 5e-4 * min(momentum, 1.0 - momentum):
            return text
    return repr(momentum)


def _check_convention(convention: str) -> str:
    if convention not in _CONVENTIONS:
        raise BncalError(f"convention must be 'torch' or 'tf', got {convention!r}")
    return convention


@dataclass
class MomentumSuggestion:
    """A BN momentum fitted to a training setup (see the module docstring for the rule).

    ``value`` is in ``convention``; ``tf`` and ``torch`` give both conventions.
    ``window_steps`` is the moving average's effective window ``1 / (1 - tf)`` in steps;
    ``initial_weight`` the weight the initial statistics keep after ``total_steps`` steps at
    this constant momentum. ``use_schedule`` is True when :class:`InverseDecayMomentum` is
    recommended over a constant momentum, and ``schedule`` says which schedule to use.
    """

    value: float
    convention: str
    tf: float
    torch: float
    window_steps: float
    steps_per_epoch: int
    total_steps: int
    initial_weight: float
    use_schedule: bool
    schedule: str
    rationale: str


def suggest_momentum(batch_size: int, dataset_size: int, epochs: float = 1, *,
                     convention: str = "torch") -> MomentumSuggestion:
    """Suggest a BN momentum for ``dataset_size`` samples seen in batches of ``batch_size``.

    ``batch_size`` is the per-device batch (the one each BN layer normalises over). The rule is
    ``momentum_tf = clip(1 - 1 / (steps_per_epoch / 4), 0.6, 0.99)``; the inverse-decay schedule
    is recommended when the result is below 0.9 (large batches, few steps per epoch) or when the
    initial statistics would keep more than 1% weight after ``epochs`` epochs.
    """
    _check_convention(convention)
    if int(batch_size) != batch_size or batch_size < 1:
        raise BncalError(f"batch size must be a positive integer, got {batch_size}")
    if int(dataset_size) != dataset_size or dataset_size < 1:
        raise BncalError(f"dataset size must be a positive integer, got {dataset_size}")
    if not epochs > 0:
        raise BncalError(f"epochs must be positive, got {epochs}")

    steps_per_epoch = math.ceil(dataset_size / batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    ideal_window = steps_per_epoch * WINDOW_FRACTION_OF_EPOCH
    ideal_tf = 1.0 - 1.0 / ideal_window if ideal_window > 1 else 0.0
    tf = min(max(ideal_tf, MIN_TF_MOMENTUM), MAX_TF_MOMENTUM)
    window = 1.0 / (1.0 - tf)
    initial_weight = tf ** total_steps

    rationale = (f"{steps_per_epoch} steps per epoch at batch {batch_size}; the moving average should "
                 f"span about {WINDOW_FRACTION_OF_EPOCH:g} of an epoch ({ideal_window:.3g} steps), "
                 f"TF momentum 1 - 1/{ideal_window:.3g} = {format_momentum(ideal_tf)}")
    if tf != ideal_tf:
        rationale += f", clipped to [{MIN_TF_MOMENTUM}, {MAX_TF_MOMENTUM}] -> {format_momentum(tf)}"
    rationale += f" (window {window:.3g} steps)."

    reasons = []
    if tf < LARGE_BATCH_TF_MOMENTUM:
        reasons.append("few steps per epoch (large batches)")
    if initial_weight > MAX_INITIAL_WEIGHT:
        reasons.append(f"the initial statistics would keep {initial_weight:.2g} of the weight "
                       f"after {total_steps} steps")
    use_schedule = bool(reasons)
    if use_schedule:
        reach = InverseDecayMomentum.steps_to_ceiling(tf)
        schedule = (f"inverse decay: InverseDecayMomentum(model, base=0.8, step_scale=10, ceiling={format_momentum(tf)}), "
                    f"TF momentum 1 - 0.8**(step/10) capped at {format_momentum(tf)} (reached after {reach} steps)")
        rationale += " An inverse-decay schedule is better here: " + "; ".join(reasons) + "."
    else:
        schedule = f"constant momentum {format_momentum(tf)} (TF) / {format_momentum(1 - tf)} (PyTorch)"

    value = tf if convention == "tf" else 1.0 - tf
    return MomentumSuggestion(value=value, convention=convention, tf=tf, torch=1.0 - tf,
                              window_steps=window, steps_per_epoch=steps_per_epoch,
                              total_steps=total_steps, initial_weight=initial_weight,
                              use_schedule=use_schedule, schedule=schedule, rationale=rationale)


def inverse_decay_tf_momentum(step: int, *, base: float = 0.8, step_scale: float = 10,
                              ceiling_tf: float = 0.99) -> float:
    """TF's inverse-decay momentum at training ``step`` (0 = the first batch), TF convention:
    ``min(1 - base ** (step / step_scale), ceiling_tf)``, i.e. ``1 - exponential_decay(1.0,
    step, step_scale, base)`` capped. The one formula behind :class:`InverseDecayMomentum`
    (PyTorch) and :class:`bncal.keras.InverseDecayMomentum` (a Keras callback)."""
    return min(1.0 - base ** (step / step_scale), ceiling_tf)


class InverseDecayMomentum:
    """Set every BatchNorm layer's momentum from TF's inverse-decay schedule, step by step.

    At step ``t`` the TF-convention momentum is ``min(1 - base ** (t / step_scale), ceiling)``,
    i.e. PyTorch momentum ``max(base ** (t / step_scale), 1 - ceiling)``. ``ceiling`` is given in
    ``convention`` (default TF: 0.99 means PyTorch momentum 0.01).

    Step 0 is the first training batch: TF momentum 0, PyTorch momentum 1, so that batch's
    statistics replace the initial ones entirely; the moving average then lengthens its window
    as training proceeds. The constructor applies step 0; call :meth:`step` once after each
    training forward pass (like a learning-rate scheduler) to move to the next step.

    Every :class:`torch.nn.modules.batchnorm._BatchNorm` in ``model`` is affected, which
    includes SyncBatchNorm and :mod:`bncal.torch.nn`'s BatchRenorm layers. :meth:`restore` puts back
    the momenta the layers had when the scheduler was created.
    """

    def __init__(self, model: "torch.nn.Module", *, base: float = 0.8, step_scale: float = 10,
                 ceiling: float = 0.99, convention: str = "tf"):
        _check_convention(convention)
        if not 0.0 < base < 1.0:
            raise BncalError(f"base must lie in (0, 1), got {base}")
        if not step_scale > 0:
            raise BncalError(f"step_scale must be positive, got {step_scale}")
        ceiling = _check_momentum(ceiling, convention)
        self.model = model
        self.base = float(base)
        self.step_scale = float(step_scale)
        self.ceiling_tf = ceiling if convention == "tf" else 1.0 - ceiling
        self.last_step = 0
        self._original = {name: m.momentum for name, m in self._layers()}
        if not self._original:
            raise BncalError("the model has no BatchNorm layers whose momentum could be scheduled")
        self._apply()

    def _layers(self):
        from torch.nn.modules.batchnorm import _BatchNorm  # here: suggest_momentum needs no torch

        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, _BatchNorm)]

    def tf_momentum(self, step: int | None = None) -> float:
        """TF-convention momentum at ``step`` (default: the current step)."""
        step = self.last_step if step is None else step
        return inverse_decay_tf_momentum(step, base=self.base, step_scale=self.step_scale, ceiling_tf=self.ceiling_tf)

    def torch_momentum(self, step: int | None = None) -> float:
        """PyTorch-convention momentum at ``step`` (default: the current step)."""
        step = self.last_step if step is None else step
        return 1.0 - self.tf_momentum(step)

    @staticmethod
    def steps_to_ceiling(ceiling_tf: float, base: float = 0.8, step_scale: float = 10) -> int:
        """First step at which the schedule reaches ``ceiling_tf`` (TF convention)."""
        if ceiling_tf <= 0:
            return 0
        return math.ceil(step_scale * math.log(1.0 - ceiling_tf) / math.log(base))

    def _apply(self) -> None:
        value = self.torch_momentum()
        for _, layer in self._layers():
            layer.momentum = value

    def step(self) -> float:
        """Advance one step, set the layers' momentum, and return it (PyTorch convention)."""
        self.last_step += 1
        self._apply()
        return self.torch_momentum()

    def restore(self) -> None:
        """Give each layer back the momentum it had when this scheduler was created."""
        for name, layer in self._layers():
            if name in self._original:
                layer.momentum = self._original[name]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base": self.base, "step_scale": self.step_scale,
                "ceiling_tf": self.ceiling_tf}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` and apply that step's momentum to the layers."""
        self.last_step = int(state["last_step"])
        self.base = float(state["base"])
        self.step_scale = float(state["step_scale"])
        self.ceiling_tf = float(state["ceiling_tf"])
        self._apply()
