"""PyTorch versions of SGLang's EAGLE tree kernels (`kernels/ops/speculative/spec_tree.py`), which refuse an
out-of-tree platform. Line-for-line ports of the Triton kernels there (`sgl_build_tree_kernel_efficient_triton`,
`verify_tree_greedy_kernel_triton`), one request at a time on the host; tests/test_cpu_ops.py checks them
against those kernels under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch


def build_tree_kernel_efficient(parent_list: torch.Tensor, selected_index: torch.Tensor,
                                verified_seq_len: torch.Tensor, tree_mask: torch.Tensor, positions: torch.Tensor,
                                retrieve_index: torch.Tensor, retrieve_next_token: torch.Tensor,
                                retrieve_next_sibling: torch.Tensor, topk: int, depth: int, draft_token_num: int,
                                tree_mask_mode: int = 0) -> None:
    """Fill the verify tree of each request: retrieve_index / next_token / next_sibling links, the draft tokens'
    positions, and the tree attention mask (mode 0, FULL_MASK: rows of seq_len + n per draft token; mode 1,
    QLEN_ONLY: n x n per request). Writes in place, like the kernel."""
    if int(tree_mask_mode) not in (0, 1):
        raise NotImplementedError(f"tree mask mode {int(tree_mask_mode)} (bit packing) has no CPU version")
    n = draft_token_num
    bs = verified_seq_len.shape[0]
    seq_lens = [int(x) for x in verified_seq_len.tolist()]
    prefix = [sum(seq_lens[:b]) for b in range(bs)]
    parents = parent_list.reshape(bs, -1).tolist()
    selected = selected_index.reshape(bs, -1).tolist()
    mask = tree_mask.view(-1)
    pos, ri = positions.view(-1), retrieve_index.view(-1)
    rnt, rns = retrieve_next_token.view(-1), retrieve_next_sibling.view(-1)

    def find(row: list, value: int) -> int | None:
        for k in range(n - 1):
            if row[k] == value:
                return k
        return None

    for b in range(bs):
        seq_len, sel, par = seq_lens[b], selected[b], parents[b]
        pos[b * n] = seq_len
        for i in range(n - 1, 0, -1):
            ri[b * n + i] = b * n + i
            parent_tb_idx = sel[i - 1] // topk
            if parent_tb_idx == 0:
                parent_position = 0
            else:
                k = find(sel, par[parent_tb_idx])
                parent_position = None if k is None else k + 1
            if parent_position is not None:
                next_tok = int(rnt[b * n + parent_position])
                rnt[b * n + parent_position] = i
                if next_tok != -1:
                    rns[b * n + i] = next_tok
        ri[b * n] = b * n
        for x in range(n):
            if int(tree_mask_mode) == 0:
                tree_idx = n * n * b + prefix[b] * n + (seq_len + n) * x + seq_len + 1
            else:
                tree_idx = n * n * b + n * x + 1
            mask[tree_idx - 1] = True
            mask[tree_idx:tree_idx + n - 1] = False
            if x == 0:
                continue
            cur, position = x - 1, 0
            for _ in range(depth):
                position += 1
                mask[tree_idx + cur] = True
                parent_tb_idx = sel[cur] // topk
                if parent_tb_idx == 0:
                    break
                k = find(sel, par[parent_tb_idx])
                if k is None:
                    break
                cur = k
            pos[b * n + x] = position + seq_len


def verify_tree_greedy(predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
                       candidates: torch.Tensor, retrieve_index: torch.Tensor, retrieve_next_token: torch.Tensor,
                       retrieve_next_sibling: torch.Tensor, target_predict: torch.Tensor):
    """Greedy tree verification: follow the tree from the root, at each level accept the child (first in sibling
    order) whose token equals the target's prediction at the last accepted node. Writes in place."""
    bs, n = candidates.shape
    num_spec = accept_index.shape[1]
    cand, ri = candidates.tolist(), retrieve_index.tolist()
    rnt, rns = retrieve_next_token.tolist(), retrieve_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    pred = predicts.view(-1)
    for b in range(bs):
        last = ri[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_spec):
            cur = rnt[b][cur]
            token = target[last]
            while cur != -1 and cand[b][cur] != token:
                cur = rns[b][cur]
            if cur == -1:
                break
            pred[last] = token
            accepted += 1
            accept_index[b, accepted] = ri[b][cur]
            last = ri[b][cur]
        accept_token_num[b] = accepted
        pred[last] = target[last]
    return predicts, accept_index, accept_token_num


def tree_speculative_sampling_target_only(predicts: torch.Tensor, accept_index: torch.Tensor,
                                          accept_token_num: torch.Tensor, candidates: torch.Tensor,
                                          retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                                          retrive_next_sibling: torch.Tensor, uniform_samples: torch.Tensor,
                                          uniform_samples_for_final_sampling: torch.Tensor,
                                          target_probs: torch.Tensor, draft_probs: torch.Tensor,
                                          threshold_single: float = 1.0, threshold_acc: float = 1.0,
                                          deterministic: bool = True) -> None:
    """Sampled tree verification (`TreeSpeculativeSamplingTargetOnly`, jit/include/sgl_kernel/speculative/
    sampling.cuh). At each level the children of the last accepted node are tried in sibling order: with one
    coin per level, child c is accepted when coin < (the target mass of the children tried so far, c included)
    / threshold_acc (or its own mass >= threshold_single); a rejected child's target mass is moved into
    draft_probs. The token after the last accepted node is sampled from relu(target - draft) there (no draft
    mass at the bonus position), with its own coin: the output follows the target distribution. In place."""
    bs, n = candidates.shape
    num_spec = accept_index.shape[1]
    vocab = target_probs.shape[-1]
    q = target_probs.reshape(bs, n, vocab)
    p = draft_probs.reshape(bs, n, vocab)
    cand, ri = candidates.tolist(), retrive_index.tolist()
    rnt, rns = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    coins = uniform_samples.reshape(bs, n).tolist()
    final_coins = uniform_samples_for_final_sampling.reshape(-1).tolist()
    pred = predicts.view(-1)
    for b in range(bs):
        node, prob_acc, coin = 0, 0.0, coins[b][0]
        last = ri[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_spec):
            cur = rnt[b][cur]
            while cur != -1:
                token = cand[b][cur]
                single = float(q[b, node, token])
                prob_acc += single
                if single > 0 and (coin < prob_acc / threshold_acc or single >= threshold_single):
                    prob_acc, node, coin = 0.0, cur, coins[b][cur]
                    pred[last] = token
                    accepted += 1
                    accept_index[b, accepted] = ri[b][cur]
                    last = ri[b][cur]
                    break
                p[b, node, token] = q[b, node, token]
                cur = rns[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        residual = q[b, node].float()
        if accepted != num_spec - 1:                   # no draft mass at the bonus position
            residual = (residual - p[b, node].float()).clamp(min=0)
        u = final_coins[b] * float(residual.sum())
        above = (residual.cumsum(0) > u) & (residual > 0)
        if above.any():
            sampled = int(above.nonzero()[0])
        else:                                          # u at the very top: the last token with mass
            valid = (residual > 0).nonzero()
            sampled = int(valid[-1]) if valid.numel() else vocab - 1
        pred[last] = sampled
