"""Capture of live traffic in the scheduler process: target features -> per-request records.

One source for training and serving: the hooks (sglang_ext/online/scheduler/hooks.py) hand the `Capture` exactly the
feature rows SGLang feeds the live draft (prefill rows and the committed rows of every verify step; made
pre-deepstack one step earlier). Per request (keyed by rid) a `CapturedRequest` keeps the rows by position;
when SGLang releases the request's KV cache (finish, abort, retraction) a finished request gets its token ids
and goes to the recorder process through the hand-off (handoff.py), which turns it into a
`trainer.replay.ReplayRecord` (recorder/records.py) off the scheduler process.

No host sync on the serving path. Each feed of features is one `Feed`: its rows, and for a verify step the
start positions and commit lengths (device tensors), are copied to the host asynchronously (pinned memory,
the current stream, a CUDA event recorded after the copies). Which rows belong to which request is only
read once the event has completed: the scheduler thread polls it (`Event.query`, no wait) at its next
capture call and then keeps each running request's committed rows (and meters acceptance per position); a
request released before that takes the feed along and the replay buffer's thread waits on the event. Host
decisions (eligibility, the max_record_tokens cut) use host state only.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable

import torch

from sglang_ext.online.config import OPT_OUT_KEY
from sglang_ext.online.finished import CapturedRequest

try:                                    # SGLang's; the capture itself is plain torch (benchmarks/gpu_check.py
    from sglang.srt.constants import (
        HEALTH_CHECK_RID_PREFIX,  # runs it where SGLang is not installed)
    )
except ImportError:
    HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"

logger = logging.getLogger(__name__)


class Feed:
    """One feed of target features to the live draft (one prefill batch or one verify step), on its way to the
    host. Prefill: member i's rows are rows[offsets[i] : offsets[i] + lengths[i]] at positions from starts[i]
    (all host ints). Verify: member i owns `stride` rows from rows[i * stride]; its start position and how many
    of them were committed arrive with the copy."""

    def __init__(self, target_hidden: torch.Tensor, members: list[tuple[str, int]], *, starts=None,
                 commit_lens=None, stride: int | None = None, offsets: list[int] | None = None,
                 lengths: list[int] | None = None, max_accept: int | None = None):
        self.members = members                      # (rid, member index in the feed)
        self.stride, self.offsets, self.lengths, self.max_accept = stride, offsets, lengths, max_accept
        cuda = target_hidden.is_cuda
        self.rows = _to_host(target_hidden, cuda)
        self.verify = commit_lens is not None
        self.starts = _to_host(starts, cuda) if self.verify else list(starts)
        self.commit_lens = _to_host(commit_lens, cuda) if self.verify else None
        self.event = None
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        self.metered = False
        self.draft_version = 0                      # verify: the draft version that proposed (Capture)
        self._starts: list[int] | None = None
        self._commit: list[int] | None = None

    def ready(self) -> bool:
        """True once the copies landed (never waits)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def commit_list(self) -> list[int]:
        self.wait()
        if self._commit is None:
            self._commit = [int(c) for c in self.commit_lens.tolist()]
        return self._commit

    def part(self, i: int) -> tuple[int, torch.Tensor]:
        """(start position, rows) of member i (waits for the copy)."""
        if not self.verify:
            return int(self.starts[i]), self.rows[self.offsets[i]:self.offsets[i] + self.lengths[i]]
        commit = self.commit_list()
        if self._starts is None:
            self._starts = [int(x) for x in self.starts.tolist()]
        return self._starts[i], self.rows[i * self.stride:i * self.stride + commit[i]]


def _to_host(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    """An asynchronous copy into host memory (pinned on CUDA: torch's caching host allocator hands back blocks
    freed by earlier feeds once their copies completed, so steady-state capture makes no new pinned
    allocations; benchmarks/gpu_check.py counts them): no host sync."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
    host.copy_(t, non_blocking=cuda)
    return host


class Capture:
    """Scheduler-side bookkeeping. Only the scheduler thread touches `pending` and `inflight`."""

    def __init__(self, cfg, sink, metrics):
        self.cfg = cfg
        self.sink = sink                               # Handoff.submit(CapturedRequest)
        self.metrics = metrics
        self.pending: dict[str, CapturedRequest] = {}
        self.inflight: deque[Feed] = deque()          # feeds whose copies may still be running
        self.done: OrderedDict[str, None] = OrderedDict()   # recently released rids: ignore late rows
        self.lock = threading.Lock()
        # Scheduler thread, after the metrics: (tokens committed per request of one verify step, the draft version
        # that proposed them) -> the supervisor's rollback watch (pipeline.build_pipeline wires it)
        self.on_verified: Callable[[list[int], int], None] | None = None

    # -- capture --------------------------------------------------------------------------------------
    def observe(self, batch, target_hidden: torch.Tensor, *, starts=None, commit_lens=None,
                stride: int | None = None, max_accept: int | None = None) -> None:
        """Rows of target features fed to the live draft for one batch. Prefill (commit_lens None): the
        batch's extend tokens, request after request, from each prefix. Verify: `stride` rows per request,
        the first at position starts[i], the first commit_lens[i] of them committed. max_accept: the most
        tokens one verify step can accept (per-position acceptance metrics). Reads nothing from the device."""
        self.poll()
        reqs = list(batch.reqs)
        if commit_lens is None:
            offsets, lengths, members, off = [], [], [], 0
            for req, prefix_len, extend_len in zip(reqs, batch.prefix_lens, batch.extend_lens):
                if self._keep(req, int(prefix_len) + int(extend_len)):
                    members.append((req.rid, len(offsets)))
                offsets.append(off)
                lengths.append(int(extend_len))
                off += int(extend_len)
            if not members:
                return
            feed = Feed(target_hidden, members, starts=[int(p) for p in batch.prefix_lens], offsets=offsets,
                        lengths=lengths)
        else:
            n = commit_lens.shape[0]
            members = [(req.rid, i) for i, req in enumerate(reqs[:n])
                       if self._keep(req, len(req.origin_input_ids) + len(req.output_ids) + stride)]
            feed = Feed(target_hidden[:n * stride], members, starts=starts, commit_lens=commit_lens, stride=stride,
                        max_accept=max_accept or stride)
            feed.draft_version = self.metrics.live_version     # the version that proposed these drafts
            self.inflight.append(feed)               # metered (and split) once its copy landed
        for rid, i in feed.members:
            p = self.pending.get(rid)
            if p is None:
                p = self.pending[rid] = CapturedRequest(rid)
            p.parts.append((feed, i))
        if not feed.verify:
            nbytes = sum(feed.lengths[i] for _, i in feed.members) * feed.rows.shape[1] * feed.rows.element_size()
            self.metrics.captured(sum(feed.lengths[i] for _, i in feed.members), nbytes)

    def poll(self) -> None:
        """Finished verify copies (oldest first; never waits): meter them and keep each running request's
        committed rows only, so a long request holds its own rows, not whole batches."""
        while self.inflight and self.inflight[0].ready():
            feed = self.inflight.popleft()
            commit = feed.commit_list()
            self.metrics.verified(commit, feed.max_accept, version=feed.draft_version)
            if self.on_verified is not None:
                self.on_verified(commit, feed.draft_version)
            rows = 0
            for rid, i in feed.members:
                p = self.pending.get(rid)
                if p is None:                        # released meanwhile: it took the feed along
                    continue
                p.parts = [(f, j) for f, j in p.parts if f is not feed]
                start, part = feed.part(i)
                if part.shape[0]:
                    p.chunks[start] = part.clone()
                    rows += part.shape[0]
            self.metrics.captured(rows, rows * feed.rows.shape[1] * feed.rows.element_size())

    def _keep(self, req, end: int) -> bool:
        """Record this request's rows up to position `end` (host state only)?"""
        rid = req.rid
        if rid in self.done or not self._eligible(req):
            return False
        if end > self.cfg.max_record_tokens:
            # Too long to record: stop capturing it now (not when it finishes) and free what it holds.
            self.pending.pop(rid, None)
            self._forget(rid)
            self.metrics.dropped("too_long")
            return False
        return True

    # -- finish ---------------------------------------------------------------------------------------
    def release(self, req) -> None:
        """Called when SGLang releases a request's KV cache."""
        if not req.finished():               # retraction: the request will be recomputed; keep its rows
            return
        self.poll()
        rid = req.rid
        self._forget(rid)
        p = self.pending.pop(rid, None)
        reason = type(req.finished_reason).__name__ if req.finished_reason is not None else "unknown"
        if p is None:
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
        mm = getattr(req, "multimodal_inputs", None)
        mrope = getattr(mm, "mrope_positions", None) if mm is not None else None
        delta = getattr(mm, "mrope_position_delta", None) if mm is not None else None
        p.token_ids, p.prompt_len, p.finish_reason = token_ids, len(req.origin_input_ids), reason
        p.key_ids = list(req.origin_input_ids) + list(req.output_ids)
        p.mrope_prompt = None if mrope is None else _to_host(mrope, mrope.is_cuda)
        p.mrope_delta = 0 if delta is None else _to_host(delta, delta.is_cuda) if torch.is_tensor(delta) else delta
        if any(torch.is_tensor(t) and t.is_cuda for t in (mrope, delta)):
            p.copied = torch.cuda.Event()
            p.copied.record()
        p.modalities = request_modalities(req)
        self.sink(p)

    def _forget(self, rid: str) -> None:
        """No more rows of `rid` are recorded (late rows of a finished or dropped request are ignored)."""
        self.done[rid] = None
        while len(self.done) > 4096:
            self.done.popitem(last=False)

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
