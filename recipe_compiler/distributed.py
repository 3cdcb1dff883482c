"""Data-parallel calibration on ``torch.distributed`` (``torchrun --nproc_per_node N recipe-compile …``).

Every model-in-the-loop stage (calibration pass, FitPrune's per-alpha evaluation, verification)
splits the calibration set into the *same global batches* a single process would run
(``batch_size`` samples each) and gives each rank every ``world``-th batch. Batches, never single
samples, are sharded because a left-padded batch's numerics depend on its batch-mates (the padding
length). Each rank returns its per-batch results keyed by the global batch index; ``gather``
brings every batch's result to every rank in global order, so the numpy code that follows (the
statistics, the search's decisions, the verification means) runs on identical inputs in identical
order on every rank, and the recipe is byte-identical to a single-process run.

The default :data:`SINGLE` is a no-op (rank 0 of 1): one code path for both cases. The searches
proper are pure numpy and never import this module's torch side.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Sharding:
    """Which global batches this process runs, and how per-batch results are shared.

    Attributes:
        rank: this process's index in ``[0, world)``.
        world: number of processes.
        group: the ``torch.distributed`` process group (``None``: the default group).

    Example:
        >>> batches = list(batches_of(list(range(10)), 4))
        >>> [start for start, _ in batches]
        [0, 4, 8]
        >>> SINGLE.gather([(i, b) for i, b in SINGLE.my_batches(batches)]) == [b for b in batches]
        True
    """

    rank: int = 0
    world: int = 1
    group: Any = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        """True on the rank that searches, prints and writes (rank 0)."""
        return self.rank == 0

    def my_batches(self, batches: Sequence[T]) -> list[tuple[int, T]]:
        """``(global index, batch)`` of the batches this rank runs: every ``world``-th, from ``rank``."""
        return [(index, batch) for index, batch in enumerate(batches) if index % self.world == self.rank]

    def share(self, items: int, batch_size: int) -> int:
        """How many of ``items`` samples (in batches of ``batch_size``) this rank runs (for progress bars)."""
        sizes = [min(batch_size, items - start) for start in range(0, items, batch_size)]
        return sum(size for index, size in enumerate(sizes) if index % self.world == self.rank)

    def gather(self, mine: Sequence[tuple[int, T]]) -> list[T]:
        """Every rank's ``(global index, result)`` pairs, merged on every rank, in global index order.

        A collective: every rank must call it the same number of times (with an empty list if it
        ran no batch).
        """
        pairs = list(mine)
        if self.world > 1:
            import torch.distributed as dist

            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, pairs, group=self.group)
            pairs = [pair for part in everyone for pair in part]
        pairs.sort(key=lambda pair: pair[0])
        indices = [index for index, _ in pairs]
        if len(set(indices)) != len(indices):
            raise RuntimeError(f"internal error: batches {indices} were run more than once across ranks")
        return [result for _, result in pairs]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed before the first collective (no rank hangs).

        Rank 0 re-raises its own error or, if only other ranks failed, the first of theirs; other
        ranks raise :class:`RankFailed` (the CLI exits non-zero without printing it twice).
        """
        errors: list = [error]
        if self.world > 1:
            import torch.distributed as dist

            errors = [None] * self.world
            dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)), group=self.group)
            if error is not None:
                errors[self.rank] = error
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if not failed:
            return
        if error is not None and self.is_main:
            raise error
        if self.is_main:
            rank, (kind, message) = failed[0]
            raise RankFailed(f"rank {rank} failed: {message}")
        raise RankFailed(f"rank {failed[0][0]} failed")


class RankFailed(Exception):
    """Another rank of a distributed run failed; this one stops too."""


SINGLE = Sharding()
"""The single-process default: runs every batch, ``gather`` only sorts."""


def batches_of(items: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    """``(start, items[start:start + size])`` for consecutive batches: the global batch order."""
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def env_world() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def rank_device(device: str, local_rank: int, world: int) -> str:
    """The device one rank calibrates on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun.

    Example:
        >>> rank_device("cuda", 1, 2), rank_device("cpu", 1, 2), rank_device("cuda:3", 1, 2)
        ('cuda:1', 'cpu', 'cuda:3')
    """
    if world > 1 and device == "cuda":
        return f"cuda:{local_rank}"
    return device


@contextlib.contextmanager
def from_env(device: str = "cpu") -> Iterator[tuple[Sharding, str]]:
    """Join torchrun's process group for the duration of the block; yield ``(sharding, device)``.

    Not under torchrun (``WORLD_SIZE`` unset or 1): yields :data:`SINGLE` and ``device`` unchanged,
    and imports nothing. Otherwise initialises the default group (``nccl`` for a CUDA device,
    ``gloo`` otherwise) unless one exists already, and destroys what it created on exit.
    """
    rank, world, local_rank = env_world()
    if world <= 1:
        yield SINGLE, device
        return
    import torch
    import torch.distributed as dist

    device = rank_device(device, local_rank, world)
    cuda = torch.device(device).type == "cuda"
    created = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    try:
        yield Sharding(rank=dist.get_rank(), world=dist.get_world_size()), device
        if created:
            # Tear down together: a rank that destroys the group while a peer still holds its gloo
            # connections was seen to abort once ("terminate called without an active exception").
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
