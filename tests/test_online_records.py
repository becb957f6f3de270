"""The online capture and replay buffer without a server: pool rows -> records, gaps, drops, budget."""
import time
from types import SimpleNamespace

import pytest
import torch

from sglang_ext.online.config import OnlineTrainConfig, OnlineTrainConfigError
from sglang_ext.online.recorder.buffer import ReplayBuffer
from sglang_ext.online.recorder.records import assemble_record
from sglang_ext.online.scheduler.capture import Capture
from sglang_ext.online.scheduler.pool import FeaturePool

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


class Slots:
    """SGLang's slot bookkeeping as the capture reads it: a req_to_token row per request, KV slots handed out
    1, 2, 3, ... for the positions a forward computes; a radix hit maps a prefix to the slots another request
    computed (the radix cache keeps them)."""

    def __init__(self, requests=16, context=64):
        self.req_to_token = torch.zeros(requests, context, dtype=torch.int64)
        self.next_slot, self.next_row = 1, 0

    def admit(self, req, prefix_of=None, prefix_len=0):
        req.kv = SimpleNamespace(req_pool_idx=self.next_row)
        self.next_row += 1
        if prefix_of is not None:                   # a radix hit: the cached prefix's slots
            self.req_to_token[req.kv.req_pool_idx, :prefix_len] = \
                self.req_to_token[prefix_of.kv.req_pool_idx, :prefix_len]
        return req

    def alloc(self, req, start, n):
        slots = torch.arange(self.next_slot, self.next_slot + n)
        self.next_slot += n
        self.req_to_token[req.kv.req_pool_idx, start:start + n] = slots
        return slots

    def prefill(self, reqs, prefix_lens, extend_lens):
        """A prefill batch: each request's extend tokens at new slots (out_cache_loc, in request order)."""
        for r in reqs:
            if not hasattr(r, "kv"):
                self.admit(r)
        locs = [self.alloc(r, p, e) for r, p, e in zip(reqs, prefix_lens, extend_lens)]
        return SimpleNamespace(reqs=reqs, prefix_lens=list(prefix_lens), extend_lens=list(extend_lens),
                               out_cache_loc=torch.cat(locs))

    def verify(self, reqs, starts, stride=4):
        """A verify batch: `stride` new slots per request from its start position."""
        for r, start in zip(reqs, starts):
            self.alloc(r, start, stride)
        return SimpleNamespace(reqs=reqs, req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
                               req_pool_indices=torch.tensor([r.kv.req_pool_idx for r in reqs]))


def verify(starts, commits, stride=4):
    return {"starts": torch.tensor(starts), "commit_lens": torch.tensor(commits), "stride": stride}


def make_recorder(pool_rows=4096, **cfg):
    sink = []
    pool = FeaturePool(pool_rows, F, torch.float32, "cpu")
    return Capture(OnlineTrainConfig(enabled=True, **cfg), sink.append, FakeMetrics(), pool), sink, Slots()


def test_prefill_chunks_and_verify_rows_assemble_in_order():
    rec, sink, slots = make_recorder()
    req = fake_req("r1", prompt=[10, 11, 12, 13, 14], output=[20, 21, 22, 23])
    # chunked prefill: 3 + 2 rows
    rec.observe(slots.prefill([req], [0], [3]), rows(0, 3))
    rec.observe(slots.prefill([req], [3], [2]), rows(3, 2))
    # two verify steps, block 4: commit 2 then 3 rows (rows past the commit never reach the pool)
    for start, commit in ((5, 2), (7, 3)):
        block = torch.cat([rows(start, commit), torch.full((4 - commit, F), -1.0)])
        rec.observe(slots.verify([req], [start]), block, starts=torch.tensor([start]),
                    commit_lens=torch.tensor([commit]), stride=4)
    rec.release(req, slots.req_to_token)
    assert len(sink) == 1
    record = assemble_record(sink[0], include_prompt_loss=False)
    assert record.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22]    # 9 tokens, the last has no KV
    assert torch.equal(record.features[:, 0], torch.arange(8, dtype=torch.float32))
    assert record.loss_mask.tolist() == [False] * 5 + [True] * 3
    assert record.meta["feature_gaps"] == []
    assert torch.equal(record.positions, torch.arange(8).expand(3, 8))
    # prefill rows, then the committed rows of each verify step (metered from their host copies)
    assert [a for name, a in rec.metrics.events if name == "captured"] == [(n, n * F * 4) for n in (3, 2, 2, 3)]


def serve_a_radix_hit(rec, slots):
    """A request computes 6 prompt tokens (rows 0..5, x3) and finishes; a second one shares its first 4 tokens
    from the radix cache (req.cached_tokens = 4) and computes the rest (rows 4..). Returns the second."""
    first = fake_req("first", prompt=[1, 2, 3, 4, 5, 6], output=[7, 8])
    rec.observe(slots.prefill([first], [0], [6]), rows(0, 6) * 3)
    rec.observe(slots.verify([first], [6]), rows(6, 4) * 3, **verify([6], [1]))
    rec.release(first, slots.req_to_token)
    second = slots.admit(fake_req("second", prompt=[1, 2, 3, 4, 9, 9], output=[5, 6]), prefix_of=first,
                         prefix_len=4)
    second.cached_tokens = 4
    rec.observe(slots.prefill([second], [4], [2]), rows(4, 2))
    rec.observe(slots.verify([second], [6]), rows(6, 4), **verify([6], [1]))
    rec.release(second, slots.req_to_token)
    return second


def test_radix_prefix_hit_is_a_gap_out_of_the_loss():
    """A request served from the radix cache (its prefix not recomputed for it, req.cached_tokens) records the
    hit as a gap when it is not filled from the pool (Capture.fill_prefixes off) and the prefix store is off; the
    pool still holds the prefix's rows (written when another request computed it, its slots kept by the radix
    cache)."""
    rec, sink, slots = make_recorder(include_prompt_loss=True)
    second = serve_a_radix_hit(rec, slots)
    assert sink[1].start == 4 and sink[1].rows.shape[0] == 3            # the hit is not shipped
    record = assemble_record(sink[1], include_prompt_loss=True)
    assert record.meta["feature_gaps"] == [[0, 4]]
    assert record.features[:4].abs().sum() == 0 and torch.equal(record.features[4:], rows(4, 3))
    assert record.loss_mask.tolist() == [False] * 4 + [True] * 3
    in_pool, covered = rec.pool.gather(slots.req_to_token[second.kv.req_pool_idx, :4])
    assert covered.all() and torch.equal(in_pool, rows(0, 4) * 3)


def test_radix_prefix_hit_is_filled_from_the_pool():
    """Where the draft KV serving reads is of the live version (capture only, or the refresh on), a radix hit is
    filled from the pool: the rows written when the first request computed that prefix; counted as pool rows."""
    rec, sink, slots = make_recorder(include_prompt_loss=True)
    rec.fill_prefixes = True
    serve_a_radix_hit(rec, slots)
    assert sink[1].start == 0 and sink[1].cached == 4 and sink[1].rows.shape[0] == 7
    record = assemble_record(sink[1], include_prompt_loss=True)
    assert record.meta["feature_gaps"] == [] and record.meta["prefix_pool_rows"] == 4
    assert torch.equal(record.features[:4], rows(0, 4) * 3) and torch.equal(record.features[4:], rows(4, 3))
    assert record.loss_mask.tolist() == [True] * 7


def test_rows_the_pool_lost_are_gaps_out_of_the_loss():
    """A pool smaller than the KV cache shares rows between slots: a position whose row another slot took is a
    gap (zero features, out of the loss), never that slot's row; a position never written is a gap too."""
    rec, sink, slots = make_recorder(pool_rows=8, include_prompt_loss=True)
    req = fake_req("r2", prompt=[1, 2, 3, 4, 5, 6], output=[7, 8])
    slots.admit(req)
    slots.alloc(req, 0, 4)                          # a prefix whose features were never written
    rec.observe(slots.prefill([req], [4], [2]), rows(4, 2))
    rec.observe(slots.verify([req], [6]), rows(6, 4), **verify([6], [1]))
    other = fake_req("o", [1], [2], finished=False)
    rec.observe(slots.prefill([other], [0], [3]), rows(100, 3))   # slots 11..13: rows 3, 4, 5 of an 8-row pool
    rec.release(req, slots.req_to_token)
    record = assemble_record(sink[0], include_prompt_loss=True)
    # slots of positions 4, 5 are 5, 6 (rows 5, 6; row 5 now slot 13's); position 6 is slot 7 (row 7)
    assert record.meta["feature_gaps"] == [[0, 5]]
    assert record.features[:5].abs().sum() == 0 and torch.equal(record.features[5:], rows(5, 2))
    assert record.loss_mask.tolist() == [False] * 5 + [True] * 2


def test_prefix_store_fills_radix_hits_with_the_rows_first_recorded():
    """Turn 1 is recorded in full; turn 2 (turn 1's conversation + a new message) is served with a radix hit on
    turn 1's tokens: its gap is filled with turn 1's rows, exactly; past the last recorded row nothing is
    invented (it stays a gap), and the filled rows stay out of the loss (prompt)."""
    from sglang_ext.online.recorder.prefix_store import PrefixFeatureStore

    store = PrefixFeatureStore(budget_bytes=10**6, page=8)
    rec, sink, slots = make_recorder()
    turn1 = fake_req("turn1", prompt=list(range(100, 120)), output=list(range(200, 210)))   # 30 tokens
    rec.observe(slots.prefill([turn1], [0], [20]), rows(0, 20) * 3)
    rec.observe(slots.verify([turn1], [20], stride=12), rows(20, 12) * 3, **verify([20], [9], stride=12))
    rec.release(turn1, slots.req_to_token)                    # rows 20..28: the last token has no KV
    first = assemble_record(sink[0], include_prompt_loss=False, store=store)
    assert first.meta["feature_gaps"] == [] and first.meta["prefix_filled_rows"] == 0 and len(first) == 29
    # turn 2: the radix cache served turn 1's 30 tokens (rows 0..28 were recorded, row 29 never was)
    prompt2 = list(range(100, 120)) + list(range(200, 210)) + [300, 301, 302]
    turn2 = slots.admit(fake_req("turn2", prompt=prompt2, output=[400, 401, 402]), prefix_of=turn1, prefix_len=30)
    turn2.cached_tokens = 30
    rec.observe(slots.prefill([turn2], [30], [3]), rows(30, 3) * 5)
    rec.observe(slots.verify([turn2], [33]), rows(33, 4) * 5, **verify([33], [2]))
    rec.release(turn2, slots.req_to_token)
    second = assemble_record(sink[1], include_prompt_loss=False, store=store)
    assert second.meta["prefix_filled_rows"] == 29 and second.meta["feature_gaps"] == [[29, 30]]
    assert torch.equal(second.features[:29], first.features[:29])
    assert second.features[29].abs().sum() == 0 and torch.equal(second.features[30:], rows(30, 5) * 5)
    assert not second.loss_mask[:33].any()
    # a third request that shares only 12 tokens with turn 1: 12 rows filled, the rest of its hit stays a gap
    third = slots.admit(fake_req("other", prompt=list(range(100, 112)) + [999] * 10, output=[5, 6]),
                        prefix_of=turn1, prefix_len=20)
    third.cached_tokens = 20
    rec.observe(slots.prefill([third], [20], [2]), rows(20, 2))
    rec.release(third, slots.req_to_token)
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
    rec, sink, slots = make_recorder(max_record_tokens=8)
    aborted = fake_req("a", [1, 2], [3], reason=FINISH_ABORT)
    long = fake_req("l", list(range(6)), [1, 2, 3])
    retracted = fake_req("t", [1, 2, 3], [4], finished=False)
    health = fake_req("HEALTH_CHECK_123", [1], [2])
    for req in (aborted, long, retracted, health):
        rec.observe(slots.prefill([req], [0], [2]), rows(0, 2))
        rec.release(req, slots.req_to_token)
    assert sink == []
    assert rec.metrics.events.count(("dropped", ("aborted",))) == 1
    assert rec.metrics.events.count(("dropped", ("too_long",))) == 1
    # retracted: nothing kept for it (recomputed later, its rows are written again); finished, it is recorded
    rec.observe(slots.prefill([retracted], [2], [2]), rows(2, 2))
    retracted.finished, retracted.finished_reason = (lambda: True), Finish()
    rec.release(retracted, slots.req_to_token)
    assert [p.rid for p in sink] == ["t"] and torch.equal(assemble_record(sink[0], False).features, rows(0, 3))


def test_opted_out_requests_are_never_recorded():
    """custom_params {"online_train_opt_out": true}: nothing gathered, nothing handed on, counted once."""
    rec, sink, slots = make_recorder()
    out = fake_req("private", [1, 2], [3, 4])
    out.sampling_params = SimpleNamespace(custom_params={"online_train_opt_out": True})
    kept = fake_req("kept", [1, 2], [3, 4])
    kept.sampling_params = SimpleNamespace(custom_params={"online_train_opt_out": False, "other": 1})
    rec.observe(slots.prefill([out, kept], [0, 0], [2, 2]), rows(0, 4))
    rec.observe(slots.verify([out, kept], [2, 2]), rows(2, 8), **verify([2, 2], [1, 1]))
    for req in (out, kept):
        rec.release(req, slots.req_to_token)
    assert [p.rid for p in sink] == ["kept"]
    assert rec.metrics.events.count(("dropped", ("opted_out",))) == 1


def test_requests_past_the_limit_are_not_recorded():
    """A request longer than max_record_tokens is dropped at release (counted once), never truncated."""
    rec, sink, slots = make_recorder(max_record_tokens=12)
    req = fake_req("long", list(range(6)), [1], finished=False)
    rec.observe(slots.prefill([req], [0], [6]), rows(0, 6))
    for start, commit in ((6, 4), (10, 2), (12, 1)):
        rec.observe(slots.verify([req], [start]), rows(start, 4), **verify([start], [commit]))
        req.output_ids += [1] * commit
    req.finished, req.finished_reason = (lambda: True), Finish()
    rec.release(req, slots.req_to_token)
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
    """The capture of a verify step (features, start positions, commit lengths, the batch's req_to_token rows as
    device tensors would be) reads none of their values on the host: no .tolist(), .item(), bool(), .cpu(). The
    commit lengths are read later, from their host copy, and the records come out right."""
    rec, sink, slots = make_recorder()
    reqs = [fake_req(f"r{i}", [7] * 5, [8], finished=False) for i in range(3)]
    rec.observe(slots.prefill(reqs, [0, 0, 0], [5, 5, 5]), torch.cat([rows(0, 5)] * 3))
    batch = slots.verify(reqs, [5, 5, 5])
    batch.req_pool_indices = batch.req_pool_indices.as_subclass(NoHostRead)
    block = torch.cat([rows(5, 4), rows(5, 4), rows(5, 4)])
    rec.observe(batch, block.as_subclass(NoHostRead), starts=torch.tensor([5, 5, 5]).as_subclass(NoHostRead),
                commit_lens=torch.tensor([1, 4, 2]).as_subclass(NoHostRead), stride=4, max_accept=4)
    for r, commit in zip(reqs, (1, 4, 2)):
        r.output_ids += [8] * commit
        r.finished, r.finished_reason = (lambda: True), Finish()
        rec.release(r, slots.req_to_token)
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
        rec, sink, slots = make_recorder(learn_from=learn_from)
        for name, modalities in kinds.items():
            r = req_with(name, *modalities)
            rec.observe(slots.prefill([r], [0], [2]), rows(0, 2))
            rec.release(r, slots.req_to_token)
        assert {p.rid for p in sink} == want, learn_from
    with pytest.raises(OnlineTrainConfigError, match="learn_from must be one of all, text, image, video, multimodal"):
        OnlineTrainConfig(enabled=True, learn_from="images").validate()

    # what the record's meta says about its inputs
    rec, sink, slots = make_recorder()
    r = req_with("iv", Modality.VIDEO, Modality.IMAGE)
    rec.observe(slots.prefill([r], [0], [2]), rows(0, 2))
    rec.release(r, slots.req_to_token)
    meta = assemble_record(sink[0], include_prompt_loss=False).meta
    assert meta["modalities"] == ["image", "video"] and meta["has_image"] is True

    rec, sink, slots = make_recorder(sample_rate=0.5)
    slots.req_to_token = torch.zeros(200, 8, dtype=torch.int64)
    for i in range(200):
        r = fake_req(f"req-{i}", [1, 2], [3])
        rec.observe(slots.prefill([r], [0], [2]), rows(0, 2))
        rec.release(r, slots.req_to_token)
    assert 60 < len(sink) < 140


def test_replay_buffer_budget_and_persistence(tmp_path):
    from trainer.replay import ReplayReader, ReplaySpec
    from trainer.target import TargetIdentity

    spec = ReplaySpec(TargetIdentity("tiny", "0" * 16), (1, 2), 3, "bfloat16")
    cfg = OnlineTrainConfig(enabled=True, replay_budget_bytes=3 * 10 * F * 2, persist_dir=str(tmp_path / "replay"),
                            shard_seconds=0.05)
    metrics = FakeMetrics()
    buf = ReplayBuffer(cfg, spec, metrics, flush_interval_s=0.05)
    rec = Capture(cfg, buf.submit, metrics, FeaturePool(4096, F, torch.float32, "cpu"))
    slots = Slots()
    for i in range(5):
        req = fake_req(f"r{i}", list(range(6)), [1, 2, 3, 4, 5])
        rec.observe(slots.prefill([req], [0], [10]), rows(0, 10))
        rec.release(req, slots.req_to_token)
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


def test_a_finished_request_crosses_the_ring_unchanged():
    """The entry format between the scheduler and the recorder (finished.py): every field back as written."""
    from sglang_ext.online.finished import CapturedRequest, decode_finished, encode_finished

    sent = CapturedRequest("r-1", rows=torch.randn(5, F).to(torch.bfloat16),
                           covered=torch.tensor([True, True, False, True, True]), start=3,
                           token_ids=list(range(9)), key_ids=[-7] * 4 + list(range(4, 9)), prompt_len=6,
                           mrope_prompt=torch.arange(18).view(3, 6), mrope_delta=-2, modalities=("image",),
                           finish_reason="FINISH_LENGTH")
    buf = bytearray(1 << 16)
    assert encode_finished(sent, lambda n: memoryview(buf)[:n])
    got = decode_finished(buf)
    for name in ("rid", "start", "token_ids", "key_ids", "prompt_len", "mrope_delta", "modalities", "finish_reason"):
        assert getattr(got, name) == getattr(sent, name), name
    assert torch.equal(got.rows, sent.rows) and torch.equal(got.covered, sent.covered)
    assert torch.equal(got.mrope_prompt, sent.mrope_prompt)
    assert not encode_finished(sent, lambda n: None)                    # does not fit: nothing written
