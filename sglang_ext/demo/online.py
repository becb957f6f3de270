"""The main job on an embedded default: a live SGLang server teaches its own speculative draft.

    python -m sglang_ext.demo [--draft-kind dflash|eagle3] [--minutes 5] [--out DIR] [--gpu]
                                                                        (this module is its __main__)

1. Builds (once, cached by a hash of its config) the reference workload: a tiny Qwen3-VL target trained on
   this machine from the Python standard library, pydoc prose and synthetic images, with prompt sets.
2. Writes an untrained (random) draft for it, DFlash (default) or EAGLE3 (a chain of 3 draft steps over the
   target's layers 1, 2, 3): alone it gets tau ~ 1.0 (no draft token accepted).
3. Launches real SGLang (`python -m sglang.launch_server`, the torch_cpu platform unless --gpu) with
   `--speculative-algorithm DFLASH` (or EAGLE3) `--online-train`, and sends it the workload's code prompts
   (4 in flight).
4. Every window of requests it reads /metrics: the served tau of the window (from the
   sglang:online_train_accept_length histogram), the live draft version, swaps, trainer steps and loss.
   Then it sends a fixed probe set of held-out prompts (the workload's eval code prompts, never in the
   training traffic) that opt out of training (custom_params {"online_train_opt_out": true}), so their served
   tau measures the live draft on requests it has never seen. One table row per window. At the end it writes
   both curves as <out>/online_tau.png (and .json) and prints the final taus and the number of swaps.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

BLOCK_SIZE = 4


def _histogram(text: str, name: str) -> tuple[float, float]:
    from sglang_ext.launcher import metric_value
    return metric_value(text, name + "_sum"), metric_value(text, name + "_count")


def run_online(target_dir: Path, draft_dir: Path, prompts: list, *, minutes: float, max_new_tokens: int,
               window: int, concurrency: int, log_dir: Path, gpu: bool = False, extra_args: list | None = None,
               out=None, probes: list | None = None) -> dict:
    """Serve `prompts` (cycled) for `minutes` with --online-train; one row per `window` requests. After each
    window, `probes` (held-out prompts, opted out of training) are served once: their tau is the row's
    `probe_tau` (the window's `tau` excludes them)."""
    from sglang_ext.demo.traffic import online_metrics, probe_tau, send_traffic, swaps_from_log
    from sglang_ext.launcher import draft_args, launch_server, metric_value

    out = out or (lambda line: print(line, flush=True))     # rows as they come, also into a pipe or a file

    args = draft_args(draft_dir, BLOCK_SIZE) + ["--online-train", "--online-train-lr", "1e-3",
                                                 "--online-train-swap-every", "10",
                                                 "--online-train-min-records", "8"] + list(extra_args or [])
    if gpu:
        args += ["--dtype", "float32"]
    rows: list[dict] = []
    t_start = time.monotonic()
    with launch_server(target_dir, args, log_dir=log_dir, cpu=not gpu, name="demo-online") as server:
        out(f"server ready in {time.monotonic() - t_start:.0f}s at {server.url}; sending traffic for "
            f"{minutes:g} min ({concurrency} requests in flight, {max_new_tokens} new tokens each)\n")
        head = (f"{'time':>6} {'requests':>8} {'tau':>6} {'probe tau':>9} {'version':>7} {'swaps':>5} "
                f"{'rejected':>8} {'steps':>6} {'loss':>7} {'trainer held-out':>16} {'tok/s':>7}")
        out(head + "\n" + "-" * len(head))
        t0 = time.monotonic()
        served = 0
        prev_sum, prev_count = _histogram(server.metrics(), "sglang:online_train_accept_length")
        i = 0
        while time.monotonic() - t0 < minutes * 60:
            order = [(i + k) % len(prompts) for k in range(window)]
            i += window
            t_w = time.monotonic()
            done = send_traffic(server, prompts, order, max_new_tokens=max_new_tokens, concurrency=concurrency)
            served += len(done)
            text = server.metrics()
            acc_sum, acc_count = _histogram(text, "sglang:online_train_accept_length")
            tau = (acc_sum - prev_sum) / max(1.0, acc_count - prev_count)
            m = online_metrics(server)
            row = {"t": time.monotonic() - t0, "requests": served, "tau": tau,
                   "tau_meta": sum(s.accept_length for s in done) / len(done),
                   "tokens_per_s": len(done) * max_new_tokens / (time.monotonic() - t_w), **m}
            held_out = float("nan")
            if probes:                       # held-out, opted out: measured, never trained on
                held_out = probe_tau(server, probes, max_new_tokens=max_new_tokens, concurrency=concurrency)
                acc_sum, acc_count = _histogram(server.metrics(), "sglang:online_train_accept_length")
            prev_sum, prev_count = acc_sum, acc_count        # the next window's tau excludes the probes
            row["probe_tau"] = held_out
            rows.append(row)
            out(f"{row['t']:6.0f} {served:8d} {tau:6.2f} {held_out:9.2f} {m['draft_version']:7.0f} "
                f"{m['swaps_total']:5.0f} {m['rejected_worse'] + m['rejected_nan']:8.0f} {m['trainer_steps']:6.0f} "
                f"{m['trainer_loss']:7.3f} {m['heldout_accept_length']:16.2f} {row['tokens_per_s']:7.1f}")
        swaps = swaps_from_log(server.log_path.read_text())
        final_text = server.metrics()
    return {"rows": rows, "swaps": [{"version": v, "ms": ms, "in_flight": n, "iteration_ms": it}
                                    for v, ms, n, it in swaps],
            "final_swaps": metric_value(final_text, "sglang:online_train_swaps_total")}


def plot(result: dict, path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["requests"] for r in rows], [r["tau"] for r in rows], marker="o",
            label="served tau, training traffic (window)")
    if any(r.get("probe_tau") == r.get("probe_tau") for r in rows):
        ax.plot([r["requests"] for r in rows], [r.get("probe_tau", float("nan")) for r in rows], marker="s",
                label="served tau, held-out probes (never trained on)")
    ax.plot([r["requests"] for r in rows], [r["heldout_accept_length"] or float("nan") for r in rows],
            linestyle="--", label="trainer's offline tau on its held-out slice")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("requests served")
    ax.set_ylabel(f"tau (tokens per verify step, block {BLOCK_SIZE})")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.step([r["requests"] for r in rows], [r["draft_version"] for r in rows], where="post", color="tab:green",
             alpha=0.5, label="draft version")
    ax2.set_ylabel("live draft version")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_ext.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft-kind", choices=["dflash", "eagle3"], default="dflash",
                    help="the draft the server trains: DFlash (block diffusion, default) or EAGLE3 (served as a "
                         "chain: topk 1, 3 draft steps)")
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to send traffic (default 5)")
    ap.add_argument("--workload-minutes", type=float, default=3.0,
                    help="training budget of the reference-workload target when it is first built (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per request (greedy)")
    ap.add_argument("--window", type=int, default=24, help="requests per table row (default 24)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--probes", type=int, default=8,
                    help="held-out prompts (the workload's eval code prompts, opted out of training) served "
                         "after every window to measure the live draft on unseen requests (default 8; 0: none)")
    ap.add_argument("--out", type=Path, default=Path("sglang_ext_demo"),
                    help="where the plot, the JSON and the server log go (default ./sglang_ext_demo)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the workload is built (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)")
    ap.add_argument("--gpu", action="store_true", help="serve on the default (CUDA) platform instead of torch_cpu")
    args = ap.parse_args(argv)
    for name in ("minutes", "workload_minutes", "max_new_tokens", "window", "concurrency"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.probes < 0:
        ap.error("--probes must be >= 0")

    from sglang_ext.demo.traffic import make_random_draft
    from sglang_ext.demo.workload import build_workload, record_prompt

    t0 = time.monotonic()
    print("1. reference workload (built once, then cached) ...", flush=True)
    workload = build_workload(args.cache_dir, minutes=args.workload_minutes)
    print(f"   target {workload.target_dir} ({time.monotonic() - t0:.0f}s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    draft = make_random_draft(workload.target_dir, args.out / f"random-{args.draft_kind}-draft",
                              block_size=BLOCK_SIZE, kind=args.draft_kind)
    name = {"dflash": "DFlash", "eagle3": "EAGLE3"}[args.draft_kind]
    print(f"2. random {name} draft (block size {BLOCK_SIZE}): {draft}", flush=True)
    prompts = [record_prompt(r) for r in workload.prompts("A", "train")]
    print(f"3. SGLang + {name.upper()} + --online-train, {len(prompts)} code prompts from the workload's train "
          "traffic", flush=True)
    probes = [record_prompt(r) for r in workload.prompts("A", "eval")[:args.probes]]
    if probes:
        print(f"   after every {args.window} requests: {len(probes)} held-out probe prompts (eval split), opted out "
              "of training", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="sglang-ext-demo-"))
    result = run_online(workload.target_dir, draft, prompts, minutes=args.minutes,
                        max_new_tokens=args.max_new_tokens, window=args.window, concurrency=args.concurrency,
                        log_dir=log_dir, gpu=args.gpu, probes=probes)
    rows = result["rows"]
    (args.out / "online_tau.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, args.out / "online_tau.png", f"sglang-ext: served tau while the {name} draft trains online")
    first, last = rows[0]["tau"], rows[-1]["tau"]
    lat = sorted(s["ms"] for s in result["swaps"])
    print(f"\nserved tau: {first:.2f} in the first window -> {last:.2f} in the last "
          f"({rows[-1]['requests']} requests, {rows[-1]['t'] / 60:.1f} min)")
    if probes:
        print(f"held-out probes (never trained on): {rows[0]['probe_tau']:.2f} after the first window -> "
              f"{rows[-1]['probe_tau']:.2f} after the last")
    print(f"swaps: {int(result['final_swaps'])} (rejected by the guard: {int(rows[-1]['rejected_worse'])}, "
          f"NaN steps skipped: {int(rows[-1]['rejected_nan'])})"
          + (f"; swap latency median {lat[len(lat) // 2]:.2f} ms, max {lat[-1]:.2f} ms" if lat else ""))
    print(f"curve: {png or '(matplotlib missing: no PNG)'}  data: {args.out / 'online_tau.json'}")
    print(f"total time {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
