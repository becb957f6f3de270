"""One GPU check of the five hot spots of sglang-ext: one command, one table, one JSON file.

    python benchmarks/gpu_check.py                       # everything, real sizes (needs a CUDA GPU; at most ~8 min)
    python benchmarks/gpu_check.py --parts a,c           # only some parts
    python benchmarks/gpu_check.py --tiny                # tiny shapes: runs on CPU (Triton interpreter) in seconds
    python benchmarks/gpu_check.py --out /tmp/check.json --budget b=300

Figures are only meaningful on the GPU. --tiny exists to check the plumbing anywhere (tests/test_gpu_check.py
runs it; shapes in TINY below): its timings are of the CPU and the Triton interpreter and say nothing about
the kernels' speed, and goals show "n/a CPU". flex_attention has no backward on CPU, so there its mask
function is made dense and run through SDPA instead (the mask and the plumbing are still checked).
The script never imports SGLang (the GPU machine it is written for has none): it refuses `import sglang`
itself (a sys.meta_path finder), so a dev box with SGLang installed runs exactly what the GPU machine runs.

Parts (each isolated: a part that raises or runs past its time budget is reported as failed, with its error
and whatever it measured before, and the others still run; budgets a=150, b=200, c=60, d=30, e=30 seconds,
`--budget b=300` changes one; the goals are printed next to the results and do not fail a part):

a. Triton DFlash block attention (spec_kernels/dflash_attention.py), bf16, at the headline shape of
   benchmarks/bench_block_attention.py (whose helpers it imports):
       q [16, 32, N*B = 8192, 128]   k, v [16, 32, S + N*B = 12288, 128]   anchors [16, 512] sorted in [B, S]
       (S = 4096 context tokens, N = 512 blocks of B = 16; the kernel takes any block size, 16 is the draft's)
   Correctness: forward output and dq / dk / dv against the fp32 PyTorch reference `block_attention_reference`
   (dense [N*B, S+N*B] scores, so it is run per batch element and per 8 heads, on 3 of the 16 batch
   elements): max |ours - ref| <= tol * max(1, max |ref|) (tol 3e-2 for bf16, as in tests/test_block_attention.py)
   and ||ours - ref|| / ||ref|| <= 1e-2; and ours against flex_attention (rel. RMS <= 1e-2: checks that the
   flex block mask is the same attention before comparing speeds).
   Speed: forward, backward and forward+backward (triton.testing.do_bench, median) of ours, of
   torch.compile(flex_attention) with the same BlockMask, and of SDPA with the dense boolean mask
   [16, 1, 8192, 12288].  Goals: fwd+bwd flex / ours >= 1.5 and SDPA / ours >= 3.

b. One training step of a Qwen3-8B-shaped DFlash draft through the shared step (trainer/train_step.py
   `TrainStep`, `Precision.for_device("cuda")`: bf16 autocast, fp32 master weights, fused AdamW, the Triton
   kernel; the DFlash kind `get_kind("dflash")`, draft from `DFlashDraft.from_scratch`, random weights):
       draft   5 layers, hidden 4096, 32 q / 8 kv heads x 128, MLP 12288, block size 16 (~1.05 B parameters)
       target  Qwen3-8B: 36 layers, features of 5 of them -> target_hidden [records, 4096, 5*4096] bf16 (random);
               frozen embedding and lm_head [151936, 4096] bf16 (random)
       batch   16 records x 4096 tokens (all in the loss), 512 anchors per record -> 8192 block rows per record
   Reported: tokens/s (record tokens per second of optimizer step), step time, peak memory
   (torch.cuda.max_memory_allocated over the measured steps), and the same step with flex_attention as the
   attention (the SpecForge recipe: torch.compile(flex_attention), a BlockMask built once per forward),
   plugged in by swapping `trainer.dflash_draft.block_attention` for the duration of that run (no library
   file changes).  If 16 records do not fit in one forward, the 16 records of the step are split into
   micro-batches (gradient accumulation, as `TrainStep.run` does with several batches), and the output says
   so.  lr is 0 so that both attentions see the same weights (the optimizer step still runs in full): the
   first steps' losses must agree (check), which validates the flex plumbing.

c. Hot swap of a ~1 B-parameter draft (part b's draft shape, SGLang's fused qkv / gate_up parameters) into live
   bf16 parameters, through benchmarks/bench_swap.py, which drives the production code on the real
   WeightSlot (pageable shared memory) and a plain-torch stand-in for SGLang's draft module:
   old     the first design: an fp32 slot, and at the swap point torch.cuda.synchronize(), load_weights from
           it (host->device with the cast, into blocks of rows), torch.cuda.synchronize()
   staged  today: a bf16 slot (the serving dtype) and `sglang_ext.online.swap.staging.StagedSwap`: `stage` off the
           critical path (slot -> pinned host -> device staging buffers on a side stream, an event), then
           at the swap point `apply`: the copy
           stream waits on the event, device-to-device copies of the trained rows, no device-wide synchronize
   Reported per path (median of 10 after a warm-up): host wall time of the swap call, CUDA-event time of its
   work, and the stall until that work finished (the GPU otherwise idle); the staging time. Checks: the staged
   path leaves exactly the slot's weights (cast to bf16) in the same storage. Goal: staged stall <= 2 ms.

d. The capture hot path: `sglang_ext.online.scheduler.capture.Capture.observe` (the feature-pool write of a
   verify step) for 64 requests, with device tensors: verify rows [64*4, 5*4096] bf16, starts / commit_lens
   int64 [64] (random commit lengths 1..4), the requests' req_to_token rows, a feature pool of one bf16 row per
   KV slot, 200 steps, each ending with a synchronize (the scheduler reads every verify result), then
   `Capture.release` of every request (one gather from the pool, one asynchronous copy to the host).  Reported:
   host microseconds per verify step added by observe() (mean / p50 / p99; it includes the poll that meters the
   previous step's commit lengths), the stream time of the pool write (CUDA events), wall time per step against
   the same loop without recording, release() time per request, and whether observe() synchronizes with the
   device (GPU only): it is called while a ~50 ms kernel is queued; if it returns before the kernel finished, it
   did not wait.  Check: every request's committed rows come out of the pool bit-exact at the right positions,
   and positions never written are gaps.

e. The draft KV refresh after a swap (sglang_ext/online/scheduler/refresh.py): 4096 cached tokens of the part b
   draft (5 layers, bf16) whose draft KV an older version wrote, re-projected from a feature pool of bf16 rows
   [8193, 5*4096]: the staleness check, the gather, fc + hidden norm, and per layer k/v projection, k norm and
   RoPE written into per-layer KV buffers at the tokens' slots (the same math as SGLang's DFlash KV append,
   through the training-form draft: no SGLang on the GPU machine). Reported: milliseconds per refresh (median
   of 4 after a warm-up) and per token. Checks: the refreshed KV equals the KV projected straight from the
   features (bf16 tolerance); nothing is stale afterwards.

Writes --out (default benchmarks/results/gpu_check.json; --tiny: gpu_check_tiny.json) with every number,
check, goal and error.  Exit code 0 when every part ran and passed its checks (goals do not count).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.abc
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):          # run from a checkout; bench_block_attention is imported
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PART_TITLES = {
    "a": "DFlash block attention (Triton) vs reference / flex / SDPA",
    "b": "DFlash draft training step (TrainStep), ours vs flex attention",
    "c": "hot swap of a 1B draft: today's path vs staged",
    "d": "capture: Capture.observe per verify step",
    "e": "draft KV refresh: re-projecting cached tokens from the feature pool",
}
FULL_BUDGET_S = {"a": 150, "b": 200, "c": 60, "d": 30, "e": 30}    # 7 min 50 s in all, + start-up
TINY_BUDGET_S = {"a": 60, "b": 60, "c": 30, "d": 30, "e": 30}

# Qwen3-8B's config.json (the fields a DFlash draft config reads)
QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, intermediate_size=12288, vocab_size=151936, rope_theta=1_000_000.0,
                max_position_embeddings=40960, rms_norm_eps=1e-6)
TINY_TARGET = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=128, vocab_size=512, rope_theta=1_000_000.0,
                   max_position_embeddings=4096, rms_norm_eps=1e-6)


@dataclass(frozen=True)
class Shapes:
    # a: attention
    attn_batch: int
    attn_heads: int
    attn_kv_heads: int
    attn_head_dim: int
    attn_ctx: int                 # S
    attn_blocks: int              # N
    block_size: int               # B (a and b)
    attn_check_batches: int       # batch elements checked against the dense fp32 reference
    # b: training step
    target: dict
    draft_layers: int
    records: int
    record_tokens: int
    anchors: int
    train_steps: int              # measured steps per attention (after one warm-up step)
    # d: capture
    capture_requests: int
    capture_stride: int           # verify rows per request (the block size of the served draft)
    capture_steps: int
    compile_flex: bool            # torch.compile(flex_attention) (the real baseline); eager in the tiny run
    # e: draft KV refresh
    refresh_tokens: int           # cached tokens re-projected in one refresh


FULL = Shapes(attn_batch=16, attn_heads=32, attn_kv_heads=32, attn_head_dim=128, attn_ctx=4096, attn_blocks=512,
              block_size=16, attn_check_batches=3, target=QWEN3_8B, draft_layers=5, records=16,
              record_tokens=4096, anchors=512, train_steps=2, capture_requests=64, capture_stride=4,
              capture_steps=200, compile_flex=True, refresh_tokens=4096)
TINY = Shapes(attn_batch=2, attn_heads=2, attn_kv_heads=2, attn_head_dim=32, attn_ctx=48, attn_blocks=4,
              block_size=16, attn_check_batches=2, target=TINY_TARGET, draft_layers=2, records=2,
              record_tokens=48, anchors=4, train_steps=1, capture_requests=4, capture_stride=4, capture_steps=5,
              compile_flex=False, refresh_tokens=32)

# bf16 attention tolerances: max |got - want| <= TOL * max(1, max |want|) (tests/test_block_attention.py), and
# ||got - want|| / ||want|| <= REL_RMS_TOL (benchmarks/bench_block_attention.py --tol)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
REL_RMS_TOL = 1e-2


# ------------------------------------------------------------------------------------------------------------
# plumbing: no SGLang, per-part report, time budget
# ------------------------------------------------------------------------------------------------------------
class NoSGLang(importlib.abc.MetaPathFinder):
    """Refuses `import sglang` (and submodules): the GPU machine has no SGLang, and nothing here may need it."""

    def find_spec(self, name, path=None, target=None):
        if name == "sglang" or name.startswith("sglang."):
            raise ImportError(f"benchmarks/gpu_check.py runs without SGLang: import of {name!r} refused")
        return None


def block_sglang() -> None:
    if not any(isinstance(f, NoSGLang) for f in sys.meta_path):
        sys.meta_path.insert(0, NoSGLang())


class PartTimeout(BaseException):
    """Raised by SIGALRM when a part runs past its budget (BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the body after `seconds` (main thread only; elsewhere the budget is only reported)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise PartTimeout(f"time budget of {seconds:.0f}s exceeded")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Part:
    """What one part reports; filled as the part runs, so a part cut short keeps what it measured."""

    def __init__(self, letter: str, budget_s: float, clock0: float, on_gpu: bool = True):
        self.letter, self.title, self.budget_s, self.clock0 = letter, PART_TITLES[letter], budget_s, clock0
        self.on_gpu = on_gpu                # goals are judged only on the GPU
        self.start = time.monotonic()
        self.rows: list[dict] = []          # table rows, in order: metrics, checks, goals
        self.metrics: dict = {}
        self.checks: dict = {}
        self.goals: dict = {}
        self.shapes: dict = {}
        self.notes: list[str] = []
        self.status = "running"
        self.error: str | None = None
        self.traceback: str | None = None
        self.seconds = 0.0

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.clock0:7.1f}s] {self.letter}: {msg}", flush=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def metric(self, name: str, value, unit: str = "", fmt: str = ".3g") -> None:
        self.metrics[name] = {"value": value, "unit": unit}
        text = format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        self.rows.append({"item": name, "value": f"{text} {unit}".strip(), "target": "", "result": ""})

    def check(self, name: str, ok: bool, value: str, target: str) -> None:
        self.checks[name] = {"ok": bool(ok), "value": value, "target": target}
        self.rows.append({"item": name, "value": value, "target": target, "result": "PASS" if ok else "FAIL"})

    def goal(self, name: str, value: float, target: float, unit: str, higher_is_better: bool) -> None:
        met = bool(value >= target if higher_is_better else value <= target) if self.on_gpu else None
        op = ">=" if higher_is_better else "<="
        self.goals[name] = {"value": value, "target": f"{op} {target:g}{unit}", "met": met}
        self.rows.append({"item": name, "value": f"{value:.3g}{unit}", "target": f"{op} {target:g}{unit}",
                          "result": {True: "MET", False: "MISSED", None: "n/a CPU"}[met]})

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.log(text)

    def as_json(self) -> dict:
        return {"title": self.title, "status": self.status, "seconds": round(self.seconds, 2),
                "budget_s": self.budget_s, "shapes": self.shapes, "metrics": self.metrics, "checks": self.checks,
                "goals": self.goals, "notes": self.notes, "error": self.error, "traceback": self.traceback}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# ------------------------------------------------------------------------------------------------------------
# flex_attention with the DFlash block mask (the baseline of parts a and b)
# ------------------------------------------------------------------------------------------------------------
class FlexBlockAttention:
    """Drop-in for `spec_kernels.dflash_attention.block_attention` that runs torch's flex_attention with the
    DFlash block mask, as the SpecForge recipe trains DFlash: torch.compile(flex_attention), and a BlockMask
    built once per draft forward (every layer gets the same anchors tensor, so it is cached on it). The mask
    function (bench_block_attention.make_mask_mod) reads the anchors from one persistent buffer, so the
    compiled kernel never sees a new closure.

    flex_attention has no backward on CPU: there (the --tiny plumbing run) the same mask function is made
    dense (create_mask) and run through SDPA instead, which still checks the mask and the plumbing."""

    def __init__(self, compiled: bool):
        from torch.nn.attention import flex_attention as fa
        self.fa = fa
        self.flex = torch.compile(fa.flex_attention, dynamic=False) if compiled else fa.flex_attention
        self.anchors_buf: torch.Tensor | None = None      # [b, N] long, the current forward's anchors
        self.mask_mod = None
        self.mask_key = None                               # what mask_mod was built for
        self.seen: torch.Tensor | None = None              # the anchors tensor the cached mask was built for
        self.mask = None                                   # BlockMask (GPU) or dense [b, 1, N*B, S+N*B] (CPU)

    def _mask(self, anchors, ctx_len, block_size, causal_in_block, b, rows, keys):
        if self.seen is anchors:
            return self.mask
        key = (tuple(anchors.shape), anchors.device, ctx_len, block_size, causal_in_block)
        if key != self.mask_key:                           # a new mask function only when the layout changes
            import bench_block_attention as bba
            self.anchors_buf = torch.empty_like(anchors, dtype=torch.long)
            self.mask_mod = bba.make_mask_mod(self.anchors_buf, ctx_len, block_size, causal_in_block)
            self.mask_key = key
        self.anchors_buf.copy_(anchors)
        if anchors.device.type == "cpu":
            self.mask = self.fa.create_mask(self.mask_mod, b, 1, rows, keys, device=anchors.device)
        else:
            self.mask = self.fa.create_block_mask(self.mask_mod, b, None, rows, keys, device=anchors.device)
        self.seen = anchors
        return self.mask

    def __call__(self, q, k, v, anchors, block_size, *, causal_in_block=False, scale=None, backend="auto"):
        """q [b, Hq, N*B, D], k / v [b, Hkv, S + N*B, D], anchors [b, N] -> [b, Hq, N*B, D]."""
        b, n_q_heads, rows, _ = q.shape
        keys = k.shape[2]
        mask = self._mask(anchors, keys - rows, block_size, causal_in_block, b, rows, keys)
        gqa = n_q_heads != k.shape[1]
        with torch.autocast(q.device.type, enabled=False):       # q, k, v are already in the compute dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
            if q.device.type == "cpu":
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                        enable_gqa=gqa)
            return self.flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)


# ------------------------------------------------------------------------------------------------------------
# a. DFlash block attention
# ------------------------------------------------------------------------------------------------------------
class ErrStats:
    """max |got - want|, max |want| and squared sums (for the relative RMS), accumulated over chunks."""

    def __init__(self):
        self.max_abs = self.max_ref = self.sq_err = self.sq_ref = 0.0

    def add(self, got: torch.Tensor, want: torch.Tensor) -> None:
        got, want = got.float(), want.float()
        diff = got - want
        self.max_abs = max(self.max_abs, diff.abs().max().item())
        self.max_ref = max(self.max_ref, want.abs().max().item())
        self.sq_err += diff.pow(2).sum().item()
        self.sq_ref += want.pow(2).sum().item()

    @property
    def rel_rms(self) -> float:
        return math.sqrt(self.sq_err / max(self.sq_ref, 1e-30))


def fwd_bwd_grads(run, q, k, v, grad_out) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of run(q, k, v) with upstream gradient grad_out."""
    for t in (q, k, v):
        t.grad = None
    out = run(q, k, v)
    out.backward(grad_out)
    res = [out.detach(), q.grad.detach().clone(), k.grad.detach().clone(), v.grad.detach().clone()]
    for t in (q, k, v):
        t.grad = None
    return res


def part_attention(p: Part, shapes: Shapes, device: torch.device) -> None:
    import torch.nn.functional as F

    import bench_block_attention as bba
    from spec_kernels.dflash_attention import block_attention_mask, block_attention_reference, block_attention_triton

    dtype = torch.bfloat16
    case = bba.Case(ctx_len=shapes.attn_ctx, n_blocks=shapes.attn_blocks, block_size=shapes.block_size,
                    n_q_heads=shapes.attn_heads, n_kv_heads=shapes.attn_kv_heads, head_dim=shapes.attn_head_dim,
                    batch=shapes.attn_batch)
    b, B = case.batch, case.block_size
    rows, keys = case.n_blocks * B, case.ctx_len + case.n_blocks * B
    group = case.n_q_heads // case.n_kv_heads
    p.shapes.update(q=[b, case.n_q_heads, rows, case.head_dim], kv=[b, case.n_kv_heads, keys, case.head_dim],
                    anchors=[b, case.n_blocks], block_size=B, ctx_len=case.ctx_len, dtype="bfloat16")
    p.log(f"shape {case.name}: q {p.shapes['q']}, k/v {p.shapes['kv']}")

    gen = torch.Generator(device).manual_seed(0)
    anchors = bba.make_anchors(case, "sorted", torch.Generator().manual_seed(0)).to(device)   # [b, N] in [B, S]

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_(True)

    q = leaf(b, case.n_q_heads, rows, case.head_dim)                 # [b, Hq,  N*B,     D]
    k = leaf(b, case.n_kv_heads, keys, case.head_dim)                # [b, Hkv, S + N*B, D]
    v = leaf(b, case.n_kv_heads, keys, case.head_dim)
    grad_out = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)

    def ours(q, k, v):
        return block_attention_triton(q, k, v, anchors, B)

    # -- correctness: ours vs the fp32 reference, per batch element and per chunk of kv heads --
    p.log("ours forward + backward (first call compiles the kernels) ...")
    ours_res = fwd_bwd_grads(ours, q, k, v, grad_out)
    errs = {name: ErrStats() for name in ("out", "dq", "dk", "dv")}
    check_batches = sorted({0, b // 2, b - 1})[:shapes.attn_check_batches]
    kv_chunk = max(1, min(case.n_kv_heads, 8 // group))              # <= 8 q heads per reference call
    p.log(f"fp32 reference on batch elements {check_batches}, {kv_chunk} kv head(s) at a time ...")
    for bi in check_batches:
        for h0 in range(0, case.n_kv_heads, kv_chunk):
            kvs, qs = slice(h0, h0 + kv_chunk), slice(h0 * group, (h0 + kv_chunk) * group)
            qf = q.detach()[bi:bi + 1, qs].float().requires_grad_(True)     # [1, heads, N*B, D]
            kf = k.detach()[bi:bi + 1, kvs].float().requires_grad_(True)    # [1, kv heads, S+N*B, D]
            vf = v.detach()[bi:bi + 1, kvs].float().requires_grad_(True)
            ref = block_attention_reference(qf, kf, vf, anchors[bi:bi + 1], B)
            ref.backward(grad_out[bi:bi + 1, qs].float())
            for name, got, want in (("out", ours_res[0][bi:bi + 1, qs], ref.detach()),
                                    ("dq", ours_res[1][bi:bi + 1, qs], qf.grad),
                                    ("dk", ours_res[2][bi:bi + 1, kvs], kf.grad),
                                    ("dv", ours_res[3][bi:bi + 1, kvs], vf.grad)):
                errs[name].add(got, want)
            del qf, kf, vf, ref
    tol = TOL[dtype]
    for name, e in errs.items():
        ok = e.max_abs <= tol * max(1.0, e.max_ref) and e.rel_rms <= REL_RMS_TOL
        p.check(f"{name} vs fp32 reference",
                ok, f"max abs {e.max_abs:.2e} (rel {e.max_abs / max(e.max_ref, 1e-30):.2e}), rms {e.rel_rms:.1e}",
                f"<= {tol:g}*max(1,|ref|), rms <= {REL_RMS_TOL:g}")
    free_memory()

    # -- flex_attention with the same block mask (its BlockMask is built on the first call, then reused) --
    flex_attn = FlexBlockAttention(compiled=shapes.compile_flex)
    if device.type == "cpu":
        p.note("flex has no CPU backward: 'flex' is its mask function made dense + SDPA here (plumbing only)")

    def flex(q, k, v):
        return flex_attn(q, k, v, anchors, B)

    p.log("flex_attention forward + backward (first call compiles it) ...")
    try:
        flex_res = fwd_bwd_grads(flex, q, k, v, grad_out)
        worst = max(bba.rel_rms_err(a, c) for a, c in zip(ours_res, flex_res))
        p.check("ours vs flex (out, dq, dk, dv)", worst <= REL_RMS_TOL, f"rms {worst:.1e}", f"<= {REL_RMS_TOL:g}")
        del flex_res
    except Exception as exc:                       # flex broken: still time ours and SDPA
        p.check("ours vs flex (out, dq, dk, dv)", False, first_line(exc)[:46], "flex runs")
        p.traceback = traceback.format_exc()
    del ours_res
    free_memory()

    # -- SDPA with the dense boolean mask (K/V expanded to the q heads outside the timed region) --
    dense_mask = block_attention_mask(anchors, case.ctx_len, B)[:, None]          # [b, 1, N*B, S+N*B] bool
    k_rep = k.detach().repeat_interleave(group, dim=1).requires_grad_(True) if group > 1 else k
    v_rep = v.detach().repeat_interleave(group, dim=1).requires_grad_(True) if group > 1 else v

    def sdpa(q, k_, v_):
        return F.scaled_dot_product_attention(q, k_, v_, attn_mask=dense_mask)

    # -- timings --
    def timed(run, kk, vv) -> dict:
        if device.type == "cuda":
            return bba.time_fwd_bwd(run, q, kk, vv, grad_out)          # do_bench medians, ms
        out = {}                                                        # CPU plumbing run: one call each
        t0 = time.perf_counter()
        o = run(q, kk, vv)
        out["fwd"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        o.backward(grad_out)
        out["bwd"] = (time.perf_counter() - t0) * 1e3
        out["fwd_bwd"] = out["fwd"] + out["bwd"]
        for t in (q, kk, vv):
            t.grad = None
        return out

    ms = {}                                                             # impl -> {fwd, bwd, fwd_bwd} ms
    p.metrics["ms"] = {"value": ms, "unit": "ms"}
    for name, run, kk, vv in (("ours", ours, k, v), ("flex", flex, k, v), ("sdpa", sdpa, k_rep, v_rep)):
        p.log(f"timing {name} ...")
        if name == "ours":
            ms[name] = timed(run, kk, vv)
        else:
            try:
                ms[name] = timed(run, kk, vv)
            except Exception as exc:               # e.g. the dense baseline does not fit: say so, go on
                p.note(f"{name} not timed: {first_line(exc)}")
        if name in ms:
            t = ms[name]
            p.metric(f"{name} fwd / bwd / fwd+bwd", f"{t['fwd']:.3f} / {t['bwd']:.3f} / {t['fwd_bwd']:.3f}", "ms")
        free_memory()
    if "ours" in ms:
        pairs = bba.visible_pairs(case, anchors) * case.n_q_heads
        flops = 4 * case.head_dim * pairs * 3.5                        # fwd (QK^T, PV) + bwd (2.5x)
        p.metric("ours fwd+bwd throughput", flops / ms["ours"]["fwd_bwd"] / 1e9, "TFLOP/s (useful)", ".1f")
        for base, target in (("flex", 1.5), ("sdpa", 3.0)):
            if base in ms:
                p.goal(f"fwd+bwd speedup {base}/ours", ms[base]["fwd_bwd"] / ms["ours"]["fwd_bwd"], target, "x",
                       higher_is_better=True)


# ------------------------------------------------------------------------------------------------------------
# b. one training step of the DFlash draft: our kernel vs flex_attention
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def draft_attention(fn):
    """Run the DFlash draft with `fn` in place of `block_attention` (the name trainer.dflash_draft calls)."""
    import trainer.dflash_draft as dflash_draft
    saved = dflash_draft.block_attention
    dflash_draft.block_attention = fn
    try:
        yield
    finally:
        dflash_draft.block_attention = saved


def dflash_config(shapes: Shapes):
    from trainer.draft_kind import get_kind
    kind = get_kind("dflash")
    vocab = shapes.target["vocab_size"]
    cfg = kind.config_for_target(shapes.target, num_layers=shapes.draft_layers, block_size=shapes.block_size,
                                 mask_token_id=vocab - 1)
    return kind, cfg


def part_train_step(p: Part, shapes: Shapes, device: torch.device) -> None:
    from trainer.dflash_draft import param_count
    from trainer.train_step import Batch, Precision, TrainStep

    cuda = device.type == "cuda"
    kind, cfg = dflash_config(shapes)
    # CPU plumbing run: fp32, our kernel under the Triton interpreter (backend "auto" would pick the reference)
    precision = Precision.for_device(device) if cuda else Precision.for_device(device, attention_backend="triton")
    R, T, A = shapes.records, shapes.record_tokens, shapes.anchors
    H, V, K = cfg.hidden_size, cfg.vocab_size, cfg.num_context_features
    p.shapes.update(draft_layers=cfg.num_hidden_layers, hidden=H, heads=cfg.num_attention_heads,
                    kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
                    block_size=cfg.block_size, target_layer_ids=cfg.target_layer_ids, vocab=V,
                    records=R, tokens_per_record=T, anchors_per_record=A, target_hidden=[R, T, K * H],
                    precision=f"{precision.dtype} autocast, fp32 master weights, attention {precision.kernel}")

    p.log(f"building the draft ({cfg.num_hidden_layers} layers, hidden {H}, K={K}) and a batch of {R} x {T} ...")
    draft = kind.from_scratch(cfg, seed=0).to(device)
    p.metric("draft parameters", param_count(draft) / 1e6, "M", ".1f")
    gen = torch.Generator(device).manual_seed(0)
    head = [torch.randn(V, H, device=device, dtype=precision.dtype, generator=gen) * 0.02 for _ in range(2)]
    kind.attach_target(draft, head[0], head[1], target_path="")           # frozen embedding, lm_head [V, H]
    input_ids = torch.randint(0, V - 1, (R, T), device=device, generator=gen)                    # [R, T]
    target_hidden = torch.randn(R, T, K * H, device=device, dtype=precision.dtype, generator=gen)  # [R, T, K*H]
    loss_mask = torch.ones(R, T, dtype=torch.bool, device=device)                                # [R, T]

    def micro_batches(m: int) -> list:
        return [Batch(input_ids[i:i + m], target_hidden[i:i + m], loss_mask[i:i + m], m * T) for i in range(0, R, m)]

    def generators(n: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(1000 + i) for i in range(n)]     # the same anchors every step

    def drop_grads() -> None:
        for param in draft.parameters():
            param.grad = None

    def run_variant(label: str, attention, micro: int) -> dict:
        """A warm-up step, then measured steps, with `attention` as the draft's block attention (None: ours,
        unchanged); on out-of-memory the step's records are split into twice as many micro-batches."""
        while micro >= 1:
            step = TrainStep(kind, draft, precision, lr=0.0, objective={"num_anchors": A})
            batches = micro_batches(micro)
            oom = None
            try:
                with draft_attention(attention) if attention is not None else contextlib.nullcontext():
                    p.log(f"{label}: warm-up step ({len(batches)} micro-batch(es) of {micro} records) ...")
                    sync(device)
                    t0 = time.perf_counter()
                    first = step.run(batches, generators=generators(len(batches)))
                    sync(device)
                    warm_s = time.perf_counter() - t0
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    times = []
                    reserve = 90 if label == "ours" else 5          # ours leaves time for flex's compile
                    for i in range(shapes.train_steps):
                        if i > 0 and p.left() < times[-1] + reserve:
                            p.note(f"{label}: stopped after {i} measured step(s) to stay in the time budget")
                            break
                        sync(device)
                        t0 = time.perf_counter()
                        stats = step.run(batches, generators=generators(len(batches)))
                        sync(device)
                        times.append(time.perf_counter() - t0)
                        p.log(f"{label}: step {i + 1}: {times[-1]:.2f} s, loss {stats.loss:.4f}")
                    peak = torch.cuda.max_memory_allocated(device) if cuda else None
            except torch.cuda.OutOfMemoryError as exc:
                oom = first_line(exc)
            if oom is None:
                break
            del step, batches
            drop_grads()
            free_memory()
            p.note(f"{label}: {R // micro} micro-batch(es) of {micro} records do not fit ({oom[:80]}...); "
                   f"trying micro-batches of {micro // 2}")
            micro //= 2
        else:
            raise RuntimeError(f"{label}: even one record per micro-batch does not fit")
        step_s = statistics.median(times)
        res = {"micro_batch": micro, "warmup_s": warm_s, "step_s": step_s, "tokens_per_s": R * T / step_s,
               "peak_bytes": peak, "first_loss": first.loss, "first_grad_norm": first.grad_norm,
               "applied": first.applied and stats.applied}
        del step, batches
        drop_grads()
        free_memory()
        return res

    def report(label: str, r: dict) -> None:
        results[label] = r
        split = "" if r["micro_batch"] == R else f" ({R // r['micro_batch']} micro-batches of {r['micro_batch']})"
        p.metric(f"{label}: tokens/s{split}", r["tokens_per_s"], "tok/s", ".0f")
        p.metric(f"{label}: step time (warm-up step)", f"{r['step_s']:.3f} ({r['warmup_s']:.1f})", "s")
        if r["peak_bytes"] is not None:
            p.metric(f"{label}: peak memory", r["peak_bytes"] / 2**30, "GiB", ".1f")
        p.metric(f"{label}: first loss / grad norm", f"{r['first_loss']:.4f} / {r['first_grad_norm']:.4f}")

    results: dict[str, dict] = {}
    p.metrics["results"] = {"value": results, "unit": ""}
    report("ours", run_variant("ours", None, R))
    ours = results["ours"]
    p.check("ours: steps applied, finite loss", ours["applied"] and math.isfinite(ours["first_loss"]),
            f"loss {ours['first_loss']:.4f}", "finite")
    if not cuda:
        p.note("flex has no CPU backward: the 'flex' step is its mask function made dense + SDPA here")
    try:                                   # flex starts from the micro-batch size that fitted ours
        report("flex", run_variant("flex", FlexBlockAttention(compiled=shapes.compile_flex), ours["micro_batch"]))
    except Exception as exc:               # ours is reported; say why flex has no number
        p.note(f"flex variant failed: {first_line(exc)}")
        p.traceback = traceback.format_exc()
    p.check("flex variant ran", "flex" in results, "yes" if "flex" in results else "no", "yes")
    if "flex" in results:
        flex = results["flex"]
        if flex["micro_batch"] == ours["micro_batch"]:       # same weights (lr 0), same anchors, same split
            rel = abs(ours["first_loss"] - flex["first_loss"]) / max(abs(flex["first_loss"]), 1e-12)
            p.check("same loss with both attentions", rel <= 1e-2, f"rel diff {rel:.1e}", "<= 1e-2")
        p.metric("tokens/s ours / flex", ours["tokens_per_s"] / flex["tokens_per_s"], "x", ".2f")
        if ours["peak_bytes"] and flex["peak_bytes"]:
            p.metric("peak memory ours / flex", ours["peak_bytes"] / flex["peak_bytes"], "x", ".2f")
        if flex["micro_batch"] != ours["micro_batch"]:
            p.note(f"micro-batches differ (ours {ours['micro_batch']}, flex {flex['micro_batch']} records): "
                   "losses not compared")


# ------------------------------------------------------------------------------------------------------------
# c. hot swap: today's path vs staged (the production code: benchmarks/bench_swap.py drives
#    sglang_ext.online.swap.staging on an SGLang-shaped stand-in draft and the real WeightSlot)
# ------------------------------------------------------------------------------------------------------------
def part_hot_swap(p: Part, shapes: Shapes, device: torch.device) -> None:
    import bench_swap

    _, cfg = dflash_config(shapes)
    dims = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "inter": cfg.intermediate_size}
    cuda = device.type == "cuda"
    p.log(f"{cfg.num_hidden_layers}-layer draft of part b's shape, bf16 live weights (old: fp32 slot) ...")
    r = bench_swap.run(layers=cfg.num_hidden_layers, dtype="bfloat16", device=str(device),
                       repeats=10 if cuda else 1, dims=dims)       # asserts the staged path wrote the slot's values
    p.shapes.update(draft=f"{cfg.num_hidden_layers} layers, hidden {dims['hidden']}", parameters=r["params"],
                    live_dtype="bfloat16", slot_dtype="bfloat16 (old: float32)")
    p.metric("draft parameters", r["params"] / 1e6, "M", ".1f")
    p.metrics["swap"] = {"value": r, "unit": "ms"}
    p.check("staged path wrote the slot's weights (bf16)", r["staged_equals_slot"], "every weight compared", "equal")
    p.check("live storage kept (CUDA graphs valid)", r["storage_kept"], "kept" if r["storage_kept"] else "moved",
            "kept")
    for path in ("old", "staged"):
        p.metric(f"{path}: host / device / until done", f"{r[f'{path}_stall_ms']:.3f} / "
                 f"{r[f'{path}_stall_device_ms'] if r[f'{path}_stall_device_ms'] is not None else float('nan'):.3f}"
                 f" / {r[f'{path}_stall_until_done_ms']:.3f}", "ms")
    p.metric("staged: staging (off the critical path)", r["staging_ms"], "ms", ".1f")
    p.goal("staged stall", r["staged_stall_until_done_ms"], 2.0, " ms", higher_is_better=False)


# ------------------------------------------------------------------------------------------------------------
# d. capture: Capture.observe per verify step
# ------------------------------------------------------------------------------------------------------------
class NoMetrics:
    """Stands in for OnlineMetrics: every method accepts anything and does nothing; the live draft is version 0."""

    live_version = 0

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class FINISH_LENGTH:                       # SGLang's finish reasons are classes; the recorder reads the name
    pass


class FakeReq:
    """The fields of SGLang's Req the capture reads (release): ids, its req_to_token row, how it finished."""

    def __init__(self, rid: str, prompt_len: int, row: int):
        self.rid = rid
        self.origin_input_ids = list(range(prompt_len))
        self.output_ids: list[int] = [7]          # the token the prefill produced (no KV yet: the first verify's
        self.multimodal_inputs = None             # row 0)
        self.finished_reason = None
        self.kv = SimpleNamespace(req_pool_idx=row)

    def finished(self) -> bool:
        return self.finished_reason is not None


class FakeBatch:
    """The fields of SGLang's ScheduleBatch a verify step's capture reads: its requests' req_to_token rows."""

    def __init__(self, reqs, req_to_token: torch.Tensor, device):
        self.reqs = reqs
        self.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
        self.req_pool_indices = torch.tensor([r.kv.req_pool_idx for r in reqs], dtype=torch.int64, device=device)


def verify_inputs(n_req: int, stride: int, steps: int, prompt_len: int, device, gen):
    """Per verify step: starts / commit_lens int64 [steps, n_req] on the device (and on the host)."""
    commit = torch.randint(1, stride + 1, (steps, n_req), generator=gen)               # [steps, n_req] 1..stride
    starts = prompt_len + torch.cumsum(commit, 0) - commit                              # position of row 0
    return starts.to(device), commit.to(device), starts, commit


def _pinned_allocs(cuda: bool) -> float:
    """cudaHostAlloc calls so far (torch's caching host allocator reuses freed pinned blocks); nan if unknown."""
    stats = torch.cuda.host_memory_stats() if cuda and hasattr(torch.cuda, "host_memory_stats") else {}
    return float(stats.get("num_host_alloc", float("nan")))


def part_capture(p: Part, shapes: Shapes, device: torch.device) -> None:
    from sglang_ext.online.config import OnlineTrainConfig
    from sglang_ext.online.scheduler.capture import Capture
    from sglang_ext.online.scheduler.pool import FeaturePool

    cuda = device.type == "cuda"
    n_req, stride = shapes.capture_requests, shapes.capture_stride
    H, K = shapes.target["hidden_size"], shapes.draft_layers
    feat, prompt_len, T = K * H, 512, shapes.capture_steps
    context = prompt_len + (T + 1) * stride                 # req_to_token columns: room for every step
    p.shapes.update(requests=n_req, rows_per_request=stride, verify_rows=[n_req * stride, feat], dtype="bfloat16",
                    starts_commit_lens=[n_req], steps=T, prompt_len=prompt_len,
                    pool=[n_req * context + 1, feat])
    cfg = OnlineTrainConfig(enabled=True)
    gen = torch.Generator().manual_seed(0)
    # KV slots as SGLang's allocator hands them out (1..N), request i's row of req_to_token its own range
    req_to_token = (1 + torch.arange(n_req * context, dtype=torch.int64)).view(n_req, context).to(device)
    pool = FeaturePool(n_req * context + 1, feat, torch.bfloat16, device)
    p.metric("feature pool", pool.nbytes / 2**20, "MiB", ".0f")

    def new_recorder():
        sink: list = []
        reqs = [FakeReq(f"req-{i}", prompt_len, i) for i in range(n_req)]
        return Capture(cfg, sink.append, NoMetrics(), pool), reqs, sink

    def advance(reqs, commit_row):
        for req, c in zip(reqs, commit_row):       # the scheduler appends the committed tokens
            req.output_ids.extend([7] * int(c))

    def release_all(rec, reqs):
        for req in reqs:
            req.finished_reason = FINISH_LENGTH()
            rec.release(req, req_to_token)

    # -- correctness: a few steps, every request's committed rows recovered at the right positions --
    steps = min(6, T)
    rec, reqs, sink = new_recorder()
    starts_d, commit_d, starts_h, commit_h = verify_inputs(n_req, stride, steps, prompt_len, device, gen)
    sent = []
    for s in range(steps):
        rows = torch.randn(n_req * stride, feat, generator=gen).to(device, torch.bfloat16)   # [n_req*stride, KH]
        rec.observe(FakeBatch(reqs, req_to_token, device), rows, starts=starts_d[s], commit_lens=commit_d[s],
                    stride=stride, max_accept=stride)
        sent.append(rows.cpu())
        advance(reqs, commit_h[s].tolist())
    release_all(rec, reqs)
    ok = len(sink) == n_req
    for i, captured in enumerate(sink):
        captured.resolve()
        for s in range(steps):
            start, c = int(starts_h[s, i]), int(commit_h[s, i])
            ok = ok and bool(captured.covered[start:start + c].all()) and torch.equal(
                captured.rows[start:start + c], sent[s][i * stride:i * stride + c])
        ok = ok and not bool(captured.covered[:prompt_len].any())     # nothing written there: gaps, not stale rows
    p.check("committed rows recovered exactly from the pool", ok, f"{len(sink)} requests x {steps} steps",
            "bit-exact")
    del rec, reqs, sink, sent

    # -- overhead: the same loop of verify steps with and without recording --
    starts_d, commit_d, _, commit_h = verify_inputs(n_req, stride, T, prompt_len, device, gen)
    base = torch.randn(n_req * stride, feat, generator=gen).to(device, torch.bfloat16)
    commit_lists = commit_h.tolist()

    def loop(record: bool) -> dict:
        """T verify steps. Each ends with a synchronize, as the scheduler reads every verify step's result."""
        rec, reqs, sink = new_recorder()
        batch = FakeBatch(reqs, req_to_token, device)
        host_s, stream_ms = [], []
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        t_start = time.perf_counter()
        for s in range(T):
            rows = base + s                        # stands for the verify forward's feature rows (new each step)
            if record:
                if cuda:
                    e0.record()
                t0 = time.perf_counter()
                rec.observe(batch, rows, starts=starts_d[s], commit_lens=commit_d[s], stride=stride,
                            max_accept=stride)
                host_s.append(time.perf_counter() - t0)
                if cuda:
                    e1.record()
            advance(reqs, commit_lists[s])
            sync(device)
            if record and cuda:
                stream_ms.append(e0.elapsed_time(e1))     # the pool write observe() put on the stream
        wall = time.perf_counter() - t_start
        t0 = time.perf_counter()
        release_all(rec, reqs)
        release_s = time.perf_counter() - t0
        return {"host_s": host_s, "stream_ms": stream_ms, "wall_s": wall, "release_s": release_s,
                "records": len(sink)}

    p.log(f"{T} verify steps without recording, then with ...")
    loop(False), loop(True)                        # warm-up (pinned host allocator, kernels)
    plain = loop(False)
    pinned_before = _pinned_allocs(cuda)
    recorded = loop(True)
    pinned_new = _pinned_allocs(cuda) - pinned_before
    host_us = [t * 1e6 for t in recorded["host_s"]]
    host_us_sorted = sorted(host_us)
    p99 = host_us_sorted[min(len(host_us) - 1, int(0.99 * len(host_us)))]
    p.metric("observe() host time per verify step, mean / p50 / p99",
             f"{statistics.mean(host_us):.0f} / {statistics.median(host_us):.0f} / {p99:.0f}", "us")
    p.metric("wall per step, plain / recorded (synced every step)",
             f"{plain['wall_s'] / T * 1e6:.0f} / {recorded['wall_s'] / T * 1e6:.0f}", "us")
    if cuda:
        p.metric("stream time added per step (the pool write)", statistics.median(recorded["stream_ms"]) * 1e3,
                 "us", ".0f")
    p.metric("bytes copied to the host per step (commit lengths)", n_req * 8, "B", ".0f")
    p.metric("release() per request (one gather, one copy to the host)", recorded["release_s"] / n_req * 1e6,
             "us", ".0f")
    if pinned_new == pinned_new:                   # the copies' pinned buffers come from torch's caching host
        p.metric("new pinned allocations (cudaHostAlloc) in the recorded steps", pinned_new, "", ".0f")  # allocator
    p.metrics["host_us"] = {"value": {"mean": statistics.mean(host_us), "p50": statistics.median(host_us),
                                      "p99": p99}, "unit": "us"}
    p.metrics["wall_us_per_step"] = {"value": {"plain": plain["wall_s"] / T * 1e6,
                                               "recorded": recorded["wall_s"] / T * 1e6}, "unit": "us"}
    p.check("every request recorded", recorded["records"] == n_req, f"{recorded['records']}/{n_req}", "all")

    # -- does observe() wait for the device? call it while a long kernel is queued --
    if cuda:
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.cuda._sleep(10_000_000)
        e1.record()
        e1.synchronize()
        cycles = int(10_000_000 * 50.0 / max(e0.elapsed_time(e1), 1e-3))     # ~50 ms of spinning
        rec, reqs, _ = new_recorder()
        torch.cuda._sleep(cycles)
        rows = base + 1                                   # queued behind the sleep, like a real forward's output
        queued_done = torch.cuda.Event()
        queued_done.record()
        t0 = time.perf_counter()
        rec.observe(FakeBatch(reqs, req_to_token, device), rows, starts=starts_d[0], commit_lens=commit_d[0],
                    stride=stride, max_accept=stride)
        observe_ms = (time.perf_counter() - t0) * 1e3
        kernel_done = queued_done.query()
        torch.cuda.synchronize()
        p.metric("observe() with a 50 ms kernel queued", observe_ms, "ms", ".3f")
        p.check("observe() does not synchronize", not kernel_done,
                "returned before the kernel finished" if not kernel_done else "waited for the kernel",
                "no sync")
    else:
        p.note("device-sync check skipped: no CUDA device")
    free_memory()


# ------------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------------------
# e. draft KV refresh: what sglang_ext/online/scheduler/refresh.py runs per stale cached token after a swap
# ------------------------------------------------------------------------------------------------------------
def part_refresh(p: Part, shapes: Shapes, device: torch.device) -> None:
    """The refresh's device work for `refresh_tokens` cached tokens of a Qwen3-8B-shaped DFlash draft (part b's
    shape, bf16): the staleness check over the pool, the gather of their rows, the draft's context projection
    (fc + hidden norm) and per layer k/v projection, k norm and RoPE, written into per-layer KV buffers at the
    tokens' slots. It runs SGLang's own append on the server; here (no SGLang on the GPU machine) the same math
    through the training-form draft (trainer/dflash_draft.py). Checked: the refreshed KV equals the KV projected
    directly from the features."""
    from sglang_ext.online.scheduler.pool import FeaturePool
    from trainer.dflash_draft import DFlashDraft, rope_cos_sin

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    _, cfg = dflash_config(shapes)
    n = shapes.refresh_tokens
    width = cfg.num_context_features * cfg.hidden_size
    draft = DFlashDraft.from_scratch(cfg, seed=0).to(device=device, dtype=dtype).eval()
    kv_slots = 2 * n + 1
    pool = FeaturePool(kv_slots, width, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    slots = (torch.randperm(kv_slots - 1, generator=gen)[:n] + 1).to(device)
    features = torch.randn(n, width, generator=gen).to(device=device, dtype=dtype)
    pool.write(slots, features, version=0)
    positions = torch.arange(n, device=device)
    kv = [(torch.zeros(kv_slots, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=dtype),
           torch.zeros(kv_slots, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=dtype))
          for _ in draft.layers]
    p.shapes.update(tokens=n, draft_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, features=width,
                    kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=str(dtype).removeprefix("torch."))

    @torch.no_grad()
    def refresh(live: int) -> int:
        stale, _ = pool.stale(slots, live)
        todo = slots[stale]                                         # the host learns the count here (one sync)
        ctx = draft.project_context(pool.gather(todo)[0])[None]
        cos, sin = rope_cos_sin(positions[stale][None], cfg)
        for layer, (k_buf, v_buf) in zip(draft.layers, kv):
            k, v = layer.self_attn.context_kv(ctx, cos, sin)         # [1, Hkv, n, D]
            k_buf[todo] = k[0].transpose(0, 1)
            v_buf[todo] = v[0].transpose(0, 1)
        pool.stamp(todo, live)
        return int(todo.numel())

    times = []
    for live in range(1, 6 if cuda else 2):                         # a new version each time: all stale again
        sync(device)
        t0 = time.perf_counter()
        done = refresh(live)
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = sorted(times[1:] or times)[len(times[1:] or times) // 2] * 1e3
    p.metric(f"refresh of {n} cached tokens (median)", ms, "ms", ".2f")
    p.metric("per token", ms * 1e3 / n, "us", ".2f")
    p.metrics["refresh"] = {"value": {"tokens": done, "ms": ms, "runs_ms": [t * 1e3 for t in times]}, "unit": "ms"}
    with torch.no_grad():                                           # the same KV straight from the features
        ctx = draft.project_context(features)[None]
        cos, sin = rope_cos_sin(positions[None], cfg)
        k, v = draft.layers[-1].self_attn.context_kv(ctx, cos, sin)
    err = max(float((kv[-1][0][slots] - k[0].transpose(0, 1)).abs().max() / k.abs().max().clamp(min=1)),
              float((kv[-1][1][slots] - v[0].transpose(0, 1)).abs().max() / v.abs().max().clamp(min=1)))
    p.check("refreshed KV equals the KV projected from the features", err <= TOL[dtype],
            f"last layer, k and v: max err {err:.2g}", f"<= {TOL[dtype]:g}")
    p.check("nothing stale after the refresh", not pool.stale(slots, live)[0].any().item(), f"{done} refreshed",
            "0 stale")


PARTS = {"a": part_attention, "b": part_train_step, "c": part_hot_swap, "d": part_capture, "e": part_refresh}


def machine_info(device: torch.device) -> dict:
    import triton
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
            "device": str(device), "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device_name"] = "CPU (no CUDA device: plumbing run, figures not meaningful)"
    return info


def print_table(machine: dict, parts: list[Part], tiny: bool) -> None:
    title = (f"gpu_check{' --tiny' if tiny else ''}: {machine['device_name']} | torch {machine['torch']} "
             f"(CUDA {machine['cuda']}) | Triton {machine['triton']} | Python {machine['python']}")
    widths = (4, 56, 46, 28, 6)
    header = ("part", "item", "value", "target", "result")
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print()
    print(title)
    print("=" * max(len(title), len(line)))
    print(line)
    print("-" * len(line))
    for part in parts:
        status = {"ok": "OK", "check failed": "CHECK FAILED", "failed": "FAILED"}.get(part.status, part.status)
        print(f"{part.letter.ljust(widths[0])}  {part.title}: {status} ({part.seconds:.1f} s of "
              f"{part.budget_s:.0f} s budget)")
        for row in part.rows:
            cells = ("", "  " + row["item"], row["value"], row["target"], row["result"])
            print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        for note in part.notes:
            print(f"{'':4}    note: {note}")
        if part.error:
            print(f"{'':4}    error: {part.error}")
        print("-" * len(line))
    if tiny or machine["device"] == "cpu":
        print("tiny / CPU run: the figures above only show that the plumbing works; run on the GPU for numbers.")


def parse_budget(text: str | None, base: dict) -> dict:
    budget = dict(base)
    for item in filter(None, (text or "").split(",")):
        letter, _, seconds = item.partition("=")
        if letter.strip() not in budget or not seconds:
            raise SystemExit(f"--budget: expected e.g. a=120,b=200; got {item!r}")
        budget[letter.strip()] = float(seconds)
    return budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU plumbing check; numbers meaningless)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check[_tiny].json)")
    parser.add_argument("--budget", default=None, help="per-part time budgets in seconds, e.g. a=120,b=210")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = parser.parse_args(argv)

    block_sglang()
    letters = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in letters if x not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)      # before any spec_kernels import: real kernels
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if not args.tiny:
            print("no CUDA device: the full shapes need a GPU; use --tiny for the CPU plumbing run")
            return 2
    shapes = TINY if args.tiny else FULL
    budget = parse_budget(args.budget, TINY_BUDGET_S if args.tiny else FULL_BUDGET_S)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "gpu_check_tiny.json" if args.tiny else "gpu_check.json")

    clock0 = time.monotonic()
    machine = machine_info(device)
    print(f"gpu_check on {machine['device_name']}: torch {machine['torch']}, Triton {machine['triton']}, "
          f"parts {','.join(letters)}{' (tiny shapes)' if args.tiny else ''}", flush=True)
    parts = []
    for letter in letters:
        part = Part(letter, budget[letter], clock0, on_gpu=device.type == "cuda")
        parts.append(part)
        part.log(f"{part.title} (budget {part.budget_s:.0f} s)")
        try:
            with time_limit(part.budget_s):
                PARTS[letter](part, shapes, device)
            part.status = "ok" if all(c["ok"] for c in part.checks.values()) else "check failed"
        except PartTimeout as exc:
            part.status, part.error = "failed", str(exc)
        except Exception as exc:           # one part failing must not stop the others
            part.status, part.error, part.traceback = "failed", first_line(exc), traceback.format_exc()
        part.seconds = time.monotonic() - part.start
        if part.status != "ok":
            part.log(f"{part.status.upper()}: {part.error or 'a check failed'}")
            if part.traceback:
                print(part.traceback, flush=True)
        else:
            part.log(f"done in {part.seconds:.1f} s")
        try:
            free_memory()
        except Exception as exc:           # e.g. a device error left behind by the failed part
            part.notes.append(f"cleanup after the part failed: {first_line(exc)}")

    print_table(machine, parts, args.tiny)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "tiny": args.tiny, "shapes": shapes.__dict__, "budget_s": budget,
              "total_s": round(time.monotonic() - clock0, 1), "parts": {p.letter: p.as_json() for p in parts}}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(p.status == "ok" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
