"""One training step, shared by `trainer.finetune` (offline) and the online trainer process.

    batch = pad_batch(records, max_seq_len)                      # the one collate / padding routine
    step = TrainStep(kind, draft, device=..., lr=6e-4, ...)      # owns the optimizer and the precision
    stats = step.run([batch, ...], lr=...)                       # micro-batches -> one optimizer step

A step is: for each micro-batch, loss (through the draft kind's objective) -> backward; then gradient
clipping -> optimizer step, and a `StepStats`. A non-finite loss or gradient norm is not applied: the
gradients are dropped and `stats.applied` is False with the reason, and the caller decides (the online
trainer skips and counts, finetune stops).

Data parallel (trainer.finetune under torchrun): give `model` (the draft wrapped by trainer.distributed.wrap)
and `world_size`. Each rank then runs its share of every micro-batch and backpropagates its loss numerators over
the denominators summed over all ranks (`ObjectiveOutput.loss_terms`), times world_size; the wrapper averages
gradients over ranks, so the step is the one-process step on the whole micro-batch. Losses and counts in
`StepStats` are then those of the whole micro-batch (all ranks), the same on every rank.

Precision (`Precision.for_device`): on CUDA, bf16 autocast with fp32 master weights, so the block-attention
kernel runs its bf16 tiles (backend "auto" picks the Triton kernel for CUDA tensors); on CPU, plain fp32 with
the PyTorch reference attention. The frozen target head is kept in the compute dtype.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- batches ----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor       # [b, S] long
    target_hidden: torch.Tensor   # [b, S, K*H]  the draft's target features
    loss_mask: torch.Tensor       # [b, S] bool, False on padding
    num_tokens: int               # real (unpadded) tokens

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.input_ids.to(device, non_blocking=nb), self.target_hidden.to(device, non_blocking=nb),
                     self.loss_mask.to(device, non_blocking=nb), self.num_tokens)


def pad_batch(records: list, max_seq_len: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Records (anything with input_ids [S], features [S, K*H], loss_mask [S]: a trainer.replay.ReplayRecord)
    cut to max_seq_len and right-padded into one Batch; padding is out of the loss."""
    lens = [min(len(r), max_seq_len) for r in records]
    S, KH = max(lens), records[0].features.shape[1]
    ids = torch.zeros(len(records), S, dtype=torch.long)
    feats = torch.zeros(len(records), S, KH, dtype=dtype)
    mask = torch.zeros(len(records), S, dtype=torch.bool)
    for j, (r, n) in enumerate(zip(records, lens)):
        ids[j, :n], feats[j, :n], mask[j, :n] = r.input_ids[:n], r.features[:n], r.loss_mask[:n]
    return Batch(ids, feats, mask, sum(lens))


# ---- precision --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype              # compute dtype (autocast) and dtype of the frozen target head
    attention_backend: str          # "auto" | "reference" | "triton"

    @classmethod
    def for_device(cls, device: str | torch.device, dtype: torch.dtype | str | None = None,
                   attention_backend: str = "auto") -> "Precision":
        """Default: bf16 autocast on CUDA (the Triton kernel's fast tiles), fp32 on CPU."""
        device = torch.device(device)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} not in {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if attention_backend not in ("auto", "reference", "triton"):
            raise ValueError(f"unknown attention backend {attention_backend!r}; expected auto, reference or triton")
        return cls(device, dtype, attention_backend)

    @property
    def kernel(self) -> str:
        """The block-attention implementation this precision ends up using."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.device.type == "cuda" else "reference"

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_device(arg: str) -> torch.device:
    """'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'; ValueError for a CUDA device that is not there."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError as e:
        raise ValueError(f"device {arg!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {arg}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {arg}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


# ---- the step ---------------------------------------------------------------------------------------------

@dataclass
class StepStats:
    applied: bool                 # False: the optimizer step was skipped (see `skipped`)
    skipped: str | None           # why, e.g. "loss is nan" / "gradient norm is inf"
    loss: float                   # mean over the micro-batches
    grad_norm: float
    lr: float
    tokens: int                   # real tokens in the micro-batches (all ranks)
    correct: int = 0              # labelled draft positions predicted right / labelled in all
    labelled: int = 0
    accept_sum: float = 0.0       # acceptance proxy: sum of (1 + leading correct) over full proposals
    full_blocks: int = 0
    micro_losses: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def accept_len(self) -> float | None:
        return self.accept_sum / self.full_blocks if self.full_blocks else None


class TrainStep:
    """Optimizer + precision + the kind's objective around one draft. `run` is the only training entry point
    finetune and the online trainer use."""

    def __init__(self, kind, draft: torch.nn.Module, precision: Precision, *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, grad_clip: float = 1.0,
                 objective: dict | None = None, model: torch.nn.Module | None = None, world_size: int = 1):
        self.kind = kind
        self.draft = draft
        self.model = draft if model is None else model   # what runs forward: the draft or its DDP/FSDP wrapper
        self.world_size = world_size
        self.precision = precision
        self.lr = lr
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.objective = dict(objective or {})           # the kind's objective knobs (num_anchors, gamma, ...)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.new_optimizer()

    def new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay,
                                 fused=self.precision.device.type == "cuda")

    def reset_optimizer(self) -> None:
        self.optimizer = self.new_optimizer()

    def loss(self, model, batch: Batch, generator: torch.Generator | None = None, **overrides):
        """The kind's objective on one batch, in this step's precision (no backward)."""
        with self.precision.autocast():
            return self.kind.loss(model, batch.to(self.precision.device), generator=generator,
                                  backend=self.precision.attention_backend, **{**self.objective, **overrides})

    def run(self, batches: list[Batch], *, lr: float | None = None,
            generators: list[torch.Generator | None] | None = None) -> StepStats:
        """Micro-batches -> gradients (mean over them) -> clip -> optimizer step, unless non-finite."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        lr_now = self.optimizer.param_groups[0]["lr"]
        generators = generators or [None] * len(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = StepStats(applied=False, skipped=None, loss=float("nan"), grad_norm=float("nan"), lr=lr_now,
                          tokens=sum(b.num_tokens for b in batches))
        for i, (batch, gen) in enumerate(zip(batches, generators)):
            with self._no_sync() if i < len(batches) - 1 else nullcontext():
                out = self.loss(self.model, batch, gen)
                objective, loss_val = self._objective(out)
                stats.micro_losses.append(loss_val)
                if not math.isfinite(loss_val):
                    return self._skip(stats, f"loss is {loss_val}")
                (objective / len(batches)).backward()
            stats.correct += int(out.slot_correct.sum())
            stats.labelled += int(out.slot_count.sum())
            stats.accept_sum += float(out.accept_sum)
            stats.full_blocks += int(out.full_blocks)
        stats.loss = sum(stats.micro_losses) / len(stats.micro_losses)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):                # FSDP: a DTensor (already the norm over all shards)
            grad_norm = grad_norm.full_tensor()
        stats.grad_norm = float(grad_norm)
        if not math.isfinite(stats.grad_norm):
            return self._skip(stats, f"gradient norm is {stats.grad_norm}")
        self.optimizer.step()
        stats.applied = True
        if self.world_size > 1:
            self._sum_counts_over_ranks(stats)
        return stats

    def _objective(self, out) -> tuple[torch.Tensor, float]:
        """(what this rank backpropagates, the micro-batch loss). One process: the kind's loss. Data parallel:
        sum(numerator / global denominator) * world_size, so the ranks' averaged gradient is the gradient of the
        loss on the whole micro-batch, which is returned (the same on every rank, non-finite on every rank)."""
        if self.world_size == 1:
            return out.loss, float(out.loss.detach())
        terms = out.loss_terms or ((out.loss * out.weight_sum, out.weight_sum),)
        k = len(terms)
        sums = torch.tensor([float(den) for _, den in terms] + [float(num.detach()) for num, _ in terms],
                            dtype=torch.float64, device=self.precision.device)
        dist.all_reduce(sums)                                       # [denominators..., numerators...] of all ranks
        dens, nums = sums[:k].tolist(), sums[k:].tolist()
        loss_val = sum(n / d for n, d in zip(nums, dens) if d > 0)
        objective = out.loss * 0.0                                  # keeps every parameter in the graph (DDP)
        for (num, _), den in zip(terms, dens):
            if den > 0:
                objective = objective + num * (self.world_size / den)
        return objective, loss_val

    def _no_sync(self):
        """DDP: no gradient all-reduce in this micro-batch's backward (all but a step's last micro-batch)."""
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else nullcontext()

    def _sum_counts_over_ranks(self, stats: StepStats) -> None:
        counts = torch.tensor([stats.tokens, stats.correct, stats.labelled, stats.accept_sum, stats.full_blocks],
                              dtype=torch.float64, device=self.precision.device)
        dist.all_reduce(counts)
        tokens, correct, labelled, accept_sum, full_blocks = counts.tolist()
        stats.tokens, stats.correct, stats.labelled = int(tokens), int(correct), int(labelled)
        stats.accept_sum, stats.full_blocks = accept_sum, int(full_blocks)

    def _skip(self, stats: StepStats, why: str) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        stats.skipped = why
        if stats.micro_losses:
            stats.loss = stats.micro_losses[-1]
        return stats

    @torch.no_grad()
    def acceptance(self, model, batches: list[Batch], seed: int = 1234, **overrides) -> float:
        """Acceptance proxy (mean 1 + leading correct positions over full proposals) of `model` on batches,
        with fixed generators so two models are scored on the same proposals (the online swap guard)."""
        model.eval()
        accept, blocks = 0.0, 0
        for i, batch in enumerate(batches):
            out = self.loss(model, batch, torch.Generator().manual_seed(seed + i), **overrides)
            accept += float(out.accept_sum)
            blocks += int(out.full_blocks)
        return accept / blocks if blocks else float("nan")
