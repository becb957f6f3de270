"""The torch replacements of SGLang's Triton index kernels, against plain loops."""
import torch

from sglang_ext.cpu.ops import assign_req_to_token_pool, speculative_cache_locs


def test_speculative_cache_locs_gathers_rows():
    req_to_token = torch.arange(5 * 20, dtype=torch.int32).reshape(5, 20)
    req_pool_indices = torch.tensor([3, 0, 4])
    start = torch.tensor([2, 7, 0])
    out = speculative_cache_locs(req_pool_indices=req_pool_indices, req_to_token=req_to_token, start_offset=start,
                                 end_offset=start + 4, batch_size=3, draft_token_num=4, device="cpu")
    want = [int(req_to_token[r, s + i]) for r, s in zip([3, 0, 4], [2, 7, 0]) for i in range(4)]
    assert out.dtype == torch.int64 and out.tolist() == want


def test_assign_req_to_token_pool_writes_runs():
    req_to_token = torch.zeros(4, 16, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0])
    start, end = torch.tensor([3, 0]), torch.tensor([6, 2])
    out_cache_loc = torch.tensor([100, 101, 102, 200, 201])
    assign_req_to_token_pool(req_pool_indices, req_to_token, start, end, out_cache_loc, 2)
    assert req_to_token[2, 3:6].tolist() == [100, 101, 102]
    assert req_to_token[0, 0:2].tolist() == [200, 201]
    assert int(req_to_token.sum()) == 100 + 101 + 102 + 200 + 201
