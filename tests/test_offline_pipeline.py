"""Smoke test of benchmarks/bench_offline_pipeline.py: the whole offline pipeline at toy size, offline tau only.

A quick workload (quick=True, half a minute of target training) in a temporary cache; 8 domain-A train
prompts captured with --regenerate into bf16 and fp8 replays; a calibration run, then ~25 s of
`python -m trainer.finetune` per replay dtype; offline tau (HF simulation of SGLang's verify rule) of the
random, bf16- and fp8-trained drafts on 4 held-out domain-A prompts. No SGLang server. About 3 minutes.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_offline_pipeline.py"
FINETUNE_MINUTES = 0.4


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_offline_pipeline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    bench = load_bench()
    root = tmp_path_factory.mktemp("offline-pipeline")
    settings = bench.Settings.quick_settings(
        cache_dir=str(root / "cache"), work_dir=str(root / "work"), minutes=FINETUNE_MINUTES, workload_minutes=0.5,
        train_prompts=8, capture_new_tokens=32, eval_prompts=4, eval_new_tokens=24, calibration_steps=4,
        served=False, curve_points=2, curve_prompts=2)
    return bench, settings, bench.run_pipeline(settings, progress=False)


def test_capture_writes_same_traffic_in_bf16_and_fp8(pipeline):
    bench, settings, result = pipeline
    capture = result["capture"]
    assert capture["prompts"] == settings.train_prompts == result["prompts"]["train"]
    assert 0 < capture["generated_tokens"] <= settings.train_prompts * settings.capture_new_tokens
    work = Path(settings.work_dir)
    manifests = {d: json.loads((work / f"replay-{d}" / "manifest.json").read_text()) for d in bench.REPLAY_DTYPES}
    assert manifests["bf16"]["storage_dtype"] == "bfloat16"
    assert manifests["fp8"]["storage_dtype"] == "float8_e4m3fn"
    assert manifests["bf16"]["layer_ids"] == manifests["fp8"]["layer_ids"] == [1, 2, 3]
    lengths = {d: [r["length"] for s in m["shards"] for r in s["records"]] for d, m in manifests.items()}
    assert lengths["bf16"] == lengths["fp8"] and sum(lengths["bf16"]) == capture["tokens"]
    # fp8 features are 1 byte + a float32 scale per token and layer, bf16 2 bytes: about half the bytes
    assert 0.45 < capture["fp8_over_bf16_bytes"] <= bench.FP8_BYTES_GOAL


def test_finetune_respects_budget_and_learns(pipeline):
    bench, settings, result = pipeline
    assert result["max_steps"] >= 1 and result["calibration"]["seconds_per_step"] > 0
    for dtype in bench.REPLAY_DTYPES:
        run = result["finetune"][dtype]
        assert run["steps"] >= 10, run
        assert run["train_s"] <= FINETUNE_MINUTES * 60 + 5, run
        assert run["final_loss"] < 0.7 * run["first_loss"], run
        exported = Path(run["output"])
        assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
        config = json.loads((exported / "config.json").read_text())
        assert config["block_size"] == bench.BLOCK_SIZE
        assert config["dflash_config"]["mask_token_id"] == bench.MASK_TOKEN_ID


def test_trained_drafts_beat_the_random_draft_offline(pipeline):
    bench, settings, result = pipeline
    tau = result["tau"]
    assert set(tau) == {"random", "bf16", "fp8"}
    assert all("served" not in t for t in tau.values())                # no server in this test
    assert 1.0 <= tau["random"]["offline"] < 1.3                        # random proposals are (almost) never right
    for dtype in bench.REPLAY_DTYPES:
        assert tau[dtype]["offline"] > tau["random"]["offline"] + 0.3, tau[dtype]["offline"]
        report = tau[dtype]["offline_report"]
        assert len(report["prompts"]) == settings.eval_prompts
        assert all(p["verify_steps"] >= 1 for p in report["prompts"])
    assert result["checks"]["tau_kind"] == "offline"
    assert result["checks"]["fp8_bytes_ok"]
    points = result["curve"]["points"]
    assert points[0]["step"] == 0 and len(points) >= 2
    assert [p["step"] for p in points] == sorted(p["step"] for p in points)


def test_report_table(pipeline):
    bench, settings, result = pipeline
    text = bench.format_report(result)
    for name in ("random", "bf16", "fp8", "tau offline", "shard bytes", "fp8 shard bytes / bf16"):
        assert name in text
    assert f"{result['tau']['bf16']['offline']:.3f}" in text
