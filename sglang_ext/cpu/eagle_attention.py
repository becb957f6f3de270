"""EAGLE attention on the torch_cpu platform: the multi-step draft-decode backend (SGLang has one per GPU backend,
e.g. `TritonMultiStepDraftBackend`, none for torch_native) and tree verification under the tree mask.

EAGLE's draft runs `speculative_num_steps - 1` decode forwards after the draft extend; step i has one query
per (request b, branch j), whose KV slot `prepare_for_draft` placed at
`req_to_token[b, seq_len + j * num_steps + i]`. The query attends to the request's committed prefix
`req_to_token[b, :seq_len]` and to its own branch's slots of steps 0..i
`req_to_token[b, seq_len + j * num_steps : seq_len + j * num_steps + i + 1]` (the layout the Triton
`generate_draft_decode_kv_indices` builds).
"""
from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention


class TorchNativeDraftStepBackend(TorchNativeAttnBackend):
    """The attention of draft-decode step `step`."""

    def __init__(self, model_runner, step: int, topk: int, num_steps: int):
        super().__init__(model_runner)
        self.step, self.topk, self.num_steps = step, topk, num_steps

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc,
                                                                  self.swa_out_cache_loc), k, v)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        out = q.new_empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens = forward_batch.seq_lens.tolist()
        for b, (row, seq) in enumerate(zip(rows, seq_lens)):
            for j in range(self.topk):
                first = seq + j * self.num_steps
                slots = torch.cat([req_to_token[row, :seq], req_to_token[row, first:first + self.step + 1]]).long()
                keys = k_cache[slots].transpose(0, 1)[None]                          # [1, Hkv, n, D]
                values = v_cache[slots].transpose(0, 1)[None]
                query = q[b * self.topk + j][None, :, None]                          # [1, Hq, 1, D]
                o = scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype),
                                                 scale=layer.scaling,
                                                 enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num)
                out[b * self.topk + j] = o[0, :, 0]
        return out.reshape(q.shape[0], -1)


class TorchNativeMultiStepDraftBackend:
    """One `TorchNativeDraftStepBackend` per draft-decode forward, as the EAGLE worker expects
    (`attn_backends[i]`, `init_forward_metadata`)."""

    def __init__(self, model_runner, topk: int, speculative_num_steps: int):
        self.topk = topk
        self.speculative_num_steps = speculative_num_steps
        self.attn_backends = [TorchNativeDraftStepBackend(model_runner, i, topk, speculative_num_steps)
                              for i in range(speculative_num_steps - 1)]

    def init_forward_metadata(self, forward_batch) -> None:
        for backend in self.attn_backends:
            backend.init_forward_metadata(forward_batch)


def tree_verify_attention(backend, q, k, v, layer, forward_batch, save_kv_cache: bool, custom_mask: torch.Tensor):
    """TARGET_VERIFY of an EAGLE tree: request b's n draft tokens (placed after its committed prefix in
    req_to_token) attend to prefix + tree as the FULL_MASK `custom_mask` says: per request a block of
    n rows of (seq_len + n) booleans, requests back to back (`build_tree_kernel_efficient`'s layout)."""
    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc,
                                                                 backend.swa_out_cache_loc), k, v)
    k_cache = backend.token_to_kv_pool.get_key_buffer(layer.layer_id)
    v_cache = backend.token_to_kv_pool.get_value_buffer(layer.layer_id)
    req_to_token = backend.req_to_token_pool.req_to_token
    q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    bs = forward_batch.batch_size
    n = q.shape[0] // bs
    out = q.new_empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
    offset = 0
    for b, (row, seq) in enumerate(zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist())):
        width = seq + n
        mask = custom_mask[offset:offset + n * width].view(n, width).bool()
        offset += n * width
        slots = req_to_token[row, :width].long()
        keys = k_cache[slots].transpose(0, 1)[None]                                  # [1, Hkv, seq+n, D]
        values = v_cache[slots].transpose(0, 1)[None]
        query = q[b * n:(b + 1) * n].transpose(0, 1)[None]                           # [1, Hq, n, D]
        o = scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype),
                                         attn_mask=mask[None, None], scale=layer.scaling,
                                         enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num)
        out[b * n:(b + 1) * n] = o[0].transpose(0, 1)
    return out.reshape(q.shape[0], -1)
