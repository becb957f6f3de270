"""Scheduler side of the co-located trainer: start / watch / restart the trainer process, feed it records,
and hot-swap the weights it publishes into the live draft. What is specific to the draft's kind (SGLang's
parameter names, what to rebuild after a swap) comes from its `trainer.draft_kind.DraftKind`.

Two threads of the scheduler process touch this:
  * the supervisor thread (ours, `TrainerGroupSupervisor`, which needs no SGLang): (re)starts
    `python -m sglang_ext.online.trainer_worker` with a fresh socket, sends it the records the replay buffer
    finished (on a restart, first what the buffer still holds), and notices when the process dies or hangs
    (trainer down, restart after a backoff). A trainer whose heartbeat is older than `heartbeat_timeout_s`,
    or that stops reading (a send times out), is killed and replaced. Records wait in a queue bounded in
    bytes (`queue_bytes`; the oldest are dropped, counted), so a slow or stuck trainer never grows the
    scheduler's memory. With a device list (--online-train-device cuda:1,cuda:2) the trainer is one process
    per device started as a group (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, a fresh port per start):
    rank 0 gets the socket and the slot and beats; if any rank exits, or rank 0's heartbeat goes stale (a
    hung rank stalls it in the next collective), every rank is killed and the group restarted as one
    (one restart, or one hang, counted);
  * the scheduler thread: `tick()` runs at the top of every scheduler iteration (between forwards). When the
    trainer published a version the scheduler has not applied, it copies it into the live draft in place
    (storage addresses kept, so CUDA graphs stay valid), lets the kind rebuild what the worker derived from
    the weights (DFlash: the fused KV helper, which holds stacked copies of k/v weights), and acknowledges.
    The version was staged by the supervisor thread beforehand (sglang_ext/online/swap.py: in the serving
    dtype, on the serving device), so the swap point is device-to-device copies fenced on the device; when
    the weights cannot be placed that way, the swap goes through SGLang's load_weights with device syncs.
    No forward runs during the copy, so none sees two versions.

Rollback on served acceptance (--online-train-rollback-steps N, default 200; sglang_ext/online/rollback.py): each
swapped-in version is on probation for its first N verify steps (the capture path reports each step's accept
lengths, with the version that proposed them); if its mean accept length is lower than the previous version's
over that version's last N steps by more than --online-train-rollback-tolerance, the previous version's weights,
kept in the weight slot's keep buffer, are copied back in at the next scheduler iteration (every TP rank at the
same one), counted (sglang:online_train_rollbacks_total) and logged, and the trainer resets to them. Nothing newer
goes live while a version is on probation.
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

import torch

from sglang_ext.online import weight_slot as ws
from sglang_ext.online.protocol import TrainerSpec, encode_record, new_run_id, parse_report, record_nbytes
from sglang_ext.online.queues import ByteQueue
from sglang_ext.online.swap import StagedSwap, plan_placements
from sglang_ext.online.rollback import RollbackWatch, Verdict, load_draft_weights
from sglang_ext.online.tp import SlotHandle, TPGroup, apply_version, restore_weights, rollback_code, swap_log
from sglang_ext.online.trainer_worker import trainer_memory_need
from trainer.replay import ReplayRecord

logger = logging.getLogger(__name__)
TRAINER_MODULE = "sglang_ext.online.trainer_worker"
POISON_MEMORY = 1 << 16         # seqs of poison records remembered (never re-sent to a restarted trainer)


def check_draft_names(kind, draft_model, layout: ws.Layout) -> None:
    """Every trained weight must land on a parameter of SGLang's draft (its load_weights skips unknown names
    silently): fail at startup if one would not."""
    params = {n.removeprefix("model.") for n, _ in draft_model.named_parameters()}
    missing = [kind.sglang_param_name(name) for name, _ in layout if kind.sglang_param_name(name) not in params]
    if missing:
        raise ValueError(f"--online-train: trained draft weights {missing[:6]} have no parameter in SGLang's "
                         f"{type(draft_model).__name__}; cannot hot-swap into it")


def draft_module(kind, worker) -> torch.nn.Module:
    """SGLang's live draft module inside `worker` (the kind's `serving.draft_module` attribute path)."""
    obj = worker
    for attr in kind.serving.draft_module.split("."):
        obj = getattr(obj, attr)
    return obj


def resolve_trainer_device(cfg, serving_device) -> str:
    """The device of a one-process trainer (the first of a device list)."""
    return resolve_trainer_devices(cfg, serving_device)[0]


def resolve_trainer_devices(cfg, serving_device) -> list[str]:
    """One device per trainer rank; a list's CUDA indices are checked against this process's GPUs."""
    devices = cfg.trainer_devices
    if devices == ["auto"]:
        dev = torch.device(serving_device)
        if dev.type != "cuda":
            return ["cpu"]
        return [f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"]   # the serving GPU
    if any(d.startswith("cuda") for d in devices):
        if not torch.cuda.is_available():
            raise ValueError(f"--online-train-device {cfg.trainer_device}: no CUDA device in this process")
        count = torch.cuda.device_count()
        missing = [d for d in devices if d != "cuda" and int(d.split(":")[1]) >= count]
        if missing:
            raise ValueError(f"--online-train-device {cfg.trainer_device}: {', '.join(missing)} out of range, "
                             f"this process sees {count} GPU(s) (cuda:0..cuda:{count - 1}; CUDA_VISIBLE_DEVICES "
                             f"renumbers them)")
    return devices


def check_group_memory(need, devices: list[str], max_memory: int | None, free_fn=None) -> None:
    """`check_trainer_memory` for every device of a trainer group; ranks sharing host memory (cpu entries)
    are checked together: their needs add up."""
    free_fn = free_fn or device_free_bytes
    for device in dict.fromkeys(devices):
        ranks = devices.count(device)
        if ranks == 1:
            check_trainer_memory(need, device, max_memory, free_fn(device))
            continue
        total = dataclasses.replace(need, trainable=need.trainable * ranks, fixed=need.fixed * ranks,
                                    target_head=need.target_head * ranks)
        check_trainer_memory(total, f"{device} ({ranks} trainer ranks)",
                             None if max_memory is None else max_memory * ranks, free_fn(device))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the group's rendezvous; taken again by rank 0 a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_free_bytes(device: str) -> int | None:
    """Free memory on `device` now (CUDA: after SGLang's pools; CPU: MemAvailable); None when unknown."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return mem_available_bytes()


def mem_available_bytes() -> int | None:
    """The kernel's MemAvailable (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_trainer_memory(need, device: str, max_memory: int | None, free: int | None) -> None:
    """Fail at startup when the trainer cannot fit: its need (`trainer_worker.MemoryNeed`) over the budget
    (--online-train-max-memory), or the budget (default: the need) over what is free on its device."""
    gib = 2 ** 30
    if max_memory is not None and need.total > max_memory:
        raise ValueError(f"--online-train: the trainer needs about {need.describe()}, over --online-train-max-memory "
                         f"{max_memory / gib:.2f} GiB: raise --online-train-max-memory, or train elsewhere "
                         f"(--online-train-device), or serve a smaller draft")
    budget = max_memory if max_memory is not None else need.total
    if free is not None and budget > free:
        what = (f"--online-train-max-memory {max_memory / gib:.2f} GiB" if max_memory is not None
                else f"the trainer's need, about {need.describe()},")
        raise ValueError(f"--online-train: {what} is more than the {free / gib:.2f} GiB free on {device} after "
                         f"SGLang's pools: lower --mem-fraction-static (if the trainer shares the serving GPU), "
                         f"lower --online-train-max-memory, or move the trainer with --online-train-device "
                         f"(cpu or another cuda:N)")


class TrainerGroupSupervisor:
    """Start, feed, watch and restart the trainer: one process, or one group of processes (a device list).
    No SGLang here: `TrainerSupervisor` adds the hot swap into the live draft."""
    RESTART_BACKOFF_S = (1.0, 30.0)
    stager: StagedSwap | None = None               # TrainerSupervisor: versions staged ahead of the swap

    def __init__(self, cfg, spec: TrainerSpec, slot: ws.WeightSlot, metrics, devices: list[str]):
        self.cfg = cfg
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
        self.version = 0                            # the draft version serving uses
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

    def trainer_command(self, spec: TrainerSpec) -> list[str]:
        """argv of a trainer process (of each rank)."""
        return [sys.executable, "-m", TRAINER_MODULE, spec.to_json()]

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
            self._stage_published()            # a version published just before a trainer died still goes live
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
            record = self.outbox.get(timeout=0.1 if self.stager is not None else 0.5)
            if record is not None:
                try:
                    self.conn.send_bytes(encode_record(record))
                except OSError as e:           # the trainer is gone, its socket is, or it stopped reading
                    self.outbox.put(record, front=True)
                    if self.proc.poll() is None:
                        self._kill_hung(f"sending it a record failed ({type(e).__name__}: it stopped reading)")

    def _stage_published(self) -> None:
        """Supervisor thread: what to do with a newly published version before the swap (nothing here)."""

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
        for p in list(self.procs):
            if p.poll() is None:
                p.kill()
        self.slot.close()


class TrainerSupervisor(TrainerGroupSupervisor):
    """The trainer group plus the hot swap of what it publishes into SGLang's live draft."""

    def __init__(self, cfg, kind, worker, metrics, *, target_path: str, draft_path: str, block_size: int,
                 tp: TPGroup | None = None):
        self.tp = tp                                # TP rank 0 of a --tp N server (sglang_ext/online/tp.py), or None
        self.kind = kind                            # trainer.draft_kind.DraftKind of the served draft
        self.worker = worker                        # SGLang's speculative worker (the kind's serving.worker_class)
        self.draft_model = draft_module(kind, worker)
        self.layout = ws.draft_layout(draft_path, exclude=kind.serving.fixed_weights)
        check_draft_names(kind, self.draft_model, self.layout)
        # Staged swap: versions reach the device off the critical path; None: through load_weights at the swap
        placements = plan_placements(kind, self.draft_model, self.layout)
        self.stager = StagedSwap(self.draft_model, placements) if placements else None
        devices = resolve_trainer_devices(cfg, getattr(worker, "device", "cpu"))
        self.memory_need = trainer_memory_need(kind.name, draft_path, target_path, devices[0])
        check_group_memory(self.memory_need, devices, cfg.max_memory_bytes)
        serving_dtype = next(self.draft_model.parameters()).dtype   # versions cross in the dtype served
        rollback = cfg.rollback_steps > 0             # keep the previous version's weights (the keep buffer)
        slot = ws.WeightSlot.create(self.layout, serving_dtype, keep=rollback)
        if rollback:                                  # version 0: the checkpoint
            for name, t in load_draft_weights(draft_path, self.layout, serving_dtype).items():
                slot.keep[name].copy_(t)
        spec = TrainerSpec(settings=cfg.trainer_settings(), target_path=str(target_path),
                           draft_path=str(draft_path), draft_kind=kind.name, block_size=int(block_size),
                           device=devices[0], slot_fd=slot.fd, slot_dtype=ws.dtype_name(serving_dtype),
                           world_size=len(devices))
        super().__init__(cfg, spec, slot, metrics, devices)
        self.swaps = 0
        self.last_swap_t: float | None = None
        self._seen = {"rejected_worse": 0, "rejected_nan": 0}
        self._seen_inbox_dropped = 0
        self._last_metrics_t = 0.0
        self._last_tick: float | None = None
        self.iterations = 0                         # scheduler iterations seen
        self.iteration_s: float | None = None
        # rollback on served acceptance (sglang_ext/online/rollback.py); None with --online-train-rollback-steps 0
        self.watch = RollbackWatch(cfg.rollback_steps, cfg.rollback_tolerance) if rollback else None
        self.rollbacks = 0
        self.skipped_versions = 0                   # published from a rolled-back version: never applied
        self._keep_lock = threading.Lock()          # keep buffer: the supervisor thread's copy vs. the swap

    def slot_handle(self) -> SlotHandle:
        """How the other TP ranks reach this process's weight slot."""
        return SlotHandle(pid=os.getpid(), fd=self.slot.fd, layout=[(n, list(s)) for n, s in self.layout],
                          dtype=ws.dtype_name(self.slot.dtype))

    def _stage_published(self) -> None:
        """Supervisor thread: bring a newly published version to the staging buffers (once the previous one
        was applied, so the buffers are free)."""
        self._keep_live()
        stager, slot = self.stager, self.slot
        if stager is None or slot is None or slot.header is None:
            return
        version = slot.published
        if version > stager.version and slot.applied >= stager.version:
            try:
                with torch.no_grad():
                    stager.stage(slot.weights, version)
            except Exception:
                logger.exception("sglang_ext: staging draft version %d failed; swapping through load_weights",
                                 version)
                self.stager = None

    # -- scheduler thread ----------------------------------------------------------------------------------
    def tick(self, scheduler=None) -> None:
        """Top of a scheduler iteration: apply a published version; refresh metrics about once a second."""
        slot = self.slot
        t = time.perf_counter()
        if self._last_tick is not None:      # typical scheduler iteration, to compare swap latency against
            gap = t - self._last_tick
            self.iteration_s = gap if self.iteration_s is None else 0.95 * self.iteration_s + 0.05 * gap
        self.iterations += 1
        stager = self.stager
        verdict = self.watch.take_rollback() if self.watch is not None else None
        if verdict is None:
            self._skip_stale()
        ready = (verdict is None and slot.published > slot.applied
                 and (stager is None or stager.version == slot.published) and self._may_swap())
        if self.tp is None:
            if verdict is not None:
                self._rollback(scheduler, verdict)
            elif ready:
                self._swap(scheduler, slot.published)
        else:                                # every TP rank swaps (or rolls back) at this iteration, or none does
            code = rollback_code(slot.header.keep_version) if verdict is not None else (slot.published if ready
                                                                                         else 0)
            version = self.tp.broadcast_version(code)
            if version < 0:
                self._rollback(scheduler, verdict)
            elif version:
                self._swap(scheduler, version)
        self._last_tick = time.perf_counter()
        now = time.monotonic()
        if now - self._last_metrics_t >= 1.0:
            self._last_metrics_t = now
            self._update_metrics(now)

    @torch.no_grad()
    def _swap(self, scheduler, version: int) -> None:
        slot, draft = self.slot, self.draft_model
        in_flight = _requests_in_flight(scheduler)
        t0 = time.perf_counter()
        storage = [p.data_ptr() for p in draft.parameters()]
        try:
            apply_version(self.kind, self.worker, draft, self.stager, slot.weights_of(version), version,
                          getattr(scheduler, "forward_stream", None))
        finally:
            if self.tp is not None:
                self.tp.barrier()              # every rank has read the version: the slot buffer may be reused
        if storage != [p.data_ptr() for p in draft.parameters()]:
            logger.error("sglang_ext: draft parameter storage moved during the swap (CUDA graphs would be stale)")
        latency = time.perf_counter() - t0
        if self.tp is not None:
            swap_log(self.tp.rank, version, self.iterations, getattr(scheduler, "forward_ct", None), latency)
        slot.acknowledge(version)
        with self._keep_lock:
            self.version = version
            if self.watch is not None:
                slot.header.live_in_keep = 0
                if self.watch.swapped(version):
                    logger.info("sglang_ext: draft version %d on probation for %d verify steps (rollback if its "
                                "mean accept length falls more than %g below the previous version's)", version,
                                self.watch.steps, self.watch.tolerance)
        self.swaps += 1
        self.last_swap_t = time.monotonic()
        self.metrics.swapped(version, latency, in_flight)
        logger.info("sglang_ext: draft version %d swapped in (%.2f ms, %d requests in flight, scheduler iteration "
                    "%.2f ms on average, trainer step %d, held-out tau %.3f vs %.3f)", version, latency * 1e3,
                    in_flight, (self.iteration_s or 0.0) * 1e3, slot.header.steps, slot.header.candidate_tau,
                    slot.header.live_tau)

    # -- rollback on served acceptance (sglang_ext/online/rollback.py) -------------------------------------
    def observe_verified(self, commit_lens: list[int], version: int) -> None:
        """Scheduler thread (capture.Recorder.on_verified): tokens committed per request of one verify step, and
        the draft version that proposed them. A rollback verdict is acted on at the next tick (not mid-forward)."""
        if self.watch is None:
            return
        verdict = self.watch.observe(commit_lens, version)
        if verdict is None:
            return
        if verdict.rollback:
            logger.warning("sglang_ext: draft version %d serves worse than the previous version (%s): rolling it "
                           "back", verdict.version, verdict.describe())
        else:
            logger.info("sglang_ext: draft version %d kept after its probation (%s)", verdict.version,
                        verdict.describe())

    def _may_swap(self) -> bool:
        """Rollback on: nothing newer goes live while a version is on probation, before the trainer has reset
        after a rollback, or before the live version's weights are in the keep buffer."""
        if self.watch is None:
            return True
        h = self.slot.header
        return not self.watch.busy and h.rollback_seen >= h.rollbacks and h.keep_version == self.version

    def _skip_stale(self) -> None:
        """A version published from the rolled-back weights before the trainer reset is never applied: it is
        acknowledged unapplied, so the trainer may publish again."""
        h = self.slot.header
        if self.watch is None or h.rollbacks == 0 or h.rollback_seen < h.rollbacks:
            return
        if h.applied < h.published <= h.reset_published:
            logger.info("sglang_ext: draft version %d was trained from rolled-back version %d: not applied",
                        h.published, h.rolled_back_version)
            self.slot.acknowledge(h.published)
            self.skipped_versions += 1

    def _keep_live(self) -> None:
        """Supervisor thread: copy the live version's weights into the slot's keep buffer, off the critical path,
        once it is past its probation (what a rollback of the next version restores). The trainer never writes
        the live version's buffer (it writes the other one, and only after the next swap)."""
        watch, slot = self.watch, self.slot
        if watch is None or slot is None or slot.header is None:
            return
        with self._keep_lock:
            h = slot.header
            if watch.busy or h.live_in_keep or h.keep_version == self.version or slot.applied != self.version:
                return
            for name, t in slot.weights_of(self.version).items():
                slot.keep[name].copy_(t)
            h.keep_version = self.version

    @torch.no_grad()
    def _rollback(self, scheduler, verdict: Verdict) -> None:
        """Swap the keep buffer's version back in (every TP rank at this iteration), count it, log it, and tell
        the trainer (slot header `rollbacks`) to reset to it."""
        slot, h = self.slot, self.slot.header
        restored = h.keep_version
        t0 = time.perf_counter()
        try:
            restore_weights(self.kind, self.worker, self.draft_model, self.stager, slot.keep)
        finally:
            if self.tp is not None:
                self.tp.barrier()              # every rank has read the keep buffer
        latency = time.perf_counter() - t0
        if self.tp is not None:                # as each follower logs it (tp.SwapFollower._restore)
            logger.info("sglang_ext: TP rank %d restored draft version %d (rollback) at scheduler iteration %d "
                        "(forward %s, %.2f ms)", self.tp.rank, restored, self.iterations,
                        getattr(scheduler, "forward_ct", None), latency * 1e3)
        with self._keep_lock:
            previous = self.watch.rolled_back()
            h.live_in_keep = 1
            h.rolled_back_version = verdict.version
            h.rollbacks += 1
            self.version = restored
        if previous != restored:
            logger.error("sglang_ext: rollback watch expected version %d back, the keep buffer holds %d", previous,
                         restored)
        self.rollbacks += 1
        self.last_swap_t = time.monotonic()
        self.metrics.rolled_back(verdict.version, restored)
        logger.warning("sglang_ext: draft version %d rolled back after %d verify steps: version %d restored "
                       "(%.2f ms, scheduler iteration %d; %s); the trainer resets to it", verdict.version,
                       verdict.steps, restored, latency * 1e3, self.iterations, verdict.describe())

    def _update_metrics(self, now: float) -> None:
        h = self.slot.header
        alive = self.trainer_alive()
        self.metrics.queue("supervisor", self.outbox.nbytes, self.outbox.take_dropped())
        self.metrics.queue("trainer_inbox", h.inbox_bytes, h.inbox_dropped - self._seen_inbox_dropped)
        self._seen_inbox_dropped = max(self._seen_inbox_dropped, h.inbox_dropped)
        for field, reason in (("rejected_worse", "worse"), ("rejected_nan", "nan")):
            value = getattr(h, field)
            if value > self._seen[field]:
                self.metrics.rejected(reason, value - self._seen[field])
            self._seen[field] = max(value, self._seen[field])
        self.metrics.trainer_status(
            up=alive, steps=h.steps, loss=h.loss, tokens_per_s=h.tokens_per_s, tokens=h.tokens,
            since_swap=None if self.last_swap_t is None else now - self.last_swap_t, records=h.records,
            heldout_tau=h.live_tau)


def _requests_in_flight(scheduler) -> int:
    if scheduler is None:
        return 0
    running = getattr(scheduler, "running_batch", None)
    n = len(getattr(running, "reqs", []) or []) if running is not None else 0
    return n + len(getattr(scheduler, "waiting_queue", []) or [])

