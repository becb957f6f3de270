"""Building blocks shared by the attention ops of `spec_kernels` (design notes: docs/kernels.md).

Triton side: the mask modes of a key sweep, `_dot`, the visibility mask, the forward / dq key sweeps, the
dk/dv query-tile step, the softmax-backward delta kernel, and the small prologue helpers every kernel uses
(program-id decoding, [rows, head_dim] tile loads and stores, lse/delta rows, the online-softmax update).
Host side: tile configuration (`KernelTiles`, `TileConfig`, `default_tiles`), dtype/stride helpers and
the input checks both ops share.
"""
from __future__ import annotations

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

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# small Triton helpers: indices, program ids, tile loads and stores
# --------------------------------------------------------------------------------------------------
@triton.jit
def _span(lo, hi, SIZE: tl.constexpr):
    """lo + [0, SIZE) ([SIZE]) and which of those indices are < hi."""
    idx = lo + tl.arange(0, SIZE)
    return idx, idx < hi


@triton.jit
def _program_batch_head(n_heads):
    """Program axis 1 is batch * n_heads + head: (that id, batch as int64, head)."""
    batch_head = tl.program_id(1)
    return batch_head, (batch_head // n_heads).to(tl.int64), batch_head % n_heads


@triton.jit
def _load_tile(Base, idx, idx_in, dims, dim_in, stride):
    """[len(idx), BLOCK_D] tile: row i is Base[idx[i] * stride + dims]; 0 outside idx_in x dim_in."""
    return tl.load(Base + idx[:, None] * stride + dims[None, :],
                   mask=idx_in[:, None] & dim_in[None, :], other=0.0)


@triton.jit
def _load_tile_t(Base, idx, idx_in, dims, dim_in, stride):
    """The same tile transposed: [BLOCK_D, len(idx)]."""
    return tl.load(Base + idx[None, :] * stride + dims[:, None],
                   mask=idx_in[None, :] & dim_in[:, None], other=0.0)


@triton.jit
def _store_tile(Base, idx, idx_in, dims, dim_in, stride, value):
    """Store a [len(idx), BLOCK_D] tile (cast to Base's dtype) where `_load_tile` would read it."""
    tl.store(Base + idx[:, None] * stride + dims[None, :], value.to(Base.dtype.element_ty),
             mask=idx_in[:, None] & dim_in[None, :])


@triton.jit
def _load_query_rows(Q_head, DO_head, Lse_head, Delta_head, rows, row_in, dims, dim_in, stride_qm, stride_gm):
    """What a backward step reads of query rows `rows` of one (batch, q head): q and dout tiles
    [len(rows), BLOCK_D] (0 outside), the saved logsumexp (+inf outside, so p = exp2(s - lse) = 0) and
    delta (0 outside)."""
    q = _load_tile(Q_head, rows, row_in, dims, dim_in, stride_qm)
    dout = _load_tile(DO_head, rows, row_in, dims, dim_in, stride_gm)
    lse = tl.load(Lse_head + rows, mask=row_in, other=float("inf"))
    delta = tl.load(Delta_head + rows, mask=row_in, other=0.0)
    return q, dout, lse, delta


@triton.jit
def _kv_head_bases(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh):
    """k and v of one (batch, kv head)."""
    return K + batch * stride_kb + kv_head * stride_kh, V + batch * stride_vb + kv_head * stride_vh


@triton.jit
def _q_head_bases(Q, DOut, Lse, Delta, batch, q_head, n_q_heads, n_rows,
                  stride_qb, stride_qh, stride_gb, stride_gh):
    """q, dout, lse and delta of one (batch, q head): what a dk/dv kernel's GQA loop reads."""
    batch_q_head = batch * n_q_heads + q_head
    return (Q + batch * stride_qb + q_head * stride_qh, DOut + batch * stride_gb + q_head * stride_gh,
            Lse + batch_q_head * n_rows, Delta + batch_q_head * n_rows)


# --------------------------------------------------------------------------------------------------
# attention math
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


@triton.jit
def _online_softmax_update(acc, m_i, l_i, m_new, p_sum, pv):
    """Flash-attention running state after one more step of keys whose probabilities p = exp2(s - m_new)
    sum to p_sum per row and give pv = p @ v: returns (acc, m_i, l_i) rescaled to the new max m_new."""
    alpha = tl.exp2(m_i - m_new)
    return acc * alpha[:, None] + pv, m_new, l_i * alpha + p_sum


@triton.jit
def _fwd_key_sweep(acc, m_i, l_i, q, K_head, V_head, stride_kn, stride_vn,
                   key_lo, key_hi, section_start, n_section_keys, rows, row_block, anchor, dims, dim_in,
                   block_size, qk_scale_log2,
                   MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online-softmax over keys [key_lo, key_hi) of one section (keys relative to section_start)."""
    for n0 in range(key_lo, key_hi, BLOCK_N):
        keys, key_in = _span(n0, n_section_keys, BLOCK_N)                              # [BLOCK_N]
        k_t = _load_tile_t(K_head, section_start + keys, key_in, dims, dim_in, stride_kn)  # [BLOCK_D, BLOCK_N]
        v = _load_tile(V_head, section_start + keys, key_in, dims, dim_in, stride_vn)      # [BLOCK_N, BLOCK_D]
        scores = _dot(q, k_t, DOT_PRECISION) * qk_scale_log2   # [BLOCK_M, BLOCK_N]
        if MODE != _KEYS_CTX_FULL:
            scores = tl.where(_visible(rows, row_block, anchor, keys, block_size, MODE, CAUSAL_IN_BLOCK),
                              scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))                          # m_i starts finite: no inf-inf
        p = tl.exp2(scores - m_new[:, None])
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, m_new, tl.sum(p, 1),
                                               _dot(p.to(v.dtype), v, DOT_PRECISION))
    return acc, m_i, l_i


@triton.jit
def _dq_key_sweep(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_vn,
                  key_lo, key_hi, section_start, n_section_keys, rows, row_block, anchor, dims, dim_in,
                  block_size, qk_scale_log2,
                  MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dq (unscaled) over keys [key_lo, key_hi) of one section, the same key walk as `_fwd_key_sweep`."""
    for n0 in range(key_lo, key_hi, BLOCK_N):
        keys, key_in = _span(n0, n_section_keys, BLOCK_N)
        k = _load_tile(K_head, section_start + keys, key_in, dims, dim_in, stride_kn)      # [BLOCK_N, BLOCK_D]
        v_t = _load_tile_t(V_head, section_start + keys, key_in, dims, dim_in, stride_vn)  # [BLOCK_D, BLOCK_N]
        scores = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2   # [BLOCK_M, BLOCK_N]
        p = tl.exp2(scores - lse[:, None])                                  # padding rows: lse=+inf -> 0
        if MODE != _KEYS_CTX_FULL:
            p = tl.where(_visible(rows, row_block, anchor, keys, block_size, MODE, CAUSAL_IN_BLOCK), p, 0.0)
        dp = _dot(dout, v_t, DOT_PRECISION)                                 # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)                        # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _dkdv_query_tile(dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, Anchor, batch,
                     stride_qm, stride_gm, stride_ab, stride_an,
                     row_lo, keys, dims, dim_in, n_rows, block_size, qk_scale_log2,
                     MODE: tl.constexpr, CAUSAL_IN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Add one query tile's (rows row_lo + [0, BLOCK_M)) contribution to a key tile's dk, dv."""
    rows, row_in = _span(row_lo, n_rows, BLOCK_M)
    if MODE == _KEYS_CAUSAL:
        row_block, anchor = rows, rows                                      # unused by the causal mask
    else:
        row_block, anchor = _row_anchor(Anchor, batch, rows, n_rows, block_size, stride_ab, stride_an)
    q, dout, lse, delta = _load_query_rows(Q_head, DO_head, Lse_head, Delta_head, rows, row_in, dims, dim_in,
                                           stride_qm, stride_gm)        # [BLOCK_M, BLOCK_D] x 2, [BLOCK_M] x 2

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
def _softmax_bwd_delta_kernel(Out, DOut, Delta,
                              stride_ob, stride_oh, stride_om,
                              stride_gb, stride_gh, stride_gm,
                              n_q_heads, n_rows,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[row] = <out[row], dout[row]> in fp32: the softmax-backward row correction."""
    batch_head, batch, head = _program_batch_head(n_q_heads)
    rows, row_in = _span(tl.program_id(0) * BLOCK_M, n_rows, BLOCK_M)
    dims, dim_in = _span(0, HEAD_DIM, BLOCK_D)
    out = _load_tile(Out + batch * stride_ob + head * stride_oh, rows, row_in, dims, dim_in, stride_om)
    dout = _load_tile(DOut + batch * stride_gb + head * stride_gh, rows, row_in, dims, dim_in, stride_gm)
    tl.store(Delta + batch_head.to(tl.int64) * n_rows + rows,
             tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1), mask=row_in)


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
    """Tile sizes per head_dim and kernel family ("dflash" or "eagle3"); see docs/kernels.md.

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


def _check_dtype_device_head_dim(tensors: dict[str, torch.Tensor], head_dim: int) -> None:
    """The checks both ops share: q, k, v of one supported dtype; every tensor on one device; head_dim."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float16/bfloat16/float32; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device; got "
                         + ", ".join(str(t.device) for t in tensors.values()))
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


def _softmax_bwd_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """[batch, heads, rows] fp32: rowwise <out, grad_out>."""
    batch, n_heads, n_rows, head_dim = out.shape
    delta = torch.empty(batch, n_heads, n_rows, device=out.device, dtype=torch.float32)
    block_m = 64
    _softmax_bwd_delta_kernel[(triton.cdiv(n_rows, block_m), batch * n_heads)](
        out, grad_out, delta, *_row_strides(out), *_row_strides(grad_out), n_heads, n_rows,
        HEAD_DIM=head_dim, BLOCK_D=_head_dim_block(head_dim), BLOCK_M=block_m)
    return delta
