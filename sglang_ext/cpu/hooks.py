"""Hooks that let real SGLang 0.5.23 serve (with DFLASH or EAGLE3) on the torch_cpu platform.

Each hook is small and says which SGLang function it changes and why. They are registered by
`sglang_ext.plugin.register()` only when SGLANG_PLATFORM=torch_cpu (see `register_cpu_hooks`).
Letters refer to the obstacles listed in issue #2; the EAGLE ones to the EAGLE3 issue's list.
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
#     the draft's ENCODER_ONLY layers, which forward_extend already decides from layer.attn_type). An EAGLE
#     verify carries its tree's mask (spec_info.custom_mask): causal would be wrong for a tree, so it is
#     attended under that mask (sglang_ext/cpu/eagle_attention.py).
def torch_native_target_verify(original, self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
    if not forward_batch.forward_mode.is_target_verify():
        return original(self, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
    custom_mask = getattr(forward_batch.spec_info, "custom_mask", None)
    if custom_mask is not None:
        from sglang_ext.cpu.eagle_attention import tree_verify_attention
        return tree_verify_attention(self, q, k, v, layer, forward_batch, save_kv_cache, custom_mask)
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


# kernels/ops/speculative/cache_locs.py `assign_draft_cache_locs_contiguous_func` (from eagle_worker_common.py
#     `prepare_for_draft`): launches Triton off the in-tree CPU engine; gather the same slots with torch.
def assign_draft_cache_locs_contiguous_torch(req_pool_indices, req_to_token, seq_lens, out_cache_loc, topk, num_cols,
                                             positions=None, mrope=None):
    from sglang_ext.cpu.ops import assign_draft_cache_locs_contiguous
    assign_draft_cache_locs_contiguous(req_pool_indices, req_to_token, seq_lens, out_cache_loc, topk, num_cols,
                                       positions, mrope)


# kernels/ops/speculative/spec_tree.py `build_tree_kernel_efficient_func` (EAGLE verify input) refuses an
#     out-of-tree platform: the torch port of its Triton kernel.
def build_tree_kernel_efficient_torch(parent_list, top_scores_index, seq_lens, tree_mask, positions, retrieve_index,
                                      retrieve_next_token, retrieve_next_sibling, topk, spec_steps, num_verify_tokens,
                                      tree_mask_mode):
    from sglang_ext.cpu.spec_tree import build_tree_kernel_efficient
    build_tree_kernel_efficient(parent_list, top_scores_index, seq_lens, tree_mask, positions, retrieve_index,
                                retrieve_next_token, retrieve_next_sibling, topk, spec_steps, num_verify_tokens,
                                int(tree_mask_mode))


# kernels/ops/speculative/spec_tree.py `verify_tree_greedy_func` refuses an out-of-tree platform: torch port.
def verify_tree_greedy_torch(predicts, accept_index, accept_token_num, candidates, retrieve_index,
                             retrieve_next_token, retrieve_next_sibling, target_predict, topk=-1):
    from sglang_ext.cpu.spec_tree import verify_tree_greedy
    return verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, retrieve_index,
                              retrieve_next_token, retrieve_next_sibling, target_predict)


# kernels/ops/speculative/eagle.py `fill_bonus_tokens_func` (from eagle_worker_common.py `run_eagle_verify`) and
#     `fill_accept_out_cache_loc_func` (tree verify): Triton launches off the in-tree CPU engine; torch versions.
def fill_bonus_tokens_torch(accept_tokens, accept_lens, bonus_tokens, accept_stride, batch_size):
    from sglang_ext.cpu.ops import fill_bonus_tokens
    fill_bonus_tokens(accept_tokens, accept_lens, bonus_tokens, accept_stride, batch_size)


def fill_accept_out_cache_loc_torch(accept_index, out_cache_loc, accept_out_cache_loc, size):
    from sglang_ext.cpu.ops import fill_accept_out_cache_loc
    fill_accept_out_cache_loc(accept_index, out_cache_loc, accept_out_cache_loc, size)


# kernels/ops/speculative/cache_locs.py `fill_front_out_cache_loc_func` (tree verify: moving the accepted KV)
#     calls a Triton kernel off the in-tree CPU engine; torch version.
def fill_front_out_cache_loc_torch(num_front, out_cache_loc, front_out_cache_loc):
    from sglang_ext.cpu.ops import fill_front_out_cache_loc
    fill_front_out_cache_loc(num_front, out_cache_loc, front_out_cache_loc)


# srt/speculative/eagle_utils.py `eagle_sample`: sampled (temperature > 0) verification calls
#     `tree_speculative_sampling_target_only`, which is None off CUDA (kernels/ops/speculative/verify_sampling.py).
#     Bind the torch port (sglang_ext/cpu/spec_tree.py) before the call. (Not a REPLACE of that module global:
#     the registry would re-point every other attribute that is None too.)
def bind_tree_speculative_sampling(*args, **kwargs):
    import sglang.srt.speculative.eagle_utils as eagle_utils
    if eagle_utils.tree_speculative_sampling_target_only is None:
        from sglang_ext.cpu.spec_tree import tree_speculative_sampling_target_only
        eagle_utils.tree_speculative_sampling_target_only = tree_speculative_sampling_target_only


# srt/speculative/draft_utils.py `DraftBackendFactory.create_draft_extend_backend`: EAGLE's draft extend
#     knows no torch_native backend ("EAGLE is not supported in attention backend torch_native"). The draft
#     extend (DRAFT_EXTEND_V2) is a plain causal extend over each request's new tokens: torch_native's
#     forward_extend does it as is.
def torch_native_draft_extend_backend(original, self, *args, **kwargs):
    if (self.draft_attn_backend or "torch_native") != "torch_native":
        return original(self, *args, **kwargs)
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    backend = TorchNativeAttnBackend(self.draft_model_runner)
    backend.prefill_attention_backend_str = backend.decode_attention_backend_str = "torch_native"
    return backend


# srt/speculative/draft_utils.py `DraftBackendFactory.create_decode_backend`: no multi-step draft-decode backend
#     for torch_native ("EAGLE is not supported in decode attention backend torch_native"); ours is
#     sglang_ext/cpu/eagle_attention.py.
def torch_native_draft_decode_backend(original, self, *args, **kwargs):
    if self.speculative_num_steps <= 1 or (self.draft_attn_backend or "torch_native") != "torch_native":
        return original(self, *args, **kwargs)
    from sglang_ext.cpu.eagle_attention import TorchNativeMultiStepDraftBackend
    return TorchNativeMultiStepDraftBackend(self.draft_model_runner, self.topk, self.speculative_num_steps)


# (tp a) srt/distributed/bootstrap.py `_bind_threads_if_cpu`: asserts the ranks fit the host's NUMA nodes (one
#     here, so --tp 2 fails at startup). Its binding only feeds sgl_kernel's CPU thread set-up, which this
#     platform never runs: bind nothing.
def no_cpu_thread_binding(*args, **kwargs):
    return None


# (tp b) srt/distributed/parallel_state.py `GroupCoordinator.all_gather_into_tensor` / `reduce_scatter_tensor`:
#     take the direct gloo path only when SGLANG_USE_CPU_ENGINE is set, else call `sglang::reg_*` custom ops
#     that exist only for PrivateUse1 (NotImplementedError for CPU tensors, hit by DFLASH's vocab-parallel greedy
#     sampling under --tp 2). Route CPU tensors to the group's own gloo implementation, as the in-tree CPU
#     branch does.
def all_gather_into_tensor_on_cpu(original, self, output, input, *args, **kwargs):
    if input.device.type == "cpu":
        return self._all_gather_into_tensor(output, input)
    return original(self, output, input, *args, **kwargs)


def reduce_scatter_tensor_on_cpu(original, self, output, input, *args, **kwargs):
    if input.device.type == "cpu":
        return self._reduce_scatter_tensor(output, input)
    return original(self, output, input, *args, **kwargs)


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
    reg("sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func",
        assign_draft_cache_locs_contiguous_torch, HookType.REPLACE)
    reg("sglang.kernels.ops.speculative.spec_tree.build_tree_kernel_efficient_func",
        build_tree_kernel_efficient_torch, HookType.REPLACE)
    reg("sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func", verify_tree_greedy_torch, HookType.REPLACE)
    reg("sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func", fill_bonus_tokens_torch, HookType.REPLACE)
    reg("sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func", fill_accept_out_cache_loc_torch,
        HookType.REPLACE)
    reg("sglang.kernels.ops.speculative.cache_locs.fill_front_out_cache_loc_func", fill_front_out_cache_loc_torch,
        HookType.REPLACE)
    reg("sglang.srt.speculative.eagle_utils.eagle_sample", bind_tree_speculative_sampling, HookType.BEFORE)
    reg("sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend",
        torch_native_draft_decode_backend, HookType.AROUND)
    reg("sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend",
        torch_native_draft_extend_backend, HookType.AROUND)
    # tensor parallelism (--tp N) on CPU: gloo groups
    reg("sglang.srt.distributed.bootstrap._bind_threads_if_cpu", no_cpu_thread_binding, HookType.REPLACE)
    reg("sglang.srt.distributed.parallel_state.GroupCoordinator.all_gather_into_tensor",
        all_gather_into_tensor_on_cpu, HookType.AROUND)
    reg("sglang.srt.distributed.parallel_state.GroupCoordinator.reduce_scatter_tensor",
        reduce_scatter_tensor_on_cpu, HookType.AROUND)
