"""Record assembly in the recorder process: a finished request (finished.CapturedRequest) -> a replay record."""
from __future__ import annotations

import torch

from sglang_ext.online.finished import CapturedRequest


def assemble_record(fin: CapturedRequest, include_prompt_loss: bool, store=None):
    """A finished CapturedRequest -> trainer.replay.ReplayRecord, or None when no row was captured.

    Covers positions [0, S) where S = end of the last captured row (capped at the finished length): the very
    last generated token never has target features. Positions the target did not recompute (a radix-cache
    prefix hit) are filled from `store` (a PrefixFeatureStore: the rows recorded when that prefix was computed;
    meta["prefix_filled_rows"] counts them); what it does not hold is a gap: zero features, out of the loss
    mask, listed in meta["feature_gaps"]. The record's own rows then go into the store.
    """
    from trainer.replay import ReplayRecord

    fin.resolve()
    n_tokens = len(fin.token_ids)
    chunks = sorted((s, t) for s, t in fin.chunks.items() if s < n_tokens)
    if not chunks:
        return None
    feature_dim, dtype = chunks[0][1].shape[1], chunks[0][1].dtype
    end = min(max(s + t.shape[0] for s, t in chunks), n_tokens)
    features = torch.zeros(end, feature_dim, dtype=dtype)
    covered = torch.zeros(end, dtype=torch.bool)
    for start, rows in chunks:                       # later chunks (recomputation) overwrite earlier ones
        rows = rows[:end - start]
        features[start:start + rows.shape[0]] = rows
        covered[start:start + rows.shape[0]] = True
    filled = 0
    if store is not None:
        keys = fin.key_ids if len(fin.key_ids) >= end else fin.token_ids
        if not bool(covered.all()):
            filled = store.fill(keys, features, covered).filled
        store.add(keys, features, covered)
    gaps, i = [], 0
    while i < end:
        if not covered[i]:
            j = i
            while j < end and not covered[j]:
                j += 1
            gaps.append([i, j])
            i = j
        else:
            i += 1
    input_ids = torch.tensor(fin.token_ids[:end], dtype=torch.int64)
    loss_mask = covered.clone()
    if not include_prompt_loss:
        loss_mask[:fin.prompt_len] = False
    positions = torch.arange(end, dtype=torch.int64).expand(3, end).clone()
    if fin.mrope_prompt is not None:
        n_prompt = min(fin.prompt_len, end, fin.mrope_prompt.shape[1])
        positions[:, :n_prompt] = fin.mrope_prompt[:, :n_prompt].to(torch.int64)
        positions[:, fin.prompt_len:] += fin.mrope_delta
    meta = {"rid": fin.rid, "prompt_len": fin.prompt_len, "num_tokens_finished": n_tokens,
            "finish_reason": fin.finish_reason, "has_image": "image" in fin.modalities,
            "modalities": list(fin.modalities), "feature_gaps": gaps,
            "prefix_filled_rows": filled, "source": "online"}
    return ReplayRecord(input_ids=input_ids, features=features, positions=positions,
                        loss_mask=loss_mask, meta=meta)
