"""Every SGLang hook of `--online-train`, registered in one place (`register_online_hooks`).

The flag hooks are always on (they only add our flags to SGLang's parser and read them back); the others only
in processes where --online-train was given (the launcher passes the parsed settings to its children in
$SGLANG_EXT_ONLINE_TRAIN). Which worker class and feed method they hook comes from the served draft's kind
(`trainer.draft_kind.ServingFacts`). Between the hooks and the pipeline's objects there is one typed handle,
`_pipeline` (sglang_ext/online/scheduler/pipeline.py builds it). The pre-deepstack target features --online-train feeds
its draft come from sglang_ext/hooks.py (`register_general_hooks`), which also feeds them to a draft whose
config.json is marked so without the flag.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_ext.online.config import (
    ENV_VAR,
    OnlineTrainConfig,
    OnlineTrainConfigError,
    check_device_indexes,
    check_server_args,
)
from sglang_ext.online.flags import add_arguments, argv_with_sglang_config, parse_argv
from sglang_ext.online.hub import resolve_draft_kind

logger = logging.getLogger(__name__)
_pipeline = None            # sglang_ext.online.scheduler.pipeline.OnlinePipeline of this scheduler process, once built


def pipeline():
    """The OnlinePipeline of this process (None before the speculative worker started, or without the flag)."""
    return _pipeline


# ---- flags (always on) -------------------------------------------------------------------------------------

# srt/server_args.py `ServerArgs.add_cli_args`: add our argument group to SGLang's parser, so
# `python -m sglang.launch_server --help` lists it and argparse (and `--config` files) accept our flags.
def add_online_train_cli_args(original, parser, *args, **kwargs):
    out = original(parser, *args, **kwargs)
    if not any(a.dest == "online_train" for a in parser._actions):
        add_arguments(parser)
    return out


# srt/server_args.py `prepare_server_args`: `ServerArgs.from_cli_args` drops fields it does not declare, so
# read our flags back from argv (with the keys of SGLang's `--config` YAML merged in as SGLang merges them),
# validate them (types, values, trainer devices present), then against the parsed server args and the draft's
# kind (fail fast at startup), and hand them to the scheduler processes through the environment (and as a
# private attribute).
def prepare_server_args_with_online_train(original, argv, *args, **kwargs):
    try:
        cfg = parse_argv(argv_with_sglang_config(list(argv)))
        if cfg is not None:
            check_device_indexes(cfg)
    except OnlineTrainConfigError as e:
        sys.stderr.write(f"sglang serve: error: {e}\n")
        raise SystemExit(2) from None
    server_args = original(argv, *args, **kwargs)
    if cfg is None:
        os.environ.pop(ENV_VAR, None)
        return server_args
    try:
        check_server_args(cfg, server_args)
        cfg.draft_kind = resolve_draft_kind(server_args)
    except OnlineTrainConfigError as e:
        sys.stderr.write(f"sglang serve: error: {e}\n")
        raise SystemExit(2) from None
    os.environ[ENV_VAR] = cfg.to_env()
    server_args._online_train = cfg.to_env()
    server_args.enable_metrics = True          # our metrics live on SGLang's /metrics
    logger.info("sglang_ext: online training enabled: %s", cfg)
    return server_args


# ---- capture ----------------------------------------------------------------------------------------------

# The draft's features are pre-deepstack whenever --online-train is on: sglang_ext/hooks.py
# `pre_deepstack_aux_hidden_states`, registered by `register_general_hooks` (also for a draft marked so).

# <worker>.__init__ (DFlash: srt/speculative/dflash_worker_v2.py `DFlashWorkerV2.__init__`; EAGLE3:
# eagle_worker_v2.py `EAGLEWorkerV2.__init__`): build the online
# pipeline when the speculative worker starts, so a bad persist directory or draft fails the server at startup.
def start_online_pipeline(result, self, *args, **kwargs):
    global _pipeline
    from sglang_ext.online.scheduler.pipeline import start_pipeline
    _pipeline = start_pipeline(OnlineTrainConfig.from_env(), self, self.server_args)


# srt/managers/scheduler.py `Scheduler.init_memory_pools`: SGLang has allocated its KV pools (after the workers
# started, before CUDA graphs and serving): the feature pool beside them. One that cannot fit fails the server here.
def attach_feature_pool(result, self, *args, **kwargs):
    if _pipeline is not None:
        _pipeline.attach_feature_pool(self)


# <worker>.forward_batch_generation: remember the batch being run, so a capture whose feed method is not given
# the batch (DFlash's) can map feature rows to requests; and, before SGLang runs it, bring the draft KV of its
# contexts to the live draft version (after a hot swap; scheduler/refresh.py).
def remember_batch(original, self, batch, *args, **kwargs):
    refresh = _pipeline.refresh if _pipeline is not None else None
    if refresh is not None:
        t0 = time.perf_counter()
        try:
            refresh.before_forward(self, batch)
        except Exception:                   # serving goes on (with the older version's draft KV)
            logger.exception("sglang_ext: draft KV refresh failed; serving continues")
        _pipeline.clock.seconds += time.perf_counter() - t0
    self._sglang_ext_batch = batch
    try:
        return original(self, batch, *args, **kwargs)
    finally:
        self._sglang_ext_batch = None


def row_layout(worker, kwargs) -> dict:
    """How the rows of one DFlash feed call map to requests (Capture.observe's layout): prefill rows follow
    the batch's extend lengths; verify rows come in blocks of block_size, a committed prefix each."""
    if kwargs.get("commit_lens") is None:
        return {}
    block_size = int(worker.block_size)
    return {"starts": kwargs["positions"].view(-1, block_size)[:, 0], "commit_lens": kwargs["commit_lens"],
            "stride": block_size}


def _observe(batch, target_hidden, **layout) -> None:
    if _pipeline is None or _pipeline.capture is None or batch is None or target_hidden is None \
            or not target_hidden.numel():
        return
    t0 = time.perf_counter()
    try:
        _pipeline.capture.observe(batch, target_hidden, **layout)
    except Exception:                       # capture must never take serving down
        logger.exception("sglang_ext: capture failed; serving continues")
    _pipeline.clock.seconds += time.perf_counter() - t0


# DFlash: srt/speculative/dflash_worker_v2.py `DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc`: the one
# place target features enter the live draft (prefill rows; committed rows of each verify step). Record them.
def capture_dflash_context(original, self, *args, **kwargs):
    if _pipeline is not None and _pipeline.refresh is not None and _pipeline.refresh.active:
        return original(self, *args, **kwargs)          # a refresh re-projecting stale KV: not new features
    _observe(getattr(self, "_sglang_ext_batch", None), kwargs.get("target_hidden"), **row_layout(self, kwargs))
    return original(self, *args, **kwargs)


# EAGLE3: srt/speculative/eagle_worker_v2.py `EagleDraftWorker._draft_extend_for_prefill(batch,
# target_hidden_states, ...)`: a prefill's aux features enter the draft here (its draft extend). Record them
# before the call rotates the batch's input ids.
def capture_eagle_prefill(original, self, batch, target_hidden_states, *args, **kwargs):
    _observe(batch, target_hidden_states)
    return original(self, batch, target_hidden_states, *args, **kwargs)


# EAGLE3: `EagleDraftWorker._draft_extend_for_decode(batch, batch_result)`: after each verify, the verify rows'
# aux features enter the draft here. Per request they are num_draft_tokens rows from position seq_len (SGLang's
# v2 convention: batch.seq_lens excludes this step's tokens), and the committed path (bonus + accepted, accept_lens
# of them) is their prefix (`run_eagle_verify` compacts a tree's accepted path to the front).
def capture_eagle_decode(original, self, batch, batch_result, *args, **kwargs):
    logits_output = getattr(batch_result, "logits_output", None)
    if batch_result is not None and batch_result.accept_lens is not None and logits_output is not None:
        _observe(batch, logits_output.hidden_states, starts=batch.seq_lens, commit_lens=batch_result.accept_lens,
                 stride=int(self.speculative_num_draft_tokens), max_accept=int(self.speculative_num_steps) + 1)
    return original(self, batch, batch_result, *args, **kwargs)


# the capture hook of each feed method a draft kind names (`ServingFacts.capture`)
CAPTURE_HOOKS = {
    "_append_target_hidden_to_draft_kv_by_loc": capture_dflash_context,
    "_draft_extend_for_prefill": capture_eagle_prefill,
    "_draft_extend_for_decode": capture_eagle_decode,
}


# srt/mem_cache/common.py `release_kv_cache(req, tree_cache, *, checkpoint)`: called once a request finishes, is
# aborted or retracted. Before SGLang frees the request's slots, its rows are gathered from the feature pool.
def finish_request(original, req, *args, **kwargs):
    if _pipeline is not None and _pipeline.capture is not None:
        t0 = time.perf_counter()
        try:
            tree_cache = args[0] if args else kwargs["tree_cache"]
            _pipeline.capture.release(req, tree_cache.req_to_token_pool.req_to_token)
        except Exception:
            logger.exception("sglang_ext: could not finish the record of request %s", getattr(req, "rid", "?"))
        _pipeline.clock.seconds += time.perf_counter() - t0
    return original(req, *args, **kwargs)


# ---- between iterations: hot swap, metrics -------------------------------------------------------------------

# srt/managers/scheduler.py `Scheduler.ingest_requests`: called at the top of every scheduler iteration, when
# no forward is running (on every TP rank, in step): the one point where the live draft's weights may change.
def between_iterations(scheduler, *args, **kwargs):
    if _pipeline is not None:
        t0 = time.perf_counter()
        _pipeline.clock.iterations += 1
        try:
            _pipeline.tick(scheduler)
        except Exception:                   # a failed swap must not take serving down
            logger.exception("sglang_ext: hot swap / trainer bookkeeping failed; serving goes on")
        _pipeline.clock.seconds += time.perf_counter() - t0
    return None


# ---- registration -----------------------------------------------------------------------------------------

def register_online_hooks() -> None:
    from trainer.draft_kind import get_kind

    reg = HookRegistry.register
    reg("sglang.srt.server_args.ServerArgs.add_cli_args", add_online_train_cli_args, HookType.AROUND)
    reg("sglang.srt.server_args.prepare_server_args", prepare_server_args_with_online_train, HookType.AROUND)
    cfg = OnlineTrainConfig.from_env()
    if cfg is None or not cfg.enabled:
        return
    serving = get_kind(cfg.draft_kind or "dflash").serving
    worker = serving.worker_class
    reg(f"{worker}.__init__", start_online_pipeline, HookType.AFTER)
    reg("sglang.srt.managers.scheduler.Scheduler.init_memory_pools", attach_feature_pool, HookType.AFTER)
    reg(f"{worker}.forward_batch_generation", remember_batch, HookType.AROUND)
    for method in serving.capture:
        reg(method, CAPTURE_HOOKS[method.rsplit(".", 1)[1]], HookType.AROUND)
    reg("sglang.srt.mem_cache.common.release_kv_cache", finish_request, HookType.AROUND)
    reg("sglang.srt.managers.scheduler.Scheduler.ingest_requests", between_iterations, HookType.BEFORE)
