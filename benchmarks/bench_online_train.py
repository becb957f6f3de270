"""--online-train on the reference workload, real SGLang (CPU platform unless --gpu), DFLASH block size 4:

    python benchmarks/bench_online_train.py [--minutes 5] [--out benchmarks/results]

1. adaptation: a server starts from a random draft with --online-train and serves the workload's code
   prompts (4 in flight) for --minutes; every window: served tau (from /metrics), draft version, swaps,
   trainer steps, decode throughput, and the served tau of --probes held-out eval prompts that opt out of
   training (the live draft on requests it has never seen). Accepted versions are exported (--online-train-checkpoint-dir).
2. throughput with vs without online training, same traffic, one run of this script:
     * online     the last --tail windows of step 1 (trainer running, draft swapped as it improves)
     * static     a plain DFLASH server (no --online-train) with the newest draft step 1 accepted, so the
                  draft quality matches and the difference is the cost of capture + co-located training
     * duty F     for each --duty-cycles F: a DFLASH server with --online-train --online-train-duty-cycle F
                  starting from that same draft (the trainer trains on the warm-up traffic and goes on while
                  the measured requests are served): the serving cost of training at that share
     * random     a plain DFLASH server with the untrained draft (where online training started)
3. swap latency: every swap the server logged (weight copy + helper rebuild), with requests in flight.
Prints the tables; writes <out>/online_train.json, <out>/online_train.png and <out>/online_train_duty.png
(matplotlib).

On a shared 2-core CPU machine the trainer and the server compete for the same cores; the throughput
ratio here is an upper bound on the cost. On a GPU run the trainer on another device (--online-train-device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sglang_ext.demo.online import BLOCK_SIZE, plot, run_online  # noqa: E402


WARMUP_REQUESTS = 16       # before measuring: enough finished requests for the trainer to be training (min 8)


def run_static(target_dir: Path, draft_dir: Path, prompts: list, *, n_requests: int, max_new_tokens: int,
               concurrency: int, log_dir: Path, name: str, gpu: bool, duty_cycle: float | None = None) -> dict:
    """DFLASH serving from `draft_dir`: tau and decode throughput over `n_requests`, after a warm-up. Plain
    (duty_cycle None), or with --online-train at that duty cycle (then also the trainer's steps meanwhile)."""
    from sglang_ext.demo.traffic import online_metrics, send_traffic
    from sglang_ext.launcher import draft_args, launch_server

    args = draft_args(draft_dir, BLOCK_SIZE) + (["--dtype", "float32"] if gpu else [])
    if duty_cycle is not None:
        args += ["--online-train", "--online-train-lr", "1e-3", "--online-train-swap-every", "10",
                 "--online-train-min-records", "8", "--online-train-duty-cycle", str(duty_cycle)]
    with launch_server(target_dir, args, log_dir=log_dir, cpu=not gpu, name=name) as server:
        warm = WARMUP_REQUESTS if duty_cycle is not None else concurrency
        send_traffic(server, prompts, [i % len(prompts) for i in range(warm)], max_new_tokens=max_new_tokens,
                     concurrency=concurrency)
        steps0 = online_metrics(server)["trainer_steps"] if duty_cycle is not None else 0
        order = [i % len(prompts) for i in range(n_requests)]
        t0 = time.monotonic()
        done = send_traffic(server, prompts, order, max_new_tokens=max_new_tokens, concurrency=concurrency)
        wall = time.monotonic() - t0
        steps = online_metrics(server)["trainer_steps"] - steps0 if duty_cycle is not None else 0
    return {"tau": sum(s.accept_length for s in done) / len(done), "tokens_per_s": len(done) * max_new_tokens / wall,
            "requests": len(done), "wall_s": wall, "duty_cycle": duty_cycle, "trainer_steps": steps,
            "trainer_steps_per_min": steps / wall * 60}


def plot_duty(static: dict, duty: list[dict], path: Path, machine: str) -> str | None:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_offline_pipeline import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [r["duty_cycle"] for r in duty]
    ax.plot(xs, [r["tokens_per_s"] / static["tokens_per_s"] for r in duty], "o-", label="decode throughput")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="no online training")
    ax.axhline(0.97, color="tab:red", lw=0.8, ls=":", label="GPU goal 0.97x")
    ax.set_xlabel("--online-train-duty-cycle")
    ax.set_ylabel("throughput vs no online training")
    ax.set_title(f"serving cost of online training ({machine})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def _machine(gpu: bool) -> str:
    import os
    import platform

    if gpu:
        import torch
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (server and trainer share them)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="traffic time of the online run (default 5)")
    ap.add_argument("--workload-minutes", type=float, default=3.0, help="workload target budget (default 3, "
                    "the demo's; cached)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--window", type=int, default=24, help="requests per curve point")
    ap.add_argument("--tail", type=int, default=3, help="last windows of the online run used for throughput")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--gpu", action="store_true", help="serve on CUDA instead of the torch_cpu platform")
    ap.add_argument("--probes", type=int, default=8, help="held-out eval prompts (opted out of training) served "
                    "after every window of step 1 (default 8)")
    ap.add_argument("--duty-cycles", default="1.0,0.5,0.25",
                    help="comma-separated --online-train-duty-cycle settings measured in step 2 (default "
                         "1.0,0.5,0.25)")
    args = ap.parse_args(argv)

    from sglang_ext.demo.traffic import make_random_draft
    from sglang_ext.demo.workload import build_workload, record_prompt

    args.out.mkdir(parents=True, exist_ok=True)
    machine = _machine(args.gpu)
    work = Path(tempfile.mkdtemp(prefix="bench-online-"))
    workload = build_workload(args.cache_dir, minutes=args.workload_minutes)
    draft = make_random_draft(workload.target_dir, work / "random-draft", block_size=BLOCK_SIZE)
    prompts = [record_prompt(r) for r in workload.prompts("A", "train")]
    ckpt = work / "accepted"

    print(f"1. online run from a random draft ({args.minutes:g} min of traffic)", flush=True)
    probes = [record_prompt(r) for r in workload.prompts("A", "eval")[:args.probes]]
    online = run_online(workload.target_dir, draft, prompts, minutes=args.minutes, max_new_tokens=args.max_new_tokens,
                        window=args.window, concurrency=args.concurrency, log_dir=work / "logs", gpu=args.gpu,
                        extra_args=["--online-train-checkpoint-dir", str(ckpt)], probes=probes)
    tail = online["rows"][-args.tail:]
    n_tail = sum(args.window for _ in tail)
    versions = sorted(p for p in ckpt.glob("run-*/version-*") if p.is_dir())   # one server run: one run dir
    if not versions:
        print("no accepted version: nothing to compare against", file=sys.stderr)
        return 1

    print(f"\n2. static servers on the same traffic ({n_tail} requests each)", flush=True)
    static = run_static(workload.target_dir, versions[-1], prompts, n_requests=n_tail,
                        max_new_tokens=args.max_new_tokens, concurrency=args.concurrency, log_dir=work / "logs",
                        name="static-final", gpu=args.gpu)
    duty = [run_static(workload.target_dir, versions[-1], prompts, n_requests=n_tail,
                       max_new_tokens=args.max_new_tokens, concurrency=args.concurrency, log_dir=work / "logs",
                       name=f"duty-{f}", gpu=args.gpu, duty_cycle=float(f)) for f in args.duty_cycles.split(",")]
    random_ = run_static(workload.target_dir, draft, prompts, n_requests=n_tail, max_new_tokens=args.max_new_tokens,
                         concurrency=args.concurrency, log_dir=work / "logs", name="static-random", gpu=args.gpu)
    online_tail = {"tau": statistics.fmean(r["tau"] for r in tail),
                   "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in tail), "requests": n_tail}

    swaps = online["swaps"]
    lat = sorted(s["ms"] for s in swaps)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "workload": str(workload.root), "online": online, "throughput": {
                  "online": online_tail, "static_final_draft": static, "static_random_draft": random_,
                  "static_draft": versions[-1].name, "duty_cycle": duty},
              "machine": machine,
              "swap_latency_ms": {"n": len(lat), "median": lat[len(lat) // 2] if lat else None,
                                  "p90": lat[int(0.9 * (len(lat) - 1))] if lat else None,
                                  "max": lat[-1] if lat else None,
                                  "with_requests_in_flight": sum(s["in_flight"] > 0 for s in swaps)}}
    (args.out / "online_train.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(online, args.out / "online_train.png", "online training: served tau vs requests (CPU, block 4)")
    duty_png = plot_duty(static, duty, args.out / "online_train_duty.png", machine)

    rows = online["rows"]
    print("\nadaptation curve (served tau per window, from /metrics)")
    print(f"{'requests':>8} {'minutes':>7} {'tau':>6} {'probe tau':>9} {'version':>7}")
    for r in rows:
        print(f"{r['requests']:8d} {r['t'] / 60:7.2f} {r['tau']:6.2f} {r['probe_tau']:9.2f} {r['draft_version']:7.0f}")
    print(f"\ndecode throughput, same traffic ({args.concurrency} in flight, {args.max_new_tokens} new tokens)")
    print(f"{'server':<44} {'tau':>6} {'tok/s':>8} {'vs static':>9} {'trainer steps/min':>17}")
    for name, r in (("DFLASH + --online-train (step 1 tail)", online_tail),
                    (f"DFLASH, final draft ({versions[-1].name}), no training", static),
                    *((f"DFLASH + --online-train, duty cycle {d['duty_cycle']:g}", d) for d in duty),
                    ("DFLASH, random draft", random_)):
        steps = f"{r['trainer_steps_per_min']:17.1f}" if r.get("duty_cycle") is not None else f"{'-':>17}"
        print(f"{name:<44} {r['tau']:6.2f} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / static['tokens_per_s']:9.2f}"
              f" {steps}")
    sl = result["swap_latency_ms"]
    if lat:
        print(f"\nswap latency over {sl['n']} swaps ({sl['with_requests_in_flight']} with requests in flight): "
              f"median {sl['median']:.2f} ms, p90 {sl['p90']:.2f} ms, max {sl['max']:.2f} ms")
    print(f"\nmachine: {machine}")
    wrote = [str(args.out / "online_train.json")] + [x for x in (png, duty_png) if x]
    print(f"\nwrote {', '.join(wrote)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
