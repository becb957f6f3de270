"""Does turning --online-train on make the server faster, and when? One timeline of realistic traffic served three
ways (real SGLang, CPU platform, DFLASH block size 4, the reference workload):

    python benchmarks/bench_net_benefit.py [--phase-chats 40] [--static-minutes 2] [--out benchmarks/results]

Traffic: 3-turn chats after a shared system prompt (`Workload.chats`; every turn carries the whole conversation,
so each chat's earlier turns and the system prompt are radix-cache hits), 4 chats at a time, greedy, a domain
shift half way: phase 1 serves --phase-chats chats of domain A (code), phase 2 as many of domain B (prose).

1. (a) random: the untrained draft, served plain.
2. (b) static: the same draft fine-tuned offline (`python -m trainer.finetune`) for --static-minutes on
   --capture-chats other domain-A chats, captured by a capture-only server: what a user trains before deploying
   when they know their first traffic. Served plain.
3. (c) online: the random draft with `--online-train` (the demo's settings: lr 1e-3, a candidate every 10 steps,
   training from 8 records), learning from the timeline itself.

Every --window turns (in completion order): served tau (mean accept length of those turns) and decode tok/s (their
output tokens over the wall time since the previous window). Reported per phase and for the second half of each
phase (after the shift: phase 2's second half), with online's ratio to static. Table + <out>/net_benefit.json +
<out>/net_benefit.png. About 11.5 minutes on 2 CPU cores with the defaults once the workload is built (the
first run builds it: a few more minutes, cached after). The workload has 66 chats per domain: --capture-chats +
--phase-chats of domain A at most.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_multiturn import capture  # noqa: E402
from bench_offline_pipeline import (BLOCK_SIZE, Settings, calibrate_steps, export_random_draft,  # noqa: E402
                                    pyplot, run_finetune, write_draft_config)

ONLINE_ARGS = ["--online-train", "--online-train-lr", "1e-3", "--online-train-swap-every", "10",
               "--online-train-min-records", "8"]       # the demo's (sglang_ext/demo/online.py)
CONFIGS = ("random", "static", "online")
PHASES = (("A", "code"), ("B", "prose"))


def serve_timeline(target_dir: Path, draft: Path, tokenizer, phases: list[list], *, extra_args: list[str],
                   max_new_tokens: int, concurrency: int, log_dir: Path, name: str) -> dict:
    """The phases' chats, one phase after the other, on one server; every turn with its phase, completion time,
    accept length and output tokens; for an online server, its trainer's figures at the end."""
    from sglang_ext.demo.prompts import system_turn
    from sglang_ext.demo.traffic import online_metrics, send_chats
    from sglang_ext.launcher import draft_args, launch_server

    turns = []
    with launch_server(target_dir, draft_args(draft, BLOCK_SIZE) + extra_args, log_dir=log_dir, name=name) as server:
        t0 = time.monotonic()
        for phase, chats in enumerate(phases):
            done = send_chats(server, tokenizer, chats, max_new_tokens=max_new_tokens, concurrency=concurrency,
                              system=system_turn(), t0=t0)
            turns += [{"phase": phase, "t_done": round(x.t_done, 3), "accept": x.accept_length,
                       "tokens": len(x.output_ids), "turn": x.turn} for x in sorted(done, key=lambda x: x.t_done)]
            print(f"  {name}: phase {phase + 1} done at {time.monotonic() - t0:.0f}s, served tau "
                  f"{statistics.fmean(x.accept_length for x in done):.3f}", flush=True)
        trainer = online_metrics(server) if "--online-train" in extra_args else None
    return {"turns": turns, "wall_s": round(turns[-1]["t_done"], 1), "trainer": trainer}


def windows(turns: list[dict], size: int) -> list[dict]:
    """Consecutive windows of `size` turns (completion order, within a phase): served tau and decode tok/s."""
    out, t_prev = [], 0.0
    for phase in sorted({t["phase"] for t in turns}):
        ts = [t for t in turns if t["phase"] == phase]
        for i in range(0, len(ts), size):
            w = ts[i:i + size]
            span = max(1e-6, w[-1]["t_done"] - t_prev)
            out.append({"phase": phase, "turns": len(w), "t_end": w[-1]["t_done"],
                        "tau": statistics.fmean(t["accept"] for t in w),
                        "tok_s": sum(t["tokens"] for t in w) / span})
            t_prev = w[-1]["t_done"]
    return out


def summarize(turns: list[dict], phase: int, second_half: bool = False) -> dict:
    """Served tau and decode tok/s over a phase (or its second half, by completion order); the time runs from the
    completion of the turn before (turns are listed phase after phase, each in completion order)."""
    ts = [t for t in turns if t["phase"] == phase]
    if second_half:
        ts = ts[len(ts) // 2:]
    first = turns.index(ts[0])
    t_start = turns[first - 1]["t_done"] if first else 0.0
    return {"tau": statistics.fmean(t["accept"] for t in ts),
            "tok_s": sum(t["tokens"] for t in ts) / max(1e-6, ts[-1]["t_done"] - t_start), "turns": len(ts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-chats", type=int, default=40, help="3-turn chats per phase (default 40)")
    ap.add_argument("--capture-chats", type=int, default=26,
                    help="domain-A chats (not served in the timeline) the static draft is trained on (default 26)")
    ap.add_argument("--static-minutes", type=float, default=2.0, help="the static draft's finetune budget (default 2)")
    ap.add_argument("--workload-minutes", type=float, default=3.0, help="workload target budget (default 3, cached)")
    ap.add_argument("--window", type=int, default=12, help="turns per window of the curve (default 12)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per turn, greedy (default 48)")
    ap.add_argument("--concurrency", type=int, default=4, help="chats in flight (default 4)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                    help="where net_benefit.json and net_benefit.png go (default benchmarks/results)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="workload cache (default $SGLANG_EXT_CACHE)")
    args = ap.parse_args(argv)
    for flag in ("phase_chats", "capture_chats", "window", "max_new_tokens", "concurrency"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.static_minutes <= 0:
        ap.error("--static-minutes must be positive")

    from transformers import AutoTokenizer

    from sglang_ext.demo.workload import build_workload
    from trainer.dflash_draft import default_target_layer_ids

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-net-benefit-"))
    t_start = time.monotonic()
    workload = build_workload(args.cache_dir, minutes=args.workload_minutes)
    t_built = time.monotonic()
    target_dir = workload.target_dir
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    chats_a = workload.chats("A", "train")
    need = args.capture_chats + args.phase_chats
    if len(chats_a) < need:
        ap.error(f"the workload has {len(chats_a)} domain-A chats; --capture-chats + --phase-chats need {need}")
    chats_b = workload.chats("B", "train")
    if len(chats_b) < args.phase_chats:
        ap.error(f"the workload has {len(chats_b)} domain-B chats; --phase-chats needs {args.phase_chats}")
    phases = [chats_a[args.capture_chats:need], chats_b[:args.phase_chats]]
    n_layers = json.loads((target_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    s = Settings(minutes=args.static_minutes, target_layers=default_target_layer_ids(n_layers, 3), work_dir=str(work))
    config = write_draft_config(target_dir, work / "draft-config.json", s.draft_layers, s.target_layers)
    random_draft = export_random_draft(config, work / "random-draft", seed=s.seed)
    result: dict = {"settings": {**vars(args), "out": str(args.out), "cache_dir": str(args.cache_dir),
                                 "finetune": asdict(s), "online_args": ONLINE_ARGS},
                    "phases": [f"{d} ({name}), {args.phase_chats} chats x 3 turns" for d, name in PHASES],
                    "configs": {}}

    # (b) the static draft: domain-A chats captured (not the timeline's), fine-tuned offline from the same init
    print(f"static draft: capture {args.capture_chats} domain-A chats, finetune ~{args.static_minutes:g} min ...",
          flush=True)
    t0 = time.monotonic()
    captured = capture(target_dir, random_draft, tokenizer, chats_a[:args.capture_chats], work / "replay-static",
                       "auto", max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                       log_dir=work / "logs")
    calibration = calibrate_steps(work / "replay-static", target_dir, config, work, s, progress=False)
    run = run_finetune("static", work / "replay-static", target_dir, config, work / "static-draft", s,
                       max_steps=calibration["max_steps"], max_minutes=3 * args.static_minutes, progress=False)
    result["static_draft"] = {"capture": captured, "calibration": calibration, "steps": run.steps,
                              "final_loss": run.final_loss, "wall_s": round(time.monotonic() - t0, 1)}

    drafts = {"random": (random_draft, []), "static": (work / "static-draft", []),
              "online": (random_draft, ONLINE_ARGS)}
    for name in CONFIGS:
        draft, extra = drafts[name]
        print(f"serve the timeline: {name} ...", flush=True)
        served = serve_timeline(target_dir, draft, tokenizer, phases, extra_args=extra,
                                max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                                log_dir=work / "logs", name=f"timeline-{name}")
        served["windows"] = windows(served["turns"], args.window)
        served["phase"] = [summarize(served["turns"], p) for p in range(len(phases))]
        served["phase_second_half"] = [summarize(served["turns"], p, second_half=True) for p in range(len(phases))]
        result["configs"][name] = served
    result["wall_min"] = round((time.monotonic() - t_built) / 60, 1)
    result["workload_build_min"] = round((t_built - t_start) / 60, 1)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    c = result["configs"]
    result["online_vs_static_after_shift"] = {
        k: c["online"]["phase_second_half"][1][k] / c["static"]["phase_second_half"][1][k] for k in ("tau", "tok_s")}

    lines = [f"timeline: {result['phases'][0]}, then {result['phases'][1]}; shared system prompt, "
             f"{args.concurrency} chats in flight, {args.max_new_tokens} new tokens, DFlash block {BLOCK_SIZE}, "
             f"{result['machine']}",
             "| draft | phase 1 tau | phase 1 tok/s | phase 2 tau | phase 2 tok/s | phase 2, 2nd half: tau | tok/s |",
             "|" + " --- |" * 7]
    for name in CONFIGS:
        ph, half = c[name]["phase"], c[name]["phase_second_half"][1]
        lines.append(f"| {name} | {ph[0]['tau']:.3f} | {ph[0]['tok_s']:.1f} | {ph[1]['tau']:.3f} | "
                     f"{ph[1]['tok_s']:.1f} | {half['tau']:.3f} | {half['tok_s']:.1f} |")
    r = result["online_vs_static_after_shift"]
    lines.append(f"\nafter the shift (phase 2, second half) online / static: tau {r['tau']:.2f}x, decode tok/s "
                 f"{r['tok_s']:.2f}x; static draft {result['static_draft']['steps']} finetune steps; online trainer "
                 f"{c['online']['trainer']['trainer_steps']:.0f} steps, {c['online']['trainer']['swaps_total']:.0f} "
                 f"swaps; {result['wall_min']} min (+{result['workload_build_min']} min workload build)")
    report = "\n".join(lines)
    print("\n" + report)
    (args.out / "net_benefit.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plt = pyplot()
    if plt is not None:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
        for name in CONFIGS:
            ws = c[name]["windows"]
            x = [sum(w["turns"] for w in ws[:i + 1]) for i in range(len(ws))]
            ax1.plot(x, [w["tau"] for w in ws], "o-", ms=3, label=name)
            ax2.plot(x, [w["tok_s"] for w in ws], "o-", ms=3, label=name)
        shift = sum(w["turns"] for w in c["online"]["windows"] if w["phase"] == 0)
        for ax in (ax1, ax2):
            ax.axvline(shift, color="grey", ls="--", lw=0.8)
        ax1.set_ylabel("served tau")
        ax2.set_ylabel("decode tok/s")
        ax2.set_xlabel("turns served (domain A, then B after the dashed line)")
        ax1.set_title("random vs static (offline, domain A) vs --online-train", fontsize=9)
        ax1.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "net_benefit.png")
    print(f"\nwrote {args.out / 'net_benefit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
