"""Draft KV of one version (scheduler process): after a hot swap, context KV written by an older draft is
re-projected from the feature pool under the live weights before any draft forward reads it.

A DFlash draft attends to context KV that it projects from the target's features (SGLang:
`DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc`). A swap changes the projection, not the KV already
written: a radix-cached prefix (a shared system prompt, a chat's earlier turns) keeps the KV of the version that
computed it, possibly one long gone, and the requests in flight keep theirs. The feature pool (pool.py) holds the
target features of every live KV slot and the version that wrote each slot's draft KV, so the fix needs no
target forward: before a forward, the slots of the batch's contexts whose draft KV is of another version than
the live one are fed through the same projection again, with the live weights, and re-stamped.

    refresh = DraftKVRefresh(pool_of, metrics)
    refresh.before_forward(worker, batch)      # <worker>.forward_batch_generation, before SGLang runs the batch

Which contexts are checked, so that nothing runs per request while no version changed:
  * a prefill batch (extend): each request's prefix (its radix-cache hit and earlier chunks), once any version
    other than the first has gone live;
  * the first decode batch after a swap or rollback: every running request's committed context.
The check is one gather on the device; its counts are read on the host (a device sync, on the checked batches
only: prefill batches once a swap has happened, and one decode batch per swap) to size the projection. Rows
whose features are gone (a pool smaller than the KV cache, whose rows other slots took) cannot be re-projected:
they are served as they are and counted (sglang:online_train_draft_kv_stale_tokens_served_total; 0 with the
default pool size). Refreshed tokens and the
time spent are counted too (`_draft_kv_refreshed_tokens_total`, `_draft_kv_refresh_seconds_total`).

Built for DFlash without tensor parallelism (the pool lives on TP rank 0 only, and the projection runs on every
rank); EAGLE3 (whose draft KV comes from the draft's own extend) and `--tp N` are not refreshed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def draft_ids(worker, slots: torch.Tensor) -> torch.Tensor | None:
    """KV slots (the scheduler's virtual ids, as req_to_token holds them) as the draft's KV pool indexes them,
    the mapping SGLang's own writes use (`KVLocPlan.write_ids`); None when the draft has no such pool."""
    runner = getattr(worker, "draft_model_runner", None)
    translator = getattr(runner, "kv_index_translator", None)
    if translator is None:
        return slots
    from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind
    space = translator.space(IdSpaceKind.FULL)
    if space is None:
        return None
    return slots if space.write is None else space.write(slots)


class DraftKVRefresh:
    """Only the scheduler thread calls it."""

    def __init__(self, pool_of: Callable[[], object], metrics):
        """pool_of: the feature pool (None until SGLang's KV pools exist); metrics: OnlineMetrics (its
        live_version is the draft serving now)."""
        self.pool_of = pool_of
        self.metrics = metrics
        self.first_version = metrics.live_version
        self.changed = False                  # a version other than the first has gone live
        self.checked_version = metrics.live_version   # the running requests' contexts are of this version
        self.active = False                   # True while re-projecting (the capture hook must not record it)
        self.refreshed_tokens = 0
        self.stale_served = 0
        self.seconds = 0.0

    def before_forward(self, worker, batch) -> None:
        pool = self.pool_of()
        live = self.metrics.live_version
        if pool is None or batch is None:
            return
        if live != self.first_version:
            self.changed = True
        if not self.changed:
            return
        mode = getattr(batch, "forward_mode", None)
        if mode is None or mode.is_idle():
            return
        if mode.is_extend() or getattr(batch, "is_extend_in_batch", False):
            lengths = [int(n) for n in (batch.prefix_lens or [])]
        elif mode.is_decode() and self.checked_version != live:
            # committed KV of each running request (lags the device by at most one verify under overlap: a
            # lower bound, never a slot past the request's own)
            lengths = [int(req.kv.kv_committed_len) for req in batch.reqs]
        else:
            return
        self.checked_version = live
        if not any(lengths):
            return
        t0 = time.perf_counter()
        self._refresh(worker, batch, pool, lengths, live)
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _refresh(self, worker, batch, pool, lengths: list[int], live: int) -> None:
        req_to_token = batch.req_to_token_pool.req_to_token
        device = req_to_token.device
        lens = torch.tensor(lengths, dtype=torch.int64)
        longest = int(lens.max())
        positions = torch.arange(longest, dtype=torch.int64)
        mask = positions[None, :] < lens[:, None]                          # [bs, longest] host
        rows_of = batch.req_pool_indices[:len(lengths)].to(device=device, dtype=torch.int64)
        slots = req_to_token[rows_of[:, None], positions.to(device)[None, :]][mask.to(device)]
        positions = positions[None, :].expand(len(lengths), -1)[mask].to(device)
        stale, gone = pool.stale(slots, live)
        n_gone = int(gone.sum())                       # host reads: only on the batches checked at all
        n_stale = int(stale.sum())
        slots, positions = slots[stale], positions[stale]
        ids = draft_ids(worker, slots) if n_stale else None
        if n_stale and ids is None:                    # no draft KV pool to write (not seen with SGLang 0.5.23)
            n_gone, n_stale = n_gone + n_stale, 0
        self.stale_served += n_gone
        self.metrics.draft_kv(stale_served=n_gone)
        if not n_stale:
            return
        t0 = time.perf_counter()
        self.active = True
        try:
            worker._append_target_hidden_to_draft_kv_by_loc(
                target_hidden=pool.gather(slots)[0], cache_loc=ids, positions=positions)
        finally:
            self.active = False
        pool.stamp(slots, live)
        self.refreshed_tokens += n_stale
        self.metrics.draft_kv(refreshed=n_stale, seconds=time.perf_counter() - t0)
