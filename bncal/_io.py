"""Former home of the output helpers: the output policy is :mod:`bncal.outputs` (kept as an alias)."""

from .outputs import atomic_output  # noqa: F401

__all__ = ["atomic_output"]
