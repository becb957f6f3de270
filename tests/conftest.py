import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny():
    """Every tiny model (built once, cached by a hash of the recipe under $SGLANG_EXT_CACHE)."""
    from sglang_ext.testing.tiny_models import tiny_models
    return tiny_models()


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory) -> Path:
    """Server logs; kept (and printed) only for servers whose block raised."""
    root = os.environ.get("SGLANG_EXT_LOG_DIR")
    return Path(root) if root else tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def quick_workload():
    """The small reference workload (tiny Qwen3-VL trained ~30 s on stdlib code, prose and images), built once
    and cached by a hash of its config under $SGLANG_EXT_CACHE (or ~/.cache/sglang_ext)."""
    from sglang_ext.testing.workload import build_workload
    return build_workload(None, minutes=0.5, quick=True, progress=False)
