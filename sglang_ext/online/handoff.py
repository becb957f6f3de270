"""The scheduler's side of the recorder process: finished requests leave the scheduler process here.

    handoff = Handoff(cfg, recorder_spec, metrics)   # a shared-memory ring, a wake pipe, the recorder process
    handoff.submit(captured)                         # scheduler thread, at request release (capture.Recorder)
    handoff.tick()                                   # scheduler thread, top of every iteration: finished
                                                     # requests whose device copies landed; once a second the
                                                     # recorder's health (restarted if it died, counted)

A finished request (`capture.CapturedRequest`: its feature rows by start position, token ids, mRoPE positions,
what it finished with) is written into the ring (`ring.Ring`, anonymous shared memory bounded by
--online-train-queue-bytes; the oldest entries are dropped past it, counted) with one copy of its rows, and a byte
on the wake pipe tells the recorder (`python -m sglang_ext.online.recorder`, started from here) to read it.
Everything after that (record assembly, the replay buffer, shards, retention, the trainer) runs in the recorder.
On CUDA the rows may still be on their way to the host (capture.Feed): such a request waits here until its copies
have landed (checked without waiting, each tick), so the scheduler thread never syncs.

The recorder is started detached (`Handoff.start`: not a descendant of SGLang's launcher, which SIGKILLs every
descendant when it shuts down), so it is not killed with this process: it notices the wake pipe close (this
process exited, however it exited) or gets the signal itself (SIGTERM / SIGINT to the process group), writes every
record it holds and exits (sglang_ext/online/recorder.py). The ring outlives a recorder that dies: a restarted
one goes on from it. The recorder's life pipe tells this process, without waiting, that it is gone.

`encode_finished` / `decode_finished` are the entry format (this module's only contract with the recorder).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch

from sglang_ext.online.capture import CapturedRequest
from sglang_ext.online.ring import Ring

logger = logging.getLogger(__name__)
RECORDER_MODULE = "sglang_ext.online.recorder"
TRAINER_MODULE = "sglang_ext.online.trainer_worker"
HEALTH_EVERY_S = 1.0
RESTART_BACKOFF_S = (1.0, 30.0)
_LEN = struct.Struct("<I")


# ---- the entry format ----------------------------------------------------------------------------------------

def _ids(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).reshape(-1)


def _align(n: int) -> int:
    return (n + 7) & ~7


def encode_finished(p: CapturedRequest, reserve) -> bool:
    """Write the resolved request `p` as one entry: `reserve(n)` returns a writable view of n bytes (or None: it
    cannot fit), filled here and committed by the caller. Layout: u32 header length, JSON header, then 8-byte
    aligned arrays: token ids, radix keys (when they differ), mRoPE prompt positions, feature rows by chunk."""
    chunks = sorted(p.chunks.items())
    token_ids = _ids(p.token_ids)
    keys = None if p.key_ids == p.token_ids else _ids(p.key_ids)
    mrope = None if p.mrope_prompt is None else p.mrope_prompt.to(torch.int64)
    rows = [t for _, t in chunks]
    head = {"rid": p.rid, "prompt_len": p.prompt_len, "finish_reason": p.finish_reason,
            "modalities": list(p.modalities), "mrope_delta": int(p.mrope_delta),
            "tokens": int(token_ids.numel()), "keys": None if keys is None else int(keys.numel()),
            "mrope": None if mrope is None else list(mrope.shape),
            "chunks": [[int(start), int(t.shape[0])] for start, t in chunks],
            "width": int(rows[0].shape[1]) if rows else 0,
            "dtype": str(rows[0].dtype).removeprefix("torch.") if rows else "float32"}
    header = json.dumps(head, separators=(",", ":")).encode()
    arrays = [token_ids] + ([keys] if keys is not None else []) + ([mrope] if mrope is not None else []) + rows
    offset = _align(_LEN.size + len(header))
    total = offset + sum(_align(a.numel() * a.element_size()) for a in arrays)
    view = reserve(total)
    if view is None:
        return False
    _LEN.pack_into(view, 0, len(header))
    view[_LEN.size:_LEN.size + len(header)] = header
    for a in arrays:
        n = a.numel() * a.element_size()
        if n:
            out = torch.frombuffer(view, dtype=torch.uint8, count=n, offset=offset)
            out.copy_(a.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += _align(n)
    return True


def decode_finished(payload: bytes | bytearray) -> CapturedRequest:
    """An entry written by `encode_finished` -> a CapturedRequest (its rows are views of `payload`)."""
    buf = payload if isinstance(payload, bytearray) else bytearray(payload)
    (n,) = _LEN.unpack_from(buf, 0)
    head = json.loads(bytes(buf[_LEN.size:_LEN.size + n]))
    offset = _align(_LEN.size + n)

    def take(count: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal offset
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
        offset += _align(count * torch.empty((), dtype=dtype).element_size())
        return t

    token_ids = take(head["tokens"], torch.int64).tolist()
    key_ids = take(head["keys"], torch.int64).tolist() if head["keys"] is not None else list(token_ids)
    mrope = None
    if head["mrope"] is not None:
        shape = head["mrope"]
        mrope = take(shape[0] * shape[1], torch.int64).view(*shape)
    dtype = getattr(torch, head["dtype"])
    chunks = {start: take(rows * head["width"], dtype).view(rows, head["width"]) for start, rows in head["chunks"]}
    return CapturedRequest(rid=head["rid"], chunks=chunks, token_ids=token_ids, key_ids=key_ids,
                           prompt_len=head["prompt_len"], mrope_prompt=mrope, mrope_delta=head["mrope_delta"],
                           modalities=tuple(head["modalities"]), finish_reason=head["finish_reason"])


def resolvable(p: CapturedRequest) -> bool:
    """Its device copies (feature rows, mRoPE positions) have landed: `resolve()` will not wait."""
    return (p.copied is None or p.copied.query()) and all(feed.ready() for feed, _ in p.parts)


# ---- the recorder process ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecorderSpec:
    """argv[1] of `python -m sglang_ext.online.recorder` (JSON). The online-train settings come in the
    environment ($SGLANG_EXT_ONLINE_TRAIN), as in every process of the server."""
    ring_fd: int                    # the ring (ring.Ring), inherited
    wake_fd: int                    # read end of the wake pipe: a byte per entry; EOF when the scheduler is gone
    target: dict                    # the replay's target identity (trainer.target.TargetIdentity as a dict) ...
    layer_ids: list                 # ... its feature layers, in column order
    hidden_size: int
    storage_dtype: str
    vocab_size: int                 # token ids of records must index the target's embedding
    labels: dict                    # the metrics' labels (model_name)
    trainer_spec: str = ""          # TrainerSpec JSON of rank 0 ("": capture only)
    trainer_devices: list | None = None
    trainer_command: list | None = None   # argv before the spec: [python, -m, <trainer module>]
    slot_layout: list | None = None       # the weight slot (its descriptor is the trainer spec's slot_fd)
    slot_dtype: str = "float32"
    ready_fd: int = -1                    # write end of a pipe: "ok <pid>" once up, or why it could not start
    alive_fd: int = -1                    # write end of its life pipe, held open until it exits (never written)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RecorderSpec":
        return cls(**json.loads(text))


class Handoff:
    def __init__(self, capacity: int, spec_fn, metrics):
        """capacity: the ring's bytes; spec_fn(ring_fd, wake_fd) -> RecorderSpec of the recorder to start."""
        self.ring = Ring.create(capacity)
        self.wake_r, self.wake_w = os.pipe()
        fcntl.fcntl(self.wake_w, fcntl.F_SETFL, os.O_NONBLOCK)    # a full pipe is a recorder behind: no matter
        self.spec_fn = spec_fn
        self.metrics = metrics
        self.pending: deque[CapturedRequest] = deque()   # finished, device copies still running (CUDA)
        self.pid: int | None = None                       # the recorder (not our child: see `start`)
        self.launcher: subprocess.Popen | None = None     # the process that forked it (exits at once)
        self.alive_fd: int | None = None                  # read end of its life pipe: EOF once it is gone
        self.starts = 0
        self.started_at = 0.0
        self.restart_at: float | None = None             # the recorder died: when to start the next one
        self.backoff = RESTART_BACKOFF_S[0]
        self.checked = 0.0
        self.dropped_seen = 0
        self.unfit = 0                                    # requests too large for the ring (counted dropped)

    def trainer_command(self) -> list[str]:
        """argv of a trainer process before its spec (the recorder starts it)."""
        return [sys.executable, "-m", TRAINER_MODULE]

    # -- scheduler thread ----------------------------------------------------------------------------------------
    def submit(self, p: CapturedRequest) -> None:
        """A finished request (capture.Recorder's sink). Never waits, never blocks."""
        if self.pending or not resolvable(p):
            self.pending.append(p)
            return
        self._write(p)

    def tick(self) -> None:
        while self.pending and resolvable(self.pending[0]):
            self._write(self.pending.popleft())
        now = time.monotonic()
        if now - self.checked >= HEALTH_EVERY_S:
            self.checked = now
            self._health(now)

    def _write(self, p: CapturedRequest) -> None:
        p.resolve()
        ring = self.ring
        if not encode_finished(p, ring.reserve):
            self.unfit += 1
            logger.warning("sglang_ext: request %s is too large for the ring (--online-train-queue-bytes %d): "
                           "not recorded", p.rid, ring.capacity)
            return
        ring.commit()
        try:
            os.write(self.wake_w, b"\x01")
        except BlockingIOError:                           # the recorder has plenty to wake up for already
            pass

    # -- the recorder process (scheduler thread) ---------------------------------------------------------------
    def start(self, wait_s: float | None = None) -> None:
        """Start the recorder process. It is started detached (an intermediate process forks it and exits), so
        it is not a descendant of SGLang's launcher: the launcher's shutdown SIGKILLs every descendant
        (`kill_process_tree`), and the recorder must outlive this process long enough to write what it holds.
        It stays in the process group (a signal to the group reaches it) and holds the write end of a life pipe
        (EOF here once it is gone). wait_s: wait that long for it to be up (replay buffer and persist directory
        ready, the trainer supervisor started) and raise RuntimeError with its reason if it is not (server
        startup: fail fast). A restart does not wait."""
        ready_r, ready_w = os.pipe()
        alive_r, alive_w = os.pipe()
        spec = dataclasses.replace(self.spec_fn(self.ring.fd, self.wake_r), ready_fd=ready_w, alive_fd=alive_w)
        fds = [self.ring.fd, self.wake_r, ready_w, alive_w]
        if spec.trainer_spec:
            fds.append(json.loads(spec.trainer_spec)["slot_fd"])
        try:
            launcher = subprocess.Popen([sys.executable, "-m", RECORDER_MODULE, "--detach", spec.to_json()],
                                        pass_fds=fds, close_fds=True)
        finally:
            os.close(ready_w)
            os.close(alive_w)
        self.launcher = launcher                          # it forks the recorder and exits at once: reaped later
        if self.alive_fd is not None:
            os.close(self.alive_fd)
        self.alive_fd, self.pid = alive_r, None
        self.started_at = time.monotonic()
        self.starts += 1
        if self.starts > 1:
            self.metrics.recorder_restarted()
        if wait_s:
            self._wait_ready(ready_r, wait_s)
        else:
            os.close(ready_r)
        logger.info("sglang_ext: recorder process started (%sstart #%d)",
                    f"pid {self.pid}, " if self.pid else "", self.starts)

    def _wait_ready(self, fd: int, timeout: float) -> None:
        reply, deadline = b"", time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                reply += chunk
        finally:
            os.close(fd)
        message = reply.decode(errors="replace").strip()
        if message.startswith("ok "):
            self.pid = int(message.split()[1])
            return
        raise RuntimeError("--online-train: the recorder process did not start: " + (
            message or f"no answer in {timeout:.0f} s"))

    def alive(self) -> bool:
        """The recorder runs (its life pipe is open; never waits)."""
        if self.alive_fd is None:
            return False
        ready, _, _ = select.select([self.alive_fd], [], [], 0)
        return not ready or bool(os.read(self.alive_fd, 1))

    # -- the recorder's health (scheduler thread, once a second) --------------------------------------------------
    def _health(self, now: float) -> None:
        dropped = self.ring.dropped + self.unfit
        self.metrics.queue("ring", self.ring.nbytes(), dropped - self.dropped_seen)
        self.dropped_seen = dropped
        if self.launcher is not None and self.launcher.poll() is not None:
            self.launcher = None
        if self.alive_fd is None:
            return
        if self.alive():
            if now - self.started_at >= 60:
                self.backoff = RESTART_BACKOFF_S[0]       # it stayed up: the next restart is quick again
            return
        if self.restart_at is None:                       # it just went
            logger.error("sglang_ext: recorder process %s exited; serving goes on and finished requests wait in "
                         "the ring; restarting it in %.0f s", self.pid or "", self.backoff)
            self.restart_at = now + self.backoff
            self.backoff = min(2 * self.backoff, RESTART_BACKOFF_S[1])
            return
        if now < self.restart_at:
            return
        self.restart_at = None
        try:
            self.start()
        except Exception:
            logger.exception("sglang_ext: could not restart the recorder process")
            self.restart_at = now + self.backoff
