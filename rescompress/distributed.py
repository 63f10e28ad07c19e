"""Multi-process training under torchrun: `torchrun --nproc-per-node N -m rescompress run RECIPE`.

torchrun starts N copies of the command with RANK, WORLD_SIZE and MASTER_ADDR/PORT set. Every rank runs the
same pipeline steps on the same data: every rank draws the same global batch order, and each decodes and
trains on its own share of every batch (`rank::world`). The model is wrapped in DistributedDataParallel,
which averages gradients and keeps buffers (BatchNorm statistics, int8 observers) in step with rank 0. Everything that is not training
(pruning analysis, calibration, conversion) is deterministic and runs on every rank alike.

Only rank 0 writes: checkpoints, training state, the manifest, logs, and then exports, measures and reports
alone while the other ranks end after the last training step. The process group is gloo on CPU and nccl
when CUDA is available. Without torchrun (WORLD_SIZE unset or 1) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of processes (1 when the process group is not initialised)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return World()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main() -> bool:
    return world().main


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return world()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable object)."""
    if world().size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks."""
    if world().size <= 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: Any) -> Any:
    """`model` for training: wrapped in DistributedDataParallel when there are several ranks (its parameters
    and buffers start from rank 0's), the model itself otherwise."""
    if world().size <= 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sync_state(model: Any) -> None:
    """Copy rank 0's parameters and buffers to every rank (after an epoch, BatchNorm statistics updated on
    each rank's own shard differ slightly; evaluation and every later decision must see one model)."""
    if world().size <= 1:
        return
    import torch.distributed as dist

    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)
