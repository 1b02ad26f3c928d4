"""Several processes, one result: which rank does what, and how per-rank results come back in order.

Under ``accelerate launch`` (or ``torchrun``) with N processes, evaluation and the teacher pass split
their queries across ranks and gather the rows back in query order, and each optimiser step splits
its examples; only rank 0 writes files and prints. The process group is ``accelerate``'s
``PartialState``. In a single process every helper here is a no-op that never creates that state,
so single-process runs are exactly what they were (and a later ``Accelerator(cpu=True)`` is not
refused by a state that picked the GPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

# What torchrun / accelerate launch (WORLD_SIZE) and the MPI launchers set; the first one present counts.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """True when this process is one of several started by a distributed launcher."""
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value:
            return int(value) > 1
    return False


def _state():
    """accelerate's process state (initialises the process group on first use): gloo on CPU, NCCL on GPUs."""
    from accelerate import PartialState

    # `accelerate launch --cpu` says so through ACCELERATE_USE_CPU; without a GPU there is only the CPU.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def num_processes() -> int:
    return _state().num_processes if launched() else 1


def process_index() -> int:
    return _state().process_index if launched() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return process_index() == 0


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under a GPU launch, else the CPU."""
    device = _state().device if launched() else torch.device("cpu")
    return torch.device("cpu") if device.type == "cpu" else device


def shard_size(n: int) -> int:
    """How many of ``n`` items each rank handles in ``shard`` (all ranks the same)."""
    return math.ceil(n / num_processes()) if n else 0


def shard(n: int) -> list[int]:
    """This rank's contiguous share of ``range(n)``, padded to ``shard_size(n)`` by repeating an index.

    Equal lengths mean every rank runs the same number of forward passes, which FSDP (whose forward
    gathers parameters from all ranks) requires; ``gather_rows`` drops the repeats.
    """
    world = num_processes()
    if world == 1 or n == 0:
        return list(range(n))
    size = shard_size(n)
    start = min(process_index() * size, n)
    mine = list(range(start, min(start + size, n)))
    return mine + [mine[-1] if mine else n - 1] * (size - len(mine))


def split_step(indices: Sequence[int]) -> tuple[list[int], int]:
    """This rank's contiguous, unpadded share of one optimiser step's examples, and the largest share.

    Not padded: a repeated example would count twice in the gradient. A rank whose share is short or
    empty still runs as many micro-batches as the largest share needs (``fit`` does zero-weight ones).
    """
    world = num_processes()
    if world == 1:
        return list(indices), len(indices)
    size = math.ceil(len(indices) / world)
    start = process_index() * size
    return list(indices[start : start + size]), size


def gather_rows(tensors: Sequence[torch.Tensor | None], indices: Sequence[int], n: int) -> list[torch.Tensor | None]:
    """Every rank's rows of each tensor, put back at their ``indices`` in (n, ...) tensors, on every rank.

    ``tensors[k]`` holds the rows of ``indices`` (this rank's ``shard``); None stays None. One
    collective for all the tensors. Ranks are applied in order, so a repeated index always ends up
    with the same rank's row and the result does not depend on timing. In one process: returned as is.
    """
    if not launched():
        return list(tensors)
    from accelerate.utils import gather_object

    parts = gather_object([(list(indices), [None if t is None else t.cpu() for t in tensors])])
    out: list[torch.Tensor | None] = []
    for k, local in enumerate(tensors):
        if local is None:
            out.append(None)
            continue
        full = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
        for rank_indices, rank_tensors in parts:
            if rank_indices:
                full[torch.tensor(rank_indices, dtype=torch.long)] = rank_tensors[k]
        out.append(full)
    return out


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (decisions such as "is this cached?" are taken once, by rank 0)."""
    if not launched():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64); in one process, the values themselves."""
    if not launched():
        return list(values)
    from accelerate.utils import reduce

    tensor = torch.tensor(list(values), dtype=torch.float64, device=_state().device)
    return reduce(tensor, reduction="sum").cpu().tolist()


def shutdown(wait: bool = True) -> None:
    """Leave the process group cleanly at the end of a launched run (torch warns otherwise).

    With ``wait`` (a run that ended normally on every rank) the ranks meet first: a rank that tore its
    group down (rank 0 also hosts the rendezvous store) while another was still in its last collective
    could kill that one's communication threads mid-use, which ends the process with "terminate called
    without an active exception" and a non-zero exit code although every result was written. After an
    error there is no waiting: the other ranks may sit in a collective that a barrier would not match.
    """
    if launched() and torch.distributed.is_initialized():
        try:
            if wait:
                torch.distributed.barrier()
        finally:
            _state().destroy_process_group()
