"""The scheduler's side of the weight slot: versions the trainer publishes go live in SGLang's draft here.

The scheduler process owns the weight slot (sglang_ext/online/swap/weight_slot.py); the trainer (started by the
recorder process, sglang_ext/online/recorder/supervisor.py) publishes into it. Two threads of the scheduler process
touch this, neither of them per record:
  * the staging thread (`SwapApplier.stage_loop`): a newly published version is staged on the serving device
    (sglang_ext/online/swap/staging.py: in the serving dtype, device-to-device copies at the swap point); the live
    version's weights are copied into the slot's keep buffer once it is past its probation;
  * the scheduler thread: `tick()` runs at the top of every scheduler iteration (between forwards). When the
    trainer published a version the scheduler has not applied, it copies it into the live draft in place
    (storage addresses kept, so CUDA graphs stay valid), lets the kind rebuild what the worker derived from
    the weights (DFlash: the fused KV helper, which holds stacked copies of k/v weights), and acknowledges.
    When the weights cannot be placed that way, the swap goes through SGLang's load_weights with device
    syncs. No forward runs during the copy, so none sees two versions.

Rollback on served acceptance (--online-train-rollback-steps N, default 200; sglang_ext/online/swap/rollback.py): each
swapped-in version is on probation for its first N verify steps (the capture path reports each step's accept
lengths, with the version that proposed them); if its mean accept length is lower than the previous version's
over that version's last N steps by more than --online-train-rollback-tolerance, the previous version's weights,
kept in the weight slot's keep buffer, are copied back in at the next scheduler iteration (every TP rank at the
same one), counted (sglang:online_train_rollbacks_total) and logged, and the trainer resets to them. Nothing newer
goes live while a version is on probation. The trainer's memory need is checked here at startup.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import torch

from sglang_ext.online.protocol import TrainerSpec, new_run_id
from sglang_ext.online.scheduler.placement import (
    check_group_memory,
    resolve_trainer_devices,
    trainer_memory_need,
)
from sglang_ext.online.scheduler.tp import (
    SlotHandle,
    TPGroup,
    apply_version,
    restore_weights,
    rollback_code,
    swap_log,
)
from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.swap.rollback import RollbackWatch, Verdict, load_draft_weights
from sglang_ext.online.swap.staging import StagedSwap, draft_module, plan_placements

logger = logging.getLogger(__name__)


def check_draft_names(kind, draft_model, layout: ws.Layout) -> None:
    """Every trained weight must land on a parameter of SGLang's draft (its load_weights skips unknown names
    silently): fail at startup if one would not."""
    params = {n.removeprefix("model.") for n, _ in draft_model.named_parameters()}
    missing = [kind.sglang_param_name(name) for name, _ in layout if kind.sglang_param_name(name) not in params]
    if missing:
        raise ValueError(f"--online-train: trained draft weights {missing[:6]} have no parameter in SGLang's "
                         f"{type(draft_model).__name__}; cannot hot-swap into it")


class SwapApplier:
    """The weight slot's owner: versions the trainer publishes are staged (`stage_loop`, its own thread) and
    applied to SGLang's live draft at the top of a scheduler iteration (`tick`), or rolled back."""

    def __init__(self, cfg, kind, worker, metrics, *, target_path: str, draft_path: str, block_size: int,
                 tp: TPGroup | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.tp = tp                                # TP rank 0 of a --tp N server (tp.py), or None
        self.kind = kind                            # trainer.draft_kind.DraftKind of the served draft
        self.worker = worker                        # SGLang's speculative worker (the kind's serving.worker_class)
        self.draft_model = draft_module(kind, worker)
        self.layout = ws.draft_layout(draft_path, exclude=kind.serving.fixed_weights)
        check_draft_names(kind, self.draft_model, self.layout)
        # Staged swap: versions reach the device off the critical path; None: through load_weights at the swap
        placements = plan_placements(kind, self.draft_model, self.layout)
        self.stager = StagedSwap(self.draft_model, placements) if placements else None
        devices = resolve_trainer_devices(cfg, getattr(worker, "device", "cpu"))
        self.memory_need = trainer_memory_need(kind.name, draft_path, target_path, devices[0])
        check_group_memory(self.memory_need, devices, cfg.max_memory_bytes)
        serving_dtype = next(self.draft_model.parameters()).dtype   # versions cross in the dtype served
        rollback = cfg.rollback_steps > 0             # keep the previous version's weights (the keep buffer)
        slot = ws.WeightSlot.create(self.layout, serving_dtype, keep=rollback)
        if rollback:                                  # version 0: the checkpoint
            for name, t in load_draft_weights(draft_path, self.layout, serving_dtype).items():
                slot.keep[name].copy_(t)
        self.slot = slot
        self.devices = devices                      # one per trainer rank
        self.device = ",".join(devices)
        # what the recorder process starts the trainer with (sglang_ext/online/recorder/process.py)
        self.trainer_spec = TrainerSpec(
            settings=dataclasses.replace(cfg.trainer_settings(), run_id=new_run_id()), target_path=str(target_path),
            draft_path=str(draft_path), draft_kind=kind.name, block_size=int(block_size), device=devices[0],
            slot_fd=slot.fd, slot_dtype=ws.dtype_name(serving_dtype), world_size=len(devices))
        self.version = 0                            # the draft version serving uses
        self.swaps = 0
        self.last_swap_t: float | None = None
        self._last_metrics_t = 0.0
        self._last_tick: float | None = None
        self.iterations = 0                         # scheduler iterations seen
        self.iteration_s: float | None = None
        # rollback on served acceptance (sglang_ext/online/swap/rollback.py); None with --online-train-rollback-steps 0
        self.watch = RollbackWatch(cfg.rollback_steps, cfg.rollback_tolerance) if rollback else None
        self.rollbacks = 0
        self.skipped_versions = 0                   # published from a rolled-back version: never applied
        self._keep_lock = threading.Lock()          # keep buffer: the staging thread's copy vs. the swap
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self.stage_loop, name="sglang-ext-stage", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def stage_loop(self) -> None:
        """Its own thread, per published version (not per record): stage it on the serving device, and keep the
        live version's weights in the keep buffer once it is past its probation."""
        while not self._stopping.wait(0.05):
            try:
                self._stage_published()
            except Exception:
                logger.exception("sglang_ext: staging a draft version failed")

    def slot_handle(self) -> SlotHandle:
        """How the other TP ranks reach this process's weight slot."""
        return SlotHandle(pid=os.getpid(), fd=self.slot.fd, layout=[(n, list(s)) for n, s in self.layout],
                          dtype=ws.dtype_name(self.slot.dtype))

    def _stage_published(self) -> None:
        """Staging thread: bring a newly published version to the staging buffers (once the previous one
        was applied, so the buffers are free)."""
        self._keep_live()
        stager, slot = self.stager, self.slot
        if stager is None or slot is None or slot.header is None:
            return
        version = slot.published
        if version > stager.version and slot.applied >= stager.version:
            try:
                with torch.no_grad():
                    stager.stage(slot.weights, version)
            except Exception:
                logger.exception("sglang_ext: staging draft version %d failed; swapping through load_weights",
                                 version)
                self.stager = None

    # -- scheduler thread ----------------------------------------------------------------------------------
    def tick(self, scheduler=None) -> None:
        """Top of a scheduler iteration: apply a published version; refresh metrics about once a second."""
        slot = self.slot
        t = time.perf_counter()
        if self._last_tick is not None:      # typical scheduler iteration, to compare swap latency against
            gap = t - self._last_tick
            self.iteration_s = gap if self.iteration_s is None else 0.95 * self.iteration_s + 0.05 * gap
        self.iterations += 1
        stager = self.stager
        verdict = self.watch.take_rollback() if self.watch is not None else None
        if verdict is None:
            self._skip_stale()
        ready = (verdict is None and slot.published > slot.applied
                 and (stager is None or stager.version == slot.published) and self._may_swap())
        if self.tp is None:
            if verdict is not None:
                self._rollback(scheduler, verdict)
            elif ready:
                self._swap(scheduler, slot.published)
        else:                                # every TP rank swaps (or rolls back) at this iteration, or none does
            code = rollback_code(slot.header.keep_version) if verdict is not None else (slot.published if ready
                                                                                         else 0)
            version = self.tp.broadcast_version(code)
            if version < 0:
                self._rollback(scheduler, verdict)
            elif version:
                self._swap(scheduler, version)
        self._last_tick = time.perf_counter()
        now = time.monotonic()
        if now - self._last_metrics_t >= 1.0:
            self._last_metrics_t = now
            self._update_metrics(now)

    @torch.no_grad()
    def _swap(self, scheduler, version: int) -> None:
        slot, draft = self.slot, self.draft_model
        in_flight = _requests_in_flight(scheduler)
        t0 = time.perf_counter()
        storage = [p.data_ptr() for p in draft.parameters()]
        try:
            apply_version(self.kind, self.worker, draft, self.stager, slot.weights_of(version), version,
                          getattr(scheduler, "forward_stream", None))
        finally:
            if self.tp is not None:
                self.tp.barrier()              # every rank has read the version: the slot buffer may be reused
        if storage != [p.data_ptr() for p in draft.parameters()]:
            logger.error("sglang_ext: draft parameter storage moved during the swap (CUDA graphs would be stale)")
        latency = time.perf_counter() - t0
        if self.tp is not None:
            swap_log(self.tp.rank, version, self.iterations, getattr(scheduler, "forward_ct", None), latency)
        slot.acknowledge(version)
        with self._keep_lock:
            self.version = version
            if self.watch is not None:
                slot.header.live_in_keep = 0
                if self.watch.swapped(version):
                    logger.info("sglang_ext: draft version %d on probation for %d verify steps (rollback if its "
                                "mean accept length falls more than %g below the previous version's)", version,
                                self.watch.steps, self.watch.tolerance)
        self.swaps += 1
        self.last_swap_t = time.monotonic()
        self.metrics.swapped(version, latency, in_flight)
        logger.info("sglang_ext: draft version %d swapped in (%.2f ms, %d requests in flight, scheduler iteration "
                    "%.2f ms on average, trainer step %d, held-out tau %.3f vs %.3f)", version, latency * 1e3,
                    in_flight, (self.iteration_s or 0.0) * 1e3, slot.header.steps, slot.header.candidate_tau,
                    slot.header.live_tau)

    # -- rollback on served acceptance (sglang_ext/online/swap/rollback.py) -------------------------------------
    def observe_verified(self, commit_lens: list[int], version: int) -> None:
        """Scheduler thread (capture.Capture.on_verified): tokens committed per request of one verify step, and
        the draft version that proposed them. A rollback verdict is acted on at the next tick (not mid-forward)."""
        if self.watch is None:
            return
        verdict = self.watch.observe(commit_lens, version)
        if verdict is None:
            return
        if verdict.rollback:
            logger.warning("sglang_ext: draft version %d serves worse than the previous version (%s): rolling it "
                           "back", verdict.version, verdict.describe())
        else:
            logger.info("sglang_ext: draft version %d kept after its probation (%s)", verdict.version,
                        verdict.describe())

    def _may_swap(self) -> bool:
        """Rollback on: nothing newer goes live while a version is on probation, before the trainer has reset
        after a rollback, or before the live version's weights are in the keep buffer."""
        if self.watch is None:
            return True
        h = self.slot.header
        return not self.watch.busy and h.rollback_seen >= h.rollbacks and h.keep_version == self.version

    def _skip_stale(self) -> None:
        """A version published from the rolled-back weights before the trainer reset is never applied: it is
        acknowledged unapplied, so the trainer may publish again."""
        h = self.slot.header
        if self.watch is None or h.rollbacks == 0 or h.rollback_seen < h.rollbacks:
            return
        if h.applied < h.published <= h.reset_published:
            logger.info("sglang_ext: draft version %d was trained from rolled-back version %d: not applied",
                        h.published, h.rolled_back_version)
            self.slot.acknowledge(h.published)
            self.skipped_versions += 1

    def _keep_live(self) -> None:
        """Supervisor thread: copy the live version's weights into the slot's keep buffer, off the critical path,
        once it is past its probation (what a rollback of the next version restores). The trainer never writes
        the live version's buffer (it writes the other one, and only after the next swap)."""
        watch, slot = self.watch, self.slot
        if watch is None or slot is None or slot.header is None:
            return
        with self._keep_lock:
            h = slot.header
            if watch.busy or h.live_in_keep or h.keep_version == self.version or slot.applied != self.version:
                return
            for name, t in slot.weights_of(self.version).items():
                slot.keep[name].copy_(t)
            h.keep_version = self.version

    @torch.no_grad()
    def _rollback(self, scheduler, verdict: Verdict) -> None:
        """Swap the keep buffer's version back in (every TP rank at this iteration), count it, log it, and tell
        the trainer (slot header `rollbacks`) to reset to it."""
        slot, h = self.slot, self.slot.header
        restored = h.keep_version
        t0 = time.perf_counter()
        try:
            restore_weights(self.kind, self.worker, self.draft_model, self.stager, slot.keep)
        finally:
            if self.tp is not None:
                self.tp.barrier()              # every rank has read the keep buffer
        latency = time.perf_counter() - t0
        if self.tp is not None:                # as each follower logs it (tp.SwapFollower._restore)
            logger.info("sglang_ext: TP rank %d restored draft version %d (rollback) at scheduler iteration %d "
                        "(forward %s, %.2f ms)", self.tp.rank, restored, self.iterations,
                        getattr(scheduler, "forward_ct", None), latency * 1e3)
        with self._keep_lock:
            previous = self.watch.rolled_back()
            h.live_in_keep = 1
            h.rolled_back_version = verdict.version
            h.rollbacks += 1
            self.version = restored
        if previous != restored:
            logger.error("sglang_ext: rollback watch expected version %d back, the keep buffer holds %d", previous,
                         restored)
        self.rollbacks += 1
        self.last_swap_t = time.monotonic()
        self.metrics.rolled_back(verdict.version, restored)
        logger.warning("sglang_ext: draft version %d rolled back after %d verify steps: version %d restored "
                       "(%.2f ms, scheduler iteration %d; %s); the trainer resets to it", verdict.version,
                       verdict.steps, restored, latency * 1e3, self.iterations, verdict.describe())

    def _update_metrics(self, now: float) -> None:
        self.metrics.swap_age(None if self.last_swap_t is None else now - self.last_swap_t)


def _requests_in_flight(scheduler) -> int:
    if scheduler is None:
        return 0
    running = getattr(scheduler, "running_batch", None)
    n = len(getattr(running, "reqs", []) or []) if running is not None else 0
    return n + len(getattr(scheduler, "waiting_queue", []) or [])

