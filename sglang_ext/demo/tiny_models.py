"""Tiny Qwen3-VL targets and DFlash drafts, built offline (no hub) for tests and benchmarks.

    build_tokenizer_dir(out)                      byte-level BPE + Qwen special tokens + chat template
    build_tiny_qwen3_vl(out, variant="dense"|"moe", kind="copy"|"random")
    build_tiny_dflash_draft(target_dir, out, kind="copy"|"random")
    tiny_models(cache_dir) -> TinyModels          all of the above, cached by a hash of their recipe

Both SGLang (0.5.23) and HF transformers load the target directories. Vocabulary layout:

    [0, n_text)                 BPE tokens (byte alphabet + merges) trained on local stdlib text
    [n_text, n_text + 7)        <|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|>
                                <|image_pad|> <|video_pad|>
    [n_text + 7, vocab_size)    spare ids never produced by the tokenizer; the DFlash mask token is one

kind="copy" targets are random Qwen3-VL decoders whose embedding and lm_head are hand-set so that greedy
decoding mostly follows a successor rule (after text token t comes t+1), while the (random, scaled-up)
decoder layers - and so the image - break the rule now and then. The matching "copy" draft is a
one-layer DFlash draft built by hand whose mask slots copy the bonus token's content, which the target's
lm_head turns into bonus+1: slot 1 is accepted whenever the target follows the rule, later slots are
rejected, so every verify step exercises SGLang's partial-accept path (accept length between 1 and 2).
kind="random" is plain random init.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.dflash_draft import default_target_layer_ids

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
N_TEXT_TOKENS = 512          # BPE vocabulary incl. the 256-byte alphabet
VOCAB_SIZE = 544             # model vocabulary: text + specials + 25 spare ids
MASK_TOKEN_ID = VOCAB_SIZE - 1

# The hand-built embedding layout of "copy" targets (hidden dims):
MASK_DIM = 0                 # large only for the mask token
TEXT_DIM = 1                 # constant for every non-mask token: lets the draft tell "token" from "mask"
CONTENT = slice(2, 66)       # 64 random dims that identify a token
FEATURE = slice(66, 130)     # where the hand-built draft's fc puts the target features
FEATURE_KEY_DIM = 5          # the draft key dim that reads them (no query reads it)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or part['type'] == 'video_url' -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TEXT_CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=4096,
                   hidden_act="silu", attention_bias=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                    "mrope_section": [12, 10, 10], "mrope_interleaved": True})
MOE_TEXT_CONFIG = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=192, decoder_sparse_step=1,
                       mlp_only_layers=[], norm_topk_prob=True)
VISION_CONFIG = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3, patch_size=16,
                     spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=256,
                     num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3], hidden_act="gelu_pytorch_tanh")
# Images are resized to at most 128x128 pixels: at most (128/32)^2 = 16 image tokens.
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 32 * 32, 128 * 128


def _stdlib_text(max_chars: int = 2_000_000) -> str:
    """Local training text for the tokenizer: Python stdlib sources and pydoc topics (English prose)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for rel in ["pydoc_data/topics.py", "argparse.py", "textwrap.py", "json/__init__.py", "dataclasses.py",
                "functools.py", "collections/__init__.py", "pathlib.py", "string.py", "difflib.py"]:
        path = root / rel
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no stdlib sources found under {root} to train the tiny tokenizer on")
    return "\n".join(parts)[:max_chars]


def build_tokenizer_dir(out: Path) -> None:
    """Train a byte-level BPE with Qwen's special tokens; save it with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N_TEXT_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    text = _stdlib_text()
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer=trainer)
    if tok.get_vocab_size() != N_TEXT_TOKENS:
        raise RuntimeError(f"tokenizer trained to {tok.get_vocab_size()} tokens, expected {N_TEXT_TOKENS}")
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(name) == N_TEXT_TOKENS + i, name


def special_id(name: str) -> int:
    return N_TEXT_TOKENS + SPECIAL_TOKENS.index(name)


def _hf_config(variant: str):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    text = dict(TEXT_CONFIG, vocab_size=VOCAB_SIZE, bos_token_id=special_id("<|endoftext|>"),
                eos_token_id=special_id("<|im_end|>"), tie_word_embeddings=False)
    common = dict(vision_config=dict(VISION_CONFIG), image_token_id=special_id("<|image_pad|>"),
                  video_token_id=special_id("<|video_pad|>"), vision_start_token_id=special_id("<|vision_start|>"),
                  vision_end_token_id=special_id("<|vision_end|>"), tie_word_embeddings=False)
    if variant == "dense":
        cfg = Qwen3VLConfig(text_config=text, **common)
        cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    elif variant == "moe":
        cfg = Qwen3VLMoeConfig(text_config=dict(text, **MOE_TEXT_CONFIG), **common)
        cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    else:
        raise ValueError(f"unknown tiny Qwen3-VL variant {variant!r}; expected 'dense' or 'moe'")
    cfg.eos_token_id = special_id("<|im_end|>")
    return cfg


def _save_processor(tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)


@torch.no_grad()
def _make_copy_target(model, seed: int, layer_gain: float) -> None:
    """Hand-set embed/lm_head so greedy decoding mostly emits last text token + 1 (see module doc)."""
    gen = torch.Generator().manual_seed(seed + 1)
    lm = model.model.language_model
    hidden = lm.config.hidden_size
    content = torch.randn(VOCAB_SIZE, CONTENT.stop - CONTENT.start, generator=gen)
    content = content / content.norm(dim=-1, keepdim=True) * math.sqrt(CONTENT.stop - CONTENT.start)
    embed = torch.zeros(VOCAB_SIZE, hidden)
    embed[:, CONTENT] = content
    embed[:, TEXT_DIM] = 1.0
    embed[MASK_TOKEN_ID] = 0.0
    embed[MASK_TOKEN_ID, MASK_DIM] = 8.0
    lm.embed_tokens.weight.copy_(embed)
    head = torch.zeros(VOCAB_SIZE, hidden)
    # lm_head row j holds the content of text token j-1: a hidden state that looks like token t scores t+1.
    pred = (torch.arange(N_TEXT_TOKENS) - 1) % N_TEXT_TOKENS
    head[:N_TEXT_TOKENS, CONTENT] = content[pred] / math.sqrt(CONTENT.stop - CONTENT.start)
    model.lm_head.weight.copy_(head * 4.0)
    # Scale the residual writes of every layer: larger gain -> the layers (and images) break "copy" more often.
    for layer in lm.layers:
        layer.self_attn.o_proj.weight.mul_(layer_gain)
        mlp = layer.mlp
        if hasattr(mlp, "down_proj"):
            mlp.down_proj.weight.mul_(layer_gain)
        else:  # MoE experts
            for name, p in mlp.named_parameters():
                if "down" in name:
                    p.mul_(layer_gain)


def _write_official_expert_layout(out: Path) -> None:
    """transformers 5.19 saves fused experts as [E, 2I, H] / [E, H, I] (its in-memory layout) but loads them
    transposed from the official Qwen3-VL-MoE layout [E, H, 2I] / [E, I, H], which SGLang reads. Write the
    official one. (moe_intermediate_size != hidden_size keeps the transposes unambiguous.)"""
    from safetensors.torch import load_file, save_file

    for path in out.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name in list(tensors):
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})


def build_tiny_qwen3_vl(out: Path, tokenizer_dir: Path, variant: str = "dense", kind: str = "copy",
                        seed: int = 0, layer_gain: float = 12.0) -> Path:
    """Write a tiny Qwen3-VL checkpoint (config, safetensors, tokenizer, processor) to `out`."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    if kind not in ("copy", "random"):
        raise ValueError(f"unknown tiny target kind {kind!r}; expected 'copy' or 'random'")
    cfg = _hf_config(variant)
    torch.manual_seed(seed)
    model_cls = Qwen3VLForConditionalGeneration if variant == "dense" else Qwen3VLMoeForConditionalGeneration
    model = model_cls(cfg).to(torch.float32).eval()
    if kind == "copy":
        _make_copy_target(model, seed, layer_gain)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if variant == "moe":
        _write_official_expert_layout(out)
    _save_processor(tokenizer_dir, out)
    gen_cfg = {"eos_token_id": special_id("<|im_end|>"), "pad_token_id": special_id("<|endoftext|>"),
               "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return out


def tiny_draft_config(target_config: dict, *, num_layers: int, block_size: int,
                      target_layer_ids: list[int] | None = None):
    """The DraftConfig of a tiny DFlash draft for a tiny target (its config.json dict): 4 heads of 64, 3 target
    layers by default, the spare MASK_TOKEN_ID."""
    from trainer.dflash_draft import DraftConfig

    text = target_config.get("text_config", target_config)
    layers = target_layer_ids or default_target_layer_ids(text["num_hidden_layers"], 3)
    return DraftConfig.for_target(target_config, num_layers=num_layers, block_size=block_size,
                                  mask_token_id=MASK_TOKEN_ID, target_layer_ids=list(layers), num_heads=4,
                                  num_kv_heads=4, head_dim=64, intermediate_size=512, rope_theta=1_000_000.0)


@torch.no_grad()
def _copy_draft_weights(cfg: dict) -> dict[str, torch.Tensor]:
    """One-layer DFlash draft that proposes bonus+1 in every mask slot (needs a "copy" target).

    Head 0 routes every mask query to the bonus token's key through the lowest-frequency RoPE pair (nearly
    position-independent); its value copies the bonus token's content dims back into the residual stream;
    the final norm keeps only the content dims, which the target's lm_head maps to the bonus token's
    successor. `fc` writes the target features into hidden dims no routing row reads (FEATURE dims), and
    one key dim (FEATURE_KEY_DIM, orthogonal to every query) reads them: the draft's context keys then
    depend on the target features, so tests can check which features fed the draft, without changing any
    proposal.
    """
    hidden, n_heads, n_kv, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inter, k_feats = cfg.intermediate_size, cfg.num_context_features
    n_content = CONTENT.stop - CONTENT.start
    assert n_content <= head_dim and n_kv >= 1
    route = head_dim // 2 - 1          # neox-style pair (route, route + head_dim/2) has the lowest frequency
    q = torch.zeros(n_heads * head_dim, hidden)
    k = torch.zeros(n_kv * head_dim, hidden)
    v = torch.zeros(n_kv * head_dim, hidden)
    o = torch.zeros(hidden, n_heads * head_dim)
    gen = torch.Generator().manual_seed(1234)
    k[FEATURE_KEY_DIM, FEATURE] = torch.randn(FEATURE.stop - FEATURE.start, generator=gen)
    fc = torch.zeros(hidden, k_feats * hidden)
    fc[FEATURE] = torch.randn(FEATURE.stop - FEATURE.start, k_feats * hidden, generator=gen) * 0.05
    q[route, MASK_DIM] = 1.0          # mask tokens query ...
    k[route, TEXT_DIM] = 1.0          # ... the one real token in the block (the bonus)
    v[torch.arange(n_content), torch.arange(CONTENT.start, CONTENT.stop)] = 1.0
    o[torch.arange(CONTENT.start, CONTENT.stop), torch.arange(n_content)] = 4.0
    norm = torch.zeros(hidden)
    norm[CONTENT] = 1.0
    p = "layers.0."
    return {
        p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
        p + "self_attn.o_proj.weight": o,
        p + "self_attn.q_norm.weight": torch.full((head_dim,), 3.0),
        p + "self_attn.k_norm.weight": torch.full((head_dim,), 3.0),
        p + "mlp.gate_proj.weight": torch.zeros(inter, hidden), p + "mlp.up_proj.weight": torch.zeros(inter, hidden),
        p + "mlp.down_proj.weight": torch.zeros(hidden, inter),
        p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": norm,
        "fc.weight": fc,
        "hidden_norm.weight": torch.ones(hidden),
    }


def _random_draft_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, n_heads, n_kv, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inter, k_feats = cfg.intermediate_size, cfg.num_context_features

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    weights = {"norm.weight": torch.ones(hidden), "fc.weight": rnd(hidden, k_feats * hidden),
               "hidden_norm.weight": torch.ones(hidden)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": rnd(n_heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rnd(n_kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": rnd(n_kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, n_heads * head_dim),
            p + "self_attn.q_norm.weight": torch.ones(head_dim), p + "self_attn.k_norm.weight": torch.ones(head_dim),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    return weights


def build_tiny_dflash_draft(target_dir: Path, out: Path, kind: str = "copy", block_size: int = 4,
                            num_layers: int | None = None, target_layer_ids: list[int] | None = None,
                            seed: int = 0) -> Path:
    """Write a DFlash draft checkpoint (config.json + model.safetensors, float32) for the target at `target_dir`."""
    from trainer.dflash_draft import DFlashDraft

    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    if kind == "copy":
        num_layers = 1
    elif kind != "random":
        raise ValueError(f"unknown tiny draft kind {kind!r}; expected 'copy' or 'random'")
    cfg = tiny_draft_config(target_config, num_layers=num_layers or 2, block_size=block_size,
                            target_layer_ids=target_layer_ids)
    weights = _copy_draft_weights(cfg) if kind == "copy" else _random_draft_weights(cfg, seed)
    draft = DFlashDraft(cfg)
    draft.load_state_dict(weights, strict=True)
    return draft.export(out, dtype=torch.float32)


@dataclass(frozen=True)
class TinyModels:
    tokenizer: Path
    dense: Path           # "copy" dense Qwen3-VL target
    moe: Path             # "copy" MoE Qwen3-VL target
    dense_random: Path    # plain random dense target
    draft_dense: Path     # hand-built "copy" DFlash draft for `dense` (block size 4)
    draft_moe: Path       # the same for `moe`
    draft_random: Path    # random 2-layer DFlash draft for `dense`


def _recipe_hash() -> str:
    src = inspect.getsource(inspect.getmodule(_recipe_hash))
    import tokenizers
    import transformers
    return hashlib.sha256(f"{src}|{transformers.__version__}|{tokenizers.__version__}".encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGLANG_EXT_CACHE", Path.home() / ".cache" / "sglang_ext"))


def tiny_models(cache_dir: Path | None = None) -> TinyModels:
    """Build (once, cached by a hash of this file's recipe) every tiny model the tests use."""
    root = (cache_dir or default_cache_dir()) / f"tiny-{_recipe_hash()}"
    models = TinyModels(tokenizer=root / "tokenizer", dense=root / "qwen3vl-dense", moe=root / "qwen3vl-moe",
                        dense_random=root / "qwen3vl-dense-random", draft_dense=root / "dflash-dense",
                        draft_moe=root / "dflash-moe", draft_random=root / "dflash-random")
    if (root / "DONE").exists():
        return models
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t = TinyModels(**{k: tmp / Path(v).name for k, v in models.__dict__.items()})
    build_tokenizer_dir(t.tokenizer)
    build_tiny_qwen3_vl(t.dense, t.tokenizer, "dense", "copy")
    build_tiny_qwen3_vl(t.moe, t.tokenizer, "moe", "copy")
    build_tiny_qwen3_vl(t.dense_random, t.tokenizer, "dense", "random")
    build_tiny_dflash_draft(t.dense, t.draft_dense, "copy")
    build_tiny_dflash_draft(t.moe, t.draft_moe, "copy")
    build_tiny_dflash_draft(t.dense_random, t.draft_random, "random")
    (tmp / "DONE").write_text("ok\n")
    try:
        tmp.rename(root)
    except OSError:          # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return models


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build the tiny Qwen3-VL targets and DFlash drafts used by tests.")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where to build (default ~/.cache/sglang_ext)")
    m = tiny_models(ap.parse_args().cache_dir)
    print(json.dumps({k: str(v) for k, v in m.__dict__.items()}, indent=2))
