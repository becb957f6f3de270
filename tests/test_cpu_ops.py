"""The torch replacements of SGLang's Triton index and EAGLE tree kernels, against plain loops and against SGLang's
own Triton kernels."""
import os

import pytest
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


# ---- EAGLE: the torch ports against SGLang's own Triton kernels (run by Triton's interpreter without a GPU) ----

def _random_tree_inputs(gen, bs, topk, depth, n):
    parent_cols = topk * (depth - 1) + 1
    selected = torch.stack([torch.randperm(topk * parent_cols, generator=gen)[:n - 1].sort().values
                            for _ in range(bs)])
    parents = torch.randint(-1, topk * parent_cols, (bs, parent_cols), generator=gen)
    seq_lens = torch.randint(1, 9, (bs,), generator=gen)
    return parents, selected, seq_lens


def _tree_outputs(seq_lens, n, mode):
    bs = seq_lens.shape[0]
    mask_len = int((seq_lens + n).sum()) * n if mode == 0 else bs * n * n
    return (torch.ones(mask_len, dtype=torch.bool), torch.zeros(bs * n, dtype=torch.int64),
            torch.full((bs, n), -1, dtype=torch.int64), torch.full((bs, n), -1, dtype=torch.int64),
            torch.full((bs, n), -1, dtype=torch.int64))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the reference Triton kernels need a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)")
@pytest.mark.parametrize("topk,depth,n,mode", [(1, 3, 4, 0), (2, 3, 6, 0), (4, 4, 8, 1), (2, 2, 4, 1)])
def test_eagle_tree_build_and_greedy_verify_match_triton(topk, depth, n, mode):
    from sglang.kernels.ops.speculative.spec_tree import sgl_build_tree_kernel_triton, verify_tree_greedy_triton

    from sglang_ext.cpu.spec_tree import build_tree_kernel_efficient, verify_tree_greedy

    gen = torch.Generator().manual_seed(topk * 100 + n)
    for _ in range(6):
        bs = int(torch.randint(1, 4, (1,), generator=gen))
        parents, selected, seq_lens = _random_tree_inputs(gen, bs, topk, depth, n)
        ours, theirs = _tree_outputs(seq_lens, n, mode), _tree_outputs(seq_lens, n, mode)
        build_tree_kernel_efficient(parents, selected, seq_lens, *ours, topk, depth, n, mode)
        sgl_build_tree_kernel_triton(parents, selected, seq_lens, *theirs, topk, depth, n, mode)
        for name, a, b in zip(("tree_mask", "positions", "retrieve_index", "next_token", "next_sibling"),
                              ours, theirs):
            assert torch.equal(a, b), name
        _, _, retrieve_index, next_token, next_sibling = ours
        # Greedy verification over that tree: draft tokens that often equal the target's predictions.
        target = torch.randint(0, 5, (bs, n), generator=gen)
        candidates = torch.where(torch.rand(bs, n, generator=gen) < 0.6, target.roll(1, dims=1),
                                 torch.randint(0, 5, (bs, n), generator=gen))
        results = []
        for fn in (verify_tree_greedy, verify_tree_greedy_triton):
            predicts = torch.full((bs * n,), -7, dtype=torch.int64)
            accept_index = torch.full((bs, depth + 1), -1, dtype=torch.int64)
            accept_num = torch.zeros(bs, dtype=torch.int64)
            fn(predicts, accept_index, accept_num, candidates, retrieve_index, next_token, next_sibling, target)
            results.append((predicts, accept_index, accept_num))
        for name, a, b in zip(("predicts", "accept_index", "accept_token_num"), *results):
            assert torch.equal(a, b), name


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the reference Triton kernels need a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)")
def test_eagle_index_kernels_match_triton():
    from sglang.kernels.ops.speculative.cache_locs import assign_draft_cache_locs_contiguous as draft_locs_kernel
    from sglang.kernels.ops.speculative.eagle import fill_accept_out_cache_loc as accept_loc_kernel
    from sglang.kernels.ops.speculative.eagle import fill_bonus_tokens as bonus_kernel

    from sglang_ext.cpu.ops import assign_draft_cache_locs_contiguous, fill_accept_out_cache_loc, fill_bonus_tokens

    gen = torch.Generator().manual_seed(0)
    req_to_token = torch.randint(0, 10_000, (6, 64), generator=gen, dtype=torch.int32)
    req_pool_indices = torch.tensor([4, 1, 5], dtype=torch.int64)
    seq_lens = torch.tensor([3, 17, 40], dtype=torch.int64)
    topk, steps, bs = 2, 3, 3
    ours, theirs = torch.zeros(bs * topk * steps, dtype=torch.int64), torch.zeros(bs * topk * steps, dtype=torch.int64)
    pos_ours, pos_theirs = torch.zeros(bs * topk, dtype=torch.int64), torch.zeros(bs * topk, dtype=torch.int64)
    mrope_ours, mrope_theirs = torch.zeros(3, bs * topk, dtype=torch.int64), torch.zeros(3, bs * topk, dtype=torch.int64)
    assign_draft_cache_locs_contiguous(req_pool_indices, req_to_token, seq_lens, ours, topk, steps, pos_ours, mrope_ours)
    draft_locs_kernel[(bs,)](req_pool_indices, req_to_token, seq_lens, theirs, req_to_token.shape[1], topk, steps,
                             positions=pos_theirs, mrope=mrope_theirs, BS=bs, WRITE_POSITIONS=True, WRITE_MROPE=True)
    assert torch.equal(ours, theirs) and torch.equal(pos_ours, pos_theirs) and torch.equal(mrope_ours, mrope_theirs)

    accept_tokens = torch.randint(0, 500, (bs, 4), generator=gen)
    accept_lens = torch.tensor([1, 4, 2], dtype=torch.int32)
    b_ours, b_theirs = torch.zeros(bs, dtype=torch.int64), torch.zeros(bs, dtype=torch.int64)
    fill_bonus_tokens(accept_tokens, accept_lens, b_ours, 4, bs)
    bonus_kernel[(bs,)](accept_tokens, accept_lens, b_theirs, 4)
    assert torch.equal(b_ours, b_theirs)

    accept_index = torch.tensor([0, 2, -1, -1, 4, 5, 7, -1, 8, -1, -1, -1], dtype=torch.int64)
    out_cache_loc = torch.randint(0, 10_000, (12,), generator=gen)
    a_ours, a_theirs = torch.full((12,), -1, dtype=torch.int64), torch.full((12,), -1, dtype=torch.int64)
    fill_accept_out_cache_loc(accept_index, out_cache_loc, a_ours, 12)
    accept_loc_kernel[(12,)](accept_index, out_cache_loc, a_theirs, 16)
    assert torch.equal(a_ours, a_theirs)


def test_tree_speculative_sampling_follows_the_target_distribution():
    """Sampled tree verification (torch port): over many coins, the first token equals a draw from the target's
    distribution at the root whatever the two proposed children are, and the token after an accepted child is a
    draw from the target's distribution there (chi-square on a 6-token vocabulary)."""
    from scipy.stats import chisquare

    from sglang_ext.cpu.spec_tree import tree_speculative_sampling_target_only

    V, trials = 6, 6000
    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(1, 3, V, generator=gen) * 1.5, dim=-1)        # root, child 1, child 2
    candidates = torch.tensor([[0, 2, 4]])                                        # bonus, children tokens 2 and 4
    retrieve_index = torch.tensor([[0, 1, 2]])
    next_token, next_sibling = torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]])
    first, after_child1 = torch.zeros(V), torch.zeros(V)
    coins = torch.rand(trials, 3, generator=gen)
    final = torch.rand(trials, generator=gen)
    for t in range(trials):
        predicts = torch.full((3,), -1, dtype=torch.int64)
        accept_index = torch.full((1, 2), -1, dtype=torch.int64)
        accepted = torch.zeros(1, dtype=torch.int64)
        tree_speculative_sampling_target_only(predicts, accept_index, accepted, candidates, retrieve_index,
                                              next_token, next_sibling, coins[t:t + 1], final[t:t + 1], q.clone(),
                                              torch.zeros_like(q))
        first[predicts[0]] += 1
        if int(accepted) == 1 and int(accept_index[0, 1]) == 1:
            after_child1[predicts[1]] += 1
    assert chisquare(first, q[0, 0] * trials).pvalue > 1e-3, (first / trials, q[0, 0])
    n1 = after_child1.sum()
    assert n1 > 200 and abs(float(n1) / trials - float(q[0, 0, 2])) < 0.03     # child 1 taken at its target mass
    assert chisquare(after_child1, q[0, 1] * n1).pvalue > 1e-3, (after_child1 / n1, q[0, 1])
