"""DFlash block-diffusion draft, training form. One file, plain PyTorch.

Mirrors SGLang 0.5.23 `srt/models/dflash.py` `DFlashDraftModel` (+ the context-KV path of
`srt/speculative/dflash_worker_v2.py`) exactly, in parameter names and in math:

    target_hidden [S, K*H]   K target layers' hidden states, concatenated in layer-id order
    ctx        = hidden_norm(fc(target_hidden))                     [S, H]  (same for every layer)
    per draft layer l, the context K/V are
        k_ctx  = RoPE(k_norm(k_proj(ctx)), ctx_pos)                   NO input_layernorm on ctx
        v_ctx  = v_proj(ctx)
    block = [token at anchor, MASK x (B-1)] at positions anchor .. anchor+B-1, embedded with the
    target's (frozen) embedding; pre-norm decoder layers:
        x      = input_layernorm(h)
        q,k,v  = q_proj(x), k_proj(x), v_proj(x);  q,k = q_norm/k_norm per head, then RoPE (1-D pos)
        h      = h + o_proj(attn(q, [k_ctx ; k], [v_ctx ; v]))     block j sees ctx pos < anchor_j
        h      = h + down_proj(silu(gate_proj(y)) * up_proj(y)),  y = post_attention_layernorm(h)
    out = norm(h); logits = target lm_head(out). Slot k of a block predicts the token AT anchor+k.

Weight names (what `export` writes and SGLang's `load_weights` consumes; q/k/v and gate/up are
stacked by SGLang on load):
    fc.weight [H, K*H]   hidden_norm.weight [H]   norm.weight [H]
    layers.N.input_layernorm.weight  layers.N.post_attention_layernorm.weight      [H]
    layers.N.self_attn.{q,k,v,o}_proj.weight   layers.N.self_attn.{q,k}_norm.weight [head_dim]
    layers.N.mlp.{gate,up,down}_proj.weight
The target's embed_tokens / lm_head are held as non-persistent buffers: frozen, never exported.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from spec_kernels.dflash_attention import block_attention
from trainer.draft_kind import read_draft_config, with_target_features, without_target_features
from trainer.fsutil import atomic_write_bytes
from trainer.layers import (GatedMLP, RMSNorm, apply_rope, init_from_scratch, parse_rope, read_checkpoint,
                            rope_cos_sin)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# config.json keys this file interprets itself (everything else is carried through `extra`)
_OWN_KEYS = {
    "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "partial_rotary_factor", "rope_is_neox_style", "is_neox_style",
    "max_position_embeddings", "attention_bias", "is_causal", "initializer_range", "block_size",
    "dflash_config", "num_target_layers", "target_layer_ids", "mask_token_id", "layer_types",
    "hidden_act", "tie_word_embeddings", "use_sliding_window", "sliding_window", "dtype", "torch_dtype",
}


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """SGLang's `build_target_layer_ids`: evenly spaced in [1, L-3] (one layer: L // 2)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    if end < start:
        raise ValueError(f"default DFlash target layers need num_target_layers >= 4, got {num_target_layers}")
    span = end - start
    return [int(round(start + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass
class DraftConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: list[int]
    num_target_layers: int
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"              # "default" or "linear" (what 1-D draft positions use)
    rope_factor: float = 1.0                # linear scaling: positions / factor
    rotary_dim: int | None = None           # None: head_dim
    rope_is_neox_style: bool = True
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    is_causal: bool = False                 # False: block tokens see each other both ways (SGLang default)
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)   # unknown config.json keys, written back as-is

    @property
    def num_context_features(self) -> int:
        return len(self.target_layer_ids)

    # ---- config.json <-> DraftConfig -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "draft config") -> "DraftConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        text = d.get("text_config", d)   # SGLang reads model dims from text_config when present
        dflash = d.get("dflash_config") or {}
        if not isinstance(dflash, dict):
            raise ValueError(f"{source}: 'dflash_config' must be an object, got {type(dflash).__name__}")

        def need(key: str, where: dict = text) -> Any:
            if key not in where or where[key] is None:
                raise ValueError(f"{source}: missing required key {key!r}")
            return where[key]

        archs = d.get("architectures") or []
        if archs and "DFlashDraftModel" not in archs:
            raise ValueError(f"{source}: architectures={archs} is not ['DFlashDraftModel']; this trainer "
                             "builds only the plain DFlashDraftModel")
        _reject_unsupported(d, text, dflash, source)

        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_layers = int(need("num_hidden_layers"))
        head_dim = int(text.get("head_dim") or hidden // n_heads)

        ids = dflash.get("target_layer_ids", d.get("target_layer_ids"))
        num_target = dflash.get("num_target_layers", d.get("num_target_layers"))
        if ids is None:
            if num_target is None:
                raise ValueError(f"{source}: needs dflash_config.target_layer_ids or num_target_layers")
            ids = default_target_layer_ids(int(num_target), n_layers)
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"{source}: dflash_config.target_layer_ids must be a non-empty list of ints, got {ids!r}")
        num_target = int(num_target) if num_target is not None else max(ids) + 1
        bad = [i for i in ids if not 0 <= i < num_target]
        if bad:
            raise ValueError(f"{source}: target_layer_ids {bad} out of range for num_target_layers={num_target}")
        mask_id = dflash.get("mask_token_id", d.get("mask_token_id"))
        if mask_id is None:
            raise ValueError(f"{source}: missing dflash_config.mask_token_id (training needs the id, not only "
                             "the mask_token string)")
        block = dflash.get("block_size", d.get("block_size", 16))

        rope_theta, rope_type, rope_factor, rotary_dim = parse_rope(text, head_dim, source)
        neox = text.get("rope_is_neox_style", text.get("is_neox_style", True))
        extra = {k: v for k, v in without_target_features(d, source).items()
                 if k not in _OWN_KEYS and k != "text_config"}
        extra_dflash = {k: v for k, v in dflash.items()
                        if k not in ("target_layer_ids", "mask_token_id", "block_size", "num_target_layers")}
        if extra_dflash:
            extra["dflash_config"] = extra_dflash
        return cls(
            hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or n_heads), head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size", text if "vocab_size" in text else d)),
            target_layer_ids=[int(i) for i in ids], num_target_layers=num_target, mask_token_id=int(mask_id),
            block_size=int(block), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta, rope_type=rope_type, rope_factor=rope_factor, rotary_dim=rotary_dim,
            rope_is_neox_style=bool(neox),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            attention_bias=bool(text.get("attention_bias", False)),
            is_causal=bool(text.get("is_causal") or False),
            initializer_range=float(text.get("initializer_range", 0.02)), extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DraftConfig":
        """A draft directory or its config.json."""
        d, where = read_draft_config(path)
        return cls.from_dict(d, source=where)

    @classmethod
    def for_target(cls, target_config: dict, *, num_layers: int, block_size: int, mask_token_id: int,
                   target_layer_ids: list[int] | None = None, num_heads: int | None = None,
                   num_kv_heads: int | None = None, head_dim: int | None = None,
                   intermediate_size: int | None = None, rope_theta: float | None = None) -> "DraftConfig":
        """A new draft for a target (its config.json dict; text_config read when nested). Dimensions default
        to the target's; target layers to SGLang's `build_target_layer_ids`. mask_token_id must be an id the
        target never produces (a spare vocabulary row)."""
        text = target_config.get("text_config", target_config)
        L = int(text["num_hidden_layers"])
        n_heads = int(num_heads or text["num_attention_heads"])
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        return cls(
            hidden_size=int(text["hidden_size"]), num_hidden_layers=num_layers, num_attention_heads=n_heads,
            num_key_value_heads=int(num_kv_heads or text.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim or text.get("head_dim") or text["hidden_size"] // n_heads),
            intermediate_size=int(intermediate_size or text["intermediate_size"]), vocab_size=int(text["vocab_size"]),
            target_layer_ids=list(target_layer_ids or default_target_layer_ids(L, num_layers)),
            num_target_layers=L, mask_token_id=int(mask_token_id), block_size=int(block_size),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            max_position_embeddings=int(text.get("max_position_embeddings", 40960)))

    def to_dict(self) -> dict:
        """config.json in the layout SGLang's DFlash worker / DFlashDraftModel parse."""
        d = dict(self.extra)
        dflash = dict(d.pop("dflash_config", {}) or {})
        dflash.update(target_layer_ids=list(self.target_layer_ids), mask_token_id=int(self.mask_token_id))
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        if self.rotary_dim is not None and self.rotary_dim != self.head_dim:
            rope["rope_dim"] = self.rotary_dim
        d.update({
            "architectures": ["DFlashDraftModel"],
            "model_type": d.get("model_type", "qwen3"),
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_is_neox_style": self.rope_is_neox_style,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "is_causal": self.is_causal,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "use_sliding_window": False,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": dflash,
        })
        return d


def _reject_unsupported(d: dict, text: dict, dflash: dict, source: str) -> None:
    """Variants SGLang knows but this training form does not implement: fail loudly, never silently."""
    problems = []
    if text.get("use_gemma_norm"):
        problems.append("use_gemma_norm=true (GemmaRMSNorm)")
    if text.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={text.get('hidden_act')!r} (only silu)")
    layer_types = text.get("layer_types", d.get("layer_types"))
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={layer_types} (only full_attention)")
    for key in ("conv_kernel_size", "selector_rank", "attention_sink_bias"):
        if dflash.get(key):
            problems.append(f"dflash_config.{key}={dflash[key]!r}")
    if dflash.get("attention_value_scale") is not None:
        problems.append("dflash_config.attention_value_scale")
    if dflash.get("projector_type", d.get("projector_type")) is not None:
        problems.append(f"projector_type={dflash.get('projector_type', d.get('projector_type'))!r}")
    if d.get("has_embed_tokens"):
        problems.append("has_embed_tokens=true (a draft-owned embedding)")
    if problems:
        raise ValueError(f"{source}: unsupported DFlash draft variant: {'; '.join(problems)}")


# ---- layers ----------------------------------------------------------------------------------------

class DFlashAttention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def context_kv(self, ctx: torch.Tensor, ctx_cos: torch.Tensor, ctx_sin: torch.Tensor):
        """ctx [b, S, H] (already hidden_norm(fc(.))) -> k, v [b, Hkv, S, D]. What SGLang writes into the
        draft KV cache: kv_proj_only -> apply_k_norm -> apply_k_rope (no input_layernorm)."""
        b, S, _ = ctx.shape
        k = self.k_norm(self.k_proj(ctx).view(b, S, self.n_kv_heads, self.head_dim))
        k = apply_rope(k, ctx_cos, ctx_sin, self.cfg.rope_is_neox_style)
        v = self.v_proj(ctx).view(b, S, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, blk_cos, blk_sin, ctx_k, ctx_v, anchors, block_size, backend):
        """x [b, NB, H] (normed block hidden) -> [b, NB, H]."""
        b, NB, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, NB, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, NB, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, NB, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, blk_cos, blk_sin, self.cfg.rope_is_neox_style).transpose(1, 2)   # [b, Hq, NB, D]
        k = apply_rope(k, blk_cos, blk_sin, self.cfg.rope_is_neox_style).transpose(1, 2)   # [b, Hkv, NB, D]
        k = torch.cat([ctx_k.to(k.dtype), k], dim=2)                                         # [b, Hkv, S+NB, D]
        v = torch.cat([ctx_v.to(v.dtype), v.transpose(1, 2)], dim=2)
        out = block_attention(q, k, v, anchors, block_size, causal_in_block=self.cfg.is_causal,
                              scale=self.head_dim ** -0.5, backend=backend)                  # [b, Hq, NB, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, NB, self.n_heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)


# ---- the draft ---------------------------------------------------------------------------------------

class DFlashDraft(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.layers = nn.ModuleList([DFlashDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.fc = nn.Linear(cfg.num_context_features * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        # the target's, frozen; buffers so optimizers and state_dict() never see them
        self.register_buffer("embed_tokens", None, persistent=False)   # [V, H]
        self.register_buffer("lm_head", None, persistent=False)        # [V, H]

    # ---- construction ----
    @classmethod
    def from_scratch(cls, cfg: DraftConfig, seed: int | None = None) -> "DFlashDraft":
        return init_from_scratch(cls(cfg), cfg.initializer_range, seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: DraftConfig | None = None) -> "DFlashDraft":
        """Load config.json + *.safetensors written by `export` (or a published DFlash draft)."""
        cfg = cfg or DraftConfig.from_json(path)
        model = cls(cfg)
        loaded = read_checkpoint(path, dict(model.state_dict()), rename=lambda n: n.removeprefix("model."),
                                 what=f"DFlash draft ({cfg.num_hidden_layers} layers, K={cfg.num_context_features})")
        model.load_state_dict({k: v.float() for k, v in loaded.items()}, strict=True)
        return model

    def attach_target(self, embed_tokens: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Frozen target embedding [V, H] and LM head [V, H] (the same tensor when tied)."""
        H = self.cfg.hidden_size
        for name, w in (("embed_tokens", embed_tokens), ("lm_head", lm_head)):
            if w.ndim != 2 or w.shape[1] != H:
                raise ValueError(f"target {name} has shape {tuple(w.shape)}; the draft needs [vocab, {H}]")
        if self.cfg.mask_token_id >= embed_tokens.shape[0]:
            raise ValueError(f"mask_token_id {self.cfg.mask_token_id} is outside the target vocab "
                             f"({embed_tokens.shape[0]} rows in embed_tokens)")
        device = self.fc.weight.device
        self.embed_tokens = embed_tokens.detach().to(device)
        self.lm_head = lm_head.detach().to(device)

    # ---- forward ----
    def project_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """target_hidden [b, S, K*H] -> ctx [b, S, H] = hidden_norm(fc(.))."""
        if target_hidden.shape[-1] != self.fc.in_features:
            raise ValueError(f"target_hidden last dim {target_hidden.shape[-1]} != K*H = "
                             f"{self.cfg.num_context_features}*{self.cfg.hidden_size} (layer ids "
                             f"{self.cfg.target_layer_ids})")
        if not torch.is_autocast_enabled(target_hidden.device.type):   # autocast casts inside fc itself
            target_hidden = target_hidden.to(self.fc.weight.dtype)
        return self.hidden_norm(self.fc(target_hidden))

    def forward(self, target_hidden: torch.Tensor, block_ids: torch.Tensor, anchors: torch.Tensor,
                *, backend: str = "auto") -> torch.Tensor:
        """
        target_hidden [b, S, K*H]  target features at positions 0..S-1 (padded)
        block_ids     [b, N*B]     per block: [token at anchor, MASK x (B-1)]
        anchors       [b, N]       block j sits at positions anchor_j .. anchor_j+B-1; < 0: padding block
        returns       [b, N*B, H]  final-normed hidden; lm_head of slot k predicts the token at anchor+k
        """
        if self.embed_tokens is None:
            raise RuntimeError("attach_target(embed_tokens, lm_head) before forward")
        B = block_ids.shape[1] // anchors.shape[1]
        b, S, _ = target_hidden.shape
        ctx = self.project_context(target_hidden)                                        # [b, S, H]
        ctx_pos = torch.arange(S, device=ctx.device).expand(b, S)
        block_pos = (anchors.clamp(min=0)[:, :, None] + torch.arange(B, device=anchors.device)).reshape(b, -1)
        ctx_cos, ctx_sin = rope_cos_sin(ctx_pos, self.cfg)
        blk_cos, blk_sin = rope_cos_sin(block_pos, self.cfg)

        h = F.embedding(block_ids, self.embed_tokens).to(ctx.dtype)                     # [b, NB, H]
        for layer in self.layers:
            attn = layer.self_attn
            ctx_k, ctx_v = attn.context_kv(ctx, ctx_cos, ctx_sin)
            h = h + attn(layer.input_layernorm(h), blk_cos, blk_sin, ctx_k, ctx_v, anchors, B, backend)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.to(hidden.dtype))

    # ---- export ----
    def export_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}

    def export(self, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write config.json + model.safetensors that SGLang's DFlashDraftModel loads as-is.
        Each file is written to a temp name, fsynced and renamed; weights before config. config.json records
        the target features the draft learned (sglang_ext.target_features, trainer.draft_kind)."""
        from safetensors.torch import save
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = with_target_features(self.cfg.to_dict())          # trained on our pre-deepstack captures
        cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")   # not kept in DraftConfig
        blob = save(self.export_state_dict(dtype), metadata={"format": "pt"})
        atomic_write_bytes(out_dir / WEIGHTS_NAME, blob, mode=0o644)
        atomic_write_bytes(out_dir / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
                           mode=0o644)
        return out_dir


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DraftConfig", "DFlashDraft", "default_target_layer_ids", "rope_cos_sin", "apply_rope",
           "CONFIG_NAME", "WEIGHTS_NAME", "param_count"]
