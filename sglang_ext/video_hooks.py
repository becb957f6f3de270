"""Always-on hooks that let SGLang decode video on a host without CUDA (the torch_cpu platform).

SGLang pins decoded video frames (`Tensor.pin_memory()`) unless `is_cpu()` (SGLANG_USE_CPU_ENGINE=1, which
our torch_cpu platform does not set); without an NVIDIA driver pinning raises "Found no NVIDIA driver", so
every video request failed with HTTP 500. Pinning is skipped only when CUDA is unavailable: with CUDA, SGLang
behaves exactly as before. Registered by `sglang_ext.hooks.register_general_hooks`, i.e. in every process
that loads plugins, the launcher process included (its tokenizer manager decodes the video).
"""
from __future__ import annotations

import inspect

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

VIDEO_DECODER_IS_CPU_ENGINE = "sglang.srt.utils.video_decoder._is_cpu_engine"
QWEN_VL_PREPROCESS_VIDEO = "sglang.srt.multimodal.processors.qwen_vl.preprocess_video"


def skip_pinning() -> bool:
    """True where pinned memory cannot exist: SGLang's CPU engine, or no CUDA at all."""
    from sglang.srt.utils.common import is_cpu
    return is_cpu() or not torch.cuda.is_available()


# srt/utils/video_decoder.py `_is_cpu_engine` decides whether `VideoDecoderWrapper.get_frames_as_tensor` and
# `_parallel_decode` pin the decoded frames; answer True without CUDA too (read only at those three sites).
def video_decoder_is_cpu_engine() -> bool:
    return skip_pinning()


# srt/multimodal/processors/qwen_vl.py `preprocess_video` pins the resized frames unless `is_cpu()`. Without
# CUDA, the `is_cpu` that module reads at run time (only there; its import-time `_is_cpu` is already set) is
# `skip_pinning`; SGLang's own `is_cpu`, used everywhere else, is untouched.
async def qwen_vl_preprocess_video_without_cuda_pinning(original, *args, **kwargs):
    if not torch.cuda.is_available():
        module_globals = inspect.unwrap(original).__globals__
        if module_globals.get("is_cpu") is not skip_pinning:
            module_globals["is_cpu"] = skip_pinning
    return await original(*args, **kwargs)


def register_video_hooks() -> None:
    HookRegistry.register(VIDEO_DECODER_IS_CPU_ENGINE, video_decoder_is_cpu_engine, HookType.REPLACE)
    HookRegistry.register(QWEN_VL_PREPROCESS_VIDEO, qwen_vl_preprocess_video_without_cuda_pinning, HookType.AROUND)
