"""Layers the training-form drafts share with SGLang's: RMSNorm (fp32 statistics) and rotary embeddings
(SGLang's `get_rope` default / linear scaling, neox or interleaved pairs, partial rotary dims)."""
from __future__ import annotations

import torch
import torch.nn as nn


def parse_rope(text: dict, head_dim: int, source: str) -> tuple[float, str, float, int | None]:
    """(theta, type, linear factor, rotary_dim) with SGLang's `get_rope_config` + DFlashAttention rules.
    mRoPE sections are irrelevant: the draft always gets 1-D positions, where mRoPE == plain RoPE."""
    params = text.get("rope_parameters")
    if params is None:
        params = text.get("rope_scaling")
    theta = float((params or {}).get("rope_theta", text.get("rope_theta", 10000.0)))
    rotary_dim = None
    partial = float(text.get("partial_rotary_factor", 1.0))
    if params and "rope_dim" in params:
        rotary_dim, partial = int(params["rope_dim"]), 1.0
    if partial < 1.0:
        rotary_dim = int(head_dim * partial)
    if rotary_dim is not None and (rotary_dim > head_dim or rotary_dim % 2):
        raise ValueError(f"{source}: rotary dim {rotary_dim} invalid for head_dim {head_dim}")
    rope_type = (params or {}).get("rope_type", (params or {}).get("type", "default")) if params else "default"
    if rope_type in ("default", "mrope"):
        return theta, "default", 1.0, rotary_dim
    if rope_type == "linear":
        return theta, "linear", float(params.get("factor", 1.0)), rotary_dim
    raise ValueError(f"{source}: rope type {rope_type!r} not implemented in the training draft "
                     "(supported: default, linear)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] int -> cos, sin [..., rotary_dim // 2] fp32 (SGLang's cos_sin_cache rows). `cfg`: any draft
    config with head_dim, rotary_dim, rope_theta, rope_type and rope_factor."""
    rot = cfg.rotary_dim or cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=positions.device) / rot))
    t = positions.float()
    if cfg.rope_type == "linear":
        t = t / cfg.rope_factor
    freqs = t[..., None] * inv_freq                                   # [..., rot/2]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x [b, T, heads, D]; cos/sin [b, T, rot/2]. Rotates the first rot dims, passes the rest."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if neox:       # halves
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:          # interleaved pairs (GPT-J)
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out.to(x.dtype), x_pass], dim=-1)


class GatedMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) (SGLang stacks gate/up into gate_up_proj on load)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def init_from_scratch(model: nn.Module, std: float, seed: int | None = None) -> nn.Module:
    """Norm weights 1, biases 0, every other parameter N(0, std^2) (in named_parameters order, from `seed`)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def read_checkpoint(path, expected: dict, rename=lambda name: name, skip=(), what: str = "draft") -> dict:
    """The tensors of every *.safetensors in directory `path`, keyed by `rename(name)`, checked against
    `expected` (name -> tensor of the right shape): unexpected, mis-shaped and missing weights are errors naming
    the file and the weight; names in `skip` (after renaming) are ignored."""
    from pathlib import Path

    from safetensors import safe_open
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {what} directory {path}")
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                key = rename(name)
                if key in skip:
                    continue
                if key not in expected:
                    raise ValueError(f"{f}: unexpected weight {name!r} for this {what}")
                t = sf.get_tensor(name)
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise ValueError(f"{f}: weight {name!r} has shape {tuple(t.shape)}, config implies "
                                     f"{tuple(expected[key].shape)}")
                loaded[key] = t
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{path}: {what} weights missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return loaded
