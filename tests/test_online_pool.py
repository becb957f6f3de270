"""The feature pool (sglang_ext/online/scheduler/pool.py): rows by KV slot, masked verify writes, shared rows."""
import pytest
import torch

from sglang_ext.online.config import OnlineTrainConfig, OnlineTrainConfigError
from sglang_ext.online.flags import parse_argv
from sglang_ext.online.scheduler.pool import FeaturePool, check_pool_memory, pool_rows


def features(*values):
    return torch.tensor(values, dtype=torch.float32)[:, None].repeat(1, 3)


def test_rows_come_back_by_slot_and_unwritten_slots_are_not_covered():
    pool = FeaturePool(16, 3, torch.float32, "cpu")
    pool.write(torch.tensor([3, 7, 9]), features(1, 2, 3))
    rows, covered = pool.gather(torch.tensor([7, 3, 4, 9]))
    assert covered.tolist() == [True, True, False, True]
    assert torch.equal(rows[[0, 1, 3]], features(2, 1, 3))


def test_a_verify_write_keeps_the_committed_rows_only_and_clears_the_others():
    """Uncommitted rows go to the scratch row; the tags of their slots are cleared, so a row an earlier token
    left in such a slot is never read as this position's."""
    pool = FeaturePool(16, 3, torch.float32, "cpu")
    pool.write(torch.tensor([5, 6, 7, 8]), features(-1, -1, -1, -1))         # an earlier request's tokens
    slots = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])                     # two requests, block of 4
    commit = torch.tensor([2, 4])
    committed = torch.arange(4) < commit[:, None]
    pool.write(slots, features(*range(8)), committed)
    rows, covered = pool.gather(slots.reshape(-1))
    assert covered.tolist() == [True, True, False, False, True, True, True, True]
    assert torch.equal(rows[covered], features(0, 1, 4, 5, 6, 7))
    assert pool.tags[[7, 8]].tolist() == [-1, -1]                             # slots 7, 8: no committed row
    assert torch.equal(pool.features[[7, 8]], features(-1, -1))                # the uncommitted rows went to scratch


def test_each_row_keeps_the_draft_version_that_wrote_its_kv():
    """What refresh.py reads: rows written under another version than the live one are stale; rows another slot
    took are gone (their draft KV cannot be re-projected)."""
    pool = FeaturePool(4, 3, torch.float32, "cpu")
    pool.write(torch.tensor([1, 2, 3]), features(10, 20, 30), version=0)
    pool.write(torch.tensor([3]), features(31), version=2)                     # slot 3 written again under v2
    pool.write(torch.tensor([6]), features(60), version=2)                     # slot 6 takes slot 2's row
    stale, gone = pool.stale(torch.tensor([1, 2, 3, 6]), live=2)
    assert stale.tolist() == [True, False, False, False]
    assert gone.tolist() == [False, True, False, False]
    pool.stamp(torch.tensor([1]), 2)                                           # refreshed: re-stamped
    assert not pool.stale(torch.tensor([1]), live=2)[0].any()


def test_a_smaller_pool_shares_rows_and_a_lost_row_is_not_covered():
    pool = FeaturePool(4, 3, torch.float32, "cpu")
    pool.write(torch.tensor([1, 2]), features(10, 20))
    pool.write(torch.tensor([5]), features(50))                                 # 5 % 4 == 1: slot 1's row
    rows, covered = pool.gather(torch.tensor([1, 2, 5]))
    assert covered.tolist() == [False, True, True]
    assert torch.equal(rows[1:], features(20, 50))


def test_the_pool_stores_in_its_dtype():
    pool = FeaturePool(8, 3, torch.bfloat16, "cpu")
    x = torch.randn(2, 3)
    pool.write(torch.tensor([1, 2]), x)
    rows, _ = pool.gather(torch.tensor([1, 2]))
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, x.to(torch.bfloat16))
    assert pool.nbytes == 9 * 3 * 2 + 9 * (8 + 4)              # rows, tags, versions


def test_size_flag_and_memory_check():
    assert parse_argv(["--online-train"]).feature_pool == "auto"
    assert parse_argv(["--online-train", "--online-train-feature-pool", "1MiB"]).feature_pool == "1MiB"
    with pytest.raises(OnlineTrainConfigError, match="--online-train-feature-pool: cannot parse size 'lots'"):
        parse_argv(["--online-train", "--online-train-feature-pool", "lots"])
    assert pool_rows("auto", kv_slots=1000, row_bytes=24) == 1000
    assert pool_rows("3600", kv_slots=1000, row_bytes=24) == 100       # 24 bytes of row + 8 of tag + 4 of version
    assert pool_rows("1GiB", kv_slots=1000, row_bytes=24) == 1000               # never more rows than slots
    with pytest.raises(OnlineTrainConfigError, match="less than one row"):
        pool_rows("16", kv_slots=1000, row_bytes=24)
    check_pool_memory(10**6, free=2 * 10**6, device="cuda:0", size="auto")
    check_pool_memory(10**6, free=None, device="cpu", size="auto")              # unknown: not checked
    with pytest.raises(OnlineTrainConfigError,
                       match=r"feature pool needs .* GiB on cuda:0 \(--online-train-feature-pool auto\), more than"):
        check_pool_memory(2 * 2**30, free=2**30, device="cuda:0", size="auto")
    with pytest.raises(OnlineTrainConfigError):
        OnlineTrainConfig(enabled=True, feature_pool="12 apples").validate()


def test_eagle3_refresh_reads_the_token_after_each_position_and_skips_multimodal_requests():
    """EAGLE3's draft KV at position p is of token p+1 (refresh.py): a request's prefix positions get the ids
    after them; a position whose next token is not on the host yet, and every position of a request with images
    or video, cannot be re-projected."""
    from array import array
    from types import SimpleNamespace

    from sglang_ext.online.scheduler.refresh import next_token_ids

    text = SimpleNamespace(origin_input_ids=[10, 11, 12, 13], output_ids=array("q", [14]), multimodal_inputs=None)
    image = SimpleNamespace(origin_input_ids=[20, 21, 22], output_ids=array("q"), multimodal_inputs=object())
    ids, known = next_token_ids([text, image], [5, 2])
    assert ids.tolist() == [11, 12, 13, 14, 0, 21, 22]
    assert known.tolist() == [True, True, True, True, False, False, False]
