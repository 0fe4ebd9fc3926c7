"""Progress reporting shared by the passes over data (a tqdm bar on request, or a callback)."""

from __future__ import annotations

__all__ = ["progress_reporter"]


def progress_reporter(progress):
    """A callable ``report(batches_done)`` for the current pass (``report(None)`` ends it), or None.

    ``progress`` is falsy (no reporting), True (a tqdm bar on stderr), or a callable given the
    number of batches done after each batch.
    """
    if not progress:
        return None
    if callable(progress) and progress is not True:
        return lambda done: None if done is None else progress(done)
    from tqdm.auto import tqdm

    bar = tqdm(unit="batch", leave=False, dynamic_ncols=True)
    shown = [0]

    def update(done):
        if done is None:
            bar.close()
        else:
            bar.update(done - shown[0])
            shown[0] = done
    return update
