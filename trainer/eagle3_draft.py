"""EAGLE3 draft, training form. One file, plain PyTorch.

Mirrors SGLang 0.5.23 `srt/models/llama_eagle3.py` `LlamaForCausalLMEagle3` (one decoder layer) in parameter
names and math. One draft step over a sequence (index i holds position i's state):

    target_hidden [S, K*Ht]   K aux target layers' outputs (eagle_config.eagle_aux_hidden_state_layer_ids),
                              concatenated in layer-id order
    h      = fc(target_hidden)                       step 0 (draft extend); step s > 0: the previous step's aux
    x      = cat(input_layernorm(embed(token)), hidden_norm(h))           [S, 2H]
    a      = o_proj(attention(RoPE(q_proj(x)), RoPE(k_proj(x)), v_proj(x)))   Llama attention, no q/k norm
    r      = a + h;    aux = mlp(post_attention_layernorm(r)) + r          aux feeds the next step (pre-norm)
    logits = lm_head(norm(aux))                      [S, Vd] over the draft vocabulary;
                                                     draft id d is target id d + d2t[d]

Which token and position a step sees (SGLang's EAGLE worker): step 0 is the draft extend, where index i holds
target feature h_i with the NEXT token x_{i+1} (input ids rotated left by one) at RoPE position i, and
predicts x_{i+2}; step s holds x_{i+1+s} at position i+s, attends to step-0 keys of indices <= i and to its
own index's keys of steps 1..s (spec_kernels.eagle3_attention), and predicts x_{i+2+s}.

Weights (what `export` writes and SGLang's `load_weights` consumes; q/k/v and gate/up are stacked on load,
"midlayer" is read as layers.0):
    fc.weight [H, K*Ht]   norm.weight [H]   lm_head.weight [Vd, H]   d2t [Vd] int64   t2d [V] bool
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [H]
    midlayer.self_attn.{q,k,v}_proj.weight [*, 2H]   midlayer.self_attn.o_proj.weight [H, heads*D]
    midlayer.mlp.{gate,up,down}_proj.weight
The target's embed_tokens is a frozen non-persistent buffer (SGLang gives the draft the target's:
`set_embed`); so are the target's final norm and lm_head, which the objective uses for the target's
next-token distribution.
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

from spec_kernels.eagle3_attention import eagle3_ttt_attention
from trainer.draft_kind import read_draft_config, with_target_features, without_target_features
from trainer.fsutil import atomic_write_bytes
from trainer.layers import (GatedMLP, RMSNorm, apply_rope, init_from_scratch, parse_rope, read_checkpoint,
                            rope_cos_sin)

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LAYER_PREFIX = "midlayer."           # the published EAGLE3 checkpoints' name for the one decoder layer

_OWN_KEYS = {
    "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "draft_vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "partial_rotary_factor", "rope_is_neox_style", "max_position_embeddings", "attention_bias",
    "initializer_range", "eagle_config", "num_target_layers", "target_hidden_size", "block_size", "hidden_act",
    "tie_word_embeddings", "dtype", "torch_dtype", "model_type",
}


def default_aux_layer_ids(num_target_layers: int) -> list[int]:
    """SGLang's default EAGLE3 capture for Qwen3-VL (`set_eagle3_layers_to_capture(None)`): the residual
    entering layers 2, L//2 and L-3, i.e. the outputs of layers 1, L//2 - 1 and L - 4."""
    L = num_target_layers
    ids = [1, L // 2 - 1, L - 4]
    if len(set(ids)) != 3 or min(ids) < 0:
        raise ValueError(f"SGLang's default EAGLE3 aux layers {ids} are not 3 distinct layers for a {L}-layer "
                         "target; set eagle_config.eagle_aux_hidden_state_layer_ids")
    return ids


@dataclass
class Eagle3Config:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                         # the target's
    draft_vocab_size: int                   # rows of the draft's lm_head (== vocab_size: full vocabulary)
    aux_layer_ids: list[int]                # target layers whose outputs feed fc
    num_target_layers: int
    target_hidden_size: int | None = None   # None: hidden_size
    block_size: int = 4                     # tokens per verify step of a chain (bonus + proposals)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rotary_dim: int | None = None
    rope_is_neox_style: bool = True
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_width(self) -> int:
        return self.target_hidden_size or self.hidden_size

    @property
    def feature_layer_ids(self) -> list[int]:
        """What a capture records for training: the aux layers, then the target's last layer (whose output,
        through the target's final norm and lm_head, gives the target's next-token distribution)."""
        return list(self.aux_layer_ids) + [self.num_target_layers - 1]

    # ---- config.json <-> Eagle3Config ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "draft config") -> "Eagle3Config":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or []
        if ARCHITECTURE not in archs:
            raise ValueError(f"{source}: architectures={archs} is not [{ARCHITECTURE!r}]")

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ValueError(f"{source}: missing required key {key!r}")
            return d[key]

        if int(d.get("num_hidden_layers", 1)) != 1:
            raise ValueError(f"{source}: num_hidden_layers={d['num_hidden_layers']}; the EAGLE3 training form has "
                             "one decoder layer")
        if d.get("tie_word_embeddings"):
            raise ValueError(f"{source}: tie_word_embeddings=true (a draft lm_head shared with the embedding) is "
                             "not supported")
        for key in ("fc_norm", "use_aux_norm", "norm_before_fc", "norm_output"):
            if d.get(key) or (d.get("eagle_config") or {}).get(key):
                raise ValueError(f"{source}: {key}=true is an EAGLE3 variant this training form does not implement")
        hidden, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = int(d.get("head_dim") or hidden // n_heads)
        vocab = int(need("vocab_size"))
        eagle = d.get("eagle_config") or {}
        num_target = d.get("num_target_layers")
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        if ids is None:
            if num_target is None:
                raise ValueError(f"{source}: needs eagle_config.eagle_aux_hidden_state_layer_ids (or "
                                 "num_target_layers for SGLang's default)")
            ids = default_aux_layer_ids(int(num_target))
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{source}: eagle_aux_hidden_state_layer_ids must be distinct ints, got {ids!r}")
        num_target = int(num_target) if num_target is not None else max(ids) + 2
        if not all(0 <= i < num_target - 1 for i in ids):
            raise ValueError(f"{source}: aux layer ids {ids} out of range for num_target_layers={num_target}")
        rope_theta, rope_type, rope_factor, rotary_dim = parse_rope(d, head_dim, source)
        extra = {k: v for k, v in without_target_features(d, source).items() if k not in _OWN_KEYS}
        extra_eagle = {k: v for k, v in eagle.items() if k != "eagle_aux_hidden_state_layer_ids"}
        if extra_eagle:
            extra["eagle_config"] = extra_eagle
        return cls(hidden_size=hidden, num_attention_heads=n_heads,
                   num_key_value_heads=int(d.get("num_key_value_heads") or n_heads), head_dim=head_dim,
                   intermediate_size=int(need("intermediate_size")), vocab_size=vocab,
                   draft_vocab_size=int(d.get("draft_vocab_size") or vocab), aux_layer_ids=[int(i) for i in ids],
                   num_target_layers=num_target, target_hidden_size=d.get("target_hidden_size"),
                   block_size=int(d.get("block_size", 4)), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   rope_theta=rope_theta, rope_type=rope_type, rope_factor=rope_factor, rotary_dim=rotary_dim,
                   rope_is_neox_style=bool(d.get("rope_is_neox_style", True)),
                   max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                   attention_bias=bool(d.get("attention_bias", False)),
                   initializer_range=float(d.get("initializer_range", 0.02)), extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Eagle3Config":
        d, where = read_draft_config(path)
        return cls.from_dict(d, source=where)

    @classmethod
    def for_target(cls, target_config: dict, *, block_size: int, aux_layer_ids: list[int] | None = None,
                   draft_vocab_size: int | None = None, num_heads: int | None = None, num_kv_heads: int | None = None,
                   head_dim: int | None = None, intermediate_size: int | None = None,
                   rope_theta: float | None = None) -> "Eagle3Config":
        """A new draft for a target (its config.json dict; text_config read when nested)."""
        text = target_config.get("text_config", target_config)
        L, vocab = int(text["num_hidden_layers"]), int(text["vocab_size"])
        n_heads = int(num_heads or text["num_attention_heads"])
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        return cls(hidden_size=int(text["hidden_size"]), num_attention_heads=n_heads,
                   num_key_value_heads=int(num_kv_heads or text.get("num_key_value_heads") or n_heads),
                   head_dim=int(head_dim or text.get("head_dim") or text["hidden_size"] // n_heads),
                   intermediate_size=int(intermediate_size or text["intermediate_size"]), vocab_size=vocab,
                   draft_vocab_size=int(draft_vocab_size or vocab),
                   aux_layer_ids=list(aux_layer_ids or default_aux_layer_ids(L)), num_target_layers=L,
                   block_size=int(block_size), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                   rope_theta=float(rope_theta or rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
                   max_position_embeddings=int(text.get("max_position_embeddings", 32768)))

    def to_dict(self) -> dict:
        """config.json in the layout SGLang's LlamaForCausalLMEagle3 (a LlamaConfig) parses."""
        d = dict(self.extra)
        eagle = dict(d.pop("eagle_config", {}) or {})
        eagle["eagle_aux_hidden_state_layer_ids"] = list(self.aux_layer_ids)
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        d.update({
            "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": self.hidden_size,
            "num_hidden_layers": 1, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "hidden_act": "silu", "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_parameters": rope, "rope_is_neox_style": self.rope_is_neox_style,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": self.attention_bias,
            "initializer_range": self.initializer_range, "tie_word_embeddings": False,
            "num_target_layers": self.num_target_layers, "block_size": self.block_size, "eagle_config": eagle,
        })
        if self.rotary_dim is not None and self.rotary_dim != self.head_dim:
            d["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.target_hidden_size is not None:
            d["target_hidden_size"] = self.target_hidden_size
        return d


# ---- layers ----------------------------------------------------------------------------------------------

class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.q_proj = nn.Linear(2 * H, self.n_heads * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(2 * H, self.n_kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(2 * H, self.n_kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=cfg.attention_bias)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, S, 2H] -> q [b, Hq, S, D], k, v [b, Hkv, S, D] (RoPE applied to q and k)."""
        b, S, _ = x.shape
        neox = self.cfg.rope_is_neox_style
        q = apply_rope(self.q_proj(x).view(b, S, self.n_heads, self.head_dim), cos, sin, neox)
        k = apply_rope(self.k_proj(x).view(b, S, self.n_kv_heads, self.head_dim), cos, sin, neox)
        v = self.v_proj(x).view(b, S, self.n_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)


# ---- the draft -------------------------------------------------------------------------------------------

class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_width, H, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        # the draft vocabulary, saved with the draft (identity when draft_vocab_size == vocab_size)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.set_draft_vocab(torch.arange(cfg.draft_vocab_size))
        # the target's, frozen: buffers so optimizers and state_dict() never see them
        self.register_buffer("embed_tokens", None, persistent=False)       # [V, Ht]
        self.register_buffer("target_lm_head", None, persistent=False)     # [V, Ht]
        self.register_buffer("target_norm", None, persistent=False)        # [Ht] final RMSNorm weight
        self.target_norm_eps = cfg.rms_norm_eps

    # ---- construction ----
    @classmethod
    def from_scratch(cls, cfg: Eagle3Config, seed: int | None = None) -> "Eagle3Draft":
        return init_from_scratch(cls(cfg), cfg.initializer_range, seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: Eagle3Config | None = None) -> "Eagle3Draft":
        """Load config.json + *.safetensors written by `export` (or a published EAGLE3 draft: "layers.0." or
        "midlayer.", with or without "model.", a shipped copy of the target's embed_tokens ignored)."""
        cfg = cfg or Eagle3Config.from_json(path)
        model = cls(cfg)
        loaded = read_checkpoint(path, dict(model.state_dict()), skip=("embed_tokens.weight",), what="EAGLE3 draft",
                                 rename=lambda n: n.removeprefix("model.").replace("layers.0.", LAYER_PREFIX))
        model.load_state_dict({k: v if k in ("d2t", "t2d") else v.float() for k, v in loaded.items()}, strict=True)
        return model

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """The draft vocabulary: target token ids [draft_vocab_size], ascending -> d2t / t2d."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).flatten()
        if ids.numel() != self.cfg.draft_vocab_size or (ids[1:] <= ids[:-1]).any() or ids.min() < 0 \
                or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"draft vocabulary must be {self.cfg.draft_vocab_size} ascending distinct target ids "
                             f"in [0, {self.cfg.vocab_size})")
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_to_target(self) -> torch.Tensor:
        """[Vd] target token id of each draft id (SGLang's hot_token_id)."""
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def attach_target(self, embed_tokens: torch.Tensor, lm_head: torch.Tensor, final_norm: torch.Tensor | None = None,
                      final_norm_eps: float | None = None) -> None:
        """The target's frozen embedding [V, Ht], lm_head [V, Ht] and final RMSNorm weight [Ht] (the last two
        give the target's next-token distribution the objective matches)."""
        Ht = self.cfg.hidden_size
        for name, w in (("embed_tokens", embed_tokens), ("lm_head", lm_head)):
            if w.ndim != 2 or w.shape[1] != Ht or w.shape[0] != self.cfg.vocab_size:
                raise ValueError(f"target {name} has shape {tuple(w.shape)}; the draft needs "
                                 f"[{self.cfg.vocab_size}, {Ht}]")
        device = self.fc.weight.device
        self.embed_tokens = embed_tokens.detach().to(device)
        self.target_lm_head = lm_head.detach().to(device)
        if final_norm is not None:
            self.target_norm = final_norm.detach().to(device)
        if final_norm_eps is not None:
            self.target_norm_eps = float(final_norm_eps)

    # ---- forward ----
    def project(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """aux target features [b, S, K*Ht] -> h [b, S, H] (SGLang applies fc when the width differs from H)."""
        if target_hidden.shape[-1] != self.fc.in_features:
            raise ValueError(f"target_hidden last dim {target_hidden.shape[-1]} != K*Ht = {self.fc.in_features} "
                             f"(aux layers {self.cfg.aux_layer_ids})")
        if not torch.is_autocast_enabled(target_hidden.device.type):
            target_hidden = target_hidden.to(self.fc.weight.dtype)
        return self.fc(target_hidden)

    def step(self, h: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor, cache: list, *,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """One unrolled step: h [b, S, H] (fc output or the previous step's aux), token_ids / positions [b, S].
        `cache` holds (k, v) of the earlier steps and gets this step's appended. -> (aux, normed) [b, S, H]."""
        if self.embed_tokens is None:
            raise RuntimeError("attach_target(...) before forward")
        layer = self.midlayer
        cos, sin = rope_cos_sin(positions, self.cfg)
        embeds = F.embedding(token_ids, self.embed_tokens).to(h.dtype)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(h)], dim=-1)
        attn = layer.self_attn
        q, k, v = attn.qkv(x, cos, sin)
        cache.append((k, v))
        keys = torch.cat([k_ for k_, _ in cache], dim=2)                      # [b, Hkv, steps*S, D]
        values = torch.cat([v_ for _, v_ in cache], dim=2)
        out = eagle3_ttt_attention(q, keys.to(q.dtype), values.to(q.dtype), scale=attn.head_dim ** -0.5,
                                   backend=backend)                             # [b, Hq, S, D]
        b, _, S, _ = out.shape
        r = attn.o_proj(out.transpose(1, 2).reshape(b, S, -1)) + h
        aux = layer.mlp(layer.post_attention_layernorm(r)) + r
        return aux, self.norm(aux)

    def forward(self, target_hidden: torch.Tensor, input_ids: torch.Tensor, n_steps: int = 1, *,
                backend: str = "auto") -> list[torch.Tensor]:
        """
        target_hidden [b, S, K*Ht]  aux features of positions 0..S-1;  input_ids [b, S] (NOT rotated)
        returns       n_steps x [b, S, H] normed hidden: step s at index i predicts the token at i+2+s
        (lm_head over the draft vocabulary). Indices past the end see token 0 (pad; out of any loss).
        """
        b, S = input_ids.shape
        h = self.project(target_hidden)
        base = torch.arange(S, device=input_ids.device).expand(b, S)
        cache: list = []
        outs = []
        for s in range(n_steps):
            tokens = torch.zeros_like(input_ids)
            tokens[:, :S - 1 - s] = input_ids[:, 1 + s:] if S - 1 - s > 0 else tokens[:, :0]
            h, normed = self.step(h, tokens, base + s, cache, backend=backend)
            outs.append(normed)
        return outs

    # ---- serving-order inference (the offline evaluator): a draft extend, then decode steps ----
    @torch.no_grad()
    def extend(self, target_hidden: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        """SGLang's draft extend over positions 0..S-1: target_hidden [S, K*Ht], token_ids [S] (already rotated:
        index i holds x_{i+1}). -> (aux [S, H], normed [S, H], keys [Hkv, S, D], values) for later decode steps."""
        S = token_ids.shape[0]
        cache: list = []
        aux, normed = self.step(self.project(target_hidden[None]), token_ids[None], torch.arange(S)[None].to(
            token_ids.device), cache, backend="reference")
        k, v = cache[0]
        return aux[0], normed[0], k[0], v[0]

    @torch.no_grad()
    def decode(self, h: torch.Tensor, token: int, position: int, keys: torch.Tensor, values: torch.Tensor):
        """One draft decode step for one position: h [H] (the previous step's aux), attending to `keys` /
        `values` [Hkv, n, D] (the extend's keys of the committed positions, then earlier decode steps' keys).
        -> (aux [H], normed [H], keys, values with this step's appended)."""
        layer, attn = self.midlayer, self.midlayer.self_attn
        pos = torch.tensor([[position]], device=h.device)
        cos, sin = rope_cos_sin(pos, self.cfg)
        tok = torch.tensor([[token]], device=h.device)
        x = torch.cat([layer.input_layernorm(F.embedding(tok, self.embed_tokens).to(h.dtype)),
                       layer.hidden_norm(h[None, None])], dim=-1)
        q, k, v = attn.qkv(x, cos, sin)                                          # [1, H*, 1, D]
        keys, values = torch.cat([keys, k[0]], dim=1), torch.cat([values, v[0]], dim=1)
        out = F.scaled_dot_product_attention(q, keys[None].to(q.dtype), values[None].to(q.dtype),
                                             scale=attn.head_dim ** -0.5,
                                             enable_gqa=attn.n_heads != attn.n_kv_heads)     # [1, Hq, 1, D]
        r = attn.o_proj(out.reshape(1, -1))[0] + h
        aux = layer.mlp(layer.post_attention_layernorm(r)) + r
        return aux, self.norm(aux), keys, values

    def propose(self, normed: torch.Tensor) -> int:
        """Greedy proposal (a target token id) from a normed hidden [H]."""
        return int(self.draft_to_target[self.logits(normed).argmax(-1)])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., H] -> draft-vocabulary logits [..., Vd]."""
        return F.linear(normed, self.lm_head.weight.to(normed.dtype))

    def target_logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The target's logits [..., V] from its last layer's output [..., Ht] (final norm + lm_head)."""
        if self.target_norm is None or self.target_lm_head is None:
            raise RuntimeError("attach_target(..., final_norm=...) before the target distribution is needed")
        x = final_hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.target_norm_eps) * self.target_norm.float()
        return F.linear(x, self.target_lm_head.float())

    # ---- export ----
    def export_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", v.dtype if k in ("d2t", "t2d") else dtype).contiguous()
                for k, v in self.state_dict().items()}

    def export(self, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write config.json + model.safetensors that SGLang's LlamaForCausalLMEagle3 loads as-is. config.json
        records the target features the draft learned (sglang_ext.target_features, trainer.draft_kind)."""
        from safetensors.torch import save
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = with_target_features(self.cfg.to_dict())          # trained on our pre-deepstack captures
        cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        blob = save(self.export_state_dict(dtype), metadata={"format": "pt"})
        atomic_write_bytes(out_dir / WEIGHTS_NAME, blob, mode=0o644)
        atomic_write_bytes(out_dir / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
                           mode=0o644)
        return out_dir


def draft_vocab_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The `draft_vocab_size` most frequent target ids (ties: the lower id), ascending. counts [V]."""
    if draft_vocab_size > counts.numel():
        raise ValueError(f"draft_vocab_size {draft_vocab_size} > vocabulary size {counts.numel()}")
    order = sorted(range(counts.numel()), key=lambda t: (-float(counts[t]), t))
    return torch.tensor(sorted(order[:draft_vocab_size]), dtype=torch.long)
