"""End-to-end offline DFlash pipeline on the reference workload: capture -> replay -> finetune -> tau.

    python benchmarks/bench_offline_pipeline.py                      # full run (~30-40 min on 2 busy cores)
    python benchmarks/bench_offline_pipeline.py --quick              # smoke run: tiny workload, a few minutes
    python benchmarks/bench_offline_pipeline.py --minutes 5 --out /tmp/res

The issue's acceptance, measured:

1. Workload. `build_workload()` (cached): a tiny Qwen3-VL target (6 layers, hidden 256) trained on CPU, with
   domain-A prompts ("Continue the code:" + the first lines of a Python stdlib definition) split into train
   and eval by source file, so the eval prompts come from files the target (and the draft) never saw.
2. Capture. The first --train-prompts domain-A TRAIN prompts go through trainer.capture's per-conversation
   path (`capture_example` with --regenerate semantics: the target's own greedy answer, at most
   --capture-new-tokens tokens, is the training text) ONCE; every record is written to two replay
   directories through the replay writer: bf16 shards and fp8 shards (per-token-and-layer scales). Both are
   therefore the same traffic, quantized from the same float32 features (as `--dtype bf16` and
   `--dtype fp8` captures would store them). Shard bytes are measured on disk.
3. Drafts. A DFlash draft config for the target (block size 4, --draft-layers layers, target layers
   [1, 2, 3], mask token = tiny_models.MASK_TOKEN_ID, a spare id the tokenizer never produces).
   * random: the untrained from-scratch init (DFlashDraft.from_scratch, the seed the trainer uses), exported.
   * bf16 / fp8: `python -m trainer.finetune --draft-config ... --max-minutes M` from scratch on each replay.
     The step count is fixed beforehand so that the cosine schedule ends inside the budget: a short
     calibration run (thrown away) measures seconds per step, max_steps = --fill x M minutes / (s/step).
     The same max_steps is used for bf16 and fp8; --max-minutes M stays as the hard wall-clock cap.
     The bf16 run keeps a checkpoint every max_steps / --curve-points steps for the tau-vs-time curve.
4. Tau on the first --eval-prompts domain-A EVAL prompts, greedy, block size 4, --eval-new-tokens tokens:
   * served: real SGLang 0.5.23 (CPU platform, DFLASH) per draft; tau = mean over prompts of SGLang's
     meta_info spec_accept_length (trainer.evaluate.evaluate_served).
   * offline: trainer.evaluate.evaluate_offline (HF target + the trainer's draft replaying SGLang's verify
     rule); it should equal served up to argmax near-ties.
   * curve: offline tau of the bf16 run's checkpoints on the first --curve-prompts eval prompts.
   Requests stop at the target's EOS like real traffic (--ignore-eos for fixed-length answers).
5. Report: a table (draft, replay dtype, shard bytes, finetune minutes / steps / final loss, tau served,
   tau offline), the curve, the acceptance checks (bf16 served tau >= 2.0; fp8 bytes <= 0.55x bf16; fp8
   draft loses <= 2% tau), and a JSON file <out>/offline_pipeline.json (--out, default
   benchmarks/results/). matplotlib is not a dependency: without it no PNG is written.

Everything the run produces (replays, drafts, logs) lives in <out>/offline_pipeline_work/ (--work-dir),
rebuilt from scratch each run. --quick builds the small test workload (quick=True) and trains for about a
minute, for a smoke run of the plumbing; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "20")   # a log file: progress bars every 20 s (read at tqdm import)

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))                    # run from a checkout

from sglang_ext.demo.tiny_models import MASK_TOKEN_ID, tiny_draft_config  # noqa: E402
from trainer.dflash_draft import default_target_layer_ids  # noqa: E402

BLOCK_SIZE = 4
TAU_GOAL = 2.0                 # served tau of the bf16-trained draft
FP8_BYTES_GOAL = 0.55          # fp8 shard bytes / bf16 shard bytes
FP8_TAU_LOSS_GOAL = 0.02       # relative served-tau loss of the fp8-trained draft
REPLAY_DTYPES = ("bf16", "fp8")


@dataclass
class Settings:
    """Everything that decides the result (saved with it)."""
    minutes: float = 10.0              # finetune wall-clock budget per draft (the cap)
    quick: bool = False
    workload_minutes: float = 8.0      # the workload target's training budget (build_workload's default)
    cache_dir: str | None = None       # workload cache (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)
    work_dir: str = ""
    seed: int = 0
    train_prompts: int = 200           # domain-A train prompts captured
    capture_new_tokens: int = 64       # cap on the target's regenerated answer per prompt
    eval_prompts: int = 40             # held-out domain-A prompts: the whole held-out set (24 gave +-2% noise)
    eval_new_tokens: int = 48
    ignore_eos: bool = False
    draft_layers: int = 2
    target_layers: list[int] | None = None   # None: 3 evenly spaced in [1, L-3] ([1, 2, 3] for 6 layers)
    lr: float = 1e-3
    num_anchors: int = 64
    batch_size: int = 8
    max_tokens_per_batch: int = 4096
    warmup_ratio: float = 0.04
    max_steps: int | None = None       # None: calibrate
    fill: float = 0.9                  # fraction of the budget the calibrated step count aims at
    calibration_steps: int = 12
    threads: int = 1                   # torch CPU threads (capture, finetune, offline eval)
    served: bool = True
    curve_points: int = 6
    curve_prompts: int = 12

    @classmethod
    def quick_settings(cls, **overrides) -> "Settings":
        base = dict(quick=True, minutes=1.0, workload_minutes=0.5, train_prompts=12, capture_new_tokens=32,
                    eval_prompts=4, eval_new_tokens=24, draft_layers=1, calibration_steps=6, curve_points=2,
                    curve_prompts=4)
        base.update(overrides)
        return cls(**base)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1-2: workload and capture -------------------------------------------------------------------------------

def write_prompt_subset(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dir_bytes(path: Path) -> dict:
    """On-disk bytes of a replay directory: shards alone and everything (manifest included)."""
    shards = sum(p.stat().st_size for p in path.glob("shard-*.safetensors"))
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"shard_bytes": shards, "dir_bytes": total}


def capture_traffic(target_dir: Path, prompts_file: Path, replay_dirs: dict[str, Path], layer_ids: list[int],
                    max_new_tokens: int, progress: bool = True) -> dict:
    """Run trainer.capture's per-conversation capture (--regenerate) once per prompt and write every record
    to one replay directory per storage dtype ("bf16" / "fp8"). Returns traffic statistics."""
    from tqdm import tqdm

    from trainer.capture import STORAGE, CaptureOptions, capture_example
    from trainer.hf_target import HFTarget, load_chat_jsonl
    from trainer.replay import ReplaySpec, ShardWriter
    from trainer.target import target_identity, target_info

    t0 = time.monotonic()
    info = target_info(target_dir)
    identity = target_identity(target_dir)
    examples = load_chat_jsonl(prompts_file)
    writers = {}
    for dtype, d in replay_dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        spec = ReplaySpec(target=identity, layer_ids=tuple(layer_ids), hidden_size=info.hidden_size,
                          storage_dtype=STORAGE[dtype])
        writers[dtype] = ShardWriter(d, spec)
    target = HFTarget(target_dir)
    opts = CaptureOptions(layer_ids=list(layer_ids), regenerate=True, max_new_tokens=max_new_tokens)
    tokens = generated = ended_with_eos = 0
    for example in tqdm(examples, desc="capture (regenerate)", unit="prompt", disable=not progress):
        record = capture_example(target, example, opts)
        for writer in writers.values():
            writer.add(record)
        tokens += len(record)
        n_gen = int(record.loss_mask.sum())
        generated += n_gen
        ended_with_eos += int(int(record.input_ids[-1]) in target.eos_token_ids)
    for writer in writers.values():
        writer.close()
    return {"prompts": len(examples), "tokens": tokens, "generated_tokens": generated,
            "mean_generated_tokens": generated / max(1, len(examples)),
            "answers_ending_with_eos": ended_with_eos, "wall_s": round(time.monotonic() - t0, 1),
            "bytes": {dtype: dir_bytes(d) for dtype, d in replay_dirs.items()}}


# ---- 3: drafts -----------------------------------------------------------------------------------------------

def write_draft_config(target_dir: Path, path: Path, num_layers: int, target_layers: list[int]) -> Path:
    target_config = json.loads((target_dir / "config.json").read_text())
    n_target_layers = target_config["text_config"]["num_hidden_layers"]
    cfg = tiny_draft_config(target_config, num_layers=num_layers, block_size=BLOCK_SIZE,
                            target_layer_ids=list(target_layers))
    assert cfg.mask_token_id == MASK_TOKEN_ID
    if max(target_layers) >= n_target_layers:
        raise ValueError(f"target layers {target_layers} out of range for {n_target_layers} target layers")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path


def export_random_draft(config_file: Path, out: Path, seed: int) -> Path:
    """The untrained draft: the trainer's from-scratch init (same seed), exported like a trained one."""
    from trainer.draft_kind import kind_for_draft

    torch.manual_seed(seed)
    kind = kind_for_draft(config_file)
    draft = kind.from_scratch(kind.load_config(config_file), seed=seed)
    shutil.rmtree(out, ignore_errors=True)
    draft.export(out, dtype=torch.bfloat16)
    return out


@dataclass
class FinetuneRun:
    name: str
    output: str
    argv: list[str]
    wall_s: float                      # the whole subprocess (imports, replay checks, loop, export)
    cpu_s: float                       # user + system CPU seconds of the subprocess
    train_s: float | None              # the training loop (train_log elapsed_s of the last line)
    steps: int
    total_steps: int
    stopped: str
    first_loss: float | None
    final_loss: float | None
    final_accuracy: float | None
    tokens: int
    log: list[dict]                    # train_log.jsonl


def run_finetune(name: str, replay: Path, target_dir: Path, draft_config: Path, output: Path, s: Settings,
                 max_steps: int, max_minutes: float, checkpoint_every: int = 0, log_every: int = 10,
                 progress: bool = True, objective_args: list[str] | None = None,
                 init_from: Path | None = None) -> FinetuneRun:
    """`python -m trainer.finetune` in a subprocess, from scratch (`draft_config`) or from the weights of the
    draft `init_from`; returns its summary and log. objective_args: the draft kind's objective flags (default
    DFlash's --num-anchors)."""
    shutil.rmtree(output, ignore_errors=True)
    argv = [sys.executable, "-m", "trainer.finetune", "--replay", str(replay), "--target-model-path", str(target_dir),
            *(["--draft-model-path", str(init_from)] if init_from else ["--draft-config", str(draft_config)]),
            "--output", str(output), "--block-size", str(BLOCK_SIZE),
            "--max-minutes", f"{max_minutes:g}", "--max-steps", str(max_steps), "--lr", f"{s.lr:g}",
            *(objective_args if objective_args is not None else ["--num-anchors", str(s.num_anchors)]),
            "--batch-size", str(s.batch_size),
            "--max-tokens-per-batch", str(s.max_tokens_per_batch), "--warmup-ratio", f"{s.warmup_ratio:g}",
            "--seed", str(s.seed), "--device", "cpu", "--log-every", str(log_every),
            "--checkpoint-every", str(checkpoint_every), "--keep-checkpoints", "1000"]
    if not progress:
        argv.append("--no-progress")
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), PYTHONPATH=str(REPO_ROOT) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    if not sys.stderr.isatty():
        env.setdefault("TQDM_MININTERVAL", "20")
    log(f"finetune {name}: {' '.join(argv[1:])}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"finetune {name} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}")
    summary = json.loads((output / "training_summary.json").read_text())
    train_log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return FinetuneRun(name=name, output=str(output), argv=argv[1:], wall_s=round(wall, 1),
                       cpu_s=round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
                       train_s=round(train_log[-1]["elapsed_s"], 1) if train_log else None,
                       steps=summary["steps"], total_steps=summary["total_steps"], stopped=summary["stopped"],
                       first_loss=summary["first_loss"], final_loss=summary["final_loss"],
                       final_accuracy=summary["final_accuracy"], tokens=summary["tokens"], log=train_log)


def calibrate_steps(replay: Path, target_dir: Path, draft_config: Path, work: Path, s: Settings,
                    progress: bool = True, objective_args: list[str] | None = None,
                    init_from: Path | None = None) -> dict:
    """Seconds per optimiser step on this machine now (a short throw-away run); -> max_steps for the budget."""
    run = run_finetune("calibration", replay, target_dir, draft_config, work / "calibration", s,
                       max_steps=s.calibration_steps, max_minutes=s.minutes, log_every=1, progress=progress,
                       objective_args=objective_args, init_from=init_from)
    skip = min(2, len(run.log) - 1)                  # the first steps include warm-up costs
    t_first, t_last = run.log[skip - 1]["elapsed_s"] if skip else 0.0, run.log[-1]["elapsed_s"]
    s_per_step = (t_last - t_first) / max(1, run.log[-1]["step"] - (run.log[skip - 1]["step"] if skip else 0))
    max_steps = max(1, int(s.fill * s.minutes * 60 / s_per_step))
    shutil.rmtree(work / "calibration", ignore_errors=True)
    return {"steps": run.steps, "seconds_per_step": round(s_per_step, 3), "wall_s": run.wall_s,
            "max_steps": max_steps}


# ---- 4: tau --------------------------------------------------------------------------------------------------

def offline_tau(target, target_dir: Path, draft_dir: Path, prompts: list, s: Settings, progress: bool = True):
    from trainer.evaluate import evaluate_offline
    return evaluate_offline(target_dir, draft_dir, prompts, BLOCK_SIZE, s.eval_new_tokens, ignore_eos=s.ignore_eos,
                            target=target, progress=progress)


def served_tau(target_dir: Path, draft_dir: Path, prompts: list, s: Settings, log_dir: Path, progress: bool = True):
    from trainer.evaluate import evaluate_served
    return evaluate_served(target_dir, draft_dir, prompts, BLOCK_SIZE, s.eval_new_tokens, ignore_eos=s.ignore_eos,
                           log_dir=log_dir, progress=progress)


def checkpoint_curve(run: FinetuneRun, target, target_dir: Path, prompts: list, s: Settings,
                     progress: bool = True) -> list[dict]:
    """Offline tau of every kept checkpoint of a finetune run (step, training seconds, tau)."""
    elapsed = {row["step"]: row["elapsed_s"] for row in run.log}
    points = []
    for ckpt in sorted((Path(run.output) / "checkpoints").glob("step-*")):
        if ckpt.name.endswith(".tmp"):
            continue
        step = int(ckpt.name.split("-")[1])
        report = offline_tau(target, target_dir, ckpt, prompts, s, progress=False)
        train_s = elapsed.get(step)
        if train_s is None:                           # not a logged step: interpolate from the neighbours
            logged = sorted(elapsed)
            lo = max((k for k in logged if k <= step), default=0)
            hi = min((k for k in logged if k >= step), default=logged[-1])
            t_lo, t_hi = elapsed.get(lo, 0.0), elapsed[hi]
            train_s = t_lo + (t_hi - t_lo) * ((step - lo) / (hi - lo) if hi > lo else 0.0)
        points.append({"step": step, "train_minutes": round(train_s / 60, 2), "tau_offline": report.tau})
        if progress:
            log(f"curve: step {step:5d}  {train_s / 60:5.2f} min  offline tau {report.tau:.3f}")
    return points


# ---- the pipeline --------------------------------------------------------------------------------------------

def run_pipeline(s: Settings, progress: bool = True) -> dict:
    from sglang_ext.demo.workload import build_workload
    from trainer.hf_target import HFTarget, load_chat_jsonl

    torch.set_num_threads(s.threads)
    t_start = time.monotonic()
    work = Path(s.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"settings": asdict(s), "block_size": BLOCK_SIZE}

    log("1. workload")
    workload = build_workload(Path(s.cache_dir) if s.cache_dir else None, minutes=s.workload_minutes,
                              seed=s.seed, quick=s.quick, progress=progress)
    target_dir = workload.target_dir
    if s.target_layers is None:
        n_target_layers = json.loads((target_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
        s.target_layers = default_target_layer_ids(n_target_layers, 3)
        result["settings"]["target_layers"] = s.target_layers
    result["workload"] = {"root": str(workload.root), "hash": workload.hash,
                          "target_heldout_loss": workload.stats.get("heldout_loss")}
    train_records = workload.prompts("A", "train")
    eval_records = workload.prompts("A", "eval")
    if len(train_records) < s.train_prompts or len(eval_records) < s.eval_prompts:
        log(f"note: the workload has {len(train_records)} train / {len(eval_records)} eval domain-A prompts; "
            f"using at most that many")
    train_file = write_prompt_subset(train_records[:s.train_prompts], work / "prompts" / "A-train.jsonl")
    eval_file = write_prompt_subset(eval_records[:s.eval_prompts], work / "prompts" / "A-eval.jsonl")
    train_sources = {r["source"].rsplit(":", 1)[0] for r in train_records}
    eval_sources = {r["source"].rsplit(":", 1)[0] for r in eval_records[:s.eval_prompts]}
    if train_sources & eval_sources:
        raise RuntimeError(f"eval prompts share source files with train prompts: {sorted(train_sources & eval_sources)}")
    eval_prompts = load_chat_jsonl(eval_file)
    result["prompts"] = {"train": len(load_chat_jsonl(train_file)), "eval": len(eval_prompts)}

    log(f"2. capture {result['prompts']['train']} domain-A train prompts (regenerate, <= {s.capture_new_tokens} "
        f"tokens) into bf16 + fp8 replays")
    replay_dirs = {dtype: work / f"replay-{dtype}" for dtype in REPLAY_DTYPES}
    capture = capture_traffic(target_dir, train_file, replay_dirs, s.target_layers, s.capture_new_tokens, progress)
    bytes_ratio = capture["bytes"]["fp8"]["shard_bytes"] / capture["bytes"]["bf16"]["shard_bytes"]
    capture["fp8_over_bf16_bytes"] = bytes_ratio
    result["capture"] = capture
    log(f"captured {capture['tokens']} tokens ({capture['generated_tokens']} generated, "
        f"{capture['answers_ending_with_eos']}/{capture['prompts']} answers ended with EOS) in {capture['wall_s']}s; "
        f"shards bf16 {capture['bytes']['bf16']['shard_bytes']} B, fp8 {capture['bytes']['fp8']['shard_bytes']} B "
        f"(x{bytes_ratio:.3f})")

    log("3. drafts")
    config_file = write_draft_config(target_dir, work / "draft_config.json", s.draft_layers, s.target_layers)
    drafts = {"random": export_random_draft(config_file, work / "draft-random", s.seed)}
    if s.max_steps is None:
        calibration = calibrate_steps(replay_dirs["bf16"], target_dir, config_file, work, s, progress)
        max_steps = calibration["max_steps"]
        log(f"calibration: {calibration['seconds_per_step']} s/step -> max_steps {max_steps} "
            f"({s.fill:.0%} of {s.minutes:g} min)")
    else:
        calibration, max_steps = None, s.max_steps
    result["calibration"] = calibration
    result["max_steps"] = max_steps
    runs: dict[str, FinetuneRun] = {}
    for dtype in REPLAY_DTYPES:
        checkpoint_every = max(1, max_steps // s.curve_points) if (dtype == "bf16" and s.curve_points) else 0
        runs[dtype] = run_finetune(dtype, replay_dirs[dtype], target_dir, config_file, work / f"draft-{dtype}", s,
                                   max_steps=max_steps, max_minutes=s.minutes, checkpoint_every=checkpoint_every,
                                   progress=progress)
        drafts[dtype] = Path(runs[dtype].output)
        r = runs[dtype]
        log(f"finetune {dtype}: {r.steps}/{r.total_steps} steps ({r.stopped}), loop {r.train_s}s, process "
            f"{r.wall_s}s wall / {r.cpu_s}s CPU, loss {r.first_loss:.3f} -> {r.final_loss:.3f}")
    result["finetune"] = {k: asdict(v) for k, v in runs.items()}

    log(f"4. tau on {len(eval_prompts)} held-out domain-A prompts (block size {BLOCK_SIZE}, "
        f"<= {s.eval_new_tokens} tokens, {'ignore EOS' if s.ignore_eos else 'stop at EOS'})")
    target = HFTarget(target_dir)
    taus: dict[str, dict] = {}
    for name, draft_dir in drafts.items():
        report = offline_tau(target, target_dir, draft_dir, eval_prompts, s, progress)
        taus[name] = {"offline": report.tau, "offline_pooled": report.tau_pooled, "offline_report": report.to_dict()}
        log(f"offline tau {name}: {report.tau:.3f}")
    if s.served:
        for name, draft_dir in drafts.items():
            report = served_tau(target_dir, draft_dir, eval_prompts, s, work / "server-logs", progress)
            offline_steps = [p["verify_steps"] for p in taus[name]["offline_report"]["prompts"]]
            taus[name].update(served=report.tau, served_pooled=report.tau_pooled, served_report=report.to_dict(),
                              served_equals_offline_prompts=sum(
                                  a.verify_steps == b for a, b in zip(report.prompts, offline_steps)))
            log(f"served tau {name}: {report.tau:.3f}")
    result["tau"] = taus
    curve_prompts = eval_prompts[:s.curve_prompts]
    result["curve"] = {"prompts": len(curve_prompts), "points": []}
    if s.curve_points:
        log(f"curve: offline tau of the bf16 run's checkpoints on {len(curve_prompts)} eval prompts")
        random_point = offline_tau(target, target_dir, drafts["random"], curve_prompts, s, progress=False)
        result["curve"]["points"] = [{"step": 0, "train_minutes": 0.0, "tau_offline": random_point.tau}] + \
            checkpoint_curve(runs["bf16"], target, target_dir, curve_prompts, s, progress)
    result["checks"] = acceptance(result)
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    return result


def acceptance(result: dict) -> dict:
    taus = result["tau"]
    key = "served" if "served" in taus["bf16"] else "offline"
    bf16, fp8 = taus["bf16"][key], taus["fp8"][key]
    fp8_loss = (bf16 - fp8) / bf16
    minutes = result["settings"]["minutes"]
    return {
        "tau_kind": key,
        "tau_bf16": bf16, "tau_goal": TAU_GOAL, "tau_reached": bf16 >= TAU_GOAL,
        "fp8_over_bf16_bytes": result["capture"]["fp8_over_bf16_bytes"], "fp8_bytes_goal": FP8_BYTES_GOAL,
        "fp8_bytes_ok": result["capture"]["fp8_over_bf16_bytes"] <= FP8_BYTES_GOAL,
        "fp8_tau_loss": fp8_loss, "fp8_tau_loss_goal": FP8_TAU_LOSS_GOAL, "fp8_tau_ok": fp8_loss <= FP8_TAU_LOSS_GOAL,
        "finetune_loop_minutes": {k: (v["train_s"] or 0) / 60 for k, v in result["finetune"].items()},
        "finetune_within_budget": all((v["train_s"] or 0) <= minutes * 60 + 1 for v in result["finetune"].values()),
    }


# ---- 5: report -----------------------------------------------------------------------------------------------

def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_report(result: dict) -> str:
    taus, runs, cap = result["tau"], result["finetune"], result["capture"]
    head = (f"{'draft':<8}{'replay':>7}{'shard bytes':>13}{'train min':>10}{'wall min':>9}{'steps':>7}"
            f"{'final loss':>11}{'tau served':>11}{'tau offline':>12}")
    lines = [head, "-" * len(head)]
    for name in ("random", *REPLAY_DTYPES):
        run = runs.get(name)
        replay = name if run else "-"
        nbytes = f"{cap['bytes'][name]['shard_bytes']:,}" if run else "-"
        lines.append(f"{name:<8}{replay:>7}{nbytes:>13}"
                     f"{_fmt(run['train_s'] / 60 if run else None, '.2f'):>10}"
                     f"{_fmt(run['wall_s'] / 60 if run else None, '.2f'):>9}"
                     f"{(str(run['steps']) if run else '0'):>7}{_fmt(run['final_loss'] if run else None):>11}"
                     f"{_fmt(taus[name].get('served')):>11}{_fmt(taus[name]['offline']):>12}")
    c = result["checks"]
    lines += ["",
              f"capture: {cap['prompts']} prompts, {cap['tokens']} tokens ({cap['generated_tokens']} generated by the "
              f"target, mean {cap['mean_generated_tokens']:.1f}/answer, {cap['answers_ending_with_eos']} ended with "
              f"EOS), {cap['wall_s']}s",
              f"finetune: max_steps {result['max_steps']}"
              + (f" (calibrated at {result['calibration']['seconds_per_step']} s/step)" if result["calibration"] else "")
              + "; " + ", ".join(f"{k}: {v['steps']} steps {v['stopped']}, {v['cpu_s'] / 60:.1f} CPU min"
                                 for k, v in runs.items()),
              "",
              f"[{'PASS' if c['tau_reached'] else 'FAIL'}] bf16-trained draft, {c['tau_kind']} tau "
              f"{c['tau_bf16']:.3f} >= {TAU_GOAL}",
              f"[{'PASS' if c['fp8_bytes_ok'] else 'FAIL'}] fp8 shard bytes / bf16 = {c['fp8_over_bf16_bytes']:.3f} "
              f"<= {FP8_BYTES_GOAL}",
              f"[{'PASS' if c['fp8_tau_ok'] else 'FAIL'}] fp8-trained draft loses {c['fp8_tau_loss']:+.1%} "
              f"{c['tau_kind']} tau (<= {FP8_TAU_LOSS_GOAL:.0%})",
              f"[{'PASS' if c['finetune_within_budget'] else 'FAIL'}] finetune loops within "
              f"{result['settings']['minutes']:g} min: "
              + ", ".join(f"{k} {v:.2f} min" for k, v in c["finetune_loop_minutes"].items())]
    if "served" in taus["random"]:
        n = result["prompts"]["eval"]
        lines.append("served == offline verify steps per prompt: "
                     + ", ".join(f"{k} {v['served_equals_offline_prompts']}/{n}" for k, v in taus.items()))
    points = result["curve"]["points"]
    if points:
        lines += ["", f"tau vs training time (bf16 run, offline tau on {result['curve']['prompts']} eval prompts)",
                  f"{'step':>6}{'minutes':>9}{'tau':>8}"]
        lines += [f"{p['step']:>6}{p['train_minutes']:>9.2f}{p['tau_offline']:>8.3f}" for p in points]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def maybe_plot(result: dict, path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no PNG (the curve is in the table and the JSON)"
    points = result["curve"]["points"]
    if not points:
        return "no curve points: no PNG"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["train_minutes"] for p in points], [p["tau_offline"] for p in points], marker="o")
    ax.axhline(TAU_GOAL, linestyle="--", color="grey")
    ax.set_xlabel("finetune minutes")
    ax.set_ylabel("offline tau (block size 4)")
    ax.set_title("DFlash draft on domain A: tau vs training time")
    fig.tight_layout()
    fig.savefig(path)
    return f"wrote {path}"


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help=f"finetune budget per draft (default {d.minutes:g}; "
                                                                "--quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: small workload, few prompts, ~1 min finetune")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="directory of the JSON (and PNG) results")
    p.add_argument("--work-dir", type=Path, default=None, help="replays, drafts, logs (default <out>/"
                                                               "offline_pipeline_work[_quick])")
    p.add_argument("--cache-dir", default=None, help="workload cache (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)")
    p.add_argument("--workload-minutes", type=float, default=None, help="workload target training budget "
                                                                        f"(default {d.workload_minutes:g})")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train-prompts", type=int, default=None, help=f"domain-A train prompts captured ({d.train_prompts})")
    p.add_argument("--capture-new-tokens", type=int, default=None,
                   help=f"max regenerated tokens per prompt ({d.capture_new_tokens})")
    p.add_argument("--eval-prompts", type=int, default=None, help=f"held-out prompts ({d.eval_prompts})")
    p.add_argument("--eval-new-tokens", type=int, default=None, help=f"max new tokens per eval request "
                                                                     f"({d.eval_new_tokens})")
    p.add_argument("--ignore-eos", action="store_true", help="eval requests run to max tokens past EOS")
    p.add_argument("--draft-layers", type=int, default=None, help=f"draft decoder layers ({d.draft_layers})")
    p.add_argument("--target-layers", type=int, nargs="+", default=None, help="target layers the draft reads "
                                                                              "(default: 3 evenly spaced in [1, L-3])")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({d.lr:g})")
    p.add_argument("--num-anchors", type=int, default=None, help=f"blocks sampled per sequence ({d.num_anchors})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per micro-batch ({d.batch_size})")
    p.add_argument("--max-tokens-per-batch", type=int, default=None, help=f"({d.max_tokens_per_batch})")
    p.add_argument("--max-steps", type=int, default=None, help="fixed optimiser steps (default: calibrated)")
    p.add_argument("--fill", type=float, default=None, help=f"fraction of the budget calibrated steps aim at "
                                                            f"({d.fill})")
    p.add_argument("--threads", type=int, default=None, help=f"torch CPU threads ({d.threads})")
    p.add_argument("--no-served", action="store_true", help="skip real SGLang (offline tau only)")
    p.add_argument("--curve-points", type=int, default=None, help=f"checkpoints on the tau curve ({d.curve_points}; "
                                                                  "0: none)")
    p.add_argument("--curve-prompts", type=int, default=None, help=f"eval prompts per curve point ({d.curve_prompts})")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args) -> Settings:
    overrides = {k: v for k, v in {
        "minutes": args.minutes, "workload_minutes": args.workload_minutes, "cache_dir": args.cache_dir,
        "seed": args.seed, "train_prompts": args.train_prompts, "capture_new_tokens": args.capture_new_tokens,
        "eval_prompts": args.eval_prompts, "eval_new_tokens": args.eval_new_tokens, "draft_layers": args.draft_layers,
        "target_layers": args.target_layers, "lr": args.lr, "num_anchors": args.num_anchors,
        "batch_size": args.batch_size, "max_tokens_per_batch": args.max_tokens_per_batch,
        "max_steps": args.max_steps, "fill": args.fill, "threads": args.threads,
        "curve_points": args.curve_points, "curve_prompts": args.curve_prompts}.items() if v is not None}
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    if args.no_served:
        overrides["served"] = False
    s = Settings.quick_settings(**overrides) if args.quick else Settings(**overrides)
    suffix = "_quick" if args.quick else ""
    s.work_dir = str(args.work_dir or args.out / f"offline_pipeline_work{suffix}")
    return s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    if s.minutes > 10:
        log(f"note: --minutes {s.minutes:g} exceeds the issue's 10-minute finetune cap")
    result = run_pipeline(s, progress=not args.no_progress)
    save_result(result, format_report(result), args.out, "offline_pipeline_quick" if s.quick else "offline_pipeline",
                maybe_plot)
    return 0


def save_result(result: dict, report: str, out: Path, name: str, plot) -> None:
    """Print the report; write <out>/<name>.json (with the report) and the plot `plot(result, png_path)`."""
    print("\n" + report)
    out.mkdir(parents=True, exist_ok=True)
    out_json = out / f"{name}.json"
    result["report"] = report
    out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out_json}")
    print(plot(result, out / f"{name}.png"))


if __name__ == "__main__":
    sys.exit(main())
