"""Hot swap of a published draft version into SGLang's live draft, staged so that the swap point (between two
scheduler iterations) only copies device memory into device memory.

    plan_placements   once, at startup (no forward runs yet): where SGLang's own `load_weights` puts each weight
                      of the slot: one SGLang parameter and a block of its rows (q/k/v and gate/up are stacked),
                      and which part of the weight lands there (all of it; under tensor parallelism this rank's
                      rows or columns). Found by loading probe tensors (each element its row or column number)
                      into scratch copies of the parameters, so no SGLang naming or sharding rule is restated.
    StagedSwap.stage  supervisor thread, off the critical path: the published version (float32 in the shared
                      slot) -> host memory in the parameters' dtype (pinned on CUDA) -> device staging buffers,
                      asynchronously on a side stream, with an event.
    StagedSwap.apply  scheduler thread, at the swap point: the copy stream waits (on the device, not the host)
                      for the forward in flight and for the staging event; one device-to-device copy per
                      parameter; the forward stream then waits for the copies. No host synchronisation, the
                      parameters keep their storage (CUDA graphs stay valid).

Memory: the staging buffers are one more copy of the trained parameters in the serving dtype on the serving
device (2 GB for a 1B-parameter bf16 draft), outside SGLang's --mem-fraction-static.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    name: str            # the slot weight (our name)
    param: str           # the SGLang parameter (its named_parameters() name) that load_weights writes it into
    rows: tuple[int, int]   # the rows [a, b) of that parameter (dim 0; all of it for a 1-D parameter)
    src_rows: tuple[int, int] | None = None   # the slot weight's rows that land there (None: all; a TP shard)
    src_cols: tuple[int, int] | None = None   # ... and columns (None: all; a row-parallel shard)

    def source(self, weight: torch.Tensor) -> torch.Tensor:
        """The part of the full slot weight this placement holds."""
        if self.src_rows is not None:
            weight = weight[self.src_rows[0]:self.src_rows[1]]
        if self.src_cols is not None:
            weight = weight[:, self.src_cols[0]:self.src_cols[1]]
        return weight


def draft_module(kind, worker) -> torch.nn.Module:
    """SGLang's live draft module inside `worker` (the kind's `serving.draft_module` attribute path)."""
    obj = worker
    for attr in kind.serving.draft_module.split("."):
        obj = getattr(obj, attr)
    return obj


@torch.no_grad()
def plan_placements(kind, draft_module: torch.nn.Module, layout) -> list[Placement] | None:
    """Where each slot weight lands in SGLang's draft, or None (with a warning) when some weight does not land
    as one block of rows of the parameter the kind names, holding one block of the weight (the swap then goes
    through load_weights)."""
    params = dict(draft_module.named_parameters())
    by_short = {n.removeprefix("model."): n for n in params}
    targets: dict[str, str] = {}
    for name, _ in layout:
        full = by_short.get(kind.sglang_param_name(name))
        if full is None:
            logger.warning("sglang_ext: staged swap off: no SGLang parameter for %s", name)
            return None
        targets[name] = full
    live = {n: params[n].data for n in set(targets.values())}
    # float32 host scratch: probe values (row / column numbers) stay exact whatever the served dtype, and the
    # serving device needs no room for it
    scratch = {n: torch.zeros(t.shape, dtype=torch.float32) for n, t in live.items()}
    placements = []
    try:
        for n in live:
            params[n].data = scratch[n]
        for name, shape in layout:
            placement = _probe(draft_module, scratch, name, tuple(int(d) for d in shape), targets[name])
            if placement is None:
                logger.warning("sglang_ext: staged swap off: %s does not land as one block of rows of %s", name,
                               targets[name])
                return None
            placements.append(placement)
        stray = [n for n, t in scratch.items() if t.any()]   # a weight also wrote into a parameter not its own
        if stray:
            logger.warning("sglang_ext: staged swap off: loading the draft's weights also writes %s", stray[:4])
            return None
    finally:
        for n, t in live.items():
            params[n].data = t
    return placements


def _probe(draft_module, scratch: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], full: str
           ) -> Placement | None:
    """Load weight `name` with its elements numbered by row, then (2-D) by column, and read back which rows of
    parameter `full` it lands in and which block of the weight lands there; None unless that block lands whole
    and in order."""
    if not shape:
        return None
    numbered = [torch.arange(1, shape[0] + 1, dtype=torch.float32).view(-1, *([1] * (len(shape) - 1))).expand(shape)]
    if len(shape) == 2:
        numbered.append(torch.arange(1, shape[1] + 1, dtype=torch.float32).expand(shape))
    rows, spans, landed = None, [], []
    dst = scratch[full]                  # every scratch parameter is zero here (plan_placements checks the rest)
    for probe in numbered:
        dst.zero_()
        draft_module.load_weights([(name, probe.contiguous())])
        if not dst.any():
            return None
        block = dst.reshape(dst.shape[0], -1) if dst.dim() else dst.reshape(1, 1)
        hit = torch.nonzero(block.ne(0).any(-1)).flatten()
        a, b = int(hit[0]), int(hit[-1]) + 1
        if rows not in (None, (a, b)):
            return None
        rows = (a, b)
        landed.append(block[a:b].clone())
        spans.append((int(landed[-1].min()) - 1, int(landed[-1].max())))    # the weight's rows / columns there
    dst.zero_()
    (r0, r1), (c0, c1) = spans[0], spans[1] if len(spans) > 1 else (0, shape[-1])
    for probe, got in zip(numbered, landed):
        want = probe[r0:r1, c0:c1] if len(shape) == 2 else probe[r0:r1]
        if got.numel() != want.numel() or not torch.equal(got.reshape(-1), want.reshape(-1)):
            return None
    return Placement(name, full, rows, None if (r0, r1) == (0, shape[0]) else (r0, r1),
                     None if len(shape) < 2 or (c0, c1) == (0, shape[1]) else (c0, c1))


def _merged_rows(placements: list[Placement]) -> dict[str, list[tuple[int, int]]]:
    """Per parameter, the row ranges the slot covers, adjacent blocks merged (rows outside them, e.g. the vocab
    padding of a ParallelLMHead, are never written)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for p in sorted(placements, key=lambda p: (p.param, p.rows)):
        ranges = out.setdefault(p.param, [])
        if ranges and ranges[-1][1] == p.rows[0]:
            ranges[-1] = (ranges[-1][0], p.rows[1])
        else:
            ranges.append(p.rows)
    return out


class StagedSwap:
    def __init__(self, draft_module: torch.nn.Module, placements: list[Placement]):
        params = dict(draft_module.named_parameters())
        self.placements = placements
        self.ranges = _merged_rows(placements)
        self.live = {n: params[n] for n in self.ranges}
        device = next(iter(self.live.values())).device
        self.cuda = device.type == "cuda"
        # device staging buffers, and host buffers in the same dtype (pinned on CUDA, for async copies)
        self.staged = {n: torch.empty_like(p.data) for n, p in self.live.items()}
        self.host = ({n: torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for n, p in self.live.items()}
                     if self.cuda else self.staged)
        self.side = torch.cuda.Stream(device=device) if self.cuda else None
        self.staged_event = torch.cuda.Event() if self.cuda else None
        self.applied_event = None                  # recorded after the last swap's copies
        self.version = 0                           # the version in the staging buffers

    def stage(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Slot weights (float32, host) -> staging buffers; asynchronous on CUDA (supervisor thread). The caller
        stages a version only after the previous one was applied."""
        for p in self.placements:
            dst = _rows(self.host[p.param], *p.rows)
            dst.copy_(p.source(weights[p.name]).reshape(dst.shape))
        if self.cuda:
            with torch.cuda.stream(self.side):
                if self.applied_event is not None:
                    self.side.wait_event(self.applied_event)     # the previous swap has read the buffers
                for n, t in self.staged.items():
                    for a, b in self.ranges[n]:
                        _rows(t, a, b).copy_(_rows(self.host[n], a, b), non_blocking=True)
                self.staged_event.record(self.side)
        self.version = version

    def apply(self, forward_stream=None, then=None) -> None:
        """Staged version -> live parameters (scheduler thread, between iterations), then `then()` (the kind's
        rebuild of what SGLang derived from the weights) on the same stream. `forward_stream`: where SGLang runs
        forwards (the scheduler's forward stream under overlap scheduling); default the current stream."""
        if not self.cuda:
            self._copy_rows()
            if then is not None:
                then()
            return
        copy_stream = torch.cuda.current_stream()
        forward_stream = forward_stream or copy_stream
        copy_stream.wait_stream(forward_stream)        # a forward in flight finishes reading the old weights
        copy_stream.wait_event(self.staged_event)
        self._copy_rows()
        if then is not None:
            then()
        self.applied_event = torch.cuda.Event()
        self.applied_event.record(copy_stream)
        forward_stream.wait_event(self.applied_event)  # the next forward reads the new weights

    def copy_now(self, weights: dict[str, torch.Tensor]) -> None:
        """Full slot weights (host) -> live parameters directly, leaving the staging buffers (and what is staged
        there) alone: a rollback (sglang_ext/online/swap/rollback.py), rare, so synchronous. The caller synchronises
        the device around it."""
        for p in self.placements:
            dst = _rows(self.live[p.param].data, *p.rows)
            dst.copy_(p.source(weights[p.name]).reshape(dst.shape))

    def _copy_rows(self) -> None:
        for n, p in self.live.items():
            for a, b in self.ranges[n]:
                _rows(p.data, a, b).copy_(_rows(self.staged[n], a, b), non_blocking=self.cuda)


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b] if t.dim() else t
