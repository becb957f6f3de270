"""trainer.evaluate: the offline simulation of SGLang's DFLASH verify rule gives the same per-prompt accept
counts as a real SGLang server; a random draft gets tau ~ 1; SGLang's finish / accept-length bookkeeping."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_ext.demo.prompts import IMAGE_QUESTIONS, TEXT_PROMPTS, make_image
from sglang_ext.demo.tiny_models import CONTENT, MASK_DIM
from trainer.evaluate import finished_len, evaluate_offline, evaluate_served, format_table
from trainer.evaluate import main as evaluate_main
from trainer.hf_target import HFTarget, load_chat_jsonl

BLOCK_SIZE = 4
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """6 text prompts + 2 image prompts (chat JSONL, images next to it)."""
    d = tmp_path_factory.mktemp("prompts")
    rows = [{"messages": [{"role": "user", "content": t}]} for t in TEXT_PROMPTS[:6]]
    for i in range(2):
        make_image(i).save(d / f"img{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img{i}.png"},
                                                               {"type": "text", "text": IMAGE_QUESTIONS[i]}]}]})
    path = d / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finish_rule_mirrors_update_finish_state():
    eos = {7}
    assert finished_len([1, 2, 3], 2, 5, True, eos) is None
    assert finished_len([1, 2, 3, 4, 5, 6], 3, 5, True, eos) == 5           # run crossed the cap: truncated
    assert finished_len([1, 7, 3, 4], 3, 10, False, eos) == 2                # EOS inside the run, stop included
    assert finished_len([1, 7, 3, 4], 3, 10, True, eos) is None              # ignore_eos
    assert finished_len([1, 2, 3, 4, 5, 7], 3, 5, False, eos) == 5           # EOS past the cap -> length finish


def feature_sensitive_draft(copy_draft: Path, out: Path, gain: float = 1.0, channels: int = 32,
                            key_dims: int = 8, seed: int = 0) -> Path:
    """The hand-built copy draft plus a second attention head whose proposals depend on the target features.

    The copy draft's proposals ignore the context (its head 0 only attends to the bonus token), so matching
    accept counts with it say nothing about the draft's context. Here fc writes the target features into
    `channels` free hidden dims; head 1 lets the mask queries attend over the context by keys read from those
    dims, and writes the attended features into the content dims (scaled by `gain`): some proposals flip, and
    which ones depends on every context row the draft sees (layers, positions < p, committed verify rows)."""
    cfg = json.loads((copy_draft / "config.json").read_text())
    w = load_file(str(copy_draft / "model.safetensors"))
    H, hd, n_heads = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"]
    assert cfg["num_key_value_heads"] == n_heads >= 2, "head 1 needs its own K/V head"
    g = torch.Generator().manual_seed(seed)
    feat = torch.arange(CONTENT.stop, CONTENT.stop + channels)            # hidden dims the embedding leaves free
    assert feat[-1] < H
    k_feats = len(cfg["dflash_config"]["target_layer_ids"])
    fc = torch.zeros(H, k_feats * H)
    fc[feat] = torch.randn(channels, k_feats * H, generator=g)
    p = "layers.0.self_attn."
    q, k, v, o = (w[p + n + "_proj.weight"].clone() for n in "qkvo")
    head1 = torch.arange(hd, 2 * hd)
    q[head1[:key_dims], MASK_DIM] = torch.randn(key_dims, generator=g)
    k[head1[:key_dims, None], feat] = torch.randn(key_dims, channels, generator=g)
    v[head1[:channels], feat] = 1.0
    o[CONTENT, head1[0]:head1[0] + channels] = torch.randn(CONTENT.stop - CONTENT.start, channels, generator=g) * gain
    w.update({"fc.weight": fc, p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v,
              p + "o_proj.weight": o})
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({name: t.contiguous() for name, t in w.items()}, str(out / "model.safetensors"))
    return out


@pytest.mark.server
@pytest.mark.parametrize("draft_kind", ["copy", "feature_sensitive"])
def test_served_tau_equals_offline(tiny, server_log_dir, prompts_file, tmp_path, draft_kind):
    examples = load_chat_jsonl(prompts_file)
    draft = tiny.draft_dense
    if draft_kind == "feature_sensitive":
        draft = feature_sensitive_draft(tiny.draft_dense, tmp_path / "draft")
        examples = examples[:3] + examples[-1:]                          # 3 text + 1 image prompt: lean
    offline = evaluate_offline(tiny.dense, draft, examples, BLOCK_SIZE, MAX_NEW_TOKENS,
                               device="cpu", dtype=torch.float32, progress=False)
    served = evaluate_served(tiny.dense, draft, examples, BLOCK_SIZE, MAX_NEW_TOKENS,
                             log_dir=server_log_dir, progress=False)
    print("\n" + format_table([offline, served]))
    assert len(offline.prompts) == len(served.prompts) == len(examples)
    for off, srv in zip(offline.prompts, served.prompts):
        assert off.prompt_tokens == srv.prompt_tokens, off.name           # same tokens, images included
        assert off.output_ids == srv.output_ids, off.name                  # same greedy text
        assert off.completion_tokens == srv.completion_tokens == MAX_NEW_TOKENS
        assert off.verify_steps == srv.verify_steps, off.name
        assert off.accept_histogram == srv.accept_histogram, off.name     # same accept counts per step
        assert sorted(off.committed_per_step) == srv.committed_per_step
        assert off.accept_length == srv.accept_length                      # exactly equal per prompt
    assert offline.tau == served.tau and offline.tau_pooled == served.tau_pooled
    # Drafts really get accepted (tau well above 1, never above 2: these drafts can only hit slot 1).
    assert 1.2 < offline.tau <= 2.0
    # The last verify step is often only partly used (the run crosses max_new_tokens): SGLang still counts it
    # and divides the CAPPED completion tokens, prefill token included, by the steps.
    assert any(1 + sum(p.committed_per_step) > p.completion_tokens for p in offline.prompts)
    for p in offline.prompts:
        assert p.accept_length == p.completion_tokens / p.verify_steps
    if draft_kind == "feature_sensitive":   # the context changed the proposals, so the match above covers it
        copy = evaluate_offline(tiny.dense, tiny.draft_dense, examples, BLOCK_SIZE, MAX_NEW_TOKENS,
                                device="cpu", dtype=torch.float32, progress=False)
        assert [p.accept_histogram for p in copy.prompts] != [p.accept_histogram for p in offline.prompts]


def test_random_draft_offline_tau_is_about_one(tiny, prompts_file, tmp_path, capsys):
    out = tmp_path / "report.json"
    n = 16
    rc = evaluate_main(["--target-model-path", str(tiny.dense_random), "--draft-model-path", str(tiny.draft_random),
                        "--prompts", str(prompts_file), "--block-size", str(BLOCK_SIZE), "--max-new-tokens", str(n),
                        "--device", "cpu", "--output", str(out), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "offline tau" in table and "mean" in table
    report = json.loads(out.read_text())["offline"]
    assert len(report["prompts"]) == 8
    proposed = sum(p["verify_steps"] for p in report["prompts"]) * (BLOCK_SIZE - 1)
    accepted = sum(a * c for p in report["prompts"] for a, c in enumerate(p["accept_histogram"]))
    assert accepted / proposed < 0.05
    # no accepts -> n-1 steps of one token after the prefill token: tau = n / (n - 1) = 1.067
    assert 1.0 <= report["tau"] < 1.1
    assert report["tokens"] == 8 * n


def test_offline_respects_eos(tiny, prompts_file):
    """With ignore_eos off, a request whose greedy output holds an EOS stops right after it, as SGLang does."""
    target = HFTarget(tiny.dense, device="cpu", dtype=torch.float32)
    first = load_chat_jsonl(prompts_file)[:1]
    report = evaluate_offline(tiny.dense, tiny.draft_dense, first, BLOCK_SIZE, 8, target=target, progress=False)
    eos_id = report.prompts[0].output_ids[3]                 # pretend the 4th token of prompt 1 is the EOS
    target.eos_token_ids = {eos_id}
    stopped = evaluate_offline(tiny.dense, tiny.draft_dense, first, BLOCK_SIZE, 8, target=target,
                               ignore_eos=False, progress=False).prompts[0]
    assert stopped.output_ids == report.prompts[0].output_ids[:4]
    assert stopped.completion_tokens == 4
    assert stopped.verify_steps == next(i + 1 for i, c in enumerate(_cumsum(report.prompts[0].committed_per_step))
                                        if 1 + c >= 4)


def _cumsum(xs):
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out
