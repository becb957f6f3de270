"""Hooks that let real SGLang 0.5.23 serve (with DFLASH) on the torch_cpu platform.

Each hook is small and says which SGLang function it changes and why. They are registered by
`sglang_ext.plugin.register()` only when SGLANG_PLATFORM=torch_cpu (see `register_cpu_hooks`).
Letters refer to the obstacles listed in issue #2.
"""
from __future__ import annotations

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType


# (d) srt/speculative/draft_worker_common.py `resolve_draft_worker_attention_backend`: a hard-coded list
#     of draft backends falls back to flashinfer (NameError on CPU); keep torch_native here.
def keep_torch_native_draft_backend(original, *args, **kwargs):
    from sglang.srt.runtime_context import get_spec
    if get_spec().speculative_draft_attention_backend in (None, "torch_native"):
        return "torch_native"
    return original(*args, **kwargs)


# (e) srt/mem_cache/allocation.py `assign_req_to_token_pool_func`: always launches a Triton kernel
#     (called from `alloc_for_spec_decode`); write the same rows with torch indexing.
def assign_req_to_token_pool_torch(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                   batch_size):
    from sglang_ext.cpu.ops import assign_req_to_token_pool
    assign_req_to_token_pool(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, batch_size)


# (f) srt/speculative/dflash_worker_v2.py calls `seq_lens.record_stream(current_stream())`; a CPU stream
#     is not a torch.Stream ("unknown parameter type"). Recording a stream is meaningless for CPU tensors.
def record_stream_cpu_noop(original, tensor, stream, *args, **kwargs):
    if tensor.device.type == "cpu":
        return None
    return original(tensor, stream, *args, **kwargs)


# (h) srt/layers/attention/torch_native_backend.py `forward_extend`: no TARGET_VERIFY path
#     (extend_prefix_lens is None). Target verify and the DFLASH draft block both run as TARGET_VERIFY with
#     seq_lens = committed prefix and a fixed number of new tokens per request placed in req_to_token right
#     after it: run them as an extend with prefix = seq_lens (causal for target layers, bidirectional for
#     the draft's ENCODER_ONLY layers, which forward_extend already decides from layer.attn_type).
def torch_native_target_verify(original, self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
    if not forward_batch.forward_mode.is_target_verify():
        return original(self, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
    batch_size = forward_batch.batch_size
    n_tokens = q.shape[0]
    if n_tokens % batch_size:
        raise RuntimeError(f"TARGET_VERIFY on torch_cpu: {n_tokens} query rows are not a whole number of blocks "
                           f"for {batch_size} requests")
    prefix_lens = forward_batch.seq_lens
    extend_lens = torch.full_like(prefix_lens, n_tokens // batch_size)
    saved = (forward_batch.seq_lens, forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens)
    forward_batch.seq_lens = prefix_lens + extend_lens
    forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens = prefix_lens, extend_lens
    try:
        return original(self, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
    finally:
        forward_batch.seq_lens, forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens = saved


def register_cpu_hooks() -> None:
    """All torch_cpu hooks, in one place."""
    reg = HookRegistry.register
    reg("sglang.srt.speculative.draft_worker_common.resolve_draft_worker_attention_backend",
        keep_torch_native_draft_backend, HookType.AROUND)
    reg("sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
        assign_req_to_token_pool_torch, HookType.REPLACE)
    reg("torch.Tensor.record_stream", record_stream_cpu_noop, HookType.AROUND)
    reg("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
        torch_native_target_verify, HookType.AROUND)
