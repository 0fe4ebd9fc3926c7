"""Progress reporting shared by the passes over data (a tqdm bar on request, or a callback).

A bar shows its total (and so tqdm's estimate of the time left) whenever it can be known: the
data's length, the previous pass's batch count, the batches ``max_samples`` allows judging by
the first batch, or (the eval-mode sweep) depths times batches.
"""

from __future__ import annotations

import math
import time

__all__ = ["progress_reporter", "DataPass", "batch_count", "pass_label", "PassClock"]


class _Bar:
    """``report(done)`` moves a tqdm bar on stderr to ``done``; ``report(None)`` closes it."""

    def __init__(self, total, description, unit):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True)
        self.shown = 0

    def __call__(self, done):
        if done is None:
            self.bar.close()
        else:
            self.bar.update(done - self.shown)
            self.shown = done

    def set_total(self, total: int | None) -> None:
        """The total once it is known (tqdm then shows the time left)."""
        if total is not None and total != self.bar.total:
            self.bar.total = total
            self.bar.refresh()


class _Callback:
    """``report(done)`` calls the user's ``progress(done)``; it takes no total."""

    def __init__(self, progress):
        self.progress = progress

    def __call__(self, done):
        if done is not None:
            self.progress(done)

    def set_total(self, total: int | None) -> None:
        pass


def progress_reporter(progress, *, total: int | None = None, description: str | None = None, unit: str = "batch"):
    """A callable ``report(batches_done)`` for the current pass (``report(None)`` ends it, and
    ``report.set_total(n)`` gives the total once known), or None.

    ``progress`` is falsy (no reporting), True (a tqdm bar on stderr, showing ``total``
    batches when known and ``description``, e.g. which pass), or a callable given the number
    of batches done after each batch.
    """
    if not progress:
        return None
    if callable(progress) and progress is not True:
        return _Callback(progress)
    return _Bar(total, description, unit)


def batch_count(data) -> int | None:
    """``len(data)`` where the data knows it (a list, a DataLoader, bncal's file data), else None."""
    try:
        count = len(data)
    except (TypeError, AttributeError, NotImplementedError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def pass_label(number: int, max_passes: int | None, seconds_per_pass: float | None = None) -> str | None:
    """``"pass 2 of at most 8"`` for the passes of eval mode (None for a single pass); with
    ``seconds_per_pass``, the most time the remaining passes can take: ``"pass 3 of at most 8, ~1.2 s
    each, at most ~7 s left"``."""
    if max_passes == 1 and number == 1:
        return None
    label = f"pass {number}" + (f" of at most {max_passes}" if max_passes else "")
    if seconds_per_pass is not None and max_passes:
        label += (f", ~{seconds_per_pass:.2g} s each, at most ~{_duration(seconds_per_pass * (max_passes - number + 1))}"
                  " left")
    return label


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class PassClock:
    """Labels for eval mode's passes with an overall estimate: the time of the last full eval pass
    (pass 2 on; pass 1 is the sweep or a train pass, whose cost differs) times the passes left."""

    def __init__(self):
        self.started: dict[int, float] = {}

    def label(self, number: int, max_passes: int | None) -> str | None:
        now = time.perf_counter()
        self.started[number] = now
        previous = number - 1
        per_pass = now - self.started[previous] if previous >= 2 and previous in self.started else None
        return pass_label(number, max_passes, per_pass)


class DataPass:
    """One pass over calibration batches, shared by the PyTorch and ONNX paths.

    Iterating yields ``(index, prepared)`` for each batch, where ``prepare(batch, index,
    remaining)`` returns ``(prepared, samples in it)`` and ``remaining`` is how many samples
    ``max_samples`` still allows (None: no limit). Progress is reported per batch under
    ``description``, against ``total`` (a previous pass's count) when given, else the number of
    batches when the data knows it, else (with ``max_samples``) the batches the limit allows
    judging by the first batch's size. After the pass ``batches`` and ``samples`` hold its counts; an empty pass
    raises BncalError.
    """

    def __init__(self, data, prepare, *, max_samples=None, progress=None, description: str | None = None,
                 total: int | None = None):
        self.data, self.prepare, self.max_samples, self.progress = data, prepare, max_samples, progress
        self.description, self.total = description, total
        self.batches = self.samples = 0

    def __iter__(self):
        from .errors import BncalError

        known = batch_count(self.data) if self.progress else None
        total = self.total if self.total is not None else known if self.max_samples is None else None
        report = None  # the bar starts with the first batch, when a sample limit's total can be judged
        batches = samples = 0
        try:
            for index, batch in enumerate(self.data):
                if self.max_samples is not None and samples >= self.max_samples:
                    break
                remaining = None if self.max_samples is None else self.max_samples - samples
                prepared, size = self.prepare(batch, index, remaining)
                if size == 0:
                    raise BncalError(f"batch {index} holds no samples (its first dimension is 0); "
                                     "give batches of one sample or more")
                if index == 0 and self.progress:
                    if total is None and self.max_samples is not None:
                        # The batches max_samples allows, judging by the first one (exact for equal batches).
                        total = math.ceil(self.max_samples / size)
                        total = min(total, known) if known is not None else total
                    report = progress_reporter(self.progress, total=total, description=self.description)
                yield index, prepared
                batches += 1
                samples += size
                if report is not None:
                    report(batches)
        finally:
            if report is not None:
                report(None)
        if batches == 0:
            raise BncalError("the calibration data is empty; give at least one batch")
        self.batches, self.samples = batches, samples
