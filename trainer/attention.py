"""DFlash training attention: one entry point, a plain PyTorch reference, and (when present) the
Triton kernel from `spec_kernels.block_attention` behind it.

Layout (padded with lengths):
    q        [batch, n_q_heads,  N*B,     head_dim]   the N draft blocks of B tokens each
    k, v     [batch, n_kv_heads, S + N*B, head_dim]   [context (projected target features) ; block tokens]
    anchors  [batch, N] int                            block j sees context positions < anchors[:, j]
                                                       and every token of block j; anchor < 0 marks a
                                                       padding block (its rows attend to nothing: output 0)
S is the padded context length of the batch; a shorter sequence simply has smaller anchors.
n_kv_heads must divide n_q_heads (GQA).
"""
from __future__ import annotations

import math

import torch


def block_attention_mask(anchors: torch.Tensor, ctx_len: int, block_size: int,
                         causal_in_block: bool = False) -> torch.Tensor:
    """Boolean mask [batch, N*B, S + N*B]: True where query row may attend to key column."""
    batch, n_blocks = anchors.shape
    device = anchors.device
    q_block = torch.arange(n_blocks * block_size, device=device) // block_size      # [NB]
    q_slot = torch.arange(n_blocks * block_size, device=device) % block_size        # [NB]
    anchor_per_row = anchors[:, q_block]                                             # [batch, NB]
    ctx_pos = torch.arange(ctx_len, device=device)
    ctx_visible = ctx_pos[None, None, :] < anchor_per_row[:, :, None]                # [batch, NB, S]
    k_block = torch.arange(n_blocks * block_size, device=device) // block_size
    k_slot = torch.arange(n_blocks * block_size, device=device) % block_size
    blk_visible = q_block[:, None] == k_block[None, :]                               # [NB, NB]
    if causal_in_block:
        blk_visible = blk_visible & (k_slot[None, :] <= q_slot[:, None])
    blk_visible = blk_visible[None].expand(batch, -1, -1)
    mask = torch.cat([ctx_visible, blk_visible], dim=-1)
    return mask & (anchor_per_row >= 0)[:, :, None]                                  # padding blocks: nothing


def block_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor,
                              block_size: int, *, causal_in_block: bool = False,
                              scale: float | None = None) -> torch.Tensor:
    """Dense-mask attention in fp32; the oracle every kernel is tested against. Returns q's dtype."""
    batch, n_q_heads, n_rows, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if n_rows != anchors.shape[1] * block_size:
        raise ValueError(f"q has {n_rows} rows but anchors {tuple(anchors.shape)} x block_size {block_size} "
                         f"= {anchors.shape[1] * block_size}")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_q_heads={n_q_heads}")
    ctx_len = k.shape[2] - n_rows
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    group = n_q_heads // n_kv_heads
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale                   # [batch, Hq, NB, S+NB]
    mask = block_attention_mask(anchors, ctx_len, block_size, causal_in_block)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                            # all-masked rows -> 0
    return torch.matmul(probs, vf).to(q.dtype)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, block_size: int,
                    *, causal_in_block: bool = False, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """backend: "reference", "triton", or "auto" (Triton on CUDA tensors when the kernel imports)."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"unknown attention backend {backend!r}; expected auto, reference or triton")
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "reference"
    if backend == "triton":
        from spec_kernels.block_attention import block_attention_triton
        return block_attention_triton(q, k, v, anchors, block_size, causal_in_block=causal_in_block, scale=scale)
    return block_attention_reference(q, k, v, anchors, block_size, causal_in_block=causal_in_block, scale=scale)


def _triton_available() -> bool:
    try:
        import spec_kernels.block_attention  # noqa: F401
    except ImportError:
        return False
    return True
