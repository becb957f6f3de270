"""Benchmark the Triton DFlash block attention against flex_attention and dense-mask SDPA (GPU only).

    python benchmarks/bench_block_attention.py                 # full grid
    python benchmarks/bench_block_attention.py --quick         # headline shapes only
    python benchmarks/bench_block_attention.py --out /tmp/res  # where JSON (and PNG) go
    python benchmarks/bench_block_attention.py --quick --sweep-tiles   # + time alternative tile sizes

For every shape it times forward, backward and forward+backward of
  * ours : spec_kernels.dflash_attention.block_attention_triton
  * flex : torch.compile(flex_attention) with the equivalent BlockMask (create_block_mask, mask_mod
           reading the anchors), enable_gqa=True
  * sdpa : F.scaled_dot_product_attention with the dense boolean mask [batch, 1, N*B, S+N*B]; K/V are
           expanded to n_q_heads beforehand (outside the timed region, which flatters SDPA)
in the same process, with triton.testing.do_bench (CUDA events, median), and reports the ratios
flex/ours and sdpa/ours (> 1 means ours is faster).  Before timing, it checks at full size that ours
matches flex (relative RMS error of output and dq/dk/dv <= --tol).  Writes <out>/block_attention.json
and, when matplotlib is installed, <out>/block_attention.png.  Without a CUDA GPU it prints
"no CUDA GPU: skipping" and exits 0.

Anchors are drawn so that every block is real (no padding: SDPA returns NaN on fully masked rows) and,
by default, sorted ascending over [B, S] as when anchors are positions sampled along one sequence;
--anchors random draws them unsorted (a query tile then mixes short and long prefixes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

DEVICE = "cuda"   # a module global only so that a CPU dry run of the plumbing can override it


@dataclass(frozen=True)
class Case:
    ctx_len: int          # S
    n_blocks: int         # N
    block_size: int       # B
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    batch: int = 1
    causal_in_block: bool = False

    @property
    def name(self) -> str:
        causal = " causal" if self.causal_in_block else ""
        return (f"b{self.batch} S{self.ctx_len} N{self.n_blocks} B{self.block_size} "
                f"h{self.n_q_heads}/{self.n_kv_heads} d{self.head_dim}{causal}")


HEADLINE = [
    Case(4096, 512, 16, 32, 32, 128),
    Case(4096, 512, 16, 32, 8, 128),
]
GRID = HEADLINE + [
    Case(4096, 512, 16, 32, 8, 128, causal_in_block=True),
    Case(4096, 512, 16, 32, 8, 64),
    Case(4096, 256, 16, 16, 4, 256),
    Case(4096, 1024, 8, 32, 8, 128),
    Case(1024, 128, 16, 32, 8, 128, batch=4),
    Case(8192, 512, 16, 32, 8, 128),
]


def make_anchors(case: Case, how: str, gen: torch.Generator) -> torch.Tensor:
    """[batch, N] int64 in [B, S]: every block real."""
    low = min(case.block_size, case.ctx_len)
    anchors = torch.randint(low, case.ctx_len + 1, (case.batch, case.n_blocks), generator=gen)
    if how == "sorted":
        anchors = anchors.sort(dim=1).values
    return anchors


def make_mask_mod(anchors: torch.Tensor, ctx_len: int, block_size: int, causal_in_block: bool):
    def mask_mod(b, h, q_idx, kv_idx):
        block_id = q_idx // block_size
        anchor = anchors[b, block_id]
        in_context = (kv_idx < ctx_len) & (kv_idx < anchor)
        blk_idx = kv_idx - ctx_len                                   # index among the block tokens
        in_block = (kv_idx >= ctx_len) & (blk_idx // block_size == block_id)
        if causal_in_block:
            in_block = in_block & (blk_idx <= q_idx)
        return (anchor >= 0) & (in_context | in_block)
    return mask_mod


def visible_pairs(case: Case, anchors: torch.Tensor) -> int:
    """Number of (query row, key) pairs that are attended, per head: the useful work."""
    anchors = anchors.clamp(min=0, max=case.ctx_len)
    own = case.block_size * (case.block_size + 1) // 2 if case.causal_in_block else case.block_size ** 2
    return int(anchors.sum().item()) * case.block_size + own * anchors.numel()


def bench_ms(fn, grad_to_none=None) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def time_fwd_bwd(run, q, k, v, grad_out) -> dict:
    """run(q, k, v) -> out. Returns ms for forward (autograd on), backward, and both."""
    def fwd():
        return run(q, k, v)

    out = fwd()
    leaves = [q, k, v]

    def bwd():
        out.backward(grad_out, retain_graph=True)

    def fwd_bwd():
        run(q, k, v).backward(grad_out)

    return {"fwd": bench_ms(fwd), "bwd": bench_ms(bwd, grad_to_none=leaves),
            "fwd_bwd": bench_ms(fwd_bwd, grad_to_none=leaves)}


def rel_rms_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: robust to the odd bf16 rounding flip that a max-error check trips on."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def run_case(case: Case, args, gen: torch.Generator) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from spec_kernels.dflash_attention import block_attention_mask, block_attention_triton

    device, dtype = DEVICE, torch.bfloat16
    n_rows = case.n_blocks * case.block_size
    n_keys = case.ctx_len + n_rows
    anchors = make_anchors(case, args.anchors, gen).to(device)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    q = leaf(case.batch, case.n_q_heads, n_rows, case.head_dim)
    k = leaf(case.batch, case.n_kv_heads, n_keys, case.head_dim)
    v = leaf(case.batch, case.n_kv_heads, n_keys, case.head_dim)
    grad_out = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)

    def ours(q, k, v):
        return block_attention_triton(q, k, v, anchors, case.block_size, causal_in_block=case.causal_in_block)

    mask_mod = make_mask_mod(anchors, case.ctx_len, case.block_size, case.causal_in_block)
    block_mask = create_block_mask(mask_mod, case.batch, None, n_rows, n_keys, device=device)
    flex_compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q, k, v):
        return flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=case.n_kv_heads != case.n_q_heads)

    result = {"case": asdict(case), "name": case.name, "anchors": args.anchors,
              "visible_pairs_per_head": visible_pairs(case, anchors), "ms": {}, "errors": {}}

    # correctness at full size: ours vs flex (output and gradients)
    def outputs_and_grads(run):
        for t in (q, k, v):
            t.grad = None
        out = run(q, k, v)
        out.backward(grad_out)
        return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]

    ours_res, flex_res = outputs_and_grads(ours), outputs_and_grads(flex)
    for t in (q, k, v):
        t.grad = None
    names = ("out", "dq", "dk", "dv")
    check = {name: rel_rms_err(a, b) for name, a, b in zip(names, ours_res, flex_res)}
    result["check_vs_flex"] = check
    result["check_vs_flex_max"] = {name: max_rel_err(a, b) for name, a, b in zip(names, ours_res, flex_res)}
    result["check_ok"] = all(err <= args.tol for err in check.values())
    del ours_res, flex_res

    timings = {"ours": lambda: time_fwd_bwd(ours, q, k, v, grad_out),
               "flex": lambda: time_fwd_bwd(flex, q, k, v, grad_out)}
    if not args.no_sdpa:
        group = case.n_q_heads // case.n_kv_heads
        k_rep = k.detach().repeat_interleave(group, dim=1).requires_grad_(True)
        v_rep = v.detach().repeat_interleave(group, dim=1).requires_grad_(True)
        dense_mask = block_attention_mask(anchors, case.ctx_len, case.block_size, case.causal_in_block)[:, None]

        def sdpa(q, k_, v_):
            return F.scaled_dot_product_attention(q, k_, v_, attn_mask=dense_mask)

        timings["sdpa"] = lambda: time_fwd_bwd(sdpa, q, k_rep, v_rep, grad_out)

    for impl, timed in timings.items():
        try:
            result["ms"][impl] = timed()
        except Exception as exc:  # e.g. out of memory for the dense baseline: record it, keep going
            result["errors"][impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
    ratios = {}
    for base in ("flex", "sdpa"):
        if base in result["ms"] and "ours" in result["ms"]:
            ratios[f"{base}/ours"] = {phase: result["ms"][base][phase] / result["ms"]["ours"][phase]
                                      for phase in ("fwd", "bwd", "fwd_bwd")}
    result["ratios"] = ratios
    if "ours" in result["ms"]:
        pairs = result["visible_pairs_per_head"] * case.n_q_heads
        fwd_flops = 4 * case.head_dim * pairs                # QK^T and PV
        result["ours_tflops"] = {"fwd": fwd_flops / result["ms"]["ours"]["fwd"] / 1e9,
                                 "bwd": 2.5 * fwd_flops / result["ms"]["ours"]["bwd"] / 1e9}
    return result


SWEEP_CANDIDATES = {  # (block_m, block_n, warps, stages) per kernel, for --sweep-tiles (head_dim 128)
    "fwd": [(64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (32, 64, 4, 3)],
    "dkdv": [(32, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (16, 128, 8, 2)],
    "dq": [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
}


def sweep_tiles(case: Case, args, gen: torch.Generator) -> list[dict]:
    """Time ours with other tiles for one kernel at a time (the others at their defaults)."""
    import dataclasses

    from spec_kernels.common import KernelTiles, default_tiles
    from spec_kernels.dflash_attention import block_attention_triton

    device, dtype = DEVICE, torch.bfloat16
    n_rows = case.n_blocks * case.block_size
    anchors = make_anchors(case, args.anchors, gen).to(device)
    q = torch.randn(case.batch, case.n_q_heads, n_rows, case.head_dim, device=device, dtype=dtype)
    k = torch.randn(case.batch, case.n_kv_heads, case.ctx_len + n_rows, case.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad_out = torch.randn_like(q)
    default = default_tiles(case.head_dim, dtype)
    rows = []
    for kernel, candidates in SWEEP_CANDIDATES.items():
        for cand in candidates:
            tiles = dataclasses.replace(default, **{kernel: KernelTiles(*cand)})

            def run(q, k, v, tiles=tiles):
                return block_attention_triton(q, k, v, anchors, case.block_size,
                                              causal_in_block=case.causal_in_block, tiles=tiles)
            row = {"kernel": kernel, "tiles": cand, "default": getattr(default, kernel) == KernelTiles(*cand)}
            try:
                ms = time_fwd_bwd(run, q, k, v, grad_out)
                row.update(fwd=ms["fwd"], bwd=ms["bwd"])
            except Exception as exc:  # e.g. out of shared memory for a large candidate
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            phase = "fwd" if kernel == "fwd" else "bwd"
            shown = f"{row[phase]:.3f} ms {phase}" if phase in row else row["error"]
            print(f"  {kernel:5} m{cand[0]:<4} n{cand[1]:<4} w{cand[2]} s{cand[3]}: {shown}"
                  f"{'   (default)' if row['default'] else ''}", flush=True)
    return rows


def print_table(results: list[dict]) -> None:
    header = (f"{'case':<42} {'ours fwd/bwd/both ms':>24}  {'flex/ours fwd bwd both':>24}  "
              f"{'sdpa/ours fwd bwd both':>24}  {'TFLOP/s f/b':>12}  check")
    print(header)
    print("-" * len(header))
    for res in results:
        ms = res["ms"].get("ours")
        ours_ms = f"{ms['fwd']:.2f}/{ms['bwd']:.2f}/{ms['fwd_bwd']:.2f}" if ms else "error"
        cells = []
        for base in ("flex", "sdpa"):
            ratio = res["ratios"].get(f"{base}/ours")
            cells.append(f"{ratio['fwd']:6.2f} {ratio['bwd']:6.2f} {ratio['fwd_bwd']:6.2f}" if ratio
                         else res["errors"].get(base, "n/a")[:24])
        tflops = res.get("ours_tflops")
        tf = f"{tflops['fwd']:.0f}/{tflops['bwd']:.0f}" if tflops else "-"
        worst = max(res["check_vs_flex"].values())
        print(f"{res['name']:<42} {ours_ms:>24}  {cells[0]:>24}  {cells[1]:>24}  {tf:>12}  "
              f"{'ok' if res['check_ok'] else 'MISMATCH'} ({worst:.1e})")
    print("ratios > 1: ours is faster. check: worst ||ours - flex|| / ||flex|| over out, dq, dk, dv.")


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return
    phases = ("fwd", "bwd", "fwd_bwd")
    names = [res["name"] for res in results]
    fig, axes = plt.subplots(1, 2, figsize=(16, 0.6 * len(names) + 2.5), sharey=True)
    for ax, base in zip(axes, ("flex", "sdpa")):
        height = 0.8 / len(phases)
        for i, phase in enumerate(phases):
            values = [res["ratios"].get(f"{base}/ours", {}).get(phase, float("nan")) for res in results]
            ax.barh([y + i * height for y in range(len(names))], values, height=height, label=phase)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"speedup of ours over {base} ({base} time / our time)")
        ax.set_yticks([y + height for y in range(len(names))], names)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--quick", action="store_true", help="headline shapes only")
    parser.add_argument("--anchors", choices=("sorted", "random"), default="sorted")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the dense-mask SDPA baseline")
    parser.add_argument("--tol", type=float, default=1e-2,
                        help="largest allowed ||ours - flex|| / ||flex|| for out, dq, dk, dv (bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="also time ours on the h32/8 headline shape with alternative tiles per kernel")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA GPU: skipping")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)

    gen = torch.Generator().manual_seed(args.seed)
    cases = HEADLINE if args.quick else GRID
    results = []
    for case in cases:
        start = time.time()
        print(f"{case.name} ...", flush=True)
        results.append(run_case(case, args, gen))
        print(f"  done in {time.time() - start:.0f}s: {json.dumps(results[-1]['ratios'])}", flush=True)
        torch.cuda.empty_cache()

    sweep = None
    if args.sweep_tiles:
        print(f"tile sweep on {HEADLINE[1].name}:")
        sweep = sweep_tiles(HEADLINE[1], args, gen)

    print()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, anchors {args.anchors}")
    print_table(results)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "block_attention.json")
    import triton
    with open(json_path, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "anchors": args.anchors, "results": results,
                   "tile_sweep": sweep}, fh, indent=2)
    print(f"wrote {json_path}")
    plot(results, os.path.join(args.out, "block_attention.png"))
    if not all(res["check_ok"] for res in results):
        print("CORRECTNESS MISMATCH vs flex_attention (see check column)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
