"""Errors that bncal reports to the user as one line (the CLI adds no traceback)."""

from __future__ import annotations

__all__ = ["BncalError", "VerificationError"]


class BncalError(Exception):
    """A problem with the user's input or environment, stated with how to fix it.

    The message is one sentence or two: what is wrong, then what to do about it. The CLI
    prints it as ``error: <message>`` and exits with status 1.
    """


class VerificationError(BncalError):
    """An exported or folded model did not match its reference within tolerance."""
