import os
from pathlib import Path

import pytest
import torch  # does not import triton

if not torch.cuda.is_available():
    # No GPU: Triton kernels run in its interpreter. `triton.jit` reads TRITON_INTERPRET when a kernel is
    # decorated, i.e. when a spec_kernels module is first imported (the draft models import them), so set it
    # before any test module is collected. Servers started by the tests never inherit it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny():
    """Every tiny model (built once, cached by a hash of the recipe under $SGLANG_EXT_CACHE)."""
    from sglang_ext.demo.tiny_models import tiny_models
    return tiny_models()


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory) -> Path:
    """Server logs; kept (and printed) only for servers whose block raised."""
    root = os.environ.get("SGLANG_EXT_LOG_DIR")
    return Path(root) if root else tmp_path_factory.mktemp("server-logs")


QUICK_WORKLOAD_MINUTES = 0.5


@pytest.fixture(scope="session")
def workload_cache_dir(tmp_path_factory) -> Path:
    """A fresh cache for the quick reference workload: every session builds it once (test_workload checks that
    build), and every test that needs it shares it."""
    return tmp_path_factory.mktemp("workload-cache")


@pytest.fixture(scope="session")
def quick_workload(workload_cache_dir):
    """The small reference workload (tiny Qwen3-VL trained ~30 s on stdlib code, prose and images)."""
    import time

    from sglang_ext.demo.workload import build_workload
    start = time.monotonic()
    built = build_workload(workload_cache_dir, minutes=QUICK_WORKLOAD_MINUTES, quick=True, progress=False)
    built.stats["test_build_seconds"] = time.monotonic() - start
    return built


def _compact_hang_report(report: str, frames_per_thread: int = 6, max_lines: int = 150) -> list[str]:
    """A hang report (launcher.process_stacks + log tail) cut to what fits at the end of a CI log: each process,
    the top frames of each thread, the last log lines."""
    head, _, tail = report.partition("--- last lines of the log ---")
    title, _, stacks = head.partition("\n")
    out, budget = [title], 0
    for line in stacks.splitlines():
        if line.startswith(("===", "Thread", "Process", "(")):
            out.append(line)
            budget = frames_per_thread if line.startswith("Thread") else 0
        elif budget > 0 and line.strip():
            out.append(line)
            budget -= 1
    out = out[:max_lines] + ["--- last lines of the server log ---"] + tail.strip().splitlines()[-15:]
    return out


def pytest_terminal_summary(terminalreporter):
    """Servers that hung at startup (the launcher retries them once): what each process was doing."""
    from sglang_ext.launcher import STARTUP_HANGS

    for report in STARTUP_HANGS:
        terminalreporter.section("SGLang server startup hang (diagnosed, then retried)", sep="!")
        for line in _compact_hang_report(report):
            terminalreporter.write_line(line[:300])
