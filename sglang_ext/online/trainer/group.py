"""A multi-device trainer (trainer processes): rank 0 commands, the other ranks follow.

With a device list (--online-train-device cuda:1,cuda:2, or cpu,cpu) the trainer is `spec.world_size` processes
in one process group (the supervisor sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; gloo on CPU, nccl on
CUDA). Rank 0 (worker.OnlineTrainer) draws each step's batch and one anchor seed per record and hands every rank
its share in one collective (`Command`: rank r trains records r, r + N, ...; a rank without records runs a
zero-weight stand-in), so the group takes the step one process would take on the same draws. While rank 0 waits
for records it sends a keep-alive command every few seconds, so a hung rank stalls rank 0 in that collective and
stops its heartbeat: the supervisor then replaces the whole group.
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from sglang_ext.online.protocol import TrainerSpec
from trainer.distributed import Dist
from trainer.train_step import Batch

log = logging.getLogger("sglang_ext.trainer")
KEEPALIVE_S = 2.0               # a multi-device trainer's rank 0 reaches every rank at least this often
GROUP_TIMEOUT = datetime.timedelta(hours=6)   # collectives: hangs are the supervisor's to find (heartbeat)


@dataclass
class Command:
    """What rank 0 of a multi-device trainer sends each rank (one `scatter_object_list` per command)."""
    op: str                                   # "step" | "idle" (keep-alive) | "reset" (to `state`)
    lr: float = 0.0
    records: list | None = None               # this rank's share of the step's records
    seeds: list | None = None                 # their anchor seeds
    width: int = 0                            # feature width, for a zero-weight stand-in batch
    state: dict | None = None                 # reset: the weights to go back to


def stand_in_batch(width: int, dtype: torch.dtype, length: int = 8) -> Batch:
    """Nothing in the loss: a rank without records in a step still runs forward/backward (as DDP needs)."""
    return Batch(torch.zeros(1, length, dtype=torch.long), torch.zeros(1, length, width, dtype=dtype),
                 torch.zeros(1, length, dtype=torch.bool), 0)


def anchor_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per record: a record gets the same anchors whichever rank trains it."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


class GroupMember:
    """The multi-device part of worker.OnlineTrainer (a mixin: it uses the trainer's group, step_fn and draft)."""

    def command_all(self, commands: list[Command]) -> Command:
        """Rank 0: commands[r] to rank r (one collective); returns its own."""
        out = [None]
        torch.distributed.scatter_object_list(out, commands, src=0)
        self.last_command = time.monotonic()
        return out[0]

    def keepalive(self) -> None:
        """Rank 0 while not stepping: reach every rank now and then (a hung one stalls this, and the heartbeat)."""
        if self.group.enabled and time.monotonic() - self.last_command >= KEEPALIVE_S:
            self.command_all([Command("idle")] * self.group.world_size)

    def share_batch(self, command: Command) -> Batch:
        if command.records:
            return self.local_batch(command.records)
        return stand_in_batch(command.width, self.step_fn.precision.dtype)

    def follow(self) -> None:
        """Ranks > 0: take part in every step rank 0 commands, until the group is torn down."""
        log.info("trainer rank %d of %d up (pid %d, device %s)", self.group.rank, self.group.world_size,
                 os.getpid(), self.step_fn.precision.device)
        while True:
            out = [None]
            torch.distributed.scatter_object_list(out, None, src=0)
            command: Command = out[0]
            if command.op == "step":
                self.step_fn.run([self.share_batch(command)], lr=command.lr,
                                 generators=[anchor_generators(command.seeds) or None])
            elif command.op == "reset":
                self.draft.load_state_dict(command.state)
                self.step_fn.reset_optimizer()


def group_from_env(spec: TrainerSpec) -> Dist:
    """This rank of a multi-device trainer (the supervisor set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    group = Dist(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                 local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    if group.world_size != spec.world_size:
        raise ValueError(f"$WORLD_SIZE {group.world_size} but the trainer spec says {spec.world_size}")
    return group


def init_group(spec: TrainerSpec) -> None:
    """Join the trainer's process group: gloo on CPU, nccl on CUDA (this rank's device)."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device, timeout=GROUP_TIMEOUT)
    else:
        torch.distributed.init_process_group("gloo", timeout=GROUP_TIMEOUT)


def watch_parent() -> None:
    """Ranks > 0 have no records socket to see the server go: leave when the scheduler process is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        log.info("scheduler process gone; trainer rank exits")
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
