r"""The reference workload: a tiny Qwen3-VL target trained on CPU in minutes, plus prompt sets per domain.

    build_workload(cache_dir=None, *, minutes=8.0, seed=0, quick=False, force=False, threads=1) -> Workload

Three domains of chat traffic, all in the tiny models' chat format (tiny_models.CHAT_TEMPLATE):

    A      Python code from the standard library (functions and classes, normalised by ast.unparse:
           no comments or docstrings, one formatting style, so fewer bits per token to learn).
           user "Continue the code:\n<first 2-6 lines of a definition>"
           assistant "```python\n<the following lines>\n```" (the closing fence and <|im_end|> only where
           the definition ends within the length limit). The fence gives every code answer the same first
           token, which the short training ties to the instruction (without it, code answers began with
           the most common first word of the other domains, "The").
    B      English prose from pydoc_data/topics.py (the language reference `help()` shows), headings,
           grammar and code blocks dropped. user "<a sentence>"  assistant: the rest of the paragraph and
           the following ones.
    image  Synthetic 128x128 pictures (16 image tokens): one to three shapes (circle / square / triangle)
           of one colour, or a large seven-segment digit. user <image> "Describe the image."
           assistant "Two red circles." / "A blue square." / "The digit 7, in green."
           Colour, count, shape and digit are only in the pixels, so image tokens change the answer.

Splits are by source: stdlib files (A, by hash), pydoc topics (B, whole topics in hash order until 15%
of the prose) and image seeds (eval seeds >= 1e9) - held-out prompts come from files / topics / images
the target never saw. Training samples are drawn afresh each step from the train sources.

Target. `Qwen3VLForConditionalGeneration` with tiny_models' dense config (6 layers, hidden 256, the small
vision tower) and byte-level BPE tokenizer, trained from scratch within a wall-clock budget (`minutes`,
which includes the two warm starts below):

  1. bigram warm start (~8 s): token-pair counts of ~2000 training samples are fitted by a factorised
     bigram model, rmsnorm(E[token]) @ W.T, copied into embed_tokens (unit-RMS rows) / lm_head. The untrained
     network then already predicts like a bigram model (loss ~3.0 instead of ln 544 = 6.3). In a 2-minute
     code-only run this gave held-out loss 2.90 against 3.48 from plain random init.
  2. vision warm start (10% of the budget): the vision tower alone is trained so that every image token
     linearly predicts the picture's colour / kind / count / digit (probe heads thrown away), then its
     mergers are rescaled to unit-RMS outputs. Without it the answers ignored the image for the whole
     budget (they followed the caption prior), although with oracle features the decoder learnt colours
     in ~40 steps: the random tower was the bottleneck.
  3. chat training for the rest: fp32, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, grad clip 1,
     lr 4e-3, 10 warmup steps, then cosine to 10% over the elapsed fraction of the remaining time, so the
     schedule completes whatever speed the shared CPU has). Each step draws a domain (A 65%, B 15%,
     image 20%); text batches are 8 samples of at most 256 tokens, right-padded (causal attention never
     looks right, so no attention mask is needed); image batches hold 32 pictures. Next-token loss on
     every text token (user and assistant turns; not image placeholders or padding).

Threads: one torch thread by default. On the 2 shared cores of the dev machine, torch.set_num_threads(2)
ran a training step 3-8x slower than one thread whenever another job was busy (OpenMP threads spin at
barriers while their partner core is taken): one thread gave 1000-2400 tokens/s for 8x256-token batches
(depending on the load), two threads 300-1100 (about as fast as one with OMP_WAIT_POLICY=PASSIVE set
before torch is imported). The result depends on the CPU time the budget buys: under load (~1/2 core)
an 8-minute build does ~360 steps / ~550k tokens.

Cache. Everything lives in <cache>/workload-<hash>/, hash = sha256 of this file's source, the tiny
models' recipe, the config and the library versions. It is built into a temporary sibling and renamed
into place (a DONE marker written last), so a reader never sees half a workload and two concurrent
builders do not clash. Layout:

    workload.json                 config, hash, versions, training stats (also in Workload.stats)
    target/                       HF + SGLang loadable checkpoint, tokenizer, processor, generation_config
    tokenizer/                    the tokenizer alone (tiny_models.build_tokenizer_dir)
    prompts/{A,B,image}/{train,eval}.jsonl
    images/{train,eval}/*.png     the pictures the image prompts point to (absolute paths in the JSONL)
    DONE

Prompt record (one JSON object per line):

    {"id": "A-eval-0003", "domain": "A", "split": "eval", "source": "<file:line / topic / image-seed-N>",
     "messages": [{"role": "user", "content": "Continue the code:\n..."}],      # text: a plain string
     "reference": "<the true continuation / caption>"}
    image: "content": [{"type": "image", "image": "/abs/path.png"}, {"type": "text", "text": "Describe ..."}]

`record_prompt(record)` turns a record into (prompt text, image paths) for SGLang's /generate;
`load_target` + `hf_greedy` run it through HF transformers.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sglang_ext.testing.prompts import COLOURS, IMAGE_PLACEHOLDER, chat_prompt
from sglang_ext.testing.tiny_models import (_hf_config, _recipe_hash, _save_processor, build_tokenizer_dir,
                                            default_cache_dir, special_id)

DOMAINS = ("A", "B", "image")
SPLITS = ("train", "eval")
CODE_INSTRUCTION = "Continue the code:\n"
CODE_FENCE_OPEN, CODE_FENCE_CLOSE = "```python\n", "```"     # code answers are fenced, as chat models do
IMAGE_QUESTION = "Describe the image."
IMAGE_SIZE = 128                       # pixels; tiny_models' processor keeps 128x128 -> 16 image tokens
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "A", 2: "Two", 3: "Three"}
EXCLUDED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "encodings",
                         "__pycache__", "turtledemo", "__phello__"}


@dataclass(frozen=True)
class WorkloadConfig:
    minutes: float = 8.0               # wall-clock budget of the training loop
    seed: int = 0
    quick: bool = False                # small data + prompt sets, for tests
    max_seq_len: int = 256
    text_batch_size: int = 8
    image_batch_size: int = 32
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    domain_weights: tuple = (("A", 0.65), ("B", 0.15), ("image", 0.2))
    eval_fraction: float = 0.15        # of stdlib files / pydoc topics held out
    n_prompts: tuple = (("A", 200, 40), ("B", 200, 40), ("image", 100, 20))   # (domain, n_train, n_eval)
    max_files: int | None = None       # limit the stdlib files parsed (quick builds)
    code_style: str = "normalized"     # "source" or "normalized" (ast.unparse, no docstrings/comments)
    bigram_init: bool = True           # start embed/lm_head as a fitted bigram model (see init_from_bigrams)
    vision_pretrain_fraction: float = 0.1    # of the budget spent on pretrain_vision first (0 = none)

    @classmethod
    def make(cls, minutes: float = 8.0, seed: int = 0, quick: bool = False) -> "WorkloadConfig":
        if minutes <= 0:
            raise ValueError(f"minutes must be positive, got {minutes}")
        if quick:
            return cls(minutes=minutes, seed=seed, quick=True, n_prompts=(("A", 12, 6), ("B", 12, 6), ("image", 6, 4)),
                       max_files=60, warmup_steps=3)
        return cls(minutes=minutes, seed=seed)


@dataclass
class Workload:
    root: Path
    hash: str
    target_dir: Path
    image_dir: Path
    prompt_files: dict                 # "A/train" -> Path of the JSONL, for every domain x split
    stats: dict                        # training stats (steps, tokens, losses, tokens/s, eval losses, ...)
    config: dict

    def prompt_file(self, domain: str, split: str) -> Path:
        key = f"{domain}/{split}"
        if key not in self.prompt_files:
            raise KeyError(f"no prompt set {key!r}; have {sorted(self.prompt_files)}")
        return self.prompt_files[key]

    def prompts(self, domain: str, split: str) -> list[dict]:
        return read_jsonl(self.prompt_file(domain, split))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def record_prompt(record: dict) -> tuple[str, list[str]]:
    """(chat prompt text ending in '<|im_start|>assistant\\n', image paths) for one prompt record."""
    (message,) = record["messages"]
    content = message["content"]
    if isinstance(content, str):
        return chat_prompt(content), []
    images = [part["image"] for part in content if part["type"] == "image"]
    text = "".join(part["text"] for part in content if part["type"] == "text")
    if content[:len(images)] != [p for p in content if p["type"] == "image"]:
        raise ValueError(f"record {record.get('id')}: images must come before the text")
    return chat_prompt(text, len(images)), images


# ----------------------------------------------------------------------------------------------------------
# Data: domain A (stdlib code), domain B (pydoc prose), images


def _stable_fraction(name: str, seed: int) -> float:
    """A deterministic number in [0, 1) for a name (file-level splits that survive reordering)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _strip_docstrings(tree) -> None:
    """Drop docstrings in place (a body left empty gets `pass`)."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]


def _code_units(max_files: int | None, seed: int, eval_fraction: float,
                code_style: str = "source") -> dict[str, list[tuple[str, list[str]]]]:
    """split -> [(source "file:line", lines of a function/class definition)], >= 8 lines each.

    code_style "source": the dedented source text; "normalized": ast.unparse of the definition without
    docstrings and comments (one consistent formatting, so fewer bits per token to learn)."""
    import ast

    if code_style not in ("source", "normalized"):
        raise ValueError(f"unknown code_style {code_style!r}; expected 'source' or 'normalized'")
    root = _stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not (EXCLUDED_STDLIB_PARTS & set(p.relative_to(root).parts)))
    if max_files is not None:
        files = sorted(files, key=lambda p: _stable_fraction(str(p.relative_to(root)), seed + 1))[:max_files]
    units: dict[str, list] = {"train": [], "eval": []}
    for path in files:
        rel = str(path.relative_to(root))
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        split = "eval" if _stable_fraction(rel, seed) < eval_fraction else "train"
        if code_style == "normalized":
            _strip_docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if code_style == "normalized":
                    body = ast.unparse(node).splitlines()
                else:
                    body = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])).splitlines()
                body = [line.rstrip() for line in body]
                if len(body) >= 8 and "\t" not in "".join(body) and max(map(len, body)) <= 200:
                    units[split].append((f"{rel}:{node.lineno}", body))
    if not units["train"] or not units["eval"]:
        raise RuntimeError(f"found no usable stdlib code under {root} (train {len(units['train'])}, "
                           f"eval {len(units['eval'])} definitions)")
    return units


def _prose_units(seed: int, eval_fraction: float) -> dict[str, list[tuple[str, list[str]]]]:
    """split -> [(topic, prose paragraphs)] from pydoc_data.topics (headings, grammar and code dropped).

    Whole topics are held out: in hash order until they hold `eval_fraction` of the prose (topics differ
    a lot in size, so a plain hash split could leave too little held-out text)."""
    from pydoc_data.topics import topics

    prose = {}
    for topic in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t")) or any(set(l.strip()) <= set("*=-") for l in lines):
                continue                                   # code / grammar / headings
            text = " ".join(l.strip() for l in lines)
            if len(text) >= 80 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                paragraphs.append(text)
        if paragraphs:
            prose[topic] = paragraphs
    total_chars = sum(len(p) for ps in prose.values() for p in ps)
    units: dict[str, list] = {"train": [], "eval": []}
    eval_chars = 0
    for topic in sorted(prose, key=lambda t: _stable_fraction(t, seed)):
        split = "eval" if eval_chars < eval_fraction * total_chars else "train"
        eval_chars += sum(len(p) for p in prose[topic]) if split == "eval" else 0
        units[split].append((topic, prose[topic]))
    if not units["train"] or not units["eval"]:
        raise RuntimeError("pydoc_data.topics gave no prose paragraphs for both splits")
    return units


def _sentences(paragraph: str) -> list[str]:
    """Split prose at sentence ends (not after "e.g." / "i.e.")."""
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[a-z0-9)\"][.?!])\s+(?=[A-Z\"(])", paragraph)


@dataclass
class ChatSample:
    """One chat exchange: user text (+ images) and the assistant's answer."""
    user: str
    answer: str
    source: str
    complete: bool = True              # the answer ends here (<|im_end|>), not cut at the length limit
    image_seed: int | None = None


def _draw_seven_segment(draw, digit: int, x0: int, y0: int, w: int, h: int, thick: int, colour) -> None:
    segments = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
                8: "abcdefg", 9: "abcdfg"}[digit]
    half = h // 2
    boxes = {"a": (x0, y0, x0 + w, y0 + thick), "g": (x0, y0 + half - thick // 2, x0 + w, y0 + half + thick // 2),
             "d": (x0, y0 + h - thick, x0 + w, y0 + h), "f": (x0, y0, x0 + thick, y0 + half),
             "b": (x0 + w - thick, y0, x0 + w, y0 + half), "e": (x0, y0 + half, x0 + thick, y0 + h),
             "c": (x0 + w - thick, y0 + half, x0 + w, y0 + h)}
    for s in segments:
        draw.rectangle(boxes[s], fill=colour)


@dataclass(frozen=True)
class ImageSpec:
    """What a synthetic picture shows; `caption` is the target's answer."""
    colour: str
    shape: str | None                  # None for a digit
    count: int                         # 1 for a digit
    digit: int | None = None

    @property
    def caption(self) -> str:
        if self.digit is not None:
            return f"The digit {self.digit}, in {self.colour}."
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}."


def render_image(seed: int):
    """(128x128 PIL image, ImageSpec) for an image seed: 1-3 same-colour shapes, or a seven-segment digit."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colour = rng.choice(sorted(COLOURS))
    rgb = COLOURS[colour]
    if rng.random() < 0.3:
        digit = rng.randrange(10)
        w, h = rng.randint(40, 56), rng.randint(72, 96)
        x0, y0 = rng.randint(4, IMAGE_SIZE - w - 4), rng.randint(4, IMAGE_SIZE - h - 4)
        _draw_seven_segment(draw, digit, x0, y0, w, h, rng.randint(8, 12), rgb)
        return image, ImageSpec(colour, None, 1, digit)
    shape, count = rng.choice(SHAPES), rng.randint(1, 3)
    cell = IMAGE_SIZE // 2
    for cx, cy in rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], count):   # distinct quadrants: no overlap
        size = rng.randint(30, 50)
        x0 = cx * cell + rng.randint(4, cell - size - 4)
        y0 = cy * cell + rng.randint(4, cell - size - 4)
        box = [x0, y0, x0 + size, y0 + size]
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=rgb)
    return image, ImageSpec(colour, shape, count)


EVAL_IMAGE_SEED_OFFSET = 1_000_000_000     # eval image seeds live far away from training seeds


class SampleMaker:
    """Draws chat samples of each domain and split, cut to fit `max_tokens` tokens."""

    def __init__(self, tokenizer, config: WorkloadConfig):
        self.tokenizer = tokenizer
        self.max_tokens = config.max_seq_len
        self.code = _code_units(config.max_files, config.seed, config.eval_fraction, config.code_style)
        self.prose = _prose_units(config.seed, config.eval_fraction)

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit(self, user: str, pieces: list[str], source: str) -> ChatSample:
        """Append answer pieces (each with its trailing separator) while the chat sample fits max_tokens."""
        budget = self.max_tokens - self.n_tokens(chat_prompt(user)) - 2      # <|im_end|> + "\n"
        answer, used = "", 0
        for piece in pieces:
            cost = self.n_tokens(piece)
            if used + cost > budget:
                return ChatSample(user, answer, source, complete=False)
            answer += piece
            used += cost
        return ChatSample(user, answer.rstrip(), source, complete=True)

    def code_sample(self, split: str, rng: random.Random) -> ChatSample:
        source, lines = rng.choice(self.code[split])
        n_prompt = rng.randint(2, 6)
        user = CODE_INSTRUCTION + "\n".join(lines[:n_prompt])
        pieces = [CODE_FENCE_OPEN] + [line + "\n" for line in lines[n_prompt:]] + [CODE_FENCE_CLOSE]
        return self._fit(user, pieces, source)

    def prose_sample(self, split: str, rng: random.Random) -> ChatSample:
        """A sentence of a paragraph -> the rest of it and of the following paragraphs of the topic."""
        while True:
            topic, paragraphs = rng.choice(self.prose[split])
            i = rng.randrange(len(paragraphs))
            sentences = _sentences(paragraphs[i])
            if len(sentences) < 2:
                continue
            j = rng.randrange(len(sentences) - 1)
            if len(sentences[j]) <= 300:
                break
        user, rest = sentences[j], sentences[j + 1:]
        pieces = [s + " " for s in rest[:-1]] + [rest[-1] + "\n\n"]
        for paragraph in paragraphs[i + 1:]:
            following = _sentences(paragraph)
            pieces += [s + " " for s in following[:-1]] + [following[-1] + "\n\n"]
        return self._fit(user, pieces, topic)

    def image_sample(self, split: str, rng: random.Random) -> ChatSample:
        seed = rng.randrange(EVAL_IMAGE_SEED_OFFSET) + (EVAL_IMAGE_SEED_OFFSET if split == "eval" else 0)
        _, spec = render_image(seed)
        return ChatSample(IMAGE_QUESTION, spec.caption, f"image-seed-{seed}", image_seed=seed)

    def sample(self, domain: str, split: str, rng: random.Random) -> ChatSample:
        return {"A": self.code_sample, "B": self.prose_sample, "image": self.image_sample}[domain](split, rng)


def _write_prompt_sets(maker: SampleMaker, config: WorkloadConfig, root: Path) -> dict[str, Path]:
    """JSONL prompt sets per domain and split; image PNGs under root/images. Returns {"A/train": path}."""
    files = {}
    for domain, n_train, n_eval in config.n_prompts:
        for split, n in (("train", n_train), ("eval", n_eval)):
            rng = random.Random(f"{config.seed}:{domain}:{split}:prompts")
            records, seen, attempts = [], set(), 0
            while len(records) < n:
                attempts += 1
                if attempts > 50 * n:
                    raise RuntimeError(f"not enough distinct {domain}/{split} prompts for {n} records")
                sample = maker.sample(domain, split, rng)
                key = (sample.user, sample.image_seed)
                if key in seen:
                    continue
                seen.add(key)
                record_id = f"{domain}-{split}-{len(records):04d}"
                if sample.image_seed is not None:
                    image, _ = render_image(sample.image_seed)
                    image_path = (root / "images" / split / f"{record_id}.png").resolve()
                    image_path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(image_path)
                    content = [{"type": "image", "image": str(image_path)}, {"type": "text", "text": sample.user}]
                else:
                    content = sample.user
                records.append({"id": record_id, "domain": domain, "split": split, "source": sample.source,
                                "messages": [{"role": "user", "content": content}], "reference": sample.answer})
            path = root / "prompts" / domain / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            files[f"{domain}/{split}"] = path
    return files


# ----------------------------------------------------------------------------------------------------------
# Batches


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
    from sglang_ext.testing.tiny_models import VOCAB_SIZE

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


# ----------------------------------------------------------------------------------------------------------
# HF inference helpers (used by the benchmark script and the tests)


def load_target(target_dir: Path):
    """(model, processor) from a workload target directory, fp32, eval mode."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(target_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(target_dir)
    return model, processor


@torch.no_grad()
def hf_greedy(model, processor, record: dict, max_new_tokens: int = 48, stop_at_eos: bool = False) -> list[int]:
    """Greedy continuation (token ids) of a prompt record with HF transformers."""
    from PIL import Image

    text, image_paths = record_prompt(record)
    images = [Image.open(p).convert("RGB") for p in image_paths] or None
    inputs = processor(text=[text], images=images, return_tensors="pt")
    eos = special_id("<|im_end|>") if stop_at_eos else None
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=special_id("<|endoftext|>"),
                         **({} if stop_at_eos else {"min_new_tokens": max_new_tokens}))
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def distinct_fraction(token_ids: list[int]) -> float:
    """Degeneracy measure: distinct tokens / tokens (a single repeated token gives 1/len)."""
    return len(set(token_ids)) / max(1, len(token_ids))


# ----------------------------------------------------------------------------------------------------------
# Build + cache


def _versions() -> dict:
    import PIL
    import tokenizers
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "PIL": PIL.__version__}


def workload_hash(config: WorkloadConfig) -> str:
    source = inspect.getsource(inspect.getmodule(workload_hash))
    blob = json.dumps({"source": hashlib.sha256(source.encode()).hexdigest(), "tiny_models": _recipe_hash(),
                       "config": asdict(config), "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load(root: Path) -> Workload:
    meta = json.loads((root / "workload.json").read_text())
    return Workload(root=root, hash=meta["hash"], target_dir=root / "target", image_dir=root / "images",
                    prompt_files={k: root / v for k, v in meta["prompt_files"].items()},
                    stats=meta["stats"], config=meta["config"])


def _build(out: Path, config: WorkloadConfig, workload_id: str, progress: bool) -> None:
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    build_start = time.monotonic()
    tokenizer_dir = out / "tokenizer"
    build_tokenizer_dir(tokenizer_dir)
    target_dir = out / "target"
    _save_processor(tokenizer_dir, target_dir)
    processor = Qwen3VLProcessor.from_pretrained(target_dir)
    maker = SampleMaker(AutoTokenizer.from_pretrained(tokenizer_dir), config)
    prompt_files = _write_prompt_sets(maker, config, out)
    data_s = time.monotonic() - build_start

    torch.manual_seed(config.seed)
    model = Qwen3VLForConditionalGeneration(_hf_config("dense")).to(torch.float32)
    batcher = Batcher(maker, processor)
    stats = train_target(model, batcher, config, progress=progress)
    stats["heldout_loss"] = heldout_loss(model, batcher, config, n_batches=1 if config.quick else 3)

    model.save_pretrained(target_dir, safe_serialization=True)
    _save_processor(tokenizer_dir, target_dir)
    gen_cfg = {"eos_token_id": special_id("<|im_end|>"), "pad_token_id": special_id("<|endoftext|>"),
               "do_sample": False}
    (target_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    stats.update(data_seconds=round(data_s, 1), build_seconds=round(time.monotonic() - build_start, 1),
                 n_code_units={s: len(u) for s, u in maker.code.items()},
                 n_prose_topics={s: len(u) for s, u in maker.prose.items()})
    meta = {"hash": workload_id, "config": asdict(config), "versions": _versions(),
            "prompt_files": {k: str(p.relative_to(out)) for k, p in prompt_files.items()}, "stats": stats}
    (out / "workload.json").write_text(json.dumps(meta, indent=1))
    (out / "DONE").write_text("ok\n")


def build_workload(cache_dir: Path | None = None, *, minutes: float = 8.0, seed: int = 0, quick: bool = False,
                   force: bool = False, progress: bool = True, threads: int = 1) -> Workload:
    """Build (or load from the cache) the reference workload: trained tiny target + prompt sets.

    quick=True makes a small version for tests (fewer stdlib files, a few prompts per set); `minutes` is
    the training budget. force=True rebuilds even when a finished build is cached. `threads`: torch CPU
    threads while building (see the module doc for why 1).
    """
    config = WorkloadConfig.make(minutes=minutes, seed=seed, quick=quick)
    workload_id = workload_hash(config)
    root = Path(cache_dir or default_cache_dir()) / f"workload-{workload_id}"
    if (root / "DONE").exists() and not force:
        return _load(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Image paths in the JSONL are absolute, so prompts are written for the final location: build in a
    # temporary sibling, then fix them up to the final root before the rename.
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _build(tmp, config, workload_id, progress)
        _retarget_image_paths(tmp, root)
        if force and root.exists():
            old = root.with_name(f"{root.name}.old{os.getpid()}")
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:                                # another process finished first: use theirs
            if not (root / "DONE").exists():
                raise
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(root)


def _retarget_image_paths(tmp: Path, final: Path) -> None:
    old, new = str(tmp.resolve()), str(final.resolve())
    for path in (tmp / "prompts").rglob("*.jsonl"):
        records = read_jsonl(path)
        for record in records:
            for message in record["messages"]:
                if isinstance(message["content"], list):
                    for part in message["content"]:
                        if part["type"] == "image":
                            part["image"] = new + part["image"][len(old):]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
