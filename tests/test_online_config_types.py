"""--online-train settings are typed (issue 14): every value of a JSON config file, a flag or a key of SGLang's
own --config YAML is checked against its OnlineTrainConfig field's type, numbers are finite, trainer devices
exist, and every bad value is a clean error that names the key (and flag), the value and the expected type."""
import json
import os
import re
import subprocess
import sys

import pytest

from sglang_ext.online.config import ENV_VAR, OnlineTrainConfig, OnlineTrainConfigError, check_device_indexes
from sglang_ext.online.flags import argv_with_sglang_config, parse_argv
from sglang_ext.online.scheduler.hooks import prepare_server_args_with_online_train


def _parse_file(tmp_path, settings: dict | str):
    path = tmp_path / "online.json"
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return parse_argv(["--model-path", "x", "--online-train", "--online-train-config", str(path)])


def _file_error(tmp_path, settings: dict | str) -> str:
    with pytest.raises(OnlineTrainConfigError) as e:
        _parse_file(tmp_path, settings)
    return str(e.value)


# (JSON text of the file, what the error must say): each case of issue 14's "Config" bullet, and values that
# raised a raw exception before.
BAD_FILES = {
    "bool_from_string": ('{"trainer": "false"}',
                         "key 'trainer' must be a boolean (JSON true or false), got \"false\" (a string)"),
    "size_from_bool": ('{"replay_budget_bytes": true}',
                       "key 'replay_budget_bytes' (flag --online-train-replay-budget) must be a size"),
    "int_from_float": ('{"batch_size": 8.7}',
                       "key 'batch_size' (flag --online-train-batch-size) must be an integer, got 8.7 (a number)"),
    "int_from_string": ('{"batch_size": "8"}', "key 'batch_size' (flag --online-train-batch-size) must be an "
                                               "integer, got \"8\" (a string)"),
    "int_from_bool": ('{"min_records": true}', "key 'min_records' (flag --online-train-min-records) must be an "
                                               "integer, got true (a boolean)"),
    "float_from_string": ('{"lr": "6e-4"}', "key 'lr' (flag --online-train-lr) must be a finite number, "
                                            "got \"6e-4\" (a string)"),
    "nan_guard_tolerance": ('{"guard_tolerance": NaN}', "key 'guard_tolerance' must be a finite number, got NaN"),
    "nan_grad_clip": ('{"grad_clip": NaN}', "key 'grad_clip' must be a finite number, got NaN"),
    "infinite_lr": ('{"lr": Infinity}', "key 'lr' (flag --online-train-lr) must be a finite number, got Infinity"),
    "null_for_required": ('{"lr": null}', "key 'lr' (flag --online-train-lr) must be a finite number, got null"),
    "str_from_int": ('{"persist_dir": 5}', "key 'persist_dir' (flag --online-train-persist-dir) must be a string "
                                           "or null, got 5 (an integer)"),
    "float_for_size": ('{"max_memory_bytes": 1.5e9}', "key 'max_memory_bytes' (flag --online-train-max-memory) "
                                                      "must be a size"),
    "bad_size_string": ('{"queue_bytes": "lots"}', "key 'queue_bytes' (flag --online-train-queue-bytes): cannot "
                                                   "parse size 'lots'"),
    "device_list_of_ints": ('{"trainer_device": ["cuda:1", 2]}', "key 'trainer_device' (flag "
                                                                 "--online-train-device) must be a string"),
    "object_for_float": ('{"sample_rate": {"p": 1}}', "key 'sample_rate' (flag --online-train-sample-rate) must be "
                                                      "a finite number, got {\"p\": 1} (an object)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_value_is_a_clean_error_naming_the_key(case, tmp_path):
    text, message = BAD_FILES[case]
    error = _file_error(tmp_path, text)
    assert message in error, error
    assert f"--online-train-config {tmp_path / 'online.json'}" in error


def test_out_of_range_file_value_names_the_key(tmp_path):
    assert "batch_size must be positive, got 0" in _file_error(tmp_path, {"batch_size": 0})
    assert "key 'replay_budget_bytes' (flag --online-train-replay-budget) must be positive, got 0" in \
        _file_error(tmp_path, {"replay_budget_bytes": 0})
    assert "key 'persist_max_bytes' (flag --online-train-persist-max-bytes) must be positive, got -1" in \
        _file_error(tmp_path, {"persist_max_bytes": -1})
    assert _parse_file(tmp_path, {"persist_max_bytes": 0}).persist_max_bytes == 0      # 0: off, its default
    assert "key 'shard_seconds' (flag --online-train-shard-seconds) must be a finite number, got Infinity" in \
        _file_error(tmp_path, '{"shard_seconds": Infinity}')


def test_config_file_that_is_a_directory_is_a_clean_error(tmp_path):
    with pytest.raises(OnlineTrainConfigError, match=r"--online-train-config .*: cannot read it \(IsADirectory"):
        parse_argv(["--online-train", "--online-train-config", str(tmp_path)])


@pytest.mark.parametrize("flag,value,message", [
    ("--online-train-lr", "nan", "--online-train-lr must be a finite number, got NaN"),
    ("--online-train-lr", "inf", "--online-train-lr must be a finite number, got Infinity"),
    ("--online-train-heartbeat-timeout", "-inf", "--online-train-heartbeat-timeout must be a finite number"),
    ("--online-train-sample-rate", "nan", "--online-train-sample-rate must be a finite number"),
])
def test_non_finite_flag_is_a_clean_error(flag, value, message):
    with pytest.raises(OnlineTrainConfigError, match=re.escape(message)):
        parse_argv(["--online-train", f"{flag}={value}"])


def test_a_non_integer_flag_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        parse_argv(["--online-train", "--online-train-batch-size", "8.7"])
    assert e.value.code == 2
    assert "argument --online-train-batch-size: invalid int value: '8.7'" in capsys.readouterr().err


def test_valid_values_still_parse(tmp_path):
    cfg = _parse_file(tmp_path, {
        "trainer": False, "replay_budget_bytes": "1MiB", "queue_bytes": 4_000_000, "max_memory_bytes": None,
        "prefix_store_bytes": "off", "lr": 1, "grad_clip": 0.5, "guard_tolerance": 0.0, "batch_size": 4,
        "trainer_device": "cpu", "persist_dir": None, "include_prompt_loss": True, "storage_dtype": "fp8"})
    assert cfg.trainer is False and cfg.include_prompt_loss is True
    assert (cfg.replay_budget_bytes, cfg.queue_bytes, cfg.max_memory_bytes, cfg.prefix_store_bytes) == \
        (2**20, 4_000_000, None, 0)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.grad_clip == 0.5 and cfg.batch_size == 4
    assert (cfg.trainer_device, cfg.persist_dir, cfg.storage_dtype) == ("cpu", None, "fp8")
    listed = _parse_file(tmp_path, {"trainer_device": ["cpu", "cpu"]})       # a config file may list devices
    assert listed.trainer_devices == ["cpu", "cpu"]
    assert OnlineTrainConfig(**json.loads(cfg.to_env())) == cfg


def test_settings_built_in_code_are_typed_too():
    with pytest.raises(OnlineTrainConfigError, match=r"--online-train-swap-every must be an integer, got 2.5"):
        OnlineTrainConfig(enabled=True, swap_every=2.5).validate()
    with pytest.raises(OnlineTrainConfigError, match=r"online-train gamma must be a finite number, got NaN"):
        OnlineTrainConfig(enabled=True, gamma=float("nan")).validate()


def test_device_index_is_checked_against_this_machine():
    cfg = parse_argv(["--online-train", "--online-train-device", "cuda:99"])      # well formed: accepted here
    with pytest.raises(OnlineTrainConfigError, match=r"--online-train-device cuda:99: cuda:99 is not there, this "
                                                     r"machine has 2 CUDA devices \(cuda:0..cuda:1;"):
        check_device_indexes(cfg, device_count=2)
    pair = parse_argv(["--online-train", "--online-train-device", "cuda:1,cuda:2"])
    with pytest.raises(OnlineTrainConfigError, match=r"cuda:2 is not there, this machine has 2 CUDA devices"):
        check_device_indexes(pair, device_count=2)
    check_device_indexes(parse_argv(["--online-train", "--online-train-device", "cuda:0,cuda:1"]), device_count=2)
    check_device_indexes(parse_argv(["--online-train", "--online-train-device", "cpu,cpu"]), device_count=0)
    check_device_indexes(parse_argv(["--online-train"]), device_count=0)                 # auto: the serving device
    with pytest.raises(OnlineTrainConfigError, match=r"--online-train-device cuda: cuda is not there, this "
                                                     r"machine has 0 CUDA devices$"):
        check_device_indexes(parse_argv(["--online-train", "--online-train-device", "cuda"]), device_count=0)


def _startup_error(argv: list[str], capsys) -> str:
    """The launcher's startup hook on `argv`: it must exit 2 with a message before SGLang parses anything."""
    def sglang_prepare_server_args(argv, *args, **kwargs):
        raise AssertionError("the bad setting was not caught before SGLang's prepare_server_args")

    with pytest.raises(SystemExit) as e:
        prepare_server_args_with_online_train(sglang_prepare_server_args, argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_startup_refuses_a_missing_cuda_device(capsys):
    import torch
    count = torch.cuda.device_count()
    err = _startup_error(["--model-path", "x", "--online-train", "--online-train-device", "cuda:99"], capsys)
    assert err.startswith("sglang serve: error: --online-train-device cuda:99: cuda:99 is not there, this machine "
                          f"has {count} CUDA device"), err


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    return str(path)


def test_keys_in_sglang_config_yaml_are_honoured(tmp_path):
    """Our keys in SGLang's --config YAML act as our flags, merged by SGLang's own ConfigArgumentMerger: the
    command line wins over the file, and the file over --online-train-config JSON."""
    settings = tmp_path / "online.json"
    settings.write_text(json.dumps({"lr": 0.01, "batch_size": 2, "swap_every": 7}))
    yaml = _yaml(tmp_path, f"online-train: true\nonline-train-lr: 0.002\nonline-train-batch-size: 3\n"
                           f"online-train-capture-only: true\nonline-train-replay-budget: 1MB\n"
                           f"online-train-config: {settings}\nmax-running-requests: 4\n")
    argv = argv_with_sglang_config(["--model-path", "x", "--config", yaml, "--online-train-batch-size", "5"])
    assert "--max-running-requests" in argv and "--config" not in argv       # SGLang's keys merged as SGLang does
    cfg = parse_argv(argv)
    assert cfg is not None and cfg.enabled
    assert (cfg.lr, cfg.batch_size, cfg.swap_every) == (0.002, 5, 7)          # YAML > JSON file; CLI > YAML
    assert cfg.trainer is False and cfg.replay_budget_bytes == 10**6
    assert parse_argv(argv_with_sglang_config(["--config", _yaml(tmp_path, "max-running-requests: 4\n")])) is None


def test_bad_key_in_sglang_config_yaml_is_a_clean_error(tmp_path, capsys):
    nan = _yaml(tmp_path, "online-train: true\nonline-train-lr: .nan\n")
    err = _startup_error(["--model-path", "x", "--config", nan], capsys)
    assert "sglang serve: error: --online-train-lr must be a finite number, got NaN" in err
    orphan = _yaml(tmp_path, "online-train-lr: 0.001\n")
    err = _startup_error(["--model-path", "x", "--config", orphan], capsys)
    assert "--online-train-lr given without --online-train" in err


def test_real_launcher_exits_cleanly_on_a_bad_value(tmp_path):
    """`python -m sglang.launch_server` with a bad config value: exit 2 before any model is loaded, the key and
    the expected type on stderr, no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_size": 8.7}')
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "SGLANG_PLATFORM")}
    run = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                          "--online-train", "--online-train-config", str(bad)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert (f"sglang serve: error: --online-train-config {bad}: key 'batch_size' (flag --online-train-batch-size) "
            f"must be an integer, got 8.7 (a number)") in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
