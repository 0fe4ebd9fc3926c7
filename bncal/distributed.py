"""Running under torchrun: join the process group the environment describes, pick each rank's
device, split a sample limit across ranks, combine statistics across ranks, and word a rank's
failure.

:func:`combine_across_ranks` is the one merge of per-rank moments, used by the PyTorch path
(:func:`bncal.recalibrate`) and the ONNX path (:func:`bncal.recalibrate_onnx`) alike after
every pass. Nothing here imports torch until it is needed: reading the launch environment
(:func:`environment`) is free, and :func:`active_process_group` imports nothing when no process
group can exist (torch.distributed never imported), so the ONNX path runs without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from .errors import BncalError, first_line

__all__ = ["Launch", "environment", "parse_device", "pick_device", "torchrun_process_group", "shard_limit",
           "active_process_group", "world_size", "combine_across_ranks", "peer_failure"]

_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
              "connection refused", "timed out")


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in the run: ``rank`` of ``world_size`` (1 without torchrun),
    ``local_rank`` on its machine, and the ``device`` its model runs on (None: leave it where it is)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes."""
        return self.rank == 0

    def shard_limit(self, max_samples: int | None) -> int | None:
        return shard_limit(max_samples, self.rank, self.world_size)


def environment() -> Launch:
    """The launch torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (a lone process without)."""
    def number(name, default):
        text = os.environ.get(name, "")
        try:
            return int(text) if text else default
        except ValueError:
            raise BncalError(f"the environment variable {name}={text!r} is not a number; is this a torchrun launch?") from None

    return Launch(rank=number("RANK", 0), world_size=number("WORLD_SIZE", 1), local_rank=number("LOCAL_RANK", 0))


def parse_device(text: str) -> str:
    """Check a device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``...) and that this machine has it.

    Returns the name as torch spells it; BncalError says what is wrong and what exists instead.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise BncalError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    kind = device.type
    if kind == "cpu":
        return str(device)
    if kind == "meta":
        raise BncalError("the meta device holds no data; use cpu, cuda, cuda:N or mps")
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise BncalError(f"device {text!r}: this machine (this torch build) has no {kind.upper()} device; "
                         "use --device cpu or leave --device out")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise BncalError(f"device {text!r}: this machine has {count()} {kind} device(s), numbered from 0")
    return str(device)


def pick_device(requested: str | None, launch: Launch) -> str | None:
    """The device for this rank: the one asked for (``cuda`` means this rank's own GPU under
    torchrun), else ``cuda:LOCAL_RANK`` under torchrun when CUDA is there, else None."""
    if requested is not None:
        if requested == "cuda" and launch.distributed:
            return f"cuda:{launch.local_rank}"
        return requested
    if launch.distributed:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{launch.local_rank}"
    return None


def shard_limit(max_samples: int | None, rank: int, world_size: int) -> int | None:
    """This rank's part of a run-wide ``max_samples`` (parts differ by at most one, sum exactly).

    BncalError, on every rank alike, when the limit leaves a rank without samples."""
    if max_samples is None:
        return None
    if max_samples < world_size:
        raise BncalError(f"--max-samples {max_samples} is fewer than the {world_size} ranks, so some ranks would get "
                         "no samples; give at least one sample per rank, or run fewer ranks")
    return max_samples * (rank + 1) // world_size - max_samples * rank // world_size


@contextlib.contextmanager
def torchrun_process_group(device: str | None = None):
    """Join the process group of a torchrun launch (more than one rank) for the block's duration.

    Yields the :class:`Launch`, with the device picked by :func:`pick_device`. nccl when the
    ranks run on CUDA, else gloo. A group initialised by the caller is used and left alone.
    """
    launch = environment()
    if not launch.distributed:
        yield dataclasses.replace(launch, device=pick_device(device, launch))
        return
    import torch
    import torch.distributed as dist

    created = False
    chosen = pick_device(device, launch)
    if not dist.is_initialized():
        use_cuda = chosen is not None and chosen.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(torch.device(chosen))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    try:
        yield Launch(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch.local_rank,
                     device=chosen)
    finally:
        if created:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def active_process_group(group=None):
    """The process group to combine statistics over, or None for a lone process.

    ``group`` when given, else the default group; None when ``torch.distributed`` is not
    initialised or the group has a single rank. Without a ``group`` and with
    ``torch.distributed`` never imported no group can exist, and nothing is imported.
    """
    if group is None and "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(group) <= 1:
        return None
    return group if group is not None else dist.group.WORLD


def world_size(group) -> int:
    """Ranks in ``group`` (an :func:`active_process_group` result; None is one process)."""
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def combine_across_ranks(moments: dict, channels: dict[str, int], batches: int, samples: int, group):
    """Every rank's per-BN moments merged in rank order, identically (bit for bit) on every rank.

    ``moments`` maps BN names to this rank's :class:`~bncal.stats.ChannelMoments` (a BN this
    rank never reached may be missing); ``channels`` names every BN, in one order on all
    ranks, with its channel count. Returns ``(moments, batches, samples)`` over all ranks, the
    moments of the BNs some rank reached. One ``all_gather`` of one float64 vector (on the
    current CUDA device for an nccl group, else on the CPU).
    """
    import numpy as np
    import torch
    import torch.distributed as dist

    from .stats import ChannelMoments

    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    parts = [(moments.get(name) or ChannelMoments.empty(width)).to_array() for name, width in channels.items()]
    local = torch.from_numpy(np.concatenate(parts + [np.array([batches, samples], np.float64)])).to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    gathered = [g.cpu().numpy() for g in gathered]
    combined, offset = {}, 0
    for name, width in channels.items():
        size = 1 + 2 * width
        merged = ChannelMoments.combine(ChannelMoments.from_array(g[offset:offset + size]) for g in gathered)
        offset += size
        if merged.count:
            combined[name] = merged
    return combined, int(sum(g[offset] for g in gathered)), int(sum(g[offset + 1] for g in gathered))


def peer_failure(exc: BaseException) -> str | None:
    """A message for a collective that failed because another rank stopped, or None if ``exc``
    is something else. The other rank prints its own error; this one says it lost contact."""
    import sys

    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None) if dist is not None else None
    text = first_line(exc)
    is_dist = dist_error is not None and isinstance(exc, dist_error)
    if not is_dist and not (isinstance(exc, RuntimeError) and any(p in text.lower() for p in _PEER_GONE)):
        return None
    return ("another rank stopped, so this one lost contact with it (that rank's own error is printed above); "
            f"the collective said: {text}")
