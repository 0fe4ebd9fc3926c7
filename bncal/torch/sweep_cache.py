"""Per-batch checkpoints of the eval-mode sweep (:mod:`bncal.torch.eval_sweep`): each batch's latest
frontier, held in memory within a byte budget, spilled to disk beyond it when a directory is
named, or not held at all (the batch is then recomputed from an older checkpoint, or from the
data). One placement rule (:meth:`Checkpoints._where`) serves both the real run and the cost
projection made before committing to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .sweep_plan import tensor_bytes
from ..errors import BncalError

__all__ = ["Checkpoints"]


class Checkpoints:
    """``step[b]``: the frontier batch ``b`` is stored at (-1: none, start from the data).

    ``cached_peak``: the most bytes ever held in memory between batches (a batch's own working
    set comes on top); ``spilled_peak`` the same on disk.
    """

    def __init__(self, budget_bytes: int, spill_dir: str | os.PathLike | None, device):
        self.budget, self.spill_dir, self.device = int(budget_bytes), spill_dir, device
        self.sizes: list[int] = []
        self.fingerprints: list[float] = []
        self.step: list[int] = []
        self.memory: list[list | None] = []  # values held in memory (or the non-tensor ones of a spilled batch)
        self.held: list[int] = []  # bytes each batch holds in memory
        self.on_disk: list[int] = []  # bytes each batch holds on disk
        self.cached = self.cached_peak = self.spilled = self.spilled_peak = 0
        self.directory: Path | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    def add(self, size: int, fingerprint: float) -> int:
        """Register the next batch (no checkpoint yet); returns its index."""
        for column, value in ((self.sizes, size), (self.fingerprints, fingerprint), (self.step, -1),
                              (self.memory, None), (self.held, 0), (self.on_disk, 0)):
            column.append(value)
        return len(self.sizes) - 1

    def needs_data(self) -> bool:
        return any(step < 0 for step in self.step)

    def load(self, b: int) -> tuple[int, list | None]:
        """``(step, values)`` of batch ``b``'s checkpoint; ``values`` is None at step -1."""
        if self.step[b] < 0:
            return -1, None
        if not self.on_disk[b]:
            return self.step[b], self.memory[b]
        tensors = torch.load(self._path(b), map_location=self.device, weights_only=True)
        return self.step[b], [t if t is not None else v for t, v in zip(tensors, self.memory[b])]

    def store(self, b: int, step: int, values: list) -> bool:
        """Make ``values`` (frontier ``step``) batch ``b``'s checkpoint where the rule allows;
        False (the older checkpoint stays) when it fits neither in memory nor on disk."""
        new = tensor_bytes(values)
        where = self._where(self.cached, self.held[b], new)
        if where is None:
            return False
        self._drop(b)
        if where == "memory":
            self.memory[b], self.held[b] = values, new
            self.cached += new
        else:
            self._spill(b, values)
        self.step[b] = step
        self.cached_peak = max(self.cached_peak, self.cached)
        self.spilled_peak = max(self.spilled_peak, self.spilled)
        return True

    def projected_cost(self, segment_cost, frontier_bytes, first: int, last: int) -> float:
        """Compute (in the plan's per-sample units times samples) that steps ``first`` to
        ``last - 1`` will take from the present state, by the same placement rule as :meth:`store`."""
        step, held, cached, cost = list(self.step), list(self.held), self.cached, 0.0
        for s in range(first, last):
            for b, size in enumerate(self.sizes):
                cost += size * sum(segment_cost[step[b] + 1:s + 1])
                new = size * frontier_bytes[s]
                where = self._where(cached, held[b], new)
                if where is not None:
                    kept = new if where == "memory" else 0
                    cached, held[b], step[b] = cached - held[b] + kept, kept, s
        return cost

    def close(self) -> None:
        """Drop every checkpoint and remove the spill directory (also after an error)."""
        self.memory = [None] * len(self.memory)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _where(self, cached: int, held: int, new: int) -> str | None:
        """The placement rule: memory while the budget allows, then disk when a directory is named."""
        if cached - held + new <= self.budget:
            return "memory"
        return "disk" if self.spill_dir is not None else None

    def _drop(self, b: int) -> None:
        self.cached -= self.held[b]
        self.spilled -= self.on_disk[b]
        self.memory[b], self.held[b], self.on_disk[b] = None, 0, 0

    def _spill(self, b: int, values: list) -> None:
        """Tensors to a file (written whole, then renamed into place); other values stay in memory."""
        tensors = [v if isinstance(v, torch.Tensor) else None for v in values]
        partial = None
        try:
            if self.directory is None:
                self.directory = Path(tempfile.mkdtemp(prefix="bncal-sweep-", dir=self.spill_dir))
            partial = self._path(b).with_suffix(".partial")
            torch.save(tensors, partial)
            os.replace(partial, self._path(b))
        except (OSError, RuntimeError) as exc:  # torch's writer words a full disk "[enforce fail ...] file write failed"
            if partial is not None:
                partial.unlink(missing_ok=True)
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "the write failed"
            try:
                free = f"{shutil.disk_usage(self.spill_dir).free / 2**20:.0f} MiB free there"
            except OSError:
                free = "is the disk full?"
            raise BncalError(f"cannot spill the sweep's activations to the spill directory {self.spill_dir} ({reason}; "
                             f"{free}); free space there, give another --spill-dir (spill_dir=), or raise --cache-mb "
                             "(cache_mb=)") from exc
        self.memory[b] = [None if isinstance(v, torch.Tensor) else v for v in values]
        self.on_disk[b] = tensor_bytes(tensors)
        self.held[b] = tensor_bytes(self.memory[b])
        self.cached += self.held[b]
        self.spilled += self.on_disk[b]

    def _path(self, b: int) -> Path:
        return self.directory / f"batch{b}.pt"
