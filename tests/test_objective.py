"""The DFlash objective against a plain, independent computation.

The reference below runs every block on its own: it slices the context to positions < anchor
(no mask at all), embeds [token at anchor, MASK...], runs the draft's math written out with explicit
positions and a per-head softmax, and takes cross-entropy of slot k against the token AT anchor+k.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import trainer.dflash_draft as dflash_draft_module
from spec_kernels.dflash_attention import block_attention_mask
from trainer.dflash_draft import DFlashDraft
from trainer.objective import IGNORE, build_blocks, dflash_loss, sample_anchors, valid_anchor_mask
from support.synthetic import tiny_draft_config

GAMMA = 7.0


# ---- the independent reference -------------------------------------------------------------------------

def ref_rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, positions, theta):
    """x [T, heads, D], positions [T]: NeoX halves, angle_i = pos * theta^(-2i/D)."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def ref_block_hidden(P, cfg, embed, target_hidden_row, block_tokens, anchor):
    """One block, alone: context = target features at positions 0..anchor-1 only."""
    eps, Hq, Hkv, D = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B = len(block_tokens)
    ctx = ref_rmsnorm(target_hidden_row[:anchor] @ P["fc.weight"].T, P["hidden_norm.weight"], eps)   # [a, H]
    ctx_pos = torch.arange(anchor)
    blk_pos = torch.arange(anchor, anchor + B)
    h = embed[block_tokens]                                                                         # [B, H]
    for l in range(cfg.num_hidden_layers):
        W = lambda name: P[f"layers.{l}.{name}"]  # noqa: E731
        x = ref_rmsnorm(h, W("input_layernorm.weight"), eps)
        q = ref_rmsnorm((x @ W("self_attn.q_proj.weight").T).view(B, Hq, D), W("self_attn.q_norm.weight"), eps)
        k = ref_rmsnorm((x @ W("self_attn.k_proj.weight").T).view(B, Hkv, D), W("self_attn.k_norm.weight"), eps)
        v = (x @ W("self_attn.v_proj.weight").T).view(B, Hkv, D)
        kc = ref_rmsnorm((ctx @ W("self_attn.k_proj.weight").T).view(anchor, Hkv, D), W("self_attn.k_norm.weight"), eps)
        vc = (ctx @ W("self_attn.v_proj.weight").T).view(anchor, Hkv, D)
        theta = cfg.rope_theta
        q, k, kc = ref_rope(q, blk_pos, theta), ref_rope(k, blk_pos, theta), ref_rope(kc, ctx_pos, theta)
        K, V = torch.cat([kc, k]), torch.cat([vc, v])                                              # [a+B, Hkv, D]
        heads = []
        for hq in range(Hq):
            hk = hq // (Hq // Hkv)
            att = torch.softmax(q[:, hq] @ K[:, hk].T / math.sqrt(D), dim=-1)                   # [B, a+B]
            heads.append(att @ V[:, hk])
        h = h + torch.cat(heads, -1) @ W("self_attn.o_proj.weight").T
        y = ref_rmsnorm(h, W("post_attention_layernorm.weight"), eps)
        gate, up = y @ W("mlp.gate_proj.weight").T, y @ W("mlp.up_proj.weight").T
        h = h + (F.silu(gate) * up) @ W("mlp.down_proj.weight").T
    return ref_rmsnorm(h, P["norm.weight"], eps)


def ref_loss(P, cfg, embed, lm_head, target_hidden, input_ids, loss_mask, lengths, anchors, gamma=GAMMA):
    B, total, wsum = cfg.block_size, 0.0, 0.0
    for bi in range(input_ids.shape[0]):
        for a in anchors[bi].tolist():
            if a < 0:
                continue
            tokens = torch.tensor([int(input_ids[bi, a])] + [cfg.mask_token_id] * (B - 1))
            logits = ref_block_hidden(P, cfg, embed, target_hidden[bi], tokens, a) @ lm_head.T           # [B, V]
            for k in range(1, B):
                p = a + k
                if p < lengths[bi] and bool(loss_mask[bi, p]):
                    w = math.exp(-(k - 1) / gamma)
                    total = total + w * F.cross_entropy(logits[k], input_ids[bi, p])             # label = token AT a+k
                    wsum += w
    return total / wsum


# ---- fixtures -------------------------------------------------------------------------------------------

def make_case(seed=0, block_size=4, is_causal=False):
    torch.manual_seed(seed)
    cfg = tiny_draft_config(hidden_size=32, vocab_size=50, block_size=block_size, target_layer_ids=(0, 2),
                            is_causal=is_causal)
    draft = DFlashDraft.from_scratch(cfg, seed=seed)
    with torch.no_grad():                         # make every weight matter, norms included
        for name, p in draft.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("norm.weight") else p * 8)
    embed, lm_head = torch.randn(50, 32), torch.randn(50, 32)
    draft.attach_target(embed, lm_head)
    lengths = [17, 12]
    S = max(lengths)
    input_ids = torch.randint(0, 49, (2, S))
    target_hidden = torch.randn(2, S, 64)
    loss_mask = torch.zeros(2, S, dtype=torch.bool)
    loss_mask[0, 3:17] = True
    loss_mask[0, 9] = False                      # a hole inside the response
    loss_mask[1, 2:12] = True
    return cfg, draft, embed, lm_head, target_hidden, input_ids, loss_mask, lengths


# ---- tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_match_per_block_reference(seed):
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(seed)
    anchors = sample_anchors(mask, num_anchors=5, generator=torch.Generator().manual_seed(seed))
    assert (anchors >= 0).sum() >= 8
    out = dflash_loss(draft, th, ids, mask, anchors=anchors, gamma=GAMMA, backend="reference")
    out.loss.backward()

    P = {n: p.detach().clone().requires_grad_(True) for n, p in draft.named_parameters()}
    ref = ref_loss(P, cfg, embed, lm_head, th, ids, mask, lengths, anchors)
    ref.backward()
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-5), (out.loss.item(), ref.item())
    for name, p in draft.named_parameters():
        g_ref = P[name].grad
        assert g_ref is not None and g_ref.abs().sum() > 0, name
        assert torch.allclose(p.grad, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max()), \
            (name, (p.grad - g_ref).abs().max().item(), g_ref.abs().max().item())


def test_reference_detects_shifted_labels():
    """The published pitfall: labels shifted by one (slot k trained on token anchor+k+1) must not pass."""
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(2)
    anchors = sample_anchors(mask, num_anchors=5, generator=torch.Generator().manual_seed(2))
    blocks = build_blocks(ids, mask, anchors, cfg.block_size, cfg.mask_token_id, GAMMA)
    hidden = draft(th, blocks.block_ids, anchors, backend="reference")
    logits = draft.logits(hidden)
    b, N = anchors.shape
    shifted = torch.full_like(blocks.labels, IGNORE).view(b, N, -1)
    shifted[:, :, :-1] = blocks.labels.view(b, N, -1)[:, :, 1:]          # slot k gets token anchor+k+1
    valid = shifted.reshape(b, -1) != IGNORE
    w = blocks.weights.view(b, N, -1).roll(-1, dims=2).reshape(b, -1) * valid
    bad = (F.cross_entropy(logits.reshape(-1, 50), shifted.reshape(-1).clamp(min=0), reduction="none")
           * w.reshape(-1)).sum() / w.sum()
    P = {n: p.detach() for n, p in draft.named_parameters()}
    ref = ref_loss(P, cfg, embed, lm_head, th, ids, mask, lengths, anchors)
    good = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference").loss
    assert torch.allclose(good, ref, rtol=1e-5)
    assert abs(bad.item() - ref.item()) > 1e-2


def test_reference_detects_inclusive_context_mask(monkeypatch):
    """The other pitfall: context <= anchor (the feature AT the anchor leaks token anchor+1)."""
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(3)
    anchors = sample_anchors(mask, num_anchors=5, generator=torch.Generator().manual_seed(3))
    P = {n: p.detach() for n, p in draft.named_parameters()}
    ref = ref_loss(P, cfg, embed, lm_head, th, ids, mask, lengths, anchors)
    real = dflash_draft_module.block_attention

    def leaky(q, k, v, anchors, block_size, **kw):           # sees positions <= anchor
        return real(q, k, v, torch.where(anchors >= 0, anchors + 1, anchors), block_size, **kw)

    monkeypatch.setattr(dflash_draft_module, "block_attention", leaky)
    bad = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference").loss
    monkeypatch.setattr(dflash_draft_module, "block_attention", real)
    good = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference").loss
    assert torch.allclose(good, ref, rtol=1e-5)
    assert abs(bad.item() - ref.item()) > 1e-2


def test_build_blocks_same_position_labels_hand_written():
    ids = torch.arange(100, 112)[None]                      # token at position p is 100 + p
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :2] = False                                     # prompt
    mask[0, 7] = False                                      # a hole
    anchors = torch.tensor([[2, 5, 10, -1]])
    blk = build_blocks(ids, mask, anchors, block_size=4, mask_token_id=7, gamma=GAMMA)
    M = 7
    assert blk.block_ids.view(4, 4).tolist() == [[102, M, M, M], [105, M, M, M], [110, M, M, M], [M, M, M, M]]
    I = IGNORE
    assert blk.labels.view(4, 4).tolist() == [
        [I, 103, 104, 105],        # slot k labelled with the token AT anchor+k, slot 0 never
        [I, 106, I, 108],          # position 7 is outside the loss mask
        [I, 111, I, I],            # positions 12, 13 are past the end
        [I, I, I, I],              # padding block
    ]
    w = blk.weights.view(4, 4)
    assert torch.allclose(w[0], torch.tensor([0.0, 1.0, math.exp(-1 / 7), math.exp(-2 / 7)]))
    assert w[1, 2] == 0 and w[3].sum() == 0


def test_sample_anchors_valid_sorted_and_capped():
    mask = torch.zeros(3, 30, dtype=torch.bool)
    mask[0, 5:30] = True
    mask[1, 2:6] = True
    mask[1, 10:13] = True
    mask[2, 4] = True                                        # a lone token: no valid anchor
    valid = valid_anchor_mask(mask)
    assert valid[1].nonzero().flatten().tolist() == [2, 3, 4, 10, 11]
    anchors = sample_anchors(mask, num_anchors=8, generator=torch.Generator().manual_seed(0))
    assert anchors.shape == (3, 8)
    a0 = anchors[0].tolist()
    assert len(set(a0)) == 8 and a0 == sorted(a0) and all(5 <= a < 29 for a in a0)
    assert anchors[1].tolist() == [2, 3, 4, 10, 11, -1, -1, -1]    # fewer valid than asked: all of them
    assert anchors[2].tolist() == [-1] * 8
    other = sample_anchors(mask, num_anchors=8, generator=torch.Generator().manual_seed(1))
    assert other[0].tolist() != a0                                   # actually random


def test_attention_mask_hand_written():
    """anchors [2, 5], B=2, S=7: block j rows see context columns < anchor_j and only block j's slots."""
    m = block_attention_mask(torch.tensor([[2, 5, -1]]), ctx_len=7, block_size=2)[0].int()
    #                 ctx 0 1 2 3 4 5 6 | b0 b0 b1 b1 b2 b2
    expected = [[1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
                [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
                [0] * 13,
                [0] * 13]
    assert m.tolist() == expected


@pytest.mark.parametrize("is_causal", [False, True])
def test_draft_visibility_strict_context_and_no_cross_block(is_causal):
    """Behavioural check through the whole draft: what each block can and cannot see."""
    cfg, draft, *_ = make_case(4, is_causal=is_causal)
    S, B = 16, cfg.block_size
    th = torch.randn(1, S, 64)
    anchors = torch.tensor([[4, 9]])
    ids = torch.randint(0, 49, (1, S))
    blocks = build_blocks(ids, torch.ones(1, S, dtype=torch.bool), anchors, B, cfg.mask_token_id)

    def run(th_, block_ids_):
        with torch.no_grad():
            return draft(th_, block_ids_, anchors, backend="reference").view(2, B, -1)

    base = run(th, blocks.block_ids)
    # features AT the anchor (and after) are invisible to the block: strict <
    t = th.clone()
    t[0, 4:] += 5.0
    out = run(t, blocks.block_ids)
    assert torch.allclose(out[0], base[0], atol=1e-5)
    assert not torch.allclose(out[1], base[1], atol=1e-3)              # block 1 (anchor 9) sees 4..8
    # the feature just before the anchor is visible
    t = th.clone()
    t[0, 3] += 5.0
    assert not torch.allclose(run(t, blocks.block_ids)[0], base[0], atol=1e-3)
    # block 1 cannot see block 0's tokens, and vice versa
    bid = blocks.block_ids.clone()
    bid[0, 0] = (bid[0, 0] + 1) % 49
    out = run(th, bid)
    assert torch.allclose(out[1], base[1], atol=1e-5) and not torch.allclose(out[0], base[0], atol=1e-3)
    bid = blocks.block_ids.clone()
    bid[0, B] = (bid[0, B] + 1) % 49
    assert torch.allclose(run(th, bid)[0], base[0], atol=1e-5)
    # inside a block: non-causal by default, causal when the config says so
    bid = blocks.block_ids.clone()
    bid[0, B - 1] = 3                                                   # change the LAST slot of block 0
    first_slot_changed = not torch.allclose(run(th, bid)[0, 0], base[0, 0], atol=1e-4)
    assert first_slot_changed == (not is_causal)


def test_chunked_cross_entropy_matches_unchunked():
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(5)
    anchors = sample_anchors(mask, num_anchors=6, generator=torch.Generator().manual_seed(5))
    out_a = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference", chunk_rows=4096)
    grads_a = torch.autograd.grad(out_a.loss, list(draft.parameters()))
    out_b = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference", chunk_rows=3)
    grads_b = torch.autograd.grad(out_b.loss, list(draft.parameters()))
    assert torch.allclose(out_a.loss, out_b.loss, rtol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6 * ga.abs().max())
    assert torch.equal(out_a.slot_correct, out_b.slot_correct)


def test_accuracy_and_acceptance_stats():
    """Per-slot accuracy and the accept-length proxy, recomputed by plain loops from the logits."""
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(6)
    B = cfg.block_size
    anchors = torch.tensor([[3, 5, 14], [2, 6, -1]])
    with torch.no_grad():
        out = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference")
        blocks = build_blocks(ids, mask, anchors, B, cfg.mask_token_id)
        pred = draft.logits(draft(th, blocks.block_ids, anchors, backend="reference")).argmax(-1).view(2, 3, B)
    # make some predictions right, so leading runs are non-trivial
    labels = blocks.labels.view(2, 3, B)
    correct = [0] * B
    count = [0] * B
    accept, full = 0, 0
    for bi in range(2):
        for j in range(3):
            if anchors[bi, j] < 0:
                continue
            run_on, lead, all_labelled = True, 0, True
            for k in range(1, B):
                y = int(labels[bi, j, k])
                if y == IGNORE:
                    all_labelled = False
                    run_on = False
                    continue
                count[k] += 1
                ok = int(pred[bi, j, k]) == y
                correct[k] += ok
                if run_on and ok:
                    lead += 1
                else:
                    run_on = False
            if all_labelled:
                full += 1
                accept += 1 + lead
    assert out.slot_count.tolist() == count and out.slot_correct.tolist() == correct
    assert int(out.full_blocks) == full and full >= 2
    assert out.accept_len == pytest.approx(accept / full)
    assert out.accuracy == pytest.approx(sum(correct) / sum(count))


def test_accept_len_counts_leading_matches_only():
    """norm.weight = 0 makes every logit 0, so argmax is token 0 everywhere (first maximum): exactly the
    slots labelled 0 are correct, and the accept length counts only the leading run of them."""
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(7)
    with torch.no_grad():
        draft.norm.weight.zero_()
    ids = ids.clamp(min=1).clone()
    ids[0, 4:7] = torch.tensor([0, 0, 3])         # anchor 3 -> slots 1..3 = [0, 0, 3]: leading 2
    ids[0, 11:14] = torch.tensor([3, 0, 0])       # anchor 10 -> slots 1..3 = [3, 0, 0]: leading 0
    mask = torch.zeros_like(mask)
    mask[0, 3:15] = True
    anchors = torch.tensor([[3, 10], [-1, -1]])
    out = dflash_loss(draft, th, ids, mask, anchors=anchors, backend="reference")
    assert out.slot_correct.tolist() == [0, 1, 2, 1] and out.slot_count.tolist() == [0, 2, 2, 2]
    assert int(out.full_blocks) == 2 and out.accept_len == pytest.approx(((1 + 2) + (1 + 0)) / 2)
    assert out.loss.item() == pytest.approx(math.log(50), rel=1e-5)          # uniform logits


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
def test_triton_backend_gives_the_same_loss_and_gradients():
    """The draft through spec_kernels' Triton block attention == through the dense reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, draft, embed, lm_head, th, ids, mask, lengths = make_case(8)
    draft.to(device)
    draft.attach_target(embed.to(device), lm_head.to(device))
    anchors = sample_anchors(mask, num_anchors=5, generator=torch.Generator().manual_seed(8)).to(device)
    results = {}
    for backend in ("reference", "triton"):
        out = dflash_loss(draft, th.to(device), ids.to(device), mask.to(device), anchors=anchors, backend=backend)
        results[backend] = (out.loss.detach(), torch.autograd.grad(out.loss, list(draft.parameters())))
    (ref_loss_, ref_grads), (tri_loss, tri_grads) = results["reference"], results["triton"]
    assert torch.allclose(tri_loss, ref_loss_, rtol=1e-4)
    for g_ref, g_tri in zip(ref_grads, tri_grads):
        assert torch.allclose(g_tri, g_ref, rtol=1e-3, atol=1e-3 * g_ref.abs().max())
