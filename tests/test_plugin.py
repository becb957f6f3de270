"""The plugin's registration, in fresh interpreters (SGLang's HookRegistry is process-global)."""
import json
import os
import subprocess
import sys


GENERAL_TARGETS = {
    "sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration.set_dflash_layers_to_capture",
    "sglang.srt.model_executor.model_runner.ModelRunner._extend_forward_kwargs",
}
CPU_TARGETS = {
    "sglang.srt.speculative.draft_worker_common.resolve_draft_worker_attention_backend",
    "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
    "torch.Tensor.record_stream",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
    # EAGLE3
    "sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func",
    "sglang.kernels.ops.speculative.cache_locs.fill_front_out_cache_loc_func",
    "sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func",
    "sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func",
    "sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func",
    "sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend",
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend",
}

PROBE = r"""
import json
from sglang_ext.cpu import activate
platform = activate()
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()          # what SGLang does in every process: run general plugins, then apply hooks
load_plugins()          # idempotent
import sglang_ext.plugin
sglang_ext.plugin.register()   # a second direct call registers nothing twice
from sglang.srt.models.qwen3_vl import Qwen3VLForConditionalGeneration
fix = Qwen3VLForConditionalGeneration.set_dflash_layers_to_capture
out = {"platform": platform, "hooks": {k: len(v) for k, v in HookRegistry._hooks.items()},
       "patched": sorted(HookRegistry._patched),
       "qwen3_vl_fix_is_ours": fix.__wrapped__ is not None and fix.__code__.co_filename.endswith("hook_registry.py")}
if platform:
    from sglang.srt.platforms import current_platform
    out["current_platform"] = type(current_platform).__name__
    out["backend"] = current_platform.get_default_attention_backend()
    out["dflash"] = current_platform.supports_speculative_algorithm("DFLASH")
print("RESULT" + json.dumps(out))
"""


def _probe(platform_env):
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLATFORM", "SGLANG_PLUGINS")}
    if platform_env:
        env["SGLANG_PLATFORM"] = platform_env
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_not_selected_registers_no_cpu_hook_but_general_fixes():
    out = _probe(None)
    assert out["platform"] is None                              # activate() returns None
    hooks = set(out["hooks"])
    assert GENERAL_TARGETS <= hooks
    assert not (CPU_TARGETS & hooks), CPU_TARGETS & hooks
    assert GENERAL_TARGETS <= set(out["patched"])               # applied, not only registered
    assert out["qwen3_vl_fix_is_ours"]
    assert all(out["hooks"][t] == 1 for t in GENERAL_TARGETS)   # registered once despite repeated calls


def test_selected_registers_and_applies_cpu_hooks():
    out = _probe("torch_cpu")
    assert out["platform"] == "sglang_ext.cpu.platform.TorchCpuPlatform"
    assert out["current_platform"] == "TorchCpuPlatform"
    assert out["backend"] == "torch_native" and out["dflash"] is True
    assert (GENERAL_TARGETS | CPU_TARGETS) <= set(out["patched"])
    assert all(out["hooks"][t] == 1 for t in GENERAL_TARGETS | CPU_TARGETS)


def test_unknown_platform_name_is_a_clear_error():
    env = dict(os.environ, SGLANG_PLATFORM="torch_cpux")
    proc = subprocess.run([sys.executable, "-c", "from sglang.srt.platforms import current_platform as p; p.device_name"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "torch_cpux" in proc.stderr and "torch_cpu" in proc.stderr
