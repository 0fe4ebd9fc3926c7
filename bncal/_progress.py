"""Progress reporting shared by the passes over data (a tqdm bar on request, or a callback)."""

from __future__ import annotations

__all__ = ["progress_reporter", "DataPass", "batch_count", "pass_label"]


def progress_reporter(progress, *, total: int | None = None, description: str | None = None):
    """A callable ``report(batches_done)`` for the current pass (``report(None)`` ends it), or None.

    ``progress`` is falsy (no reporting), True (a tqdm bar on stderr, showing ``total``
    batches when known and ``description``, e.g. which pass), or a callable given the number
    of batches done after each batch.
    """
    if not progress:
        return None
    if callable(progress) and progress is not True:
        return lambda done: None if done is None else progress(done)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="batch", leave=False, dynamic_ncols=True)
    shown = [0]

    def update(done):
        if done is None:
            bar.close()
        else:
            bar.update(done - shown[0])
            shown[0] = done
    return update


def batch_count(data) -> int | None:
    """``len(data)`` where the data knows it (a list, a DataLoader, bncal's file data), else None."""
    try:
        count = len(data)
    except (TypeError, AttributeError, NotImplementedError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def pass_label(number: int, max_passes: int | None) -> str | None:
    """``"pass 2 of at most 8"`` for the passes of eval mode (None for a single pass)."""
    if max_passes == 1 and number == 1:
        return None
    return f"pass {number}" + (f" of at most {max_passes}" if max_passes else "")


class DataPass:
    """One pass over calibration batches, shared by the PyTorch and ONNX paths.

    Iterating yields ``(index, prepared)`` for each batch, where ``prepare(batch, index,
    remaining)`` returns ``(prepared, samples in it)`` and ``remaining`` is how many samples
    ``max_samples`` still allows (None: no limit). Progress is reported per batch, against the
    number of batches when the data knows it (and no sample limit cuts the pass short), under
    ``description``. After the pass ``batches`` and ``samples`` hold its counts; an empty pass
    raises BncalError.
    """

    def __init__(self, data, prepare, *, max_samples=None, progress=None, description: str | None = None):
        self.data, self.prepare, self.max_samples, self.progress = data, prepare, max_samples, progress
        self.description = description
        self.batches = self.samples = 0

    def __iter__(self):
        from .errors import BncalError

        total = batch_count(self.data) if self.progress and self.max_samples is None else None
        report = progress_reporter(self.progress, total=total, description=self.description)
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
