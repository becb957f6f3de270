"""Record assembly in the recorder process: a finished request (finished.CapturedRequest) -> a replay record."""
from __future__ import annotations

import torch

from sglang_ext.online.finished import CapturedRequest


def assemble_record(fin: CapturedRequest, include_prompt_loss: bool, store=None):
    """A finished CapturedRequest -> trainer.replay.ReplayRecord, or None when no row was captured.

    Covers positions [0, S) where S = one past the last covered row (capped at the finished length): the very
    last generated token never has target features. The request's radix-cache hit (positions before fin.start,
    not recomputed for it) and rows the feature pool no longer held (a smaller pool's row taken by another slot)
    are filled from `store` (a PrefixFeatureStore: the rows recorded when that prefix was computed;
    meta["prefix_filled_rows"] counts them); what it does not hold is a gap: zero features, out of the loss mask,
    listed in meta["feature_gaps"]. The record's own rows then go into the store. A hit the scheduler already
    filled from the feature pool (fin.start 0, fin.cached > 0) is counted in meta["prefix_pool_rows"].
    """
    from trainer.replay import ReplayRecord

    fin.resolve()
    n_tokens = len(fin.token_ids)
    if fin.rows is None or not fin.rows.shape[0]:
        return None
    start = fin.start
    own = fin.covered[:max(0, n_tokens - start)].to(torch.bool)
    hits = own.nonzero()
    if not hits.numel():
        return None
    end = start + int(hits[-1]) + 1
    covered = torch.zeros(end, dtype=torch.bool)
    covered[start:] = own[:end - start]
    features = torch.zeros(end, fin.rows.shape[1], dtype=fin.rows.dtype)
    features[start:] = fin.rows[:end - start]
    features[~covered] = 0                           # a row that is not this position's: never trained on
    pool_rows = int(covered[start:min(fin.cached, end)].sum()) if fin.cached > start else 0
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
            "prefix_filled_rows": filled, "prefix_pool_rows": pool_rows, "source": "online"}
    return ReplayRecord(input_ids=input_ids, features=features, positions=positions,
                        loss_mask=loss_mask, meta=meta)
