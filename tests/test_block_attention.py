"""Triton DFlash (and EAGLE3) block attention vs the PyTorch oracle, forward and backward.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1, and
so does this module as a fallback, before the kernels are imported), so shapes are tiny; with a GPU they run
on it.  The interpreter uses 16x16 tiles, and several tests pass other tile configs explicitly, so tile
edges, tiles spanning several blocks and blocks spanning several tiles are all exercised.  One test (in a
subprocess, without the interpreter) compiles the kernels for an H100 (sm_90) to catch errors that only the
real compiler sees.

bf16 tolerances are loose on purpose: besides bf16's 8-bit mantissa, triton's interpreter truncates
fp32 -> bf16 casts (the GPU rounds to nearest even), roughly doubling the error seen here.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch  # does not import triton

if not torch.cuda.is_available():
    # No GPU: run the kernels in Triton's interpreter. Must happen before a spec_kernels module is imported
    # (triton.jit reads it at decoration time). With a GPU the tests run on it for real.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spec_kernels.common import KernelTiles, TileConfig
from spec_kernels.dflash_attention import block_attention, block_attention_reference, block_attention_triton
from spec_kernels.eagle3_attention import eagle3_ttt_attention_reference, eagle3_ttt_attention_triton, eagle3_ttt_mask

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="no GPU and TRITON_INTERPRET was explicitly set to something other than 1")

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# max |got - want| must be <= TOL * max(1, max |want|)   (per tensor)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _tiles(fwd_m, fwd_n, bwd_m, bwd_n):
    """Interpreter-sized tiles: dk/dv and dq kernels get the same backward tile."""
    return TileConfig(KernelTiles(fwd_m, fwd_n, 1, 1), KernelTiles(bwd_m, bwd_n, 1, 1), KernelTiles(bwd_m, bwd_n, 1, 1))


def _make_inputs(batch, n_q_heads, n_kv_heads, ctx_len, n_blocks, block_size, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_rows = n_blocks * block_size

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    q = randn(batch, n_q_heads, n_rows, head_dim)
    k = randn(batch, n_kv_heads, ctx_len + n_rows, head_dim)
    v = randn(batch, n_kv_heads, ctx_len + n_rows, head_dim)
    grad_out = randn(batch, n_q_heads, n_rows, head_dim)
    return q, k, v, grad_out


def _assert_close(name, got, want):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.float() - want.float()).abs().max().item()
    bound = TOL[want.dtype] * max(1.0, want.float().abs().max().item())
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _fwd_bwd(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def check_against_reference(anchors, *, batch=None, n_q_heads=2, n_kv_heads=1, ctx_len=40, block_size=16,
                            head_dim=64, dtype=torch.float32, causal_in_block=False, tiles=None, scale=None,
                            seed=0):
    anchors = torch.as_tensor(anchors, dtype=torch.int64, device=DEVICE)
    batch = anchors.shape[0]
    q, k, v, grad_out = _make_inputs(batch, n_q_heads, n_kv_heads, ctx_len, anchors.shape[1], block_size,
                                     head_dim, dtype, seed)
    ours = _fwd_bwd(lambda q, k, v: block_attention_triton(q, k, v, anchors, block_size,
                                                           causal_in_block=causal_in_block, scale=scale, tiles=tiles),
                    q, k, v, grad_out)
    want = _fwd_bwd(lambda q, k, v: block_attention_reference(q, k, v, anchors, block_size,
                                                              causal_in_block=causal_in_block, scale=scale),
                    q, k, v, grad_out)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, want):
        _assert_close(name, got, ref)
    return ours


# ---------------------------------------------------------------------------------------------------
# forward + backward vs the oracle
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal_in_block", [False, True])
def test_random_anchors(causal_in_block):
    gen = torch.Generator().manual_seed(1)
    anchors = torch.randint(0, 41, (2, 3), generator=gen)
    check_against_reference(anchors, ctx_len=40, causal_in_block=causal_in_block)


def test_edge_anchors():
    # anchor 0 (no context), 1, S-1, S, and > S (behaves like S); S=37 is not a multiple of the tile.
    check_against_reference([[0, 1, 36, 37, 50]], ctx_len=37, block_size=4, n_q_heads=2, n_kv_heads=2)


def test_anchor_beyond_context_equals_anchor_at_context_end():
    q, k, v, _ = _make_inputs(1, 2, 1, 20, 2, 4, 64, torch.float32)
    beyond = block_attention_triton(q, k, v, torch.tensor([[25, 3]], device=DEVICE), 4)
    at_end = block_attention_triton(q, k, v, torch.tensor([[20, 3]], device=DEVICE), 4)
    assert torch.equal(beyond, at_end)


def test_no_context():
    # S = 0: blocks see only their own tokens, whatever the anchor says.
    check_against_reference([[0, 5, -1]], ctx_len=0, block_size=8)


def test_single_block():
    check_against_reference([[23]], ctx_len=40, block_size=16)


def test_blocks_whose_tokens_run_past_the_context():
    # anchor + B > S: the block's own tokens live after the context in k/v, whatever the anchor.
    check_against_reference([[35, 40, 38]], ctx_len=40, block_size=16)


@pytest.mark.parametrize("n_q_heads,n_kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_gqa(n_q_heads, n_kv_heads):
    check_against_reference([[5, 30, 17], [40, 0, 12]], n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                            ctx_len=40, block_size=8)


def test_padding_blocks_have_zero_output_and_gradient():
    anchors = [[12, -1, 30, -1], [-1, -1, -1, -1]]          # second sequence is all padding
    out, dq, dk, dv = check_against_reference(anchors, ctx_len=33, block_size=8, n_q_heads=2, n_kv_heads=1)
    rows = torch.arange(4 * 8, device=DEVICE) // 8
    pad_rows_0 = (rows == 1) | (rows == 3)
    assert (out[0][:, pad_rows_0] == 0).all() and (dq[0][:, pad_rows_0] == 0).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    # block tokens of padding blocks are nobody's keys: zero dk/dv
    blk_keys_of_pad = 33 + torch.arange(8, 16, device=DEVICE)
    assert (dk[0][:, blk_keys_of_pad] == 0).all() and (dv[0][:, blk_keys_of_pad] == 0).all()


def test_whole_query_tile_of_padding():
    # block_size 16 == BLOCK_M: tiles 1 and 2 are all padding and must be skipped cleanly.
    check_against_reference([[7, -1, -1, 33]], ctx_len=40, block_size=16)


def test_batch_with_different_sequence_lengths():
    # Padded-with-lengths layout: sequence 0 has only 21 real context tokens and 2 real blocks, sequence 1
    # uses the whole padded context (S=48) and all 4 blocks.
    check_against_reference([[9, 21, -1, -1], [48, 3, 30, 47]], ctx_len=48, block_size=8, n_q_heads=4,
                            n_kv_heads=2)


@pytest.mark.parametrize("block_size", [16, 4, 12, 1])
def test_causal_in_block(block_size):
    check_against_reference([[0, 19, 37]], ctx_len=37, block_size=block_size, causal_in_block=True)


@pytest.mark.parametrize("block_size", [4, 12, 20])
def test_block_sizes_that_straddle_tiles(block_size):
    # 12 and 20 are not powers of two: query/key tiles cut blocks in the middle.
    check_against_reference([[3, 29, 11]], ctx_len=29, block_size=block_size)


@pytest.mark.parametrize("tiles", [
    _tiles(32, 16, 32, 16),                   # a query tile holds several blocks
    _tiles(16, 32, 16, 32),                   # key tiles longer than query tiles
    TileConfig(KernelTiles(64, 16), KernelTiles(16, 64), KernelTiles(32, 16)),   # every kernel different
], ids=["m32n16", "m16n32", "mixed"])
@pytest.mark.parametrize("block_size", [8, 12])
def test_other_tile_configs(tiles, block_size):
    check_against_reference([[40, 2, -1, 17, 25], [0, 33, 9, 9, -1]], ctx_len=41, block_size=block_size,
                            n_q_heads=2, n_kv_heads=1, tiles=tiles, causal_in_block=block_size == 12)


@pytest.mark.parametrize("head_dim", [64, 128, 256, 80])
def test_head_dims(head_dim):
    # 80 is not a power of two: exercises the padded head_dim path.
    check_against_reference([[14, 33]], ctx_len=33, block_size=16, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal_in_block", [False, True])
def test_half_precision(dtype, causal_in_block):
    check_against_reference([[3, 40, -1], [22, 0, 31]], ctx_len=40, block_size=16, n_q_heads=4, n_kv_heads=2,
                            dtype=dtype, causal_in_block=causal_in_block)


def test_custom_scale():
    check_against_reference([[10, 30]], ctx_len=30, block_size=8, scale=0.3)


# ---------------------------------------------------------------------------------------------------
# skipping, layouts, plumbing
# ---------------------------------------------------------------------------------------------------
def test_context_tiles_past_every_anchor_are_never_read():
    # Every anchor is <= 16, so with 16-wide key tiles context keys [16, 64) are never visible. Filling them
    # with NaN proves the kernels never load them (a masked load-and-multiply would give NaN: 0 * NaN).
    ctx_len, block_size = 64, 8
    anchors = torch.tensor([[16, 3, 0, 9]], device=DEVICE)
    tiles = _tiles(16, 16, 16, 16)
    q, k, v, grad_out = _make_inputs(1, 2, 1, ctx_len, 4, block_size, 64, torch.float32)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, 16:ctx_len] = float("nan")
    v_poisoned[:, :, 16:ctx_len] = float("nan")
    out, dq, dk, dv = _fwd_bwd(lambda q, k, v: block_attention_triton(q, k, v, anchors, block_size, tiles=tiles),
                               q, k_poisoned, v_poisoned, grad_out)
    want = _fwd_bwd(lambda q, k, v: block_attention_reference(q, k, v, anchors, block_size), q, k, v, grad_out)
    _assert_close("out", out, want[0])
    _assert_close("dq", dq, want[1])
    visible = torch.ones(ctx_len + 4 * block_size, dtype=torch.bool, device=DEVICE)
    visible[16:ctx_len] = False
    _assert_close("dk", dk[:, :, visible], want[2][:, :, visible])
    _assert_close("dv", dv[:, :, visible], want[3][:, :, visible])
    assert (dk[:, :, ~visible] == 0).all() and (dv[:, :, ~visible] == 0).all()


def test_non_contiguous_inputs():
    # q/k/v as transposed views of [batch, seq, heads, head_dim] buffers, the usual projection layout.
    batch, n_q_heads, n_kv_heads, ctx_len, n_blocks, block_size, head_dim = 2, 4, 2, 24, 2, 8, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, n_blocks * block_size, n_q_heads, head_dim, generator=gen).to(DEVICE).transpose(1, 2)
    kv = torch.randn(batch, ctx_len + n_blocks * block_size, 2, n_kv_heads, head_dim, generator=gen).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    grad_out = torch.randn(batch, n_q_heads, n_blocks * block_size, head_dim, generator=gen).to(DEVICE)
    anchors = torch.tensor([[5, 24], [17, -1]], device=DEVICE)
    assert not q.is_contiguous() and not k.is_contiguous()
    ours = _fwd_bwd(lambda q, k, v: block_attention_triton(q, k, v, anchors, block_size), q, k, v, grad_out)
    want = _fwd_bwd(lambda q, k, v: block_attention_reference(q, k, v, anchors, block_size), q, k, v, grad_out)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, want):
        _assert_close(name, got, ref)


def test_gradient_only_for_kv():
    q, k, v, grad_out = _make_inputs(1, 2, 1, 20, 2, 8, 64, torch.float32)
    anchors = torch.tensor([[4, 20]], device=DEVICE)
    k.requires_grad_(True)
    v.requires_grad_(True)
    dk, dv = torch.autograd.grad(block_attention_triton(q, k, v, anchors, 8), (k, v), grad_out)
    dk_ref, dv_ref = torch.autograd.grad(block_attention_reference(q, k, v, anchors, 8), (k, v), grad_out)
    _assert_close("dk", dk, dk_ref)
    _assert_close("dv", dv, dv_ref)


@pytest.mark.parametrize("causal_in_block", [False, True])
def test_dispatch_triton_matches_reference_backend(causal_in_block):
    anchors = torch.tensor([[6, 0, 31], [-1, 30, 12]], device=DEVICE)
    q, k, v, grad_out = _make_inputs(2, 4, 2, 31, 3, 8, 64, torch.float32, seed=5)
    results = {
        backend: _fwd_bwd(lambda q, k, v: block_attention(q, k, v, anchors, 8, causal_in_block=causal_in_block,
                                                          backend=backend), q, k, v, grad_out)
        for backend in ("triton", "reference")
    }
    for name, got, ref in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"]):
        _assert_close(name, got, ref)


@pytest.mark.parametrize("make_bad,match", [
    (lambda q, k, v, a: (q[:, :, :-1], k, v, a), "rows"),
    (lambda q, k, v, a: (q[:, :3], k, v, a), "n_kv_heads=2 must divide n_q_heads=3"),
    (lambda q, k, v, a: (q, k, v[:, :, :-1], a), "same shape"),
    (lambda q, k, v, a: (q, k.half(), v.half(), a), "dtype"),
    (lambda q, k, v, a: (q.double(), k.double(), v.double(), a), "dtype"),
    (lambda q, k, v, a: (q, k, v, a.float()), "integer"),
    (lambda q, k, v, a: (q, k, v, a[:1]), r"anchors must be \[batch=2, N\]"),
    (lambda q, k, v, a: (q[..., :32], k, v, a), "head_dim"),
])
def test_clear_errors(make_bad, match):
    q, k, v, _ = _make_inputs(2, 4, 2, 16, 2, 8, 64, torch.float32)
    anchors = torch.tensor([[3, 16], [0, 9]], device=DEVICE)
    with pytest.raises(ValueError, match=match):
        block_attention_triton(*make_bad(q, k, v, anchors), 8)


# ---------------------------------------------------------------------------------------------------
# EAGLE3 training-time-test attention
# ---------------------------------------------------------------------------------------------------
def test_eagle3_mask_matches_definition():
    seq_len, n_steps = 5, 3
    want = torch.zeros(seq_len, n_steps * seq_len, dtype=torch.bool)
    for row in range(seq_len):
        for key in range(row + 1):
            want[row, key] = True                           # step 0: causal
        for step in range(1, n_steps):
            want[row, step * seq_len + row] = True           # later steps: the row's own position
    assert torch.equal(eagle3_ttt_mask(seq_len, n_steps), want)


def _eagle3_inputs(batch, n_q_heads, n_kv_heads, seq_len, n_steps, head_dim, dtype, seed=0):
    q, k, v, grad_out = _make_inputs(batch, n_q_heads, n_kv_heads, n_steps * seq_len - seq_len, 1, seq_len,
                                     head_dim, dtype, seed)                 # k, v: n_steps * seq_len keys
    return q, k, v, grad_out


@pytest.mark.parametrize("n_steps", [1, 2, 4])
@pytest.mark.parametrize("n_q_heads,n_kv_heads", [(2, 2), (4, 2)])
def test_eagle3_ttt(n_steps, n_q_heads, n_kv_heads):
    q, k, v, grad_out = _eagle3_inputs(2, n_q_heads, n_kv_heads, 37, n_steps, 64, torch.float32)
    ours = _fwd_bwd(lambda q, k, v: eagle3_ttt_attention_triton(q, k, v), q, k, v, grad_out)
    want = _fwd_bwd(lambda q, k, v: eagle3_ttt_attention_reference(q, k, v), q, k, v, grad_out)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, want):
        _assert_close(name, got, ref)


def test_eagle3_single_step_is_causal_attention():
    # Independent oracle: with one step the mask is plain causal attention.
    q, k, v, grad_out = _eagle3_inputs(1, 4, 2, 29, 1, 64, torch.float32, seed=2)
    ours = _fwd_bwd(lambda q, k, v: eagle3_ttt_attention_triton(q, k, v), q, k, v, grad_out)
    want = _fwd_bwd(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True),
                    q, k, v, grad_out)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, want):
        _assert_close(name, got, ref)


@pytest.mark.parametrize("dtype,head_dim,tiles", [
    (torch.float32, 128, _tiles(32, 16, 16, 32)),
    (torch.float16, 64, None),
    (torch.bfloat16, 64, TileConfig(KernelTiles(16, 32), KernelTiles(32, 16), KernelTiles(16, 64))),
], ids=["fp32-d128-m32n16", "fp16", "bf16-m16n32"])
def test_eagle3_ttt_dtypes_and_tiles(dtype, head_dim, tiles):
    q, k, v, grad_out = _eagle3_inputs(1, 4, 2, 45, 3, head_dim, dtype, seed=4)
    ours = _fwd_bwd(lambda q, k, v: eagle3_ttt_attention_triton(q, k, v, tiles=tiles), q, k, v, grad_out)
    want = _fwd_bwd(lambda q, k, v: eagle3_ttt_attention_reference(q, k, v), q, k, v, grad_out)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, want):
        _assert_close(name, got, ref)


def test_eagle3_clear_errors():
    q, k, v, _ = _eagle3_inputs(1, 4, 2, 8, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        eagle3_ttt_attention_triton(q, k[:, :, :-1], v[:, :, :-1])
    with pytest.raises(ValueError, match="n_kv_heads=2 must divide n_q_heads=3"):
        eagle3_ttt_attention_triton(q[:, :3], k, v)


# ---------------------------------------------------------------------------------------------------
# the real compiler (no GPU needed): the interpreter accepts some programs the compiler rejects
# ---------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from spec_kernels.common import default_tiles
    from spec_kernels.dflash_attention import (_block_attn_bwd_dkdv_kernel, _block_attn_bwd_dq_kernel,
                                               _block_attn_fwd_kernel)
    from spec_kernels.eagle3_attention import _eagle3_bwd_dkdv_kernel, _eagle3_bwd_dq_kernel, _eagle3_fwd_kernel

    def signature(kernel, dtype, constexprs):
        special = {"Lse": "*fp32", "Delta": "*fp32", "Anchor": "*i32", "TileMaxAnchor": "*i32"}
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in special:
                sig[name] = special[name]
            elif name[0].isupper():                  # tensor pointers are capitalised
                sig[name] = "*" + dtype
            elif name.startswith("qk_scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    def divisible_by_16(kernel, sig):                # what the JIT sees for 16-aligned shapes
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                if sig[name] != "constexpr" and (name[0].isupper() or name in ("ctx_len", "n_rows", "seq_len")
                                                 or (name.startswith("stride_") and not name.startswith("stride_a")))}

    target = GPUTarget("cuda", 90, 32)               # H100
    for head_dim, causal in [(64, False), (128, True), (256, False)]:
        tiles, eagle3_tiles = default_tiles(head_dim), default_tiles(head_dim, kind="eagle3")
        launches = [(_block_attn_fwd_kernel, tiles.fwd), (_block_attn_bwd_dkdv_kernel, tiles.dkdv),
                    (_block_attn_bwd_dq_kernel, tiles.dq), (_eagle3_fwd_kernel, eagle3_tiles.fwd),
                    (_eagle3_bwd_dkdv_kernel, eagle3_tiles.dkdv), (_eagle3_bwd_dq_kernel, eagle3_tiles.dq)]
        for kernel, kt in launches:
            constexprs = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=kt.block_m, BLOCK_N=kt.block_n,
                              DOT_PRECISION="tf32")
            if "CAUSAL_IN_BLOCK" in kernel.arg_names:
                constexprs["CAUSAL_IN_BLOCK"] = causal
            sig = signature(kernel, "bf16", constexprs)
            compiled = triton.compile(ASTSource(kernel, sig, constexprs, divisible_by_16(kernel, sig)),
                                      target=target, options=dict(num_warps=kt.warps, num_stages=kt.stages))
            assert compiled.metadata.shared <= 227 * 1024, (kernel.fn.__name__, compiled.metadata.shared)
            print("compiled", kernel.fn.__name__, head_dim, compiled.metadata.shared)
""")


def test_kernels_compile_for_h100():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 18, proc.stdout
