"""Safe checkpoints and poison records of the online trainer (issue 14, items 4 and 5), without a server:

  * checkpoints go to <checkpoint_dir>/<run id>/version-NNNNNN/, one run id per server start (the supervisor
    picks it, trainer restarts keep it); a later run with the same directory prunes only its own versions (at
    most keep_checkpoints) and never touches an earlier run's; directories 0700, files 0600 (real exports of a
    tiny draft); the partial export of a run that has ended (its trainer's run lock free) is deleted, a live
    run's is not;
  * a poison record sent through the supervisor to a real trainer process: a token id past the vocabulary is
    dropped on arrival, a record whose step raises is dropped after that step; both are counted, the trainer
    keeps running (no restart), and after a trainer restart neither is sent again (no restart loop); records
    wait for the trainer as references to the buffer's own, not copies.

Run as a script, this file is the trainer process of the poison test (the production trainer; a record whose
rid starts with "poison-step" makes any batch holding it raise, one starting with "poison-crash" kills the
process outright, and every record received is logged).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.config import OnlineTrainConfig
from sglang_ext.online.protocol import TrainerSpec, decode_record, encode_record
from sglang_ext.online.trainer.checkpoints import RUN_LOCK, sweep_partial_exports
from sglang_ext.online.trainer.worker import TRAINER_NICE, OnlineTrainer, main
from trainer.replay import ReplayRecord

LOG_ENV = "SGLANG_EXT_TEST_POISON_LOG"
POISON_STEP = "poison-step"
POISON_CRASH = "poison-crash"


class PoisonTestTrainer(OnlineTrainer):
    """The production trainer; logs (pid, seq, rid) of every record it pools and every step, and raises in any
    batch holding a record whose rid starts with POISON_STEP (as a record that breaks the objective would)."""

    def drain(self):
        before = list(self.pool) + list(self.holdout)
        super().drain()
        seen = {id(r) for r in before}
        for r in list(self.pool) + list(self.holdout):
            if id(r) not in seen:
                self._log({"pid": os.getpid(), "seq": r.meta.get("seq"), "rid": r.meta.get("rid")})

    def local_batch(self, records):
        if any(str(r.meta.get("rid", "")).startswith(POISON_CRASH) for r in records):
            self._log({"pid": os.getpid(), "crash": [r.meta.get("seq") for r in records]})
            os.kill(os.getpid(), signal.SIGKILL)         # dies outright, as a segfault or an OOM kill would
        if any(str(r.meta.get("rid", "")).startswith(POISON_STEP) for r in records):
            raise IndexError("test fault: this record breaks the objective")
        return super().local_batch(records)

    def train_once(self):
        stats = super().train_once()
        self._log({"pid": os.getpid(), "step": self.local_steps, "applied": stats.applied})
        time.sleep(0.05)
        return stats

    def _log(self, row: dict) -> None:
        with open(os.environ[LOG_ENV], "a") as f:
            f.write(json.dumps(row) + "\n")


class Metrics:
    """What the supervisor reports (OnlineMetrics' trainer_restarted / trainer_hung / poison_records)."""

    def __init__(self):
        self.restarts = self.hung = 0
        self.poison: list[str] = []
        self.lock = threading.Lock()

    def trainer_restarted(self):
        self.restarts += 1

    def trainer_hung(self):
        self.hung += 1

    def poison_records(self, reason, n=1):
        with self.lock:
            self.poison += [reason] * n

    def queue(self, queue, nbytes, dropped=0):     # the supervisor's once-a-second status: not looked at here
        pass

    def rejected(self, reason, n):
        pass

    def trainer_status(self, **status):
        pass


@pytest.fixture(scope="module")
def draft_dir(tiny, tmp_path_factory):
    from sglang_ext.demo.traffic import make_random_draft
    return make_random_draft(tiny.dense_random, tmp_path_factory.mktemp("draft") / "d", block_size=4)


def draft_facts(draft_dir: Path) -> tuple[int, int]:
    cfg = json.loads((draft_dir / "config.json").read_text())
    return len(cfg["dflash_config"]["target_layer_ids"]) * cfg["hidden_size"], cfg["vocab_size"]


def make_records(draft_dir: Path, n: int, first_seq: int = 0) -> list[ReplayRecord]:
    width, vocab = draft_facts(draft_dir)
    g = torch.Generator().manual_seed(first_seq)
    out = []
    for i in range(first_seq, first_seq + n):
        length = 24
        mask = torch.zeros(length, dtype=torch.bool)
        mask[6:] = True
        out.append(ReplayRecord(torch.randint(0, vocab - 1, (length,), generator=g),
                                torch.randn(length, width, generator=g).to(torch.bfloat16),
                                torch.arange(length).expand(3, length).clone(), mask,
                                meta={"rid": f"r{i}", "seq": i}))
    return out


def spec_for(cfg: OnlineTrainConfig, tiny, draft_dir: Path, slot: ws.WeightSlot) -> TrainerSpec:
    return TrainerSpec(settings=cfg.trainer_settings(), target_path=str(tiny.dense_random),
                       draft_path=str(draft_dir), draft_kind="dflash", block_size=4, device="cpu",
                       slot_fd=slot.fd, slot_dtype=ws.dtype_name(slot.dtype), seed=3)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_per_run_pruned_within_the_run_and_private(tiny, draft_dir, tmp_path):
    """Two server runs share a checkpoint directory: the second keeps at most keep_checkpoints of its own
    versions and deletes nothing of the first run's (nor a pre-run-directory export at the top level)."""
    from sglang_ext.online.recorder.supervisor import TrainerGroupSupervisor

    root = tmp_path / "ckpt"                             # created by the trainer: 0700
    legacy = root / "version-000001"                     # an export of the layout before run directories
    cfg = OnlineTrainConfig(enabled=True, checkpoint_dir=str(root), keep_checkpoints=2)
    layout = ws.draft_layout(draft_dir)
    runs = []
    for server_run in range(2):
        slot = ws.WeightSlot.create(layout)
        try:
            # The supervisor picks the run id once per server start; its trainer (any restart) uses it.
            sup = TrainerGroupSupervisor(cfg, spec_for(cfg, tiny, draft_dir, slot), slot, Metrics(), ["cpu"])
            run_id = sup.spec.settings.run_id
            assert run_id.startswith("run-") and run_id not in runs
            runs.append(run_id)
            spec = TrainerSpec.from_json(sup.rank_spec(0, -1).to_json())
            spec = dataclasses.replace(spec, slot_fd=os.dup(slot.fd))
            trainer = OnlineTrainer(spec)
            assert trainer.run_id == run_id
            for version in (1, 2, 3):                    # versions restart at 1 in every server run
                trainer.checkpoints.write(trainer.live, version)
            if server_run == 0:
                legacy.mkdir()
                (legacy / "config.json").write_text("{}")
        finally:
            slot.close()
    first, second = (root / r for r in runs)
    assert sorted(p.name for p in first.iterdir()) == [RUN_LOCK, "version-000002", "version-000003"]
    assert sorted(p.name for p in second.iterdir()) == [RUN_LOCK, "version-000002", "version-000003"]
    assert (legacy / "config.json").exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(runs + ["version-000001"])
    assert mode(root) == 0o700
    for run in (first, second):
        assert mode(run) == 0o700
        assert mode(run / RUN_LOCK) == 0o600
        for version in run.iterdir():
            if version.name == RUN_LOCK:
                continue
            assert mode(version) == 0o700
            files = sorted(version.iterdir())
            assert {f.name for f in files} >= {"config.json", "model.safetensors"}
            assert all(mode(f) == 0o600 for f in files), [(f.name, oct(mode(f))) for f in files]
    # an export is a loadable draft
    from trainer.draft_kind import get_kind
    kind = get_kind("dflash")
    kind.from_pretrained(str(second / "version-000003"), kind.load_config(str(second / "version-000003")))


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_partial_exports_of_ended_runs_are_deleted_live_runs_kept(tmp_path):
    """A server shut down mid-export leaves <run>/.version-NNNNNN.tmp; the next run's trainer deletes it once
    that run's lock is free (its trainer has exited, however), and leaves alone a live run's partial export
    (another server sharing the directory), a run directory without a lock, and every complete version."""
    root = tmp_path / "ckpt"
    ended, live, unlocked, own = (root / f"run-{name}" for name in ("ended", "live", "nolock", "own"))
    for run in (ended, live, unlocked, own):
        (run / "version-000003").mkdir(parents=True)
        (run / "version-000003" / "model.safetensors").write_bytes(b"complete")
        (run / ".version-000004.tmp").mkdir()
        (run / ".version-000004.tmp" / "model.safetensors").write_bytes(b"partial")
    (ended / RUN_LOCK).touch()                           # its trainer exited: nobody holds the lock
    (own / RUN_LOCK).touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live / RUN_LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert sweep_partial_exports(root, own) == 1
        assert not (ended / ".version-000004.tmp").exists()
        for run in (live, unlocked, own):                # a live run's, a lockless one's, the caller's own
            assert (run / ".version-000004.tmp" / "model.safetensors").read_bytes() == b"partial"
        for run in (ended, live, unlocked, own):
            assert (run / "version-000003" / "model.safetensors").read_bytes() == b"complete"
    finally:
        holder.kill()
        holder.wait()
    assert sweep_partial_exports(root, own) == 1         # the live run ended (killed): its partial export goes
    assert not (live / ".version-000004.tmp").exists()
    assert (unlocked / ".version-000004.tmp").exists() and (own / ".version-000004.tmp").exists()


def wait_for(what: str, cond, sup, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sup.thread.is_alive(), "the supervisor thread died"
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


STOP_MID_COMMIT = """
import os, shutil, signal, sys
from pathlib import Path
from sglang_ext.online.trainer import checkpoints

class Export:                                   # a draft's export: one file
    def export(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"w")

checkpoints.stop_signals_wait_for_commits()    # what the trainer's main does
writer = checkpoints.CheckpointWriter(sys.argv[1], "run-x", keep=2)
writer.write(Export(), 1)
writer.write(Export(), 2)
if sys.argv[2] == "mid-commit":                 # the stop arrives as the oldest version is being deleted
    rmtree = shutil.rmtree
    def rmtree_after_a_stop(path, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return rmtree(path, *a, **k)
    checkpoints.shutil.rmtree = rmtree_after_a_stop
    writer.write(Export(), 3)
else:                                           # the stop arrives between exports
    os.kill(os.getpid(), signal.SIGTERM)
print("survived", flush=True)
"""


@pytest.mark.parametrize("when", ["mid-commit", "between-exports"])
def test_stop_signal_lets_a_checkpoint_commit_finish(tmp_path, when):
    """SIGTERM during a checkpoint's commit (the finished export renamed in, the oldest pruned) ends the trainer
    once the commit is done, so its run keeps exactly keep_checkpoints versions (the server-restart test caught
    a stop between the rename and the pruning); outside a commit it ends the trainer at once, killed by the
    signal as before."""
    proc = subprocess.run([sys.executable, "-c", STOP_MID_COMMIT, str(tmp_path), when], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr[-2000:])
    assert "survived" not in proc.stdout
    run = tmp_path / "run-x"
    kept = sorted(p.name for p in run.iterdir() if p.name != RUN_LOCK)
    assert kept == (["version-000002", "version-000003"] if when == "mid-commit" else
                    ["version-000001", "version-000002"]), kept


def test_outbox_holds_the_buffers_own_records_not_copies(tiny, draft_dir):
    """Records offered to the trainer (and a restart's backlog) wait as references to the records the replay
    buffer holds, encoded one at a time as they are sent: no copy of the buffer, no burst of encoding (a soak
    showed the scheduler's RSS step up by the replay budget at trainer restarts)."""
    from sglang_ext.online.recorder.supervisor import TrainerGroupSupervisor

    records = make_records(draft_dir, 5)
    size = records[0].features.numel() * records[0].features.element_size()
    cfg = OnlineTrainConfig(enabled=True, queue_bytes=int(2.5 * size)).validate()     # room for two
    slot = ws.WeightSlot.create(ws.draft_layout(draft_dir))
    sup = TrainerGroupSupervisor(cfg, spec_for(cfg, tiny, draft_dir, slot), slot, Metrics(), ["cpu"])
    for r in records:
        sup.offer(r)
    assert sup.outbox.nbytes == 2 * size and sup.outbox.dropped_total == 3
    kept = [sup.outbox.get(), sup.outbox.get()]
    assert kept[0] is records[3] and kept[1] is records[4]     # the newest two, the buffer's own objects
    assert sup.outbox.get() is None


def test_poison_record_is_dropped_counted_and_never_resent(tiny, draft_dir, tmp_path, monkeypatch):
    """Through the replay buffer's path (records numbered, offered, the buffer's snapshot re-sent after a
    restart): one record with a token id past the vocabulary (offered directly, as if the buffer's check had
    missed it: the trainer checks again) and one whose step raises. Both are dropped and counted, the trainer
    process keeps stepping; after it is killed, the restarted one is sent the backlog without them and runs
    without another poison report or restart."""
    from sglang_ext.online.recorder.supervisor import TrainerGroupSupervisor

    log = tmp_path / "trainer.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    class Supervisor(TrainerGroupSupervisor):
        def trainer_command(self, spec):                 # this file as the trainer process
            return [sys.executable, str(Path(__file__).resolve()), spec.to_json()]

    cfg = OnlineTrainConfig(enabled=True, min_records=4, batch_size=12, num_anchors=4, swap_every=1000,
                            holdout_every=1000, heartbeat_timeout_s=120.0).validate()
    slot = ws.WeightSlot.create(ws.draft_layout(draft_dir))
    metrics = Metrics()
    sup = Supervisor(cfg, spec_for(cfg, tiny, draft_dir, slot), slot, metrics, ["cpu"])
    _, vocab = draft_facts(draft_dir)
    good = make_records(draft_dir, 10)
    step_poison = make_records(draft_dir, 1, first_seq=10)[0]
    step_poison.meta["rid"] = f"{POISON_STEP}-10"
    vocab_poison = make_records(draft_dir, 1, first_seq=11)[0]
    vocab_poison.input_ids[5] = vocab + 7
    buffer = good[:5] + [step_poison] + good[5:] + [vocab_poison]   # what the replay buffer holds
    sup.start(lambda: list(buffer))
    for r in buffer:
        sup.offer(decode_record(encode_record(r)))
    try:
        wait_for("both poison reports", lambda: len(metrics.poison) >= 2, sup)
        assert sorted(metrics.poison) == ["step_failed", "token_id"]
        assert set(sup.poisoned) == {10, 11}
        first_pid = sup.proc.pid
        assert os.getpriority(os.PRIO_PROCESS, first_pid) >= TRAINER_NICE    # serving runs first on shared cores
        steps_then = slot.header.steps
        wait_for("steps after the poison step", lambda: slot.header.steps >= steps_then + 3, sup)
        assert sup.proc.pid == first_pid and sup.starts == 1 and metrics.restarts == 0
        rows = log_rows(log)
        pooled = [r["seq"] for r in rows if r.get("pid") == first_pid and "seq" in r]
        assert sorted(pooled) == list(range(11))         # the vocab poison never reached the pool
        failed = [r for r in rows if "step" in r and not r["applied"]]
        assert len(failed) == 1                          # the one step with the poison record, then none

        os.kill(first_pid, signal.SIGKILL)               # a restart re-sends the buffer, without the poison
        wait_for("the restarted trainer's backlog",
                 lambda: sup.starts == 2 and len([r for r in log_rows(log)
                                                  if r.get("pid") not in (None, first_pid) and "seq" in r]) >= 10,
                 sup)
        second_pid = sup.proc.pid
        wait_for("steps of the restarted trainer",
                 lambda: len([r for r in log_rows(log) if r.get("pid") == second_pid and "step" in r]) >= 3, sup)
        resent = sorted(r["seq"] for r in log_rows(log) if r.get("pid") == second_pid and "seq" in r)
        assert resent == list(range(10))
        assert sorted(metrics.poison) == ["step_failed", "token_id"]   # no new report
        assert sup.starts == 2 and metrics.restarts == 1 and sup.proc.pid == second_pid   # no restart loop
        assert all(r["applied"] for r in log_rows(log) if r.get("pid") == second_pid and "step" in r)
    finally:
        sup.stop()
        sup._kill_group()



def test_record_that_kills_the_trainer_outright_is_dropped_after_two_deaths(tiny, draft_dir, tmp_path,
                                                                           monkeypatch):
    """A record whose step kills the trainer process (SIGKILL: nothing to catch) is in the step of two trainer
    deaths in a row: the supervisor drops it ("crashed", with any record that was in both steps), and the
    third trainer is not sent it and keeps running: no restart loop."""
    from sglang_ext.online.recorder.supervisor import TrainerGroupSupervisor

    log = tmp_path / "trainer.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    class Supervisor(TrainerGroupSupervisor):
        def trainer_command(self, spec):
            return [sys.executable, str(Path(__file__).resolve()), spec.to_json()]

    cfg = OnlineTrainConfig(enabled=True, min_records=4, batch_size=2, num_anchors=4, swap_every=1000,
                            holdout_every=1000, replay_policy="uniform", heartbeat_timeout_s=120.0).validate()
    slot = ws.WeightSlot.create(ws.draft_layout(draft_dir))
    metrics = Metrics()
    sup = Supervisor(cfg, spec_for(cfg, tiny, draft_dir, slot), slot, metrics, ["cpu"])
    records = make_records(draft_dir, 9)
    records[8].meta["rid"] = f"{POISON_CRASH}-8"
    sup.start(lambda: list(records))
    for r in records:
        sup.offer(decode_record(encode_record(r)))
    try:
        wait_for("the crash record to be dropped", lambda: "crashed" in metrics.poison, sup)
        assert 8 in sup.poisoned and len(metrics.poison) <= cfg.batch_size and set(metrics.poison) == {"crashed"}
        wait_for("a third trainer", lambda: sup.starts == 3, sup)
        third = sup.proc.pid
        wait_for("steps of the third trainer",
                 lambda: len([r for r in log_rows(log) if r.get("pid") == third and "step" in r]) >= 5, sup)
        rows = log_rows(log)
        crashes = [r for r in rows if "crash" in r]
        assert len(crashes) == 2 and all(8 in r["crash"] for r in crashes)
        assert set(sup.poisoned) == set(crashes[0]["crash"]) & set(crashes[1]["crash"])
        pooled = {r["seq"] for r in rows if r.get("pid") == third and "seq" in r}
        assert pooled == set(range(9)) - set(sup.poisoned)
        assert sup.starts == 3 and metrics.restarts == 2 and sup.proc.pid == third and sup.proc.poll() is None
    finally:
        sup.stop()
        sup._kill_group()


if __name__ == "__main__":
    sys.exit(main(trainer_cls=PoisonTestTrainer))
