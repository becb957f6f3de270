"""Multi-turn traffic: drafts trained on records whose radix-cache hits are gaps, against records where they
were filled (from the feature pool, the default), in one run (real SGLang, CPU platform, DFLASH block size 4):

    python benchmarks/bench_multiturn.py [--minutes 5] [--out benchmarks/results]

1. The reference workload's multi-turn traffic (`Workload.chats`: 3-turn chats of domain-A code prompts
   after a shared system prompt, every turn carrying the whole conversation as token ids, so turns 2-3 and
   every system prompt are radix-cache hits) is captured twice by `--online-train --online-train-capture-only`
   servers with a random draft: once as served by default (hits filled from the feature pool:
   `--online-train-prefix-fill auto`) and once with `--online-train-prefix-fill off` and no prefix store (hits are
   zero-feature gaps, out of the loss).
2. A DFlash draft is fine-tuned from scratch on each replay (`python -m trainer.finetune`, same seed, the same
   step count for both, calibrated to fill --minutes).
3. Each draft is served (plain DFLASH, no online training) on held-out chats (eval split) and its served tau
   reported per turn. Also: rows of hits filled vs left as gaps, and bytes per token of the persisted shards
   (bf16 as captured; fp8: the same shards re-written with fp8 storage, each shard's records again in one shard).
Prints a table; writes <out>/multiturn.json and <out>/multiturn.png (matplotlib).
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

from bench_offline_pipeline import (BLOCK_SIZE, Settings, calibrate_steps, dir_bytes,  # noqa: E402
                                    export_random_draft, pyplot, run_finetune, write_draft_config)

MODES = {"filled": "auto", "gaps": "off"}     # --online-train-prefix-fill of the two capture servers (no store)


def capture(target_dir: Path, draft: Path, tokenizer, chats: list, replay: Path, store: str, *, max_new_tokens: int,
            concurrency: int, log_dir: Path) -> dict:
    from sglang_ext.demo.prompts import system_turn
    from sglang_ext.demo.traffic import send_chats
    from sglang_ext.launcher import draft_args, launch_server, metric_value

    args = draft_args(draft, BLOCK_SIZE) + ["--online-train", "--online-train-capture-only",
                                             "--online-train-persist-dir", str(replay),
                                             "--online-train-prefix-fill", store]
    with launch_server(target_dir, args, log_dir=log_dir, name=f"capture-fill-{store}") as server:
        before = metric_value(server.metrics(), "sglang:online_train_recorded_records_total")
        t0 = time.monotonic()
        turns = send_chats(server, tokenizer, chats, max_new_tokens=max_new_tokens, concurrency=concurrency,
                           system=system_turn())
        deadline = time.monotonic() + 120      # every turn recorded (the stop writes what waits for its shard)
        while time.monotonic() < deadline:
            text = server.metrics()
            if metric_value(text, "sglang:online_train_recorded_records_total") >= before + len(turns):
                break
            time.sleep(0.5)
        wall = time.monotonic() - t0
    filled = metric_value(text, "sglang:online_train_prefix_rows_total", result="filled")
    gap = metric_value(text, "sglang:online_train_prefix_rows_total", result="gap")
    tokens = metric_value(text, "sglang:online_train_recorded_tokens_total")
    fp8 = fp8_shard_bytes(replay, replay.with_name(replay.name + "-fp8"))
    return {"requests": len(turns), "wall_s": round(wall, 1), "rows_filled": filled, "rows_gap": gap,
            "recorded_tokens": tokens, "shard_bytes": dir_bytes(replay)["shard_bytes"],
            "bytes_per_token": dir_bytes(replay)["shard_bytes"] / max(1.0, tokens),
            "bytes_per_token_fp8": fp8 / max(1.0, tokens)}


def fp8_shard_bytes(replay: Path, out: Path) -> int:
    """Bytes of `replay`'s shards re-written with fp8 storage, shard by shard (the records the server wrote into
    one shard again in one shard, so prefixes are shared as they were)."""
    import dataclasses

    from trainer.replay import ReplayReader, ShardWriter

    reader = ReplayReader(replay)
    spec = dataclasses.replace(reader.spec, storage_dtype="float8_e4m3fn")
    with ShardWriter(out, spec, max_shard_tokens=1 << 62) as writer:
        shard = None
        for i, ref in enumerate(reader.records):
            if shard is not None and ref.shard != shard:
                writer.flush()
            shard = ref.shard
            writer.add(reader.read(i))
    return dir_bytes(out)["shard_bytes"]


def serve_chats(target_dir: Path, draft: Path, tokenizer, chats: list, *, max_new_tokens: int, concurrency: int,
                log_dir: Path, name: str) -> dict:
    from sglang_ext.demo.prompts import system_turn
    from sglang_ext.demo.traffic import send_chats
    from sglang_ext.launcher import draft_args, launch_server

    with launch_server(target_dir, draft_args(draft, BLOCK_SIZE), log_dir=log_dir, name=name) as server:
        turns = send_chats(server, tokenizer, chats, max_new_tokens=max_new_tokens, concurrency=concurrency,
                           system=system_turn())
    by_turn = {}
    for t in sorted({x.turn for x in turns}):
        by_turn[t + 1] = statistics.fmean(x.accept_length for x in turns if x.turn == t)
    return {"tau": statistics.fmean(x.accept_length for x in turns), "tau_by_turn": by_turn,
            "requests": len(turns)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="finetune budget per draft (default 5)")
    ap.add_argument("--workload-minutes", type=float, default=3.0, help="workload target budget (default 3, cached)")
    ap.add_argument("--train-chats", type=int, default=60, help="3-turn chats captured (default 60)")
    ap.add_argument("--eval-chats", type=int, default=12, help="held-out 3-turn chats served (default 12)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from sglang_ext.demo.workload import build_workload
    from trainer.dflash_draft import default_target_layer_ids

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-multiturn-"))
    t_start = time.monotonic()
    workload = build_workload(args.cache_dir, minutes=args.workload_minutes)
    target_dir = workload.target_dir
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    train_chats = workload.chats("A", "train")[:args.train_chats]
    eval_chats = workload.chats("A", "eval")[:args.eval_chats]
    n_layers = json.loads((target_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    s = Settings(minutes=args.minutes, target_layers=default_target_layer_ids(n_layers, 3), work_dir=str(work))
    config = write_draft_config(target_dir, work / "draft-config.json", s.draft_layers, s.target_layers)
    random_draft = export_random_draft(config, work / "random-draft", seed=s.seed)

    result: dict = {"settings": {**vars(args), "out": str(args.out), "cache_dir": str(args.cache_dir),
                                 "finetune": asdict(s)},
                    "chats": {"train": len(train_chats), "eval": len(eval_chats), "turns": 3}, "modes": {}}
    for mode, store in MODES.items():
        print(f"capture ({mode}: --online-train-prefix-fill {store}) of {len(train_chats)} chats ...", flush=True)
        result["modes"][mode] = {"capture": capture(target_dir, random_draft, tokenizer, train_chats,
                                                    work / f"replay-{mode}", store,
                                                    max_new_tokens=args.max_new_tokens,
                                                    concurrency=args.concurrency, log_dir=work / "logs")}
    # one step count for both drafts (the learning-rate schedule spans it), calibrated to fill --minutes
    calibration = calibrate_steps(work / "replay-filled", target_dir, config, work, s, progress=False)
    result["calibration"] = calibration
    for mode in MODES:
        print(f"finetune on the {mode} replay ({calibration['max_steps']} steps, ~{args.minutes:g} min) ...",
              flush=True)
        run = run_finetune(mode, work / f"replay-{mode}", target_dir, config, work / f"draft-{mode}", s,
                           max_steps=calibration["max_steps"], max_minutes=3 * args.minutes, progress=False)
        result["modes"][mode]["finetune"] = {"steps": run.steps, "wall_s": run.wall_s, "final_loss": run.final_loss}
    for name, draft in [("random", random_draft)] + [(m, work / f"draft-{m}") for m in MODES]:
        print(f"serve held-out chats with the {name} draft ...", flush=True)
        served = serve_chats(target_dir, draft, tokenizer, eval_chats, max_new_tokens=args.max_new_tokens,
                             concurrency=args.concurrency, log_dir=work / "logs", name=f"serve-{name}")
        result["modes"].setdefault(name, {})["served"] = served
    result["wall_min"] = round((time.monotonic() - t_start) / 60, 1)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"

    lines = [f"multi-turn traffic ({len(train_chats)} train chats x 3 turns, shared system prompt; held-out "
             f"{len(eval_chats)} chats), DFlash block {BLOCK_SIZE}, {result['machine']}",
             "| records | hit rows filled | hit rows left as gaps | shard bytes/token (bf16) | fp8 | "
             "finetune steps | served tau (held-out) | turn 1 | turn 2 | turn 3 |", "|" + " --- |" * 10]
    for mode in ("random", *MODES):
        r = result["modes"][mode]
        c, f, sv = r.get("capture"), r.get("finetune"), r["served"]
        head = (f"| trained on {mode} | {c['rows_filled']:.0f} | {c['rows_gap']:.0f} | {c['bytes_per_token']:.0f} | "
                f"{c['bytes_per_token_fp8']:.0f} | {f['steps']} | " if c
                else "| random draft (no training) | - | - | - | - | - | ")
        taus = " | ".join(f"{sv['tau_by_turn'].get(t, float('nan')):.3f}" for t in (1, 2, 3))
        lines.append(f"{head}{sv['tau']:.3f} | {taus} |")
    report = "\n".join(lines)
    print("\n" + report)
    (args.out / "multiturn.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for mode in ("random", *MODES):
            by_turn = result["modes"][mode]["served"]["tau_by_turn"]
            ax.plot(list(by_turn), list(by_turn.values()), "o-", label=mode)
        ax.set_xlabel("turn")
        ax.set_xticks([1, 2, 3])
        ax.set_ylabel("served tau, held-out chats")
        ax.set_title("drafts trained with radix-hit gaps vs filled", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "multiturn.png")
    print(f"\nwrote {args.out / 'multiturn.json'}; {result['wall_min']} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
