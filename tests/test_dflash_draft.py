"""The training draft against SGLang's own DFlashDraftModel (CPU, no server, no distributed init):
exported names load into every SGLang parameter, and SGLang's forward, fed the context K/V exactly as
its DFlash worker materialises them, matches ours. Then: a tiny finetune run that exports and reloads.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from trainer.dflash_draft import DFlashDraft, DraftConfig, default_target_layer_ids
from trainer.objective import build_blocks
from support.sglang_cpu import sglang_cpu
from support.synthetic import synthetic_records, tiny_draft_config, write_tiny_target

STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


# ---- SGLang on CPU ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sgl():
    import sglang  # noqa: F401  (a dependency: a broken install must fail, not skip)
    from transformers import AutoConfig
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.models.dflash import DFlashDraftModel
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.layers.radix_attention import AttentionType
    return SimpleNamespace(AutoConfig=AutoConfig, rope_base=rope_base, DFlashDraftModel=DFlashDraftModel,
                           get_parallel=get_parallel, AttentionType=AttentionType)


def load_into_sglang(sgl, export_dir):
    """Build SGLang's DFlashDraftModel from the exported config.json, load the exported tensors with its
    own load_weights, and check every parameter was written with exactly our values."""
    hf_config = sgl.AutoConfig.from_pretrained(str(export_dir))
    exported = load_file(str(export_dir / "model.safetensors"))
    with sglang_cpu():
        model = sgl.DFlashDraftModel(hf_config).float()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for p in params.values():
                p.fill_(float("nan"))
        model.load_weights(list(exported.items()))
    expected: dict[str, list] = {}
    for name, t in exported.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[-2] in STACKED:
            fused, idx = STACKED[parts[-2]]
            expected.setdefault(".".join(parts[:-2] + [fused, parts[-1]]), []).append((idx, t))
        else:
            expected[name] = [(0, t)]
    assert set(expected) == set(params), (sorted(set(expected) ^ set(params)))
    for name, pieces in expected.items():
        want = torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])]).float()
        assert not torch.isnan(params[name]).any(), f"SGLang parameter {name} was not loaded"
        assert torch.equal(params[name].detach(), want), name
    return model, hf_config


class DenseBlockAttention(torch.nn.Module):
    """Stand-in for RadixAttention for ONE block: attends over the context K/V SGLang's worker wrote
    into the draft cache (positions < anchor) followed by the block's own K/V, non-causally."""

    def __init__(self, ctx_k, ctx_v, n_heads, n_kv_heads, head_dim):
        super().__init__()
        self.ctx_k, self.ctx_v, self.h, self.hkv, self.d = ctx_k, ctx_v, n_heads, n_kv_heads, head_dim

    def forward(self, q, k, v, forward_batch, **kw):
        T = q.shape[0]
        q = q.view(T, self.h, self.d).float()
        k = torch.cat([self.ctx_k, k.view(T, self.hkv, self.d)]).float().repeat_interleave(self.h // self.hkv, 1)
        v = torch.cat([self.ctx_v, v.view(T, self.hkv, self.d)]).float().repeat_interleave(self.h // self.hkv, 1)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.d), dim=-1)
        return torch.einsum("hqk,khd->qhd", p, v).reshape(T, -1)


def sglang_block_hidden(sgl, model, target_hidden, block_ids, anchor, embed):
    """SGLang's path for one block: project_target_hidden -> per layer kv_proj_only / apply_k_norm /
    apply_k_rope (as dflash_worker_v2._append_target_hidden_sequential) -> DFlashDraftModel.forward."""
    with torch.no_grad(), sglang_cpu():
        ctx = model.project_target_hidden(target_hidden[:anchor])
        ctx_pos = torch.arange(anchor)
        for layer in model.layers:
            attn = layer.self_attn
            k, v = attn.kv_proj_only(model.prepare_context_hidden_for_kv(layer, ctx))
            k = attn.apply_k_rope(ctx_pos, attn.apply_k_norm(k))
            attn.attn = DenseBlockAttention(k.view(-1, attn.num_kv_heads, attn.head_dim),
                                            v.view(-1, attn.num_kv_heads, attn.head_dim),
                                            attn.num_heads, attn.num_kv_heads, attn.head_dim)
        positions = torch.arange(anchor, anchor + len(block_ids))
        return model.forward(block_ids, positions, None, input_embeds=embed[block_ids]).hidden_states


def randomized_draft(cfg, seed=0):
    torch.manual_seed(seed)
    draft = DFlashDraft.from_scratch(cfg, seed=seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("norm.weight") else p * 5)
    return draft


VARIANTS = {
    "gqa-default-rope": dict(),
    "mha-linear-rope-gptj-bias": dict(num_key_value_heads=4, rope_type="linear", rope_factor=2.0,
                                      rope_theta=1_000_000.0, rope_is_neox_style=False, attention_bias=True),
    "partial-rotary": dict(rotary_dim=8, num_hidden_layers=3, target_layer_ids=[0, 1, 3]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_loads_into_sglang_and_forward_matches(sgl, tmp_path, variant):
    cfg = tiny_draft_config(hidden_size=64, vocab_size=300, block_size=4, **VARIANTS[variant])
    draft = randomized_draft(cfg)
    embed = torch.randn(300, 64)
    draft.attach_target(embed, torch.randn(300, 64))
    draft.export(tmp_path, dtype=torch.float32)
    model, hf_config = load_into_sglang(sgl, tmp_path)
    attn0 = model.layers[0].self_attn
    assert attn0.attn.attn_type == sgl.AttentionType.ENCODER_ONLY            # non-causal block, as trained
    assert attn0.rotary_emb.rotary_dim == (cfg.rotary_dim or cfg.head_dim)
    assert model.block_size == cfg.block_size and model.num_context_features == cfg.num_context_features

    S, B = 20, cfg.block_size
    target_hidden = torch.randn(S, cfg.num_context_features * 64)
    ids = torch.randint(0, 298, (1, S))
    anchors = torch.tensor([[1, 6, 13, 16]])
    blocks = build_blocks(ids, torch.ones(1, S, dtype=torch.bool), anchors, B, cfg.mask_token_id)
    with torch.no_grad():
        ours = draft(target_hidden[None], blocks.block_ids, anchors, backend="reference").view(4, B, -1)
    for j, anchor in enumerate(anchors[0].tolist()):
        theirs = sglang_block_hidden(sgl, model, target_hidden, blocks.block_ids.view(4, B)[j], anchor, embed)
        assert torch.allclose(ours[j], theirs, atol=2e-5, rtol=1e-5), \
            (variant, anchor, (ours[j] - theirs).abs().max().item())


def test_bf16_export_is_what_sglang_loads_and_what_we_reload(sgl, tmp_path):
    cfg = tiny_draft_config()
    draft = randomized_draft(cfg, seed=1)
    draft.export(tmp_path)                                     # default: bfloat16
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert set(exported) == set(draft.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in exported)   # the target's, never saved
    load_into_sglang(sgl, tmp_path)
    reloaded = DFlashDraft.from_pretrained(tmp_path)
    assert reloaded.cfg.to_dict() == cfg.to_dict()
    for name, p in draft.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p.to(torch.bfloat16).float()), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"target_layer_ids": [1, 2], "mask_token_id": 299}
    assert config["block_size"] == 4 and config["num_target_layers"] == 4 and config["dtype"] == "bfloat16"


def test_sglang_parses_our_config_like_we_do(sgl, tmp_path):
    from sglang.srt.speculative.dflash_utils import build_target_layer_ids, parse_dflash_draft_config
    cfg = tiny_draft_config(target_layer_ids=(0, 3), block_size=8, mask_token_id=123)
    randomized_draft(cfg).export(tmp_path)
    parsed = parse_dflash_draft_config(draft_hf_config=sgl.AutoConfig.from_pretrained(str(tmp_path)))
    assert parsed.block_size == 8 and parsed.mask_token_id == 123 and parsed.target_layer_ids == [0, 3]
    assert parsed.num_target_layers == 4 and parsed.num_hidden_layers == cfg.num_hidden_layers
    for L, n in [(36, 5), (64, 5), (28, 3), (48, 1), (8, 2)]:
        assert default_target_layer_ids(L, n) == build_target_layer_ids(L, n)


def test_published_style_config_parses():
    """A config in the layout of the published DFlash drafts (block_size top level, rope_theta, no
    target_layer_ids -> SGLang's default spread)."""
    published = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": 16,
        "dflash_config": {"mask_token_id": 151669}, "num_target_layers": 36, "hidden_size": 4096,
        "head_dim": 128, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": 5, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
        "max_position_embeddings": 40960, "vocab_size": 151936, "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * 5, "torch_dtype": "bfloat16", "auto_map": {"AutoModel": "x.y"},
    }
    cfg = DraftConfig.from_dict(published)
    assert cfg.target_layer_ids == [1, 9, 17, 25, 33] and cfg.block_size == 16 and cfg.mask_token_id == 151669
    assert cfg.rope_theta == 1e6 and cfg.rope_type == "default" and cfg.head_dim == 128
    out = cfg.to_dict()
    assert out["auto_map"] == {"AutoModel": "x.y"}                     # unknown keys carried through
    assert DraftConfig.from_dict(out) == cfg


@pytest.mark.parametrize("patch, message", [
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"use_gemma_norm": True}, "use_gemma_norm"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"dflash_config": {"mask_token_id": 5, "selector_rank": 8, "selector_top_k": 4}}, "selector_rank"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"architectures": ["DFlashLagunaForCausalLM"]}, "architectures"),
    ({"dflash_config": {"target_layer_ids": [1, 2]}}, "mask_token_id"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_or_incomplete_configs_fail_loudly(patch, message):
    d = tiny_draft_config().to_dict()
    d.update(patch)
    with pytest.raises(ValueError, match=message):
        DraftConfig.from_dict(d, source="draft.json")


def test_forward_shape_errors_are_clear():
    cfg = tiny_draft_config()
    draft = DFlashDraft.from_scratch(cfg, seed=0)
    with pytest.raises(RuntimeError, match="attach_target"):
        draft(torch.randn(1, 8, 128), torch.zeros(1, 4, dtype=torch.long), torch.tensor([[2]]))
    with pytest.raises(ValueError, match=r"\[vocab, 64\]"):
        draft.attach_target(torch.randn(300, 32), torch.randn(300, 32))
    with pytest.raises(ValueError, match="mask_token_id 299 is outside"):
        draft.attach_target(torch.randn(200, 64), torch.randn(200, 64))
    draft.attach_target(torch.randn(300, 64), torch.randn(300, 64))
    with pytest.raises(ValueError, match=r"K\*H = 2\*64"):
        draft(torch.randn(1, 8, 192), torch.zeros(1, 4, dtype=torch.long), torch.tensor([[2]]))


def test_tiny_finetune_decreases_loss_exports_and_reloads(sgl, tmp_path):
    from trainer.finetune import main
    from trainer.replay import ReplaySpec, write_replay
    from trainer.target import target_identity

    target = write_tiny_target(tmp_path / "target", hidden_size=64, num_layers=4, vocab_size=300)
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2), vocab_size=300, block_size=4)
    (tmp_path / "draft.json").write_text(json.dumps(cfg.to_dict()))
    write_replay(tmp_path / "replay", ReplaySpec(target_identity(target), (1, 2), 64, "bfloat16"),
                 synthetic_records(48, num_layers=2, hidden_size=64), max_shard_tokens=600)
    out = tmp_path / "out"
    result = main(["--replay", str(tmp_path / "replay"), "--target-model-path", str(target),
                   "--draft-config", str(tmp_path / "draft.json"), "--output", str(out),
                   "--max-steps", "40", "--lr", "3e-3", "--batch-size", "8", "--num-anchors", "8",
                   "--log-every", "10", "--no-progress", "--seed", "1"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [10, 20, 30, 40]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], [row["loss"] for row in log]
    assert log[-1]["accuracy"] > log[0]["accuracy"]
    assert result.steps == 40 and result.final_loss == log[-1]["loss"]

    reloaded = DFlashDraft.from_pretrained(out)                       # the export, bf16
    ckpt = DFlashDraft.from_pretrained(out / "checkpoints" / "step-00000040")   # fp32 training state
    assert reloaded.cfg.to_dict() == cfg.to_dict()
    for name, p in ckpt.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p.to(torch.bfloat16).float()), name
    assert not torch.equal(ckpt.fc.weight, DFlashDraft.from_scratch(cfg, seed=1).fc.weight)   # it trained
    load_into_sglang(sgl, out)


def test_staged_swap_equals_load_weights(sgl, tmp_path):
    """--online-train's staged swap (sglang_ext/online/swap/staging.py) into SGLang's DFlashDraftModel: every trained
    weight is placed (a block of rows of one SGLang parameter, q/k/v and gate/up stacked), and a new version
    copied through the staging buffers equals the same version loaded by SGLang's load_weights, in place."""
    from sglang_ext.online.swap.weight_slot import draft_layout
    from support.swap import assert_staged_swap_equals_load_weights
    from trainer.draft_kind import get_kind

    kind = get_kind("dflash")
    randomized_draft(tiny_draft_config()).export(tmp_path, dtype=torch.float32)
    live, _ = load_into_sglang(sgl, tmp_path)
    reference, _ = load_into_sglang(sgl, tmp_path)
    assert_staged_swap_equals_load_weights(kind, live, reference,
                                           draft_layout(tmp_path, exclude=kind.serving.fixed_weights),
                                           reference.load_weights)
