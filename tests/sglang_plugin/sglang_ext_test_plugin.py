"""A test-only SGLang plugin, loaded by SGLang's own plugin mechanism in the servers the tests start.

It is "installed" only for a server whose environment puts tests/sglang_plugin on PYTHONPATH (see
tests/support/plugin.py): importlib.metadata then finds the dist-info beside this file and SGLang runs
`register()` in every process it starts. What it does is chosen by environment variables the test sets:

  SGLANG_EXT_TEST_DUMP_DIR=DIR       DFlash: after each feed of target features into the live draft, save them
                                     with the layer-0 keys the draft wrote into its KV cache for them (with or
                                     without --online-train); EAGLE3:
                                     save the input of the draft's fc (with positions) in every draft forward
                                     that reads target features. So a test can prove the recorded features are
                                     the ones the live draft consumed.
  SGLANG_EXT_TEST_TRAINER_FAULTS=..  run the online trainer as `sglang_ext_test_trainer` (a subclass of the
                                     production trainer with faults injected; see that module)
"""
from __future__ import annotations

import os
from pathlib import Path

DUMP_ENV = "SGLANG_EXT_TEST_DUMP_DIR"
FAULTS_ENV = "SGLANG_EXT_TEST_TRAINER_FAULTS"
_calls = [0]


def split_rows(batch, *, starts=None, commit_lens=None, stride: int | None = None):
    """[(req, start position, row slice)] for the target feature rows of one feed of the draft.

    Prefill (commit_lens None): the batch's extend tokens, request after request, starting at each prefix.
    Verify: `stride` rows per request, the first at position starts[i]; the committed ones (bonus + accepted,
    commit_lens[i] of them) are a prefix of the request's rows.
    """
    if commit_lens is None:
        out, offset = [], 0
        for req, prefix_len, extend_len in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            out.append((req, int(prefix_len), slice(offset, offset + extend_len)))
            offset += extend_len
        return out
    commit, starts = commit_lens.tolist(), starts.tolist()
    return [(req, starts[i], slice(i * stride, i * stride + commit[i]))
            for i, req in enumerate(batch.reqs[:len(commit)])]


# DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc (AFTER, so the draft's KV cache holds the keys).
def dump_draft_context(result, worker, *args, **kwargs):
    import torch

    from sglang_ext.online.scheduler.hooks import row_layout

    batch = getattr(worker, "_sglang_ext_batch", None)
    target_hidden, cache_loc = kwargs.get("target_hidden"), kwargs.get("cache_loc")
    if batch is None or target_hidden is None or not target_hidden.numel():
        return result
    k_cache = worker.draft_model_runner.token_to_kv_pool.get_key_buffer(0)
    parts = split_rows(batch, **row_layout(worker, kwargs))
    dump = {"rids": [req.rid for req, _, _ in parts], "starts": [start for _, start, _ in parts],
            "features": [target_hidden[rows].detach().float().cpu() for _, _, rows in parts],
            "draft_k_layer0": [k_cache[cache_loc[rows].long()].detach().float().cpu() for _, _, rows in parts]}
    _calls[0] += 1
    torch.save(dump, Path(os.environ[DUMP_ENV]) / f"call-{os.getpid()}-{_calls[0]:06d}.pt")
    return result


# srt/models/llama_eagle3.py `LlamaModel.forward(input_ids, positions, forward_batch, ...)` (BEFORE): the
# EAGLE3 draft's forward; in a draft extend, spec_info.hidden_states are the target features its fc reads.
def dump_eagle3_draft_input(model, input_ids, positions, forward_batch, *args, **kwargs):
    import torch

    hidden = getattr(forward_batch.spec_info, "hidden_states", None)
    if hidden is None or not hidden.numel() or hidden.shape[-1] == model.config.hidden_size:
        return None                       # a draft decode step: it reads its own hidden state
    _calls[0] += 1
    torch.save({"positions": positions.detach().cpu().clone(), "features": hidden.detach().float().cpu().clone()},
               Path(os.environ[DUMP_ENV]) / f"eagle3-{os.getpid()}-{_calls[0]:06d}.pt")
    return None


# sglang_ext.online.scheduler.handoff.Handoff.trainer_command (the scheduler process tells the recorder process how
# to start
# the trainer): start the fault-injecting trainer instead.
def faulty_trainer_command(original, self):
    argv = original(self)
    return [a if a != "sglang_ext.online.trainer.worker" else "sglang_ext_test_trainer" for a in argv]


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if os.environ.get(DUMP_ENV):
        HookRegistry.register("sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2."
                              "_append_target_hidden_to_draft_kv_by_loc", dump_draft_context, HookType.AFTER)
        from sglang_ext.online.config import OnlineTrainConfig
        if OnlineTrainConfig.from_env() is None:
            # Without --online-train nothing remembers the batch the DFlash dump maps rows by: do it here.
            from sglang_ext.online.scheduler.hooks import remember_batch
            HookRegistry.register("sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2.forward_batch_generation",
                                  remember_batch, HookType.AROUND)
        HookRegistry.register("sglang.srt.models.llama_eagle3.LlamaModel.forward", dump_eagle3_draft_input,
                              HookType.BEFORE)
    if os.environ.get(FAULTS_ENV):
        HookRegistry.register("sglang_ext.online.scheduler.handoff.Handoff.trainer_command", faulty_trainer_command,
                              HookType.AROUND)
