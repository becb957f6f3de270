"""The one shared-memory slot between the scheduler and the trainer process: a small status header plus two
copies of every draft weight in the serving dtype (what the live draft holds: bf16 on a bf16 server, so a
version crosses the process boundary at half the bytes of fp32 and is rounded once, where the trainer can
score what will be served). Plain torch + the standard library: it imports without SGLang.

    header (`SlotHeader`, 256 bytes reserved)   trainer -> scheduler: published version, steps, loss, ...;
                                                scheduler -> trainer: applied version
    weights, buffer 0 and buffer 1 (dtype)      version v lives in buffer v % 2, laid out by `layout`
                                                (name, shape) in name order
    keep buffer (dtype; only with rollback on)  the weights a rollback restores: those of the version before the
                                                live one (header.keep_version), written by the scheduler only

Publication is a two-counter handshake, no lock (a killed trainer can never leave one held):
  trainer:   writes weights only while applied == published (the scheduler has finished reading the last
             version), then sets published += 1;
  scheduler: when published > applied, copies the weights into the live draft, then sets applied = published.
So the slot is never written while it is read, and a trainer killed mid-write leaves PUBLISHED unchanged: the
half-written weights are never applied. Version v + 1 is written into the other buffer than version v, so a
write cut short leaves the newest published version intact: that is what a restarted trainer resumes from.

The slot is anonymous shared memory (`memfd_create`; an unlinked temp file where that is missing): the
scheduler creates it and passes the descriptor to each trainer it starts (`pass_fds`), so it has no name and
nothing is left behind however the processes end.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

import torch

HEADER_BYTES = 256          # reserved for the header, so fields can be added without moving the weights
Layout = list[tuple[str, tuple[int, ...]]]


class SlotHeader(ctypes.Structure):
    """The slot's status header, read and written in place in the shared mapping (8-byte aligned fields, so
    each store is atomic for the other process)."""
    _fields_ = [
        # handshake
        ("published", ctypes.c_int64),        # trainer: versions written so far (the newest is in the slot)
        ("applied", ctypes.c_int64),          # scheduler: the version it copied into the live draft
        # trainer status, shown on /metrics
        ("steps", ctypes.c_int64),            # optimizer steps applied (kept across trainer restarts)
        ("loss", ctypes.c_double),            # loss of the latest step
        ("accuracy", ctypes.c_double),        # draft-position accuracy of the latest step
        ("tokens", ctypes.c_int64),           # tokens trained on
        ("tokens_per_s", ctypes.c_double),    # training throughput (EMA)
        ("records", ctypes.c_int64),          # records received
        ("train_records", ctypes.c_int64),    # ... in the training pool now
        ("holdout_records", ctypes.c_int64),  # ... in the guard's held-out slice now
        ("guard_evals", ctypes.c_int64),      # candidates scored by the guard
        ("candidate_tau", ctypes.c_double),   # held-out tau of the latest candidate
        ("live_tau", ctypes.c_double),        # held-out tau of the live draft
        ("rejected_worse", ctypes.c_int64),   # candidates refused by the guard
        ("rejected_nan", ctypes.c_int64),     # non-finite steps skipped + non-finite candidates refused
        ("heartbeat", ctypes.c_double),       # time.time() of the trainer's latest loop iteration
        ("pid", ctypes.c_int64),              # the trainer process
        ("inbox_bytes", ctypes.c_int64),      # records received but not yet in the pool (bytes)
        ("inbox_dropped", ctypes.c_int64),    # ... dropped past the inbox's byte bound (across restarts)
        # rollback on served acceptance (rollback.RollbackWatch; a slot created with keep=True)
        ("keep_version", ctypes.c_int64),     # scheduler: the version whose weights the keep buffer holds
        ("live_in_keep", ctypes.c_int64),     # scheduler: 1 while the live draft is the keep buffer's (rolled back)
        ("rollbacks", ctypes.c_int64),        # scheduler: rollbacks so far
        ("rolled_back_version", ctypes.c_int64),   # scheduler: the version swapped out by the latest rollback
        ("rollback_seen", ctypes.c_int64),    # trainer: rollbacks it has reset to the keep buffer's weights for
        ("reset_published", ctypes.c_int64),  # trainer: PUBLISHED when it reset: versions up to it descend from a
                                              # rolled-back version and are never applied
    ]


assert ctypes.sizeof(SlotHeader) <= HEADER_BYTES


def draft_layout(draft_dir: str | os.PathLike, exclude: tuple[str, ...] = ()) -> Layout:
    """(name, shape) of every weight in a draft checkpoint, `model.` prefix stripped, sorted; `exclude`: names
    the online path never swaps (the kind's `serving.fixed_weights`)."""
    layout = {}
    files = sorted(Path(draft_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in draft directory {draft_dir}")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__" and name.removeprefix("model.") not in exclude:
                layout[name.removeprefix("model.")] = tuple(int(d) for d in info["shape"])
    return sorted(layout.items())


def slot_bytes(layout: Layout, dtype: torch.dtype = torch.float32, keep: bool = False) -> int:
    """Header + two buffers of `dtype` (+ the keep buffer)."""
    return HEADER_BYTES + (3 if keep else 2) * _itemsize(dtype) * layout_numel(layout)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (how the dtype crosses the process boundary)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"weight slot: {name!r} is not a floating-point torch dtype")
    return dtype


def layout_numel(layout: Layout) -> int:
    return sum(_numel(shape) for _, shape in layout)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightSlot:
    def __init__(self, fd: int, layout: Layout, *, owner: bool, dtype: torch.dtype = torch.float32,
                 keep: bool | None = None):
        """Map the slot behind descriptor `fd` (the owner keeps it open to hand to trainers). keep: whether it
        has the keep buffer (None: whatever its size says)."""
        self.layout = [(name, tuple(shape)) for name, shape in layout]
        self.dtype = dtype
        actual = os.fstat(fd).st_size
        if keep is None:
            keep = actual == slot_bytes(self.layout, dtype, keep=True)
        size = slot_bytes(self.layout, dtype, keep)
        if actual != size:
            raise ValueError(f"weight slot (fd {fd}): {actual} bytes, but the draft layout needs {size} "
                             f"in {dtype_name(dtype)}")
        self.fd = fd
        self.owner = owner
        self._mmap = mmap.mmap(fd, size)
        self.header = SlotHeader.from_buffer(self._mmap)
        self._buffers: list[dict[str, torch.Tensor]] = [{}, {}] + ([{}] if keep else [])
        offset = HEADER_BYTES
        for buffer in self._buffers:
            for name, shape in self.layout:
                n = _numel(shape)
                buffer[name] = torch.frombuffer(self._mmap, dtype=dtype, count=n, offset=offset).view(shape)
                offset += _itemsize(dtype) * n

    @classmethod
    def create(cls, layout: Layout, dtype: torch.dtype = torch.float32, keep: bool = False) -> "WeightSlot":
        """keep: also a third buffer, where the scheduler keeps the weights a rollback goes back to."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("sglang-ext-draft-weights")
        else:
            with tempfile.NamedTemporaryFile(prefix="sglang-ext-slot-", delete=True) as f:
                fd = os.dup(f.fileno())        # unlinked when the with-block closes it; the dup stays valid
        os.ftruncate(fd, slot_bytes(layout, dtype, keep))
        return cls(fd, layout, owner=True, dtype=dtype, keep=keep)

    @classmethod
    def attach(cls, fd: int, layout: Layout, dtype: torch.dtype = torch.float32) -> "WeightSlot":
        """Trainer side: the descriptor inherited from the scheduler."""
        return cls(fd, layout, owner=False, dtype=dtype)

    @classmethod
    def open_shared(cls, pid: int, fd: int, layout: Layout, dtype: torch.dtype = torch.float32) -> "WeightSlot":
        """Another process of the same server (a tensor-parallel rank): the slot descriptor `fd` that process
        `pid` holds, reopened through /proc (Linux; same user). The slot stays nameless."""
        path = f"/proc/{pid}/fd/{fd}"
        try:
            own = os.open(path, os.O_RDWR)
        except OSError as e:
            raise RuntimeError(f"weight slot: cannot open {path} (the slot of the tensor-parallel rank 0 "
                               f"scheduler): {e}") from None
        return cls(own, layout, owner=False, dtype=dtype)

    # -- header ----------------------------------------------------------------------------------------
    @property
    def published(self) -> int:
        return self.header.published

    @property
    def applied(self) -> int:
        return self.header.applied

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The newest published version's weights (views into the slot)."""
        return self._buffers[self.published % 2]

    def weights_of(self, version: int) -> dict[str, torch.Tensor]:
        """The weights of `version` (views; valid while it is the newest or the one before it)."""
        return self._buffers[version % 2]

    @property
    def has_keep(self) -> bool:
        return len(self._buffers) == 3

    @property
    def keep(self) -> dict[str, torch.Tensor]:
        """The keep buffer (views): the weights of version `header.keep_version`, which a rollback restores.
        Written by the scheduler only (swap_applier.SwapApplier), read by the trainer when it resets."""
        if not self.has_keep:
            raise RuntimeError("weight slot: created without a keep buffer (rollback off)")
        return self._buffers[2]

    def acknowledge(self, version: int) -> None:
        """Scheduler side: `version` is now live; the trainer may write the slot again."""
        self.header.applied = version

    # -- trainer side ----------------------------------------------------------------------------------
    def can_publish(self) -> bool:
        return self.applied >= self.published

    def publish(self, state: dict[str, torch.Tensor]) -> int:
        """Write a full state dict (names as in `layout`, cast to the slot's dtype) and bump PUBLISHED; returns
        the new version."""
        if not self.can_publish():
            raise RuntimeError("weight slot: the scheduler has not applied the previous version yet")
        missing = [n for n, _ in self.layout if n not in state]
        if missing:
            raise KeyError(f"weight slot: state dict lacks {missing[:4]}")
        version = self.published + 1
        for name, dst in self._buffers[version % 2].items():
            dst.copy_(state[name].detach().to("cpu").view(dst.shape))
        self.header.published = version
        return version

    def read_state(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.weights.items()}

    # -- lifetime ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.header = None
        self._buffers = [{}, {}] + ([{}] if self.has_keep else [])
        try:
            self._mmap.close()
        except BufferError:        # a tensor view still alive somewhere; the mapping goes with the process
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
