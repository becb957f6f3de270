"""`--online-train`: capture -> replay buffer -> trainer process -> hot swap, all in the scheduler process
(the trainer in a child process of it).

Every hook of the online path is registered here, in one place. The flag hooks are always on (they only add
flags to SGLang's parser); the capture hooks only in processes where --online-train was given (the launcher
passes the parsed settings to its children in $SGLANG_EXT_ONLINE_TRAIN).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger(__name__)
_state: dict = {}          # the scheduler process's Recorder / ReplayBuffer / OnlineMetrics


def state() -> dict:
    return _state


# srt/speculative/dflash_worker_v2.py `DFlashWorkerV2.__init__`: build the recorder, replay buffer and
# metrics when the DFLASH worker starts, so a bad persist directory fails the server at startup.
def init_online_capture(result, self, *args, **kwargs):
    from sglang_ext.online.buffer import STORAGE, ReplayBuffer
    from sglang_ext.online.capture import Recorder
    from sglang_ext.online.config import OnlineTrainConfig
    from sglang_ext.online.metrics import OnlineMetrics
    from trainer.replay import ReplaySpec
    from trainer.target import target_identity

    from trainer.dflash_draft import DraftConfig

    cfg = OnlineTrainConfig.from_env()
    draft_cfg = DraftConfig.from_json(self.server_args.speculative_draft_model_path)
    # The target captures its layers in layer order, so the feature columns follow the sorted ids.
    layer_ids = sorted(draft_cfg.target_layer_ids)
    hidden_size = int(draft_cfg.hidden_size)
    spec = ReplaySpec(target_identity(self.server_args.model_path), layer_ids, hidden_size,
                      STORAGE[cfg.storage_dtype])
    metrics = OnlineMetrics({"model_name": str(self.server_args.served_model_name or self.server_args.model_path)})
    buffer = ReplayBuffer(cfg, spec, metrics)
    _state.update(cfg=cfg, spec=spec, metrics=metrics, buffer=buffer,
                  recorder=Recorder(cfg, buffer.submit, metrics), block_size=int(self.block_size))
    logger.info("sglang_ext: online capture ready: layers %s, hidden %d, replay budget %d bytes, persist %s",
                layer_ids, hidden_size, cfg.replay_budget_bytes, cfg.persist_dir)
    if cfg.trainer:
        import atexit

        from sglang_ext.online.supervisor import TrainerSupervisor
        supervisor = TrainerSupervisor(cfg, self, metrics, target_path=self.server_args.model_path,
                                       draft_path=self.server_args.speculative_draft_model_path,
                                       block_size=int(self.block_size))
        buffer.on_record = supervisor.offer
        supervisor.start(lambda: [record for record, _ in buffer.snapshot()])
        atexit.register(supervisor.stop)
        _state["supervisor"] = supervisor


# srt/managers/scheduler.py `Scheduler.ingest_requests`: called at the top of every scheduler iteration, when
# no forward is running: the one point where the live draft's weights may change (hot swap).
def swap_between_iterations(scheduler, *args, **kwargs):
    supervisor = _state.get("supervisor")
    if supervisor is not None:
        try:
            supervisor.tick(scheduler)
        except Exception:                   # a failed swap must not take serving down
            logger.exception("sglang_ext: hot swap / trainer bookkeeping failed; serving goes on")
    return None


# `DFlashWorkerV2.forward_batch_generation`: remember the batch being run, so the capture below can map
# feature rows to requests.
def remember_batch(original, self, batch, *args, **kwargs):
    self._sglang_ext_batch = batch
    try:
        return original(self, batch, *args, **kwargs)
    finally:
        self._sglang_ext_batch = None


# `DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc`: the one place target features enter the live
# draft (prefill rows; committed rows of each verify step). Record exactly those tensors.
def capture_draft_context(original, self, *args, **kwargs):
    recorder = _state.get("recorder")
    batch = getattr(self, "_sglang_ext_batch", None)
    target_hidden = kwargs.get("target_hidden")
    if recorder is not None and batch is not None and target_hidden is not None and target_hidden.numel():
        try:
            recorder.observe(batch, target_hidden, **_row_layout(self, kwargs))
        except Exception:                   # capture must never take serving down
            logger.exception("sglang_ext: capture failed; serving continues")
    out = original(self, *args, **kwargs)
    if _DEBUG_DUMP_DIR and batch is not None and target_hidden is not None and target_hidden.numel():
        _debug_dump_draft_context(self, batch, kwargs)
    return out


# Test instrumentation, off unless $SGLANG_EXT_DEBUG_DUMP_DIR is set: after the draft consumed the features,
# save them with the layer-0 keys the draft wrote into its KV cache for them, so a test can check that the
# recorded features are the ones the live draft used.
_DEBUG_DUMP_DIR = os.environ.get("SGLANG_EXT_DEBUG_DUMP_DIR")
_debug_calls = [0]


def _row_layout(worker, kwargs) -> dict:
    """How the rows of one draft-context write map to requests (see capture.split_rows)."""
    if kwargs.get("commit_lens") is None:
        return {}
    return {"positions": kwargs["positions"], "commit_lens": kwargs["commit_lens"],
            "block_size": int(worker.block_size)}


def _debug_dump_draft_context(worker, batch, kwargs) -> None:
    import torch

    from sglang_ext.online.capture import split_rows
    target_hidden, cache_loc = kwargs["target_hidden"], kwargs["cache_loc"]
    k_cache = worker.draft_model_runner.token_to_kv_pool.get_key_buffer(0)
    parts = split_rows(batch, **_row_layout(worker, kwargs))
    dump = {"rids": [req.rid for req, _, _ in parts], "starts": [start for _, start, _ in parts],
            "features": [target_hidden[rows].detach().float().cpu() for _, _, rows in parts],
            "draft_k_layer0": [k_cache[cache_loc[rows].long()].detach().float().cpu() for _, _, rows in parts]}
    _debug_calls[0] += 1
    torch.save(dump, Path(_DEBUG_DUMP_DIR) / f"call-{os.getpid()}-{_debug_calls[0]:06d}.pt")


# srt/mem_cache/common.py `release_kv_cache`: called once a request finishes, is aborted or retracted.
def finish_request(original, req, *args, **kwargs):
    out = original(req, *args, **kwargs)
    recorder = _state.get("recorder")
    if recorder is not None:
        try:
            recorder.release(req)
        except Exception:
            logger.exception("sglang_ext: could not finish the record of request %s", getattr(req, "rid", "?"))
    return out


def register_online_hooks() -> None:
    from sglang_ext.online import flags
    from sglang_ext.online.capture import pre_deepstack_aux_hidden_states
    from sglang_ext.online.config import OnlineTrainConfig

    reg = HookRegistry.register
    reg("sglang.srt.server_args.ServerArgs.add_cli_args", flags.add_online_train_cli_args, HookType.AROUND)
    reg("sglang.srt.server_args.prepare_server_args", flags.prepare_server_args_with_online_train, HookType.AROUND)
    cfg = OnlineTrainConfig.from_env()
    if cfg is None or not cfg.enabled:
        return
    worker = "sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2"
    reg("sglang.srt.models.qwen3_vl.Qwen3LLMModel.forward", pre_deepstack_aux_hidden_states, HookType.AROUND)
    reg("sglang.srt.models.qwen3_vl_moe.Qwen3MoeLLMModel.forward", pre_deepstack_aux_hidden_states, HookType.AROUND)
    reg(f"{worker}.__init__", init_online_capture, HookType.AFTER)
    reg(f"{worker}.forward_batch_generation", remember_batch, HookType.AROUND)
    reg(f"{worker}._append_target_hidden_to_draft_kv_by_loc", capture_draft_context, HookType.AROUND)
    reg("sglang.srt.mem_cache.common.release_kv_cache", finish_request, HookType.AROUND)
    if cfg.trainer:
        reg("sglang.srt.managers.scheduler.Scheduler.ingest_requests", swap_between_iterations, HookType.BEFORE)
