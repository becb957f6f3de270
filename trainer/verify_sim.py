"""The offline verify simulator: one request through SGLang 0.5.23's greedy speculative loop, with a draft's
proposals (`simulate_chain`), scored as SGLang scores it (`PromptTau`). Each draft kind's `simulate_prompt`
(trainer/dflash_kind.py, trainer/eagle3_kind.py) proposes; the loop, the verify rule and the finish rule are here.
trainer.evaluate runs it over a prompt file (evaluate_offline) and compares it with a real server.

For DFlash (`trainer/dflash_kind.py`) that is `srt/speculative/dflash_worker_v2.py`
`DFlashWorkerV2.forward_batch_generation`:
  prefill     the target runs the prompt; its greedy token is the first output token and the first
              "bonus"; its features at positions 0..S-1 become the draft context
              (`_append_target_hidden_to_draft_kv_by_loc` with extend lens).
  each step   p = committed length (= batch.seq_lens; the bonus sits at position p, not yet in the KV).
              draft block = [bonus, MASK x (B-1)] at 1-D positions p..p+B-1, seeing the context features
              of positions < p; proposals = argmax(target lm_head(draft hidden)) for slots 1..B-1
              (`_greedy_sample_from_vocab_parallel_head` on draft_hidden[:, 1:]).
              The target verifies [bonus, d1..d_{B-1}] at positions p..p+B-1 (+ mRoPE delta);
              target_predict = argmax of its logits per slot.
              accept = number of leading i with d_i == target_predict[i-1]
              (`compute_dflash_correct_drafts_and_bonus`), commit = accept + 1, new bonus =
              target_predict[accept]; committed tokens = d_1..d_accept, new bonus (`_commit_accept`);
              the target features of the first `commit` verify rows join the context
              (`_append_target_hidden_to_draft_kv_by_loc` with commit lens).
  finish      SGLang appends the whole committed run to output_ids, then `Req.update_finish_state`
              (schedule_batch.py) finishes the request once len(output_ids) >= max_new_tokens (or on an
              EOS inside the run unless ignore_eos) and `output_ids_through_stop` truncates to
              finished_len. Every verify step counts (`req.spec_verify_ct += 1` in
              `BatchResultProcessor._resolve_spec_v2_tokens`), the last, partly used one included.
  tau         per request exactly SGLang's meta_info["spec_accept_length"]
              (`TokenizerManager` spec metrics) = completion_tokens / spec_verify_ct, where
              completion_tokens = len(output_ids_through_stop) INCLUDES the first token from prefill and
              is capped at max_new_tokens. (Not (completion_tokens - 1) / steps.) The per-step accept
              counts (untruncated) are SGLang's spec_correct_drafts_histogram.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.hf_target import HFTarget


@dataclass
class PromptTau:
    name: str                        # "file:line"
    completion_tokens: int           # SGLang's: output tokens incl. the prefill token, capped (max_new_tokens / EOS)
    verify_steps: int                # spec_verify_ct
    accept_histogram: list[int]      # [n] = verify steps that accepted n draft tokens (spec_correct_drafts_histogram)
    committed_per_step: list[int]    # accept + 1 per step; offline: in order; served: sorted (SGLang keeps counts only)
    output_ids: list[int]
    prompt_tokens: int = 0

    @property
    def accept_length(self) -> float | None:
        """meta_info["spec_accept_length"]: completion_tokens / verify steps (None without a verify step)."""
        return self.completion_tokens / self.verify_steps if self.verify_steps else None


def accept_histogram(accepts: list[int], block_size: int) -> list[int]:
    """[n] = verify steps that accepted n draft tokens (SGLang's spec_correct_drafts_histogram)."""
    hist = [0] * block_size
    for a in accepts:
        hist[a] += 1
    return hist


def finished_len(output: list[int], new: int, max_new_tokens: int, ignore_eos: bool, eos_ids: set[int]) -> int | None:
    """`Req.update_finish_state` after `new` tokens were appended: EOS in the new run (unless ignore_eos) or
    the length cap; returns finished_len (output_ids_through_stop length) or None while running."""
    if not ignore_eos:
        for i in range(len(output) - new, len(output)):
            if output[i] in eos_ids:
                return min(i + 1, max_new_tokens)
    if len(output) >= max_new_tokens:
        return max_new_tokens
    return None


@torch.no_grad()
def simulate_chain(target: HFTarget, feature_layers: list[int], text: str, images: list, propose, *,
                   block_size: int, max_new_tokens: int, ignore_eos: bool = True, context_features: str = "pre",
                   name: str = "") -> PromptTau:
    """One request through SGLang's greedy speculative loop with a chain of B - 1 proposals (see the module
    docstring): prefill; then per step `propose(context, committed, bonus)` -> B - 1 proposed target token ids,
    where context [p, F] holds the target features (layers `feature_layers`) of the committed positions 0..p-1,
    committed their token ids and bonus the target's token at p; the target verifies [bonus, proposals] at
    positions p..p+B-1; accept the leading proposals equal to its greedy predictions; commit accept + 1 tokens."""
    prompt = target.encode(text, images)
    cache = target.new_cache()
    out = target.forward(prompt.input_ids, prompt.positions, feature_layers, cache=cache, vision=prompt.vision,
                         mode=context_features)
    context = out.features                                            # [p, F], features of positions < p
    committed = prompt.input_ids.tolist()
    bonus = int(out.logits[-1].argmax())
    output = [bonus]
    done = finished_len(output, 1, max_new_tokens, ignore_eos, target.eos_token_ids)
    accepts = []
    while done is None:
        p = len(committed)                                            # committed length = the bonus's position
        proposals = list(propose(context, committed, bonus))
        if len(proposals) != block_size - 1:
            raise ValueError(f"propose returned {len(proposals)} tokens for block size {block_size}")
        candidates = torch.tensor([bonus] + proposals, device=target.device)      # [B] = bonus, d1 .. d_{B-1}
        verify = target.forward(candidates, target.continuation_positions(prompt, p, block_size), feature_layers,
                                cache=cache, mode=context_features)
        target_predict = verify.logits.argmax(-1)                      # [B]
        matches = (candidates[1:] == target_predict[:-1]).int()
        accept = int(matches.cumprod(0).sum())
        commit = accept + 1
        new_bonus = int(target_predict[accept])
        committed += [bonus] + proposals[:accept]
        output += proposals[:accept] + [new_bonus]
        bonus = new_bonus
        accepts.append(accept)
        context = torch.cat([context, verify.features[:commit]])
        target.crop_cache(cache, p + commit)
        done = finished_len(output, commit, max_new_tokens, ignore_eos, target.eos_token_ids)
    return PromptTau(name=name, completion_tokens=done, verify_steps=len(accepts),
                     accept_histogram=accept_histogram(accepts, block_size),
                     committed_per_step=[a + 1 for a in accepts], output_ids=output[:done], prompt_tokens=len(prompt))
