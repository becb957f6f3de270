"""Pure-PyTorch versions of the small Triton index kernels SGLang launches on the serving path."""
from __future__ import annotations

import torch


def speculative_cache_locs(*, req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                           start_offset: torch.Tensor, end_offset: torch.Tensor, batch_size: int,
                           draft_token_num: int, device) -> torch.Tensor:
    """out[b * draft_token_num + i] = req_to_token[req_pool_indices[b], start_offset[b] + i]
    (in-tree: `kernels/ops/speculative/cache_locs.py` `assign_extend_cache_locs`)."""
    cols = start_offset[:batch_size].long()[:, None] + torch.arange(draft_token_num, device=req_to_token.device)
    rows = req_pool_indices[:batch_size].long()[:, None].expand_as(cols)
    return req_to_token[rows, cols].reshape(-1).to(torch.int64)


def assign_req_to_token_pool(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                             start_offset: torch.Tensor, end_offset: torch.Tensor,
                             out_cache_loc: torch.Tensor, batch_size: int) -> None:
    """req_to_token[req_pool_indices[b], start[b]:end[b]] = the b-th run of out_cache_loc
    (in-tree: `srt/mem_cache/allocation.py` `assign_req_to_token_pool_func`, a Triton kernel)."""
    starts = start_offset[:batch_size].tolist()
    ends = end_offset[:batch_size].tolist()
    rows = req_pool_indices[:batch_size].tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[pos:pos + n].to(req_to_token.dtype)
        pos += n


def assign_draft_cache_locs_contiguous(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                       seq_lens: torch.Tensor, out_cache_loc: torch.Tensor, topk: int, num_cols: int,
                                       positions: torch.Tensor | None = None, mrope: torch.Tensor | None = None) -> None:
    """out_cache_loc[b * topk * num_cols + i] = req_to_token[req_pool_indices[b], seq_lens[b] + i] for
    i < topk * num_cols; positions[b * topk + j] (and each mRoPE row) = seq_lens[b] (in-tree:
    `kernels/ops/speculative/cache_locs.py` `assign_draft_cache_locs_contiguous_func`, a Triton kernel)."""
    bs, n = seq_lens.shape[0], topk * num_cols
    cols = seq_lens.long()[:, None] + torch.arange(n, device=req_to_token.device)
    slots = req_to_token[req_pool_indices.long()[:, None].expand_as(cols), cols]
    out_cache_loc[:bs * n] = slots.reshape(-1).to(out_cache_loc.dtype)
    if positions is not None:
        starts = seq_lens.repeat_interleave(topk)
        positions[:bs * topk] = starts.to(positions.dtype)
        if mrope is not None:
            mrope.view(3, -1)[:, :bs * topk] = starts.to(mrope.dtype)


def fill_bonus_tokens(accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor,
                      accept_stride: int, batch_size: int) -> None:
    """bonus_tokens[b] = accept_tokens.flat[accept_stride * b + accept_lens[b] - 1] (the last accepted slot;
    in-tree: `kernels/ops/speculative/eagle.py` `fill_bonus_tokens_func`, a Triton kernel)."""
    idx = accept_stride * torch.arange(batch_size, device=accept_lens.device) + accept_lens[:batch_size].long() - 1
    bonus_tokens[:batch_size] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


def fill_accept_out_cache_loc(accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
                              accept_out_cache_loc: torch.Tensor, size: int) -> None:
    """The cache slots of the accepted draft positions, compacted in order: accept_out_cache_loc[k] =
    out_cache_loc[src] for the k-th entry src != -1 of accept_index (in-tree: `kernels/ops/speculative/eagle.py`
    `fill_accept_out_cache_loc_func`, a Triton kernel)."""
    src = accept_index.reshape(-1)[:size]
    src = src[src != -1].long()
    accept_out_cache_loc[:src.numel()] = out_cache_loc[src].to(accept_out_cache_loc.dtype)


def fill_front_out_cache_loc(num_front: torch.Tensor, out_cache_loc: torch.Tensor,
                             front_out_cache_loc: torch.Tensor) -> None:
    """The first num_front[i] slots of request i's window of out_cache_loc, packed back to back (in-tree:
    `kernels/ops/speculative/cache_locs.py` `fill_front_out_cache_loc_func`, a Triton kernel)."""
    bs = num_front.numel()
    window = out_cache_loc.view(bs, -1)
    pos = 0
    for i, n in enumerate(num_front.tolist()):
        front_out_cache_loc[pos:pos + n] = window[i, :n].to(front_out_cache_loc.dtype)
        pos += n
