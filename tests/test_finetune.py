"""trainer.finetune: CLI, early and clear errors, schedule, batching, resume, time limit, target loading."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import trainer.dflash_kind as dflash_kind
from trainer.dflash_draft import DFlashDraft
from trainer.finetune import build_parser, lr_factor, main, plan_batches
from trainer.replay import ReplaySpec, write_replay
from support.synthetic import synthetic_records, tiny_draft_config, write_tiny_target
from trainer.target import TargetIdentity, load_target_head, target_identity

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_dir(tmp_path):
    target = write_tiny_target(tmp_path / "target", hidden_size=64, num_layers=4, vocab_size=300)
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2))
    (tmp_path / "draft.json").write_text(json.dumps(cfg.to_dict()))
    write_replay(tmp_path / "replay", ReplaySpec(target_identity(target), (1, 2), 64, "bfloat16"),
                 synthetic_records(24, num_layers=2, hidden_size=64), max_shard_tokens=400)
    return tmp_path


def argv(d: Path, *extra: str, output: str = "out") -> list[str]:
    return ["--replay", str(d / "replay"), "--target-model-path", str(d / "target"), "--draft-config",
            str(d / "draft.json"), "--output", str(d / output), "--batch-size", "4", "--num-anchors", "6",
            "--no-progress", *extra]


# ---- CLI -------------------------------------------------------------------------------------------------

def test_help_documents_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    result = subprocess.run([sys.executable, "-m", "trainer.finetune", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--replay", "--target-model-path", "--draft-model-path", "--draft-config", "--output", "--lr",
                 "--warmup-ratio", "--weight-decay", "--grad-clip", "--block-size", "--num-anchors", "--gamma",
                 "--batch-size", "--max-tokens-per-batch", "--max-steps", "--epochs", "--max-minutes", "--seed",
                 "--device", "--dtype", "--attention-backend", "--checkpoint-every", "--resume", "--export-dtype"):
        assert flag in result.stdout, flag
    text = " ".join(result.stdout.split())
    assert "(default: 0.0006)" in text and "(default: 0.04)" in text


def test_defaults_are_the_published_recipe():
    args = build_parser().parse_args(["--replay", "r", "--target-model-path", "t", "--draft-config", "c",
                                      "--output", "o"])
    assert (args.lr, args.warmup_ratio, args.weight_decay, args.grad_clip, args.gamma, args.num_anchors) == \
        (6e-4, 0.04, 0.0, 1.0, 7.0, 512)


def test_draft_source_is_required_and_exclusive(setup_dir, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--replay", "r", "--target-model-path", "t", "--output", "o"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--replay", "r", "--target-model-path", "t", "--output", "o",
                                   "--draft-config", "c", "--draft-model-path", "p"])


# ---- early, clear errors ------------------------------------------------------------------------------------

def expect_error(args: list[str], *fragments: str, output: Path | None = None):
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value.code)
    for f in fragments:
        assert f in msg, (f, msg)
    if output is not None:
        assert not output.exists(), "failed before training, so nothing should be written"
    return msg


def test_missing_target_checkpoint(setup_dir):
    d = setup_dir
    a = argv(d)
    a[a.index("--target-model-path") + 1] = str(d / "nope")
    expect_error(a, "target checkpoint directory not found", str(d / "nope"), output=d / "out")
    (d / "empty_target").mkdir()
    a[a.index("--target-model-path") + 1] = str(d / "empty_target")
    expect_error(a, "has no config.json", output=d / "out")


def test_replay_layer_ids_differ_from_draft(setup_dir):
    d = setup_dir
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 3))
    (d / "draft.json").write_text(json.dumps(cfg.to_dict()))
    expect_error(argv(d), "layer_ids", "[1, 2]", "[1, 3]", str(d / "replay" / "manifest.json"), output=d / "out")


def test_draft_hidden_size_differs_from_target(setup_dir):
    d = setup_dir
    cfg = tiny_draft_config(hidden_size=32, target_layer_ids=(1, 2))
    (d / "draft.json").write_text(json.dumps(cfg.to_dict()))
    expect_error(argv(d), "draft hidden_size 32 != target hidden_size 64", output=d / "out")


def test_replay_hidden_size_differs(setup_dir):
    d = setup_dir
    write_replay(d / "replay32", ReplaySpec(target_identity(d / "target"), (1, 2), 32, "bfloat16"),
                 synthetic_records(2, num_layers=2, hidden_size=32))
    a = argv(d)
    a[a.index("--replay") + 1] = str(d / "replay32")
    expect_error(a, "hidden_size", "replay has 32, expected 64", output=d / "out")


def test_replay_from_another_target(setup_dir):
    d = setup_dir
    other = TargetIdentity("some/other-model", "sha256:" + "0" * 64)
    write_replay(d / "replay_other", ReplaySpec(other, (1, 2), 64, "bfloat16"),
                 synthetic_records(8, num_layers=2, hidden_size=64))
    a = argv(d, "--max-steps", "1")
    a[a.index("--replay") + 1] = str(d / "replay_other")
    expect_error(a, "captured from some/other-model", output=d / "out")
    assert main(a + ["--ignore-target-hash"]).steps == 1


def test_draft_made_for_another_target_depth(setup_dir):
    d = setup_dir
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2), num_target_layers=6)
    (d / "draft.json").write_text(json.dumps(cfg.to_dict()))
    expect_error(argv(d), "num_target_layers 6 != target num_hidden_layers 4", output=d / "out")
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 5), num_target_layers=6)
    (d / "draft.json").write_text(json.dumps(cfg.to_dict()))
    expect_error(argv(d), "[5] out of range for the target's 4 layers", output=d / "out")


def test_bad_values_and_missing_paths(setup_dir):
    d = setup_dir
    expect_error(argv(d, "--lr", "-1"), "--lr must be positive", output=d / "out")
    a = argv(d)
    a[a.index("--replay") + 1] = str(d / "missing_replay")
    expect_error(a, "replay directory does not exist", output=d / "out")
    a = argv(d)
    a[a.index("--draft-config") + 1] = str(d / "missing.json")
    expect_error(a, "draft config not found", output=d / "out")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main(argv(d, "--device", "cuda"))


# ---- schedule and batching ----------------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine():
    total, warmup = 100, 4
    f = [lr_factor(s, total, warmup, 0.1) for s in range(total + 1)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert f[52] == pytest.approx(0.1 + 0.9 * 0.5)                 # halfway through the cosine
    assert f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_plan_batches_respects_budget_and_covers_each_record_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (101,), generator=g).tolist()
    batches = plan_batches(lengths, batch_size=8, max_tokens=600, generator=torch.Generator().manual_seed(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(101))
    for b in batches:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 600
    again = plan_batches(lengths, batch_size=8, max_tokens=600, generator=torch.Generator().manual_seed(1))
    assert again == batches


# ---- runs -----------------------------------------------------------------------------------------------------

def test_resume_continues_exactly(setup_dir, monkeypatch):
    d = setup_dir
    straight = main(argv(d, "--max-steps", "8", "--checkpoint-every", "4", "--seed", "3", output="a"))
    assert straight.steps == 8

    calls = {"n": 0}
    real = dflash_kind.dflash_loss          # the objective every step of finetune goes through

    def crash_on_sixth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(dflash_kind, "dflash_loss", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        main(argv(d, "--max-steps", "8", "--checkpoint-every", "4", "--seed", "3", output="b"))
    monkeypatch.setattr(dflash_kind, "dflash_loss", real)
    assert [p.name for p in (d / "b" / "checkpoints").iterdir()] == ["step-00000004"]
    resumed = main(argv(d, "--max-steps", "8", "--checkpoint-every", "4", "--seed", "3", "--resume", output="b"))
    assert resumed.resumed_from.endswith("step-00000004") and resumed.steps == 8
    a = DFlashDraft.from_pretrained(d / "a" / "checkpoints" / "step-00000008").state_dict()
    b = DFlashDraft.from_pretrained(d / "b" / "checkpoints" / "step-00000008").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name


def test_max_minutes_stops_checkpoints_and_exports(setup_dir):
    d = setup_dir
    result = main(argv(d, "--max-steps", "1000", "--max-minutes", "0.0001"))
    assert result.stopped == "max_minutes" and 1 <= result.steps < 1000
    assert (d / "out" / "model.safetensors").is_file() and (d / "out" / "config.json").is_file()
    assert (d / "out" / "checkpoints" / f"step-{result.steps:08d}").is_dir()


def test_fine_tune_an_existing_draft_with_epochs(setup_dir):
    d = setup_dir
    first = main(argv(d, "--max-steps", "2", output="first"))
    assert first.steps == 2
    a = argv(d, "--epochs", "1", "--block-size", "3", output="second")
    a[a.index("--draft-config"):a.index("--draft-config") + 2] = ["--draft-model-path", str(d / "first")]
    second = main(a)
    assert second.total_steps == math.ceil(24 / 4) and second.steps == second.total_steps   # 24 records, 4/batch
    assert json.loads((d / "second" / "config.json").read_text())["block_size"] == 3


# ---- target checkpoint loading -------------------------------------------------------------------------------

def test_target_head_untied_tied_and_sharded(tmp_path):
    untied = write_tiny_target(tmp_path / "untied", hidden_size=32, vocab_size=50)
    e, h, info = load_target_head(untied)
    assert e.shape == h.shape == (50, 32) and not torch.equal(e, h) and info.num_hidden_layers == 4
    tied = write_tiny_target(tmp_path / "tied", hidden_size=32, vocab_size=50, tie_word_embeddings=True)
    e, h, info = load_target_head(tied)
    assert h is e and info.tie_word_embeddings
    # sharded layout with an index, text-only Qwen3 names
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2,
                                                     "vocab_size": 50}))
    emb, head = torch.randn(50, 32), torch.randn(50, 32)
    save_file({"model.embed_tokens.weight": emb}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.weight": head}, str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    e, h, _ = load_target_head(sharded)
    assert torch.equal(e, emb) and torch.equal(h, head)
    # untied but no lm_head: a clear error
    (untied / "model.safetensors").unlink()
    save_file({"model.language_model.embed_tokens.weight": emb}, str(untied / "model.safetensors"))
    with pytest.raises(ValueError, match="no lm_head"):
        load_target_head(untied)


def test_target_identity_tracks_config_content(tmp_path):
    t = write_tiny_target(tmp_path / "t")
    a = target_identity(t)
    assert a.model == str(t) and a.config_hash.startswith("sha256:") and len(a.config_hash) == 71
    cfg = json.loads((t / "config.json").read_text())
    (t / "config.json").write_text(json.dumps(cfg, indent=7))             # formatting does not matter
    assert target_identity(t) == a
    cfg["text_config"]["num_hidden_layers"] = 5
    (t / "config.json").write_text(json.dumps(cfg))
    assert target_identity(t).config_hash != a.config_hash
    assert target_identity(t, name="Qwen/Qwen3-VL-8B-Instruct").model == "Qwen/Qwen3-VL-8B-Instruct"


def test_bfloat16_autocast_run_on_cpu(setup_dir):
    d = setup_dir
    result = main(argv(d, "--max-steps", "3", "--dtype", "bfloat16", "--log-every", "1"))
    log = [json.loads(line) for line in (d / "out" / "train_log.jsonl").read_text().splitlines()]
    assert result.steps == 3 and len(log) == 3 and all(math.isfinite(row["loss"]) for row in log)
    from safetensors.torch import load_file
    master = load_file(str(d / "out" / "checkpoints" / "step-00000003" / "model.safetensors"))
    exported = load_file(str(d / "out" / "model.safetensors"))
    assert {t.dtype for t in master.values()} == {torch.float32}          # fp32 master weights
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}       # --export-dtype default
