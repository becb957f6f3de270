"""Environment that loads the test-only SGLang plugin (tests/sglang_plugin) into a server the tests start."""
from __future__ import annotations

import os
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "sglang_plugin"


def plugin_env(*, dump_dir: str | os.PathLike | None = None, trainer_faults: str | None = None,
               hang_flag: str | os.PathLike | None = None) -> dict:
    """launch_server(env=...) for a server with the test plugin: debug dumps into `dump_dir`, and/or the
    fault-injecting trainer (`trainer_faults`, see tests/sglang_plugin/sglang_ext_test_trainer.py; `hang_flag`:
    the file that makes its hang_once_after fault happen once)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGIN_DIR), os.environ.get("PYTHONPATH")]))}
    if dump_dir is not None:
        env["SGLANG_EXT_TEST_DUMP_DIR"] = str(dump_dir)
    if trainer_faults is not None:
        env["SGLANG_EXT_TEST_TRAINER_FAULTS"] = trainer_faults
    if hang_flag is not None:
        env["SGLANG_EXT_TEST_HANG_FLAG"] = str(hang_flag)
    return env
