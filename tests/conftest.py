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


PLAIN_MAX_NEW_TOKENS = 24       # the most any module compares against (test_eagle3_serving, test_server_dflash)


class PlainReference:
    """Plain (non-speculative) greedy serving of the tiny targets, kept as data for the whole session.

    `plain_reference(variant, max_new_tokens) -> (requests, output_ids)`: mixed_requests(n_text=6, n_image=2)
    (6 text prompts, then 2 one-image prompts) served one at a time by a stock server of `tiny.<variant>` (no
    extra arguments), greedy with ignore_eos. Each target gets one server in the session: the first module that
    asks starts it, and every module comparing against plain serving of these requests shares its outputs
    (`prefetch(*variants)` starts the missing ones together). The server generates PLAIN_MAX_NEW_TOKENS tokens;
    a caller asking for fewer gets the prefix, which is what a greedy run capped there generates (ignore_eos:
    the cap only decides where it stops)."""

    def __init__(self, tiny, log_dir: Path):
        self.tiny, self.log_dir = tiny, log_dir
        self.cache: dict[str, tuple[list, list[list[int]]]] = {}

    def prefetch(self, *variants: str) -> None:
        from sglang_ext.demo.prompts import mixed_requests
        from sglang_ext.launcher import launch_server
        from support.servers import launch_servers, run_concurrently

        missing = [v for v in dict.fromkeys(variants) if v not in self.cache]
        if not missing:
            return
        requests = mixed_requests(n_text=6, n_image=2)

        def serve(server) -> list[list[int]]:
            outputs = [server.generate(t, im, max_new_tokens=PLAIN_MAX_NEW_TOKENS)["output_ids"] for t, im in requests]
            assert all(len(o) == PLAIN_MAX_NEW_TOKENS for o in outputs), [len(o) for o in outputs]
            return outputs

        with launch_servers(*(launch_server(getattr(self.tiny, v), log_dir=self.log_dir, name=f"plain-{v}")
                              for v in missing)) as servers:
            outputs = run_concurrently(*(lambda s=s: serve(s) for s in servers))
        for v, out in zip(missing, outputs):
            self.cache[v] = requests, out

    def __call__(self, variant: str, max_new_tokens: int) -> tuple[list, list[list[int]]]:
        if not 1 <= max_new_tokens <= PLAIN_MAX_NEW_TOKENS:
            raise ValueError(f"plain_reference serves up to {PLAIN_MAX_NEW_TOKENS} tokens, asked {max_new_tokens}")
        self.prefetch(variant)
        requests, outputs = self.cache[variant]
        return list(requests), [list(o[:max_new_tokens]) for o in outputs]


@pytest.fixture(scope="session")
def plain_reference(tiny, server_log_dir) -> PlainReference:
    """See PlainReference: plain greedy outputs of mixed_requests(6, 2) per tiny target, one server per target
    in the session."""
    return PlainReference(tiny, server_log_dir)


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
