"""Data-parallel offline training under torchrun (DDP, or FSDP with --fsdp), for `trainer.finetune`.

    torchrun --nproc-per-node N -m trainer.finetune ...      # N processes, one per device (or N CPU ranks)

A process started by torchrun sees WORLD_SIZE / RANK / LOCAL_RANK in its environment; `init` joins the process
group (nccl on CUDA, each rank on cuda:LOCAL_RANK; gloo on CPU). Without torchrun (or with WORLD_SIZE=1)
nothing here starts a process group and finetune runs exactly as one process.

How ranks share the work (see trainer.finetune for the loop):
  * every rank plans the same global micro-batches (same seed, same replay index) and takes every
    world_size-th sequence of each (`rank_share`), reading only those records;
  * each rank's loss is its numerators over the denominators summed over all ranks, times world_size
    (trainer.train_step), so DDP's / FSDP's gradient averaging yields the one-process gradient of the
    global micro-batch;
  * checkpoints hold full (unsharded) weights and the optimizer state keyed by parameter name
    (`full_weights`, `full_optimizer_state`), written by rank 0, so a run resumes on any number of ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

from trainer.train_step import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """A process group is in use (torchrun with more than one process)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and exports."""
        return self.rank == 0


def from_env() -> Dist:
    """The torchrun environment of this process (a single process when WORLD_SIZE is not set)."""
    return Dist(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init(device_arg: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (if any) -> (Dist, this rank's device). --device auto/cuda picks
    cuda:LOCAL_RANK under torchrun; cpu gives gloo ranks."""
    d = from_env()
    if not d.enabled:
        return d, resolve_device(device_arg)
    if device_arg not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device_arg}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device "
                         f"cuda, cpu or auto")
    device = resolve_device(device_arg)
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {d.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return d, device


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_share(indices: list[int], d: Dist) -> list[int]:
    """This rank's sequences of one global micro-batch: every world_size-th, starting at its rank. May be empty
    (fewer sequences than ranks); the rank then still runs the step on a zero-weight stand-in (finetune)."""
    return indices[d.rank::d.world_size]


def all_equal(value, d: Dist) -> bool:
    """Whether every rank holds the same picklable value (e.g. what it read from the replay)."""
    if not d.enabled:
        return True
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, value)
    return all(g == gathered[0] for g in gathered)


# ---- wrapping ----------------------------------------------------------------------------------------------

class DDP(DistributedDataParallel):
    """DistributedDataParallel that reads the draft's own attributes (cfg, lm_head, ...) through to it, so
    a kind's objective takes the wrapper like the bare draft."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(draft: torch.nn.Module, d: Dist, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """The module that runs forward/backward on this rank. Call before the frozen target head is attached
    (DDP would broadcast it, an lm_head-sized buffer, at construction) and before the optimizer is made
    (FSDP replaces the parameters by shards).

    DDP: every rank holds the whole draft; gradients are averaged in buckets during backward.
    FSDP (`fully_shard`, FSDP2): each rank keeps 1/N of the weights, gradients and AdamW state; the whole
    draft's weights are all-gathered for the forward and backward of a step (the draft is one FSDP unit: its
    decoder layers do not run through their own forward, so they cannot be gathered one by one)."""
    if not d.enabled:
        return draft
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        return fully_shard(draft)
    return DDP(draft, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


# ---- world-size independent state ----------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: torch.nn.Module) -> dict:
    """The unsharded model state dict on CPU. Collective under FSDP (every rank calls it); only rank 0 gets the
    tensors (other ranks: an empty dict)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on CPU: loadable on any number of ranks.
    Collective like `full_weights`; only rank 0 gets it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_optimizer_state` dict (every rank passes the whole dict; FSDP keeps its shard)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
