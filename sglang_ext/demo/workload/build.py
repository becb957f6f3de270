"""The reference workload's cached build: config, hash, build into a temporary sibling and rename, load; plus
HF inference helpers for the built target."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sglang_ext.demo import prompts
from sglang_ext.demo.tiny_models import (_hf_config, _recipe_hash, _save_processor, build_tokenizer_dir,
                                         default_cache_dir, special_id)
from sglang_ext.demo.workload import images, pretrain, sources
from sglang_ext.demo.workload.pretrain import Batcher, heldout_loss, train_target
from sglang_ext.demo.workload.sources import SampleMaker, read_jsonl, record_prompt, write_prompt_sets


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

    def chats(self, domain: str, split: str, turns: int = 3) -> list[list[str]]:
        """Multi-turn traffic: the user messages of chats of `turns` turns, consecutive text prompts of one
        prompt set (a chat never mixes splits). Sent with `SYSTEM_PROMPT` and each turn carrying the whole
        conversation so far (sglang_ext.demo.traffic.send_chats), so every turn after the first, and every
        chat's system prompt, is a radix-cache hit on the server."""
        texts = [r["messages"][0]["content"] for r in self.prompts(domain, split)
                 if isinstance(r["messages"][0]["content"], str)]
        return [texts[i:i + turns] for i in range(0, len(texts) - turns + 1, turns)]


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
    """Of everything that decides what a build holds: this package's source, the prompts module, the tiny models'
    recipe, the config and the library versions."""
    source = "".join(inspect.getsource(m) for m in (sources, images, pretrain, prompts, inspect.getmodule(workload_hash)))
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
    prompt_files = write_prompt_sets(maker, config, out)
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
