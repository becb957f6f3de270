"""MHA KV pool for the torch_cpu platform: the in-tree pool minus its Triton KV-copy warmup."""
from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, move_kv_cache_native


class TorchCpuMHATokenToKVPool(MHATokenToKVPool):
    def _init_kv_copy_and_warmup(self):
        # In-tree: sizes and launches a Triton tiled copy (memory_pool.py `_init_kv_copy_and_warmup`).
        self._kv_copy_config = None

    def _move_kv_cache_impl(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        move_kv_cache_native(self.k_buffer, self.v_buffer, tgt_loc, src_loc)
