"""The target checkpoint, as far as the draft trainer needs it: its identity (for replay manifests),
its text config (hidden size, layers, vocab) and its frozen embed_tokens / lm_head weights.

Reads a local HF directory (config.json + *.safetensors, optionally model.safetensors.index.json).
Only the two needed tensors are read from disk (safetensors is memory-mapped), never the whole model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

EMBED_NAMES = (
    "model.language_model.embed_tokens.weight",     # Qwen3-VL (dense and MoE), transformers >= 4.57
    "model.embed_tokens.weight",                    # text-only Qwen3 / Llama
    "language_model.model.embed_tokens.weight",     # older VL layouts
)
LM_HEAD_NAMES = ("lm_head.weight", "model.lm_head.weight", "language_model.lm_head.weight")
FINAL_NORM_NAMES = ("model.language_model.norm.weight", "model.norm.weight", "language_model.model.norm.weight")


@dataclass(frozen=True)
class TargetIdentity:
    """Which target produced a replay: recorded in every manifest, checked by the trainer."""
    model: str            # model path or name as given to the server
    config_hash: str      # "sha256:<hex>" of config.json, canonical JSON (sorted keys)

    def to_dict(self) -> dict:
        return {"model": self.model, "config_hash": self.config_hash}


@dataclass(frozen=True)
class TargetInfo:
    path: str
    identity: TargetIdentity
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool


def config_hash(config: dict) -> str:
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def read_target_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"target checkpoint directory not found: {path}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"target checkpoint {path} has no config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e


def target_identity(path: str | os.PathLike, name: str | None = None) -> TargetIdentity:
    """Identity of a local target checkpoint; `name` overrides the recorded model string."""
    return TargetIdentity(model=name or str(path), config_hash=config_hash(read_target_config(path)))


def target_info(path: str | os.PathLike) -> TargetInfo:
    cfg = read_target_config(path)
    text = cfg.get("text_config") or cfg
    try:
        hidden, layers, vocab = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"])
    except KeyError as e:
        raise ValueError(f"{Path(path) / 'config.json'}: text config lacks {e.args[0]!r}") from e
    tied = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return TargetInfo(path=str(path), identity=TargetIdentity(str(path), config_hash(cfg)), hidden_size=hidden,
                      num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=tied)


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: unreadable weight_map: {e}") from e
        return {k: path / v for k, v in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"target checkpoint {path} has no *.safetensors weights")
    from safetensors import safe_open
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


def _read_first(names: dict[str, Path], candidates: tuple[str, ...], dtype: torch.dtype | None) -> torch.Tensor | None:
    """The first of `candidates` the checkpoint has (names: tensor name -> file), or None."""
    from safetensors import safe_open
    for name in candidates:
        if name in names:
            f = names[name]
            if not f.is_file():
                raise FileNotFoundError(f"target weight {name} is mapped to missing file {f}")
            with safe_open(str(f), framework="pt") as sf:
                t = sf.get_tensor(name)
            return t.to(dtype) if dtype is not None else t
    return None


def load_target_final_norm(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """-> (the text model's final RMSNorm weight [H], its eps): with lm_head, the target's next-token head."""
    path = Path(path)
    cfg = read_target_config(path)
    text = cfg.get("text_config") or cfg
    norm = _read_first(_weight_files(path), FINAL_NORM_NAMES, dtype)
    if norm is None:
        raise ValueError(f"target checkpoint {path}: no final norm among {list(FINAL_NORM_NAMES)}")
    return norm, float(text.get("rms_norm_eps", 1e-6))


def load_target_head(path: str | os.PathLike, dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, TargetInfo]:
    """-> (embed_tokens [V, H], lm_head [V, H], info). Tied checkpoints return the same tensor twice."""
    path = Path(path)
    info = target_info(path)
    names = _weight_files(path)

    def read(candidates: tuple[str, ...]) -> torch.Tensor | None:
        return _read_first(names, candidates, dtype)

    embed = read(EMBED_NAMES)
    if embed is None:
        raise ValueError(f"target checkpoint {path}: no embedding among {list(EMBED_NAMES)}")
    lm_head = None if info.tie_word_embeddings else read(LM_HEAD_NAMES)
    if lm_head is None:
        if not info.tie_word_embeddings:
            raise ValueError(f"target checkpoint {path}: no lm_head among {list(LM_HEAD_NAMES)} and "
                             "tie_word_embeddings is false")
        lm_head = embed
    for name, t in (("embed_tokens", embed), ("lm_head", lm_head)):
        if t.ndim != 2 or t.shape[1] != info.hidden_size:
            raise ValueError(f"target checkpoint {path}: {name} shape {tuple(t.shape)} does not match "
                             f"hidden_size {info.hidden_size} in config.json")
    return embed, lm_head, info
