"""The recorder process: everything --online-train does with a finished request, out of SGLang's scheduler process.

    python -m sglang_ext.online.recorder.process [--detach] '<RecorderSpec JSON>'
        (started by the scheduler process of TP rank 0, sglang_ext/online/scheduler/handoff.py; imports no SGLang;
        --detach: fork and let the parent exit at once, so this process is no descendant of SGLang's launcher)

The scheduler hands each finished request over in a shared-memory ring (sglang_ext/online/ring.py) and wakes this
process with a byte on a pipe. Here it becomes a `trainer.replay.ReplayRecord` (`records.assemble_record`) in the
replay buffer (sglang_ext/online/recorder/buffer.py, its own thread: byte budget, poison checks, shards, retention, the
prefix store, malloc_trim), which offers each record to the trainer: this process also starts, feeds, watches and
restarts the trainer process or group (supervisor.TrainerGroupSupervisor). A trainer that crashes or is killed
takes no record with it: the records live here, and a restarted trainer gets the buffer's backlog.

Stopping. This process writes every record it holds before it exits, however the server is stopped:
  * SIGTERM or SIGINT to this process (systemd's control-group stop, `kill -- -PGID`, Ctrl-C in a terminal);
  * the scheduler process gone (the wake pipe reads EOF: SGLang's own shutdown, SIGTERM to the launcher, or the
    scheduler killed). SGLang's launcher SIGKILLs its descendants when it shuts down and its children die with
    their parent; this process is neither (started detached, no parent-death signal), so it outlives them.
It drains the ring (what the scheduler wrote before it went), writes the last shard and exits within
STOP_TIMEOUT_S; the trainer is stopped (SIGTERM, then SIGKILL: it holds nothing a restart would not rebuild
but a checkpoint it may be committing, which SIGTERM lets it finish).

Metrics go to SGLang's /metrics like the scheduler's: prometheus_client's multiprocess directory is inherited
(PROMETHEUS_MULTIPROC_DIR), so this process's series are merged in (sglang_ext/online/metrics.py).
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time

log = logging.getLogger("sglang_ext.recorder")
STOP_TIMEOUT_S = 30.0           # the most a stop takes: the last shard written, the trainer killed


class Recorder:
    def __init__(self, spec, cfg, metrics, stopping: threading.Event):
        from sglang_ext.online.recorder.buffer import ReplayBuffer
        from sglang_ext.online.ring import Ring
        from trainer.replay import ReplaySpec
        from trainer.target import TargetIdentity

        self.spec = spec
        self.cfg = cfg
        self.metrics = metrics
        self.ring = Ring.attach(spec.ring_fd)
        self.wake = spec.wake_fd
        replay = ReplaySpec(TargetIdentity(**spec.target), tuple(spec.layer_ids), int(spec.hidden_size),
                            spec.storage_dtype)
        self.buffer = ReplayBuffer(cfg, replay, metrics, vocab_size=spec.vocab_size)
        self.supervisor = None
        if spec.trainer_spec:
            self.supervisor = self._trainer_supervisor()
            self.buffer.on_record = self.supervisor.offer
            self.supervisor.start(lambda: [record for record, _ in self.buffer.snapshot()])
        self.stopping = stopping                  # set by SIGTERM / SIGINT
        self.scheduler_gone = False
        self.taken = 0

    def _trainer_supervisor(self):
        from sglang_ext.online.protocol import TrainerSpec
        from sglang_ext.online.recorder.supervisor import TrainerGroupSupervisor
        from sglang_ext.online.swap import weight_slot as ws

        spec = self.spec
        trainer = TrainerSpec.from_json(spec.trainer_spec)
        slot = ws.WeightSlot.attach(trainer.slot_fd, [(n, tuple(s)) for n, s in spec.slot_layout],
                                    ws.dtype_from_name(spec.slot_dtype))
        return TrainerGroupSupervisor(self.cfg, trainer, slot, self.metrics, list(spec.trainer_devices),
                                      command=list(spec.trainer_command))

    def run(self) -> int:
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.wake], [], [], 0.5)
            if ready:
                try:
                    woken = os.read(self.wake, 65536)
                except OSError:
                    woken = b""
                if not woken:                     # every write end closed: the scheduler process is gone
                    self.scheduler_gone = True
                    log.info("scheduler process gone: writing what is held, then exiting")
                    break
            self.drain()
        return self.stop()

    def drain(self) -> int:
        """Take every entry the ring holds into the replay buffer; returns how many."""
        from sglang_ext.online.finished import decode_finished

        n = 0
        while (payload := self.ring.get()) is not None:
            try:
                self.buffer.submit(decode_finished(payload))
            except Exception:                     # one bad entry must not stop the recorder
                log.exception("could not decode a finished request from the ring; skipped")
            n += 1
        self.taken += n
        return n

    def stop(self) -> int:
        """Drain the ring, write every record held, stop the trainer; bounded by STOP_TIMEOUT_S."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        self.drain()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.buffer.stop(timeout=max(1.0, deadline - time.monotonic()))
        log.info("recorder stopped: %d finished requests taken from the ring, %d records persisted", self.taken,
                 self.buffer.stats.persisted)
        return 0


def tell(fd: int, message: str) -> None:
    """Answer the scheduler waiting for this process to be up (fd -1: nobody waits, a restart)."""
    if fd < 0:
        return
    try:
        os.write(fd, message.encode())
        os.close(fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    from sglang_ext.online.config import OnlineTrainConfig
    from sglang_ext.online.metrics import OnlineMetrics
    from sglang_ext.online.protocol import RecorderSpec

    argv = sys.argv[1:] if argv is None else argv
    stopping = threading.Event()            # a signal during the start (imports: seconds) is not lost either

    def stop(signum, frame):
        log.info("%s: writing what is held, then exiting", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if argv and argv[0] == "--detach":     # started detached (handoff.Handoff.start): fork, the parent exits, so
        argv = argv[1:]                     # this process is no descendant of SGLang's launcher (whose shutdown
        if os.fork():                       # SIGKILLs every descendant); it stays in the process group
            os._exit(0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[sglang-ext recorder %(asctime)s] %(levelname)s %(message)s")
    spec = RecorderSpec.from_json(argv[0])
    cfg = OnlineTrainConfig.from_env()
    if cfg is None:
        log.error("no online-train settings in $SGLANG_EXT_ONLINE_TRAIN: nothing to record")
        return 2
    import torch
    torch.set_num_threads(1)                      # record assembly is small work: leave the cores to serving
    try:
        recorder = Recorder(spec, cfg, OnlineMetrics(spec.labels, owner="recorder"), stopping)
    except Exception as e:                        # e.g. the persist directory: the server fails at startup
        log.exception("could not start")
        tell(spec.ready_fd, f"{type(e).__name__}: {e}")
        return 1
    tell(spec.ready_fd, f"ok {os.getpid()}")
    log.info("recorder up (pid %d): ring of %d bytes, persist %s, trainer %s", os.getpid(), recorder.ring.capacity,
             cfg.persist_dir, "on" if recorder.supervisor else "off (capture only)")
    return recorder.run()


if __name__ == "__main__":
    sys.exit(main())
