"""Training the reference workload's tiny Qwen3-VL target on CPU: batches, the bigram and vision warm starts,
the time-budgeted chat training loop and the held-out loss (see the package docstring for the recipe)."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sglang_ext.demo.prompts import COLOURS, IMAGE_PLACEHOLDER, chat_prompt
from sglang_ext.demo.tiny_models import VOCAB_SIZE, special_id
from sglang_ext.demo.workload.images import EVAL_IMAGE_SEED_OFFSET, SHAPES, ImageSpec, render_image
from sglang_ext.demo.workload.sources import DOMAINS, ChatSample, SampleMaker

if TYPE_CHECKING:
    from sglang_ext.demo.workload.build import WorkloadConfig


@dataclass
class Batch:
    input_ids: torch.Tensor            # [B, T] right-padded with <|endoftext|>
    labels: torch.Tensor               # [B, T] next-token targets at the same positions; -100 = no loss
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None     # 1 at image tokens (HF needs it for M-RoPE)

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != -100).sum())


class Batcher:
    def __init__(self, maker: SampleMaker, processor):
        self.maker = maker
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.pad_id = special_id("<|endoftext|>")
        self.image_pad_id = special_id("<|image_pad|>")
        self.no_loss_ids = torch.tensor([self.image_pad_id, special_id("<|vision_start|>"),
                                         special_id("<|vision_end|>"), self.pad_id])

    def encode(self, sample: ChatSample, n_image_tokens: int = 0) -> list[int]:
        user = IMAGE_PLACEHOLDER + sample.user if sample.image_seed is not None else sample.user
        text = chat_prompt(user) + sample.answer + ("<|im_end|>\n" if sample.complete else "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if n_image_tokens:
            i = ids.index(self.image_pad_id)
            ids = ids[:i] + [self.image_pad_id] * n_image_tokens + ids[i + 1:]
        return ids[:self.maker.max_tokens]

    def collate(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, :len(seq)] = torch.tensor(seq)
        labels = input_ids.roll(-1, dims=1)                    # position t predicts token t+1
        labels[:, -1] = -100
        labels[torch.isin(labels, self.no_loss_ids)] = -100     # no loss on padding / image placeholders
        return input_ids, labels

    def make(self, domain: str, split: str, batch_size: int, rng: random.Random) -> Batch:
        samples = [self.maker.sample(domain, split, rng) for _ in range(batch_size)]
        return self.from_samples(samples)

    def from_samples(self, samples: list[ChatSample]) -> Batch:
        if samples[0].image_seed is None:
            return Batch(*self.collate([self.encode(s) for s in samples]))
        images = [render_image(s.image_seed)[0] for s in samples]
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        n_tokens = (vision["image_grid_thw"].prod(-1) // merge).tolist()
        input_ids, labels = self.collate([self.encode(s, n) for s, n in zip(samples, n_tokens)])
        return Batch(input_ids, labels, vision["pixel_values"], vision["image_grid_thw"],
                     (input_ids == self.image_pad_id).int())


def batch_loss(model, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                   image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------
# Training


def bigram_counts(batcher: Batcher, config: WorkloadConfig, n_samples: int) -> torch.Tensor:
    """[V, V] counts of (token, next token) over training samples drawn with the domain weights."""
    rng = random.Random(f"{config.seed}:bigrams")
    domains, weights = zip(*config.domain_weights)
    counts = torch.zeros(VOCAB_SIZE * VOCAB_SIZE)
    for _ in range(n_samples):
        sample = batcher.maker.sample(rng.choices(domains, weights)[0], "train", rng)
        ids = torch.tensor(batcher.encode(sample))
        prev, nxt = ids[:-1], ids[1:]
        keep = ~torch.isin(nxt, batcher.no_loss_ids) & ~torch.isin(prev, batcher.no_loss_ids)
        counts += torch.bincount(prev[keep] * VOCAB_SIZE + nxt[keep], minlength=VOCAB_SIZE * VOCAB_SIZE)
    return counts.view(VOCAB_SIZE, VOCAB_SIZE)


def init_from_bigrams(model, counts: torch.Tensor, steps: int = 300, seed: int = 0) -> dict:
    """Start the embedding and lm_head as a bigram model: logits(next | token) = rmsnorm(E[token]) @ W.T.

    E (unit-RMS rows) and W are fitted to the bigram counts by full-batch Adam (a [V, H] x [H, V]
    product, seconds on CPU) and copied into embed_tokens / lm_head. With unit-RMS embeddings the
    residual stream at init is mostly the embedding (the random layers add ~0.1 RMS each), so the
    untrained network already predicts like the bigram model, and training starts from there instead of
    spending its first minutes rediscovering token statistics."""
    lm = model.model.language_model
    vocab, hidden = lm.embed_tokens.weight.shape
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, hidden, generator=gen).requires_grad_()
    head = (torch.randn(vocab, hidden, generator=gen) * 0.02).requires_grad_()
    weights = counts / counts.sum()
    seen = counts.sum(1) > 0
    optimizer = torch.optim.Adam([embed, head], lr=0.03)
    for _ in range(steps):
        normed = embed / embed.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        logp = (normed[seen] @ head.T).log_softmax(-1)
        loss = -(weights[seen] * logp).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        normed = embed / embed.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        lm.embed_tokens.weight.copy_(normed)
        model.lm_head.weight.copy_(head)
        lm.norm.weight.fill_(1.0)
        probs = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
        entropy = -(weights * probs.clamp_min(1e-12).log()).sum().item()
    return {"bigram_fit_loss": round(loss.item(), 4), "bigram_entropy": round(entropy, 4)}



class VisionProbe(torch.nn.Module):
    """Linear heads on the mean image feature: colour, kind (3 shapes or digit), count, digit."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colours, self.kinds = sorted(COLOURS), list(SHAPES) + ["digit"]
        self.colour = torch.nn.Linear(hidden, len(self.colours))
        self.kind = torch.nn.Linear(hidden, len(self.kinds))
        self.count = torch.nn.Linear(hidden, 3)
        self.digit = torch.nn.Linear(hidden, 11)          # 10 = no digit

    def targets(self, specs: list[ImageSpec]) -> dict[str, torch.Tensor]:
        return {"colour": torch.tensor([self.colours.index(s.colour) for s in specs]),
                "kind": torch.tensor([self.kinds.index(s.shape or "digit") for s in specs]),
                "count": torch.tensor([s.count - 1 for s in specs]),
                "digit": torch.tensor([10 if s.digit is None else s.digit for s in specs])}

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(pooled) for name in ("colour", "kind", "count", "digit")}


def pretrain_vision(model, image_processor, config: WorkloadConfig, seconds: float, batch_size: int = 64) -> dict:
    """Warm up the vision tower with a supervised probe before the chat training.

    Trained only through the chat loss, the randomly initialised vision tower stayed uninformative for
    the whole budget (the answers followed the caption prior; with oracle colour features in place of the
    tower's output the decoder learnt the colours in ~40 steps). So first, for `seconds`, the tower is
    trained to make its mean image feature linearly predict what the renderer drew (colour, kind, count,
    digit); the probe heads are thrown away afterwards. Returns the probe's accuracies on its last batch."""
    visual = model.model.visual
    probe = VisionProbe(visual.merger.linear_fc2.out_features)
    params = list(visual.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"{config.seed}:vision")
    start, step, accuracy = time.monotonic(), 0, {}
    while time.monotonic() - start < seconds:
        seeds = [rng.randrange(EVAL_IMAGE_SEED_OFFSET) for _ in range(batch_size)]
        images, specs = zip(*(render_image(seed) for seed in seeds))
        vision = image_processor(images=list(images), return_tensors="pt")
        features = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"]).pooler_output
        tokens_per_image = features[0].shape[0]
        logits = probe(torch.cat(features))                # every image token must know the whole picture
        targets = {k: t.repeat_interleave(tokens_per_image) for k, t in probe.targets(list(specs)).items()}
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        accuracy = {k: round((logits[k].argmax(-1) == targets[k]).float().mean().item(), 3) for k in logits}
    return {"vision_pretrain_steps": step, "vision_probe_accuracy": accuracy}


@torch.no_grad()
def unit_rms_vision_outputs(model, image_processor, n_images: int = 16) -> dict:
    """Rescale the vision mergers so the image features the decoder sees have RMS 1, like the (unit-RMS,
    bigram-initialised) token embeddings they sit between."""
    visual = model.model.visual
    images = [render_image(seed)[0] for seed in range(n_images)]
    vision = image_processor(images=images, return_tensors="pt")
    out = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
    rms = torch.cat(list(out.pooler_output)).pow(2).mean().sqrt()
    visual.merger.linear_fc2.weight.div_(rms)
    visual.merger.linear_fc2.bias.div_(rms)
    for merger, features in zip(visual.deepstack_merger_list, out.deepstack_features):
        ds_rms = torch.cat(list(features)).pow(2).mean().sqrt()
        merger.linear_fc2.weight.div_(ds_rms)
        merger.linear_fc2.bias.div_(ds_rms)
    return {"vision_feature_rms_before": round(rms.item(), 4)}


def lr_at(config: WorkloadConfig, step: int, time_fraction: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine over the elapsed fraction of the time budget."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, time_fraction)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def _optimizer(model, config: WorkloadConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def train_target(model, batcher: Batcher, config: WorkloadConfig, progress: bool = True) -> dict:
    """Train in place until the wall-clock budget is spent; returns the training stats."""
    from tqdm.auto import tqdm

    rng = random.Random(f"{config.seed}:train")
    domains, weights = zip(*config.domain_weights)
    optimizer = _optimizer(model, config)
    budget_s = config.minutes * 60.0
    history = []                       # (step, domain, loss, lr)
    tokens = {d: 0 for d in domains}
    start = time.monotonic()           # the warm starts count toward the budget
    init_stats = {}
    if config.bigram_init:
        counts = bigram_counts(batcher, config, n_samples=300 if config.quick else 2000)
        init_stats.update(init_from_bigrams(model, counts, seed=config.seed))
        init_stats["bigram_seconds"] = round(time.monotonic() - start, 1)
    if config.vision_pretrain_fraction > 0 and "image" in domains:
        init_stats.update(pretrain_vision(model, batcher.image_processor, config,
                                          seconds=config.vision_pretrain_fraction * budget_s))
        init_stats.update(unit_rms_vision_outputs(model, batcher.image_processor))
    model.train()
    loop_start = time.monotonic()
    loop_s = max(1e-3, budget_s - (loop_start - start))
    bar = tqdm(total=round(budget_s), unit="s", desc="train target", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
    step = 0
    while True:
        elapsed = time.monotonic() - loop_start
        if elapsed >= loop_s:
            break
        domain = rng.choices(domains, weights)[0]
        batch_size = config.image_batch_size if domain == "image" else config.text_batch_size
        batch = batcher.make(domain, "train", batch_size, rng)
        lr = lr_at(config, step, elapsed / loop_s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = batch_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step} ({domain})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((step, domain, loss.item(), lr))
        tokens[domain] += batch.n_target_tokens
        step += 1
        bar.n = min(round(time.monotonic() - start), bar.total)   # the bar counts the whole budget
        bar.set_postfix_str(f"step {step} {domain} loss {loss.item():.3f} lr {lr:.1e}")
    bar.close()
    train_s, loop_s = time.monotonic() - start, time.monotonic() - loop_start
    model.eval()

    def mean_loss(domain, part):
        losses = [l for _, d, l, _ in history if d == domain]
        if not losses:
            return None
        k = max(1, len(losses) // 10)
        chosen = losses[:k] if part == "start" else losses[-k:]
        return sum(chosen) / len(chosen)

    return {
        **init_stats, "steps": step, "train_seconds": round(train_s, 1),
        "tokens": sum(tokens.values()), "tokens_per_domain": tokens,
        "loop_seconds": round(loop_s, 1), "tokens_per_second": round(sum(tokens.values()) / max(loop_s, 1e-9), 1),
        "steps_per_domain": {d: sum(1 for _, dd, _, _ in history if dd == d) for d in domains},
        "loss_first_step": history[0][2] if history else None,
        "loss_start": {d: mean_loss(d, "start") for d in domains},    # mean of each domain's first 10% steps
        "loss_end": {d: mean_loss(d, "end") for d in domains},        # mean of each domain's last 10% steps
        "loss_history": [[s, d, round(l, 4)] for s, d, l, _ in history],
    }


@torch.no_grad()
def heldout_loss(model, batcher: Batcher, config: WorkloadConfig, n_batches: int = 2) -> dict:
    """Mean next-token loss on fresh samples from the eval split of each domain."""
    rng = random.Random(f"{config.seed}:heldout")
    model.eval()
    result = {}
    for domain in DOMAINS:
        losses = []
        for _ in range(n_batches):
            size = config.image_batch_size if domain == "image" else config.text_batch_size
            losses.append(batch_loss(model, batcher.make(domain, "eval", size, rng)).item())
        result[domain] = round(sum(losses) / len(losses), 4)
    return result
