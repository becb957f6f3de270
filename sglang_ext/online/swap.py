"""Hot swap of a published draft version into SGLang's live draft, staged so that the swap point (between two
scheduler iterations) only copies device memory into device memory.

    plan_placements   once, at startup (no forward runs yet): where SGLang's own `load_weights` puts each weight
                      of the slot: one SGLang parameter and a block of its rows (q/k/v and gate/up are stacked).
                      Found by loading probe tensors into scratch copies of the parameters, so no SGLang naming
                      rule is restated here.
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


@torch.no_grad()
def plan_placements(kind, draft_module: torch.nn.Module, layout) -> list[Placement] | None:
    """Where each slot weight lands in SGLang's draft, or None (with a warning) when some weight does not land
    as one block of rows of the parameter the kind names (the swap then goes through load_weights)."""
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
    scratch = {n: torch.zeros_like(t) for n, t in live.items()}
    placements = []
    try:
        for n in live:
            params[n].data = scratch[n]
        for name, shape in layout:
            full = targets[name]
            draft_module.load_weights([(name, torch.ones(shape, dtype=torch.float32))])
            touched = [n for n, t in scratch.items() if t.any()]
            block = scratch[full].reshape(scratch[full].shape[0], -1) if scratch[full].dim() else scratch[full]
            rows = torch.nonzero(block.ne(0).any(-1) if block.dim() > 1 else block.ne(0)).flatten()
            a, b = (int(rows[0]), int(rows[-1]) + 1) if rows.numel() else (0, 0)
            numel = 1
            for d in shape:
                numel *= int(d)
            region = block[a:b]
            if touched != [full] or region.numel() != numel or not bool((region == 1).all()):
                logger.warning("sglang_ext: staged swap off: %s does not land as one block of rows of %s", name,
                               full)
                return None
            placements.append(Placement(name, full, (a, b)))
            scratch[full].zero_()
    finally:
        for n, t in live.items():
            params[n].data = t
    return placements


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
            dst.copy_(weights[p.name].reshape(dst.shape))
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

    def _copy_rows(self) -> None:
        for n, p in self.live.items():
            for a, b in self.ranges[n]:
                _rows(p.data, a, b).copy_(_rows(self.staged[n], a, b), non_blocking=self.cuda)


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b] if t.dim() else t
