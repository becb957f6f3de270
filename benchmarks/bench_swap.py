"""The hot-swap stall of --online-train: today's path through load_weights against the staged path, in one run.

    python benchmarks/bench_swap.py                         # CPU: a 200M-parameter draft, bf16 serving dtype
    python benchmarks/bench_swap.py --params 1e9            # on a GPU machine: the 1B-parameter draft

A stand-in for SGLang's draft module (plain torch, so it runs where SGLang is not installed): `--layers`
Llama-style layers sized to `--params` with SGLang's fused parameters (qkv_proj, gate_up_proj) in the serving
dtype on the serving device, and a `load_weights` that writes our per-projection names into them the way
SGLang's loaders do (a block of rows each, cast to the parameter's dtype). The trainer side is the real shared
slot (`sglang_ext.online.swap.weight_slot.WeightSlot`, pageable shared memory) holding one published version.

    old     the first design: a float32 slot, and the swap point runs load_weights from it (fp32 -> serving
            dtype, host -> device) with a device-wide synchronize before and after (what
            TrainerSupervisor._swap still does when the weights cannot be staged)
    staged  today: a slot in the serving dtype; sglang_ext.online.swap.staging `stage` (supervisor thread, off the
            critical path: slot -> pinned host -> device staging buffers on a side stream) then, at the swap
            point, `apply` (device-to-device copies fenced on the device, no host sync)

--refresh (needs SGLang; CPU platform): the draft-KV refresh that follows a swap, on a real server (the tiny
target and a draft of --refresh-kind: its DFlash draft, or a random EAGLE3 chain of 4 tokens per verify;
--online-train swapping every 2 steps): for each context length of --refresh-lengths,
a prompt is served (its prefix cached under the live version), the bench waits for a newer version to go live,
then serves the prompt's prefix again with another last token: SGLang takes the prefix from its radix cache and
the refresh re-projects its stale draft KV before that batch runs (scheduler/refresh.py). Reported per length:
tokens re-projected and the refresh's milliseconds (from /metrics deltas), against the median decode iteration
of the same server (a request's decode time over its verify steps).

Reported per path, median of --repeats: the stall at the swap point (host wall time of the call; on CUDA also
the device time of the work it queued, by CUDA events) and, for the staged path, the staging time. Goal (GPU,
1B parameters): staged stall <= 2 ms. Writes <out>/swap.json and, with matplotlib, <out>/swap.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sglang_ext.online.swap import weight_slot as ws  # noqa: E402
from sglang_ext.online.swap.staging import StagedSwap, plan_placements  # noqa: E402
from trainer.draft_kind import get_kind  # noqa: E402


class StandInDraft(torch.nn.Module):
    """SGLang-shaped draft parameters (fused qkv / gate_up) and a loader that writes our names into them."""

    def __init__(self, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, dtype, device):
        super().__init__()
        d = hidden // heads
        self.shapes = {}                  # our weight name -> (SGLang parameter, row offset, shape)
        for i in range(layers):
            p = f"layers.{i}."
            rows = {"q_proj": heads * d, "k_proj": kv_heads * d, "v_proj": kv_heads * d}
            self._fused(p + "self_attn.qkv_proj.weight", [(p + f"self_attn.{k}.weight", (n, hidden))
                                                          for k, n in rows.items()], dtype, device)
            self._fused(p + "mlp.gate_up_proj.weight", [(p + "mlp.gate_proj.weight", (inter, hidden)),
                                                        (p + "mlp.up_proj.weight", (inter, hidden))], dtype, device)
            self._fused(p + "self_attn.o_proj.weight", [(p + "self_attn.o_proj.weight", (hidden, heads * d))],
                        dtype, device)
            self._fused(p + "mlp.down_proj.weight", [(p + "mlp.down_proj.weight", (hidden, inter))], dtype, device)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self._fused(p + f"{norm}.weight", [(p + f"{norm}.weight", (hidden,))], dtype, device)

    def _fused(self, param: str, parts, dtype, device) -> None:
        rows = sum(shape[0] for _, shape in parts)
        shape = (rows,) + tuple(parts[0][1][1:])
        self.register_parameter(param.replace(".", "__"), torch.nn.Parameter(
            torch.zeros(shape, dtype=dtype, device=device), requires_grad=False))
        offset = 0
        for name, s in parts:
            self.shapes[name] = (param.replace(".", "__"), offset, s)
            offset += s[0]

    def named_parameters(self, *args, **kwargs):
        for name, p in super().named_parameters(*args, **kwargs):
            yield name.replace("__", "."), p

    @torch.no_grad()
    def load_weights(self, weights) -> None:
        for name, t in weights:
            param, offset, shape = self.shapes[name]
            getattr(self, param).data[offset:offset + shape[0]].copy_(t)

    def layout(self) -> list:
        return sorted((name, tuple(s)) for name, (_, _, s) in self.shapes.items())


def size_for(params: float, layers: int) -> dict:
    """Hidden size (multiple of 128) for ~`params` parameters in `layers` layers (intermediate = 3 x hidden)."""
    per_h2 = 2 + 0.5 + 9              # per layer, in hidden^2: q and o, k and v at 1/4 of the heads, gate/up/down
    hidden = int((params / layers / per_h2) ** 0.5) // 128 * 128 or 128
    return {"hidden": hidden, "heads": max(1, hidden // 128), "kv_heads": max(1, hidden // 512),
            "inter": 3 * hidden}


def _device_ms(fn, cuda: bool) -> tuple[float, float | None, float]:
    """(host wall ms of fn(), device ms of the work it queued on the current stream (CUDA only), stall ms: from
    the call until that work finished on an otherwise idle device)."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    if not cuda:
        return host, None, host
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end), (time.perf_counter() - t0) * 1e3


def run(params: float = 2e8, layers: int = 4, dtype: str = "bfloat16", device: str | None = None,
        repeats: int = 5, dims: dict | None = None) -> dict:
    """Both paths, `repeats` swaps each (after one warm-up swap on CUDA). dims: explicit hidden / heads /
    kv_heads / inter instead of sizing to `params`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dims = dims or size_for(params, layers)
    model = StandInDraft(layers, dims["hidden"], dims["heads"], dims["kv_heads"], dims["inter"],
                         getattr(torch, dtype), device)
    n_params = sum(p.numel() for _, p in model.named_parameters())
    layout = model.layout()
    state = {name: torch.randn(shape) for name, shape in layout}
    old_slot = ws.WeightSlot.create(layout)                      # the old design: float32
    old_slot.publish(state)
    slot = ws.WeightSlot.create(layout, getattr(torch, dtype))   # today: the serving dtype
    slot.publish(state)
    placements = plan_placements(get_kind("dflash"), model, layout)
    if placements is None:
        raise RuntimeError("the stand-in's weights could not be placed")
    stager = StagedSwap(model, placements)

    def old():
        if cuda:
            torch.cuda.synchronize()
        model.load_weights(list(old_slot.weights.items()))
        if cuda:
            torch.cuda.synchronize()

    storage = [p.data_ptr() for _, p in model.named_parameters()]
    rows = {"old": [], "staged": [], "staging": []}
    for r in range(repeats + (1 if cuda else 0)):        # on CUDA the first swap of each path warms up
        old_ms = _device_ms(old, cuda)
        t0 = time.perf_counter()
        stager.stage(slot.weights, version=r + 1)
        if cuda:
            stager.staged_event.synchronize()         # only to time the staging; the supervisor never waits
        staging_ms = ((time.perf_counter() - t0) * 1e3, None, None)
        staged_ms = _device_ms(stager.apply, cuda)
        if r or not cuda:
            rows["old"].append(old_ms)
            rows["staging"].append(staging_ms)
            rows["staged"].append(staged_ms)
    storage_kept = storage == [p.data_ptr() for _, p in model.named_parameters()]
    got = {n: p for n, p in model.named_parameters()}
    for name, (param, offset, shape) in model.shapes.items():    # the staged path wrote the slot's values
        want = slot.weights[name].to(got[param.replace("__", ".")].dtype)
        assert torch.equal(got[param.replace("__", ".")][offset:offset + shape[0]].cpu(), want.reshape(
            got[param.replace("__", ".")][offset:offset + shape[0]].shape)), name

    def med(xs, i):
        vals = [x[i] for x in xs if x[i] is not None]
        return round(statistics.median(vals), 3) if vals else None

    machine = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {"machine": machine, "torch": torch.__version__, "device": device, "dtype": dtype, "params": n_params,
            "layers": layers, **dims, "repeats": repeats,
            "old_stall_ms": med(rows["old"], 0), "old_stall_device_ms": med(rows["old"], 1),
            "old_stall_until_done_ms": med(rows["old"], 2),
            "staged_stall_ms": med(rows["staged"], 0), "staged_stall_device_ms": med(rows["staged"], 1),
            "staged_stall_until_done_ms": med(rows["staged"], 2), "staging_ms": med(rows["staging"], 0),
            "staged_equals_slot": True, "storage_kept": storage_kept}     # (a mismatch raised above)


def report(r: dict) -> str:
    dev = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    return "\n".join([
        f"hot-swap stall, {r['params'] / 1e6:.0f}M-parameter draft ({r['layers']} layers, hidden {r['hidden']}), "
        f"{r['dtype']} on {r['machine']}, torch {r['torch']}, median of {r['repeats']}",
        "| path | swap point, host ms | device ms | until done, ms | staging (off the critical path), ms |",
        "| --- | --- | --- | --- | --- |",
        f"| old: load_weights from the fp32 slot + synchronize | {r['old_stall_ms']:.2f} | "
        f"{dev(r['old_stall_device_ms'])} | {r['old_stall_until_done_ms']:.2f} | - |",
        f"| staged: {r['dtype']} slot, device-to-device copy | {r['staged_stall_ms']:.2f} | "
        f"{dev(r['staged_stall_device_ms'])} | "
        f"{r['staged_stall_until_done_ms']:.2f} | {r['staging_ms']:.2f} |"])


def plot(r: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(["old (load_weights)", "staged (apply)"], [r["old_stall_ms"], r["staged_stall_ms"]])
    ax.bar_label(bars, fmt="%.2f ms")
    ax.set_ylabel("stall at the swap point (ms)")
    ax.set_title(f"{r['params'] / 1e6:.0f}M params, {r['dtype']}, {r['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return f"wrote {path}"


REFRESH_METRICS = ("draft_kv_refreshed_tokens_total", "draft_kv_refresh_seconds_total",
                   "draft_kv_stale_tokens_served_total", "draft_version")


def refresh_on_server(lengths: list[int], repeats: int, log_dir: Path, kind: str = "dflash") -> dict:
    """The refresh of a cached prefix after a swap, per context length, on real SGLang (CPU platform), for a
    draft of `kind`."""
    import random

    from sglang_ext.demo.tiny_models import tiny_models
    from sglang_ext.demo.traffic import make_random_draft
    from sglang_ext.launcher import draft_args, launch_server, metric_value

    models = tiny_models()
    work = log_dir / "refresh-work"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "online.json"
    config.write_text('{"guard_tolerance": 1.0}')           # every finite candidate goes live: swaps keep coming
    draft = models.draft_dense if kind == "dflash" else make_random_draft(
        models.dense, work / "eagle3-draft", block_size=4, kind="eagle3", target_layers=[1, 2, 3])
    args = draft_args(draft, 4) + [
        "--online-train", "--online-train-config", str(config), "--online-train-lr", "1e-9",
        "--online-train-swap-every", "2", "--online-train-min-records", "2", "--online-train-holdout-every", "2",
        "--online-train-batch-size", "2", "--online-train-num-anchors", "8"]
    rng = random.Random(0)

    def metrics(server) -> dict:
        text = server.metrics()
        return {m: metric_value(text, "sglang:online_train_" + m) for m in REFRESH_METRICS}

    def generate(server, ids: list[int], max_new: int) -> dict:
        return server.post("/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}})

    rows = []
    with launch_server(models.dense, args, log_dir=log_dir, name=f"bench-swap-refresh-{kind}") as server:
        step_ms = []
        for _ in range(3):                               # records for the trainer, and the decode iteration time
            meta = generate(server, [rng.randrange(10, 500) for _ in range(64)], 64)["meta_info"]
            steps = int(meta.get("spec_verify_ct") or 0)
            if steps:
                step_ms.append(1e3 * (meta["e2e_latency"] - meta["first_token_latency"]) / steps)
        for length in lengths:
            for _ in range(repeats):
                prefix = [rng.randrange(10, 500) for _ in range(length)]
                generate(server, prefix + [rng.randrange(10, 500)], 4)           # cached under this version
                version = metrics(server)["draft_version"]
                deadline = time.monotonic() + 120
                while metrics(server)["draft_version"] <= version and time.monotonic() < deadline:
                    generate(server, [rng.randrange(10, 500) for _ in range(32)], 16)   # more records, more steps
                before = metrics(server)
                if before["draft_version"] <= version:
                    raise RuntimeError(f"no newer draft version went live within 120 s (still {version})")
                generate(server, prefix + [rng.randrange(10, 500)], 4)           # a radix hit of `length` tokens
                after = metrics(server)
                d = {m: after[m] - before[m] for m in REFRESH_METRICS}
                rows.append({"length": length, "refreshed_tokens": d["draft_kv_refreshed_tokens_total"],
                             "refresh_ms": 1e3 * d["draft_kv_refresh_seconds_total"],
                             "stale_served": d["draft_kv_stale_tokens_served_total"]})
    by_length = []
    for length in lengths:
        mine = [r for r in rows if r["length"] == length]
        ms = [r["refresh_ms"] for r in mine]
        toks = [r["refreshed_tokens"] for r in mine]
        by_length.append({"length": length, "repeats": len(mine), "refreshed_tokens_median": statistics.median(toks),
                          "refresh_ms_median": round(statistics.median(ms), 3), "refresh_ms_max": round(max(ms), 3),
                          "us_per_token": round(1e3 * sum(ms) / max(1.0, sum(toks)), 2),
                          "stale_served": sum(r["stale_served"] for r in mine)})
    draft_name = "DFlash draft block 4" if kind == "dflash" else "EAGLE3 chain of 4 tokens per verify"
    return {"machine": f"CPU (torch_cpu platform, tiny Qwen3-VL target, {draft_name}, float32)", "kind": kind,
            "decode_iteration_ms_median": round(statistics.median(step_ms), 3) if step_ms else None,
            "by_length": by_length, "runs": rows}


def refresh_report(r: dict) -> str:
    lines = [f"draft-KV refresh after a swap, {r['machine']}; decode iteration median "
             f"{r['decode_iteration_ms_median']} ms",
             "| cached prefix, tokens | re-projected tokens (median) | refresh ms, median | max | us per token | "
             "stale tokens served |", "| --- | --- | --- | --- | --- | --- |"]
    for b in r["by_length"]:
        lines.append(f"| {b['length']} | {b['refreshed_tokens_median']:.0f} | {b['refresh_ms_median']:.2f} | "
                     f"{b['refresh_ms_max']:.2f} | {b['us_per_token']:.1f} | {b['stale_served']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=2e8, help="draft parameters (default 2e8; 1e9 on a GPU)")
    ap.add_argument("--layers", type=int, default=4, help="draft layers (default 4)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="serving dtype of the live draft (default bfloat16)")
    ap.add_argument("--device", default=None, help="serving device (default cuda if available, else cpu)")
    ap.add_argument("--repeats", type=int, default=5, help="swaps per path (default 5; the median is reported)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="JSON / PNG directory")
    ap.add_argument("--refresh", action="store_true",
                    help="also measure the draft-KV refresh after a swap on a real server (needs SGLang; CPU)")
    ap.add_argument("--refresh-lengths", default="256,1024,3072",
                    help="cached prefix lengths for --refresh (default 256,1024,3072; the tiny target's limit is 4096)")
    ap.add_argument("--refresh-kind", choices=["dflash", "eagle3"], default="dflash",
                    help="the draft kind --refresh serves (default dflash)")
    args = ap.parse_args(argv)
    r = run(args.params, args.layers, args.dtype, args.device, args.repeats)
    print(report(r))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.refresh:
        lengths = [int(x) for x in args.refresh_lengths.split(",") if x.strip()]
        r["refresh"] = refresh_on_server(lengths, args.repeats, args.out / "logs", args.refresh_kind)
        print(refresh_report(r["refresh"]))
    (args.out / "swap.json").write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {args.out / 'swap.json'}")
    print(plot(r, args.out / "swap.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
