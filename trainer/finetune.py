"""Fine-tune (or train from scratch) a speculative draft on replay shards, then export it for SGLang.

    python -m trainer.finetune --replay DIR [DIR ...] --target-model-path TARGET \\
        (--draft-model-path DRAFT_DIR | --draft-config CONFIG.json) --output OUT_DIR

OUT_DIR receives config.json + model.safetensors (load with --speculative-draft-model-path OUT_DIR),
train_log.jsonl, training_summary.json and checkpoints/step-N/ (weights + optimizer state) for --resume.
The draft's kind (DFlash or EAGLE3) comes from its config.json `architectures` (trainer.draft_kind); each step
is `trainer.train_step.TrainStep`, the same step the online trainer runs. Runs on CPU (fp32) or CUDA (bf16
autocast, fp32 master weights). Everything is checked before the first step: target checkpoint, draft config,
replay layer ids / hidden size / target identity.

Data parallel (trainer.distributed):

    torchrun --nproc-per-node N -m trainer.finetune ... [--fsdp]

--batch-size / --max-tokens-per-batch describe the global micro-batch: every rank plans the same micro-batches
and trains on every N-th sequence of each, so N processes follow the same loss curve as one process (up to
float rounding) and a checkpoint resumes on any number of processes. Rank 0 alone logs, checkpoints and exports.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import random
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer import distributed
from trainer.distributed import Dist
from trainer.draft_kind import kind_for_draft
from trainer.replay import ReplayReader
from trainer.target import load_target_head, target_info
from trainer.train_step import DTYPES, Batch, Precision, TrainStep, pad_batch

log = logging.getLogger("trainer.finetune")
STATE_FILE = "trainer_state.pt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.finetune",
        description="Train a speculative draft (DFlash block diffusion or EAGLE3; the kind comes from the draft "
                    "config's architectures) on replay shards (target hidden states captured from live or offline traffic) "
                    "and export it in the format SGLang loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--replay", nargs="+", required=True, metavar="DIR",
                    help="replay directories (manifest.json + shards); all must use the draft's target layer ids")
    io.add_argument("--target-model-path", required=True, metavar="PATH",
                    help="local HF target checkpoint (e.g. Qwen3-VL); only its config, embed_tokens and lm_head "
                         "are read, frozen, and never saved with the draft")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--draft-model-path", metavar="PATH",
                     help="existing draft directory (config.json + *.safetensors) to fine-tune")
    src.add_argument("--draft-config", metavar="FILE",
                     help="draft config.json (SGLang's layout for the draft kind) to train from scratch")
    io.add_argument("--output", required=True, metavar="DIR",
                    help="where the exported draft, logs and checkpoints go")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (AdamW)")
    opt.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor, as a fraction of --lr")
    opt.add_argument("--warmup-ratio", type=float, default=0.04, help="linear warmup, as a fraction of all steps")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                     help="AdamW betas")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 disables clipping)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")

    obj = p.add_argument_group("objective")
    obj.add_argument("--block-size", type=int, default=None,
                     help="draft block size B (default: the draft config's block_size; exported with the draft)")
    obj.add_argument("--num-anchors", type=int, default=512, help="DFlash: max blocks (anchors) sampled per sequence")
    obj.add_argument("--gamma", type=float, default=7.0, help="DFlash: slot k loss weight is exp(-(k-1)/gamma)")
    obj.add_argument("--ttt-steps", type=int, default=7,
                     help="EAGLE3: training-time-test steps unrolled per position (step s weighted 0.8^s)")

    data = p.add_argument_group("data and length")
    data.add_argument("--batch-size", type=int, default=8,
                      help="max sequences per micro-batch; under torchrun the micro-batch of all processes "
                           "together (each trains on every N-th sequence), so N processes take the same steps as one")
    data.add_argument("--max-tokens-per-batch", type=int, default=16384,
                      help="token budget per micro-batch (all processes together), counted with padding "
                           "(sequences x longest)")
    data.add_argument("--max-seq-len", type=int, default=4096, help="longer records are truncated to this")
    length = data.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimiser steps to run (overrides --epochs)")
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the replay records")
    data.add_argument("--max-minutes", type=float, default=None,
                      help="stop (checkpoint + export) after this much wall time")

    run = p.add_argument_group("runtime")
    run.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and anchor sampling")
    run.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:N, or auto (cuda when available); under torchrun each rank uses "
                          "cuda:LOCAL_RANK (pass auto or cuda) or the CPU (gloo)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="compute dtype (autocast; master weights stay fp32). Default: bfloat16 on CUDA, "
                          "float32 on CPU")
    run.add_argument("--attention-backend", choices=("auto", "reference", "triton"), default="auto",
                     help="block attention implementation (spec_kernels.dflash_attention); auto = the Triton "
                          "kernel on CUDA, the PyTorch reference on CPU")
    run.add_argument("--ce-chunk-rows", type=int, default=2048,
                     help="rows of logits materialised at once in the loss (memory vs. speed)")
    run.add_argument("--checkpoint-every", type=int, default=0,
                     help="save a resumable checkpoint every N steps (0: only at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in OUTPUT/checkpoints (fresh start if none); "
                          "the number of torchrun processes may differ from the run that wrote it")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard the draft's weights, gradients and optimizer state over the "
                          "processes (FSDP2 fully_shard) instead of a full copy per process (DDP), for drafts "
                          "whose training state does not fit one device; ignored in a single process")
    run.add_argument("--export-dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of exported weights")
    run.add_argument("--log-every", type=int, default=10, help="steps between train_log.jsonl lines")
    run.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")

    chk = p.add_argument_group("replay checks")
    chk.add_argument("--strict-replay", action="store_true",
                     help="fail on a corrupt shard instead of warning and skipping it")
    chk.add_argument("--no-verify-checksums", action="store_true",
                     help="skip the sha256 check of each shard (faster start on large replays)")
    chk.add_argument("--no-check-finite", action="store_true",
                     help="skip the check that every shard's features are finite (NaN/Inf shards are otherwise "
                          "reported and skipped, or fail with --strict-replay); reads each feature once at start")
    chk.add_argument("--ignore-target-hash", action="store_true",
                     help="accept replays whose recorded target config hash differs from --target-model-path")
    return p


# ---- data ----------------------------------------------------------------------------------------------

def plan_batches(lengths: list[int], *, batch_size: int, max_tokens: int, generator: torch.Generator
                 ) -> list[list[int]]:
    """Shuffle, then pack greedily: a micro-batch holds <= batch_size sequences and
    count x longest <= max_tokens (padded tokens). lengths are already truncated."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if cur and (len(cur) + 1 > batch_size or (len(cur) + 1) * new_longest > max_tokens):
            batches.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


def collate(reader: ReplayReader, indices: list[int], max_seq_len: int, dtype: torch.dtype) -> Batch:
    """Read records from the replay and pad them into one Batch (trainer.train_step.pad_batch)."""
    return pad_batch([reader.read(i, dtype=dtype) for i in indices], max_seq_len, dtype)


def stand_in_batch(reader: ReplayReader, dtype: torch.dtype, length: int = 8) -> Batch:
    """A batch with nothing in the loss, for a rank whose share of a micro-batch is empty (fewer sequences than
    ranks): it still runs forward/backward, as DDP/FSDP need, and adds nothing to the gradient."""
    width = len(reader.spec.layer_ids) * reader.spec.hidden_size
    return Batch(torch.zeros(1, length, dtype=torch.long), torch.zeros(1, length, width, dtype=dtype),
                 torch.zeros(1, length, dtype=torch.bool), 0)


def anchor_generators(seed: int, step: int, batch_pos: int, records: list[int]) -> list[torch.Generator]:
    """One generator per sequence, seeded by (seed, step, micro-batch position in the epoch, record index): a
    sequence gets the same random anchors whichever rank trains it, so ranks together match one process."""
    key = lambda r: (((seed * 1_000_003 + step) * 1_000_003 + batch_pos) * 1_000_003 + r) % (1 << 63)  # noqa: E731
    return [torch.Generator().manual_seed(key(r)) for r in records]


def prefetch(iterator, depth: int = 2):
    """Run `iterator` in a background thread, `depth` items ahead (disk reads overlap compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# ---- schedule / checkpoints ---------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def latest_checkpoint(output: Path) -> Path | None:
    ckpts = sorted((output / "checkpoints").glob("step-*"))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file() and not c.name.endswith(".tmp")]
    return ckpts[-1] if ckpts else None


def export_draft(kind, cfg, draft, full_weights: dict, sharded: bool, out_dir: Path, dtype: torch.dtype) -> None:
    """Rank 0: write the draft for SGLang (config.json + model.safetensors). Under FSDP the draft holds shards,
    so an unsharded copy is made of the gathered weights (trainer.distributed.full_weights)."""
    if sharded:
        draft = kind.model_class(cfg)
        draft.load_state_dict(full_weights)
    draft.export(out_dir, dtype=dtype)


def save_checkpoint(output: Path, export, optimizer_state: dict, scheduler_state: dict, state: dict,
                    keep: int) -> Path:
    """Rank 0: OUTPUT/checkpoints/step-N/ = the fp32 draft (`export(dir)` writes it in the export layout) +
    trainer_state.pt: the optimizer state keyed by parameter name (trainer.distributed.full_optimizer_state),
    the scheduler and the global step / data position. Nothing in it depends on the number of processes."""
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:08d}"
    tmp = root / f"step-{state['step']:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export(tmp)
    torch.save({"optimizer": optimizer_state, "optimizer_format": "by_name", "scheduler": scheduler_state, **state},
               tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        if not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---- main ----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    output: str
    steps: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None          # mean over the last logged window
    final_accuracy: float | None
    final_accept_len: float | None
    tokens: int
    stopped: str                      # "completed" | "max_minutes"
    resumed_from: str | None


def setup(args) -> tuple:
    """Load and cross-check everything; raises ValueError/FileNotFoundError with a clear message."""
    target = Path(args.target_model_path)
    tinfo = target_info(target)                      # cheap checks first; the big tensors are read last
    draft_source = args.draft_model_path or args.draft_config
    kind = kind_for_draft(draft_source)
    cfg = kind.load_config(draft_source)
    if args.block_size:
        kind.set_block_size(cfg, args.block_size)
    kind.check_target(cfg, tinfo, f"{target}/config.json")
    reader = ReplayReader(args.replay, layer_layouts=kind.replay_layouts(cfg), hidden_size=tinfo.hidden_size,
                          target_config_hash=None if args.ignore_target_hash else tinfo.identity.config_hash,
                          strict=args.strict_replay, verify_checksums=not args.no_verify_checksums,
                          check_finite=not args.no_check_finite)
    embed, lm_head, _ = load_target_head(target)
    if cfg.vocab_size != embed.shape[0]:
        log.warning("draft vocab_size %d != target embedding rows %d; using the target's", cfg.vocab_size,
                    embed.shape[0])
        cfg.vocab_size = int(embed.shape[0])
    kind.check_head(cfg, embed.shape[0], str(target))
    return kind, cfg, embed, lm_head, tinfo, reader


def train(args) -> TrainResult:
    """Run finetune in this process: alone, or as one rank of a torchrun job (trainer.distributed)."""
    for name in ("lr", "batch_size", "max_tokens_per_batch", "max_seq_len", "num_anchors", "grad_accum"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be positive, got {args.max_steps}")
    d, device = distributed.init(args.device)
    result = _train(args, d, device)     # on an error no barrier: torchrun stops the other ranks
    distributed.shutdown(d)
    return result


def _train(args, d: Dist, device: torch.device) -> TrainResult:
    output = Path(args.output)
    precision = Precision.for_device(device, args.dtype, args.attention_backend)
    kind, cfg, embed, lm_head, tinfo, reader = setup(args)
    kind.set_block_size(cfg, cfg.block_size)          # validates a block size that came from the config
    if not distributed.all_equal((len(reader), reader.num_tokens), d):
        raise ValueError("the ranks read different replay records (a shard changed or failed its check on some "
                         "ranks only); every rank must see the same replay")
    if args.fsdp and not d.enabled:
        log.warning("--fsdp ignored: one process (start with torchrun --nproc-per-node N to shard)")
    sharded = args.fsdp and d.enabled

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    resume_dir = latest_checkpoint(output) if args.resume else None
    if args.resume and resume_dir is None:
        log.warning("--resume: no checkpoint under %s/checkpoints; starting fresh", output)
    if resume_dir is not None:
        draft = kind.from_pretrained(resume_dir, cfg)
    elif args.draft_model_path:
        draft = kind.from_pretrained(args.draft_model_path, cfg)
    else:
        draft = kind.from_scratch(cfg, seed=args.seed)
    draft.to(device)
    if resume_dir is None and not args.draft_model_path:
        kind.init_from_replay(draft, reader)
    model = distributed.wrap(draft, d, device, fsdp=sharded)    # the draft itself in a single process
    kind.attach_target(draft, embed.to(device, precision.dtype), lm_head.to(device, precision.dtype),
                       args.target_model_path)
    del embed, lm_head

    # The global micro-batches: the same plan on every rank and for any number of ranks.
    lengths = [min(r.length, args.max_seq_len) for r in reader.records]
    max_tokens = max(args.max_tokens_per_batch, 1)
    epoch_batches = lambda epoch: plan_batches(  # noqa: E731
        lengths, batch_size=args.batch_size, max_tokens=max_tokens,
        generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
    per_epoch = math.ceil(len(epoch_batches(0)) / args.grad_accum)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * per_epoch))
    warmup = max(1, math.ceil(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0

    step_fn = TrainStep(kind, draft, precision, lr=args.lr, betas=tuple(args.adam_betas),
                        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                        objective=kind.objective_settings(num_anchors=args.num_anchors, gamma=args.gamma,
                                                          chunk_rows=args.ce_chunk_rows, ttt_steps=args.ttt_steps),
                        model=model, world_size=d.world_size)
    optimizer = step_fn.optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, args.min_lr_ratio))

    step, epoch, batch_pos, tokens_seen, first_loss = 0, 0, 0, 0, None
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
        if state["draft_config"] != cfg.to_dict():
            raise ValueError(f"{resume_dir}: checkpoint was made with a different draft config")
        if state.get("optimizer_format") == "by_name":
            distributed.load_optimizer_state(model, optimizer, state["optimizer"])
        elif sharded:
            raise ValueError(f"{resume_dir}: an older checkpoint (optimizer state by position) cannot resume "
                             f"with --fsdp; resume it once without --fsdp")
        else:
            optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_pos = state["step"], state["epoch"], state["batch_pos"]
        tokens_seen, first_loss = state["tokens_seen"], state.get("first_loss")
        total_steps = state["total_steps"] if args.max_steps is None else total_steps
        sched.load_state_dict(state["scheduler"])
        log.info("resumed from %s at step %d (%s process(es) now, %s then)", resume_dir, step, d.world_size,
                 state.get("world_size", 1))

    def save(state: dict) -> dict | None:
        """Checkpoint: gathered on every rank (collective under FSDP), written by rank 0. Returns the gathered
        weights (FSDP, rank 0) for the export."""
        weights = distributed.full_weights(model) if sharded else None
        optim_state = distributed.full_optimizer_state(model, optimizer)
        if d.is_main:
            save_checkpoint(output, lambda out: export_draft(kind, cfg, draft, weights, sharded, out, torch.float32),
                            optim_state, sched.state_dict(), state, args.keep_checkpoints)
        return weights

    if d.is_main:
        output.mkdir(parents=True, exist_ok=True)
    log_file = open(output / "train_log.jsonl", "a") if d.is_main else None
    start = time.monotonic()
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    window = {"loss": 0.0, "n": 0, "correct": 0, "count": 0, "accept": 0.0, "blocks": 0, "tokens": 0, "t": start}
    last = {"loss": None, "acc": None, "accept": None}
    stopped = "completed"

    def micro_batches(ep: int, pos: int):
        """(epoch, batches consumed in that epoch, this rank's Batch, its record indices), forever, starting
        after `pos` batches of `ep`. A rank reads only the records of its share of each global micro-batch."""
        while True:
            batches = epoch_batches(ep)
            for i in range(pos, len(batches)):
                share = distributed.rank_share(batches[i], d)
                batch = (collate(reader, share, args.max_seq_len, precision.dtype) if share
                         else stand_in_batch(reader, precision.dtype))
                yield ep, i + 1, batch, share
            ep, pos = ep + 1, 0

    def out_of_time(now: float) -> bool:
        """Past --max-minutes; agreed by all ranks (rank 0's clock), so they stop at the same step."""
        if deadline is None:
            return False
        flag = torch.tensor([float(now >= deadline)], device=device)
        if d.enabled:
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    bar = None
    if not args.no_progress and d.is_main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=kind.name, dynamic_ncols=True, file=sys.stderr)
    stream = prefetch(micro_batches(epoch, batch_pos))
    try:
        while step < total_steps:
            batches, generators = [], []
            for _ in range(args.grad_accum):
                epoch, batch_pos, batch, records = next(stream)
                batches.append(batch)
                generators.append(anchor_generators(args.seed, step, batch_pos, records) or None)
            stats = step_fn.run(batches, generators=generators)
            if not stats.applied:              # offline, a non-finite loss or gradient stops the run (all ranks)
                raise FloatingPointError(f"{stats.skipped} at step {step} (epoch {epoch}, batch {batch_pos})")
            sched.step()
            step += 1
            first_loss = stats.micro_losses[0] if first_loss is None else first_loss
            window["loss"] += sum(stats.micro_losses)
            window["n"] += len(stats.micro_losses)
            window["correct"] += stats.correct
            window["count"] += stats.labelled
            window["accept"] += stats.accept_sum
            window["blocks"] += stats.full_blocks
            window["tokens"] += stats.tokens
            tokens_seen += stats.tokens

            now = time.monotonic()
            timed_out = out_of_time(now)
            if step % args.log_every == 0 or step == total_steps or timed_out:
                row = {
                    "step": step, "epoch": epoch, "loss": window["loss"] / max(1, window["n"]),
                    "accuracy": window["correct"] / window["count"] if window["count"] else None,
                    "accept_len": window["accept"] / window["blocks"] if window["blocks"] else None,
                    "lr": stats.lr, "grad_norm": stats.grad_norm,
                    "tokens_per_s": window["tokens"] / max(1e-9, now - window["t"]), "tokens_seen": tokens_seen,
                    "elapsed_s": now - start,
                }
                if log_file is not None:                          # rank 0
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                last = {"loss": row["loss"], "acc": row["accuracy"], "accept": row["accept_len"]}
                window = {"loss": 0.0, "n": 0, "correct": 0, "count": 0, "accept": 0.0, "blocks": 0, "tokens": 0,
                          "t": now}
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}",
                                    acc=f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "-",
                                    tau=f"{row['accept_len']:.2f}" if row["accept_len"] is not None else "-",
                                    tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{row['lr']:.2e}")
            if bar is not None:
                bar.update(1)
            state = {"step": step, "epoch": epoch, "batch_pos": batch_pos, "tokens_seen": tokens_seen,
                     "total_steps": total_steps, "first_loss": first_loss, "draft_config": cfg.to_dict(),
                     "world_size": d.world_size, "args": {k: v for k, v in vars(args).items()}}
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < total_steps:
                save(state)
            if timed_out and step < total_steps:
                stopped = "max_minutes"
                break
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()

    state = {"step": step, "epoch": epoch, "batch_pos": batch_pos, "tokens_seen": tokens_seen,
             "total_steps": total_steps, "first_loss": first_loss, "draft_config": cfg.to_dict(),
             "world_size": d.world_size, "args": {k: v for k, v in vars(args).items()}}
    weights = save(state)
    result = TrainResult(output=str(output), steps=step, total_steps=total_steps, first_loss=first_loss,
                         final_loss=last["loss"], final_accuracy=last["acc"], final_accept_len=last["accept"],
                         tokens=tokens_seen, stopped=stopped, resumed_from=str(resume_dir) if resume_dir else None)
    if d.is_main:
        export_draft(kind, cfg, draft, weights, sharded, output, DTYPES[args.export_dtype])
        (output / "training_summary.json").write_text(json.dumps(
            {**asdict(result), "draft_kind": kind.name, "target": tinfo.identity.to_dict(),
             "replay": [str(r) for r in args.replay], "replay_records": len(reader),
             "skipped_shards": [str(s.path) for s in reader.skipped], "world_size": d.world_size,
             "fsdp": sharded}, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    args = build_parser().parse_args(argv)
    rank = distributed.from_env().rank                 # ranks other than 0 only report problems
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(levelname)s %(name)s{f' [rank {rank}]' if rank else ''}: %(message)s")
    try:
        result = train(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    log.info("done: %s", json.dumps(asdict(result)))
    return result


if __name__ == "__main__":
    main()
