"""Multi-process training under torchrun: `torchrun --nproc-per-node N -m rescompress run RECIPE`.

torchrun starts N copies of the command with RANK, WORLD_SIZE and MASTER_ADDR/PORT set. Every rank runs the
same pipeline steps on the same data: every rank draws the same global batch order, and each decodes and
trains on its own share of every batch (`rank::world`). The model is wrapped in DistributedDataParallel,
which averages gradients and keeps buffers (BatchNorm statistics, int8 observers) in step with rank 0. Everything that is not training
(pruning analysis, calibration, conversion) is deterministic and runs on every rank alike.

Only rank 0 writes: checkpoints, training state, the manifest, logs, and then exports, measures and reports
alone while the other ranks end after the last training step. Without torchrun (WORLD_SIZE unset or 1)
nothing here does anything.

Devices: on a machine without CUDA the process group is gloo. Where torch sees CUDA it is
`cpu:gloo,cuda:nccl`: collectives on GPU tensors (DDP's gradient all-reduce, buffer broadcasts) go through
nccl, those on CPU tensors (object broadcasts, barriers, a recipe that trains on `cpu`) through gloo. Each
rank binds to GPU LOCAL_RANK before joining, and trains there (`accel.resolve_device`). With
`train.sync_batchnorm`, BatchNorm layers become SyncBatchNorm while a CUDA model trains under DDP (batch
statistics over the global batch, not each rank's share) and plain BatchNorm again afterwards, so
checkpoints and exports are unchanged; on CPU ranks (gloo) it is ignored with a note.
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
        backend = "gloo"
        if torch.cuda.is_available():
            backend = "cpu:gloo,cuda:nccl"
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local < torch.cuda.device_count():  # else training on cuda is refused when the run is planned
                torch.cuda.set_device(local)
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

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def _collective_device() -> Any:
    """Where a small host-side collective runs: the CPU when the group has gloo, else this rank's GPU."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend())
    return torch.device("cpu") if "gloo" in backend else torch.device("cuda", torch.cuda.current_device())


def wrap(model: Any) -> Any:
    """`model` for training: wrapped in DistributedDataParallel when there are several ranks (its parameters
    and buffers start from rank 0's), the model itself otherwise. The model is already on this rank's
    device: a CUDA model is bound to its GPU, a CPU one trains through gloo."""
    if world().size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from rescompress.accel import device_of

    device = device_of(model)
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


def use_sync_batchnorm(model: Any) -> tuple[Any, str]:
    """BatchNorm -> SyncBatchNorm (in place) for a CUDA model under DDP; returns (model, a note: what was done
    or why not). `plain_batchnorm` undoes it."""
    from torch import nn

    from rescompress.accel import device_of

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if world().size <= 1:
        return model, "train.sync_batchnorm ignored: a single process has nothing to synchronise"
    if device_of(model).type != "cuda":
        return model, ("train.sync_batchnorm ignored: SyncBatchNorm needs CUDA ranks (nccl); these ranks train "
                       "on the CPU (gloo), each with its own batch statistics")
    if not bns:
        return model, ("train.sync_batchnorm ignored: the model has no BatchNorm modules (a QAT graph keeps "
                       "BatchNorm as graph ops; DDP still broadcasts its statistics from rank 0)")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same root module, children replaced
    return converted, f"SyncBatchNorm over {world().size} ranks for {len(bns)} BatchNorm layers"


def plain_batchnorm(module: Any) -> Any:
    """SyncBatchNorm -> BatchNorm2d (in place, the same parameters and buffers): what checkpoints, PT2E
    capture and exports expect."""
    from torch import nn

    for name, child in list(module.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            if child.track_running_stats:
                bn.running_mean, bn.running_var = child.running_mean, child.running_var
                bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            plain_batchnorm(child)
    return module


def sync_state(model: Any) -> None:
    """Copy rank 0's parameters and buffers to every rank (after an epoch, BatchNorm statistics updated on
    each rank's own shard differ slightly; evaluation and every later decision must see one model)."""
    if world().size <= 1:
        return
    import torch.distributed as dist

    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)
