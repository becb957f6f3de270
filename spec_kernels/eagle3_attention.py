"""EAGLE3 training-time-test (TTT) attention: Triton forward / backward kernels, autograd function and
the dense PyTorch reference.  Design, tiles and numerics: docs/kernels.md.

    q     [batch, n_q_heads,  L,         head_dim]   queries of unrolled step t = n_steps - 1
    k, v  [batch, n_kv_heads, n_steps*L, head_dim]   [keys of step 0 ; step 1 ; ... ; step t]

Row i sees step-0 keys 0..i (causal) and key i of every later step (the same-position diagonal).
n_kv_heads must divide n_q_heads (GQA).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (_KEYS_CAUSAL, _KEYS_CTX_FULL, LOG2E, TileConfig, _check_dtype_device_head_dim, _dkdv_query_tile,
                     _dot_precision, _dq_key_sweep, _fwd_key_sweep, _head_dim_block, _kv_head_bases, _load_query_rows,
                     _load_tile, _online_softmax_update, _program_batch_head, _q_head_bases, _row_strides,
                     _softmax_bwd_delta, _span, _store_tile, _unit_last_dim, default_tiles)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _causal_key_ranges(row_lo, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step-0 keys of the query tile starting at row_lo: keys < causal_all are seen by every row of the
    tile (no mask), [causal_all, causal_hi) need the causal mask, keys past the tile's last row by none."""
    return ((row_lo + 1) // BLOCK_N) * BLOCK_N, tl.minimum(row_lo + BLOCK_M, seq_len)


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
    batch_head, batch, q_head = _program_batch_head(n_q_heads)
    kv_head = q_head // GROUP
    row_lo = tl.program_id(0) * BLOCK_M
    rows, row_in = _span(row_lo, seq_len, BLOCK_M)                          # [BLOCK_M] positions
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    causal_all, causal_hi = _causal_key_ranges(row_lo, seq_len, BLOCK_M, BLOCK_N)
    q = _load_tile(Q + batch * stride_qb + q_head * stride_qh, rows, row_in, dims, dim_in, stride_qm)
    K_head, V_head = _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   0, causal_all, 0, seq_len, rows, rows, rows, dims, dim_in,
                                   1, qk_scale_log2, _KEYS_CTX_FULL, False, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                                   causal_all, causal_hi, 0, seq_len, rows, rows, rows, dims, dim_in,
                                   1, qk_scale_log2, _KEYS_CAUSAL, False, BLOCK_N, DOT_PRECISION)
    # Steps 1..n_steps-1: each row sees exactly one key per step, at its own position: a row-wise dot.
    for step in range(1, n_steps):
        k_diag = _load_tile(K_head, step * seq_len + rows, row_in, dims, dim_in, stride_kn).to(tl.float32)
        v_diag = _load_tile(V_head, step * seq_len + rows, row_in, dims, dim_in, stride_vn).to(tl.float32)
        score = tl.sum(q.to(tl.float32) * k_diag, 1) * qk_scale_log2       # [BLOCK_M]
        m_new = tl.maximum(m_i, score)
        p = tl.exp2(score - m_new)
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, m_new, p, p[:, None] * v_diag)

    l_safe = tl.where(row_in, l_i, 1.0)                                     # every real row sees key `row`
    _store_tile(Out + batch * stride_ob + q_head * stride_oh, rows, row_in, dims, dim_in, stride_om,
                acc / l_safe[:, None])
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
    _, batch, kv_head = _program_batch_head(n_kv_heads)
    keys, key_in = _span(key_lo, seq_len, BLOCK_N)                          # [BLOCK_N] positions
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    K_head, V_head = _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh)
    k = _load_tile(K_head, step * seq_len + keys, key_in, dims, dim_in, stride_kn)    # [BLOCK_N, BLOCK_D]
    v = _load_tile(V_head, step * seq_len + keys, key_in, dims, dim_in, stride_vn)    # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for q_head in range(kv_head * GROUP, kv_head * GROUP + GROUP):        # GQA: sum over the group here
        Q_head, DO_head, Lse_head, Delta_head = _q_head_bases(Q, DOut, Lse, Delta, batch, q_head, n_q_heads,
                                                              seq_len, stride_qb, stride_qh, stride_gb, stride_gh)
        if step == 0:
            # causal: only rows >= key_lo see these keys
            for row_lo in range((key_lo // BLOCK_M) * BLOCK_M, seq_len, BLOCK_M):
                dk, dv = _dkdv_query_tile(dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, Lse, batch,
                                          stride_qm, stride_gm, 0, 0,
                                          row_lo, keys, dims, dim_in, seq_len, 1,
                                          qk_scale_log2, _KEYS_CAUSAL, False, BLOCK_M, DOT_PRECISION)
        else:
            # key `keys[j]` of a later step is seen by row keys[j] only: row-wise products
            q, dout, lse, delta = _load_query_rows(Q_head, DO_head, Lse_head, Delta_head, keys, key_in, dims, dim_in,
                                                   stride_qm, stride_gm)
            q, dout = q.to(tl.float32), dout.to(tl.float32)                # [BLOCK_N, BLOCK_D]
            p = tl.exp2(tl.sum(q * k.to(tl.float32), 1) * qk_scale_log2 - lse)        # [BLOCK_N]
            dv += p[:, None] * dout
            ds = p * (tl.sum(dout * v.to(tl.float32), 1) - delta)
            dk += ds[:, None] * q

    _store_tile(DK + batch * stride_dkb + kv_head * stride_dkh, step * seq_len + keys, key_in, dims, dim_in,
                stride_dkn, dk * qk_scale)
    _store_tile(DV + batch * stride_dvb + kv_head * stride_dvh, step * seq_len + keys, key_in, dims, dim_in,
                stride_dvn, dv)


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
    batch_head, batch, q_head = _program_batch_head(n_q_heads)
    kv_head = q_head // GROUP
    row_lo = tl.program_id(0) * BLOCK_M
    rows, row_in = _span(row_lo, seq_len, BLOCK_M)
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    causal_all, causal_hi = _causal_key_ranges(row_lo, seq_len, BLOCK_M, BLOCK_N)
    q, dout, lse, delta = _load_query_rows(Q + batch * stride_qb + q_head * stride_qh,
                                           DOut + batch * stride_gb + q_head * stride_gh,
                                           Lse + batch_head.to(tl.int64) * seq_len,
                                           Delta + batch_head.to(tl.int64) * seq_len,
                                           rows, row_in, dims, dim_in, stride_qm, stride_gm)
    K_head, V_head = _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       0, causal_all, 0, seq_len, rows, rows, rows, dims, dim_in,
                       1, qk_scale_log2, _KEYS_CTX_FULL, False, BLOCK_N, DOT_PRECISION)
    dq = _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                       causal_all, causal_hi, 0, seq_len, rows, rows, rows, dims, dim_in,
                       1, qk_scale_log2, _KEYS_CAUSAL, False, BLOCK_N, DOT_PRECISION)
    for step in range(1, n_steps):
        k_diag = _load_tile(K_head, step * seq_len + rows, row_in, dims, dim_in, stride_kn).to(tl.float32)
        v_diag = _load_tile(V_head, step * seq_len + rows, row_in, dims, dim_in, stride_vn).to(tl.float32)
        p = tl.exp2(tl.sum(q.to(tl.float32) * k_diag, 1) * qk_scale_log2 - lse)       # [BLOCK_M]
        ds = p * (tl.sum(dout.to(tl.float32) * v_diag, 1) - delta)
        dq += ds[:, None] * k_diag
    _store_tile(DQ + batch * stride_dqb + q_head * stride_dqh, rows, row_in, dims, dim_in, stride_dqm,
                dq * qk_scale)


# --------------------------------------------------------------------------------------------------
# host side
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
    _check_dtype_device_head_dim(dict(q=q, k=k, v=v), head_dim)
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


def eagle3_ttt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """backend: "reference", "triton", or "auto" (the Triton kernel for CUDA tensors, the reference otherwise)."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"unknown attention backend {backend!r}; expected auto, reference or triton")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        return eagle3_ttt_attention_triton(q, k, v, scale=scale)
    return eagle3_ttt_attention_reference(q, k, v, scale=scale)
