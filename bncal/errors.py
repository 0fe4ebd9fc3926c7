"""Errors that bncal reports to the user as one line (the CLI adds no traceback)."""

from __future__ import annotations

__all__ = ["BncalError", "VerificationError", "DeploymentError", "first_line", "one_line"]


class BncalError(Exception):
    """A problem with the user's input or environment, stated with how to fix it.

    The message is one sentence or two: what is wrong, then what to do about it. The CLI
    prints it as ``error: <message>`` and exits with status 1.
    """


class VerificationError(BncalError):
    """An exported or folded model did not match its reference within tolerance."""


class DeploymentError(BncalError):
    """A model is not fit to deploy: an error-severity finding of ``inspect``, a failed check or a
    failed accuracy guard (:mod:`bncal.gate`). ``report`` holds what was found (a
    :class:`bncal.gate.DeploymentReport`)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for reasons and error messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
