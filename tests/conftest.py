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
