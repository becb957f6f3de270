"""The scheduler's side of the recorder process: finished requests leave the scheduler process here.

    handoff = Handoff(cfg, recorder_spec, metrics)   # a shared-memory ring, a wake pipe, the recorder process
    handoff.submit(captured)                         # scheduler thread, at request release (capture.Capture)
    handoff.tick()                                   # scheduler thread, top of every iteration: finished
                                                     # requests whose device copies landed; once a second the
                                                     # recorder's health (restarted if it died, counted)

A finished request (`finished.CapturedRequest`: its feature rows by start position, token ids, mRoPE positions,
what it finished with) is written into the ring (`ring.Ring`, anonymous shared memory bounded by
--online-train-queue-bytes; the oldest entries are dropped past it, counted) with one copy of its rows, and a byte
on the wake pipe tells the recorder (`python -m sglang_ext.online.recorder.process`, started from here) to read it.
Everything after that (record assembly, the replay buffer, shards, retention, the trainer) runs in the recorder.
On CUDA the rows may still be on their way to the host (the copy of the release gather): such a request waits
here until its copies have landed (checked without waiting, each tick), so the scheduler thread never syncs.

The recorder is started detached (`Handoff.start`: not a descendant of SGLang's launcher, which SIGKILLs every
descendant when it shuts down), so it is not killed with this process: it notices the wake pipe close (this
process exited, however it exited) or gets the signal itself (SIGTERM / SIGINT to the process group), writes every
record it holds and exits (sglang_ext/online/recorder/process.py). The ring outlives a recorder that dies: a restarted
one goes on from it. The recorder's life pipe tells this process, without waiting, that it is gone.

The entry format (`finished.encode_finished` / `decode_finished`) is this module's only contract with the
recorder; `protocol.RecorderSpec` is how the recorder is started.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections import deque

from sglang_ext.online.finished import CapturedRequest, encode_finished, resolvable
from sglang_ext.online.protocol import TRAINER_MODULE
from sglang_ext.online.ring import Ring

logger = logging.getLogger(__name__)
RECORDER_MODULE = "sglang_ext.online.recorder.process"
HEALTH_EVERY_S = 1.0
RESTART_BACKOFF_S = (1.0, 30.0)


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
        """A finished request (capture.Capture's sink). Never waits, never blocks."""
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
