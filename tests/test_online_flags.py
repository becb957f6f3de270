"""--online-train flags: parsing, validation and startup errors (no server needed)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_ext.online.config import ENV_VAR, OnlineTrainConfig, OnlineTrainConfigError, check_server_args, parse_size
from sglang_ext.online.flags import parse_argv


def test_absent_flag_means_disabled():
    assert parse_argv(["--model-path", "x", "--port", "1"]) is None


def test_flags_and_config_file(tmp_path):
    cfg_file = tmp_path / "online.json"
    cfg_file.write_text(json.dumps({"storage_dtype": "fp8", "sample_rate": 0.5, "replay_budget_bytes": "1MB"}))
    persist = tmp_path / "replay"
    cfg = parse_argv(["--model-path", "x", "--online-train", "--online-train-config", str(cfg_file),
                      "--online-train-sample-rate", "0.25", "--online-train-persist-dir", str(persist)])
    assert cfg.enabled and cfg.storage_dtype == "fp8"
    assert cfg.sample_rate == 0.25                      # the command line overrides the file
    assert cfg.replay_budget_bytes == 10**6
    assert cfg.persist_dir == str(persist) and persist.is_dir()
    assert OnlineTrainConfig(**json.loads(cfg.to_env())) == cfg
    sized = parse_argv(["--online-train", "--online-train-max-memory", "6GiB", "--online-train-queue-bytes", "64MB",
                        "--online-train-duty-cycle", "0.25", "--online-train-malloc-trim-seconds", "0"])
    assert (sized.max_memory_bytes, sized.queue_bytes, sized.duty_cycle) == (6 * 2**30, 64 * 10**6, 0.25)
    assert sized.malloc_trim_seconds == 0 and parse_argv(["--online-train"]).malloc_trim_seconds == 60
    settings = sized.trainer_settings()
    assert (settings.max_memory_bytes, settings.inbox_bytes, settings.duty_cycle) == (6 * 2**30, 64 * 10**6, 0.25)


@pytest.mark.parametrize("text, want", [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), ("1000", 1000),
                                        ("1.5kb", 1500)])
def test_parse_size(text, want):
    assert parse_size(text, "budget") == want


@pytest.mark.parametrize("argv, message", [
    (["--online-train-persist-dir", "/tmp/x"], "--online-train-persist-dir given without --online-train"),
    (["--online-train", "--online-train-replay-budget", "lots"], "cannot parse size 'lots'"),
    (["--online-train", "--online-train-replay-budget", "0"], "must be positive"),
    (["--online-train", "--online-train-sample-rate", "1.5"], "sample_rate must be in (0, 1]"),
    (["--online-train", "--online-train-config", "/nonexistent/online.json"], "no such file"),
    (["--online-train", "--online-train-lr", "0"], "online-train lr must be positive"),
    (["--online-train", "--online-train-swap-every", "0"], "online-train swap_every must be positive"),
    (["--online-train", "--online-train-device", "tpu"], "--online-train-device must be auto, cpu, cuda or cuda:N"),
    (["--online-train", "--online-train-duty-cycle", "0"], "--online-train-duty-cycle must be in (0, 1]"),
    (["--online-train", "--online-train-duty-cycle", "1.5"], "--online-train-duty-cycle must be in (0, 1]"),
    (["--online-train", "--online-train-max-memory", "much"], "--online-train-max-memory: cannot parse size"),
    (["--online-train", "--online-train-queue-bytes", "-1"], "--online-train-queue-bytes: cannot parse size"),
    (["--online-train", "--online-train-malloc-trim-seconds", "-1"],
     "--online-train-malloc-trim-seconds must be a number of seconds >= 0 (0: off), got -1.0"),
])
def test_bad_values_are_named(argv, message):
    with pytest.raises(OnlineTrainConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_argv(argv)


def test_bad_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OnlineTrainConfigError, match="bad.json: invalid JSON"):
        parse_argv(["--online-train", "--online-train-config", str(bad)])
    bad.write_text(json.dumps({"replay_budget": 1}))
    with pytest.raises(OnlineTrainConfigError, match="unknown key"):
        parse_argv(["--online-train", "--online-train-config", str(bad)])
    bad.write_text(json.dumps({"replay_policy": "lifo"}))
    with pytest.raises(OnlineTrainConfigError, match="--online-train-replay-policy must be uniform or recency"):
        parse_argv(["--online-train", "--online-train-config", str(bad)])


def test_persist_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OnlineTrainConfigError, match="not a directory"):
        parse_argv(["--online-train", "--online-train-persist-dir", str(f)])


def test_needs_dflash_and_a_draft():
    cfg = OnlineTrainConfig(enabled=True)
    with pytest.raises(OnlineTrainConfigError, match="needs --speculative-algorithm DFLASH"):
        check_server_args(cfg, SimpleNamespace(speculative_algorithm=None, speculative_draft_model_path="d"))
    with pytest.raises(OnlineTrainConfigError, match="needs --speculative-algorithm DFLASH"):
        check_server_args(cfg, SimpleNamespace(speculative_algorithm="EAGLE", speculative_draft_model_path="d"))
    with pytest.raises(OnlineTrainConfigError, match="--speculative-draft-model-path"):
        check_server_args(cfg, SimpleNamespace(speculative_algorithm="DFLASH", speculative_draft_model_path=None))
    check_server_args(cfg, SimpleNamespace(speculative_algorithm="DFLASH", speculative_draft_model_path="d"))


@pytest.mark.parametrize("field,value,flag", [("dp_size", 2, "--dp-size"), ("attn_dp_size", 2, "--attn-dp-size"),
                                              ("pp_size", 2, "--pp-size"),
                                              ("enable_dp_attention", True, "--enable-dp-attention")])
def test_data_parallel_and_pipeline_stages_are_refused(field, value, flag):
    """One learner per server: --tp is supported (TP rank 0 trains); DP replicas and pipeline stages are not."""
    cfg = OnlineTrainConfig(enabled=True)
    args = dict(speculative_algorithm="DFLASH", speculative_draft_model_path="d", tp_size=2)
    check_server_args(cfg, SimpleNamespace(**args))
    with pytest.raises(OnlineTrainConfigError, match=flag):
        check_server_args(cfg, SimpleNamespace(**args, **{field: value}))


def test_real_launcher_help_and_fail_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "SGLANG_PLATFORM")}
    help_out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                              text=True, env=env, timeout=300)
    assert help_out.returncode == 0
    for flag in ("--online-train ", "--online-train-config", "--online-train-replay-budget",
                 "--online-train-persist-dir", "--online-train-storage-dtype", "--online-train-learn-from",
                 "--online-train-sample-rate", "--online-train-include-prompt-loss",
                 "--online-train-max-record-tokens", "--online-train-capture-only", "--online-train-device",
                 "--online-train-threads", "--online-train-lr", "--online-train-batch-size",
                 "--online-train-num-anchors", "--online-train-swap-every", "--online-train-min-records",
                 "--online-train-holdout-every", "--online-train-checkpoint-dir",
                 "--online-train-keep-checkpoints", "--online-train-heartbeat-timeout",
                 "--online-train-max-memory", "--online-train-duty-cycle", "--online-train-queue-bytes",
                 "--online-train-prefix-store", "--online-train-replay-policy"):
        assert flag in help_out.stdout, flag
    # Without a speculative algorithm: a clear error before any model is loaded.
    bad = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                          "--online-train"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert "--online-train needs --speculative-algorithm DFLASH" in bad.stderr
