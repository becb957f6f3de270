"""DFlash block attention: Triton forward / backward kernels, autograd function, PyTorch reference and
the `block_attention` dispatcher the DFlash draft calls.  Design, tiles and numerics: docs/kernels.md.

    q        [batch, n_q_heads,  N*B,     head_dim]   N draft blocks of B tokens each ("rows")
    k, v     [batch, n_kv_heads, S + N*B, head_dim]   [context of length S ; the N*B block tokens]
    anchors  [batch, N] int                           block j sees context keys < anchors[:, j] and every
                                                      token of block j (bidirectional, or causal inside the
                                                      block with causal_in_block=True); anchor < 0 marks a
                                                      padding block: its rows attend to nothing (out 0, grad 0)

S is the padded context length of the batch (a shorter sequence simply has smaller anchors; an anchor
above S behaves like S).  n_kv_heads must divide n_q_heads (GQA).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (_KEYS_BLOCK, _KEYS_CTX_FULL, _KEYS_CTX_PREFIX, LOG2E, TileConfig, _check_dtype_device_head_dim,
                     _dkdv_query_tile, _dot_precision, _dq_key_sweep, _fwd_key_sweep, _head_dim_block, _kv_head_bases,
                     _load_query_rows, _load_tile, _program_batch_head, _q_head_bases, _row_anchor, _row_strides,
                     _softmax_bwd_delta, _span, _store_tile, _unit_last_dim, default_tiles)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile_key_ranges(row_block, anchor, row_valid, ctx_len, n_blocks, BLOCK_N: tl.constexpr):
    """What a query tile has to look at (everything else is skipped): context keys [0, ctx_all) need no
    mask, [ctx_all, ctx_hi) the prefix mask; block keys [first_block * B, last_block_end * B)."""
    ctx_hi = tl.maximum(tl.max(anchor, 0), 0)                               # largest anchor (clamped to S)
    ctx_all = tl.minimum(tl.min(tl.where(row_valid, anchor, ctx_len), 0), ctx_hi)
    ctx_all = (ctx_all // BLOCK_N) * BLOCK_N                                # keys < ctx_all: no mask needed
    first_block = tl.min(tl.where(row_valid, row_block, n_blocks), 0)
    last_block_end = tl.max(tl.where(row_valid, row_block + 1, 0), 0)       # <= first_block if none valid
    return ctx_all, ctx_hi, first_block, last_block_end


@triton.jit
def _block_attn_fwd_kernel(
    Q, K, V, Anchor, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_ab, stride_an,
    n_q_heads, ctx_len, n_rows, n_blocks, block_size, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_IN_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch_head, batch, q_head = _program_batch_head(n_q_heads)
    kv_head = q_head // GROUP
    rows, row_in = _span(tl.program_id(0) * BLOCK_M, n_rows, BLOCK_M)     # [BLOCK_M] query rows
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    row_block, anchor = _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an)
    row_valid = anchor >= 0                                                 # real row of a real block
    ctx_all, ctx_hi, first_block, last_block_end = _tile_key_ranges(row_block, anchor, row_valid, ctx_len,
                                                                    n_blocks, BLOCK_N)
    q = _load_tile(Q + batch * stride_qb + q_head * stride_qh, rows, row_in, dims, dim_in, stride_qm)
    K_head, V_head = _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   0, ctx_all, 0, ctx_len, rows, row_block, anchor, dims, dim_in,
                                   block_size, qk_scale_log2, _KEYS_CTX_FULL, CAUSAL_IN_BLOCK, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   ctx_all, ctx_hi, 0, ctx_len, rows, row_block, anchor, dims, dim_in,
                                   block_size, qk_scale_log2, _KEYS_CTX_PREFIX, CAUSAL_IN_BLOCK, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   first_block * block_size, last_block_end * block_size, ctx_len, n_rows,
                                   rows, row_block, anchor, dims, dim_in,
                                   block_size, qk_scale_log2, _KEYS_BLOCK, CAUSAL_IN_BLOCK, BLOCK_N, DOT_PRECISION)

    # Every valid row sees at least its own block's first token, so l_i > 0 there.
    l_safe = tl.where(row_valid, l_i, 1.0)
    out = tl.where(row_valid[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(row_valid, m_i + tl.log2(l_safe), float("inf"))         # +inf: p = 0 in the backward
    _store_tile(Out + batch * stride_ob + q_head * stride_oh, rows, row_in, dims, dim_in, stride_om, out)
    tl.store(Lse + batch_head.to(tl.int64) * n_rows + rows, lse, mask=row_in)


@triton.jit
def _block_attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, Anchor, TileMaxAnchor, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ab, stride_an,
    n_q_heads, n_kv_heads, ctx_len, n_rows, n_blocks, block_size, n_q_tiles, qk_scale, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_IN_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile_n = tl.program_id(0)                      # context key tiles first, then block key tiles
    _, batch, kv_head = _program_batch_head(n_kv_heads)
    n_ctx_tiles = tl.cdiv(ctx_len, BLOCK_N)
    is_ctx_tile = tile_n < n_ctx_tiles
    section_start = tl.where(is_ctx_tile, 0, ctx_len)                        # first key of this tile's section
    key_lo = tl.where(is_ctx_tile, tile_n, tile_n - n_ctx_tiles) * BLOCK_N   # first key, section-relative
    keys, key_in = _span(key_lo, tl.where(is_ctx_tile, ctx_len, n_rows), BLOCK_N)  # section-relative
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    K_head, V_head = _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh)
    k = _load_tile(K_head, section_start + keys, key_in, dims, dim_in, stride_kn)     # [BLOCK_N, BLOCK_D]
    v = _load_tile(V_head, section_start + keys, key_in, dims, dim_in, stride_vn)     # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for q_head in range(kv_head * GROUP, kv_head * GROUP + GROUP):        # GQA: sum over the group here
        Q_head, DO_head, Lse_head, Delta_head = _q_head_bases(Q, DOut, Lse, Delta, batch, q_head, n_q_heads,
                                                              n_rows, stride_qb, stride_qh, stride_gb, stride_gh)
        if is_ctx_tile:
            # Any query tile may see this context tile (anchors need not be sorted): skip the ones
            # whose largest anchor is at or below the tile's first key.
            for tile_m in range(0, n_q_tiles):
                tile_max_anchor = tl.load(TileMaxAnchor + batch * n_q_tiles + tile_m)
                if tile_max_anchor > key_lo:
                    dk, dv = _dkdv_query_tile(dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, Anchor, batch,
                                              stride_qm, stride_gm, stride_ab, stride_an,
                                              tile_m * BLOCK_M, keys, dims, dim_in, n_rows, block_size,
                                              qk_scale_log2, _KEYS_CTX_PREFIX, CAUSAL_IN_BLOCK, BLOCK_M, DOT_PRECISION)
        else:
            # Block keys are seen only by the rows of their own blocks.
            first_block = key_lo // block_size
            last_block_end = tl.minimum((key_lo + BLOCK_N - 1) // block_size + 1, n_blocks)
            for row_lo in range(first_block * block_size, last_block_end * block_size, BLOCK_M):
                dk, dv = _dkdv_query_tile(dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, Anchor, batch,
                                          stride_qm, stride_gm, stride_ab, stride_an,
                                          row_lo, keys, dims, dim_in, n_rows, block_size,
                                          qk_scale_log2, _KEYS_BLOCK, CAUSAL_IN_BLOCK, BLOCK_M, DOT_PRECISION)

    _store_tile(DK + batch * stride_dkb + kv_head * stride_dkh, section_start + keys, key_in, dims, dim_in,
                stride_dkn, dk * qk_scale)
    _store_tile(DV + batch * stride_dvb + kv_head * stride_dvh, section_start + keys, key_in, dims, dim_in,
                stride_dvn, dv)


@triton.jit
def _block_attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, Anchor, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ab, stride_an,
    n_q_heads, ctx_len, n_rows, n_blocks, block_size, qk_scale, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_IN_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch_head, batch, q_head = _program_batch_head(n_q_heads)
    kv_head = q_head // GROUP
    rows, row_in = _span(tl.program_id(0) * BLOCK_M, n_rows, BLOCK_M)
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    row_block, anchor = _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an)
    row_valid = anchor >= 0
    ctx_all, ctx_hi, first_block, last_block_end = _tile_key_ranges(row_block, anchor, row_valid, ctx_len,
                                                                    n_blocks, BLOCK_N)
    q, dout, lse, delta = _load_query_rows(Q + batch * stride_qb + q_head * stride_qh,
                                           DOut + batch * stride_gb + q_head * stride_gh,
                                           Lse + batch_head.to(tl.int64) * n_rows,
                                           Delta + batch_head.to(tl.int64) * n_rows,
                                           rows, row_in, dims, dim_in, stride_qm, stride_gm)
    K_head, V_head = _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       0, ctx_all, 0, ctx_len, rows, row_block, anchor, dims, dim_in,
                       block_size, qk_scale_log2, _KEYS_CTX_FULL, CAUSAL_IN_BLOCK, BLOCK_N, DOT_PRECISION)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       ctx_all, ctx_hi, 0, ctx_len, rows, row_block, anchor, dims, dim_in,
                       block_size, qk_scale_log2, _KEYS_CTX_PREFIX, CAUSAL_IN_BLOCK, BLOCK_N, DOT_PRECISION)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       first_block * block_size, last_block_end * block_size, ctx_len, n_rows,
                       rows, row_block, anchor, dims, dim_in,
                       block_size, qk_scale_log2, _KEYS_BLOCK, CAUSAL_IN_BLOCK, BLOCK_N, DOT_PRECISION)
    dq = tl.where(row_valid[:, None], dq * qk_scale, 0.0)
    _store_tile(DQ + batch * stride_dqb + q_head * stride_dqh, rows, row_in, dims, dim_in, stride_dqm, dq)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, anchors, block_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, seq, head_dim]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    batch, n_q_heads, n_rows, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
    n_kv_heads = k.shape[1]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_q_heads={n_q_heads}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if anchors.dim() != 2 or anchors.shape[0] != batch:
        raise ValueError(f"anchors must be [batch={batch}, N], got {tuple(anchors.shape)}")
    if anchors.dtype.is_floating_point or anchors.dtype == torch.bool or anchors.is_complex():
        raise ValueError(f"anchors must be an integer tensor, got {anchors.dtype}")
    if n_rows != anchors.shape[1] * block_size:
        raise ValueError(f"q has {n_rows} rows but anchors {tuple(anchors.shape)} x block_size {block_size} "
                         f"= {anchors.shape[1] * block_size}")
    if k.shape[2] < n_rows:
        raise ValueError(f"k/v have {k.shape[2]} positions, fewer than the {n_rows} block tokens of q")
    _check_dtype_device_head_dim(dict(q=q, k=k, v=v, anchors=anchors), head_dim)


def _tile_max_anchor(anchor: torch.Tensor, block_size: int, block_m: int) -> torch.Tensor:
    """[batch, n_q_tiles] int32: the largest (clamped) anchor among each query tile's rows, -1 if none."""
    batch, n_blocks = anchor.shape
    n_rows = n_blocks * block_size
    n_q_tiles = triton.cdiv(n_rows, block_m)
    row_anchor = anchor.repeat_interleave(block_size, dim=1)                        # [batch, N*B]
    row_anchor = torch.nn.functional.pad(row_anchor, (0, n_q_tiles * block_m - n_rows), value=-1)
    return row_anchor.view(batch, n_q_tiles, block_m).amax(dim=-1).to(torch.int32).contiguous()


def _forward(q, k, v, anchor, block_size, causal_in_block, scale, tiles):
    batch, n_q_heads, n_rows, head_dim = q.shape
    n_kv_heads = k.shape[1]
    ctx_len = k.shape[2] - n_rows
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, n_q_heads, n_rows, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(n_rows, tiles.fwd.block_m), batch * n_q_heads)
    _block_attn_fwd_kernel[grid](
        q, k, v, anchor, out, lse,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(out), *anchor.stride(),
        n_q_heads, ctx_len, n_rows, anchor.shape[1], block_size, scale * LOG2E,
        GROUP=n_q_heads // n_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_head_dim_block(head_dim),
        CAUSAL_IN_BLOCK=causal_in_block, DOT_PRECISION=_dot_precision(q.dtype), **tiles.fwd.launch(),
    )
    return out, lse


def _backward(grad_out, q, k, v, out, lse, anchor, block_size, causal_in_block, scale, tiles, need_dq):
    batch, n_q_heads, n_rows, head_dim = q.shape
    n_kv_heads = k.shape[1]
    ctx_len = k.shape[2] - n_rows
    n_blocks = anchor.shape[1]
    common = dict(GROUP=n_q_heads // n_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_head_dim_block(head_dim),
                  CAUSAL_IN_BLOCK=causal_in_block, DOT_PRECISION=_dot_precision(q.dtype))

    delta = _softmax_bwd_delta(out, grad_out)                                         # [batch, Hq, N*B]

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    n_q_tiles = triton.cdiv(n_rows, tiles.dkdv.block_m)                                 # inner query tiles
    tile_max_anchor = _tile_max_anchor(anchor, block_size, tiles.dkdv.block_m)          # [batch, n_q_tiles]
    n_key_tiles = triton.cdiv(ctx_len, tiles.dkdv.block_n) + triton.cdiv(n_rows, tiles.dkdv.block_n)
    _block_attn_bwd_dkdv_kernel[(n_key_tiles, batch * n_kv_heads)](
        q, k, v, grad_out, lse, delta, anchor, tile_max_anchor, dk, dv,
        *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out),
        *_row_strides(dk), *_row_strides(dv), *anchor.stride(),
        n_q_heads, n_kv_heads, ctx_len, n_rows, n_blocks, block_size, n_q_tiles, scale, scale * LOG2E,
        **common, **tiles.dkdv.launch())

    dq = None
    if need_dq:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        _block_attn_bwd_dq_kernel[(triton.cdiv(n_rows, tiles.dq.block_m), batch * n_q_heads)](
            q, k, v, grad_out, lse, delta, anchor, dq,
            *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out), *_row_strides(dq),
            *anchor.stride(),
            n_q_heads, ctx_len, n_rows, n_blocks, block_size, scale, scale * LOG2E,
            **common, **tiles.dq.launch())
    return dq, dk, dv


class BlockAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, anchor, block_size, causal_in_block, scale, tiles):
        out, lse = _forward(q, k, v, anchor, block_size, causal_in_block, scale, tiles)
        ctx.save_for_backward(q, k, v, out, lse, anchor)
        ctx.block_size, ctx.causal_in_block, ctx.scale, ctx.tiles = block_size, causal_in_block, scale, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, anchor = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_last_dim(grad_out), q, k, v, out, lse, anchor, ctx.block_size,
                               ctx.causal_in_block, ctx.scale, ctx.tiles, need_dq=ctx.needs_input_grad[0])
        return dq, dk, dv, None, None, None, None, None


def block_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor,
                           block_size: int, *, causal_in_block: bool = False, scale: float | None = None,
                           tiles: TileConfig | None = None) -> torch.Tensor:
    """DFlash block attention (layout in the module docstring); differentiable w.r.t. q, k, v.

    Returns [batch, n_q_heads, N*B, head_dim] in q's dtype. `tiles` overrides `default_tiles(head_dim)`.
    """
    _check_inputs(q, k, v, anchors, block_size)
    batch, n_q_heads, n_rows, head_dim = q.shape
    ctx_len = k.shape[2] - n_rows
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    tiles = tiles if tiles is not None else default_tiles(head_dim, q.dtype)
    if n_rows == 0 or batch == 0 or n_q_heads == 0:
        return q.new_zeros(q.shape) + 0.0 * (q.sum() + k.sum() + v.sum())  # keeps the graph connected
    # Clamp anchors to [-1, S]: beyond S the context simply ends, negative means padding block.
    anchor = anchors.to(torch.int32).clamp(min=-1, max=ctx_len).contiguous()
    q, k, v = _unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v)
    return BlockAttentionFunction.apply(q, k, v, anchor, block_size, bool(causal_in_block), scale, tiles)


# --------------------------------------------------------------------------------------------------
# PyTorch reference and dispatcher
# --------------------------------------------------------------------------------------------------
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
    blk_visible = q_block[:, None] == q_block[None, :]                               # [NB, NB]
    if causal_in_block:
        blk_visible = blk_visible & (q_slot[None, :] <= q_slot[:, None])
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
    """backend: "reference", "triton", or "auto" (the Triton kernel on CUDA tensors, the reference otherwise)."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"unknown attention backend {backend!r}; expected auto, reference or triton")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        return block_attention_triton(q, k, v, anchors, block_size, causal_in_block=causal_in_block, scale=scale)
    return block_attention_reference(q, k, v, anchors, block_size, causal_in_block=causal_in_block, scale=scale)
