"""Capture of live traffic in the scheduler process: target features -> per-request records.

One source for training and serving: the hooks (sglang_ext/online/hooks.py) hand the `Recorder` exactly the
feature rows SGLang feeds the live draft (prefill rows and the committed rows of every verify step; made
pre-deepstack one step earlier). Per request (keyed by rid) a `CapturedRequest` keeps the rows by position;
when SGLang releases the request's KV cache (finish, abort, retraction) a finished request gets its token ids
and is handed to the replay buffer's thread, which turns it into a `trainer.replay.ReplayRecord`
(`assemble_record`) off the hot path.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX

logger = logging.getLogger(__name__)


@dataclass
class CapturedRequest:
    """One request's capture: its feature rows while it runs, plus what it finished with (set at release)."""
    rid: str
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)   # start position -> rows [n, K*H] (CPU)
    rows: int = 0
    # set when the request finished (the replay buffer's thread assembles the record from these)
    token_ids: list[int] = field(default_factory=list)   # prompt + generated, as SGLang finished them
    prompt_len: int = 0
    mrope_prompt: torch.Tensor | None = None             # [3, prompt_len], None for text-only
    mrope_delta: int = 0
    has_image: bool = False
    finish_reason: str = ""


class Recorder:
    """Scheduler-side bookkeeping. Only the scheduler thread touches `pending`."""

    def __init__(self, cfg, sink, metrics):
        self.cfg = cfg
        self.sink = sink                               # ReplayBuffer.submit(CapturedRequest)
        self.metrics = metrics
        self.pending: dict[str, CapturedRequest] = {}
        self.done: OrderedDict[str, None] = OrderedDict()   # recently released rids: ignore late rows
        self.feature_dim: int | None = None
        self.lock = threading.Lock()

    # -- capture --------------------------------------------------------------------------------------
    def _add_rows(self, req, start: int, rows: torch.Tensor) -> None:
        rid = req.rid
        if rid in self.done or rows.shape[0] == 0 or not self._eligible(req):
            return
        p = self.pending.get(rid)
        if p is None:
            p = self.pending[rid] = CapturedRequest(rid)
        # SGLang reuses these buffers in the next forward: copy (asynchronously where the device allows).
        host = torch.empty(rows.shape, dtype=rows.dtype, device="cpu",
                           pin_memory=rows.is_cuda and torch.cuda.is_available())
        host.copy_(rows, non_blocking=rows.is_cuda)
        p.chunks[int(start)] = host
        p.rows += int(rows.shape[0])
        self.metrics.captured(int(rows.shape[0]), host.numel() * host.element_size())

    def observe(self, batch, target_hidden: torch.Tensor, *, positions=None, commit_lens=None,
                block_size: int | None = None) -> None:
        """Rows fed to the draft by one `_append_target_hidden_to_draft_kv_by_loc` call."""
        if commit_lens is not None:
            self.metrics.verified(commit_lens.tolist(), block_size)
        for req, start, rows in split_rows(batch, positions=positions, commit_lens=commit_lens,
                                           block_size=block_size):
            self._add_rows(req, start, target_hidden[rows])

    # -- finish ---------------------------------------------------------------------------------------
    def release(self, req) -> None:
        """Called when SGLang releases a request's KV cache."""
        if not req.finished():               # retraction: the request will be recomputed; keep its rows
            return
        rid = req.rid
        self.done[rid] = None
        while len(self.done) > 4096:
            self.done.popitem(last=False)
        p = self.pending.pop(rid, None)
        if p is None:
            return
        reason = type(req.finished_reason).__name__ if req.finished_reason is not None else "unknown"
        if "ABORT" in reason.upper():
            self.metrics.dropped("aborted")
            return
        token_ids = _unpad_multimodal(list(req.origin_input_ids), getattr(req, "multimodal_inputs", None)) \
            + list(req.output_ids)
        if len(token_ids) > self.cfg.max_record_tokens:
            self.metrics.dropped("too_long")
            return
        mm = getattr(req, "multimodal_inputs", None)
        mrope = getattr(mm, "mrope_positions", None) if mm is not None else None
        delta = getattr(mm, "mrope_position_delta", None) if mm is not None else None
        p.token_ids, p.prompt_len, p.finish_reason = token_ids, len(req.origin_input_ids), reason
        p.mrope_prompt = None if mrope is None else mrope.detach().to("cpu", copy=True)
        p.mrope_delta = int(delta.reshape(-1)[0]) if delta is not None else 0
        p.has_image = _has_image(req)
        self.sink(p)

    def _eligible(self, req) -> bool:
        cfg = self.cfg
        if str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):      # /health_generate probes are not traffic
            return False
        if cfg.learn_from != "all" and (cfg.learn_from == "image") != _has_image(req):
            return False
        if cfg.sample_rate < 1.0:
            h = int(hashlib.sha1(str(req.rid).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            return h < cfg.sample_rate
        return True


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


def _has_image(req) -> bool:
    mm = getattr(req, "multimodal_inputs", None)
    return bool(mm is not None and getattr(mm, "mm_items", None))


def split_rows(batch, *, positions=None, commit_lens=None, block_size: int | None = None):
    """[(req, start position, row slice)] for the target feature rows of one draft-context write.

    Prefill (commit_lens None): the batch's extend tokens, request after request, starting at each prefix.
    Verify: B rows per request at `positions`; the committed ones (bonus + accepted) are a prefix.
    """
    if commit_lens is None:
        out, offset = [], 0
        for req, prefix_len, extend_len in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            out.append((req, int(prefix_len), slice(offset, offset + extend_len)))
            offset += extend_len
        return out
    commit = commit_lens.tolist()
    starts = positions.view(-1, block_size)[:, 0].tolist()
    return [(req, int(starts[i]), slice(i * block_size, i * block_size + commit[i]))
            for i, req in enumerate(batch.reqs[:len(commit)])]


def assemble_record(fin: CapturedRequest, include_prompt_loss: bool):
    """A finished CapturedRequest -> trainer.replay.ReplayRecord, or None when no row was captured.

    Covers positions [0, S) where S = end of the last captured row (capped at the finished length): the very
    last generated token never has target features. Positions the target did not recompute (a radix-cache
    prefix hit) are a gap: zero features, out of the loss mask, listed in meta["feature_gaps"].
    """
    from trainer.replay import ReplayRecord

    n_tokens = len(fin.token_ids)
    chunks = sorted((s, t) for s, t in fin.chunks.items() if s < n_tokens)
    if not chunks:
        return None
    feature_dim, dtype = chunks[0][1].shape[1], chunks[0][1].dtype
    end = min(max(s + t.shape[0] for s, t in chunks), n_tokens)
    features = torch.zeros(end, feature_dim, dtype=dtype)
    covered = torch.zeros(end, dtype=torch.bool)
    for start, rows in chunks:                       # later chunks (recomputation) overwrite earlier ones
        rows = rows[:end - start]
        features[start:start + rows.shape[0]] = rows
        covered[start:start + rows.shape[0]] = True
    gaps, i = [], 0
    while i < end:
        if not covered[i]:
            j = i
            while j < end and not covered[j]:
                j += 1
            gaps.append([i, j])
            i = j
        else:
            i += 1
    input_ids = torch.tensor(fin.token_ids[:end], dtype=torch.int64)
    loss_mask = covered.clone()
    if not include_prompt_loss:
        loss_mask[:fin.prompt_len] = False
    positions = torch.arange(end, dtype=torch.int64).expand(3, end).clone()
    if fin.mrope_prompt is not None:
        n_prompt = min(fin.prompt_len, end, fin.mrope_prompt.shape[1])
        positions[:, :n_prompt] = fin.mrope_prompt[:, :n_prompt].to(torch.int64)
        positions[:, fin.prompt_len:] += fin.mrope_delta
    meta = {"rid": fin.rid, "prompt_len": fin.prompt_len, "num_tokens_finished": n_tokens,
            "finish_reason": fin.finish_reason, "has_image": fin.has_image, "feature_gaps": gaps,
            "source": "online"}
    return ReplayRecord(input_ids=input_ids, features=features, positions=positions,
                        loss_mask=loss_mask, meta=meta)
