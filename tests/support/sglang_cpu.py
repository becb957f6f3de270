"""Build SGLang model classes on a CPU-only box without a server (for forward-parity tests)."""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace


@contextmanager
def sglang_cpu():
    """A TP world of one (group stand-ins, as SGLang's own unit tests use) and RoPE's native path (on a non-CUDA
    build RotaryEmbedding.__init__ otherwise tries to import vllm's kernel)."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.runtime_context import get_parallel

    group = SimpleNamespace(rank_in_group=0, world_size=1)
    saved = rope_base._is_cpu
    rope_base._is_cpu = True
    try:
        with get_parallel().override(tp_size=1, tp_rank=0, attn_tp_size=1, attn_tp_rank=0, tp_group=group,
                                     attn_tp_group=group):
            yield
    finally:
        rope_base._is_cpu = saved
