"""Keras callbacks for BatchNorm in ``fit``: TF's inverse-decay momentum (large-batch training),
and an exact recalibration when training ends."""

from __future__ import annotations

from ..errors import BncalError
from ..momentum import inverse_decay_tf_momentum
from .backend import import_keras
from .layers import batchnorm_layers

keras = import_keras()

__all__ = ["InverseDecayMomentum", "RecalibrateOnTrainEnd"]


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

    How the train step sees each new value: the torch backend's eager step reads the layers'
    ``momentum`` as a Python number. TensorFlow compiles the step (a graph, or XLA with
    ``jit_compile``), which would keep the first number: there each layer's ``momentum`` is, while
    ``fit`` runs, one shared ``tf.Variable`` (not tracked as a model weight) that the compiled
    step reads and this callback assigns. JAX compiles it too and has no such variable: there the
    model must be compiled with ``run_eagerly=True`` (the callback refuses otherwise).
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
        self._variable = None  # the TensorFlow backend's shared momentum, while fit runs

    def momentum(self, step: int) -> float:
        """The momentum at training step ``step``."""
        return inverse_decay_tf_momentum(step, base=self.base, step_scale=self.step_scale, ceiling_tf=self.ceiling)

    def on_train_begin(self, logs=None):
        backend = keras.backend.backend()
        if backend not in ("torch", "tensorflow") and not self.model.run_eagerly:
            raise BncalError(f"on the {backend} backend a compiled train step keeps the first momentum; compile the "
                             "model with run_eagerly=True to schedule it")
        layers = [bn for _, bn in batchnorm_layers(self.model)]
        if not layers:
            raise BncalError("the model has no BatchNormalization layers whose momentum could be scheduled")
        self._original = [(bn, bn.momentum) for bn in layers]
        self._variable = None
        if backend == "tensorflow":
            import tensorflow as tf

            self._variable = tf.Variable(self.momentum(0), trainable=False, dtype=tf.float32,
                                         name="bncal_inverse_decay_momentum")
            for bn in layers:  # past the layers' attribute tracking: a schedule, not a model weight
                object.__setattr__(bn, "momentum", self._variable)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        value = self.momentum(step)
        if self._variable is not None:
            self._variable.assign(value)
            return
        for bn, _ in self._original:
            bn.momentum = value

    def on_train_end(self, logs=None):
        for bn, momentum in self._original:
            object.__setattr__(bn, "momentum", momentum)
        self._original, self._variable = [], None


class RecalibrateOnTrainEnd(keras.callbacks.Callback):
    """Recalibrate every BatchNormalization exactly when ``fit`` ends (:func:`bncal.keras.recalibrate`).

    ``data`` is the calibration data as ``recalibrate`` takes it (arrays, batches, a
    ``tf.data`` dataset of batches, or a zero-argument function returning them); ``mode``,
    ``batch_size`` and the other keywords are passed on. The moving averages ``fit`` left
    (stale with a large batch or a momentum close to 1) are replaced by the statistics of the
    final weights; the report is kept as :attr:`report`::

        model.fit(x, y, batch_size=2000, epochs=10,
                  callbacks=[bncal.keras.RecalibrateOnTrainEnd(x_calibration, mode="eval", batch_size=250)])
    """

    def __init__(self, data, *, mode: str = "eval", batch_size: int | None = 32, **options):
        super().__init__()
        self.data, self.mode, self.batch_size, self.options = data, mode, batch_size, options
        self.report = None

    def on_train_end(self, logs=None):
        from .recalibration import recalibrate

        self.report = recalibrate(self.model, self.data, mode=self.mode, batch_size=self.batch_size, **self.options)
