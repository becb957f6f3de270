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
