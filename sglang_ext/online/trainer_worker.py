"""The co-located trainer: its own process, so a crash, an OOM or a NaN here never reaches the server.

    python -m sglang_ext.online.trainer_worker '<json spec>'      (started by sglang_ext.online.supervisor)

Input: replay records from the scheduler over a socket (one `torch.save`d dict per message); the process
exits when that socket closes (the server went away). Output: candidate drafts through the shared
`WeightSlot`, plus its status (steps, loss, tokens/s, guard results, heartbeat) in the slot's header.

Loop: every record goes to the training pool, except every `holdout_every`-th, which goes to the guard's
held-out slice of recent traffic (never trained on). One step = `batch_size` records drawn from the pool,
the DFlash objective of `trainer.objective`, AdamW with a warmup and a constant rate, gradient clipping. A
non-finite loss or gradient skips the step (counted). Every `swap_every` steps the candidate is scored
against the live draft on the held-out slice (offline tau: the acceptance length greedy verification would
give on those records, same anchors for both) and published only if it is not worse.

Faults for tests ($SGLANG_EXT_TRAINER_FAULT, comma separated): `nan_steps=A-B` makes the loss NaN at
the A-th..B-th step this process attempts; `worse_once_live_tau=T` replaces the first candidate scored
while the live draft's held-out tau is >= T by a clearly worse one (final norm negated).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import queue
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_ext.online import weight_slot as ws

log = logging.getLogger("sglang_ext.trainer")
FAULT_ENV = "SGLANG_EXT_TRAINER_FAULT"


@dataclass
class Record:
    input_ids: torch.Tensor      # [S] long
    features: torch.Tensor       # [S, K*H]
    loss_mask: torch.Tensor      # [S] bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_record(record) -> bytes:
    """A trainer.replay.ReplayRecord -> the bytes sent to the trainer."""
    buf = io.BytesIO()
    torch.save({"input_ids": record.input_ids, "features": record.features, "loss_mask": record.loss_mask}, buf)
    return buf.getvalue()


def decode_record(payload: bytes) -> Record:
    d = torch.load(io.BytesIO(payload), weights_only=True)
    return Record(d["input_ids"].long(), d["features"], d["loss_mask"].bool())


def _nbytes(rec: Record) -> int:
    return rec.features.numel() * rec.features.element_size()


def parse_faults(text: str | None) -> dict:
    faults: dict = {"nan_steps": (0, -1), "worse_once_live_tau": None}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key == "nan_steps":
            a, _, b = value.partition("-")
            faults["nan_steps"] = (int(a), int(b or a))
        elif key == "worse_once_live_tau":
            faults["worse_once_live_tau"] = float(value)
        else:
            raise ValueError(f"${FAULT_ENV}: unknown fault {key!r} (nan_steps=A-B, worse_once_live_tau=T)")
    return faults


def collate(records: list[Record], max_seq_len: int, device, dtype):
    """-> (input_ids [b, S], features [b, S, K*H], loss_mask [b, S]) on `device`, and the real token count."""
    from trainer.finetune import pad_batch
    b = pad_batch(records, max_seq_len, dtype)
    return b.input_ids.to(device), b.target_hidden.to(device), b.loss_mask.to(device), b.num_tokens


class OnlineTrainer:
    def __init__(self, spec: dict):
        from sglang_ext.online.config import OnlineTrainConfig
        from trainer.dflash_draft import DFlashDraft, DraftConfig
        from trainer.target import load_target_head

        self.cfg = OnlineTrainConfig(**spec["config"])
        self.faults = parse_faults(os.environ.get(FAULT_ENV))
        self.device = torch.device(spec["device"])
        self.dtype = torch.float32
        draft_cfg = DraftConfig.from_json(spec["draft_path"])
        draft_cfg.block_size = int(spec["block_size"])
        self.slot = ws.WeightSlot.attach(int(spec["slot_fd"]), ws.draft_layout(spec["draft_path"]))
        embed, lm_head, _ = load_target_head(spec["target_path"])

        self.draft = DFlashDraft.from_pretrained(spec["draft_path"], draft_cfg)
        names = set(self.draft.state_dict())
        if names != {n for n, _ in self.slot.layout}:
            raise ValueError(f"draft state dict {sorted(names)[:4]}... does not match the slot layout")
        self.resumed_version = self.slot.published
        if self.resumed_version > 0:        # a restart: go on from the newest accepted version
            self.draft.load_state_dict(self.slot.read_state())
        self.live = DFlashDraft(draft_cfg)  # the guard's reference: the weights last published (or loaded)
        self.live.load_state_dict(self.draft.state_dict())
        for model in (self.draft, self.live):
            model.to(self.device)
            model.attach_target(embed.to(self.device, self.dtype), lm_head.to(self.device, self.dtype))
        self.live.eval()
        params = [p for p in self.draft.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.step = int(self.slot.get(ws.STEPS))
        self.local_steps = 0                # attempted steps of this process (faults count these)
        self.bad_steps = 0                  # non-finite steps in a row
        self.injected_worse = False
        self.pool: deque[Record] = deque()
        self.pool_bytes = 0
        self.holdout: deque[Record] = deque(maxlen=self.cfg.holdout_records)
        self.received = 0
        self.candidates = 0
        self.want_publish = False
        self.rng = random.Random(os.getpid())
        self.inbox: queue.Queue = queue.Queue()
        self.tokens = 0
        self.rate = None

    # -- records -------------------------------------------------------------------------------------------
    def start_receiver(self, conn) -> None:
        def receive():
            while True:
                try:
                    payload = conn.recv_bytes()
                except (EOFError, OSError):
                    log.info("scheduler connection closed; trainer exits")
                    os._exit(0)
                try:
                    self.inbox.put(decode_record(payload))
                except Exception:
                    log.exception("could not decode a record; skipped")
        threading.Thread(target=receive, name="records", daemon=True).start()

    def drain(self) -> None:
        while True:
            try:
                rec = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.received += 1
            if self.received % self.cfg.holdout_every == 0:
                self.holdout.append(rec)
                continue
            self.pool.append(rec)
            self.pool_bytes += _nbytes(rec)
            while self.pool_bytes > self.cfg.replay_budget_bytes and len(self.pool) > 1:   # oldest go first
                self.pool_bytes -= _nbytes(self.pool.popleft())
        s = self.slot
        s.set(ws.RECORDS, self.received)
        s.set(ws.TRAIN_RECORDS, len(self.pool))
        s.set(ws.HOLDOUT_RECORDS, len(self.holdout))

    # -- training ------------------------------------------------------------------------------------------
    def train_step(self) -> None:
        from trainer.objective import dflash_loss
        cfg = self.cfg
        records = self.rng.sample(list(self.pool), min(cfg.batch_size, len(self.pool)))
        ids, feats, mask, ntok = collate(records, cfg.max_seq_len, self.device, self.dtype)
        lr = cfg.lr * min(1.0, (self.local_steps + 1) / max(1, cfg.warmup_steps))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.monotonic()
        self.draft.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = dflash_loss(self.draft, feats, ids, mask, num_anchors=cfg.num_anchors, gamma=cfg.gamma,
                          generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
        loss = out.loss
        self.local_steps += 1
        a, b = self.faults["nan_steps"]
        if a <= self.local_steps <= b:
            loss = loss * float("nan")
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            self._skip(f"loss is {loss_val}")
            return
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            self._skip(f"gradient norm is {float(grad_norm)}")
            return
        self.optimizer.step()
        self.bad_steps = 0
        self.step += 1
        self.tokens += ntok
        dt = max(1e-6, time.monotonic() - t0)
        self.rate = ntok / dt if self.rate is None else 0.9 * self.rate + 0.1 * ntok / dt
        s = self.slot
        s.set(ws.STEPS, self.step)
        s.set(ws.LOSS, loss_val)
        s.set(ws.ACCURACY, out.accuracy)
        s.set(ws.TOKENS, self.tokens)
        s.set(ws.TOKENS_PER_S, self.rate)
        if self.step % cfg.swap_every == 0:
            self.want_publish = True

    def _skip(self, why: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.slot.set(ws.REJECTED_NAN, self.slot.get(ws.REJECTED_NAN) + 1)
        self.bad_steps += 1
        log.warning("step %d skipped: %s (no update, counted)", self.step + 1, why)
        if self.bad_steps >= 10:            # stuck: go back to the live draft with a fresh optimizer
            log.error("%d non-finite steps in a row: restarting from the live draft", self.bad_steps)
            self.draft.load_state_dict(self.live.state_dict())
            self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            self.bad_steps = 0

    # -- guard + publish -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model) -> float:
        """Offline tau on the held-out slice: mean over full blocks of 1 + leading correct draft tokens."""
        from trainer.objective import dflash_loss
        model.eval()
        accept, blocks = 0.0, 0
        held = list(self.holdout)
        for i in range(0, len(held), self.cfg.batch_size):
            ids, feats, mask, _ = collate(held[i:i + self.cfg.batch_size], self.cfg.max_seq_len, self.device,
                                          self.dtype)
            out = dflash_loss(model, feats, ids, mask, num_anchors=256, gamma=self.cfg.gamma,
                              generator=torch.Generator().manual_seed(1234 + i))
            accept += float(out.accept_sum)
            blocks += int(out.full_blocks)
        return accept / blocks if blocks else float("nan")

    def maybe_publish(self) -> None:
        if not self.want_publish or not self.slot.can_publish() or not self.holdout:
            return
        self.want_publish = False
        self.candidates += 1
        s = self.slot
        state = {k: v.detach().float().cpu().clone() for k, v in self.draft.state_dict().items()}
        if not all(torch.isfinite(v).all() for v in state.values()):
            s.set(ws.REJECTED_NAN, s.get(ws.REJECTED_NAN) + 1)
            log.warning("candidate %d has non-finite weights: rejected", self.candidates)
            return
        live_tau = self.score(self.live)
        scorer, injected = self.draft, False
        threshold = self.faults["worse_once_live_tau"]
        if threshold is not None and not self.injected_worse and live_tau >= threshold:
            # Fault: a candidate that is clearly worse (final norm negated: every logit flips sign).
            injected = self.injected_worse = True
            state["norm.weight"] = -state["norm.weight"]
            scorer = type(self.draft)(self.draft.cfg)
            scorer.load_state_dict(state)
            scorer.to(self.device).attach_target(self.draft.embed_tokens, self.draft.lm_head)
        cand_tau = self.score(scorer)
        s.set(ws.GUARD_EVALS, s.get(ws.GUARD_EVALS) + 1)
        s.set(ws.CANDIDATE_TAU, cand_tau)
        s.set(ws.LIVE_TAU, live_tau)
        if not cand_tau >= live_tau - self.cfg.guard_tolerance:
            s.set(ws.REJECTED_WORSE, s.get(ws.REJECTED_WORSE) + 1)
            log.info("step %d: %scandidate tau %.3f < live %.3f on %d held-out records: not swapped",
                     self.step, "injected-worse " if injected else "", cand_tau, live_tau, len(self.holdout))
            return
        version = s.publish(state)
        self.live.load_state_dict(state)
        log.info("step %d: published %sdraft version %d (held-out tau %.3f, live %.3f)", self.step,
                 "injected-worse " if injected else "", version, cand_tau, live_tau)
        if self.cfg.checkpoint_dir:
            self.checkpoint(version, state)

    def checkpoint(self, version: int, state: dict) -> None:
        """Export the accepted version; the oldest go first, so at most keep_checkpoints exist at any time."""
        out = Path(self.cfg.checkpoint_dir)
        try:
            kept = sorted(p for p in out.glob("version-*") if p.is_dir())
            for old in kept[:max(0, len(kept) - self.cfg.keep_checkpoints + 1)]:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
            self.live.export(out / f"version-{version:06d}")
        except OSError:
            log.exception("could not write the checkpoint of version %d to %s", version, out)

    def run(self) -> None:
        s = self.slot
        s.set(ws.PID, os.getpid())
        log.info("trainer up (pid %d, device %s, %s)", os.getpid(), self.device,
                 f"resuming from version {self.resumed_version} at step {self.step}" if self.resumed_version
                 else "starting from the loaded draft")
        while True:
            s.set(ws.HEARTBEAT, time.time())
            self.drain()
            if len(self.pool) < self.cfg.min_records:
                time.sleep(0.1)
                continue
            self.train_step()
            self.maybe_publish()


def main(argv: list[str] | None = None) -> int:
    from multiprocessing.connection import Connection

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[sglang-ext trainer %(asctime)s] %(levelname)s %(message)s")
    torch.set_num_threads(int(spec["config"].get("trainer_threads", 1)))
    conn = Connection(int(spec["fd"]))
    trainer = OnlineTrainer(spec)
    trainer.start_receiver(conn)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
