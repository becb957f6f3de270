"""The co-located trainer: its own process, so a crash, an OOM or a NaN here never reaches the server.

    python -m sglang_ext.online.trainer.worker '<TrainerSpec JSON>'   (started by the recorder's supervisor)

Imports no SGLang. Input: replay records from the recorder process over a socket (`protocol.decode_record`);
the process exits when that socket closes. Output: candidate drafts through the shared `WeightSlot`, plus its
status (steps, loss, tokens/s, guard results, heartbeat) in the slot's header.

Loop: every record goes to the training pool, except every `holdout_every`-th, which goes to the guard's
held-out slice of recent traffic (never trained on). One step = `batch_size` records drawn from the pool
through `trainer.train_step.TrainStep` (the step `trainer.finetune` runs: the draft kind's objective, bf16
autocast on CUDA, AdamW, gradient clipping) with a warmup and then a constant rate. A non-finite loss or
gradient skips the step (counted). Every `swap_every` steps the guard (guard.py) scores the candidate against
the live draft and publishes it only if it is not worse; accepted versions are exported (checkpoints.py).

Poison records: every record is checked on arrival (`protocol.check_record`: token ids inside the target's
vocabulary, finite features, consistent shapes); a step that raises drops the records of its batch that fail
alone (all of them if none does) and goes on (3 such steps in a row end the process). Either is reported on the
records socket with the record's seq, so the supervisor counts it and never sends it again; the seqs of each
step's batch are reported too, so a record that kills the process outright can be found.

Priority: the process lowers its own CPU priority by TRAINER_NICE (os.nice), so where it shares cores with SGLang's
processes (the scheduler is CPU-bound between kernel launches on a GPU too) the OS runs serving first; the trainer
gets what serving leaves, within its duty cycle.

A multi-device trainer (--online-train-device cuda:1,cuda:2) is `spec.world_size` such processes, the draft
wrapped in DDP (trainer.distributed.wrap) and trained through the same TrainStep: rank 0 (this class) alone has
the records socket, the pool, the held-out slice, the guard, the slot and the heartbeat; the others follow its
commands (group.py).
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

import torch

from sglang_ext.online.protocol import (
    TrainerSpec,
    check_record,
    decode_record,
    new_run_id,
    poison_report,
    record_nbytes,
    step_report,
)
from sglang_ext.online.queues import ByteQueue
from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.trainer.checkpoints import CheckpointWriter, stop_signals_wait_for_commits
from sglang_ext.online.trainer.group import (
    Command,
    GroupMember,
    anchor_generators,
    group_from_env,
    init_group,
    watch_parent,
)
from sglang_ext.online.trainer.guard import Guard
from trainer import distributed
from trainer.distributed import Dist
from trainer.draft_kind import get_kind
from trainer.replay import ReplayRecord
from trainer.target import load_target_head
from trainer.train_step import Batch, Precision, StepStats, TrainStep, pad_batch

log = logging.getLogger("sglang_ext.trainer")
MAX_BAD_STEPS = 10              # non-finite steps in a row before going back to the live draft
MAX_RAISED_STEPS = 3            # steps in a row that raised before the process exits (a broken device context
                                # would fail every step: a fresh process, not every record dropped)
LOWEST_STREAM_PRIORITY = 1 << 20   # torch maps a priority past the range to the lowest one the device has
TRAINER_NICE = 10               # added to the trainer's niceness (0..19): the OS runs serving processes first


def sample_by_recency(n: int, k: int, half_life: float, rng: random.Random) -> list[int]:
    """k distinct indices of a pool of n (index n - 1 the newest), each draw weighted 2 ** (-age / half_life)
    among the ones not drawn yet (Efraimidis-Spirakis keys)."""
    keys = [rng.random() ** (1.0 / 2.0 ** (-(n - 1 - i) / half_life)) for i in range(n)]
    return sorted(range(n), key=keys.__getitem__, reverse=True)[:k]


def feature_width(kind, cfg) -> int | None:
    """Columns of a record's features (target layers x hidden size) the draft's kind trains on live records
    (None when the kind does not say)."""
    try:
        return len(kind.live_feature_layers(cfg)) * int(cfg.hidden_size)
    except Exception:
        return None


class OnlineTrainer(GroupMember, Guard):
    def __init__(self, spec: TrainerSpec, group: Dist | None = None, conn=None):
        """group: this process's place in a multi-device trainer (default: one process), whose process group is
        joined here; conn: rank 0's records socket, read from here on (before the models load and the ranks
        meet, which may take a while), else the caller starts the receiver."""
        self.spec = spec
        self.settings = s = spec.settings
        self.group = group or Dist()
        if self.group.world_size != spec.world_size:
            raise ValueError(f"trainer spec: world_size {spec.world_size}, but the process group has "
                             f"{self.group.world_size}")
        self.main = self.group.is_main      # rank 0: records, pool, guard, slot, heartbeat
        self.kind = get_kind(spec.draft_kind)
        cfg = self.kind.load_config(spec.draft_path)
        self.kind.set_block_size(cfg, spec.block_size)
        self.fixed = self.kind.serving.fixed_weights   # loaded, trained around, never published
        self.slot = (ws.WeightSlot.attach(spec.slot_fd, ws.draft_layout(spec.draft_path, exclude=self.fixed),
                                          ws.dtype_from_name(spec.slot_dtype)) if self.main else None)
        self.inbox: ByteQueue[ReplayRecord] = ByteQueue(s.inbox_bytes, size=record_nbytes)
        self.conn = None                    # the records socket (rank 0): poison reports go back on it
        self._report_lock = threading.Lock()
        self.poisoned: list[tuple[int | None, str]] = []   # (seq, reason) of the records this process dropped
        self.raised_steps = 0               # steps in a row that raised
        self.run_id = s.run_id or new_run_id()   # the supervisor's (kept across restarts), else this process's
        self.checkpoints = (CheckpointWriter(s.checkpoint_dir, self.run_id, s.keep_checkpoints)
                            if s.checkpoint_dir else None)   # accepted versions on disk
        self.feature_width = feature_width(self.kind, cfg)
        if conn is not None:
            self.start_receiver(conn)
        if self.group.enabled and not torch.distributed.is_initialized():
            init_group(spec)
        precision = Precision.for_device(spec.device)
        embed, lm_head, _ = load_target_head(spec.target_path, dtype=precision.dtype)
        self.vocab_size = int(embed.shape[0])       # token ids of records must index the target's embedding

        self.draft = self.kind.from_pretrained(spec.draft_path, cfg)
        self.resumed_version = 0
        if self.main:
            names = set(self.draft.state_dict()) - set(self.fixed)
            if names != {n for n, _ in self.slot.layout}:
                raise ValueError(f"draft state dict {sorted(names)[:4]}... does not match the slot layout")
            self.resumed_version = self.slot.published
            kept = self.kept_state_to_resume()
            if kept is not None:            # the server rolled a version back: go on from what it restored
                self.resumed_version = self.slot.header.keep_version
                self.load_published(self.draft, kept)
            elif self.resumed_version > 0:  # a restart: go on from the newest accepted version
                self.load_published(self.draft, self.slot.read_state())
        # Several ranks: DDP, which broadcasts rank 0's weights (the resumed version) to every rank. Wrapped
        # before the frozen target head is attached (DDP would broadcast it too).
        self.draft.to(precision.device)
        self.model = distributed.wrap(self.draft, self.group, precision.device)
        self.live = None
        if self.main:
            self.live = self.kind.from_scratch(cfg)   # the guard's reference: the weights last published (or loaded)
            self.live.load_state_dict(self.draft.state_dict())
        self.embed, self.lm_head = embed.to(precision.device), lm_head.to(precision.device)   # frozen target parts
        for model in (self.draft, self.live):
            if model is not None:
                self.attach(model)
        if self.live is not None:
            self.live.eval()
        # EAGLE-style kinds unroll as many draft steps as the server runs (block size - 1)
        self.objective = self.kind.objective_settings(num_anchors=s.num_anchors, gamma=s.gamma,
                                                      ttt_steps=max(1, spec.block_size - 1))
        self.step_fn = TrainStep(self.kind, self.draft, precision, lr=s.lr, weight_decay=s.weight_decay,
                                 grad_clip=s.grad_clip, objective=self.objective, model=self.model,
                                 world_size=self.group.world_size)
        self.step = self.slot.header.steps if self.main else 0   # optimizer steps applied, across restarts
        self.local_steps = 0                # attempted steps of this process
        self.bad_steps = 0                  # non-finite steps in a row
        self.pool: deque[ReplayRecord] = deque()
        self.pool_bytes = 0
        self.holdout: deque[ReplayRecord] = deque(maxlen=s.holdout_records)
        self.received = 0
        self.candidates = 0
        self.want_publish = False
        self.rng = random.Random(os.getpid() if spec.seed is None else spec.seed)
        self.batch_seeds: list[int] = []    # anchor seeds of the records of the latest sample_batch()
        self.batch_records: list[ReplayRecord] = []   # the records of the latest draw
        self.last_command = time.monotonic()
        self.tokens = 0
        self.rate = None

    # -- records -------------------------------------------------------------------------------------------
    def start_receiver(self, conn) -> None:
        self.conn = conn
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
            problem = check_record(rec, self.vocab_size, self.feature_width)
            if problem is not None:
                self.report_poison(rec, problem)
                continue
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
    def draw(self) -> tuple[list[ReplayRecord], list[int]]:
        """`batch_size` records drawn from the pool without replacement, and one anchor seed each: uniformly,
        or (policy "recency") with weight 2 ** (-age / recency_half_life), age counted in records, newest age 0."""
        pool, k = list(self.pool), min(self.settings.batch_size, len(self.pool))
        if self.settings.replay_policy == "recency":
            picked = sample_by_recency(len(pool), k, self.settings.recency_half_life, self.rng)
            records = [pool[i] for i in picked]
        else:
            records = self.rng.sample(pool, k)
        self.batch_records = records
        # which records the step holds, in case the process dies outright in it ([] is sent once it is over)
        self.report(step_report([r.meta["seq"] for r in records if isinstance(r.meta.get("seq"), int)]))
        return records, [self.rng.randrange(2**63) for _ in records]

    def sample_batch(self) -> Batch:
        """One process: the drawn records, padded (their anchor seeds in `batch_seeds`)."""
        records, self.batch_seeds = self.draw()
        return self.local_batch(records)

    def local_batch(self, records: list[ReplayRecord]) -> Batch:
        return pad_batch(records, self.settings.max_seq_len, self.step_fn.precision.dtype)

    def train_once(self) -> StepStats:
        s = self.settings
        lr = s.lr * min(1.0, (self.local_steps + 1) / max(1, s.warmup_steps))
        self.batch_records = []
        t0 = time.monotonic()
        try:
            if self.group.enabled:          # rank 0 of several: every rank gets its share of the draw
                records, seeds = self.draw()
                width = records[0].features.shape[1]
                n = self.group.world_size
                mine = self.command_all([Command("step", lr, records[r::n], seeds[r::n], width) for r in range(n)])
                batch, seeds = self.share_batch(mine), mine.seeds
            else:
                batch = self.sample_batch()
                seeds = self.batch_seeds
            stats = self.step_fn.run([batch], lr=lr, generators=[anchor_generators(seeds) or None])
        except Exception as e:
            if not self.batch_records:
                raise
            return self._step_raised(e, lr)
        finally:
            if self.batch_records:
                self.report(step_report([]))
        self.raised_steps = 0
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

    def _step_raised(self, error: Exception, lr: float) -> StepStats:
        """A step raised with these records in the batch: the ones that fail alone (one process: all of them, if
        none does) leave the pool, are counted and reported (never re-sent); a one-process trainer goes on. A
        trainer group re-raises (the other ranks may be inside the step's collectives): the group is restarted
        once, without those records; when no record fails alone, nothing is dropped (a rank failed)."""
        self.local_steps += 1
        self.raised_steps += 1
        self.step_fn.optimizer.zero_grad(set_to_none=True)
        records = self.batch_records
        culprits = [r for r in records if self.fails_alone(r)]
        if not culprits:
            if self.group.enabled:          # no record fails alone: a rank or a collective failed, not a record
                raise error
            culprits = list(records)        # one process: the batch together is what fails
        bad = {id(r) for r in culprits}
        self.pool = deque(r for r in self.pool if id(r) not in bad)
        self.pool_bytes = sum(record_nbytes(r) for r in self.pool)
        log.error("step %d raised %s: %s; dropping %d of its %d record(s) (seq %s) as poison", self.step + 1,
                  type(error).__name__, error, len(culprits), len(records), [r.meta.get("seq") for r in culprits])
        for r in culprits:
            self.report_poison(r, f"step_failed: {type(error).__name__}")
        self.slot.header.train_records = len(self.pool)
        if self.group.enabled:
            raise error
        if self.raised_steps >= MAX_RAISED_STEPS:
            log.error("%d steps in a row raised: exiting for a fresh trainer process", self.raised_steps)
            raise error
        return StepStats(applied=False, skipped=f"step raised {type(error).__name__}", loss=math.nan,
                         grad_norm=math.nan, lr=lr, tokens=0)

    def fails_alone(self, record: ReplayRecord) -> bool:
        """Does the objective raise on this record alone (forward only, no update)?"""
        try:
            with torch.no_grad():
                self.step_fn.loss(self.draft, self.local_batch([record]), torch.Generator().manual_seed(0))
            return False
        except Exception:
            return True

    def report_poison(self, record: ReplayRecord, problem: str) -> None:
        """Drop `record` for good: counted here and reported on the records socket (reason, seq), so the
        supervisor counts it and leaves it out of what a restarted trainer is sent."""
        reason = problem.split(":", 1)[0]
        seq = record.meta.get("seq")
        self.poisoned.append((seq, reason))
        log.warning("poison record %s (seq %s) dropped: %s", record.meta.get("rid"), seq, problem)
        self.report(poison_report(seq if isinstance(seq, int) else None, reason))

    def report(self, message: bytes) -> None:
        """A report to the supervisor on the records socket (none without one)."""
        if self.conn is None:
            return
        try:
            with self._report_lock:
                self.conn.send_bytes(message)
        except OSError:
            log.exception("could not send a report to the scheduler")

    def _skip(self, why: str) -> None:
        self.slot.header.rejected_nan += 1
        self.bad_steps += 1
        log.warning("step %d skipped: %s (no update, counted)", self.step + 1, why)
        if self.bad_steps >= MAX_BAD_STEPS:   # stuck: go back to the live draft with a fresh optimizer
            log.error("%d non-finite steps in a row: restarting from the live draft", self.bad_steps)
            self._reset_to_live()
            self.bad_steps = 0

    def _reset_to_live(self) -> None:
        """The draft takes the live draft's weights, on every rank, with a fresh optimizer."""
        state = self.live.state_dict()
        if self.group.enabled:              # every rank goes back to the same weights
            self.command_all([Command("reset", state={k: v.cpu() for k, v in state.items()})] *
                             self.group.world_size)
        self.draft.load_state_dict(state)
        self.step_fn.reset_optimizer()

    def attach(self, model) -> None:
        """Move a draft to the training device and give it the frozen target parts."""
        model.to(self.embed.device)
        self.kind.attach_target(model, self.embed, self.lm_head, self.spec.target_path)

    def run(self) -> None:
        if not self.main:
            self.follow()
            return
        h = self.slot.header
        h.pid = os.getpid()
        log.info("trainer up (pid %d, %s draft, device %s%s, %s, %s)", os.getpid(), self.kind.name,
                 self.step_fn.precision.device,
                 f", rank 0 of {self.group.world_size}" if self.group.enabled else "",
                 str(self.step_fn.precision.dtype).removeprefix("torch."),
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
                self.reset_after_rollback()
                if len(self.pool) < self.settings.min_records:
                    self.keepalive()
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
            self.keepalive()
            time.sleep(min(left, 1.0))


def main(argv: list[str] | None = None, trainer_cls: type[OnlineTrainer] = OnlineTrainer) -> int:
    from multiprocessing.connection import Connection

    argv = sys.argv[1:] if argv is None else argv
    spec = TrainerSpec.from_json(argv[0])
    stop_signals_wait_for_commits()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[sglang-ext trainer %(asctime)s] %(levelname)s %(message)s")
    torch.set_num_threads(spec.settings.threads)
    try:
        os.nice(TRAINER_NICE)               # serving first on shared cores
    except OSError as e:
        log.warning("could not lower the trainer's CPU priority (%s); it competes with serving as an equal", e)
    device = torch.device(spec.device)
    if device.type == "cuda" and spec.settings.max_memory_bytes:   # past the budget the trainer fails, not serving
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.settings.max_memory_bytes / total), device)
    if spec.world_size == 1:                # one process, as before multi-device trainers
        trainer = trainer_cls(spec)
        trainer.start_receiver(Connection(spec.records_fd))
        trainer.run()
        return 0
    group = group_from_env(spec)
    if not group.is_main:
        watch_parent()
    conn = Connection(spec.records_fd) if group.is_main else None
    trainer_cls(spec, group=group, conn=conn).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
