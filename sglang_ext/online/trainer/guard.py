"""The swap guard of the online trainer (trainer process): a candidate is published only if it is not worse.

Every `swap_every` steps the candidate (the draft being trained) is scored against the live draft on the
held-out slice of recent traffic (never trained on), with the objective's acceptance proxy: the acceptance length
greedy verification would give on those records, the same proposals for both. A candidate with non-finite weights,
or scoring below live - guard_tolerance, is rejected (counted in the slot's header); one that passes is published
through the weight slot and exported as a checkpoint. After the server rolls a version back (served acceptance,
sglang_ext/online/swap/rollback.py), training goes on from the restored weights.
"""
from __future__ import annotations

import logging

import torch

from trainer.train_step import pad_batch

log = logging.getLogger("sglang_ext.trainer")
GUARD_ANCHORS = 256             # proposals scored per held-out record by the guard


class Guard:
    """The guard + publish part of worker.OnlineTrainer (a mixin: it uses the trainer's draft, live copy, slot,
    held-out slice and step function)."""

    def score(self, model) -> float:
        """Acceptance proxy of `model` on the held-out slice (same proposals for every model scored)."""
        held = list(self.holdout)
        size = self.settings.batch_size
        batches = [pad_batch(held[i:i + size], self.settings.max_seq_len, self.step_fn.precision.dtype)
                   for i in range(0, len(held), size)]
        return self.step_fn.acceptance(model, batches, **self.kind.objective_settings(num_anchors=GUARD_ANCHORS))

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
        if self.checkpoints is not None:
            self.checkpoints.write(self.live, version)

    # -- rollback on served acceptance (sglang_ext/online/swap/rollback.py) ---------------------------------------
    def kept_state_to_resume(self) -> dict[str, torch.Tensor] | None:
        """Starting up: after a rollback the live draft is the slot's keep buffer, so a (re)started trainer goes
        on from it (a rollback not reset for yet is taken as reset here), unless a version trained from it was
        published since."""
        slot = self.slot
        if not slot.has_keep:
            return None
        h = slot.header
        rollbacks = h.rollbacks
        pending = rollbacks > h.rollback_seen
        if not pending and not (h.live_in_keep and h.published <= h.reset_published):
            return None
        state = {name: t.clone() for name, t in slot.keep.items()}
        if pending:
            h.reset_published = h.published
            h.rollback_seen = rollbacks
        return state

    def reset_after_rollback(self) -> bool:
        """The server rolled the live version back (slot header `rollbacks`): the draft and the guard's live copy
        go back to the restored weights (the slot's keep buffer), with a fresh optimizer; versions published
        before this (trained from the rolled-back one) are never applied."""
        slot = self.slot
        h = slot.header
        rollbacks = h.rollbacks
        if not slot.has_keep or rollbacks <= h.rollback_seen:
            return False
        self.load_published(self.live, {name: t.clone() for name, t in slot.keep.items()})
        self._reset_to_live()
        self.want_publish, self.bad_steps = False, 0
        h.reset_published = h.published
        h.rollback_seen = rollbacks
        log.warning("the server rolled draft version %d back to version %d: training goes on from version %d's "
                    "weights (fresh optimizer); versions published up to %d are not applied",
                    h.rolled_back_version, h.keep_version, h.keep_version, h.published)
        return True
