"""The EAGLE3 training objective: training-time test (TTT) unrolled over T steps (the published recipe).

Records carry, per position p, the aux target features (what `fc` reads) and, from an offline capture, the
output of the target's last layer; the latter, through the target's frozen final norm and lm_head, gives the
target's next-token distribution q_t(. | p). Records of live traffic (--online-train: SGLang's EAGLE worker
feeds the draft the aux layers only) carry no last layer: q_t(. | p) is then the one-hot of the token that was
served at p+1 (under greedy serving, the target's argmax; under sampling, a sample of q_t, so the expected loss
differs from the soft one by a constant). Draft step s at index i holds token x_{i+1+s} at RoPE position i+s (trainer/eagle3_draft.py)
and is trained to match the target's distribution at position p = i+1+s, which predicts x_{p+1}:

    loss      = sum_s decay^s * mean over valid (i, s) of  -sum_v q_t(v | p) log q_d(v | i, s)      (forward KL
                up to the target's entropy), q_t restricted to the draft vocabulary and renormalised
    valid     p+1 < S, loss_mask[p+1] (the token p predicts is target-generated), and the target's greedy token
              at p is in the draft vocabulary (t2d)

Acceptance proxy (what greedy chain verification would accept): at each index i, 1 + the number of leading
steps whose draft argmax (mapped to a target id) equals the target's greedy token, over indices whose first
min(T, block_size - 1) steps are all valid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.draft_kind import ObjectiveOutput


def _chunk_soft_ce(hidden: torch.Tensor, head: torch.Tensor, target_probs: torch.Tensor):
    logits = F.linear(hidden.to(head.dtype), head).float()                       # [m, Vd]
    if target_probs.dtype == torch.long:                                          # hard labels (draft ids)
        return F.cross_entropy(logits, target_probs, reduction="none"), logits.argmax(-1)
    return -(target_probs * logits.log_softmax(-1)).sum(-1), logits.argmax(-1)


def soft_cross_entropy(hidden: torch.Tensor, head: torch.Tensor, target_probs: torch.Tensor,
                       chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, H], head [Vd, H], target_probs [M, Vd] (or hard labels: draft ids [M] long) -> (per-row
    soft CE [M], draft argmax [M]). Logits are built chunk by chunk and recomputed in backward, so [M, Vd]
    logits never exist at once."""
    ces, preds = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, p = hidden[start:start + chunk_rows], target_probs[start:start + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad and hidden.shape[0] > chunk_rows:
            ce, pred = checkpoint(_chunk_soft_ce, h, head, p, use_reentrant=False)
        else:
            ce, pred = _chunk_soft_ce(h, head, p)
        ces.append(ce)
        preds.append(pred)
    if not ces:
        return hidden.new_zeros(0, dtype=torch.float32), target_probs.new_zeros(0, dtype=torch.long)
    return torch.cat(ces), torch.cat(preds)


@torch.no_grad()
def target_distribution(draft, final_hidden: torch.Tensor, chunk_rows: int = 1024):
    """final_hidden [N, Ht] -> (target greedy token [N], target probabilities over the draft vocabulary [N, Vd])."""
    greedy, probs = [], []
    vocab_ids = draft.draft_to_target
    for start in range(0, final_hidden.shape[0], chunk_rows):
        logits = draft.target_logits(final_hidden[start:start + chunk_rows])             # [m, V] fp32
        greedy.append(logits.argmax(-1))
        probs.append(logits[:, vocab_ids].softmax(-1))
    Vd = vocab_ids.numel()
    if not greedy:
        return final_hidden.new_zeros(0, dtype=torch.long), final_hidden.new_zeros(0, Vd, dtype=torch.float32)
    return torch.cat(greedy), torch.cat(probs)


def eagle3_loss(draft, target_hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, *,
                ttt_steps: int = 7, step_decay: float = 0.8, backend: str = "auto",
                chunk_rows: int = 1024) -> ObjectiveOutput:
    """
    draft          trainer.eagle3_draft.Eagle3Draft with the target's embedding, final norm and lm_head attached
    target_hidden  [b, S, (K+1)*Ht]  the K aux layers, then the target's last layer (cfg.feature_layer_ids),
                   or [b, S, K*Ht]  the K aux layers only (live capture): hard labels from input_ids
    input_ids      [b, S]   loss_mask [b, S] (False on padding)
    """
    cfg = draft.cfg
    b, S = input_ids.shape
    K, Ht = len(cfg.aux_layer_ids), cfg.target_width
    if target_hidden.shape[-1] not in ((K + 1) * Ht, K * Ht):
        raise ValueError(f"target_hidden last dim {target_hidden.shape[-1]} is neither (K+1)*Ht = {(K + 1) * Ht} "
                         f"(the aux layers {cfg.aux_layer_ids} and the last layer {cfg.num_target_layers - 1}) "
                         f"nor K*Ht = {K * Ht} (the aux layers only)")
    T = int(ttt_steps)
    if T < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {T}")
    device = input_ids.device

    # The target's greedy token and distribution at every position p (hard labels: the next token, t_probs None).
    if target_hidden.shape[-1] == (K + 1) * Ht:
        t_greedy, t_probs = target_distribution(draft, target_hidden[..., K * Ht:].reshape(b * S, Ht), chunk_rows)
        t_greedy, t_probs = t_greedy.view(b, S), t_probs.view(b, S, -1)
    else:
        t_greedy, t_probs = torch.zeros_like(input_ids), None
        t_greedy[:, :-1] = input_ids[:, 1:]
        to_draft = torch.full((draft.t2d.numel(),), -1, dtype=torch.long, device=device)
        to_draft[draft.draft_to_target] = torch.arange(draft.draft_to_target.numel(), device=device)
    trainable = torch.zeros(b, S, dtype=torch.bool, device=device)           # position p: its next token counts
    trainable[:, :-1] = loss_mask[:, 1:].bool()
    trainable &= draft.t2d[t_greedy]

    outs = draft(target_hidden[..., :K * Ht], input_ids, n_steps=T, backend=backend)   # T x [b, S, H]
    head = draft.lm_head.weight
    to_target = draft.draft_to_target
    idx = torch.arange(S, device=device)
    loss = outs[0].sum() * 0.0
    weight_sum = 0.0
    terms = []                                                               # (w * sum of CE, rows) per step
    correct = torch.zeros(T, b, S, dtype=torch.bool, device=device)
    valid = torch.zeros(T, b, S, dtype=torch.bool, device=device)
    for s in range(T):
        p = idx + 1 + s                                                      # target position of index i
        in_seq = p < S
        pc = p.clamp(max=S - 1)
        v = trainable[:, pc] & in_seq                                       # [b, S]
        valid[s] = v
        if not v.any():
            terms.append((outs[s].new_zeros((), dtype=torch.float32), torch.tensor(0.0)))   # same length on every rank
            continue
        rows = outs[s][v]                                                    # [m, H]
        probs = t_probs[:, pc][v] if t_probs is not None else to_draft[t_greedy[:, pc][v]]   # [m, Vd] or [m]
        ce, pred = soft_cross_entropy(rows, head, probs, chunk_rows)
        w = step_decay ** s
        loss = loss + w * ce.mean()
        weight_sum += w
        terms.append((w * ce.sum(), torch.tensor(float(ce.numel()))))
        with torch.no_grad():
            hit = torch.zeros(b, S, dtype=torch.bool, device=device)
            hit[v] = to_target[pred] == t_greedy[:, pc][v]
            correct[s] = hit

    with torch.no_grad():
        A = max(1, min(T, cfg.block_size - 1))                               # proposals a chain verify checks
        full = valid[:A].all(0)                                              # [b, S]
        leading = correct[:A].long().cumprod(0).sum(0)                       # [b, S]
        accept_sum = ((1 + leading) * full).sum().float()
        slot_correct = (correct & valid).sum((1, 2))
        slot_count = valid.sum((1, 2))
    return ObjectiveOutput(loss=loss, slot_correct=slot_correct, slot_count=slot_count, accept_sum=accept_sum,
                           full_blocks=full.sum(), weight_sum=torch.tensor(weight_sum), loss_terms=tuple(terms))
