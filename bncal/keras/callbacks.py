"""A Keras callback for TF's inverse-decay BatchNorm momentum (large-batch training)."""

from __future__ import annotations

from ..errors import BncalError
from ..momentum import inverse_decay_tf_momentum
from ._backend import import_keras
from .layers import batchnorm_layers

keras = import_keras()

__all__ = ["InverseDecayMomentum"]


class InverseDecayMomentum(keras.callbacks.Callback):
    """Set every BatchNormalization's momentum from TF's inverse-decay schedule before each batch.

    At training step ``t`` (the optimizer's ``iterations``, 0 for the first batch, so the
    schedule carries on across ``fit`` calls) every BN gets::

        momentum = min(1 - base ** (t / step_scale), ceiling)

    i.e. ``1 - exponential_decay(1.0, t, step_scale, base)`` capped
    (:func:`bncal.momentum.inverse_decay_tf_momentum`, the formula the PyTorch
    :class:`bncal.momentum.InverseDecayMomentum` uses). Step 0 has momentum 0: the first
    batch's statistics replace the initial mean 0 / variance 1 entirely, and the average then
    lengthens its window. ``ceiling`` is a Keras momentum (e.g. the value
    ``bncal.suggest_momentum(batch, dataset, convention="tf")`` gives). Each layer's own
    momentum comes back when training ends.

    Layers read ``momentum`` as a Python number: the torch backend's eager train step sees each
    new value; TensorFlow and JAX compile it into their train step, so there the model must be
    compiled with ``run_eagerly=True`` (the callback refuses otherwise).
    """

    def __init__(self, *, base: float = 0.8, step_scale: float = 10, ceiling: float = 0.99):
        super().__init__()
        if not 0.0 < base < 1.0:
            raise BncalError(f"base must lie in (0, 1), got {base}")
        if not step_scale > 0:
            raise BncalError(f"step_scale must be positive, got {step_scale}")
        if not 0.0 <= ceiling <= 1.0:
            raise BncalError(f"ceiling is a Keras momentum in [0, 1], got {ceiling}")
        self.base, self.step_scale, self.ceiling = float(base), float(step_scale), float(ceiling)
        self._original: list = []

    def momentum(self, step: int) -> float:
        """The momentum at training step ``step``."""
        return inverse_decay_tf_momentum(step, base=self.base, step_scale=self.step_scale, ceiling_tf=self.ceiling)

    def on_train_begin(self, logs=None):
        if keras.backend.backend() != "torch" and not self.model.run_eagerly:
            raise BncalError(f"on the {keras.backend.backend()} backend a compiled train step keeps the first "
                             "momentum; compile the model with run_eagerly=True to schedule it")
        layers = [bn for _, bn in batchnorm_layers(self.model)]
        if not layers:
            raise BncalError("the model has no BatchNormalization layers whose momentum could be scheduled")
        self._original = [(bn, bn.momentum) for bn in layers]

    def on_train_batch_begin(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        value = self.momentum(step)
        for bn, _ in self._original:
            bn.momentum = value

    def on_train_end(self, logs=None):
        for bn, momentum in self._original:
            bn.momentum = momentum
        self._original = []
