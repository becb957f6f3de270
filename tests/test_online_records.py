"""The online recorder and replay buffer without a server: rows -> records, gaps, drops, budget."""
import time
from types import SimpleNamespace

import pytest
import torch

from sglang_ext.online.recorder.buffer import ReplayBuffer
from sglang_ext.online.recorder.records import assemble_record
from sglang_ext.online.scheduler.capture import Capture
from sglang_ext.online.config import OnlineTrainConfig, OnlineTrainConfigError

F = 6   # feature width (K*H) in these tests


class FakeMetrics:
    def __init__(self):
        self.events = []
        self.live_version = 0                       # OnlineMetrics.live_version (the draft serving)

    def __getattr__(self, name):
        return lambda *a, **k: self.events.append((name, a))


class Finish:                                    # SGLang finish reasons are classes; the name is what we read
    pass


class FINISH_ABORT:
    pass


def fake_req(rid, prompt, output, finished=True, reason=Finish):
    return SimpleNamespace(rid=rid, origin_input_ids=list(prompt), output_ids=list(output), multimodal_inputs=None,
                           finished=lambda: finished, finished_reason=reason() if finished else None)


def rows(start, n):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, F)


def verify(starts, commits, stride=4):
    return {"starts": torch.tensor(starts), "commit_lens": torch.tensor(commits), "stride": stride}


def make_recorder(**cfg):
    sink = []
    return Capture(OnlineTrainConfig(enabled=True, **cfg), sink.append, FakeMetrics()), sink


def test_prefill_chunks_and_verify_rows_assemble_in_order():
    rec, sink = make_recorder()
    req = fake_req("r1", prompt=[10, 11, 12, 13, 14], output=[20, 21, 22, 23])
    # chunked prefill: 3 + 2 rows
    rec.observe(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[3]), rows(0, 3))
    rec.observe(SimpleNamespace(reqs=[req], prefix_lens=[3], extend_lens=[2]), rows(3, 2))
    # two verify steps, block 4: commit 2 then 3 rows (rows past the commit are never stored)
    for start, commit in ((5, 2), (7, 3)):
        block = torch.cat([rows(start, commit), torch.full((4 - commit, F), -1.0)])
        rec.observe(SimpleNamespace(reqs=[req]), block, starts=torch.tensor([start]),
                    commit_lens=torch.tensor([commit]), stride=4)
    rec.release(req)
    assert len(sink) == 1
    record = assemble_record(sink[0], include_prompt_loss=False)
    assert record.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22, 23]    # 9 tokens, 10 rows: capped
    assert torch.equal(record.features[:, 0], torch.arange(9, dtype=torch.float32))
    assert record.loss_mask.tolist() == [False] * 5 + [True] * 4
    assert record.meta["feature_gaps"] == []
    assert torch.equal(record.positions, torch.arange(9).expand(3, 9))


def test_radix_prefix_hit_is_a_gap_out_of_the_loss():
    rec, sink = make_recorder(include_prompt_loss=True)
    req = fake_req("r2", prompt=[1, 2, 3, 4, 5, 6], output=[7, 8])
    rec.observe(SimpleNamespace(reqs=[req], prefix_lens=[4], extend_lens=[2]), rows(4, 2))
    rec.observe(SimpleNamespace(reqs=[req]), rows(6, 4), starts=torch.tensor([6]),
                commit_lens=torch.tensor([2]), stride=4)
    rec.release(req)
    record = assemble_record(sink[0], include_prompt_loss=True)
    assert record.meta["feature_gaps"] == [[0, 4]]
    assert record.features[:4].abs().sum() == 0
    assert record.loss_mask.tolist() == [False] * 4 + [True] * 4


def test_prefix_store_fills_radix_hits_with_the_rows_first_recorded():
    """Turn 1 is recorded in full; turn 2 (turn 1's conversation + a new message) is served with a radix hit on
    turn 1's tokens: its gap is filled with turn 1's rows, exactly; past the last recorded row nothing is
    invented (it stays a gap), and the filled rows stay out of the loss (prompt)."""
    from sglang_ext.online.recorder.prefix_store import PrefixFeatureStore

    store = PrefixFeatureStore(budget_bytes=10**6, page=8)
    rec, sink = make_recorder()
    turn1 = fake_req("turn1", prompt=list(range(100, 120)), output=list(range(200, 210)))   # 30 tokens
    rec.observe(SimpleNamespace(reqs=[turn1], prefix_lens=[0], extend_lens=[20]), rows(0, 20) * 3)
    rec.observe(SimpleNamespace(reqs=[turn1]), rows(20, 12) * 3, starts=torch.tensor([20]),
                commit_lens=torch.tensor([9]), stride=12)      # rows 20..28: the last token has no features
    rec.release(turn1)
    first = assemble_record(sink[0], include_prompt_loss=False, store=store)
    assert first.meta["feature_gaps"] == [] and first.meta["prefix_filled_rows"] == 0 and len(first) == 29
    # turn 2: the radix cache served turn 1's 30 tokens (rows 0..28 were recorded, row 29 never was)
    prompt2 = list(range(100, 120)) + list(range(200, 210)) + [300, 301, 302]
    turn2 = fake_req("turn2", prompt=prompt2, output=[400, 401])
    rec.observe(SimpleNamespace(reqs=[turn2], prefix_lens=[30], extend_lens=[3]), rows(30, 3) * 5)
    rec.observe(SimpleNamespace(reqs=[turn2]), rows(33, 4) * 5, starts=torch.tensor([33]),
                commit_lens=torch.tensor([2]), stride=4)
    rec.release(turn2)
    second = assemble_record(sink[1], include_prompt_loss=False, store=store)
    assert second.meta["prefix_filled_rows"] == 29 and second.meta["feature_gaps"] == [[29, 30]]
    assert torch.equal(second.features[:29], first.features[:29])
    assert second.features[29].abs().sum() == 0 and torch.equal(second.features[30:], rows(30, 5) * 5)
    assert not second.loss_mask[:33].any()
    # a third request that shares only 12 tokens with turn 1: 12 rows filled, the rest of its hit stays a gap
    third = fake_req("other", prompt=list(range(100, 112)) + [999] * 10, output=[5])
    rec.observe(SimpleNamespace(reqs=[third], prefix_lens=[20], extend_lens=[2]), rows(20, 2))
    rec.release(third)
    record = assemble_record(sink[2], include_prompt_loss=False, store=store)
    assert record.meta["prefix_filled_rows"] == 12 and record.meta["feature_gaps"] == [[12, 20]]
    assert torch.equal(record.features[:12], first.features[:12])


def test_prefix_store_keys_and_budget():
    """Image tokens carry SGLang's per-image pad value, so another image never matches; the store keeps to
    its byte budget, least recently used pages first."""
    from sglang_ext.online.recorder.prefix_store import PrefixFeatureStore

    store = PrefixFeatureStore(budget_bytes=3 * 8 * F * 4, page=8)        # three pages of 8 fp32 rows
    feats = torch.randn(24, F)
    image_a = [7, 7] + [-(10**9 + 1)] * 14 + [8] * 8                      # pad values of image A
    store.add(image_a, feats, torch.ones(24, dtype=torch.bool))
    assert len(store) == 3 and store.nbytes == 24 * F * 4
    image_b = [7, 7] + [-(10**9 + 2)] * 14 + [8] * 8
    probe, covered = torch.zeros(24, F), torch.zeros(24, dtype=torch.bool)
    stats = store.fill(image_b, probe, covered)
    assert stats.filled == 2 and stats.left == 22                        # the 2 text tokens before the image
    assert torch.equal(probe[:2], feats[:2])
    # a fourth page evicts the least recently used one (page 0 was just used by the fill above)
    store.add(list(range(50, 58)), torch.randn(8, F), torch.ones(8, dtype=torch.bool))
    assert len(store) == 3 and store.nbytes <= store.budget_bytes
    probe, covered = torch.zeros(24, F), torch.zeros(24, dtype=torch.bool)
    stats = store.fill(image_a, probe, covered)         # page 1 was evicted: its rows stay a gap; pages 0 and 2
    assert stats.filled == 16 and stats.left == 8       # are found (a page's key is its prefix's tokens, not
    assert covered.tolist() == [True] * 8 + [False] * 8 + [True] * 8     # whether earlier pages are stored)
    assert torch.equal(probe[:8], feats[:8]) and torch.equal(probe[16:], feats[16:])


def test_aborted_too_long_retracted_and_health_checks():
    rec, sink = make_recorder(max_record_tokens=8)
    aborted = fake_req("a", [1, 2], [3], reason=FINISH_ABORT)
    long = fake_req("l", list(range(6)), [1, 2, 3])
    retracted = fake_req("t", [1, 2, 3], [4], finished=False)
    health = fake_req("HEALTH_CHECK_123", [1], [2])
    for req in (aborted, long, retracted, health):
        rec.observe(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[2]), rows(0, 2))
        rec.release(req)
    assert sink == []
    assert ("dropped", ("aborted",)) in rec.metrics.events and ("dropped", ("too_long",)) in rec.metrics.events
    assert "t" in rec.pending and "HEALTH_CHECK_123" not in rec.pending    # retracted: kept for recomputation
    # Late rows of a released request (overlap scheduling) do not start a new record.
    rec.observe(SimpleNamespace(reqs=[aborted], prefix_lens=[2], extend_lens=[1]), rows(2, 1))
    assert "a" not in rec.pending


def test_opted_out_requests_are_never_recorded():
    """custom_params {"online_train_opt_out": true}: no rows kept, nothing handed on, counted once."""
    rec, sink = make_recorder()
    out = fake_req("private", [1, 2], [3])
    out.sampling_params = SimpleNamespace(custom_params={"online_train_opt_out": True})
    kept = fake_req("kept", [1, 2], [3])
    kept.sampling_params = SimpleNamespace(custom_params={"online_train_opt_out": False, "other": 1})
    batch = SimpleNamespace(reqs=[out, kept], prefix_lens=[0, 0], extend_lens=[2, 2])
    rec.observe(batch, rows(0, 4))
    rec.observe(SimpleNamespace(reqs=[out, kept]), rows(2, 8), **verify([2, 2], [1, 1]))
    assert "private" not in rec.pending and "kept" in rec.pending
    for req in (out, kept):
        rec.release(req)
    assert [p.rid for p in sink] == ["kept"]
    assert rec.metrics.events.count(("dropped", ("opted_out",))) == 1


def test_capture_stops_as_soon_as_a_request_passes_the_limit():
    """A running request past max_record_tokens holds no rows (not only at finish): counted once, and its
    later rows are not recorded."""
    rec, sink = make_recorder(max_record_tokens=12)
    req = fake_req("long", list(range(6)), [], finished=False)
    rec.observe(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[6]), rows(0, 6))
    rec.observe(SimpleNamespace(reqs=[req]), rows(6, 4), **verify([6], [4]))      # up to 10 <= 12: kept
    assert "long" in rec.pending
    req.output_ids += [1, 2, 3, 4]
    rec.observe(SimpleNamespace(reqs=[req]), rows(10, 4), **verify([10], [2]))    # could reach 14 > 12: dropped
    assert "long" not in rec.pending
    rec.observe(SimpleNamespace(reqs=[req]), rows(12, 4), **verify([12], [1]))
    assert "long" not in rec.pending
    req.finished = lambda: True
    rec.release(req)
    assert sink == [] and rec.metrics.events.count(("dropped", ("too_long",))) == 1


class NoHostRead(torch.Tensor):
    """A tensor that fails the test on any read of its values by the host (what would sync with a GPU)."""
    BANNED = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__repr__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.BANNED:
            raise AssertionError(f"host read on the verify path: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs)


def test_verify_path_reads_nothing_from_the_device():
    """The capture of a verify step (features, start positions, commit lengths as device tensors would be)
    reads none of their values on the host: no .tolist(), .item(), bool(), .cpu(). Which rows were committed
    is read later, from the host copies, and the records come out right."""
    rec, sink = make_recorder()
    reqs = [fake_req(f"r{i}", [7] * 5, [], finished=False) for i in range(3)]
    batch = SimpleNamespace(reqs=reqs, prefix_lens=[0, 0, 0], extend_lens=[5, 5, 5])   # host lists in SGLang
    rec.observe(batch, torch.cat([rows(0, 5)] * 3))
    block = torch.cat([rows(5, 4), rows(5, 4), rows(5, 4)])
    rec.observe(batch, block.as_subclass(NoHostRead), starts=torch.tensor([5, 5, 5]).as_subclass(NoHostRead),
                commit_lens=torch.tensor([1, 4, 2]).as_subclass(NoHostRead), stride=4, max_accept=4)
    for i, r in enumerate(reqs):
        r.output_ids = [8] * 4
        r.finished, r.finished_reason = (lambda: True), Finish()
        rec.release(r)
    records = [assemble_record(p, include_prompt_loss=False) for p in sink]
    assert [len(r) for r in records] == [6, 9, 7]                     # prompt + committed rows
    assert torch.equal(records[1].features[:, 0], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8.0]))
    assert ("verified", ([1, 4, 2], 4)) in rec.metrics.events          # metered from the host copies


def test_sampling_and_learn_from_filters():
    from sglang.srt.multimodal.modality import Modality

    def req_with(rid, *modalities):
        r = fake_req(rid, [1, 2], [3])
        if modalities:                   # SGLang's MultimodalInputs, reduced to the items' modalities
            r.multimodal_inputs = SimpleNamespace(
                mm_items=[SimpleNamespace(modality=m, padding_values=lambda: []) for m in modalities],
                im_token_id=None, video_token_id=None)
        return r

    kinds = {"text": (), "image": (Modality.IMAGE,), "two-images": (Modality.IMAGE, Modality.IMAGE),
             "video": (Modality.VIDEO,), "image+video": (Modality.IMAGE, Modality.VIDEO), "audio": (Modality.AUDIO,)}
    recorded_by = {
        "all": set(kinds),
        "text": {"text"},
        "image": {"image", "two-images", "image+video"},
        "video": {"video", "image+video"},
        "multimodal": set(kinds) - {"text"},
    }
    for learn_from, want in recorded_by.items():
        rec, _ = make_recorder(learn_from=learn_from)
        for name, modalities in kinds.items():
            rec.observe(SimpleNamespace(reqs=[req_with(name, *modalities)], prefix_lens=[0], extend_lens=[2]),
                        rows(0, 2))
        assert set(rec.pending) == want, learn_from
    with pytest.raises(OnlineTrainConfigError, match="learn_from must be one of all, text, image, video, multimodal"):
        OnlineTrainConfig(enabled=True, learn_from="images").validate()

    # what the record's meta says about its inputs
    rec, sink = make_recorder()
    r = req_with("iv", Modality.VIDEO, Modality.IMAGE)
    rec.observe(SimpleNamespace(reqs=[r], prefix_lens=[0], extend_lens=[2]), rows(0, 2))
    rec.release(r)
    meta = assemble_record(sink[0], include_prompt_loss=False).meta
    assert meta["modalities"] == ["image", "video"] and meta["has_image"] is True

    rec, _ = make_recorder(sample_rate=0.5)
    kept = 0
    for i in range(200):
        r = fake_req(f"req-{i}", [1, 2], [3])
        rec.observe(SimpleNamespace(reqs=[r], prefix_lens=[0], extend_lens=[2]), rows(0, 2))
        kept += f"req-{i}" in rec.pending
    assert 60 < kept < 140


def test_replay_buffer_budget_and_persistence(tmp_path):
    from trainer.replay import ReplayReader, ReplaySpec
    from trainer.target import TargetIdentity

    spec = ReplaySpec(TargetIdentity("tiny", "0" * 16), (1, 2), 3, "bfloat16")
    cfg = OnlineTrainConfig(enabled=True, replay_budget_bytes=3 * 10 * F * 4, persist_dir=str(tmp_path / "replay"),
                            shard_seconds=0.05)
    metrics = FakeMetrics()
    buf = ReplayBuffer(cfg, spec, metrics, flush_interval_s=0.05)
    rec = Capture(cfg, buf.submit, metrics)
    for i in range(5):
        req = fake_req(f"r{i}", list(range(6)), [1, 2, 3, 4])
        rec.observe(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[10]), rows(0, 10))
        rec.release(req)
    deadline = time.monotonic() + 10
    while buf.stats.persisted < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert buf.stats.added == 5 and buf.stats.persisted == 5
    assert buf.stats.records == 3 and buf.stats.dropped == 2             # 3 records fit the budget
    assert buf.stats.bytes <= cfg.replay_budget_bytes
    assert [r.meta["rid"] for r, _ in buf.snapshot()] == ["r2", "r3", "r4"]   # oldest dropped first
    reader = ReplayReader(tmp_path / "replay")
    assert sorted(reader.read(i).meta["rid"] for i in range(len(reader))) == [f"r{i}" for i in range(5)]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in (tmp_path / "replay").glob("*.safetensors"))
