"""Capture of live traffic in the scheduler process: target features -> the feature pool -> finished requests.

One source for training and serving: the hooks (sglang_ext/online/scheduler/hooks.py) hand the `Capture` exactly
the feature rows SGLang feeds the live draft (prefill rows and the committed rows of every verify step; made
pre-deepstack one step earlier). `observe` writes them, on the device, into the feature pool (pool.py) at the KV
slots of their tokens: one device op per forward, nothing per request. When SGLang releases a finished request's
KV cache, `release` gathers its rows by position from the pool (one gather, one asynchronous copy to the host)
and hands the request to the recorder process (handoff.py), which turns it into a `trainer.replay.ReplayRecord`
(recorder/records.py). A prefix served from the radix cache is in the pool too: its rows were written when it
was computed, and its slots have not been reused since.

No host sync on the serving path: slots, commit lengths and rows stay on the device; the released rows are copied
with a CUDA event recorded after the copies, and the hand-off writes them out once it has completed. Each verify
step's commit lengths are also copied to the host (small) for the acceptance metrics and the rollback watch, read
at a later call once their copy has landed (`Event.query`, no wait). Host decisions (eligibility, the
max_record_tokens limit) use host state only.
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable

import torch

from sglang_ext.online.config import OPT_OUT_KEY
from sglang_ext.online.finished import CapturedRequest
from sglang_ext.online.scheduler.pool import FeaturePool

try:                                    # SGLang's; the capture itself is plain torch (benchmarks/gpu_check.py
    from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX          # runs it where SGLang is not installed)
except ImportError:
    HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"

logger = logging.getLogger(__name__)


def _to_host(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    """An asynchronous copy into host memory (pinned on CUDA: torch's caching host allocator hands back blocks
    freed by earlier copies once they completed, so steady-state capture makes no new pinned allocations;
    benchmarks/gpu_check.py counts them): no host sync."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
    host.copy_(t, non_blocking=cuda)
    return host


class Verified:
    """One verify step's commit lengths on their way to the host (for the metrics and the rollback watch)."""

    def __init__(self, commit_lens: torch.Tensor, max_accept: int, draft_version: int):
        cuda = commit_lens.is_cuda
        self.commit = _to_host(commit_lens, cuda)
        self.max_accept = max_accept
        self.draft_version = draft_version            # the version that proposed these drafts
        self.event = None
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        """True once the copy landed (never waits)."""
        return self.event is None or self.event.query()


def _req_pool_index(req) -> int | None:
    """The request's row of req_to_token (SGLang keeps it on the request's KV record)."""
    kv = getattr(req, "kv", None)
    index = getattr(kv, "req_pool_idx", None) if kv is not None else None
    return index if index is not None else getattr(req, "req_pool_idx", None)


class Capture:
    """Scheduler-side capture. Only the scheduler thread calls it."""

    def __init__(self, cfg, sink, metrics, pool: FeaturePool | None = None, *, width: int = 0,
                 storage_dtype: str = "bfloat16"):
        """pool: the feature pool, or None until SGLang has allocated its KV pools (pipeline.attach_feature_pool
        makes it then, of `width` features per row, for `storage_dtype` records)."""
        self.cfg = cfg
        self.sink = sink                               # Handoff.submit(CapturedRequest)
        self.metrics = metrics
        self.pool = pool
        self.width = pool.width if pool is not None else width
        self.storage_dtype = storage_dtype
        # records carry rows in the storage dtype (fp8 storage is quantized when shards are written, with its
        # per-token scales, so its records hold bf16); the pool holds the serving dtype
        self.record_dtype = torch.bfloat16 if storage_dtype == "float8_e4m3fn" else getattr(torch, storage_dtype)
        # fill a request's radix-cache hit from the pool (its rows were written when the prefix was computed):
        # right when the draft KV serving reads there is of the live version too (capture only: one version;
        # with the trainer: the draft KV refresh, refresh.py); otherwise the hit stays out of the record (gaps,
        # or the recorder's prefix store). pipeline.build_pipeline sets it.
        self.fill_prefixes = False
        self.inflight: deque[Verified] = deque()      # verify steps whose commit lengths may still be copying
        # Scheduler thread, after the metrics: (tokens committed per request of one verify step, the draft version
        # that proposed them) -> the supervisor's rollback watch (pipeline.build_pipeline wires it)
        self.on_verified: Callable[[list[int], int], None] | None = None

    # -- capture --------------------------------------------------------------------------------------
    def observe(self, batch, target_hidden: torch.Tensor, *, starts=None, commit_lens=None,
                stride: int | None = None, max_accept: int | None = None) -> None:
        """Rows of target features fed to the live draft for one batch, into the pool. Prefill (commit_lens
        None): the batch's extend tokens, request after request, at the slots the target just wrote
        (batch.out_cache_loc). Verify: `stride` rows per request, the first at position starts[i], the first
        commit_lens[i] of them committed, at the request's slots of those positions (req_to_token). max_accept:
        the most tokens one verify step can accept (per-position acceptance metrics). Reads nothing from the
        device."""
        self.poll()
        if self.pool is None:
            return
        if commit_lens is None:
            n = sum(int(e) for e in batch.extend_lens)
            if n == 0:
                return
            self.pool.write(batch.out_cache_loc[:n], target_hidden[:n], version=self.metrics.live_version)
            self.metrics.captured(n, n * self.pool.row_bytes)
            return
        bs = commit_lens.shape[0]
        offsets = torch.arange(stride, device=commit_lens.device)
        positions = starts[:bs].to(torch.int64)[:, None] + offsets
        req_to_token = batch.req_to_token_pool.req_to_token
        slots = req_to_token[batch.req_pool_indices[:bs, None].to(torch.int64), positions]
        self.pool.write(slots, target_hidden[:bs * stride], offsets < commit_lens[:, None],
                        version=self.metrics.live_version)
        self.inflight.append(Verified(commit_lens, max_accept or stride, self.metrics.live_version))

    def poll(self) -> None:
        """Verify steps whose commit lengths landed (oldest first; never waits): meter them."""
        while self.inflight and self.inflight[0].ready():
            step = self.inflight.popleft()
            commit = [int(c) for c in step.commit.tolist()]
            self.metrics.verified(commit, step.max_accept, version=step.draft_version)
            if self.on_verified is not None:
                self.on_verified(commit, step.draft_version)
            rows = sum(commit)
            self.metrics.captured(rows, rows * self.pool.row_bytes)

    # -- finish ---------------------------------------------------------------------------------------
    def release(self, req, req_to_token: torch.Tensor) -> None:
        """Called when SGLang is about to release a request's KV cache (its slots still mapped in req_to_token):
        a finished request's rows, gathered from the pool, go to the recorder."""
        if not req.finished():               # retraction: recomputed later (its rows are written again then)
            return
        self.poll()
        reason = type(req.finished_reason).__name__ if req.finished_reason is not None else "unknown"
        if not self._eligible(req):
            if opted_out(req) and "ABORT" not in reason.upper():
                self.metrics.dropped("opted_out")
            return
        if "ABORT" in reason.upper():
            self.metrics.dropped("aborted")
            return
        token_ids = _unpad_multimodal(list(req.origin_input_ids), getattr(req, "multimodal_inputs", None)) \
            + list(req.output_ids)
        if len(token_ids) > self.cfg.max_record_tokens:
            self.metrics.dropped("too_long")
            return
        index = _req_pool_index(req)
        if index is None or self.pool is None:
            return
        # tokens with KV (every one but the last generated: it never went through the target); its radix-cache
        # hit (not recomputed for it) from the pool too when fill_prefixes, else left to the recorder (gaps, or
        # the prefix store)
        n_kv = min(len(token_ids) - 1, req_to_token.shape[1])
        hit = min(max(0, int(getattr(req, "cached_tokens", 0) or 0)), n_kv)
        start = 0 if self.fill_prefixes else hit
        if n_kv - start <= 0:
            return
        rows, covered = self.pool.gather(req_to_token[index, start:n_kv])
        rows = rows.to(self.record_dtype)
        mm = getattr(req, "multimodal_inputs", None)
        mrope = getattr(mm, "mrope_positions", None) if mm is not None else None
        delta = getattr(mm, "mrope_position_delta", None) if mm is not None else None
        cuda = rows.is_cuda
        p = CapturedRequest(req.rid, rows=_to_host(rows, cuda), covered=_to_host(covered, cuda), start=start,
                            cached=hit,
                            token_ids=token_ids, key_ids=list(req.origin_input_ids) + list(req.output_ids),
                            prompt_len=len(req.origin_input_ids), finish_reason=reason,
                            modalities=request_modalities(req))
        p.mrope_prompt = None if mrope is None else _to_host(mrope, mrope.is_cuda)
        p.mrope_delta = 0 if delta is None else _to_host(delta, delta.is_cuda) if torch.is_tensor(delta) else delta
        if cuda or any(torch.is_tensor(t) and t.is_cuda for t in (mrope, delta)):
            p.copied = torch.cuda.Event()
            p.copied.record()
        self.sink(p)

    def _eligible(self, req) -> bool:
        cfg = self.cfg
        if str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):      # /health_generate probes are not traffic
            return False
        if opted_out(req):
            return False
        if not learns_from(cfg.learn_from, request_modalities(req)):
            return False
        if cfg.sample_rate < 1.0:
            h = int(hashlib.sha1(str(req.rid).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            return h < cfg.sample_rate
        return True


def opted_out(req) -> bool:
    """The client asked that this request not be recorded (custom_params[OPT_OUT_KEY] is true)."""
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    return isinstance(params, dict) and params.get(OPT_OUT_KEY) is True


def _unpad_multimodal(token_ids: list[int], mm) -> list[int]:
    """SGLang replaces image/video placeholder tokens by per-item hash values (`MultimodalDataItem.pad_values`,
    for radix caching); put the model's placeholder token ids back."""
    if mm is None or not getattr(mm, "mm_items", None):
        return token_ids
    back: dict[int, int] = {}
    for item in mm.mm_items:
        token = mm.video_token_id if "VIDEO" in str(getattr(item, "modality", "")).upper() else mm.im_token_id
        if token is None:
            continue
        for pad in item.padding_values():
            if pad is not None:
                back[int(pad)] = int(token)
    return [back.get(t, t) for t in token_ids]


def request_modalities(req) -> tuple[str, ...]:
    """The kinds of multimodal input a request carries ("audio", "image", "video"; sorted; () for text only), from
    the modality of each of SGLang's MultimodalDataItems (sglang.srt.multimodal.modality.Modality)."""
    mm = getattr(req, "multimodal_inputs", None)
    kinds = set()
    for item in getattr(mm, "mm_items", None) or ():
        name = getattr(getattr(item, "modality", None), "name", str(getattr(item, "modality", ""))).upper()
        kinds.add("video" if "VIDEO" in name else "audio" if "AUDIO" in name else "image")
    return tuple(sorted(kinds))


def learns_from(learn_from: str, modalities: tuple[str, ...]) -> bool:
    """Whether --online-train-learn-from `learn_from` records a request with these input modalities."""
    if learn_from == "all":
        return True
    if learn_from == "text":
        return not modalities
    if learn_from == "multimodal":
        return bool(modalities)
    return learn_from in modalities                         # image | video
