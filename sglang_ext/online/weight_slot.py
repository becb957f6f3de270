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

The slot is a file under /dev/shm (a temp dir elsewhere) mapped by both processes; the scheduler owns and
removes it.
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
    CANDIDATE_TAU, LIVE_TAU, PID, GUARD_EVALS, TRAIN_RECORDS, HOLDOUT_RECORDS, ACCURACY, OWNER_PID = range(18)

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def layout_numel(layout: Layout) -> int:
    return sum(_numel(shape) for _, shape in layout)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightSlot:
    def __init__(self, path: str | os.PathLike, layout: Layout, *, create: bool):
        self.path = Path(path)
        self.layout = [(name, tuple(shape)) for name, shape in layout]
        size = HEADER_BYTES + 4 * layout_numel(self.layout)
        if create:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
        else:
            fd = os.open(self.path, os.O_RDWR)
            actual = os.fstat(fd).st_size
            if actual != size:
                os.close(fd)
                raise ValueError(f"weight slot {self.path}: {actual} bytes, but the draft layout needs {size}")
        self._mmap = mmap.mmap(fd, size)
        os.close(fd)
        self.owner = create
        self.header = torch.frombuffer(self._mmap, dtype=torch.float64, count=HEADER_SLOTS)
        if create:
            self.header[OWNER_PID] = os.getpid()
        self.owner_pid = int(self.header[OWNER_PID])
        self.weights: dict[str, torch.Tensor] = {}
        offset = HEADER_BYTES
        for name, shape in self.layout:
            n = _numel(shape)
            self.weights[name] = torch.frombuffer(self._mmap, dtype=torch.float32, count=n,
                                                  offset=offset).view(shape)
            offset += 4 * n

    @classmethod
    def create(cls, layout: Layout, directory: str | None = None) -> "WeightSlot":
        directory = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        path = Path(tempfile.mkdtemp(prefix="sglang-ext-slot-", dir=directory)) / "weights"
        return cls(path, layout, create=True)

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

    def remove_if_orphaned(self) -> None:
        """Trainer side, when the scheduler is gone: remove the slot file it can no longer remove itself."""
        if os.getppid() == 1 or not _alive(self.owner_pid):
            try:
                self.path.unlink()
                self.path.parent.rmdir()
            except OSError:
                pass

    # -- lifetime ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.header = None
        self.weights = {}
        try:
            self._mmap.close()
        except BufferError:        # a tensor view still alive somewhere; the mapping goes with the process
            pass
        if self.owner:
            try:
                self.path.unlink()
                self.path.parent.rmdir()
            except OSError:
                pass
