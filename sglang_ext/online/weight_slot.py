"""The one shared-memory slot between the scheduler and the trainer process: a small status header plus one
float32 copy of every draft weight.

    header (float64 x 32)   trainer -> scheduler: published version, steps, loss, ...; scheduler -> trainer:
                            applied version
    weights (float32)       the newest accepted candidate, laid out by `layout` (name, shape) in name order

Publication is a two-counter handshake, no lock (a killed trainer can never leave one held):
  trainer:   writes weights only while APPLIED == PUBLISHED (the scheduler has finished reading the last
             version), then sets PUBLISHED += 1;
  scheduler: when PUBLISHED > APPLIED, copies the weights into the live draft, then sets APPLIED = PUBLISHED.
So the slot is never written while it is read, and a trainer killed mid-write leaves PUBLISHED unchanged: the
half-written weights are never applied. The slot always ends up holding the newest accepted version, which
is what a restarted trainer resumes from.

The slot is anonymous shared memory (`memfd_create`; an unlinked temp file where that is missing): the
scheduler creates it and passes the descriptor to each trainer it starts (`pass_fds`), so it has no name and
nothing is left behind however the processes end.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

import torch

HEADER_SLOTS = 32
HEADER_BYTES = HEADER_SLOTS * 8
# header fields (float64 each)
PUBLISHED, APPLIED, STEPS, LOSS, TOKENS_PER_S, REJECTED_WORSE, REJECTED_NAN, HEARTBEAT, RECORDS, TOKENS, \
    CANDIDATE_TAU, LIVE_TAU, PID, GUARD_EVALS, TRAIN_RECORDS, HOLDOUT_RECORDS, ACCURACY = range(17)

Layout = list[tuple[str, tuple[int, ...]]]


def draft_layout(draft_dir: str | os.PathLike) -> Layout:
    """(name, shape) of every weight in a DFlash draft checkpoint, `model.` prefix stripped, sorted."""
    layout = {}
    files = sorted(Path(draft_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in draft directory {draft_dir}")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                layout[name.removeprefix("model.")] = tuple(int(d) for d in info["shape"])
    return sorted(layout.items())


def layout_numel(layout: Layout) -> int:
    return sum(_numel(shape) for _, shape in layout)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightSlot:
    def __init__(self, fd: int, layout: Layout, *, owner: bool):
        """Map the slot behind descriptor `fd` (the owner keeps it open to hand to trainers)."""
        self.layout = [(name, tuple(shape)) for name, shape in layout]
        size = HEADER_BYTES + 4 * layout_numel(self.layout)
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"weight slot (fd {fd}): {actual} bytes, but the draft layout needs {size}")
        self.fd = fd
        self.owner = owner
        self._mmap = mmap.mmap(fd, size)
        self.header = torch.frombuffer(self._mmap, dtype=torch.float64, count=HEADER_SLOTS)
        self.weights: dict[str, torch.Tensor] = {}
        offset = HEADER_BYTES
        for name, shape in self.layout:
            n = _numel(shape)
            self.weights[name] = torch.frombuffer(self._mmap, dtype=torch.float32, count=n,
                                                  offset=offset).view(shape)
            offset += 4 * n

    @classmethod
    def create(cls, layout: Layout) -> "WeightSlot":
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("sglang-ext-draft-weights")
        else:
            with tempfile.NamedTemporaryFile(prefix="sglang-ext-slot-", delete=True) as f:
                fd = os.dup(f.fileno())        # unlinked when the with-block closes it; the dup stays valid
        os.ftruncate(fd, HEADER_BYTES + 4 * layout_numel(layout))
        return cls(fd, layout, owner=True)

    @classmethod
    def attach(cls, fd: int, layout: Layout) -> "WeightSlot":
        """Trainer side: the descriptor inherited from the scheduler."""
        return cls(fd, layout, owner=False)

    # -- header ----------------------------------------------------------------------------------------
    def get(self, field: int) -> float:
        return float(self.header[field])

    def set(self, field: int, value: float) -> None:
        self.header[field] = float(value)

    @property
    def published(self) -> int:
        return int(self.header[PUBLISHED])

    @property
    def applied(self) -> int:
        return int(self.header[APPLIED])

    # -- trainer side ----------------------------------------------------------------------------------
    def can_publish(self) -> bool:
        return self.applied >= self.published

    def publish(self, state: dict[str, torch.Tensor]) -> int:
        """Write a full state dict (names as in `layout`) and bump PUBLISHED; returns the new version."""
        if not self.can_publish():
            raise RuntimeError("weight slot: the scheduler has not applied the previous version yet")
        missing = [n for n, _ in self.layout if n not in state]
        if missing:
            raise KeyError(f"weight slot: state dict lacks {missing[:4]}")
        for name, dst in self.weights.items():
            dst.copy_(state[name].detach().to("cpu", torch.float32).view(dst.shape))
        version = self.published + 1
        self.header[PUBLISHED] = version
        return version

    def read_state(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.weights.items()}

    # -- lifetime ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.header = None
        self.weights = {}
        try:
            self._mmap.close()
        except BufferError:        # a tensor view still alive somewhere; the mapping goes with the process
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
