"""`torch_cpu`: an out-of-tree SGLang platform that serves on CPU with plain PyTorch (no sgl_kernel, no
Triton). Selected with `SGLANG_PLATFORM=torch_cpu` and `--device cpu`; otherwise it does nothing."""
from __future__ import annotations

import os

PLATFORM_NAME = "torch_cpu"


def is_selected() -> bool:
    """True only when the user explicitly picked this platform."""
    return os.environ.get("SGLANG_PLATFORM", "") == PLATFORM_NAME


def activate() -> str | None:
    """Entry point of group `sglang.srt.platforms`: the platform class path, or None when not selected."""
    if not is_selected():
        return None
    return "sglang_ext.cpu.platform.TorchCpuPlatform"
