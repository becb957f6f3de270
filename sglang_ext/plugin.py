"""Entry point of group `sglang.srt.plugins`. SGLang calls `register()` in the launcher and again in every
scheduler / detokenizer process it spawns, then applies the registered hooks."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:          # idempotent within a process
        return
    _registered = True
    from sglang_ext.cpu import is_selected
    from sglang_ext.hooks import register_general_hooks

    register_general_hooks()
    from sglang_ext.video_hooks import register_video_hooks
    register_video_hooks()          # always on: video decoding without CUDA pins nothing
    from sglang_ext.online.scheduler.hooks import register_online_hooks
    register_online_hooks()
    if is_selected():
        from sglang_ext.cpu.hooks import register_cpu_hooks
        register_cpu_hooks()
        logger.info("sglang_ext: torch_cpu platform hooks registered")
