"""The trainer's supervisor, in the recorder process (sglang_ext/online/recorder/process.py): start, feed, watch and
restart the trainer process, or the trainer group of a device list. No SGLang here.

`TrainerGroupSupervisor` (its own thread) (re)starts `python -m sglang_ext.online.trainer.worker` with a fresh
socket, sends it the records the replay buffer finished (on a restart, first what the buffer still holds), and
notices when the process dies or hangs (trainer down, restart after a backoff). A trainer whose heartbeat is
older than `heartbeat_timeout_s`, or that stops reading (a send times out), is killed and replaced. Records wait
in a queue bounded in bytes (`queue_bytes`; the oldest are dropped, counted), so a slow or stuck trainer never
grows the recorder's memory. With a device list (--online-train-device cuda:1,cuda:2) the trainer is one process
per device started as a group (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, a fresh port per start): rank 0
gets the socket and the weight slot and beats; if any rank exits, or rank 0's heartbeat goes stale (a hung rank
stalls it in the next collective), every rank is killed and the group restarted as one (one restart, or one hang,
counted). Once a second it puts the trainer's status (the weight slot's header) on /metrics.

What the trainer publishes is swapped into the live draft by the scheduler process
(sglang_ext/online/scheduler/swap_applier.py), which owns the weight slot. The trainer's memory need is checked there at
startup (sglang_ext/online/scheduler/placement.py), so a server whose trainer cannot fit fails before it serves.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from sglang_ext.online.protocol import (
    TRAINER_MODULE,
    TrainerSpec,
    encode_record,
    new_run_id,
    parse_report,
    record_nbytes,
)
from sglang_ext.online.queues import ByteQueue
from sglang_ext.online.swap import weight_slot as ws
from trainer.replay import ReplayRecord

logger = logging.getLogger(__name__)
TRAINER_STOP_S = 5.0            # at a stop: the trainer's grace after SIGTERM (a checkpoint commit ends), then SIGKILL
POISON_MEMORY = 1 << 16         # seqs of poison records remembered (never re-sent to a restarted trainer)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the group's rendezvous; taken again by rank 0 a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainerGroupSupervisor:
    """Start, feed, watch and restart the trainer: one process, or one group of processes (a device list)."""
    RESTART_BACKOFF_S = (1.0, 30.0)

    def __init__(self, cfg, spec: TrainerSpec, slot: ws.WeightSlot, metrics, devices: list[str],
                 command: list[str] | None = None):
        """command: argv of a trainer process before its spec (default: this Python, -m the trainer module)."""
        self.cfg = cfg
        self.command = list(command or [sys.executable, "-m", TRAINER_MODULE])
        self.metrics = metrics
        self.slot = slot
        if not spec.settings.run_id:                # one run id per server start: trainer restarts keep it
            spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, run_id=new_run_id()))
        self.spec = spec                            # rank 0's spec; each rank gets its device, fds, world size
        self.poisoned: dict[int, None] = {}         # seqs of records the trainer dropped as poison (ordered set)
        self.in_step: list[int] = []                # seqs of the step the trainer is in ([]: none)
        self.crash_batch: set[int] = set()          # ... of the step in which a trainer last died outright
        self._hung_kill = False                     # the group exiting now was killed by us as hung
        self.devices = list(devices)                # one per trainer rank
        self.device = ",".join(self.devices)
        # records for the trainer, encoded one at a time as they are sent: the queue holds references to records
        # the replay buffer holds anyway, so neither an offer nor a restart's backlog copies them
        self.outbox: ByteQueue[ReplayRecord] = ByteQueue(cfg.queue_bytes, size=record_nbytes)
        self.snapshot_fn = None                     # -> records to resend after a restart
        self.procs: list[subprocess.Popen] = []     # the current trainer group, rank order; [] when none runs
        self.conn: Connection | None = None
        self.starts = 0
        self.started_wall = 0.0                     # time.time() when the current trainer group was started
        self._seen = {"rejected_worse": 0, "rejected_nan": 0}
        self._seen_inbox_dropped = 0
        self._metrics_t = 0.0
        self._stopping = False
        self.thread = threading.Thread(target=self._supervise, name="sglang-ext-trainer", daemon=True)

    @property
    def proc(self) -> subprocess.Popen | None:
        """Rank 0 of the current trainer group (the trainer process when there is one device)."""
        return self.procs[0] if self.procs else None

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def start(self, snapshot_fn) -> None:
        self.snapshot_fn = snapshot_fn
        self.thread.start()

    # -- supervisor thread ---------------------------------------------------------------------------------
    def offer(self, record) -> None:
        """A finished replay record (called by the replay buffer's thread)."""
        self.outbox.put(record)

    def heartbeat_age(self, now: float | None = None) -> float:
        """Seconds since the current trainer process last showed life (its start counts as the first beat)."""
        now = time.time() if now is None else now
        return now - max(self.slot.header.heartbeat, self.started_wall)

    def trainer_alive(self) -> bool:
        """Every process of the group runs, and rank 0 beats."""
        return (bool(self.procs) and all(p.poll() is None for p in self.procs)
                and self.heartbeat_age() <= self.cfg.heartbeat_timeout_s)

    @property
    def version(self) -> int:
        """The draft version serving uses (the last one the scheduler applied)."""
        return self.slot.applied

    def trainer_command(self, spec: TrainerSpec) -> list[str]:
        """argv of a trainer process (of each rank)."""
        return [*self.command, spec.to_json()]

    def rank_spec(self, rank: int, records_fd: int) -> TrainerSpec:
        """Rank 0 gets the records socket and the slot; the others train only."""
        return dataclasses.replace(self.spec, device=self.devices[rank], world_size=self.world_size,
                                   records_fd=records_fd if rank == 0 else -1,
                                   slot_fd=self.slot.fd if rank == 0 else -1)

    def rank_env(self, rank: int, port: int | None) -> dict[str, str]:
        env = dict(os.environ)
        if self.devices[rank] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        if self.world_size > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(self.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return env

    def _launch(self) -> None:
        parent, child = socket.socketpair()
        # A trainer that stops reading must not block this thread: a send that cannot progress for this long
        # fails (and the trainer is replaced).
        timeout = min(10.0, self.cfg.heartbeat_timeout_s)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                          struct.pack("ll", int(timeout), int((timeout % 1) * 1e6)))
        port = free_port() if self.world_size > 1 else None
        try:
            for rank in range(self.world_size):
                fds = [child.fileno(), self.slot.fd] if rank == 0 else []
                self.procs.append(subprocess.Popen(self.trainer_command(self.rank_spec(rank, child.fileno())),
                                                   pass_fds=fds, env=self.rank_env(rank, port), close_fds=True))
        except BaseException:
            self._kill_group()
            self.procs = []
            parent.close()
            raise
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.started_wall = time.time()
        self.starts += 1
        if self.world_size == 1:
            logger.info("sglang_ext: trainer process started (pid %d, device %s, start #%d)", self.proc.pid,
                        self.device, self.starts)
        else:
            logger.info("sglang_ext: trainer group started (%d ranks, pids %s, devices %s, port %d, start #%d)",
                        self.world_size, [p.pid for p in self.procs], self.device, port, self.starts)
        if self.starts > 1:
            self.metrics.trainer_restarted()
            # A fresh trainer has no records: give it what the replay buffer still holds (newest first kept),
            # except the records a trainer reported as poison.
            backlog = [r for r in (self.snapshot_fn() if self.snapshot_fn is not None else [])
                       if r.meta.get("seq") not in self.poisoned]
            self.outbox.clear()
            for record in backlog:                  # bounded too: past the bound the oldest are dropped
                self.outbox.put(record)

    def _supervise(self) -> None:
        backoff = self.RESTART_BACKOFF_S[0]
        while not self._stopping:
            self._update_metrics()
            self._collect_reports()
            if not self.procs:
                try:
                    self._launch()
                    started = time.monotonic()
                except Exception:
                    logger.exception("sglang_ext: could not start the trainer process")
                    time.sleep(backoff)
                    backoff = min(backoff * 2, self.RESTART_BACKOFF_S[1])
                    continue
            if self.proc.poll() is None and self.heartbeat_age() > self.cfg.heartbeat_timeout_s:
                self._kill_hung(f"no heartbeat for {self.heartbeat_age():.0f}s")
            if any(p.poll() is not None for p in self.procs):
                self._on_exit()
                if time.monotonic() - started > 60:
                    backoff = self.RESTART_BACKOFF_S[0]
                time.sleep(backoff)
                backoff = min(backoff * 2, self.RESTART_BACKOFF_S[1])
                continue
            if self.slot.header.heartbeat < self.started_wall:
                # Not up yet (imports, loading, the ranks meeting): records wait here, bounded, not in the
                # socket, where a burst (the backlog after a restart) would time a send out as "stopped reading"
                time.sleep(0.1)
                continue
            record = self.outbox.get(timeout=0.5)
            if record is not None:
                try:
                    self.conn.send_bytes(encode_record(record))
                except OSError as e:           # the trainer is gone, its socket is, or it stopped reading
                    self.outbox.put(record, front=True)
                    if self.proc.poll() is None:
                        self._kill_hung(f"sending it a record failed ({type(e).__name__}: it stopped reading)")

    def _collect_reports(self) -> None:
        """Reports the trainer sent back on the records socket: poison records (counted, their seqs never sent
        again) and the seqs of the step it is in."""
        conn = self.conn
        try:
            while conn is not None and conn.poll(0):
                kind, value = parse_report(conn.recv_bytes())
                if kind == "step":
                    self.in_step = value
                    continue
                seq, reason = value
                self._poison(seq, reason)
                logger.warning("sglang_ext: the trainer dropped record seq %s as poison (%s); it is not sent again",
                               seq, reason)
        except (EOFError, OSError, ValueError) as e:      # a trainer gone mid-message: the exit path handles it
            logger.debug("sglang_ext: reading trainer reports: %s", e)

    def _poison(self, seq: int | None, reason: str) -> None:
        if seq is not None:
            self.poisoned[seq] = None
            while len(self.poisoned) > POISON_MEMORY:
                del self.poisoned[next(iter(self.poisoned))]
        self.metrics.poison_records(reason)

    def _suspect_crash(self) -> None:
        """A trainer that died outright inside a step (a signal: nothing to catch; not killed by us as hung):
        the records of that step are suspects, and those also in the step of the previous such death are
        dropped as "crashed" (with any innocent record that was in both steps), so a record that kills
        every trainer does not make a restart loop."""
        batch, self.in_step = set(self.in_step), []
        hung, self._hung_kill = self._hung_kill, False
        if not batch or hung:
            return
        crashed = batch & self.crash_batch
        self.crash_batch = batch - crashed
        for seq in sorted(crashed):
            self._poison(seq, "crashed")
        logger.error("sglang_ext: the trainer died inside a step holding records %s%s", sorted(batch)[:16],
                     f"; dropped as poison (also in the step of the previous death): {sorted(crashed)}"
                     if crashed else "")

    def _kill_group(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def _kill_hung(self, why: str) -> None:
        what = "process" if self.world_size == 1 else "group (rank 0)"
        logger.error("sglang_ext: trainer %s %d is hung (%s): killing %s; serving goes on with draft "
                     "version %d", what, self.proc.pid, why, "it" if self.world_size == 1 else "every rank",
                     self.version)
        self.metrics.trainer_hung()
        self._hung_kill = True
        self._kill_group()

    def _on_exit(self) -> None:
        exited = [(rank, p.pid, p.returncode) for rank, p in enumerate(self.procs) if p.poll() is not None]
        if self.world_size == 1:
            logger.error("sglang_ext: trainer process %d exited with code %s; serving goes on with draft version "
                         "%d; restarting it", self.proc.pid, self.proc.returncode, self.version)
        else:
            logger.error("sglang_ext: trainer rank(s) %s exited (rank, pid, code); serving goes on with draft "
                         "version %d; killing the group's other ranks and restarting it", exited, self.version)
        self._kill_group()
        self._collect_reports()                 # what it reported before it went
        self._suspect_crash()
        try:
            self.conn.close()
        except OSError:
            pass
        self.procs, self.conn = [], None

    def stop(self) -> None:
        self._stopping = True
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5.0)
        for p in self.procs:            # SIGTERM first: a checkpoint being committed finishes (a few renames)
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + TRAINER_STOP_S
        for p in list(self.procs):
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        self.slot.close()

    def _update_metrics(self) -> None:
        """Once a second: the queues toward the trainer, the guard's refusals and the trainer's status (from the
        weight slot's header) on /metrics."""
        now = time.monotonic()
        if now - self._metrics_t < 1.0 or self.slot.header is None:
            return
        self._metrics_t = now
        h = self.slot.header
        self.metrics.queue("supervisor", self.outbox.nbytes, self.outbox.take_dropped())
        self.metrics.queue("trainer_inbox", h.inbox_bytes, max(0, h.inbox_dropped - self._seen_inbox_dropped))
        self._seen_inbox_dropped = max(self._seen_inbox_dropped, h.inbox_dropped)
        for field, reason in (("rejected_worse", "worse"), ("rejected_nan", "nan")):
            value = getattr(h, field)
            if value > self._seen[field]:
                self.metrics.rejected(reason, value - self._seen[field])
            self._seen[field] = max(value, self._seen[field])
        self.metrics.trainer_status(up=self.trainer_alive(), steps=h.steps, loss=h.loss, tokens_per_s=h.tokens_per_s,
                                    tokens=h.tokens, records=h.records, heldout_tau=h.live_tau)
