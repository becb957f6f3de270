"""The DFlash training objective (the published recipe, as in SpecForge / z-lab DFlash).

Per sequence, up to `num_anchors` anchors are drawn among positions i with loss_mask[i] and
loss_mask[i+1] (a target-generated token followed by another), then sorted. Each anchor opens a block
of B slots at positions anchor .. anchor+B-1:

    block_ids  = [input_ids[anchor], MASK, MASK, ... MASK]           embedded with the target embedding
    labels     = [ignored, input_ids[anchor+1], ..., input_ids[anchor+B-1]]
                 same-position labels: slot k predicts the token AT anchor+k (never shifted);
                 slot 0 is given, so never in the loss; past the sequence end or outside the loss
                 mask: ignored
    weight[k]  = exp(-(k - 1) / gamma)                                  k >= 1

and block j attends to target context positions < anchor_j (strict: the feature at anchor_j has
already seen token anchor_j+1's prediction) plus every slot of block j, nothing of other blocks
(the `spec_kernels.dflash_attention` contract). loss = sum(w * CE) / sum(w) over labelled slots.

The two published pitfalls that leave tau ~1.3 are shifted labels and `<=` in the context mask;
tests/test_objective.py checks both against a plain per-block computation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.draft_kind import ObjectiveOutput

IGNORE = -100


@dataclass
class Blocks:
    anchors: torch.Tensor     # [b, N]    long, -1 = padding block
    block_ids: torch.Tensor   # [b, N*B]  long
    labels: torch.Tensor      # [b, N*B]  long, IGNORE where not in the loss
    weights: torch.Tensor     # [b, N*B]  float, 0 where not in the loss

    @property
    def block_size(self) -> int:
        return self.block_ids.shape[1] // self.anchors.shape[1]


def valid_anchor_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """[b, S] bool -> [b, S] bool: position i can anchor a block iff loss_mask[i] and loss_mask[i+1]."""
    valid = torch.zeros_like(loss_mask, dtype=torch.bool)
    valid[:, :-1] = loss_mask[:, :-1].bool() & loss_mask[:, 1:].bool()
    return valid


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """[b, S] loss mask -> anchors [b, N] long, sorted per row, -1 padded; N = max anchors in the batch
    (<= num_anchors). Sampling is uniform without replacement among valid positions (on CPU). `generator`:
    one for the whole batch (rows draw from it in turn), or a list with one per row, so a sequence's anchors
    do not depend on which other sequences share its batch (finetune: the same anchors on any number of ranks)."""
    valid = valid_anchor_mask(loss_mask).cpu()
    if isinstance(generator, (list, tuple)) and len(generator) != valid.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {valid.shape[0]} sequences")
    rows = []
    for i, row in enumerate(valid):
        pos = row.nonzero().flatten()
        if pos.numel() > num_anchors:
            gen = generator[i] if isinstance(generator, (list, tuple)) else generator
            pos = pos[torch.randperm(pos.numel(), generator=gen)[:num_anchors]]
        rows.append(pos.sort().values)
    n = max([r.numel() for r in rows] + [1])
    anchors = torch.full((len(rows), n), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        anchors[i, : r.numel()] = r
    return anchors.to(loss_mask.device)


def build_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int,
                 mask_token_id: int, gamma: float = 7.0) -> Blocks:
    """input_ids / loss_mask [b, S] (loss_mask False on padding), anchors [b, N] -> Blocks."""
    b, S = input_ids.shape
    B = block_size
    slot = torch.arange(B, device=input_ids.device)                               # [B]
    pos = anchors[:, :, None] + slot                                               # [b, N, B] absolute positions
    real = (anchors >= 0)[:, :, None]                                              # [b, N, 1]
    in_seq = real & (pos < S)
    safe_pos = pos.clamp(0, S - 1).reshape(b, -1)
    tok = input_ids.gather(1, safe_pos).view_as(pos)                               # token AT anchor+k
    in_loss = loss_mask.bool().gather(1, safe_pos).view_as(pos)

    block_ids = torch.full_like(pos, mask_token_id)
    block_ids[:, :, 0] = torch.where(real[:, :, 0], tok[:, :, 0], mask_token_id)
    labelled = in_seq & in_loss & (slot >= 1)                                      # slot 0 never in the loss
    labels = torch.where(labelled, tok, IGNORE)
    slot_weight = torch.exp(-(slot.float() - 1.0) / gamma)                        # [B]
    weights = slot_weight * labelled.float()
    return Blocks(anchors=anchors, block_ids=block_ids.reshape(b, -1), labels=labels.reshape(b, -1),
                  weights=weights.reshape(b, -1))


def _chunk_ce(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor):
    logits = F.linear(hidden.to(lm_head.dtype), lm_head).float()                  # [m, V]
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def weighted_ce(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk_rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, H] rows that are in the loss, labels/weights [M] -> (sum(w * CE), argmax [M]).
    Logits are built chunk by chunk and recomputed in backward, so [M, vocab] never exists at once."""
    total = hidden.new_zeros((), dtype=torch.float32)
    preds = []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y, w = hidden[start:start + chunk_rows], labels[start:start + chunk_rows], weights[start:start + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad and hidden.shape[0] > chunk_rows:
            ce, pred = checkpoint(_chunk_ce, h, lm_head, y, use_reentrant=False)
        else:
            ce, pred = _chunk_ce(h, lm_head, y)
        total = total + (ce * w).sum()
        preds.append(pred)
    return total, torch.cat(preds) if preds else labels.new_zeros(0)


def dflash_loss(draft, target_hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, *,
                num_anchors: int = 512, block_size: int | None = None, gamma: float = 7.0,
                anchors: torch.Tensor | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                backend: str = "auto", chunk_rows: int = 2048) -> ObjectiveOutput:
    """
    draft          trainer.dflash_draft.DFlashDraft with the target embedding / lm_head attached
    target_hidden  [b, S, K*H]  input_ids [b, S]  loss_mask [b, S] (False on padding)
    anchors        [b, N] to fix the blocks (tests); otherwise sampled with `generator` (one, or one per row)
    """
    B = block_size or draft.cfg.block_size
    if anchors is None:
        anchors = sample_anchors(loss_mask, num_anchors, generator)
    blocks = build_blocks(input_ids, loss_mask, anchors, B, draft.cfg.mask_token_id, gamma)
    hidden = draft(target_hidden, blocks.block_ids, blocks.anchors, backend=backend)      # [b, N*B, H]

    in_loss = blocks.weights.reshape(-1) > 0                                               # [b*N*B]
    rows = hidden.reshape(-1, hidden.shape[-1])[in_loss]
    labels = blocks.labels.reshape(-1)[in_loss]
    weights = blocks.weights.reshape(-1)[in_loss]
    loss_sum, pred = weighted_ce(rows, draft.lm_head, labels, weights, chunk_rows)
    weight_sum = weights.sum()
    loss = loss_sum / weight_sum if rows.shape[0] else hidden.sum() * 0.0

    with torch.no_grad():
        correct = torch.zeros_like(in_loss)
        correct[in_loss] = pred == labels
        b, N = anchors.shape
        correct = correct.view(b, N, B)
        labelled = (blocks.labels != IGNORE).view(b, N, B)
        slot_correct = correct.sum((0, 1))
        slot_count = labelled.sum((0, 1))
        full = labelled[:, :, 1:].all(-1) & (anchors >= 0)                                 # [b, N]
        leading = correct[:, :, 1:].long().cumprod(-1).sum(-1)                             # [b, N]
        accept_sum = ((1 + leading) * full).sum().float()
    return ObjectiveOutput(loss=loss, slot_correct=slot_correct, slot_count=slot_count, accept_sum=accept_sum,
                           full_blocks=full.sum(), weight_sum=weight_sum.detach(),
                           loss_terms=((loss_sum, weight_sum.detach()),))


def slot_weights(block_size: int, gamma: float = 7.0) -> list[float]:
    """The per-slot loss weights, slot 0 excluded (0.0)."""
    return [0.0] + [math.exp(-(k - 1) / gamma) for k in range(1, block_size)]
