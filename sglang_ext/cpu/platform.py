"""The `torch_cpu` SRT platform class. Everything here is consulted by SGLang core through its platform
interface (`sglang/srt/platforms/interface.py`); the hooks SGLang has no seam for live in `hooks.py`."""
from __future__ import annotations

import torch
from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

ATTENTION_BACKEND = "torch_native"


class TorchCpuPlatform(CpuDeviceMixin, SRTPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    capabilities = PlatformCapabilities()          # no Triton, no graphs, no pynccl

    def get_default_attention_backend(self) -> str:
        return ATTENTION_BACKEND

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return ATTENTION_BACKEND

    def supports_speculative_algorithm(self, algorithm: str) -> bool:
        return str(algorithm).upper() in ("DFLASH", "EAGLE3", "EAGLE")

    def supports_speculative_draft_attention_backend(self, algorithm: str, backend: str) -> bool:
        return backend == ATTENTION_BACKEND

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def get_dispatch_key_name(self) -> str:
        return "native"

    def get_kv_pool_cls(self, *, kind):
        # (b) the in-tree MHA pool warms up a Triton KV-copy kernel at init: use the torch move instead.
        if kind == "mha":
            from sglang_ext.cpu.kv_pool import TorchCpuMHATokenToKVPool
            return TorchCpuMHATokenToKVPool
        return None

    def get_speculative_cache_locs_fn(self):
        # (g) the in-tree helper returns None on an unknown device.
        from sglang_ext.cpu.ops import speculative_cache_locs
        return speculative_cache_locs

    def post_load_model(self, model: torch.nn.Module) -> None:
        # (i) DFlash picks a fused Triton qk-norm+rope kernel for bf16 when this flag is set.
        for module in model.modules():
            if getattr(module, "use_table_qk_norm_rope", False):
                module.use_table_qk_norm_rope = False
