"""EAGLE3 served by real SGLang on the CPU platform (float32), end to end offline: an EAGLE3 draft for the tiny
Qwen3-VL (dense and MoE) is captured (HF, the target's own greedy answers) and trained with trainer.finetune,
then served as a chain (topk 1) and as trees (topk 2 and 4 dense, topk 2 MoE). Greedy output equals a plain
server's on text and image prompts, and the served tau of the chain equals the offline evaluator's replay of
SGLang's EAGLE3 verify rule on every prompt. The dense trees are served with a hand-built "second guess" draft
(the trained one with its lm_head mixed with a shifted copy, so its first guess is mostly wrong and the right
token is often its second): its chain accepts little (about 1.1 against the trained draft's 2.7), so the
trees' extra acceptance comes from side branches, and their verify must run under the tree mask (without it,
side branches corrupt the output)."""
import json
import random
import sysconfig
from pathlib import Path

import pytest

from sglang_ext.demo.prompts import IMAGE_QUESTIONS, TEXT_PROMPTS, make_image, mixed_requests
from sglang_ext.launcher import draft_args, launch_server
from trainer.draft_kind import get_kind

pytestmark = pytest.mark.server
MAX_NEW = 24
BLOCK = 4


def train_draft(target, root: Path) -> Path:
    """capture (40 prompts, the target's greedy answers) -> finetune an EAGLE3 draft from its config."""
    from trainer.capture import run_capture
    from trainer.finetune import main as finetune

    root.mkdir(parents=True, exist_ok=True)

    words = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text().split()
    rng = random.Random(0)
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(40):
            start, k = rng.randrange(len(words) - 12), rng.randint(3, 12)
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words[start:start + k])}]}) + "\n")
    kind = get_kind("eagle3")
    cfg = kind.config_for_target(json.loads((target / "config.json").read_text()), num_layers=1,
                                 block_size=BLOCK, feature_layers=[0, 2, 3], num_heads=4, num_kv_heads=2, head_dim=64,
                                 intermediate_size=512)
    (root / "draft.json").write_text(json.dumps(cfg.to_dict()))
    run_capture(target, root / "chat.jsonl", root / "replay", draft_model_path=str(root / "draft.json"),
                regenerate=True, max_new_tokens=48, progress=False)
    result = finetune(["--replay", str(root / "replay"), "--target-model-path", str(target), "--draft-config",
                       str(root / "draft.json"), "--output", str(root / "draft"), "--batch-size", "8",
                       "--ttt-steps", "3", "--max-steps", "200", "--lr", "2e-3", "--no-progress"])
    assert result.final_accept_len > 2.5, result          # the training proxy, out of at most 4
    return root / "draft"


@pytest.fixture(scope="module")
def trained_draft(tiny, tmp_path_factory):
    return train_draft(tiny.dense, tmp_path_factory.mktemp("eagle3-dense"))


@pytest.fixture(scope="module")
def second_guess_draft(trained_draft, tmp_path_factory):
    """The trained draft with lm_head rows W'[v] = W[v] + 1.5 W[v-1]: where the trained draft's top token t
    stands out, t+1 becomes its first guess and t its second."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("eagle3-second-guess") / "draft"
    shutil.copytree(trained_draft, out)
    weights = load_file(str(out / "model.safetensors"))
    w = weights["lm_head.weight"].float()
    weights["lm_head.weight"] = (w + 1.5 * torch.roll(w, 1, dims=0)).to(weights["lm_head.weight"].dtype)
    save_file(weights, str(out / "model.safetensors"))
    return out


def plain_outputs(target, log_dir):
    requests = mixed_requests(n_text=6, n_image=2)
    with launch_server(target, log_dir=log_dir, name="plain-for-eagle3") as server:
        return requests, [server.generate(t, im, max_new_tokens=MAX_NEW)["output_ids"] for t, im in requests]


@pytest.fixture(scope="module")
def plain(tiny, server_log_dir):
    return plain_outputs(tiny.dense, server_log_dir)


@pytest.fixture(scope="module")
def moe_trained_draft(tiny, tmp_path_factory):
    return train_draft(tiny.moe, tmp_path_factory.mktemp("eagle3-moe"))


@pytest.fixture(scope="module")
def moe_plain(tiny, server_log_dir):
    return plain_outputs(tiny.moe, server_log_dir)


def mixed_prompts_file(directory: Path) -> Path:
    """The requests of mixed_requests(6, 2) as a chat JSONL for the offline evaluator."""
    prompts = [{"messages": [{"role": "user", "content": t}]} for t in TEXT_PROMPTS[:6]]
    for i in range(2):
        make_image(i).save(directory / f"im{i}.png")
        prompts.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"im{i}.png"},
                                                                  {"type": "text", "text": IMAGE_QUESTIONS[i]}]}]})
    (directory / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return directory / "prompts.jsonl"


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_eagle3_chain_serves_greedy_exactly_and_served_tau_equals_offline(tiny, server_log_dir, tmp_path, request,
                                                                           variant):
    from trainer.evaluate import evaluate_offline, evaluate_served

    target = getattr(tiny, variant)
    prefix = "" if variant == "dense" else "moe_"            # module fixtures, shared with the tree tests
    draft, (requests, expected) = request.getfixturevalue(f"{prefix}trained_draft"), request.getfixturevalue(
        f"{prefix}plain")
    prompts = mixed_prompts_file(tmp_path)
    with launch_server(target, draft_args(draft, BLOCK), log_dir=server_log_dir,
                       name=f"eagle3-chain-{variant}") as server:
        results = [server.generate(t, im, max_new_tokens=MAX_NEW) for t, im in requests]
        served = evaluate_served(target, draft, prompts, BLOCK, MAX_NEW,
                                 url=server.url, progress=False)
    assert [r["output_ids"] for r in results] == expected
    taus = [r["meta_info"]["spec_accept_length"] for r in results]
    assert sum(taus) / len(taus) > 1.8, taus                 # a random draft gets ~1.0
    # A stock server (no --online-train) feeds the draft post-deepstack features at image rows.
    offline = evaluate_offline(target, draft, prompts, BLOCK, MAX_NEW,
                               context_features="post", progress=False)
    for o, s in zip(offline.prompts, served.prompts):
        assert (o.output_ids, o.verify_steps, o.accept_histogram) == (s.output_ids, s.verify_steps,
                                                                     s.accept_histogram), o.name
    assert offline.tau == served.tau


@pytest.fixture(scope="module")
def second_guess_chain_taus(tiny, second_guess_draft, tmp_path_factory):
    """Offline chain accept length per request (SGLang's EAGLE3 chain verify rule) of the second-guess draft
    on the plain fixture's requests."""
    from trainer.evaluate import evaluate_offline

    report = evaluate_offline(tiny.dense, second_guess_draft, mixed_prompts_file(tmp_path_factory.mktemp("sg")),
                              BLOCK, MAX_NEW, context_features="post", progress=False)
    return [p.accept_length for p in report.prompts]


def test_second_guess_draft_chain_accepts_little(second_guess_chain_taus):
    """Its first guesses are usually wrong (the trained draft's chain gets about 2.7 on the text prompts)."""
    assert sum(second_guess_chain_taus[:6]) / 6 < 1.3, second_guess_chain_taus


@pytest.mark.parametrize("topk,draft_tokens", [(2, 6), (4, 8)])
def test_eagle3_tree_serves_greedy_exactly(tiny, second_guess_draft, second_guess_chain_taus, plain, server_log_dir,
                                           topk, draft_tokens):
    requests, expected = plain
    args = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(second_guess_draft),
            "--speculative-num-steps", str(BLOCK - 1), "--speculative-eagle-topk", str(topk),
            "--speculative-num-draft-tokens", str(draft_tokens)]
    with launch_server(tiny.dense, args, log_dir=server_log_dir, name=f"eagle3-topk{topk}") as server:
        results = [server.generate(t, im, max_new_tokens=MAX_NEW) for t, im in requests]
        # Sampled serving (temperature 0.7) runs the torch port of SGLang's tree speculative sampling, whose
        # output distribution tests/test_cpu_ops.py checks against the target's.
        sampled = [server.post("/generate", {"text": t, "sampling_params": {
            "max_new_tokens": MAX_NEW, "temperature": 0.7, "ignore_eos": True}}) for t, _ in requests[:4]]
    assert [r["output_ids"] for r in results] == expected
    # Side branches are accepted: on the same requests the tree gets more than the chain of the same draft
    # (offline chain; the chain test above shows offline == served for a chain).
    taus = [r["meta_info"]["spec_accept_length"] for r in results]
    chain = second_guess_chain_taus
    assert sum(taus) / len(taus) > sum(chain) / len(chain) + 0.05, (taus, chain)
    for r in sampled:
        assert len(r["output_ids"]) == MAX_NEW and r["meta_info"]["spec_verify_ct"] >= 1, r["meta_info"]
    assert any(r["output_ids"] != e for r, e in zip(sampled, expected[:4]))   # it really sampled


def test_eagle3_tree_on_moe_serves_greedy_exactly(tiny, moe_trained_draft, moe_plain, server_log_dir):
    """The MoE target verifies a topk-2 tree under the tree mask too: greedy output equals plain serving."""
    requests, expected = moe_plain
    args = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(moe_trained_draft),
            "--speculative-num-steps", str(BLOCK - 1), "--speculative-eagle-topk", "2",
            "--speculative-num-draft-tokens", "6"]
    with launch_server(tiny.moe, args, log_dir=server_log_dir, name="eagle3-moe-topk2") as server:
        results = [server.generate(t, im, max_new_tokens=MAX_NEW) for t, im in requests]
    assert [r["output_ids"] for r in results] == expected
    taus = [r["meta_info"]["spec_accept_length"] for r in results]
    assert sum(taus) / len(taus) > 1.8, taus
