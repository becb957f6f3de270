"""Where the reference workload's chat traffic comes from: stdlib code (domain A), pydoc prose (B) and synthetic
images, split by source into train and eval; `SampleMaker` draws samples and `write_prompt_sets` the JSONL."""
from __future__ import annotations

import hashlib
import json
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sglang_ext.demo.prompts import chat_prompt
from sglang_ext.demo.workload.images import EVAL_IMAGE_SEED_OFFSET, render_image

if TYPE_CHECKING:
    from sglang_ext.demo.workload.build import WorkloadConfig

DOMAINS = ("A", "B", "image")
SPLITS = ("train", "eval")
CODE_INSTRUCTION = "Continue the code:\n"
CODE_FENCE_OPEN, CODE_FENCE_CLOSE = "```python\n", "```"     # code answers are fenced, as chat models do
IMAGE_QUESTION = "Describe the image."
EXCLUDED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "encodings",
                         "__pycache__", "turtledemo", "__phello__"}




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


def write_prompt_sets(maker: SampleMaker, config, root: Path) -> dict[str, Path]:
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
