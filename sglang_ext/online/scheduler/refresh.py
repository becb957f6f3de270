"""Draft KV of one version (scheduler process): after a hot swap, context KV written by an older draft is
re-projected from the feature pool under the live weights before any draft forward reads it.

A draft attends to context KV that it projects from the target's features (DFlash:
`DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc`; EAGLE3: its draft extend). A swap changes the
projection, not the KV already
written: a radix-cached prefix (a shared system prompt, a chat's earlier turns) keeps the KV of the version that
computed it, possibly one long gone, and the requests in flight keep theirs. The feature pool (pool.py) holds the
target features of every live KV slot and the version that wrote each slot's draft KV, so the fix needs no
target forward: before a forward, the slots of the batch's contexts whose draft KV is of another version than
the live one are fed through the same projection again, with the live weights, and re-stamped.

    refresh = DraftKVRefresh(pool_of, metrics, projection_for(kind_name, worker))
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

How a kind's draft KV is projected (`projection_for`):
  * DFlash: the context KV is a per-token projection of the target features; SGLang's own writer
    (`_append_target_hidden_to_draft_kv_by_loc`) is called again.
  * EAGLE3 (one decoder layer, SGLang's LlamaForCausalLMEagle3): the draft extend writes, at position p, the K/V of
    its layer's input [input_norm(embed(token p+1)), hidden_norm(fc(aux features of p))], roped at p: per token,
    so re-running the extend's KV writes needs neither its attention nor its head. The next token comes from the
    request's ids on the host. A request with images or video is not refreshed (the draft embedded its
    multimodal positions from the target's vision embeddings, which the pool does not keep): its stale rows are
    served and counted. A draft with M-RoPE positions is not refreshed at all.

Built without tensor parallelism (the pool lives on TP rank 0 only, and the projection runs on every rank);
`--tp N` is not refreshed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def draft_ids(runner, slots: torch.Tensor) -> torch.Tensor | None:
    """KV slots (the scheduler's virtual ids, as req_to_token holds them) as the draft's KV pool (of the draft's
    model runner) indexes them, the mapping SGLang's own writes use (`KVLocPlan.write_ids`); None when the
    draft has no such pool."""
    translator = getattr(runner, "kv_index_translator", None)
    if translator is None:
        return slots
    from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind
    space = translator.space(IdSpaceKind.FULL)
    if space is None:
        return None
    return slots if space.write is None else space.write(slots)


class DFlashProjection:
    """DFlash's context KV from target features: SGLang's own writer, called again under the live weights."""
    needs_next_tokens = False

    def __init__(self, worker):
        self.runner = worker.draft_model_runner

    def write(self, worker, rows: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
              next_tokens: torch.Tensor | None = None) -> None:
        worker._append_target_hidden_to_draft_kv_by_loc(target_hidden=rows, cache_loc=ids, positions=positions)


class Eagle3Projection:
    """EAGLE3's draft KV at position p: the K/V of its one layer's input [input_norm(embed(token p+1)),
    hidden_norm(fc(aux features of p))] at position p, as SGLang's draft extend computes it (llama_eagle3.py
    `LlamaModel.forward`, `LlamaDecoderLayer.forward`, LlamaAttention's qkv_proj and rotary_emb), written where the
    extend's attention writes it."""
    needs_next_tokens = True

    def __init__(self, worker):
        self.runner = worker.draft_worker.draft_runner
        self.model = self.runner.model.model                     # LlamaForCausalLMEagle3 -> its LlamaModel

    @staticmethod
    def supports(worker) -> str | None:
        """None when the live draft can be refreshed this way, else why not."""
        model = getattr(getattr(worker.draft_worker.draft_runner, "model", None), "model", None)
        if model is None or not hasattr(model, "fc") or not hasattr(model, "layers"):
            return "the draft is not SGLang's LlamaForCausalLMEagle3"
        if len(model.layers) != 1:
            return f"the draft has {len(model.layers)} decoder layers (the refresh re-projects one)"
        if getattr(model, "is_mrope_enabled", False):
            return "the draft uses M-RoPE positions"
        return None

    def write(self, worker, rows: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
              next_tokens: torch.Tensor | None = None) -> None:
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        m = self.model
        device = m.fc.weight.device
        embeds = m.embed_tokens(next_tokens.to(device))
        hidden = rows.to(device=device, dtype=m.fc.weight.dtype)
        if hidden.shape[-1] != embeds.shape[-1]:                 # the aux features of 3 layers -> fc
            if m.input_norm is not None:
                hidden = m.input_norm(hidden)
            if m.fc_norm is not None:
                chunks = hidden.chunk(m.num_aux_hidden_states, dim=-1)
                hidden = torch.cat([norm(c) for norm, c in zip(m.fc_norm, chunks)], dim=-1)
            hidden = m.fc(hidden)
        layer = m.layers[0]
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        attn = layer.self_attn
        _, k, v = attn.forward_prepare_native(positions=positions.to(device), hidden_states=x)
        self.runner.token_to_kv_pool.set_kv_buffer(
            attn.attn, KVWriteLoc(ids.to(device), physical=True),
            k.view(-1, attn.attn.tp_k_head_num, attn.attn.qk_head_dim),
            v.view(-1, attn.attn.tp_v_head_num, attn.attn.v_head_dim), attn.attn.k_scale, attn.attn.v_scale)


def projection_for(kind_name: str, worker):
    """The draft KV projection of the served kind, or None (with a log line saying why) when its draft KV
    cannot be refreshed: prefixes are then recorded with gaps, never with features the draft did not read."""
    if kind_name == "dflash" and hasattr(worker, "_append_target_hidden_to_draft_kv_by_loc"):
        return DFlashProjection(worker)
    if kind_name == "eagle3" and hasattr(worker, "draft_worker"):
        why = Eagle3Projection.supports(worker)
        if why is None:
            return Eagle3Projection(worker)
        logger.warning("sglang_ext: draft KV is not refreshed after hot swaps: %s", why)
        return None
    logger.warning("sglang_ext: draft KV is not refreshed after hot swaps: no projection for %s on %s", kind_name,
                   type(worker).__name__)
    return None


def next_token_ids(reqs, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For positions 0..lengths[i]-1 of each request, request after request: the id of the token after it (0
    where unknown) and whether it can be re-projected (the id is known and the request has no images or video).
    Slices of the host's id lists, no loop per position."""
    next_ids, known = [], []
    for req, n in zip(reqs, lengths):
        prompt = req.origin_input_ids
        after = list(prompt[1:n + 1]) if len(prompt) > n else (list(prompt) + list(req.output_ids))[1:n + 1]
        ids = torch.zeros(n, dtype=torch.int64)
        ids[:len(after)] = torch.tensor(after, dtype=torch.int64)
        ok = torch.zeros(n, dtype=torch.bool)
        ok[:len(after)] = getattr(req, "multimodal_inputs", None) is None
        next_ids.append(ids)
        known.append(ok)
    return torch.cat(next_ids), torch.cat(known)


class DraftKVRefresh:
    """Only the scheduler thread calls it."""

    def __init__(self, pool_of: Callable[[], object], metrics, projection):
        """pool_of: the feature pool (None until SGLang's KV pools exist); metrics: OnlineMetrics (its
        live_version is the draft serving now); projection: the kind's (projection_for)."""
        self.pool_of = pool_of
        self.metrics = metrics
        self.projection = projection
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
        next_tokens = None
        if self.projection.needs_next_tokens:          # EAGLE3: the token after each position, from the host
            next_ids, known = next_token_ids(batch.reqs[:len(lengths)], lengths)
            # rows without a next token on the host, or of a request with images or video (embedded from vision
            # features the pool does not keep): served as they are, counted
            known = known.to(stale.device)
            gone = gone | (stale & ~known)
            stale = stale & known
            next_tokens = next_ids.to(stale.device)[stale]
        n_gone = int(gone.sum())                       # host reads: only on the batches checked at all
        n_stale = int(stale.sum())
        slots, positions = slots[stale], positions[stale]
        ids = draft_ids(self.projection.runner, slots) if n_stale else None
        if n_stale and ids is None:                    # no draft KV pool to write (not seen with SGLang 0.5.23)
            n_gone, n_stale = n_gone + n_stale, 0
        self.stale_served += n_gone
        self.metrics.draft_kv(stale_served=n_gone)
        if not n_stale:
            return
        t0 = time.perf_counter()
        self.active = True
        try:
            self.projection.write(worker, pool.gather(slots)[0], ids, positions, next_tokens)
        finally:
            self.active = False
        pool.stamp(slots, live)
        self.refreshed_tokens += n_stale
        self.metrics.draft_kv(refreshed=n_stale, seconds=time.perf_counter() - t0)
