"""Pieces of the co-located trainer without a server: the shared weight slot's handshake, the names check
against SGLang's draft, the trainer spec and record messages, fault parsing, and the trainer's NaN / guard
handling on synthetic records (through the test-only fault-injecting subclass)."""
import dataclasses
import json
import os
import sys
import time

import pytest
import torch

from sglang_ext.demo.traffic import make_random_draft
from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.config import OnlineTrainConfig
from sglang_ext.online.protocol import TrainerSpec, decode_record, encode_record
from support.plugin import PLUGIN_DIR
from trainer.draft_kind import get_kind
from trainer.replay import ReplayRecord

sys.path.insert(0, str(PLUGIN_DIR))
from sglang_ext_test_trainer import FaultyTrainer, parse_faults  # noqa: E402


@pytest.fixture(scope="module")
def draft_dir(tiny, tmp_path_factory):
    return make_random_draft(tiny.dense_random, tmp_path_factory.mktemp("draft") / "d", block_size=4)


def test_slot_handshake(draft_dir):
    layout = ws.draft_layout(draft_dir)
    assert layout and all(not name.startswith("model.") for name, _ in layout)
    owner = ws.WeightSlot.create(layout)
    # Anonymous memory: no file name in /dev/shm that a crash could leave behind.
    assert os.readlink(f"/proc/self/fd/{owner.fd}").startswith("/memfd:")
    trainer_side = ws.WeightSlot.attach(os.dup(owner.fd), layout)      # as a child inherits the descriptor
    try:
        state = {name: torch.randn(shape) for name, shape in layout}
        assert trainer_side.can_publish()
        assert trainer_side.publish(state) == 1 and owner.published == 1
        # Until the scheduler applied version 1, the trainer may not touch the slot.
        assert not trainer_side.can_publish()
        with pytest.raises(RuntimeError, match="has not applied"):
            trainer_side.publish(state)
        for name, _ in layout:
            assert torch.equal(owner.weights[name], state[name])
        owner.acknowledge(owner.published)
        assert trainer_side.can_publish()
        # A writer that dies mid-write never bumps PUBLISHED: nothing new for the scheduler to apply, and the
        # version it had published is intact (written into the other buffer): a restarted trainer resumes from it.
        class Killed(Exception):
            pass

        class DiesHere:
            def detach(self):
                raise Killed

        names = [name for name, _ in layout]
        cut = {**{n: torch.full(shape, float("nan")) for n, shape in layout}, names[-1]: DiesHere()}
        with pytest.raises(Killed):
            trainer_side.publish(cut)
        assert owner.published == owner.applied == 1
        restarted = ws.WeightSlot.attach(os.dup(owner.fd), layout)
        assert all(torch.equal(restarted.read_state()[n], state[n]) for n in names)
        restarted.close()
        state2 = {name: torch.randn(shape) for name, shape in layout}
        assert trainer_side.publish(state2) == 2
        assert all(torch.equal(owner.weights[n], state2[n]) for n in names)
        with pytest.raises(ValueError, match="bytes, but the draft layout needs"):
            ws.WeightSlot.attach(owner.fd, layout[:-1])
    finally:
        trainer_side.close()
        owner.close()



def test_names_check_against_sglang_draft(draft_dir):
    from sglang_ext.online.scheduler.swap_applier import check_draft_names
    kind = get_kind("dflash")

    class FakeSGLangDraft(torch.nn.Module):        # the parameter names SGLang's DFlashDraftModel has
        def __init__(self, names):
            super().__init__()
            self.names = names

        def named_parameters(self):
            return [(n, None) for n in self.names]

    layout = ws.draft_layout(draft_dir)
    fused = set()
    for name, _ in layout:
        for part, stacked in (("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
                              ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj")):
            name = name.replace(f".{part}.", f".{stacked}.")
        fused.add(name)
    check_draft_names(kind, FakeSGLangDraft(sorted(fused)), layout)
    with pytest.raises(ValueError, match="fc.weight"):
        check_draft_names(kind, FakeSGLangDraft(sorted(fused - {"fc.weight"})), layout)


def test_trainer_spec_round_trip_and_type_checks(draft_dir):
    cfg = OnlineTrainConfig(enabled=True, checkpoint_dir="/tmp/ckpt")
    spec = TrainerSpec(settings=cfg.trainer_settings(), target_path="t", draft_path=str(draft_dir),
                       draft_kind="dflash", block_size=4, device="cpu", slot_fd=7, records_fd=8)
    assert TrainerSpec.from_json(spec.to_json()) == spec
    assert spec.settings.pool_budget_bytes == cfg.replay_budget_bytes and spec.settings.lr == cfg.lr
    text = spec.to_json()
    for bad, field in ((text.replace('"block_size": 4', '"block_size": 4.5'), "block_size"),
                       (text.replace('"slot_fd": 7', '"slot_fd": true'), "slot_fd"),
                       (text.replace('"lr": 0.0006', '"lr": "fast"'), "settings.lr"),
                       (text.replace('"draft_kind": "dflash"', '"draft_kind": null'), "draft_kind")):
        with pytest.raises(ValueError, match=f"trainer spec.{field}"):
            TrainerSpec.from_json(bad)


def test_record_message_round_trip():
    rec = ReplayRecord(input_ids=torch.arange(5), features=torch.randn(5, 8).to(torch.bfloat16),
                       positions=torch.arange(5).expand(3, 5).clone(), loss_mask=torch.tensor([0, 0, 1, 1, 1]).bool(),
                       meta={"rid": "r1", "prompt_len": 2})
    back = decode_record(encode_record(rec))
    for name in ("input_ids", "features", "positions", "loss_mask"):
        assert torch.equal(getattr(back, name), getattr(rec, name)), name
    assert back.meta == {"rid": "r1"}


def test_fault_parsing():
    assert parse_faults("nan_steps=3-4,worse_once_live_tau=1.3,hang_once_after=6") == {
        "nan_steps": (3, 4), "worse_once_live_tau": 1.3, "hang_once_after": 6, "serve_worse_version": None}
    assert parse_faults("serve_worse_version=1")["serve_worse_version"] == 1
    assert parse_faults(None)["worse_once_live_tau"] is None
    with pytest.raises(ValueError, match="unknown fault 'boom'"):
        parse_faults("boom=1")


def _records(n, feature_dim, vocab, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.zeros(length, dtype=torch.bool)
        mask[8:] = True
        out.append(ReplayRecord(torch.randint(0, vocab - 1, (length,), generator=g),
                                torch.randn(length, feature_dim, generator=g).to(torch.bfloat16),
                                torch.arange(length).expand(3, length).clone(), mask))
    return out


def _trainer(tiny, draft_dir, faults="", slot=None, **cfg):
    slot = slot or ws.WeightSlot.create(ws.draft_layout(draft_dir))
    config = OnlineTrainConfig(enabled=True, min_records=2, batch_size=2, num_anchors=8, swap_every=2,
                               holdout_every=3, **cfg)
    spec = TrainerSpec(settings=config.trainer_settings(), target_path=str(tiny.dense_random),
                       draft_path=str(draft_dir), draft_kind="dflash", block_size=4, device="cpu",
                       slot_fd=os.dup(slot.fd), slot_dtype=ws.dtype_name(slot.dtype))
    return FaultyTrainer(TrainerSpec.from_json(spec.to_json()), parse_faults(faults)), slot


def test_nan_steps_are_skipped_and_counted(tiny, draft_dir):
    trainer, slot = _trainer(tiny, draft_dir, faults="nan_steps=1-2")
    try:
        cfg = json.loads((draft_dir / "config.json").read_text())
        K = len(cfg["dflash_config"]["target_layer_ids"])
        for r in _records(6, K * cfg["hidden_size"], cfg["vocab_size"]):
            trainer.inbox.put(decode_record(encode_record(r)))
        trainer.drain()
        h = slot.header
        assert h.holdout_records == 2 and h.train_records == 4
        before = {k: v.clone() for k, v in trainer.draft.state_dict().items()}
        assert trainer.train_once().skipped == "loss is nan"
        assert trainer.train_once().skipped == "loss is nan"
        assert h.rejected_nan == 2 and trainer.step == 0
        assert all(torch.equal(before[k], v) for k, v in trainer.draft.state_dict().items())
        assert trainer.train_once().applied and trainer.train_once().applied
        assert trainer.step == 2 and h.steps == 2 and trainer.want_publish
        # The candidate is scored against the live draft and published only if not worse.
        trainer.maybe_publish()
        assert h.guard_evals == 1
        cand, live = h.candidate_tau, h.live_tau
        assert (slot.published == 1) == (cand >= live)
        assert (h.rejected_worse == 1) == (cand < live)
    finally:
        slot.close()


def test_nonfinite_candidate_is_rejected(tiny, draft_dir):
    trainer, slot = _trainer(tiny, draft_dir)
    try:
        cfg = json.loads((draft_dir / "config.json").read_text())
        K = len(cfg["dflash_config"]["target_layer_ids"])
        for r in _records(6, K * cfg["hidden_size"], cfg["vocab_size"]):
            trainer.inbox.put(r)
        trainer.drain()
        with torch.no_grad():
            trainer.draft.fc.weight[0, 0] = float("inf")
        trainer.want_publish = True
        trainer.maybe_publish()
        assert slot.published == 0 and slot.header.rejected_nan == 1 and slot.header.guard_evals == 0
    finally:
        slot.close()


def test_injected_worse_candidate_is_refused(tiny, draft_dir):
    """The guard itself: a candidate whose logits are all flipped scores below any live draft above 1.0."""
    trainer, slot = _trainer(tiny, draft_dir, faults="worse_once_live_tau=0")
    try:
        cfg = json.loads((draft_dir / "config.json").read_text())
        K = len(cfg["dflash_config"]["target_layer_ids"])
        records = _records(6, K * cfg["hidden_size"], cfg["vocab_size"])
        for r in records:
            trainer.inbox.put(r)
        trainer.drain()
        trainer.score = lambda model: 1.5 if model is trainer.live else 1.2     # stand-in scores
        trainer.want_publish = True
        trainer.maybe_publish()
        assert slot.published == 0 and slot.header.rejected_worse == 1 and trainer.injected_worse
        # Only once: the next candidate is the real one.
        trainer.score = lambda model: 1.5
        trainer.want_publish = True
        trainer.maybe_publish()
        assert slot.published == 1
    finally:
        slot.close()


def test_queues_are_bounded_in_bytes():
    """The queue between every two stages: a slow or stuck consumer never grows it past its byte bound; the
    oldest items go first and are counted."""
    from sglang_ext.online.queues import ByteQueue

    q = ByteQueue(max_bytes=100)
    for i in range(10):
        q.put(bytes([i]) * 30)
    assert q.nbytes == 90 and len(q) == 3 and q.take_dropped() == 7 and q.take_dropped() == 0
    assert q.get() == bytes([7]) * 30                # oldest kept first
    q.put(b"x" * 500)                                # alone over the bound: kept, everything older dropped
    assert len(q) == 1 and q.nbytes == 500 and q.take_dropped() == 2
    q.put(b"y" * 10, front=True)                     # a record put back after a failed send is the oldest:
    assert q.get() == b"x" * 500 and q.take_dropped() == 1 and q.nbytes == 0     # past the bound it goes first
    assert q.get() is None and q.get(timeout=0.05) is None and q.dropped_total == 10
    sized = ByteQueue(max_bytes=10, size=lambda item: item["n"])   # any item, with its own size
    sized.put({"n": 6})
    sized.put({"n": 6})
    assert len(sized) == 1 and sized.nbytes == 6 and sized.take_dropped() == 1


def test_slow_trainer_inbox_is_bounded_and_counts_drops(tiny, draft_dir):
    """Records keep arriving while the training loop does not take them (a slow step): the trainer's inbox
    stays under its byte bound, the oldest are dropped and the drops reach the slot header (/metrics)."""
    import socket
    from multiprocessing.connection import Connection

    cfg = json.loads((draft_dir / "config.json").read_text())
    K = len(cfg["dflash_config"]["target_layer_ids"])
    records = _records(12, K * cfg["hidden_size"], cfg["vocab_size"])
    one = records[0].features.numel() * records[0].features.element_size()
    trainer, slot = _trainer(tiny, draft_dir, queue_bytes=3 * one)
    ours, theirs = socket.socketpair()
    sender = Connection(ours.detach())
    trainer.scheduler_gone = lambda: None           # (the process would exit when the scheduler goes)
    try:
        trainer.start_receiver(Connection(theirs.detach()))
        for r in records:
            sender.send_bytes(encode_record(r))
        deadline = time.monotonic() + 30
        while slot.header.inbox_dropped < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slot.header.inbox_dropped == 9 and len(trainer.inbox) == 3
        assert trainer.inbox.nbytes == slot.header.inbox_bytes == 3 * one
        trainer.drain()                               # the newest three reach the pool / held-out slice
        assert trainer.received == 3 and slot.header.inbox_bytes == 0
    finally:
        sender.close()
        slot.close()


def test_slot_in_the_serving_dtype(tiny, draft_dir):
    """A bf16 server gets a bf16 slot: half the bytes of fp32, versions rounded once when published, and the
    trainer's guard copy holds exactly what will be served."""
    layout = ws.draft_layout(draft_dir)
    assert ws.slot_bytes(layout, torch.bfloat16) - ws.HEADER_BYTES == (ws.slot_bytes(layout) - ws.HEADER_BYTES) // 2
    owner = ws.WeightSlot.create(layout, torch.bfloat16)
    try:
        with pytest.raises(ValueError, match="in float32"):          # a trainer told the wrong dtype
            ws.WeightSlot.attach(owner.fd, layout)
        trainer, _ = _trainer(tiny, draft_dir, slot=owner)
        assert trainer.slot.dtype == torch.bfloat16
        cfg = json.loads((draft_dir / "config.json").read_text())
        for r in _records(6, cfg["hidden_size"] * len(cfg["dflash_config"]["target_layer_ids"]), cfg["vocab_size"]):
            trainer.inbox.put(decode_record(encode_record(r)))
        trainer.drain()
        trainer.want_publish = True
        trainer.settings = dataclasses.replace(trainer.settings, guard_tolerance=1e9)   # publish whatever it is
        trainer.maybe_publish()
        assert owner.published == 1
        served = owner.read_state()
        fp32 = trainer.draft.state_dict()
        live = trainer.live.state_dict()
        for name, value in served.items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(value, fp32[name].to(torch.bfloat16))          # rounded once
            assert torch.equal(live[name], value.float())                     # the guard scores what is served
    finally:
        owner.close()


def test_trainer_memory_is_checked_at_startup(tiny, draft_dir):
    """The trainer's need comes from the checkpoints' shapes; a budget under it, or a budget (or need) over what
    is free on the device, fails the server at startup with the flags to change."""
    from sglang_ext.online.scheduler.placement import check_trainer_memory, device_free_bytes
    from sglang_ext.online.scheduler.placement import trainer_memory_need
    from trainer.target import target_info

    need = trainer_memory_need("dflash", str(draft_dir), str(tiny.dense_random), "cpu")
    trainable = ws.layout_numel(ws.draft_layout(draft_dir))
    info = target_info(tiny.dense_random)
    head = info.vocab_size * info.hidden_size * (1 if info.tie_word_embeddings else 2)
    assert need.trainable == 20 * trainable and need.fixed == 0 and need.target_head == 4 * head   # fp32 on CPU
    assert "AdamW" in need.describe()
    check_trainer_memory(need, "cpu", None, device_free_bytes("cpu"))        # fits this machine
    check_trainer_memory(need, "cpu", need.total, need.total)
    with pytest.raises(ValueError, match="over --online-train-max-memory.*raise --online-train-max-memory"):
        check_trainer_memory(need, "cpu", need.total - 1, None)
    with pytest.raises(ValueError, match="more than the .* free on cuda:0 .*--mem-fraction-static.*"
                                         "--online-train-device"):
        check_trainer_memory(need, "cuda:0", 2 * need.total, need.total)
    with pytest.raises(ValueError, match="the trainer's need, about .* is more than"):
        check_trainer_memory(need, "cpu", None, need.total - 1)


def test_trainer_killed_mid_publish_resumes_from_the_applied_version(tiny, draft_dir, tmp_path):
    """A trainer process is killed (-9) in the middle of writing version 2 into the slot: the scheduler never
    sees version 2, version 1 (applied) is intact, and a restarted trainer resumes from version 1's weights."""
    import signal
    import subprocess

    layout = ws.draft_layout(draft_dir)
    names = [n for n, _ in layout]
    owner = ws.WeightSlot.create(layout)
    try:
        v1 = {n: torch.randn(shape) for n, shape in layout}
        owner.publish(v1)
        owner.acknowledge(1)                             # the scheduler applied version 1
        writing = tmp_path / "writing"
        child = f"""
import json, time, torch
from sglang_ext.online.swap import weight_slot as ws
layout = [(n, tuple(s)) for n, s in json.loads({json.dumps(json.dumps(layout))})]
slot = ws.WeightSlot.attach({owner.fd}, layout)
class Stalls:                                            # the last weight never arrives: killed while writing
    def detach(self):
        open({str(writing)!r}, "w").close()
        time.sleep(600)
state = {{n: torch.full(s, 7.0) for n, s in layout}}
state[layout[-1][0]] = Stalls()
slot.publish(state)
"""
        proc = subprocess.Popen([sys.executable, "-c", child], pass_fds=[owner.fd])
        try:
            deadline = time.monotonic() + 120
            while not writing.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert writing.exists(), "the publishing process never reached its last weight"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert owner.published == owner.applied == 1             # nothing new to apply
        assert torch.all(owner._buffers[0][names[0]] == 7.0)     # the write was cut short in the other buffer
        assert all(torch.equal(owner.weights[n], v1[n]) for n in names)
        trainer, _ = _trainer(tiny, draft_dir, slot=owner)
        assert trainer.resumed_version == 1
        resumed = trainer.draft.state_dict()
        assert all(torch.equal(resumed[n], v1[n]) for n in names)
        assert trainer.slot.can_publish()                         # and it may publish version 2 afresh
    finally:
        owner.close()


def test_recency_replay_policy():
    """--online-train-replay-policy recency: a record half_life records older is drawn half as often; draws
    within a batch are distinct; uniform stays uniform."""
    import collections
    import random

    from sglang_ext.online.trainer.worker import sample_by_recency

    rng = random.Random(0)
    counts = collections.Counter()
    for _ in range(40000):
        counts.update(sample_by_recency(200, 1, 50.0, rng))
    newest, age50, age100 = counts[199], counts[149], counts[99]
    assert 1.7 < newest / age50 < 2.3 and 3.4 < newest / age100 < 4.6, (newest, age50, age100)
    batch = sample_by_recency(30, 12, 5.0, rng)
    assert len(set(batch)) == 12 and all(0 <= i < 30 for i in batch)
    assert sorted(sample_by_recency(8, 8, 1.0, rng)) == list(range(8))
    cfg = OnlineTrainConfig(enabled=True, replay_policy="recency", recency_half_life=32)
    assert (cfg.trainer_settings().replay_policy, cfg.trainer_settings().recency_half_life) == ("recency", 32.0)
