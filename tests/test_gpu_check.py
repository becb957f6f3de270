"""benchmarks/gpu_check.py: the --tiny run (CPU under the Triton interpreter, or the GPU when there is one)
produces numbers for every part and passes every correctness check, with `import sglang` refused, and the
driver isolates parts (a part that raises or runs past its budget is reported failed; the others still run)."""
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (imports torch only; parts import their modules when they run)

# Run in a fresh interpreter, so that the refusal of SGLang is real: modules other tests imported into this
# process (sglang among them) are not there, and every import chain of the four parts is exercised.
RUN_TINY = textwrap.dedent("""
    import importlib.abc, sys

    class RefuseSGLang(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sglang" or name.startswith("sglang."):
                raise ImportError(f"test_gpu_check: SGLang is blocked ({name})")
            return None

    sys.meta_path.insert(0, RefuseSGLang())
    sys.path.insert(0, sys.argv[1])
    import gpu_check
    rc = gpu_check.main(["--tiny", "--out", sys.argv[2]])
    leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
    assert not leaked, f"SGLang modules were imported: {leaked}"
    sys.exit(rc)
""")


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RUN_TINY, str(ROOT / "benchmarks"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"gpu_check --tiny exited {proc.returncode}:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    report["_stdout"], report["_elapsed"] = proc.stdout, elapsed
    return report


def test_tiny_every_part_passes(tiny_report):
    parts = tiny_report["parts"]
    assert sorted(parts) == ["a", "b", "c", "d", "e"]
    for letter, part in parts.items():
        assert part["status"] == "ok" and part["error"] is None, f"part {letter}: {part['error']}\n{part['traceback']}"
        assert part["checks"], f"part {letter} checked nothing"
        failed = {name: c for name, c in part["checks"].items() if not c["ok"]}
        assert not failed, f"part {letter}: failed checks {failed}"
    assert tiny_report["machine"]["torch"] and tiny_report["machine"]["triton"]
    table = tiny_report["_stdout"]
    for letter in "abcd":
        assert gpu_check.PART_TITLES[letter] in table
    assert "wrote " in table


def test_tiny_every_part_has_numbers(tiny_report):
    parts = tiny_report["parts"]

    # a: fwd / bwd / fwd+bwd ms of ours, flex and SDPA; the speedup goals evaluated
    ms = parts["a"]["metrics"]["ms"]["value"]
    for impl in ("ours", "flex", "sdpa"):
        assert all(_finite_number(ms[impl][phase]) and ms[impl][phase] > 0 for phase in ("fwd", "bwd", "fwd_bwd"))
    assert {"fwd+bwd speedup flex/ours", "fwd+bwd speedup sdpa/ours"} <= set(parts["a"]["goals"])
    assert {"out vs fp32 reference", "dq vs fp32 reference", "dk vs fp32 reference",
            "dv vs fp32 reference", "ours vs flex (out, dq, dk, dv)"} <= set(parts["a"]["checks"])

    # b: a training step with each attention, and the same loss
    results = parts["b"]["metrics"]["results"]["value"]
    for impl in ("ours", "flex"):
        r = results[impl]
        assert _finite_number(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert _finite_number(r["step_s"]) and _finite_number(r["first_loss"]) and r["applied"]
    assert "same loss with both attentions" in parts["b"]["checks"]

    # c: both swap paths timed; the staged one wrote the slot's weights in place
    swap = parts["c"]["metrics"]["swap"]["value"]
    for path in ("old", "staged"):
        assert _finite_number(swap[f"{path}_stall_ms"]) and _finite_number(swap[f"{path}_stall_until_done_ms"])
    assert "staged stall" in parts["c"]["goals"]
    assert all(parts["c"]["checks"][c]["ok"] for c in ("staged path wrote the slot's weights (bf16)",
                                                        "live storage kept (CUDA graphs valid)"))

    # d: host time per verify step, rows recovered
    host_us = parts["d"]["metrics"]["host_us"]["value"]
    assert all(_finite_number(host_us[k]) and host_us[k] > 0 for k in ("mean", "p50", "p99"))
    assert parts["d"]["checks"]["committed rows recovered exactly from the pool"]["ok"]

    # e: the draft KV refresh timed, the refreshed KV right
    refresh = parts["e"]["metrics"]["refresh"]["value"]
    assert refresh["tokens"] > 0 and _finite_number(refresh["ms"]) and refresh["ms"] > 0
    assert all(c["ok"] for c in parts["e"]["checks"].values()) and len(parts["e"]["checks"]) == 2


def test_parts_are_isolated(tmp_path, monkeypatch):
    """A part that raises and one that overruns its budget are reported failed; the part after them runs."""
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))       # main() adds its SGLang refusal here

    def broken(p, shapes, device):
        p.metric("before the error", 1.0, "x")
        raise RuntimeError("boom")

    def slow(p, shapes, device):
        p.metric("before the budget ran out", 2.0, "x")
        time.sleep(30)

    def fine(p, shapes, device):
        p.metric("a number", 3.0, "x")
        p.check("a check", True, "3", "3")

    monkeypatch.setitem(gpu_check.PARTS, "a", broken)
    monkeypatch.setitem(gpu_check.PARTS, "b", slow)
    monkeypatch.setitem(gpu_check.PARTS, "c", fine)
    out = tmp_path / "check.json"
    start = time.monotonic()
    rc = gpu_check.main(["--tiny", "--parts", "a,b,c", "--budget", "b=1", "--out", str(out)])
    assert time.monotonic() - start < 20
    assert rc == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["a"]["status"] == "failed" and "RuntimeError: boom" in parts["a"]["error"]
    assert parts["a"]["metrics"]["before the error"]["value"] == 1.0          # kept what it measured
    assert parts["b"]["status"] == "failed" and "time budget" in parts["b"]["error"]
    assert parts["b"]["metrics"]["before the budget ran out"]["value"] == 2.0
    assert parts["c"]["status"] == "ok" and parts["c"]["checks"]["a check"]["ok"]
