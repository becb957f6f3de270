"""The EAGLE3 draft kind, offline: the training-form draft against SGLang's LlamaForCausalLMEagle3 (weights and
forward, draft extend and a decode step), the training-time-test objective against an independent per-step
computation (and through the Triton kernel), the draft vocabulary, and finetune from an EAGLE3 config."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from support.synthetic import write_tiny_target
from support.sglang_cpu import sglang_cpu
from trainer.draft_kind import get_kind, kind_for_draft
from trainer.eagle3_draft import Eagle3Config, Eagle3Draft, default_aux_layer_ids, draft_vocab_from_counts
from trainer.eagle3_objective import eagle3_loss
from trainer.layers import apply_rope, rope_cos_sin

KIND = get_kind("eagle3")
H, V, VD, L = 64, 300, 120, 6


def make_cfg(**kw) -> Eagle3Config:
    base = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                vocab_size=V, draft_vocab_size=VD, aux_layer_ids=[1, 2, 3], num_target_layers=L,
                rope_theta=10000.0, block_size=4)
    base.update(kw)
    return Eagle3Config(**base)


def randomized(cfg, seed=0) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft.from_scratch(cfg, seed=seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("norm.weight") else p * 5)
    vocab = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:cfg.draft_vocab_size].sort().values
    draft.set_draft_vocab(vocab)
    g = torch.Generator().manual_seed(seed + 1)
    draft.attach_target(torch.randn(V, H, generator=g), torch.randn(V, H, generator=g) * 0.3,
                        torch.rand(H, generator=g) + 0.5, 1e-6)
    return draft


# ---- config --------------------------------------------------------------------------------------------

def test_config_round_trip_and_defaults(tmp_path):
    cfg = make_cfg()
    again = Eagle3Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.feature_layer_ids == [1, 2, 3, L - 1]
    assert default_aux_layer_ids(36) == [1, 17, 32]          # SGLang's capture points 2, L//2, L-3, minus one
    with pytest.raises(ValueError, match="not 3 distinct layers"):
        default_aux_layer_ids(6)                              # SGLang's default duplicates for a 6-layer target
    d = cfg.to_dict()
    for patch, message in ((dict(num_hidden_layers=2), "one decoder layer"),
                           (dict(tie_word_embeddings=True), "tie_word_embeddings"),
                           (dict(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 1, 2]}), "distinct"),
                           (dict(fc_norm=True), "fc_norm"),
                           (dict(architectures=["LlamaForCausalLM"]), "is not")):
        with pytest.raises(ValueError, match=message):
            Eagle3Config.from_dict({**d, **patch})
    draft_dir = KIND.from_scratch(cfg, seed=0).export(tmp_path / "d", dtype=torch.float32)
    assert kind_for_draft(draft_dir) is KIND and KIND.load_config(draft_dir) == cfg


def test_draft_vocabulary():
    counts = torch.zeros(V, dtype=torch.long)
    counts[[7, 3, 250, 9]] = torch.tensor([5, 9, 9, 1])
    ids = draft_vocab_from_counts(counts, 4)
    assert ids.tolist() == [3, 7, 9, 250]
    draft = Eagle3Draft(make_cfg(draft_vocab_size=4))
    draft.set_draft_vocab(ids)
    assert draft.draft_to_target.tolist() == [3, 7, 9, 250] and draft.t2d.sum() == 4 and draft.t2d[250]
    with pytest.raises(ValueError, match="ascending distinct"):
        draft.set_draft_vocab(torch.tensor([3, 3, 9, 250]))


# ---- against SGLang ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sgl():
    import sglang.srt.models.llama_eagle3 as llama_eagle3
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
    from sglang.srt.runtime_context import get_parallel
    from transformers import AutoConfig
    return SimpleNamespace(le3=llama_eagle3, ParallelLMHead=ParallelLMHead,
                           get_parallel=get_parallel, AutoConfig=AutoConfig)


class CausalAttention(torch.nn.Module):
    """Stand-in for RadixAttention: the new tokens attend causally to `cached` K/V followed by their own."""

    def __init__(self, n_heads, n_kv_heads, head_dim, cached=None):
        super().__init__()
        self.h, self.hkv, self.d, self.cached = n_heads, n_kv_heads, head_dim, cached

    def forward(self, q, k, v, forward_batch, **kw):
        T = q.shape[0]
        k, v = k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d)
        self.last = (k, v)
        n_old = 0
        if self.cached is not None:
            n_old = self.cached[0].shape[0]
            k, v = torch.cat([self.cached[0], k]), torch.cat([self.cached[1], v])
        g = self.h // self.hkv
        scores = torch.einsum("qhd,khd->hqk", q.view(T, self.h, self.d).float(), k.repeat_interleave(g, 1).float())
        mask = torch.arange(k.shape[0])[None, :] <= (n_old + torch.arange(T))[:, None]
        p = torch.softmax(scores / math.sqrt(self.d) + torch.where(mask, 0.0, -math.inf), dim=-1)
        return torch.einsum("hqk,khd->qhd", p, v.repeat_interleave(g, 1).float()).reshape(T, -1)


def sglang_eagle3(sgl, export_dir):
    """SGLang's LlamaForCausalLMEagle3 parts (its LlamaModel + lm_head) with the exported weights loaded by its
    own load_weights. (The full class also builds a LogitsProcessor, which needs a running server's config.)"""
    hf = sgl.AutoConfig.from_pretrained(str(export_dir))
    pp = SimpleNamespace(rank_in_group=0, world_size=1, is_first_rank=True, is_last_rank=True)
    with sglang_cpu(), sgl.get_parallel().override(pp_group=pp):
        model = torch.nn.Module()
        model.model = sgl.le3.LlamaModel(hf).float()
        model.lm_head = sgl.ParallelLMHead(hf.draft_vocab_size, hf.hidden_size).float()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    sgl.le3.LlamaForCausalLMEagle3.load_weights(model, list(load_file(str(export_dir / "model.safetensors")).items()))
    return model, hf


def test_export_loads_into_sglang(sgl, tmp_path):
    draft = randomized(make_cfg())
    out = draft.export(tmp_path / "e3", dtype=torch.float32)
    names = set(load_file(str(out / "model.safetensors")))
    assert "d2t" in names and "t2d" in names and not any("embed_tokens" in n for n in names)
    model, _ = sglang_eagle3(sgl, out)
    params = dict(model.named_parameters())
    unloaded = sorted(n for n, p in params.items() if torch.isnan(p).any() and n != "model.embed_tokens.weight")
    assert not unloaded, unloaded                              # every SGLang parameter but the shared embedding
    ours = draft.state_dict()
    layer = "model.layers.0."
    assert torch.equal(params[layer + "self_attn.qkv_proj.weight"],
                       torch.cat([ours[f"midlayer.self_attn.{n}_proj.weight"] for n in "qkv"]))
    assert torch.equal(params[layer + "mlp.gate_up_proj.weight"],
                       torch.cat([ours["midlayer.mlp.gate_proj.weight"], ours["midlayer.mlp.up_proj.weight"]]))
    assert torch.equal(params["model.fc.weight"], ours["fc.weight"])
    head = params["lm_head.weight"]                            # SGLang pads the vocabulary rows (to 64s)
    assert torch.equal(head[:VD], ours["lm_head.weight"]) and not head[VD:].any()
    assert torch.equal(model.hot_token_id, draft.draft_to_target)   # SGLang's draft id -> target id map
    again = Eagle3Draft.from_pretrained(out)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.items())
    # What --online-train hot-swaps: every weight but the draft vocabulary, each onto a parameter of SGLang's
    # draft module under the name the kind maps it to (SGLang's load_weights skips unknown names silently).
    from sglang_ext.online.scheduler.swap_applier import check_draft_names
    from sglang_ext.online.swap.weight_slot import draft_layout
    layout = draft_layout(out, exclude=KIND.serving.fixed_weights)
    assert {n for n, _ in layout} == names - {"d2t", "t2d"}
    check_draft_names(KIND, model, layout)
    with pytest.raises(ValueError, match="no parameter"):
        check_draft_names(KIND, model, layout + [("midlayer.extra.weight", (1,))])


def test_staged_swap_equals_load_weights(sgl, tmp_path):
    """--online-train's staged swap (sglang_ext/online/swap/staging.py) into SGLang's EAGLE3 draft: every trained weight
    (all but d2t/t2d) lands as a block of rows of one SGLang parameter, and a new version copied through the
    staging buffers equals the same version loaded by SGLang's load_weights, in place."""
    from types import MethodType

    from sglang_ext.online.swap.weight_slot import draft_layout
    from support.swap import assert_staged_swap_equals_load_weights

    out = randomized(make_cfg()).export(tmp_path / "e3", dtype=torch.float32)
    live, _ = sglang_eagle3(sgl, out)
    live.load_weights = MethodType(sgl.le3.LlamaForCausalLMEagle3.load_weights, live)
    reference, _ = sglang_eagle3(sgl, out)
    assert_staged_swap_equals_load_weights(
        KIND, live, reference, draft_layout(out, exclude=KIND.serving.fixed_weights),
        lambda weights: sgl.le3.LlamaForCausalLMEagle3.load_weights(reference, weights),
        skip={"model.embed_tokens.weight"})             # the target's, shared: never trained nor swapped


def test_forward_matches_sglang_extend_and_decode(sgl, tmp_path):
    """Step 0 == SGLang's draft extend over a sequence (input ids rotated left, positions unchanged); step 1 at
    index i == SGLang's next draft decode step for that position (token x_{i+2} at position i+1, attending to
    the extend's keys of positions <= i and to itself)."""
    cfg = make_cfg()
    draft = randomized(cfg)
    out = draft.export(tmp_path / "e3", dtype=torch.float32)
    model, hf = sglang_eagle3(sgl, out)
    S = 12
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (1, S), generator=g)
    aux = torch.randn(1, S, 3 * H, generator=g)
    with torch.no_grad():
        step0, step1 = draft(aux, ids, n_steps=2, backend="reference")
        h0 = draft.project(aux)
        cache: list = []
        aux0, _ = draft.step(h0, torch.cat([ids[:, 1:], ids[:, :1] * 0], 1), torch.arange(S)[None], cache,
                             backend="reference")
    embed = draft.embed_tokens
    attn = model.model.layers[0].self_attn
    with torch.no_grad(), sglang_cpu():
        attn.attn = CausalAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim)
        extend_ids = torch.cat([ids[0, 1:], torch.zeros(1, dtype=torch.long)])
        batch = SimpleNamespace(spec_info=SimpleNamespace(hidden_states=aux[0]))
        normed, (aux_sgl,) = model.model(extend_ids, torch.arange(S), batch, input_embeds=embed[extend_ids])
        torch.testing.assert_close(normed, step0[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux_sgl, aux0[0], rtol=1e-5, atol=1e-5)
        k0, v0 = attn.attn.last
        for i in (0, 4, S - 3):
            attn.attn = CausalAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim, cached=(k0[:i + 1],
                                                                                                  v0[:i + 1]))
            token = ids[0, i + 2:i + 3]
            batch = SimpleNamespace(spec_info=SimpleNamespace(hidden_states=aux_sgl[i:i + 1]))
            normed1, _ = model.model(token, torch.tensor([i + 1]), batch, input_embeds=embed[token])
            torch.testing.assert_close(normed1[0], step1[0, i], rtol=1e-5, atol=1e-5)


# ---- the objective --------------------------------------------------------------------------------------

def reference_loss(draft, target_hidden, input_ids, loss_mask, T, decay=0.8, hard=False):
    """Per step and per index, with explicit key lists: what eagle3_loss must equal. hard: the target's
    distribution at p is the one-hot of the token at p+1 (live records: the aux layers only)."""
    cfg = draft.cfg
    b, S = input_ids.shape
    aux_feats, final = target_hidden[..., :3 * H], target_hidden[..., 3 * H:]
    if hard:
        greedy = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], 1)
        probs = (greedy[..., None] == draft.draft_to_target).float()          # [b, S, Vd] one-hot (or all 0)
    else:
        t_logits = draft.target_logits(final)
        greedy = t_logits.argmax(-1)
        probs = t_logits[..., draft.draft_to_target].softmax(-1)
    layer, attn = draft.midlayer, draft.midlayer.self_attn
    sums, counts = [0.0] * T, [0] * T
    for row in range(b):
        h_prev = draft.fc(aux_feats[row])
        keys = {}
        for s in range(T):
            q_all = []
            for i in range(S):
                tok = int(input_ids[row, i + 1 + s]) if i + 1 + s < S else 0
                cos, sin = rope_cos_sin(torch.tensor([[i + s]]), cfg)
                x = torch.cat([layer.input_layernorm(draft.embed_tokens[tok]), layer.hidden_norm(h_prev[i])])[None, None]
                q = apply_rope(attn.q_proj(x).view(1, 1, 4, 16), cos, sin, True)[0, 0]
                k = apply_rope(attn.k_proj(x).view(1, 1, 2, 16), cos, sin, True)[0, 0]
                keys[(s, i)] = (k, attn.v_proj(x).view(2, 16))
                q_all.append(q)
            new_h = []
            for i in range(S):
                visible = [keys[(0, j)] for j in range(i + 1)] + [keys[(t, i)] for t in range(1, s + 1)]
                K = torch.stack([k for k, _ in visible]).repeat_interleave(2, 1)       # [n, 4, 16]
                Vv = torch.stack([v for _, v in visible]).repeat_interleave(2, 1)
                p = torch.softmax(torch.einsum("hd,nhd->hn", q_all[i], K) / 4.0, dim=-1)
                o = attn.o_proj(torch.einsum("hn,nhd->hd", p, Vv).reshape(-1))
                r = o + h_prev[i]
                a = layer.mlp(layer.post_attention_layernorm(r)) + r
                new_h.append(a)
                pos = i + 1 + s
                if pos + 1 < S and loss_mask[row, pos + 1] and draft.t2d[greedy[row, pos]]:
                    logp = F.log_softmax(draft.lm_head(draft.norm(a)), -1)
                    sums[s] = sums[s] - (probs[row, pos] * logp).sum()
                    counts[s] += 1
            h_prev = torch.stack(new_h)
    return sum(decay ** s * sums[s] / counts[s] for s in range(T) if counts[s])


def _objective_case(seed=0, b=2, S=10):
    cfg = make_cfg()
    draft = randomized(cfg, seed)
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, V, (b, S), generator=g)
    feats = torch.randn(b, S, 4 * H, generator=g)
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[:, :3] = False
    if b > 1:
        mask[1, 8:] = False                                   # a shorter (padded) second sequence
    return draft, feats, ids, mask


@pytest.mark.parametrize("T", [1, 3])
def test_loss_and_gradients_match_per_step_reference(T):
    draft, feats, ids, mask = _objective_case()
    out = eagle3_loss(draft, feats, ids, mask, ttt_steps=T, backend="reference")
    grads = torch.autograd.grad(out.loss, list(draft.parameters()))
    ref = reference_loss(draft, feats, ids, mask, T)
    ref_grads = torch.autograd.grad(ref, list(draft.parameters()))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for (name, _), a, r in zip(draft.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)
    assert out.slot_count.shape == (T,) and int(out.slot_count[-1]) > 0          # every step had rows


def test_live_records_train_on_the_served_tokens():
    """Records without the target's last layer (what --online-train captures from SGLang's EAGLE worker): the
    loss is the per-step cross-entropy against the next served token, restricted to the draft vocabulary."""
    draft, feats, ids, mask = _objective_case()
    vocab = draft.draft_to_target
    ids[:, 1:] = vocab[torch.randint(0, VD, ids[:, 1:].shape, generator=torch.Generator().manual_seed(3))]
    ids[0, 5] = int(torch.nonzero(~draft.t2d)[0])            # one label outside the draft vocabulary: not trained
    out = eagle3_loss(draft, feats[..., :3 * H], ids, mask, ttt_steps=3, backend="reference")
    ref = reference_loss(draft, feats, ids, mask, 3, hard=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.loss, [draft.fc.weight, draft.lm_head.weight])
    ref_grads = torch.autograd.grad(reference_loss(draft, feats, ids, mask, 3, hard=True),
                                    [draft.fc.weight, draft.lm_head.weight])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="neither"):
        eagle3_loss(draft, feats[..., :2 * H], ids, mask, ttt_steps=1)


def test_acceptance_proxy_counts_leading_greedy_matches():
    """accept_sum / full_blocks / slot stats, recomputed here step by step from the draft's argmax proposals
    (mapped to target ids) and the target's greedy tokens."""
    draft, feats, ids, mask = _objective_case(b=2, S=12)
    T, A = 3, 3                                               # block_size 4: a chain verify checks 3 proposals
    with torch.no_grad():
        # Make most proposals right: the draft always proposes draft id 0 (a zero lm_head), and the target's
        # greedy token is that id's target token wherever its last-layer output is c (at -c: draft id 1's).
        t_star = int(draft.draft_to_target[0])
        draft.lm_head.weight.zero_()
        c = torch.randn(H, generator=torch.Generator().manual_seed(5))
        draft.target_lm_head.zero_()
        draft.target_lm_head[t_star] = c
        draft.target_lm_head[int(draft.draft_to_target[1])] = -c
        feats[..., 3 * H:] = c
        feats[0, 6, 3 * H:] = -c
        out = eagle3_loss(draft, feats, ids, mask, ttt_steps=T, backend="reference")
        steps = draft(feats[..., :3 * H], ids, n_steps=T, backend="reference")
        greedy = draft.target_logits(feats[..., 3 * H:]).argmax(-1)
    b, S = ids.shape
    accept, full, correct, count = 0, 0, [0] * T, [0] * T
    for row in range(b):
        for i in range(S):
            ok, lead, all_valid = True, 0, True
            for s in range(T):
                p = i + 1 + s
                valid = p + 1 < S and bool(mask[row, p + 1]) and bool(draft.t2d[greedy[row, p]])
                hit = valid and int(draft.draft_to_target[draft.logits(steps[s][row, i]).argmax()]) == int(greedy[row, p])
                count[s] += valid
                correct[s] += hit
                if s < A:
                    all_valid &= valid
                    ok &= hit
                    lead += ok
            if all_valid:
                full += 1
                accept += 1 + lead
    assert int(out.full_blocks) == full > 0
    assert float(out.accept_sum) == accept
    assert out.slot_count.tolist() == count and out.slot_correct.tolist() == correct
    assert sum(correct) > 0 and 1.0 < out.accept_len < 1.0 + A


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
def test_kernel_path_equals_reference():
    draft, feats, ids, mask = _objective_case(b=1, S=9)
    ref = eagle3_loss(draft, feats, ids, mask, ttt_steps=2, backend="reference")
    g_ref = torch.autograd.grad(ref.loss, [draft.fc.weight, draft.midlayer.self_attn.q_proj.weight])
    tri = eagle3_loss(draft, feats, ids, mask, ttt_steps=2, backend="triton")
    g_tri = torch.autograd.grad(tri.loss, [draft.fc.weight, draft.midlayer.self_attn.q_proj.weight])
    torch.testing.assert_close(tri.loss, ref.loss, rtol=1e-5, atol=1e-5)
    for a, r in zip(g_tri, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


# ---- finetune ---------------------------------------------------------------------------------------------

def test_finetune_trains_an_eagle3_draft_from_its_config(tmp_path):
    """The kind comes from the config: records of the aux layers + the last layer train a from-scratch EAGLE3
    draft with a reduced vocabulary built from the replay; the loss falls and the export reloads."""
    from support.synthetic import synthetic_records
    from trainer.finetune import main
    from trainer.replay import ReplaySpec, write_replay
    from trainer.target import target_identity

    target = write_tiny_target(tmp_path / "target", hidden_size=H, num_layers=L, vocab_size=V)
    cfg = make_cfg(draft_vocab_size=64)
    (tmp_path / "draft.json").write_text(json.dumps(cfg.to_dict()))
    layers = tuple(cfg.feature_layer_ids)
    write_replay(tmp_path / "replay", ReplaySpec(target_identity(target), layers, H, "bfloat16"),
                 synthetic_records(24, num_layers=len(layers), hidden_size=H, vocab=40), max_shard_tokens=400)
    result = main(["--replay", str(tmp_path / "replay"), "--target-model-path", str(target), "--draft-config",
                   str(tmp_path / "draft.json"), "--output", str(tmp_path / "out"), "--batch-size", "4",
                   "--ttt-steps", "3", "--max-steps", "30", "--lr", "3e-3", "--log-every", "5", "--no-progress"])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert result.steps == 30 and log[-1]["loss"] < log[0]["loss"], (log[0], log[-1])
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["draft_kind"] == "eagle3"
    trained = Eagle3Draft.from_pretrained(tmp_path / "out")
    vocab = trained.draft_to_target
    assert vocab.numel() == 64 and set(range(10, 50)) <= set(vocab.tolist())   # the replay's tokens are 10..49


def test_capture_records_what_the_eagle3_objective_needs(tiny, tmp_path):
    """An EAGLE3 draft's capture layers are its aux layers plus the target's last layer, and that last layer's
    output through the target's final norm and lm_head (what the objective uses) gives the target's logits."""
    from trainer.capture import resolve_layer_ids
    from trainer.hf_target import HFTarget
    from trainer.target import load_target_final_norm, load_target_head

    target_cfg = json.loads((tiny.dense / "config.json").read_text())
    cfg = KIND.config_for_target(target_cfg, num_layers=1, block_size=4, feature_layers=[0, 2, 3],
                                 num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256)
    draft_dir = KIND.from_scratch(cfg, seed=0).export(tmp_path / "e3", dtype=torch.float32)
    layers = resolve_layer_ids(cfg.num_target_layers, draft_model_path=str(draft_dir))
    assert layers == [0, 2, 3, cfg.num_target_layers - 1]
    hf = HFTarget(tiny.dense, device="cpu", dtype=torch.float32)
    prompt = hf.encode("<|im_start|>user\nThe quick brown fox<|im_end|>\n<|im_start|>assistant\n")
    out = hf.forward(prompt.input_ids, prompt.positions, layers)
    draft = Eagle3Draft.from_pretrained(draft_dir)
    embed, lm_head, _ = load_target_head(tiny.dense)
    KIND.attach_target(draft, embed, lm_head, tiny.dense)
    H_t = cfg.hidden_size
    torch.testing.assert_close(draft.target_logits(out.features[:, 3 * H_t:]), out.logits, rtol=1e-4, atol=1e-4)
    norm, eps = load_target_final_norm(tiny.dense)
    assert norm.shape == (H_t,) and eps == target_cfg["text_config"]["rms_norm_eps"]
