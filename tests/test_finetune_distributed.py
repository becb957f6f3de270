"""trainer.finetune under torchrun (trainer.distributed): 2 CPU ranks (gloo) follow the loss curve of one process
on the same global batches, rank 0 alone writes, checkpoints resume on another number of ranks (DDP -> 1
process, 1 process -> FSDP), and the pieces that make this exact (loss terms over global denominators,
per-sequence anchor sampling) hold in-process.

Tolerance: the ranks compute the same sums as one process in another order (each rank pads to its own longest
sequence; numerators and denominators are summed across ranks in float64), so the curves agree to float32
rounding: measured max relative loss difference ~1e-7 over 6 steps; asserted at 1e-5.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.synthetic import synthetic_records, tiny_draft_config, write_tiny_target
from trainer.distributed import Dist, rank_share
from trainer.finetune import anchor_generators, build_parser, main
from trainer.objective import dflash_loss, sample_anchors
from trainer.replay import ReplaySpec, write_replay
from trainer.target import target_identity

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = 6


def argv(d: Path, output: str, *extra: str) -> list[str]:
    # max-tokens 100 over records of 24..48 tokens: micro-batches of 1 to 3 sequences, so some leave rank 1
    # without a share (the zero-weight stand-in); grad-accum 2: DDP's no_sync on the first micro-batch
    return ["--replay", str(d / "replay"), "--target-model-path", str(d / "target"), "--draft-config",
            str(d / "draft.json"), "--output", str(d / output), "--batch-size", "3", "--max-tokens-per-batch", "100",
            "--grad-accum", "2", "--num-anchors", "6", "--seed", "3", "--max-steps", str(STEPS), "--log-every", "1",
            "--checkpoint-every", "3", "--keep-checkpoints", "5", "--no-progress", *extra]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "trainer.finetune", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_curve(rows: list[dict], ref: list[dict]) -> float:
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    worst = 0.0
    for r, e in zip(rows, ref):
        worst = max(worst, abs(r["loss"] - e["loss"]) / abs(e["loss"]))
        assert r["loss"] == pytest.approx(e["loss"], rel=RTOL), (r, e)
        assert r["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4), (r, e)
        assert (r["accuracy"], r["accept_len"], r["tokens_seen"], r["epoch"]) == \
            (e["accuracy"], e["accept_len"], e["tokens_seen"], e["epoch"])
    return worst


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def resume_from(src: Path, step: int, dst: Path) -> None:
    """A fresh output directory holding only `src`'s checkpoint at `step` (as if the run had stopped there)."""
    shutil.copytree(checkpoint(src, step), checkpoint(dst, step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and 2 DDP ranks on the same global batches (6 steps, checkpoints at 3 and 6)."""
    d = tmp_path_factory.mktemp("dist")
    target = write_tiny_target(d / "target", hidden_size=64, num_layers=4, vocab_size=300)
    (d / "draft.json").write_text(json.dumps(tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2)).to_dict()))
    write_replay(d / "replay", ReplaySpec(target_identity(target), (1, 2), 64, "bfloat16"),
                 synthetic_records(24, num_layers=2, hidden_size=64), max_shard_tokens=400)
    one = main(argv(d, "one"))
    assert one.steps == STEPS
    ddp = torchrun(argv(d, "ddp"))
    return d, ddp


# ---- torchrun ----------------------------------------------------------------------------------------------

def test_two_ranks_follow_the_one_process_loss_curve(runs):
    d, _ = runs
    worst = assert_same_curve(log_rows(d / "ddp"), log_rows(d / "one"))
    assert worst < RTOL
    assert_same_weights(checkpoint(d / "ddp", STEPS), checkpoint(d / "one", STEPS))


def test_rank_zero_alone_logs_checkpoints_and_exports(runs):
    d, proc = runs
    out = d / "ddp"
    assert len(log_rows(out)) == STEPS                                  # one writer, one line per step
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and not summary["fsdp"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    text = proc.stdout + proc.stderr
    assert text.count("trainer.finetune: done:") == 1                   # rank 1 logs warnings only
    state = torch.load(checkpoint(out, STEPS) / "trainer_state.pt", weights_only=True)
    assert state["optimizer_format"] == "by_name" and state["world_size"] == 2
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # keyed by parameter name


def test_ddp_checkpoint_resumes_in_one_process(runs):
    d, _ = runs
    resume_from(d / "ddp", 3, d / "ddp_then_one")
    result = main(argv(d, "ddp_then_one", "--resume"))
    assert result.resumed_from.endswith("step-00000003") and result.steps == STEPS
    assert_same_curve(log_rows(d / "ddp_then_one"), log_rows(d / "one")[3:])
    assert_same_weights(checkpoint(d / "ddp_then_one", STEPS), checkpoint(d / "one", STEPS))


def test_fsdp_resumes_a_one_process_checkpoint_on_two_ranks(runs):
    """FSDP2 (fully_shard) on gloo: loads the full optimizer state into its shards, trains on the same curve,
    and gathers full weights and a by-name optimizer state into its checkpoint."""
    d, _ = runs
    resume_from(d / "one", 3, d / "one_then_fsdp")
    torchrun(argv(d, "one_then_fsdp", "--resume", "--fsdp"))
    out = d / "one_then_fsdp"
    assert_same_curve(log_rows(out), log_rows(d / "one")[3:])
    assert_same_weights(checkpoint(out, STEPS), checkpoint(d / "one", STEPS))
    assert json.loads((out / "training_summary.json").read_text())["fsdp"] is True
    ref = torch.load(checkpoint(d / "one", STEPS) / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    got = torch.load(checkpoint(out, STEPS) / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name]["exp_avg_sq"], ref[name]["exp_avg_sq"], rtol=1e-3, atol=1e-12,
                                   msg=name)
    exported = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}


# ---- the pieces, in-process ------------------------------------------------------------------------------------

def test_help_explains_torchrun_and_fsdp():
    text = " ".join(build_parser().format_help().split())
    assert "--fsdp" in text and "torchrun" in text and "cuda:LOCAL_RANK" in text


def test_rank_shares_cover_each_sequence_once():
    batch = [7, 3, 9, 1, 4]
    shares = [rank_share(batch, Dist(rank=r, world_size=2)) for r in range(2)]
    assert shares == [[7, 9, 4], [3, 1]]
    assert rank_share([5], Dist(rank=1, world_size=2)) == []            # trains on the zero-weight stand-in
    assert rank_share(batch, Dist()) == batch


def test_anchors_of_a_sequence_do_not_depend_on_its_batch():
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 30:] = False
    whole = sample_anchors(mask, 6, anchor_generators(3, 5, 2, [10, 11, 12]))
    alone = sample_anchors(mask[1:2, :30], 6, anchor_generators(3, 5, 2, [11]))
    assert torch.equal(whole[1], alone[0])
    assert not torch.equal(whole[0], sample_anchors(mask[:1], 6, anchor_generators(3, 6, 2, [10]))[0])  # next step


def _split_matches_whole(model, loss_of):
    """Two 'ranks' holding rows [0] and [1:] of a batch (loss_of(rows) -> ObjectiveOutput): their loss terms over
    the global denominators add up to the whole batch's loss and gradient (what TrainStep backpropagates under
    DDP, before the x world_size that DDP's averaging cancels)."""
    params = [p for p in model.parameters() if p.requires_grad]
    whole = loss_of(slice(None))
    whole_grads = torch.autograd.grad(whole.loss, params)
    parts = [loss_of(rows) for rows in (slice(0, 1), slice(1, None))]
    dens = [sum(float(p.loss_terms[k][1]) for p in parts) for k in range(len(parts[0].loss_terms))]
    total = sum(num / den for p in parts for (num, _), den in zip(p.loss_terms, dens) if den > 0)
    torch.testing.assert_close(total, whole.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(total, params), whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dflash_loss_terms_split_across_ranks_like_one_batch():
    from trainer.dflash_draft import DFlashDraft
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2))
    draft = DFlashDraft.from_scratch(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    draft.attach_target(torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g))
    ids = torch.randint(0, 290, (3, 20), generator=g)
    feats = torch.randn(3, 20, 128, generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[:, :3] = False
    mask[2, 12:] = False
    anchors = sample_anchors(mask, 5, anchor_generators(0, 0, 0, [0, 1, 2]))
    _split_matches_whole(draft, lambda rows: dflash_loss(draft, feats[rows], ids[rows], mask[rows],
                                                         anchors=anchors[rows], backend="reference"))


def test_eagle3_loss_terms_split_across_ranks_like_one_batch():
    from trainer.eagle3_draft import Eagle3Config, Eagle3Draft
    from trainer.eagle3_objective import eagle3_loss
    cfg = Eagle3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=300, draft_vocab_size=120, aux_layer_ids=[1, 2, 3],
                       num_target_layers=6, rope_theta=10000.0, block_size=4)
    draft = Eagle3Draft.from_scratch(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    draft.set_draft_vocab(torch.randperm(300, generator=g)[:120].sort().values)
    draft.attach_target(torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g) * 0.3,
                        torch.rand(64, generator=g) + 0.5, 1e-6)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    feats = torch.randn(3, 12, 4 * 64, generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[:, :3] = False
    mask[0, 6:] = False                  # rank 0's short sequence: fewer valid rows at the later TTT steps
    _split_matches_whole(draft, lambda rows: eagle3_loss(draft, feats[rows], ids[rows], mask[rows], ttt_steps=3,
                                                         backend="reference"))
