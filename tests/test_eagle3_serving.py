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

from sglang_ext.demo.prompts import IMAGE_QUESTIONS, TEXT_PROMPTS, make_image
from sglang_ext.launcher import draft_args, launch_server
from support.servers import launch_servers, run_concurrently
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


@pytest.fixture(scope="module")
def plain(plain_reference):
    """mixed_requests(6, 2) and a plain server's greedy outputs (conftest's session-wide plain_reference; both
    targets' plain servers start together)."""
    plain_reference.prefetch("dense", "moe")
    return plain_reference("dense", MAX_NEW)


@pytest.fixture(scope="module")
def moe_trained_draft(tiny, tmp_path_factory):
    return train_draft(tiny.moe, tmp_path_factory.mktemp("eagle3-moe"))


@pytest.fixture(scope="module")
def moe_plain(plain_reference):
    plain_reference.prefetch("dense", "moe")
    return plain_reference("moe", MAX_NEW)


def mixed_prompts_file(directory: Path) -> Path:
    """The requests of mixed_requests(6, 2) as a chat JSONL for the offline evaluator."""
    prompts = [{"messages": [{"role": "user", "content": t}]} for t in TEXT_PROMPTS[:6]]
    for i in range(2):
        make_image(i).save(directory / f"im{i}.png")
        prompts.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"im{i}.png"},
                                                                  {"type": "text", "text": IMAGE_QUESTIONS[i]}]}]})
    (directory / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return directory / "prompts.jsonl"


@pytest.fixture(scope="module")
def chain_runs(tiny, trained_draft, moe_trained_draft, plain, moe_plain, server_log_dir, tmp_path_factory):
    """Both chain servers (topk 1; dense and MoE, each with its trained draft), started together: per variant,
    the greedy /generate answers to the plain requests and the served evaluator's report (the prompts file
    through the same server)."""
    from trainer.evaluate import evaluate_served

    variants = {"dense": (trained_draft, plain[0]), "moe": (moe_trained_draft, moe_plain[0])}
    prompts = mixed_prompts_file(tmp_path_factory.mktemp("chain-prompts"))

    def serve(server, variant):
        draft, requests = variants[variant]
        results = [server.generate(t, im, max_new_tokens=MAX_NEW) for t, im in requests]
        served = evaluate_served(getattr(tiny, variant), draft, prompts, BLOCK, MAX_NEW, url=server.url,
                                 progress=False)
        return results, served

    with launch_servers(*(launch_server(getattr(tiny, v), draft_args(variants[v][0], BLOCK), log_dir=server_log_dir,
                                        name=f"eagle3-chain-{v}") for v in variants)) as servers:
        runs = run_concurrently(*(lambda s=s, v=v: serve(s, v) for s, v in zip(servers, variants)))
    return {"prompts": prompts, **dict(zip(variants, runs))}


# The first one's setup trains both drafts and starts four servers (plain, chain; both targets): more than
# pytest's default 900 s limit on a loaded 2-core machine.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_eagle3_chain_serves_greedy_exactly_and_served_tau_equals_offline(tiny, chain_runs, request, variant):
    from trainer.evaluate import evaluate_offline

    target = getattr(tiny, variant)
    prefix = "" if variant == "dense" else "moe_"            # module fixtures, shared with the tree tests
    draft, (_, expected) = request.getfixturevalue(f"{prefix}trained_draft"), request.getfixturevalue(f"{prefix}plain")
    prompts = chain_runs["prompts"]
    results, served = chain_runs[variant]
    assert [r["output_ids"] for r in results] == expected
    taus = [r["meta_info"]["spec_accept_length"] for r in results]
    assert sum(taus) / len(taus) > 1.8, taus                 # a random draft gets ~1.0
    # The draft was exported by trainer.finetune, so its config.json says it learned pre-deepstack features,
    # and the plugin feeds it those even without --online-train (sglang_ext/hooks.py): the offline default.
    offline = evaluate_offline(target, draft, prompts, BLOCK, MAX_NEW, context_features="pre", progress=False)
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
                              BLOCK, MAX_NEW, context_features="pre", progress=False)   # as served: marked
    return [p.accept_length for p in report.prompts]


def test_second_guess_draft_chain_accepts_little(second_guess_chain_taus):
    """Its first guesses are usually wrong (the trained draft's chain gets about 2.7 on the text prompts)."""
    assert sum(second_guess_chain_taus[:6]) / 6 < 1.3, second_guess_chain_taus


TREES = {  # name: (variant, topk, num draft tokens)
    "topk2": ("dense", 2, 6), "topk4": ("dense", 4, 8), "moe-topk2": ("moe", 2, 6)}


@pytest.fixture(scope="module")
def tree_runs(tiny, second_guess_draft, moe_trained_draft, plain, moe_plain, server_log_dir):
    """The three tree servers, started together: dense topk 2 and 4 with the second-guess draft (greedy answers
    to the plain requests, and sampled answers to the first 4), MoE topk 2 with the trained MoE draft (greedy)."""
    drafts = {"dense": second_guess_draft, "moe": moe_trained_draft}
    requests = {"dense": plain[0], "moe": moe_plain[0]}

    def launcher(name):
        variant, topk, draft_tokens = TREES[name]
        args = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(drafts[variant]),
                "--speculative-num-steps", str(BLOCK - 1), "--speculative-eagle-topk", str(topk),
                "--speculative-num-draft-tokens", str(draft_tokens)]
        return launch_server(getattr(tiny, variant), args, log_dir=server_log_dir, name=f"eagle3-{name}")

    def serve(server, name):
        variant = TREES[name][0]
        results = [server.generate(t, im, max_new_tokens=MAX_NEW) for t, im in requests[variant]]
        sampled = None
        if variant == "dense":
            # Sampled serving (temperature 0.7) runs the torch port of SGLang's tree speculative sampling, whose
            # output distribution tests/test_cpu_ops.py checks against the target's.
            sampled = [server.post("/generate", {"text": t, "sampling_params": {
                "max_new_tokens": MAX_NEW, "temperature": 0.7, "ignore_eos": True}}) for t, _ in requests[variant][:4]]
        return results, sampled

    with launch_servers(*(launcher(name) for name in TREES)) as servers:
        runs = run_concurrently(*(lambda s=s, n=n: serve(s, n) for s, n in zip(servers, TREES)))
    return dict(zip(TREES, runs))


@pytest.mark.parametrize("topk,draft_tokens", [(2, 6), (4, 8)])
def test_eagle3_tree_serves_greedy_exactly(second_guess_chain_taus, plain, tree_runs, topk, draft_tokens):
    requests, expected = plain
    assert TREES[f"topk{topk}"] == ("dense", topk, draft_tokens)
    results, sampled = tree_runs[f"topk{topk}"]
    assert [r["output_ids"] for r in results] == expected
    # Side branches are accepted: on the same requests the tree gets more than the chain of the same draft
    # (offline chain; the chain test above shows offline == served for a chain).
    taus = [r["meta_info"]["spec_accept_length"] for r in results]
    chain = second_guess_chain_taus
    assert sum(taus) / len(taus) > sum(chain) / len(chain) + 0.05, (taus, chain)
    for r in sampled:
        assert len(r["output_ids"]) == MAX_NEW and r["meta_info"]["spec_verify_ct"] >= 1, r["meta_info"]
    assert any(r["output_ids"] != e for r, e in zip(sampled, expected[:4]))   # it really sampled


def test_eagle3_tree_on_moe_serves_greedy_exactly(moe_plain, tree_runs):
    """The MoE target verifies a topk-2 tree under the tree mask too: greedy output equals plain serving."""
    requests, expected = moe_plain
    results, _ = tree_runs["moe-topk2"]
    assert [r["output_ids"] for r in results] == expected
    taus = [r["meta_info"]["spec_accept_length"] for r in results]
    assert sum(taus) / len(taus) > 1.8, taus
