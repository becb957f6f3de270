"""--online-train under tensor parallelism (--tp N): one server, one learner, one swap schedule.

Every TP rank's scheduler process serves the same draft, each its own shard of it. The online path runs once,
on TP rank 0: capture (the target's hidden states are whole on every rank after the all-reduce, so rank 0's
rows are complete), replay buffer, shards, trainer process and metrics. The other ranks only follow the swaps:

    TP rank 0 (SwapApplier.tick)                      TP rank r > 0 (SwapFollower.tick)
      version = the published version, staged; or 0
      broadcast(version) over SGLang's TP CPU group --> version (0: nothing to do)
      copy it into its shard of the live draft          copy it, read from rank 0's weight slot, into its shard
      barrier                                           barrier
      acknowledge (the trainer may write the slot again)

A rollback (sglang_ext/online/swap/rollback.py) is broadcast the same way, as -1 - u for "restore version u": every
rank copies rank 0's keep buffer (the slot's third buffer, which rank 0 leaves alone while a version is on
probation) into its shard, at the same iteration, then the barrier.

The broadcast runs at the top of every scheduler iteration: every rank calls `Scheduler.ingest_requests` once per
iteration, in step (it broadcasts the new requests over the same group), so every rank swaps at the same
iteration. The barrier keeps the trainer from overwriting the version's buffer before every rank has read it.
Rank 0 hands its slot to the others once, at startup: its pid and the slot's descriptor, reopened through /proc.
Like rank 0, a follower stages the next version into its own buffers off the critical path (its own thread), so
its stall at the swap point is the copy into its live shard.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.swap.staging import StagedSwap, draft_module, plan_placements

logger = logging.getLogger(__name__)


@dataclass
class TPGroup:
    """This process's place in SGLang's tensor-parallel group, and the collectives the online path needs."""
    rank: int                 # rank within the TP group (0 runs the online path)
    size: int
    cpu_group: object         # torch.distributed ProcessGroup on the CPU (gloo): SGLang's TP CPU group
    src: int                  # the global rank of TP rank 0

    def broadcast_version(self, version: int) -> int:
        t = torch.tensor([version], dtype=torch.int64)
        torch.distributed.broadcast(t, src=self.src, group=self.cpu_group)
        return int(t.item())

    def broadcast_object(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=self.src, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.cpu_group)


def tp_group() -> TPGroup | None:
    """SGLang's TP group of this scheduler process; None without tensor parallelism."""
    from sglang.srt.distributed.parallel_state import get_tp_group
    g = get_tp_group()
    if g.world_size <= 1:
        return None
    return TPGroup(rank=int(g.rank_in_group), size=int(g.world_size), cpu_group=g.cpu_group, src=int(g.ranks[0]))


@dataclass(frozen=True)
class SlotHandle:
    """What rank 0 tells the other ranks at startup: where its weight slot is and how it is laid out."""
    pid: int
    fd: int
    layout: list
    dtype: str


def swap_log(rank: int, version: int, iteration: int, forward_ct, latency_s: float) -> None:
    """One line per rank and swap: the proof that every rank swapped the same version at the same iteration."""
    logger.info("sglang_ext: TP rank %d applied draft version %d at scheduler iteration %d (forward %s, %.2f ms)",
                rank, version, iteration, forward_ct, latency_s * 1e3)


class SwapFollower:
    """A TP rank > 0: applies the versions rank 0 decides, at the iteration rank 0 decides."""

    POLL_S = 0.02

    def __init__(self, kind, worker, tp: TPGroup, handle: SlotHandle):
        self.kind, self.worker, self.tp = kind, worker, tp
        self.draft_model = draft_module(kind, worker)
        layout = [(name, tuple(shape)) for name, shape in handle.layout]
        self.slot = ws.WeightSlot.open_shared(handle.pid, handle.fd, layout, ws.dtype_from_name(handle.dtype))
        placements = plan_placements(kind, self.draft_model, layout)
        self.stager = StagedSwap(self.draft_model, placements) if placements else None
        self.version = 0                     # the version this rank applied last
        self.iterations = 0                  # scheduler iterations seen (in step with rank 0: one broadcast each)
        self.lock = threading.Lock()         # staging thread vs. the swap point
        self._stopping = False
        self.thread = threading.Thread(target=self._stage_ahead, name="sglang-ext-tp-stager", daemon=True)
        if self.stager is not None:
            self.thread.start()

    def _stage_ahead(self) -> None:
        """Stage the next published version while the scheduler serves (it stays in the slot until every rank
        has applied it: rank 0 acknowledges only after the swap's barrier)."""
        while not self._stopping:
            try:
                with self.lock:
                    nxt = self.version + 1
                    if self.stager is not None and self.slot.published == nxt and self.stager.version < nxt:
                        with torch.no_grad():
                            self.stager.stage(self.slot.weights_of(nxt), nxt)
            except Exception:
                logger.exception("sglang_ext: TP rank %d: staging failed; swapping through load_weights",
                                 self.tp.rank)
                self.stager = None
            time.sleep(self.POLL_S)

    def tick(self, scheduler=None) -> None:
        self.iterations += 1
        version = self.tp.broadcast_version(0)
        if not version:
            return
        if version < 0:                      # a rollback: rank 0's keep buffer (sglang_ext/online/swap/rollback.py)
            self._restore(scheduler, -1 - version)
            return
        t0 = time.perf_counter()
        try:
            with self.lock, torch.no_grad():
                apply_version(self.kind, self.worker, self.draft_model, self.stager, self.slot.weights_of(version),
                              version, getattr(scheduler, "forward_stream", None))
                self.version = version
        finally:
            self.tp.barrier()                # rank 0 acknowledges (frees the slot buffer) only after this
        swap_log(self.tp.rank, version, self.iterations, getattr(scheduler, "forward_ct", None),
                 time.perf_counter() - t0)

    def _restore(self, scheduler, version: int) -> None:
        t0 = time.perf_counter()
        try:
            with self.lock, torch.no_grad():
                restore_weights(self.kind, self.worker, self.draft_model, self.stager, self.slot.keep)
        finally:
            self.tp.barrier()                # rank 0 lets the keep buffer change only after this
        logger.info("sglang_ext: TP rank %d restored draft version %d (rollback) at scheduler iteration %d "
                    "(forward %s, %.2f ms)", self.tp.rank, version, self.iterations,
                    getattr(scheduler, "forward_ct", None), (time.perf_counter() - t0) * 1e3)

    def stop(self) -> None:
        self._stopping = True
        self.slot.close()


def restore_weights(kind, worker, draft_model, stager: StagedSwap | None, weights: dict[str, torch.Tensor]
                    ) -> None:
    """A rollback: copy `weights` (the slot's keep buffer) into this rank's live draft, in place, then the kind's
    rebuild; synchronous (rare), and without touching the staging buffers (a newer version may be staged there)."""
    cuda = next(draft_model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()           # the overlap scheduler may still run the previous forward
    if stager is not None:
        stager.copy_now(weights)
    else:
        draft_model.load_weights(list(weights.items()))
    kind.after_swap(worker)
    if cuda:
        torch.cuda.synchronize()


def rollback_code(version: int) -> int:
    """What rank 0 broadcasts for "restore the keep buffer, version `version`" (0 means nothing to do, a
    positive number a version to apply)."""
    return -1 - version


def apply_version(kind, worker, draft_model, stager: StagedSwap | None, weights: dict[str, torch.Tensor],
                  version: int, forward_stream=None) -> None:
    """Copy `version` (its slot weights) into this rank's live draft, in place, then the kind's rebuild."""
    if stager is not None:                 # device-to-device copies, fenced on the device (no host sync)
        if stager.version != version:      # not staged ahead: stage it now
            stager.stage(weights, version)
        stager.apply(forward_stream, then=lambda: kind.after_swap(worker))
        return
    cuda = next(draft_model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()           # the overlap scheduler may still run the previous forward
    draft_model.load_weights(list(weights.items()))
    kind.after_swap(worker)
    if cuda:
        torch.cuda.synchronize()
