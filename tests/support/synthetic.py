"""Test-only stand-ins: a target checkpoint holding only what the trainer
reads (config.json + embed_tokens / lm_head), a matching draft config, and replay records with a
learnable structure. Nothing here is a real model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.dflash_draft import DraftConfig
from trainer.replay import ReplayRecord


def write_tiny_target(path: str | Path, *, hidden_size: int = 64, num_layers: int = 4, vocab_size: int = 300,
                      tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """A Qwen3-VL-shaped directory: config.json (text_config nested) + model.safetensors with
    model.language_model.embed_tokens.weight and (untied) lm_head.weight."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    text = {"model_type": "qwen3_vl_text", "hidden_size": hidden_size, "num_hidden_layers": num_layers,
            "vocab_size": vocab_size, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": hidden_size // 4, "intermediate_size": 2 * hidden_size, "rms_norm_eps": 1e-6,
            "rope_theta": 5_000_000.0, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                         "mrope_interleaved": True},
            "tie_word_embeddings": tie_word_embeddings}
    config = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
              "text_config": text, "tie_word_embeddings": tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {"model.language_model.embed_tokens.weight": torch.randn(vocab_size, hidden_size, generator=g),
               "model.language_model.norm.weight": torch.ones(hidden_size)}
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = torch.randn(vocab_size, hidden_size, generator=g) * 0.5
    save_file(tensors, str(path / "model.safetensors"))
    return path


def tiny_draft_config(*, hidden_size: int = 64, num_target_layers: int = 4, target_layer_ids=(1, 2),
                      vocab_size: int = 300, block_size: int = 4, num_layers: int = 2, **overrides) -> DraftConfig:
    kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
              head_dim=hidden_size // 4, intermediate_size=2 * hidden_size, vocab_size=vocab_size,
              target_layer_ids=list(target_layer_ids), num_target_layers=num_target_layers,
              mask_token_id=vocab_size - 1, block_size=block_size, rope_theta=10000.0)
    kw.update(overrides)
    return DraftConfig(**kw)


def synthetic_records(n: int, *, num_layers: int, hidden_size: int, vocab: int = 40, min_len: int = 24,
                      max_len: int = 48, prompt_len: int = 4, seed: int = 0) -> list[ReplayRecord]:
    """Sequences t[i+1] = 10 + (t[i] - 10 + step) % vocab with a per-sequence step in {1, 2, 3}; features
    are a fixed random code of the token at each position (+ noise), so the step is readable from the
    context and the continuation is learnable. The first `prompt_len` tokens are outside the loss."""
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(10 + vocab, num_layers * hidden_size, generator=g)
    out = []
    for i in range(n):
        S = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        start = int(torch.randint(0, vocab, (1,), generator=g))
        ids = 10 + (start + step * torch.arange(S)) % vocab
        feats = code[ids] + 0.1 * torch.randn(S, num_layers * hidden_size, generator=g)
        mask = torch.arange(S) >= prompt_len
        out.append(ReplayRecord(input_ids=ids, features=feats, positions=torch.arange(S).expand(3, S).clone(),
                                loss_mask=mask, meta={"rid": f"synthetic-{seed}-{i}", "step": step}))
    return out
