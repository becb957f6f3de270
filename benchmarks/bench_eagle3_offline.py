"""EAGLE3 next to DFlash on the reference workload, end to end offline: capture -> finetune -> served and offline tau.

    python benchmarks/bench_eagle3_offline.py                        # full run (~40-50 min on 2 busy cores,
                                                                     #   + ~8 min if the workload is not cached)
    python benchmarks/bench_eagle3_offline.py --quick                # smoke run: tiny workload, ~9 min
    python benchmarks/bench_eagle3_offline.py --minutes 5 --out /tmp/res

What is measured (one script run, every step shared with or reused from benchmarks/bench_offline_pipeline.py,
the DFlash-only benchmark):

1. Workload. `build_workload()` (cached under ~/.cache/sglang_ext): the tiny Qwen3-VL target (6 layers, hidden
   256) with domain-A prompts ("Continue the code:" + the first lines of a Python stdlib definition) split into
   train and eval by source file: the eval prompts come from files neither the target nor the drafts saw.
2. Capture, once per kind. The first --train-prompts domain-A TRAIN prompts go through trainer.capture's
   per-conversation path (`capture_example`, --regenerate semantics: the training text is the target's own
   greedy answer, at most --capture-new-tokens tokens) into one bf16 replay per kind, through the replay
   writer (bench_offline_pipeline.capture_traffic):
   * dflash: the draft's target layers (--dflash-target-layers, default [1, 2, 3]: 3 evenly spaced in [1, L-3]);
   * eagle3: the draft's aux layers plus the target's last layer (Eagle3Config.feature_layer_ids; the last
     layer gives the objective the target's next-token distribution). Aux layers: --eagle3-aux-layers, default
     SGLang's default capture ([1, L/2-1, L-4]) when those are 3 distinct layers, else [0, L/2-1, L-3]
     ([0, 2, 3] for the 6-layer target, where SGLang's default collides; as in tests/test_eagle3_serving.py).
   Both captures regenerate greedily from the same prompts, so both replays hold the same tokens (checked).
   "replay B/token" = shard bytes on disk / tokens captured.
3. Drafts, per kind, from the kind's config for the target (trainer.draft_kind):
   * dflash: tiny_models.tiny_draft_config (--dflash-layers layers, 4 heads of 64, the spare MASK_TOKEN_ID);
   * eagle3: one decoder layer, 4 query / 2 key-value heads of 64, MLP 512, the full target vocabulary.
   * random: the untrained from-scratch init (the trainer's, same seed), exported like a trained draft.
   * trained: `python -m trainer.finetune --draft-config ... --max-minutes M` from scratch on the kind's replay,
     same optimiser settings for both kinds (--lr, --batch-size, --max-tokens-per-batch, --warmup-ratio);
     DFlash with --num-anchors, EAGLE3 with --ttt-steps (default block size - 1 = 3, the draft steps of the
     served chain). max_steps is fixed per kind beforehand so that the cosine schedule ends inside the budget:
     a short thrown-away calibration run measures the kind's seconds per step, max_steps = --fill x M minutes /
     (s/step); --max-minutes M stays the hard wall-clock cap.
4. Tau on the first --eval-prompts domain-A EVAL prompts, block size 4 (DFlash: 4-token blocks; EAGLE3: a chain,
   topk 1, 3 draft steps, 4 draft tokens), greedy, at most --eval-new-tokens tokens, stopping at the target's
   EOS like real traffic (--ignore-eos for fixed-length answers):
   * served: real SGLang on the CPU platform, one server per draft (trainer.evaluate.evaluate_served with the
     kind's server arguments); tau = mean over prompts of meta_info spec_accept_length.
   * offline: trainer.evaluate.evaluate_offline (HF target + the trainer's draft replaying SGLang's verify rule
     for the kind); per prompt it should equal served (output ids, verify steps, accept histogram) up to argmax
     near-ties; the report prints how many prompts are equal.
   A random draft gets tau ~1.0 for either kind (its proposals are almost never accepted).
5. Report: a markdown table (kind, draft, replay bytes per token, draft parameters, finetune minutes / steps /
   final loss, served tau, offline tau), the served == offline counts, a JSON file
   <out>/eagle3_offline.json and, when matplotlib imports, a bar plot <out>/eagle3_offline.png
   (--out, default benchmarks/results/; "_quick" is appended to the names in --quick mode).

Everything the run produces (replays, drafts, server logs) lives in <out>/eagle3_offline_work[_quick]/
(--work-dir), rebuilt from scratch each run. --quick builds the small test workload (quick=True), captures 12
prompts and trains each kind for about a minute: a smoke run of the plumbing whose numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "20")   # a log file: progress bars every 20 s (read at tqdm import)

import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))                    # run from a checkout
sys.path.insert(0, str(BENCH_DIR))                    # the DFlash benchmark's helpers

import bench_offline_pipeline as bop  # noqa: E402
from bench_offline_pipeline import BLOCK_SIZE, FinetuneRun, log  # noqa: E402

KINDS = ("dflash", "eagle3")
DRAFTS = ("random", "trained")
EAGLE3_DIMS = dict(num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512)   # tests/test_eagle3_serving.py


@dataclass
class Settings:
    """Everything that decides the result (saved with it). The eval fields keep bench_offline_pipeline's names
    (its offline_tau / served_tau read them)."""
    minutes: float = 10.0              # finetune wall-clock budget per kind
    quick: bool = False
    workload_minutes: float = 8.0      # the workload target's training budget (build_workload's default)
    cache_dir: str | None = None       # workload cache (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)
    work_dir: str = ""
    seed: int = 0
    train_prompts: int = 200           # domain-A train prompts captured
    capture_new_tokens: int = 64       # cap on the target's regenerated answer per prompt
    eval_prompts: int = 40             # held-out domain-A prompts (bench_offline_pipeline's count)
    eval_new_tokens: int = 48
    ignore_eos: bool = False
    dflash_layers: int = 2
    dflash_target_layers: list[int] | None = None   # None: 3 evenly spaced in [1, L-3] ([1, 2, 3] for 6 layers)
    eagle3_aux_layers: list[int] | None = None      # None: SGLang's default if distinct, else [0, L/2-1, L-3]
    ttt_steps: int = BLOCK_SIZE - 1    # EAGLE3 training-time-test steps
    lr: float = 1e-3
    num_anchors: int = 64              # DFlash
    batch_size: int = 8
    max_tokens_per_batch: int = 4096
    warmup_ratio: float = 0.04
    max_steps: int | None = None       # None: calibrate per kind
    fill: float = 0.9                  # fraction of the budget the calibrated step count aims at
    calibration_steps: int = 12
    threads: int = 1                   # torch CPU threads (capture, finetune, offline eval)
    served: bool = True
    kinds: tuple[str, ...] = KINDS

    @classmethod
    def quick_settings(cls, **overrides) -> "Settings":
        base = dict(quick=True, minutes=1.0, workload_minutes=0.5, train_prompts=12, capture_new_tokens=32,
                    eval_prompts=4, eval_new_tokens=24, dflash_layers=1, calibration_steps=6)
        base.update(overrides)
        return cls(**base)


# ---- 2-3: per-kind draft configs ----------------------------------------------------------------------------

def eagle3_aux_layers(num_target_layers: int) -> list[int]:
    """SGLang's default EAGLE3 aux layers when they are 3 distinct layers, else [0, L/2-1, L-3]."""
    from trainer.eagle3_draft import default_aux_layer_ids
    try:
        return default_aux_layer_ids(num_target_layers)
    except ValueError:
        L = num_target_layers
        ids = [0, L // 2 - 1, L - 3]
        if len(set(ids)) != 3 or min(ids) < 0:
            raise ValueError(f"no default EAGLE3 aux layers for a {L}-layer target; pass --eagle3-aux-layers")
        return ids


def write_eagle3_config(target_dir: Path, path: Path, aux_layers: list[int]) -> Path:
    from trainer.draft_kind import get_kind
    cfg = get_kind("eagle3").config_for_target(json.loads((target_dir / "config.json").read_text()), num_layers=1,
                                               block_size=BLOCK_SIZE, feature_layers=list(aux_layers), **EAGLE3_DIMS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path


def write_kind_config(kind: str, target_dir: Path, path: Path, s: Settings) -> Path:
    if kind == "dflash":
        return bop.write_draft_config(target_dir, path, s.dflash_layers, s.dflash_target_layers)
    return write_eagle3_config(target_dir, path, s.eagle3_aux_layers)


def replay_layers(config_file: Path) -> list[int]:
    """The target layers a draft's replay must hold (DraftKind.feature_layers)."""
    from trainer.draft_kind import kind_for_draft
    kind = kind_for_draft(config_file)
    return kind.feature_layers(kind.load_config(config_file))


def draft_params(draft_dir: Path) -> int:
    """Trainable parameters of an exported draft (its safetensors, without the int / bool vocabulary maps)."""
    from safetensors import safe_open
    n = 0
    for f in Path(draft_dir).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                if t.get_dtype() in ("BF16", "F16", "F32"):
                    n += math.prod(t.get_shape())
    return n


def same_traffic(replay_dirs: dict[str, Path]) -> bool:
    """Both replays hold the same token sequences (the same regenerated answers)."""
    from trainer.replay import ReplayReader
    seqs = []
    for d in replay_dirs.values():
        reader = ReplayReader(d, verify_checksums=False)
        seqs.append(sorted(tuple(reader.read(i).input_ids.tolist()) for i in range(len(reader))))
    return all(x == seqs[0] for x in seqs[1:])


# ---- 3: finetune (kind-generic: bench_offline_pipeline.run_finetune passes DFlash's flags only) ---------------

def objective_args(kind: str, s: Settings) -> list[str]:
    return ["--num-anchors", str(s.num_anchors)] if kind == "dflash" else ["--ttt-steps", str(s.ttt_steps)]


def run_finetune(name: str, kind: str, replay: Path, target_dir: Path, draft_config: Path, output: Path, s: Settings,
                 max_steps: int, max_minutes: float, log_every: int = 10, progress: bool = True) -> FinetuneRun:
    """`python -m trainer.finetune` from scratch in a subprocess with the kind's objective flags."""
    run = bop.run_finetune(name, replay, target_dir, draft_config, output, s, max_steps, max_minutes,
                           log_every=log_every, progress=progress, objective_args=objective_args(kind, s))
    summary = json.loads((output / "training_summary.json").read_text())
    if summary.get("draft_kind") != kind:
        raise RuntimeError(f"finetune {name} trained a {summary.get('draft_kind')} draft, expected {kind}")
    return run


def calibrate_steps(kind: str, replay: Path, target_dir: Path, draft_config: Path, work: Path, s: Settings,
                    progress: bool = True) -> dict:
    """Seconds per optimiser step of this kind on this machine now (a short throw-away run) -> max_steps."""
    return bop.calibrate_steps(replay, target_dir, draft_config, work / f"calibration-{kind}", s, progress=progress,
                               objective_args=objective_args(kind, s))


# ---- 4: tau --------------------------------------------------------------------------------------------------

def served_equals_offline(served: dict, offline: dict) -> list[bool]:
    """Per prompt: the same output ids, verify steps and accept histogram (TauReport.to_dict rows)."""
    keys = ("output_ids", "verify_steps", "accept_histogram")
    return [all(a[k] == b[k] for k in keys) for a, b in zip(served["prompts"], offline["prompts"])]


# ---- the pipeline --------------------------------------------------------------------------------------------

def run_pipeline(s: Settings, progress: bool = True) -> dict:
    from sglang_ext.demo.workload import build_workload
    from trainer.dflash_draft import default_target_layer_ids
    from trainer.hf_target import HFTarget, load_chat_jsonl

    torch.set_num_threads(s.threads)
    t_start = time.monotonic()
    work = Path(s.work_dir)
    work.mkdir(parents=True, exist_ok=True)          # each replay / draft directory is rebuilt from scratch
    result: dict = {"block_size": BLOCK_SIZE}

    log(f"1. workload ({'quick' if s.quick else 'full'}, target budget {s.workload_minutes:g} min; built once, "
        f"then read from the cache)")
    workload = build_workload(Path(s.cache_dir) if s.cache_dir else None, minutes=s.workload_minutes,
                              seed=s.seed, quick=s.quick, progress=progress)
    target_dir = workload.target_dir
    n_layers = json.loads((target_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    if s.dflash_target_layers is None:
        s.dflash_target_layers = default_target_layer_ids(n_layers, 3)
    if s.eagle3_aux_layers is None:
        s.eagle3_aux_layers = eagle3_aux_layers(n_layers)
    result["settings"] = asdict(s)
    result["workload"] = {"root": str(workload.root), "hash": workload.hash, "target_layers": n_layers,
                          "target_heldout_loss": workload.stats.get("heldout_loss")}
    train_records = workload.prompts("A", "train")
    eval_records = workload.prompts("A", "eval")
    if len(train_records) < s.train_prompts or len(eval_records) < s.eval_prompts:
        log(f"note: the workload has {len(train_records)} train / {len(eval_records)} eval domain-A prompts; "
            f"using at most that many")
    train_file = bop.write_prompt_subset(train_records[:s.train_prompts], work / "prompts" / "A-train.jsonl")
    eval_file = bop.write_prompt_subset(eval_records[:s.eval_prompts], work / "prompts" / "A-eval.jsonl")
    train_sources = {r["source"].rsplit(":", 1)[0] for r in train_records}
    eval_sources = {r["source"].rsplit(":", 1)[0] for r in eval_records[:s.eval_prompts]}
    if train_sources & eval_sources:
        raise RuntimeError(f"eval prompts share source files with train prompts: {sorted(train_sources & eval_sources)}")
    eval_prompts = load_chat_jsonl(eval_file)
    result["prompts"] = {"train": len(load_chat_jsonl(train_file)), "eval": len(eval_prompts)}

    configs = {k: write_kind_config(k, target_dir, work / f"draft_config-{k}.json", s) for k in s.kinds}
    layers = {k: replay_layers(configs[k]) for k in s.kinds}
    result["replay_layers"] = layers

    log(f"2. capture {result['prompts']['train']} domain-A train prompts (regenerate, <= {s.capture_new_tokens} "
        f"tokens) into one bf16 replay per kind: " + ", ".join(f"{k} layers {v}" for k, v in layers.items()))
    replays = {k: work / f"replay-{k}" for k in s.kinds}
    captures = {}
    for k in s.kinds:
        cap = bop.capture_traffic(target_dir, train_file, {"bf16": replays[k]}, layers[k], s.capture_new_tokens,
                                  progress)
        cap["shard_bytes"] = cap["bytes"]["bf16"]["shard_bytes"]
        cap["bytes_per_token"] = cap["shard_bytes"] / max(1, cap["tokens"])
        captures[k] = cap
        log(f"capture {k}: {cap['tokens']} tokens ({cap['generated_tokens']} generated, "
            f"{cap['answers_ending_with_eos']}/{cap['prompts']} answers ended with EOS) in {cap['wall_s']}s; "
            f"shards {cap['shard_bytes']:,} B = {cap['bytes_per_token']:.0f} B/token")
    result["capture"] = captures
    result["same_traffic"] = same_traffic(replays) if len(replays) > 1 else True
    log(f"replays hold the same token sequences: {result['same_traffic']}")

    log("3. drafts: random init + finetune per kind")
    drafts: dict[tuple[str, str], Path] = {}
    runs: dict[str, FinetuneRun] = {}
    result["calibration"], result["max_steps"] = {}, {}
    for k in s.kinds:
        drafts[k, "random"] = bop.export_random_draft(configs[k], work / f"draft-{k}-random", s.seed)
        if s.max_steps is None:
            cal = calibrate_steps(k, replays[k], target_dir, configs[k], work, s, progress)
            max_steps = cal["max_steps"]
            log(f"calibration {k}: {cal['seconds_per_step']} s/step -> max_steps {max_steps} "
                f"({s.fill:.0%} of {s.minutes:g} min)")
        else:
            cal, max_steps = None, s.max_steps
        result["calibration"][k], result["max_steps"][k] = cal, max_steps
        r = run_finetune(k, k, replays[k], target_dir, configs[k], work / f"draft-{k}-trained", s,
                         max_steps=max_steps, max_minutes=s.minutes, progress=progress)
        runs[k] = r
        drafts[k, "trained"] = Path(r.output)
        log(f"finetune {k}: {r.steps}/{r.total_steps} steps ({r.stopped}), loop {r.train_s}s, process "
            f"{r.wall_s}s wall / {r.cpu_s}s CPU, loss {r.first_loss:.3f} -> {r.final_loss:.3f}, "
            f"train accuracy {r.final_accuracy if r.final_accuracy is None else round(r.final_accuracy, 3)}")
    result["finetune"] = {k: asdict(v) for k, v in runs.items()}
    result["params"] = {k: draft_params(drafts[k, "trained"]) for k in s.kinds}

    log(f"4. tau on {len(eval_prompts)} held-out domain-A prompts (block size {BLOCK_SIZE}, "
        f"<= {s.eval_new_tokens} tokens, {'ignore EOS' if s.ignore_eos else 'stop at EOS'})")
    target = HFTarget(target_dir)
    taus: dict[str, dict] = {k: {} for k in s.kinds}
    for (k, name), draft_dir in drafts.items():
        report = bop.offline_tau(target, target_dir, draft_dir, eval_prompts, s, progress)
        taus[k][name] = {"offline": report.tau, "offline_pooled": report.tau_pooled,
                         "offline_report": report.to_dict()}
        log(f"offline tau {k} {name}: {report.tau:.3f}")
    del target
    if s.served:
        for (k, name), draft_dir in drafts.items():
            log(f"served tau {k} {name}: starting SGLang ({' '.join(map(str, _server_args(draft_dir)))})")
            report = bop.served_tau(target_dir, draft_dir, eval_prompts, s, work / "server-logs", progress)
            t = taus[k][name]
            equal = served_equals_offline(report.to_dict(), t["offline_report"])
            t.update(served=report.tau, served_pooled=report.tau_pooled, served_report=report.to_dict(),
                     served_equals_offline=equal,
                     served_equals_offline_prompts=sum(equal),
                     served_offline_mismatches=[p.name for p, e in zip(report.prompts, equal) if not e])
            log(f"served tau {k} {name}: {report.tau:.3f} (offline {t['offline']:.3f}; "
                f"served == offline on {sum(equal)}/{len(equal)} prompts)")
    result["tau"] = taus
    result["checks"] = checks(result, s)
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    return result


def _server_args(draft_dir: Path) -> list[str]:
    from sglang_ext.launcher import draft_args
    return draft_args(draft_dir, BLOCK_SIZE)


def checks(result: dict, s: Settings) -> dict:
    """Sanity checks (informational; the benchmark has no tau goal)."""
    taus = result["tau"]
    key = "served" if s.served else "offline"
    out = {"tau_kind": key,
           "random_tau": {k: taus[k]["random"][key] for k in taus},
           "random_tau_near_1": all(taus[k]["random"][key] <= 1.2 for k in taus),
           "trained_beats_random": {k: taus[k]["trained"][key] > taus[k]["random"][key] for k in taus},
           "finetune_loop_minutes": {k: (v["train_s"] or 0) / 60 for k, v in result["finetune"].items()},
           "finetune_within_budget": all((v["train_s"] or 0) <= s.minutes * 60 + 1
                                         for v in result["finetune"].values()),
           "same_traffic": result["same_traffic"]}
    if s.served:
        out["served_equals_offline"] = {
            f"{k} {name}": f"{t['served_equals_offline_prompts']}/{len(t['served_equals_offline'])}"
            for k in taus for name, t in taus[k].items()}
        out["served_equals_offline_all"] = all(all(t["served_equals_offline"]) for k in taus for t in taus[k].values())
    return out


# ---- 5: report -----------------------------------------------------------------------------------------------

def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_report(result: dict) -> str:
    taus, runs, caps = result["tau"], result["finetune"], result["capture"]
    lines = ["| kind | draft | replay B/token | params | finetune min | steps | final loss | served tau | offline tau |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in taus:
        for name in DRAFTS:
            run = runs[k] if name == "trained" else None
            t = taus[k][name]
            lines.append(f"| {k} | {name} | {caps[k]['bytes_per_token']:.0f} | {result['params'][k]:,} "
                         f"| {_fmt(run['train_s'] / 60 if run else None, '.2f')} | {run['steps'] if run else 0} "
                         f"| {_fmt(run['final_loss'] if run else None)} | {_fmt(t.get('served'))} "
                         f"| {_fmt(t['offline'])} |")
    s, c = result["settings"], result["checks"]
    lines += ["",
              f"workload: target {result['workload']['target_layers']} layers; {result['prompts']['train']} train / "
              f"{result['prompts']['eval']} held-out eval domain-A prompts; block size {result['block_size']}, greedy, "
              f"<= {s['eval_new_tokens']} new tokens, {'ignore EOS' if s['ignore_eos'] else 'stop at EOS'}",
              "replay layers: " + "; ".join(f"{k} {v}" for k, v in result["replay_layers"].items())
              + f" (bf16; same token sequences in both replays: {result['same_traffic']})",
              "capture: " + "; ".join(f"{k} {c_['prompts']} prompts, {c_['tokens']} tokens "
                                      f"({c_['generated_tokens']} generated), {c_['shard_bytes']:,} shard bytes, "
                                      f"{c_['wall_s']}s" for k, c_ in caps.items()),
              "finetune (budget {:g} min each): ".format(s["minutes"]) + "; ".join(
                  f"{k} max_steps {result['max_steps'][k]}"
                  + (f" (calibrated at {result['calibration'][k]['seconds_per_step']} s/step)"
                     if result["calibration"][k] else "")
                  + f", {v['steps']} steps {v['stopped']}, {v['cpu_s'] / 60:.1f} CPU min, loss "
                    f"{_fmt(v['first_loss'])} -> {_fmt(v['final_loss'])}" for k, v in runs.items())
              + f" (EAGLE3 --ttt-steps {s['ttt_steps']}; DFlash --num-anchors {s['num_anchors']}; "
                f"the two losses are different objectives)"]
    if "served_equals_offline" in c:
        lines.append("served == offline per prompt (output ids, verify steps, accept histogram): "
                     + ", ".join(f"{k} {v}" for k, v in c["served_equals_offline"].items()))
        for k in taus:
            for name, t in taus[k].items():
                if t["served_offline_mismatches"]:
                    lines.append(f"  {k} {name} differs on: {', '.join(t['served_offline_mismatches'])}")
    lines += [f"[{'ok' if c['random_tau_near_1'] else '!!'}] random drafts' {c['tau_kind']} tau ~1: "
              + ", ".join(f"{k} {v:.3f}" for k, v in c["random_tau"].items()),
              f"[{'ok' if all(c['trained_beats_random'].values()) else '!!'}] trained > random "
              f"({c['tau_kind']} tau): " + ", ".join(f"{k} {v}" for k, v in c["trained_beats_random"].items()),
              f"[{'ok' if c['finetune_within_budget'] else '!!'}] finetune loops within {s['minutes']:g} min: "
              + ", ".join(f"{k} {v:.2f} min" for k, v in c["finetune_loop_minutes"].items())]
    return "\n".join(lines)


def maybe_plot(result: dict, path: Path) -> str:
    plt = bop.pyplot()
    if plt is None:
        return "matplotlib is not installed: no PNG (the numbers are in the table and the JSON)"
    taus = result["tau"]
    labels = [f"{k}\n{name}" for k in taus for name in DRAFTS]
    series = [("offline", [taus[k][n]["offline"] for k in taus for n in DRAFTS])]
    if all("served" in taus[k][n] for k in taus for n in DRAFTS):
        series.insert(0, ("served", [taus[k][n]["served"] for k in taus for n in DRAFTS]))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=f"{name} tau")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.axhline(1.0, linestyle="--", color="grey", linewidth=0.8)
    ax.set_ylabel(f"tau (block size {result['block_size']}, greedy)")
    ax.set_title(f"EAGLE3 vs DFlash on held-out domain A ({result['settings']['minutes']:g} min finetune each)"
                 + (" [quick]" if result["settings"]["quick"] else ""), fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"wrote {path}"


def build_parser() -> argparse.ArgumentParser:
    d, q = Settings(), Settings.quick_settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None,
                   help=f"finetune wall-clock budget per kind (default {d.minutes:g}; --quick: {q.minutes:g})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small workload, few prompts, ~1 min finetune per kind (numbers meaningless)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="directory of the JSON (and PNG) results (default benchmarks/results/)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="replays, drafts, server logs, each rebuilt (default <out>/eagle3_offline_work[_quick])")
    p.add_argument("--cache-dir", default=None, help="workload cache (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)")
    p.add_argument("--workload-minutes", type=float, default=None,
                   help=f"workload target training budget (default {d.workload_minutes:g}; --quick: "
                        f"{q.workload_minutes:g}); part of the workload's cache key")
    p.add_argument("--seed", type=int, default=None, help=f"seed of workload, init and training ({d.seed})")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                   help=f"draft kinds to run (default: {' '.join(KINDS)})")
    p.add_argument("--train-prompts", type=int, default=None,
                   help=f"domain-A train prompts captured ({d.train_prompts}; --quick: {q.train_prompts})")
    p.add_argument("--capture-new-tokens", type=int, default=None,
                   help=f"max regenerated tokens per prompt ({d.capture_new_tokens}; --quick: {q.capture_new_tokens})")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help=f"held-out domain-A eval prompts ({d.eval_prompts}; --quick: {q.eval_prompts})")
    p.add_argument("--eval-new-tokens", type=int, default=None,
                   help=f"max new tokens per eval request ({d.eval_new_tokens}; --quick: {q.eval_new_tokens})")
    p.add_argument("--ignore-eos", action="store_true", help="eval requests run to max tokens past EOS")
    p.add_argument("--dflash-layers", type=int, default=None,
                   help=f"DFlash draft decoder layers ({d.dflash_layers}; --quick: {q.dflash_layers})")
    p.add_argument("--dflash-target-layers", type=int, nargs="+", default=None,
                   help="target layers the DFlash draft reads (default: 3 evenly spaced in [1, L-3])")
    p.add_argument("--eagle3-aux-layers", type=int, nargs="+", default=None,
                   help="EAGLE3 aux target layers (default: SGLang's default if 3 distinct layers, else "
                        "[0, L/2-1, L-3] = [0, 2, 3] for 6 layers); the replay adds the last layer")
    p.add_argument("--ttt-steps", type=int, default=None,
                   help=f"EAGLE3 training-time-test steps (default {d.ttt_steps} = block size - 1)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate, both kinds ({d.lr:g})")
    p.add_argument("--num-anchors", type=int, default=None, help=f"DFlash blocks sampled per sequence ({d.num_anchors})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per micro-batch ({d.batch_size})")
    p.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help=f"padded tokens per micro-batch ({d.max_tokens_per_batch})")
    p.add_argument("--warmup-ratio", type=float, default=None, help=f"linear warmup fraction ({d.warmup_ratio:g})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="fixed optimiser steps for both kinds (default: calibrated per kind to the budget)")
    p.add_argument("--fill", type=float, default=None,
                   help=f"fraction of the budget the calibrated step count aims at ({d.fill})")
    p.add_argument("--calibration-steps", type=int, default=None,
                   help=f"steps of each throw-away calibration run ({d.calibration_steps}; --quick: "
                        f"{q.calibration_steps})")
    p.add_argument("--threads", type=int, default=None, help=f"torch CPU threads ({d.threads})")
    p.add_argument("--no-served", action="store_true", help="skip real SGLang (offline tau only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def settings_from_args(args) -> Settings:
    overrides = {k: v for k, v in {
        "minutes": args.minutes, "workload_minutes": args.workload_minutes, "cache_dir": args.cache_dir,
        "seed": args.seed, "train_prompts": args.train_prompts, "capture_new_tokens": args.capture_new_tokens,
        "eval_prompts": args.eval_prompts, "eval_new_tokens": args.eval_new_tokens,
        "dflash_layers": args.dflash_layers, "dflash_target_layers": args.dflash_target_layers,
        "eagle3_aux_layers": args.eagle3_aux_layers, "ttt_steps": args.ttt_steps, "lr": args.lr,
        "num_anchors": args.num_anchors, "batch_size": args.batch_size,
        "max_tokens_per_batch": args.max_tokens_per_batch, "warmup_ratio": args.warmup_ratio,
        "max_steps": args.max_steps, "fill": args.fill, "calibration_steps": args.calibration_steps,
        "threads": args.threads, "kinds": tuple(args.kinds) if args.kinds else None}.items() if v is not None}
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    if args.no_served:
        overrides["served"] = False
    s = Settings.quick_settings(**overrides) if args.quick else Settings(**overrides)
    s.work_dir = str(args.work_dir or args.out / f"eagle3_offline_work{'_quick' if args.quick else ''}")
    return s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    if s.minutes > 10:
        log(f"note: --minutes {s.minutes:g} exceeds the 10-minute finetune cap of the comparison")
    result = run_pipeline(s, progress=not args.no_progress)
    bop.save_result(result, format_report(result), args.out, "eagle3_offline_quick" if s.quick else "eagle3_offline",
                    maybe_plot)
    log(f"done in {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
