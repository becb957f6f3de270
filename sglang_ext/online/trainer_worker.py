"""The co-located trainer: its own process, so a crash, an OOM or a NaN here never reaches the server.

    python -m sglang_ext.online.trainer_worker '<TrainerSpec JSON>'     (started by sglang_ext.online.supervisor)

Imports no SGLang. Input: replay records from the scheduler over a socket (`protocol.decode_record`); the
process exits when that socket closes (the server went away). Output: candidate drafts through the shared
`WeightSlot`, plus its status (steps, loss, tokens/s, guard results, heartbeat) in the slot's header.

Loop: every record goes to the training pool, except every `holdout_every`-th, which goes to the guard's
held-out slice of recent traffic (never trained on). One step = `batch_size` records drawn from the pool
through `trainer.train_step.TrainStep` (the step `trainer.finetune` runs: the draft kind's objective, bf16
autocast on CUDA, AdamW, gradient clipping) with a warmup and then a constant rate. A non-finite loss or
gradient skips the step (counted). Every `swap_every` steps the candidate is scored against the live draft on
the held-out slice (the objective's acceptance proxy: the acceptance length greedy verification would give
on those records, same proposals for both) and published only if it is not worse.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_ext.online import weight_slot as ws
from sglang_ext.online.protocol import TrainerSpec, decode_record, record_nbytes
from sglang_ext.online.queues import ByteQueue
from trainer.draft_kind import get_kind
from trainer.replay import ReplayRecord
from trainer.target import load_target_head, target_info
from trainer.train_step import Batch, Precision, StepStats, TrainStep, pad_batch

log = logging.getLogger("sglang_ext.trainer")
GUARD_ANCHORS = 256             # proposals scored per held-out record by the guard
MAX_BAD_STEPS = 10              # non-finite steps in a row before going back to the live draft


LOWEST_STREAM_PRIORITY = 1 << 20   # torch maps a priority past the range to the lowest one the device has


@dataclass(frozen=True)
class MemoryNeed:
    """What the trainer process holds on its device besides activations (bytes)."""
    trainable: int      # trained draft weights: fp32 master + gradient + AdamW m and v + the guard's live copy
    fixed: int          # the kind's fixed weights (e.g. EAGLE3's vocabulary maps), in the draft and the live copy
    target_head: int    # frozen embedding and lm_head of the target, in the compute dtype (once when tied)

    @property
    def total(self) -> int:
        return self.trainable + self.fixed + self.target_head

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"{self.total / gib:.2f} GiB (draft + gradients + AdamW + guard copy {self.trainable / gib:.2f}, "
                f"fixed weights {self.fixed / gib:.2f}, frozen embedding + lm_head {self.target_head / gib:.2f}; "
                f"activations come on top)")


def trainer_memory_need(draft_kind: str, draft_path: str, target_path: str, device: str) -> MemoryNeed:
    """The trainer's memory on `device`, from the checkpoints' shapes (nothing is loaded)."""
    kind = get_kind(draft_kind)
    fixed_names = kind.serving.fixed_weights
    trainable = ws.layout_numel(ws.draft_layout(draft_path, exclude=fixed_names))
    everything = ws.layout_numel(ws.draft_layout(draft_path))
    info = target_info(target_path)
    head = info.vocab_size * info.hidden_size * (1 if info.tie_word_embeddings else 2)
    dtype_bytes = torch.empty((), dtype=Precision.for_device(device).dtype).element_size()
    return MemoryNeed(trainable=20 * trainable, fixed=2 * 4 * (everything - trainable),
                      target_head=head * dtype_bytes)


def sample_by_recency(n: int, k: int, half_life: float, rng: random.Random) -> list[int]:
    """k distinct indices of a pool of n (index n - 1 the newest), each draw weighted 2 ** (-age / half_life)
    among the ones not drawn yet (Efraimidis-Spirakis keys)."""
    keys = [rng.random() ** (1.0 / 2.0 ** (-(n - 1 - i) / half_life)) for i in range(n)]
    return sorted(range(n), key=keys.__getitem__, reverse=True)[:k]


class OnlineTrainer:
    def __init__(self, spec: TrainerSpec):
        self.spec = spec
        self.settings = s = spec.settings
        self.kind = get_kind(spec.draft_kind)
        cfg = self.kind.load_config(spec.draft_path)
        self.kind.set_block_size(cfg, spec.block_size)
        self.fixed = self.kind.serving.fixed_weights   # loaded, trained around, never published
        self.slot = ws.WeightSlot.attach(spec.slot_fd, ws.draft_layout(spec.draft_path, exclude=self.fixed),
                                         ws.dtype_from_name(spec.slot_dtype))
        precision = Precision.for_device(spec.device)
        embed, lm_head, _ = load_target_head(spec.target_path, dtype=precision.dtype)

        self.draft = self.kind.from_pretrained(spec.draft_path, cfg)
        names = set(self.draft.state_dict()) - set(self.fixed)
        if names != {n for n, _ in self.slot.layout}:
            raise ValueError(f"draft state dict {sorted(names)[:4]}... does not match the slot layout")
        self.resumed_version = self.slot.published
        if self.resumed_version > 0:        # a restart: go on from the newest accepted version
            self.load_published(self.draft, self.slot.read_state())
        self.live = self.kind.from_scratch(cfg)   # the guard's reference: the weights last published (or loaded)
        self.live.load_state_dict(self.draft.state_dict())
        self.embed, self.lm_head = embed.to(precision.device), lm_head.to(precision.device)   # frozen target parts
        for model in (self.draft, self.live):
            self.attach(model)
        self.live.eval()
        # EAGLE-style kinds unroll as many draft steps as the server runs (block size - 1)
        self.objective = self.kind.objective_settings(num_anchors=s.num_anchors, gamma=s.gamma,
                                                      ttt_steps=max(1, spec.block_size - 1))
        self.step_fn = TrainStep(self.kind, self.draft, precision, lr=s.lr, weight_decay=s.weight_decay,
                                 grad_clip=s.grad_clip, objective=self.objective)
        self.step = self.slot.header.steps  # optimizer steps applied, across restarts
        self.local_steps = 0                # attempted steps of this process
        self.bad_steps = 0                  # non-finite steps in a row
        self.pool: deque[ReplayRecord] = deque()
        self.pool_bytes = 0
        self.holdout: deque[ReplayRecord] = deque(maxlen=s.holdout_records)
        self.received = 0
        self.candidates = 0
        self.want_publish = False
        self.rng = random.Random(os.getpid())
        self.inbox: ByteQueue[ReplayRecord] = ByteQueue(s.inbox_bytes, size=record_nbytes)
        self.tokens = 0
        self.rate = None

    # -- records -------------------------------------------------------------------------------------------
    def start_receiver(self, conn) -> None:
        threading.Thread(target=self.receive, args=(conn,), name="records", daemon=True).start()

    def receive(self, conn) -> None:
        """The records thread: scheduler socket -> inbox; exits the process when the scheduler is gone."""
        while True:
            try:
                payload = self.recv(conn)
            except (EOFError, OSError):
                self.scheduler_gone()
                return
            try:
                record = decode_record(payload)
            except Exception:
                log.exception("could not decode a record; skipped")
                continue
            self.inbox.put(record)
            h = self.slot.header
            h.inbox_bytes = self.inbox.nbytes
            h.inbox_dropped += self.inbox.take_dropped()

    def scheduler_gone(self) -> None:
        log.info("scheduler connection closed; trainer exits")
        os._exit(0)

    def recv(self, conn) -> bytes:
        return conn.recv_bytes()

    def drain(self) -> None:
        while (rec := self.inbox.get()) is not None:
            self.received += 1
            if self.received % self.settings.holdout_every == 0:
                self.holdout.append(rec)
                continue
            self.pool.append(rec)
            self.pool_bytes += record_nbytes(rec)
            while self.pool_bytes > self.settings.pool_budget_bytes and len(self.pool) > 1:   # oldest go first
                self.pool_bytes -= record_nbytes(self.pool.popleft())
        h = self.slot.header
        h.records, h.train_records, h.holdout_records = self.received, len(self.pool), len(self.holdout)
        h.inbox_bytes = self.inbox.nbytes

    # -- training ------------------------------------------------------------------------------------------
    def sample_batch(self) -> Batch:
        """`batch_size` records drawn from the pool without replacement, padded: uniformly, or (policy
        "recency") with weight 2 ** (-age / recency_half_life), age counted in records, newest age 0."""
        pool, k = list(self.pool), min(self.settings.batch_size, len(self.pool))
        if self.settings.replay_policy == "recency":
            picked = sample_by_recency(len(pool), k, self.settings.recency_half_life, self.rng)
            records = [pool[i] for i in picked]
        else:
            records = self.rng.sample(pool, k)
        return pad_batch(records, self.settings.max_seq_len, self.step_fn.precision.dtype)

    def train_once(self) -> StepStats:
        s = self.settings
        batch = self.sample_batch()
        lr = s.lr * min(1.0, (self.local_steps + 1) / max(1, s.warmup_steps))
        t0 = time.monotonic()
        stats = self.step_fn.run([batch], lr=lr, generators=[torch.Generator().manual_seed(self.rng.randrange(2**31))])
        self.local_steps += 1
        if not stats.applied:
            self._skip(stats.skipped)
            return stats
        self.bad_steps = 0
        self.step += 1
        self.tokens += stats.tokens
        dt = max(1e-6, time.monotonic() - t0)
        self.rate = stats.tokens / dt if self.rate is None else 0.9 * self.rate + 0.1 * stats.tokens / dt
        h = self.slot.header
        h.steps, h.loss, h.tokens, h.tokens_per_s = self.step, stats.loss, self.tokens, self.rate
        h.accuracy = stats.accuracy if stats.accuracy is not None else math.nan
        if self.step % s.swap_every == 0:
            self.want_publish = True
        return stats

    def _skip(self, why: str) -> None:
        self.slot.header.rejected_nan += 1
        self.bad_steps += 1
        log.warning("step %d skipped: %s (no update, counted)", self.step + 1, why)
        if self.bad_steps >= MAX_BAD_STEPS:   # stuck: go back to the live draft with a fresh optimizer
            log.error("%d non-finite steps in a row: restarting from the live draft", self.bad_steps)
            self.draft.load_state_dict(self.live.state_dict())
            self.step_fn.reset_optimizer()
            self.bad_steps = 0

    # -- guard + publish -----------------------------------------------------------------------------------
    def score(self, model) -> float:
        """Acceptance proxy of `model` on the held-out slice (same proposals for every model scored)."""
        held = list(self.holdout)
        size = self.settings.batch_size
        batches = [pad_batch(held[i:i + size], self.settings.max_seq_len, self.step_fn.precision.dtype)
                   for i in range(0, len(held), size)]
        return self.step_fn.acceptance(model, batches, **self.kind.objective_settings(num_anchors=GUARD_ANCHORS))

    def attach(self, model) -> None:
        """Move a draft to the training device and give it the frozen target parts."""
        model.to(self.embed.device)
        self.kind.attach_target(model, self.embed, self.lm_head, self.spec.target_path)

    def load_published(self, model, state: dict[str, torch.Tensor]) -> None:
        """Load a published state (everything but the kind's fixed weights, which stay as loaded)."""
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(self.fixed):
            raise ValueError(f"published weights do not fit the draft: missing {sorted(set(missing) - set(self.fixed))}"
                             f", unexpected {sorted(unexpected)}")

    def candidate(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """The model to score and the state dict to publish if it passes: the draft being trained."""
        return self.draft, {k: v.detach().float().cpu().clone() for k, v in self.draft.state_dict().items()
                            if k not in self.fixed}

    def maybe_publish(self) -> None:
        if not self.want_publish or not self.slot.can_publish() or not self.holdout:
            return
        self.want_publish = False
        self.candidates += 1
        h = self.slot.header
        model, state = self.candidate()
        if not all(torch.isfinite(v).all() for v in state.values()):
            h.rejected_nan += 1
            log.warning("candidate %d has non-finite weights: rejected", self.candidates)
            return
        live_tau = self.score(self.live)
        cand_tau = self.score(model)
        h.guard_evals += 1
        h.candidate_tau, h.live_tau = cand_tau, live_tau
        if not cand_tau >= live_tau - self.settings.guard_tolerance:
            h.rejected_worse += 1
            log.info("step %d: candidate tau %.3f < live %.3f on %d held-out records: not swapped",
                     self.step, cand_tau, live_tau, len(self.holdout))
            return
        version = self.slot.publish(state)
        self.load_published(self.live, self.slot.read_state())   # as served: in the slot's (serving) dtype
        log.info("step %d: published draft version %d (held-out tau %.3f, live %.3f)", self.step, version,
                 cand_tau, live_tau)
        if self.settings.checkpoint_dir:
            self.checkpoint(version)

    def checkpoint(self, version: int) -> None:
        """Export the accepted version; the oldest go first, so at most keep_checkpoints exist at any time."""
        out = Path(self.settings.checkpoint_dir)
        try:
            kept = sorted(p for p in out.glob("version-*") if p.is_dir())
            for old in kept[:max(0, len(kept) - self.settings.keep_checkpoints + 1)]:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
            self.live.export(out / f"version-{version:06d}")
        except OSError:
            log.exception("could not write the checkpoint of version %d to %s", version, out)

    def run(self) -> None:
        h = self.slot.header
        h.pid = os.getpid()
        log.info("trainer up (pid %d, %s draft, device %s, %s, %s)", os.getpid(), self.kind.name,
                 self.step_fn.precision.device, str(self.step_fn.precision.dtype).removeprefix("torch."),
                 f"resuming from version {self.resumed_version} at step {self.step}" if self.resumed_version
                 else "starting from the loaded draft")
        device = self.step_fn.precision.device
        # Trainer kernels on the device's lowest-priority stream: within one CUDA context (or under MPS) the
        # serving kernels go first. Across plain processes the GPU time-slices; the duty cycle bounds our share.
        stream = torch.cuda.Stream(device, priority=LOWEST_STREAM_PRIORITY) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            while True:
                h.heartbeat = time.time()
                self.drain()
                if len(self.pool) < self.settings.min_records:
                    time.sleep(0.1)
                    continue
                t0 = time.monotonic()
                self.train_once()
                self.maybe_publish()
                self.pause(time.monotonic() - t0)

    def pause(self, busy_s: float) -> None:
        """Sleep so that computing takes at most `duty_cycle` of wall time (beating meanwhile)."""
        duty = self.settings.duty_cycle
        until = time.monotonic() + busy_s * (1.0 - duty) / duty
        while (left := until - time.monotonic()) > 0:
            self.slot.header.heartbeat = time.time()
            time.sleep(min(left, 1.0))


def main(argv: list[str] | None = None, trainer_cls: type[OnlineTrainer] = OnlineTrainer) -> int:
    from multiprocessing.connection import Connection

    argv = sys.argv[1:] if argv is None else argv
    spec = TrainerSpec.from_json(argv[0])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[sglang-ext trainer %(asctime)s] %(levelname)s %(message)s")
    torch.set_num_threads(spec.settings.threads)
    device = torch.device(spec.device)
    if device.type == "cuda" and spec.settings.max_memory_bytes:   # past the budget the trainer fails, not serving
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.settings.max_memory_bytes / total), device)
    conn = Connection(spec.records_fd)
    trainer = trainer_cls(spec)
    trainer.start_receiver(conn)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
