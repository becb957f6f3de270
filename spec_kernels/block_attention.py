"""Triton block attention for DFlash draft training: forward, backward (dq, dk, dv) and autograd glue.

Layout (same as `trainer.attention`, which holds the plain PyTorch oracle):

    q        [batch, n_q_heads,  N*B,     head_dim]   N draft blocks of B tokens each ("rows")
    k, v     [batch, n_kv_heads, S + N*B, head_dim]   [context of length S ; the N*B block tokens]
    anchors  [batch, N] int                           block j sees context keys < anchors[:, j] and every
                                                      token of block j (bidirectional, or causal inside the
                                                      block with causal_in_block=True); anchor < 0 marks a
                                                      padding block: its rows attend to nothing (out 0, grad 0)

An anchor larger than S behaves like S (the reference's mask simply has no column >= S in the context part).

Key space is split in two "sections" and every kernel walks them separately:
  * the context section, keys [0, S): block j sees the prefix [0, anchor_j);
  * the block section, keys S + [0, N*B): block j sees only its own B keys S + [j*B, (j+1)*B).

Forward (one program per (query tile of BLOCK_M rows, batch*q_head), flash-attention-2 online softmax):
  * context keys: only key tiles below the tile's largest anchor are visited, so a tile does
    O(max anchor in tile) context work instead of O(S).  Key tiles below the tile's smallest anchor
    (rounded down to BLOCK_N) are fully visible and run without any mask; the few tiles between the
    smallest and the largest anchor apply the per-row prefix mask `key < anchor[row]`.
  * block keys: only the key range covering the blocks the tile's rows belong to, i.e.
    [S + first_block*B, S + (last_block+1)*B), with the mask `key_block == row_block`
    (and `key_slot <= row_slot` for causal_in_block).
  * tiles made only of padding rows do no work at all.
  The logsumexp of every row is saved (base-2 domain, fp32) for the backward; padding rows save +inf,
  so that exp2(score - lse) is exactly 0 for them in every backward kernel.

  Any block size B works (rows carry their block id `row // B`; nothing assumes alignment), but the
  skip logic is tightest when a query tile covers whole blocks: with B a power of two and BLOCK_M a
  power of two, either B divides BLOCK_M or BLOCK_M divides B, so that is automatic.  For B that is not a
  power of two (e.g. 12) a tile may straddle two blocks; it is still exact, just slightly wasteful.

Backward (flash-attention-2 style, no atomics):
  1. `_block_attn_bwd_delta_kernel`: delta[row] = sum_d out[row, d] * dout[row, d]   (fp32).
  2. `_block_attn_bwd_dkdv_kernel`: one program per (key tile of BLOCK_N keys, batch*kv_head).
     dk/dv accumulate in fp32 registers over every q head of the GQA group and every query tile that
     can see the key tile, then are written once (so GQA needs no atomics):
       - context key tile [n0, n0+BLOCK_N): loops over all query tiles but skips (a scalar compare)
         the ones whose largest anchor is <= n0; the per-tile max anchors are a tiny
         [batch, n_q_tiles] int32 tensor computed in PyTorch.  Anchors need not be sorted.
       - block key tile: only the query rows of the blocks the tile covers.
  3. `_block_attn_bwd_dq_kernel`: one program per (query tile, batch*q_head), the same key iteration
     (and skipping) as the forward, accumulating dq in fp32.

Tile sizes (`TileConfig` = one `KernelTiles(block_m, block_n, warps, stages)` per kernel, chosen per
head_dim by `default_tiles`, overridable with `tiles=`).  block_m = query rows, block_n = keys:
                     forward          dk/dv (keys outer)   dq (rows outer)      fp16/bf16
    head_dim <= 64 : 64x64  w4 s3     32x128 w8 s2         64x32 w4 s2
    head_dim <= 128: 64x64  w8 s3     32x64  w8 s2         64x32 w8 s3
    head_dim <= 256: 64x32  w8 s2     32x32  w8 s1         32x32 w4 s1
  (EAGLE3 differs at head_dim 128: dk/dv 64x32, and 256: forward 32x32 w4, dq 32x32 w8.)
  The forward keeps BLOCK_M at 64 rather than the usual 128 because a query tile's context work is set
  by its largest anchor: smaller tiles waste less when neighbouring blocks have different anchors.
  Every fp16/bf16 entry compiles for sm_90 without register spills (checked with cuobjdump on the
  cubin, with the 16-divisible strides the JIT specialises on).  These are starting points, not yet
  timed on hardware: benchmarks/bench_block_attention.py is where to compare alternatives.  fp32 uses
  16x32 tiles everywhere (a correctness mode: "ieee" fp32 dots run on CUDA cores).  head_dim is padded
  up to a power of two (>= 16) inside the kernels with masked loads, so any head_dim <= 256 is accepted;
  head_dim itself must be contiguous (unit stride; the wrapper copies otherwise, other strides are
  free).  Under TRITON_INTERPRET=1 (CPU) 16x16 tiles are used.

EAGLE3 training-time-test attention (`eagle3_ttt_attention_triton`, same file, same building blocks):
    q     [batch, n_q_heads,  L,         head_dim]   queries of unrolled step t
    k, v  [batch, n_kv_heads, n_steps*L, head_dim]   [keys of step 0 ; step 1 ; ... ; step t]
  row i sees step-0 keys 0..i (causal) and key i of every later step (the same-position diagonal).
  Step-0 keys use the DFlash sweep with mask `key <= row` (key tiles past the query tile are skipped,
  key tiles below it run unmasked); the diagonal is one key per row and step, so it is a row-wise dot
  product (no tl.dot, no wasted [BLOCK_M, BLOCK_N] tile).  Backward: the dk/dv kernel's programs over
  step-0 key tiles sweep only query tiles at or after the key tile; programs over later steps' key
  tiles touch only the matching rows.  GQA is summed in registers as for DFlash.

Numerics: dots accumulate in fp32, softmax statistics are fp32, inputs may be fp16, bf16 or fp32
(fp32 dots use input_precision="ieee", i.e. no TF32).  Output and gradients come back in the input dtype.
Under TRITON_INTERPRET=1 bf16 dots are done on fp32-upcast operands (see `_dot`: the interpreter's own
bf16 dot is wrong), and the interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # 1 / ln(2): softmax runs in base 2 (exp2 is the fast instruction)

# Mask "mode" of a key sweep; constexpr so every variant compiles to its own straight-line loop.
_KEYS_CTX_FULL = tl.constexpr(0)    # context keys every valid row of the tile sees: no mask
_KEYS_CTX_PREFIX = tl.constexpr(1)  # context keys: key < anchor[row]
_KEYS_BLOCK = tl.constexpr(2)       # block keys: key_block == row_block (and key_slot <= row_slot if causal)
_KEYS_CAUSAL = tl.constexpr(3)      # EAGLE3 step-0 keys: key <= row (row_block/anchor unused)


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_PRECISION "upcast" (CPU interpreter + bf16 only) multiplies in
    fp32 instead: triton's interpreter multiplies bf16 operands as raw uint16 bit patterns (triton 3.x
    create_dot bug); upcasting bf16 -> fp32 first is exact, and matches the GPU's bf16 x bf16 -> fp32 dot."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _visible(rows, row_block, anchor, keys, block_size, MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: may query row `rows[i]` attend to key `keys[j]`?

    rows/row_block/anchor: [BLOCK_M]; keys: [BLOCK_N], relative to the start of their section
    (context position for _KEYS_CTX_PREFIX, block-token index for _KEYS_BLOCK).
    """
    if MODE == _KEYS_CTX_PREFIX:
        vis = keys[None, :] < anchor[:, None]                      # padding rows: anchor = -1 -> nothing
    elif MODE == _KEYS_CAUSAL:
        vis = keys[None, :] <= rows[:, None]
    else:
        key_block = keys // block_size
        vis = (key_block[None, :] == row_block[:, None]) & (anchor[:, None] >= 0)
        if CAUSAL_IN_BLOCK:
            vis = vis & (keys[None, :] <= rows[:, None])           # same block, so slot order == index order
    return vis


@triton.jit
def _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an):
    """Anchor of each query row's block ([BLOCK_M] int32); -1 for rows past the end."""
    row_block = rows // block_size
    anchor = tl.load(Anchor + batch * stride_ab + row_block * stride_an, mask=rows < n_rows, other=-1)
    return row_block, anchor


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                   key_lo, key_hi, section_start, n_section_keys, rows, row_block, anchor, dims, dim_in,
                   block_size, qk_scale_log2,
                   MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online-softmax over keys [key_lo, key_hi) of one section (keys relative to section_start)."""
    for n0 in range(key_lo, key_hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)                                   # [BLOCK_N]
        key_in = keys < n_section_keys
        k_t = tl.load(K_head + (section_start + keys)[None, :] * stride_kn + dims[:, None],
                      mask=key_in[None, :] & dim_in[:, None], other=0.0)   # [BLOCK_D, BLOCK_N]
        v = tl.load(V_head + (section_start + keys)[:, None] * stride_vn + dims[None, :],
                    mask=key_in[:, None] & dim_in[None, :], other=0.0)     # [BLOCK_N, BLOCK_D]
        scores = _dot(q, k_t, DOT_PRECISION) * qk_scale_log2   # [BLOCK_M, BLOCK_N]
        if MODE != _KEYS_CTX_FULL:
            scores = tl.where(_visible(rows, row_block, anchor, keys, block_size, MODE, CAUSAL_IN_BLOCK),
                              scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))                          # m_i starts finite: no inf-inf
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


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
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_q_heads).to(tl.int64)
    q_head = batch_head % n_q_heads
    kv_head = q_head // GROUP

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)                         # [BLOCK_M] query rows
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < HEAD_DIM
    row_block, anchor = _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an)
    row_valid = anchor >= 0                                                 # real row of a real block

    # What this tile has to look at (everything else is skipped).
    ctx_hi = tl.maximum(tl.max(anchor, 0), 0)                               # largest anchor (clamped to S)
    ctx_all = tl.minimum(tl.min(tl.where(row_valid, anchor, ctx_len), 0), ctx_hi)
    ctx_all = (ctx_all // BLOCK_N) * BLOCK_N                                # keys < ctx_all: no mask needed
    first_block = tl.min(tl.where(row_valid, row_block, n_blocks), 0)
    last_block_end = tl.max(tl.where(row_valid, row_block + 1, 0), 0)       # <= first_block if none valid

    q = tl.load(Q + batch * stride_qb + q_head * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=(rows < n_rows)[:, None] & dim_in[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh

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
    tl.store(Out + batch * stride_ob + q_head * stride_oh + rows[:, None] * stride_om + dims[None, :],
             out.to(Out.dtype.element_ty), mask=(rows < n_rows)[:, None] & dim_in[None, :])
    tl.store(Lse + batch_head.to(tl.int64) * n_rows + rows, lse, mask=rows < n_rows)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _block_attn_bwd_delta_kernel(Out, DOut, Delta,
                                 stride_ob, stride_oh, stride_om,
                                 stride_gb, stride_gh, stride_gm,
                                 n_q_heads, n_rows,
                                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[row] = <out[row], dout[row]> in fp32: the softmax-backward row correction."""
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_q_heads).to(tl.int64)
    head = batch_head % n_q_heads
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (dims < HEAD_DIM)[None, :]
    out = tl.load(Out + batch * stride_ob + head * stride_oh + rows[:, None] * stride_om + dims[None, :],
                  mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOut + batch * stride_gb + head * stride_gh + rows[:, None] * stride_gm + dims[None, :],
                   mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + batch_head.to(tl.int64) * n_rows + rows, tl.sum(out * dout, 1), mask=rows < n_rows)


@triton.jit
def _dkdv_query_tile(dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, Anchor, batch,
                     stride_qm, stride_gm, stride_ab, stride_an,
                     row_lo, keys, dims, dim_in, n_rows, block_size, qk_scale_log2,
                     MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Add one query tile's (rows row_lo + [0, BLOCK_M)) contribution to a key tile's dk, dv."""
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    if MODE == _KEYS_CAUSAL:
        row_block, anchor = rows, rows                                      # unused by the causal mask
    else:
        row_block, anchor = _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an)
    q = tl.load(Q_head + rows[:, None] * stride_qm + dims[None, :],
                mask=row_in[:, None] & dim_in[None, :], other=0.0)         # [BLOCK_M, BLOCK_D]
    dout = tl.load(DO_head + rows[:, None] * stride_gm + dims[None, :],
                   mask=row_in[:, None] & dim_in[None, :], other=0.0)      # [BLOCK_M, BLOCK_D]
    lse = tl.load(Lse_head + rows, mask=row_in, other=float("inf"))         # [BLOCK_M]
    delta = tl.load(Delta_head + rows, mask=row_in, other=0.0)              # [BLOCK_M]

    scores_t = _dot(k, tl.trans(q), DOT_PRECISION) * qk_scale_log2   # [BLOCK_N, BLOCK_M]
    p_t = tl.exp2(scores_t - lse[None, :])
    vis_t = tl.trans(_visible(rows, row_block, anchor, keys, block_size, MODE, CAUSAL_IN_BLOCK))
    p_t = tl.where(vis_t, p_t, 0.0)
    dv += _dot(p_t.to(dout.dtype), dout, DOT_PRECISION)                  # [BLOCK_N, BLOCK_D]
    dp_t = _dot(v, tl.trans(dout), DOT_PRECISION)                        # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)                      # [BLOCK_N, BLOCK_D], x scale later
    return dk, dv


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
    batch_head = tl.program_id(1)
    batch = (batch_head // n_kv_heads).to(tl.int64)
    kv_head = batch_head % n_kv_heads
    n_ctx_tiles = tl.cdiv(ctx_len, BLOCK_N)
    is_ctx_tile = tile_n < n_ctx_tiles
    section_start = tl.where(is_ctx_tile, 0, ctx_len)                        # first key of this tile's section
    key_lo = tl.where(is_ctx_tile, tile_n, tile_n - n_ctx_tiles) * BLOCK_N   # first key, section-relative
    n_section_keys = tl.where(is_ctx_tile, ctx_len, n_rows)
    keys = key_lo + tl.arange(0, BLOCK_N)                                   # [BLOCK_N], section-relative
    key_in = keys < n_section_keys
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < HEAD_DIM
    kv_mask = key_in[:, None] & dim_in[None, :]
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + (section_start + keys)[:, None] * stride_kn
                + dims[None, :], mask=kv_mask, other=0.0)    # [BLOCK_N, BLOCK_D]
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + (section_start + keys)[:, None] * stride_vn
                + dims[None, :], mask=kv_mask, other=0.0)    # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for q_head in range(kv_head * GROUP, kv_head * GROUP + GROUP):        # GQA: sum over the group here
        batch_q_head = batch * n_q_heads + q_head
        Q_head = Q + batch * stride_qb + q_head * stride_qh
        DO_head = DOut + batch * stride_gb + q_head * stride_gh
        Lse_head = Lse + batch_q_head * n_rows
        Delta_head = Delta + batch_q_head * n_rows
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

    dk = dk * qk_scale
    tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + (section_start + keys)[:, None] * stride_dkn
             + dims[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + (section_start + keys)[:, None] * stride_dvn
             + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                  key_lo, key_hi, section_start, n_section_keys, rows, row_block, anchor, dims, dim_in,
                  block_size, qk_scale_log2,
                  MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    for n0 in range(key_lo, key_hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_in = keys < n_section_keys
        k = tl.load(K_head + (section_start + keys)[:, None] * stride_kn + dims[None, :],
                    mask=key_in[:, None] & dim_in[None, :], other=0.0)     # [BLOCK_N, BLOCK_D]
        v_t = tl.load(V_head + (section_start + keys)[None, :] * stride_vn + dims[:, None],
                      mask=key_in[None, :] & dim_in[:, None], other=0.0)   # [BLOCK_D, BLOCK_N]
        scores = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2   # [BLOCK_M, BLOCK_N]
        p = tl.exp2(scores - lse[:, None])                                  # padding rows: lse=+inf -> 0
        if MODE != _KEYS_CTX_FULL:
            p = tl.where(_visible(rows, row_block, anchor, keys, block_size, MODE, CAUSAL_IN_BLOCK), p, 0.0)
        dp = _dot(dout, v_t, DOT_PRECISION)                                 # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)                        # [BLOCK_M, BLOCK_D]
    return dq


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
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_q_heads).to(tl.int64)
    q_head = batch_head % n_q_heads
    kv_head = q_head // GROUP

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < HEAD_DIM
    row_block, anchor = _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an)
    row_valid = anchor >= 0
    ctx_hi = tl.maximum(tl.max(anchor, 0), 0)
    ctx_all = tl.minimum(tl.min(tl.where(row_valid, anchor, ctx_len), 0), ctx_hi)
    ctx_all = (ctx_all // BLOCK_N) * BLOCK_N
    first_block = tl.min(tl.where(row_valid, row_block, n_blocks), 0)
    last_block_end = tl.max(tl.where(row_valid, row_block + 1, 0), 0)

    row_mask = row_in[:, None] & dim_in[None, :]
    q = tl.load(Q + batch * stride_qb + q_head * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=row_mask, other=0.0)
    dout = tl.load(DOut + batch * stride_gb + q_head * stride_gh + rows[:, None] * stride_gm
                   + dims[None, :], mask=row_mask, other=0.0)
    lse = tl.load(Lse + batch_head.to(tl.int64) * n_rows + rows, mask=row_in, other=float("inf"))
    delta = tl.load(Delta + batch_head.to(tl.int64) * n_rows + rows, mask=row_in, other=0.0)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh

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
    tl.store(DQ + batch * stride_dqb + q_head * stride_dqh + rows[:, None] * stride_dqm + dims[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_mask)


# --------------------------------------------------------------------------------------------------
# EAGLE3 training-time-test attention (same building blocks)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _eagle3_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_q_heads, seq_len, n_steps, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_q_heads).to(tl.int64)
    q_head = batch_head % n_q_heads
    kv_head = q_head // GROUP

    row_lo = tile_m * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M)                                   # [BLOCK_M] positions
    row_in = rows < seq_len
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < HEAD_DIM
    row_mask = row_in[:, None] & dim_in[None, :]
    q = tl.load(Q + batch * stride_qb + q_head * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=row_mask, other=0.0)                                   # [BLOCK_M, BLOCK_D]
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Step-0 keys, causal: keys <= row_lo are seen by every row of the tile (no mask), keys past the
    # tile's last row by none (skipped).
    causal_all = ((row_lo + 1) // BLOCK_N) * BLOCK_N
    causal_hi = tl.minimum(row_lo + BLOCK_M, seq_len)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   0, causal_all, 0, seq_len, rows, rows, rows, dims, dim_in,
                                   1, qk_scale_log2, _KEYS_CTX_FULL, False, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   causal_all, causal_hi, 0, seq_len, rows, rows, rows, dims, dim_in,
                                   1, qk_scale_log2, _KEYS_CAUSAL, False, BLOCK_N, DOT_PRECISION)
    # Steps 1..n_steps-1: each row sees exactly one key per step, at its own position: a row-wise dot.
    for step in range(1, n_steps):
        diag = step * seq_len + rows
        k_diag = tl.load(K_head + diag[:, None] * stride_kn + dims[None, :], mask=row_mask, other=0.0)
        v_diag = tl.load(V_head + diag[:, None] * stride_vn + dims[None, :], mask=row_mask, other=0.0)
        score = tl.sum(q.to(tl.float32) * k_diag.to(tl.float32), 1) * qk_scale_log2   # [BLOCK_M]
        m_new = tl.maximum(m_i, score)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_diag.to(tl.float32)
        m_i = m_new

    l_safe = tl.where(row_in, l_i, 1.0)                                     # every real row sees key `row`
    tl.store(Out + batch * stride_ob + q_head * stride_oh + rows[:, None] * stride_om + dims[None, :],
             (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_mask)
    tl.store(Lse + batch_head.to(tl.int64) * seq_len + rows, m_i + tl.log2(l_safe), mask=row_in)


@triton.jit
def _eagle3_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_q_heads, n_kv_heads, seq_len, qk_scale, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tiles_per_step = tl.cdiv(seq_len, BLOCK_N)
    step = tl.program_id(0) // tiles_per_step
    key_lo = (tl.program_id(0) % tiles_per_step) * BLOCK_N                 # position within the step
    batch_head = tl.program_id(1)
    batch = (batch_head // n_kv_heads).to(tl.int64)
    kv_head = batch_head % n_kv_heads

    keys = key_lo + tl.arange(0, BLOCK_N)                                   # [BLOCK_N] positions
    key_in = keys < seq_len
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < HEAD_DIM
    kv_mask = key_in[:, None] & dim_in[None, :]
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + (step * seq_len + keys)[:, None] * stride_kn
                + dims[None, :], mask=kv_mask, other=0.0)    # [BLOCK_N, BLOCK_D]
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + (step * seq_len + keys)[:, None] * stride_vn
                + dims[None, :], mask=kv_mask, other=0.0)    # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for q_head in range(kv_head * GROUP, kv_head * GROUP + GROUP):        # GQA: sum over the group here
        batch_q_head = batch * n_q_heads + q_head
        Q_head = Q + batch * stride_qb + q_head * stride_qh
        DO_head = DOut + batch * stride_gb + q_head * stride_gh
        Lse_head = Lse + batch_q_head * seq_len
        Delta_head = Delta + batch_q_head * seq_len
        if step == 0:
            # causal: only rows >= key_lo see these keys
            for row_lo in range((key_lo // BLOCK_M) * BLOCK_M, seq_len, BLOCK_M):
                dk, dv = _dkdv_query_tile(dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, Lse, batch,
                                          stride_qm, stride_gm, 0, 0,
                                          row_lo, keys, dims, dim_in, seq_len, 1,
                                          qk_scale_log2, _KEYS_CAUSAL, False, BLOCK_M, DOT_PRECISION)
        else:
            # key `keys[j]` of a later step is seen by row keys[j] only: row-wise products
            q = tl.load(Q_head + keys[:, None] * stride_qm + dims[None, :],
                        mask=kv_mask, other=0.0).to(tl.float32)           # [BLOCK_N, BLOCK_D]
            dout = tl.load(DO_head + keys[:, None] * stride_gm + dims[None, :],
                           mask=kv_mask, other=0.0).to(tl.float32)
            lse = tl.load(Lse_head + keys, mask=key_in, other=float("inf"))
            delta = tl.load(Delta_head + keys, mask=key_in, other=0.0)
            p = tl.exp2(tl.sum(q * k.to(tl.float32), 1) * qk_scale_log2 - lse)        # [BLOCK_N]
            dv += p[:, None] * dout
            ds = p * (tl.sum(dout * v.to(tl.float32), 1) - delta)
            dk += ds[:, None] * q

    dk = dk * qk_scale
    tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + (step * seq_len + keys)[:, None] * stride_dkn
             + dims[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + (step * seq_len + keys)[:, None] * stride_dvn
             + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _eagle3_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm,
    stride_dqb, stride_dqh, stride_dqm,
    n_q_heads, seq_len, n_steps, qk_scale, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_q_heads).to(tl.int64)
    q_head = batch_head % n_q_heads
    kv_head = q_head // GROUP

    row_lo = tile_m * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_in = rows < seq_len
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < HEAD_DIM
    row_mask = row_in[:, None] & dim_in[None, :]
    q = tl.load(Q + batch * stride_qb + q_head * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=row_mask, other=0.0)
    dout = tl.load(DOut + batch * stride_gb + q_head * stride_gh + rows[:, None] * stride_gm
                   + dims[None, :], mask=row_mask, other=0.0)
    lse = tl.load(Lse + batch_head.to(tl.int64) * seq_len + rows, mask=row_in, other=float("inf"))
    delta = tl.load(Delta + batch_head.to(tl.int64) * seq_len + rows, mask=row_in, other=0.0)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    causal_all = ((row_lo + 1) // BLOCK_N) * BLOCK_N
    causal_hi = tl.minimum(row_lo + BLOCK_M, seq_len)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       0, causal_all, 0, seq_len, rows, rows, rows, dims, dim_in,
                       1, qk_scale_log2, _KEYS_CTX_FULL, False, BLOCK_N, DOT_PRECISION)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       causal_all, causal_hi, 0, seq_len, rows, rows, rows, dims, dim_in,
                       1, qk_scale_log2, _KEYS_CAUSAL, False, BLOCK_N, DOT_PRECISION)
    for step in range(1, n_steps):
        diag = step * seq_len + rows
        k_diag = tl.load(K_head + diag[:, None] * stride_kn + dims[None, :],
                         mask=row_mask, other=0.0).to(tl.float32)
        v_diag = tl.load(V_head + diag[:, None] * stride_vn + dims[None, :],
                         mask=row_mask, other=0.0).to(tl.float32)
        p = tl.exp2(tl.sum(q.to(tl.float32) * k_diag, 1) * qk_scale_log2 - lse)       # [BLOCK_M]
        ds = p * (tl.sum(dout.to(tl.float32) * v_diag, 1) - delta)
        dq += ds[:, None] * k_diag
    tl.store(DQ + batch * stride_dqb + q_head * stride_dqh + rows[:, None] * stride_dqm + dims[None, :],
             (dq * qk_scale).to(DQ.dtype.element_ty), mask=row_mask)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelTiles:
    """Launch shape of one kernel: `block_m` query rows x `block_n` keys per tile (powers of two >= 16,
    the tl.dot minimum), plus num_warps / num_stages.  In the dk/dv kernel the key tile is the outer
    (program) tile and block_m the inner step; in the forward and dq kernels it is the other way round."""
    block_m: int
    block_n: int
    warps: int = 4
    stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelTiles.{name}={value} must be a power of two >= 16")

    def launch(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.warps, num_stages=self.stages)


@dataclass(frozen=True)
class TileConfig:
    """Tiles of the forward, dk/dv and dq kernels (shared by the DFlash and EAGLE3 kernels)."""
    fwd: KernelTiles
    dkdv: KernelTiles
    dq: KernelTiles


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16, kind: str = "dflash") -> TileConfig:
    """Tile sizes per head_dim and kernel family ("dflash" or "eagle3"); see the module docstring.

    Picked so that no fp16/bf16 kernel spills registers on sm_90 (cuobjdump on the compiled cubin),
    not yet timed on hardware.  fp32 (input_precision="ieee": CUDA-core FMA dots, far more registers)
    is a correctness mode: small tiles, some spilling, slow."""
    if kind not in ("dflash", "eagle3"):
        raise ValueError(f"kind must be 'dflash' or 'eagle3', got {kind!r}")
    if _interpreting():
        return TileConfig(KernelTiles(16, 16, 1, 1), KernelTiles(16, 16, 1, 1), KernelTiles(16, 16, 1, 1))
    if dtype == torch.float32:
        return TileConfig(KernelTiles(16, 32, 4, 1), KernelTiles(16, 32, 4, 1), KernelTiles(16, 32, 4, 1))
    if head_dim <= 64:
        return TileConfig(fwd=KernelTiles(64, 64, 4, 3), dkdv=KernelTiles(32, 128, 8, 2), dq=KernelTiles(64, 32, 4, 2))
    if head_dim <= 128:
        if kind == "eagle3":   # the diagonal's row-wise products keep [BLOCK_N, D] fp32 rows live
            return TileConfig(fwd=KernelTiles(64, 64, 8, 3), dkdv=KernelTiles(64, 32, 8, 2),
                              dq=KernelTiles(64, 32, 8, 3))
        return TileConfig(fwd=KernelTiles(64, 64, 8, 3), dkdv=KernelTiles(32, 64, 8, 2), dq=KernelTiles(64, 32, 8, 3))
    if kind == "eagle3":
        return TileConfig(fwd=KernelTiles(32, 32, 4, 2), dkdv=KernelTiles(32, 32, 8, 1), dq=KernelTiles(32, 32, 8, 1))
    return TileConfig(fwd=KernelTiles(64, 32, 8, 2), dkdv=KernelTiles(32, 32, 8, 1), dq=KernelTiles(32, 32, 4, 1))


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


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
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float16/bfloat16/float32; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device == anchors.device):
        raise ValueError(f"q, k, v, anchors must be on one device; got {q.device}, {k.device}, {v.device}, "
                         f"{anchors.device}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} > {MAX_HEAD_DIM} is not supported")


def _unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides; the kernels address head_dim as contiguous (unit stride)."""
    assert x.stride(-1) == 1 or x.shape[-1] == 1, "kernels need a unit head_dim stride"
    return x.stride(0), x.stride(1), x.stride(2)


def _head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"                       # true fp32 products, no TF32
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"                     # see _dot: works around the interpreter's bf16 dot
    return "tf32"                           # ignored for fp16/bf16 inputs: native tensor-core dot


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


def _softmax_bwd_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """[batch, heads, rows] fp32: rowwise <out, grad_out>."""
    batch, n_heads, n_rows, head_dim = out.shape
    delta = torch.empty(batch, n_heads, n_rows, device=out.device, dtype=torch.float32)
    block_m = 64
    _block_attn_bwd_delta_kernel[(triton.cdiv(n_rows, block_m), batch * n_heads)](
        out, grad_out, delta, *_row_strides(out), *_row_strides(grad_out), n_heads, n_rows,
        HEAD_DIM=head_dim, BLOCK_D=_head_dim_block(head_dim), BLOCK_M=block_m)
    return delta


def _backward(grad_out, q, k, v, out, lse, anchor, block_size, causal_in_block, scale, tiles, need_dq):
    batch, n_q_heads, n_rows, head_dim = q.shape
    n_kv_heads = k.shape[1]
    ctx_len = k.shape[2] - n_rows
    n_blocks = anchor.shape[1]
    block_d = _head_dim_block(head_dim)
    group = n_q_heads // n_kv_heads
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL_IN_BLOCK=causal_in_block,
                  DOT_PRECISION=_dot_precision(q.dtype))

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
# EAGLE3 host side
# --------------------------------------------------------------------------------------------------
def eagle3_ttt_mask(seq_len: int, n_steps: int, device=None) -> torch.Tensor:
    """[seq_len, n_steps*seq_len] bool: row i sees step-0 keys j <= i and key i of every later step."""
    rows = torch.arange(seq_len, device=device)
    keys = torch.arange(n_steps * seq_len, device=device)
    step, pos = keys // seq_len, keys % seq_len
    return ((step == 0)[None, :] & (pos[None, :] <= rows[:, None])) | \
           ((step > 0)[None, :] & (pos[None, :] == rows[:, None]))


def eagle3_ttt_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                   scale: float | None = None) -> torch.Tensor:
    """Dense-mask fp32 oracle for `eagle3_ttt_attention_triton`. Returns q's dtype."""
    n_steps = _check_eagle3_inputs(q, k, v)
    group = q.shape[1] // k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale              # [batch, Hq, L, n_steps*L]
    scores = scores.masked_fill(~eagle3_ttt_mask(q.shape[2], n_steps, q.device), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)


def _check_eagle3_inputs(q, k, v) -> int:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q [batch, n_q_heads, L, head_dim] and k, v [batch, n_kv_heads, n_steps*L, head_dim] "
                         f"expected; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, n_q_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
    if seq_len == 0 or k.shape[2] % seq_len or k.shape[2] == 0:
        raise ValueError(f"k/v length {k.shape[2]} must be a positive multiple n_steps * L of q's L={seq_len}")
    if k.shape[1] == 0 or n_q_heads % k.shape[1]:
        raise ValueError(f"n_kv_heads={k.shape[1]} must divide n_q_heads={n_q_heads}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float16/bfloat16/float32; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} > {MAX_HEAD_DIM} is not supported")
    return k.shape[2] // seq_len


class Eagle3TTTAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, n_steps, scale, tiles):
        batch, n_q_heads, seq_len, head_dim = q.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(batch, n_q_heads, seq_len, device=q.device, dtype=torch.float32)
        _eagle3_fwd_kernel[(triton.cdiv(seq_len, tiles.fwd.block_m), batch * n_q_heads)](
            q, k, v, out, lse, *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(out),
            n_q_heads, seq_len, n_steps, scale * LOG2E,
            GROUP=n_q_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=_head_dim_block(head_dim),
            DOT_PRECISION=_dot_precision(q.dtype), **tiles.fwd.launch())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.n_steps, ctx.scale, ctx.tiles = n_steps, scale, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _unit_last_dim(grad_out)
        batch, n_q_heads, seq_len, head_dim = q.shape
        n_kv_heads = k.shape[1]
        tiles, scale = ctx.tiles, ctx.scale
        common = dict(GROUP=n_q_heads // n_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_head_dim_block(head_dim),
                      DOT_PRECISION=_dot_precision(q.dtype))
        delta = _softmax_bwd_delta(out, grad_out)                                     # [batch, Hq, L]
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        n_key_tiles = ctx.n_steps * triton.cdiv(seq_len, tiles.dkdv.block_n)
        _eagle3_bwd_dkdv_kernel[(n_key_tiles, batch * n_kv_heads)](
            q, k, v, grad_out, lse, delta, dk, dv,
            *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out),
            *_row_strides(dk), *_row_strides(dv),
            n_q_heads, n_kv_heads, seq_len, scale, scale * LOG2E, **common, **tiles.dkdv.launch())
        dq = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            _eagle3_bwd_dq_kernel[(triton.cdiv(seq_len, tiles.dq.block_m), batch * n_q_heads)](
                q, k, v, grad_out, lse, delta, dq,
                *_row_strides(q), *_row_strides(k), *_row_strides(v), *_row_strides(grad_out), *_row_strides(dq),
                n_q_heads, seq_len, ctx.n_steps, scale, scale * LOG2E, **common, **tiles.dq.launch())
        return dq, dk, dv, None, None, None


def eagle3_ttt_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                scale: float | None = None, tiles: TileConfig | None = None) -> torch.Tensor:
    """EAGLE3 training-time-test attention at unrolled step t = n_steps - 1; differentiable w.r.t. q, k, v.

        q     [batch, n_q_heads,  L,         head_dim]   queries of step t
        k, v  [batch, n_kv_heads, n_steps*L, head_dim]   [keys of step 0 ; step 1 ; ... ; step t]

    Row i attends causally to step-0 keys 0..i and to key i of each step 1..t (the "same position"
    diagonal).  Right padding needs no lengths: a real row never sees a later (padded) position.
    Step-0 keys go through the same tiled, tile-skipping sweep as the DFlash kernel (mask key <= row);
    the diagonal keys are one key per row and step, so they are row-wise dot products, not tl.dot.
    """
    n_steps = _check_eagle3_inputs(q, k, v)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    tiles = tiles if tiles is not None else default_tiles(q.shape[-1], q.dtype, kind="eagle3")
    q, k, v = _unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v)
    return Eagle3TTTAttentionFunction.apply(q, k, v, n_steps, scale, tiles)
