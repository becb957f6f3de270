"""The online path of one scheduler process, wired in one place:

    scheduler process: capture (capture.Capture) -> hand-off (handoff.Handoff: shared-memory ring)
    recorder process:  -> replay buffer (+ shards) -> trainer supervisor -> trainer process (trainer/worker.py)
    scheduler process: -> weight slot -> hot swap (swap_applier.SwapApplier.tick) -> metrics

`start_pipeline` is called once, when SGLang's speculative worker of the draft's kind has started
(sglang_ext/online/scheduler/hooks.py); the hooks then only ever talk to the `OnlinePipeline` it returns. Under tensor
parallelism (--tp N) the whole path runs on TP rank 0 only; the other ranks get a pipeline that holds only a
`SwapFollower`, which applies the versions rank 0 swaps in, at the same iteration (sglang_ext/online/scheduler/tp.py).
"""
from __future__ import annotations

import atexit
import logging
import time
from dataclasses import dataclass, field

import torch

from sglang_ext.online.config import OnlineTrainConfig
from sglang_ext.online.hub import draft_source, local_dir, target_source
from sglang_ext.online.metrics import OnlineMetrics
from sglang_ext.online.protocol import RecorderSpec
from sglang_ext.online.scheduler.capture import Capture
from sglang_ext.online.scheduler.refresh import DraftKVRefresh, projection_for
from sglang_ext.online.scheduler.handoff import Handoff
from sglang_ext.online.scheduler.placement import device_free_bytes
from sglang_ext.online.scheduler.pool import FeaturePool, check_pool_memory, pool_rows
from sglang_ext.online.scheduler.swap_applier import SwapApplier
from sglang_ext.online.scheduler.tp import SlotHandle, SwapFollower, TPGroup, tp_group
from trainer.draft_kind import DraftKind, get_kind
from trainer.replay import STORAGE, ReplaySpec, ShardWriter
from trainer.target import target_identity, target_info

logger = logging.getLogger(__name__)
HUB_FILES = ["*.json", "*.safetensors"]    # what the online path reads of a repo id's snapshot, if it must fetch
RECORDER_START_S = 180.0                   # the recorder process's start (imports, persist directory sweep)


class SchedulerClock:
    """What the online path costs the scheduler thread: seconds spent in our part of its hooks (capture, release,
    the swap point; SGLang's own work inside the hooked methods excluded; scheduler/hooks.py counts), and
    scheduler iterations. `OnlinePipeline.tick` puts them on /metrics once a second
    (sglang:online_train_scheduler_seconds_total, ..._scheduler_iterations_total). Time that other threads of
    the process take from this one (the GIL) is not in it: benchmarks/bench_online_cost.py measures that as
    throughput."""

    def __init__(self):
        self.seconds = 0.0
        self.iterations = 0

    def take(self) -> tuple[float, int]:
        """(seconds, iterations) since the last call."""
        out = (self.seconds, self.iterations)
        self.seconds, self.iterations = 0.0, 0
        return out


@dataclass
class OnlinePipeline:
    cfg: OnlineTrainConfig
    kind: DraftKind                        # the served draft's kind
    block_size: int                        # tokens per verify step the worker runs with
    spec: ReplaySpec | None                # what the records hold (target, layers, hidden size, storage dtype)
    metrics: OnlineMetrics | None
    capture: Capture | None               # scheduler thread: rows of running requests (None on TP ranks > 0)
    handoff: Handoff | None                # finished requests -> the recorder process (None on TP ranks > 0)
    supervisor: SwapApplier | None         # the weight slot, staging thread and hot swap; None with capture only
    follower: SwapFollower | None = None   # TP ranks > 0 (with the trainer on): swaps when rank 0 does
    tp: TPGroup | None = None              # None without tensor parallelism
    refresh: DraftKVRefresh | None = None  # draft KV of one version after swaps (without TP)
    clock: SchedulerClock = field(default_factory=SchedulerClock)
    clock_flushed: float = field(default_factory=time.monotonic)

    def attach_feature_pool(self, scheduler) -> None:
        """SGLang has allocated its KV pools (Scheduler.init_memory_pools, at startup): the feature pool beside
        them, on TP rank 0 (the only rank that captures)."""
        if self.capture is None:
            return
        pool = feature_pool(self.cfg, scheduler.tp_worker.model_runner, self.capture.width, self.capture.storage_dtype)
        self.capture.pool = pool
        logger.info("sglang_ext: feature pool: %d rows of %d features (%.1f MiB on %s, --online-train-feature-pool "
                    "%s)", pool.rows, pool.width, pool.nbytes / 2**20, pool.features.device, self.cfg.feature_pool)

    def tick(self, scheduler) -> None:
        """Top of a scheduler iteration: the swap point (sglang_ext/online/scheduler/hooks.py); once a second, what the
        online path cost the scheduler thread goes to /metrics."""
        swapper = self.supervisor or self.follower
        if swapper is not None:
            swapper.tick(scheduler)
        if self.handoff is not None:
            self.handoff.tick()
        now = time.monotonic()
        if self.metrics is not None and now - self.clock_flushed >= 1.0:
            self.clock_flushed = now
            self.metrics.scheduler_time(*self.clock.take())


def start_pipeline(cfg: OnlineTrainConfig, worker, server_args) -> OnlinePipeline:
    """The online path of this scheduler process: the whole of it without tensor parallelism or on TP rank 0
    (which then tells the other ranks where its weight slot is, or that it failed to start); a swap follower on
    the other TP ranks."""
    tp = tp_group()
    if tp is None:
        return build_pipeline(cfg, worker, server_args)
    if tp.rank == 0:
        try:
            pipeline = build_pipeline(cfg, worker, server_args, tp)
        except Exception as e:
            tp.broadcast_object({"error": f"{type(e).__name__}: {e}"})
            raise
        tp.broadcast_object(pipeline.supervisor.slot_handle() if pipeline.supervisor else None)
        return pipeline
    handle = tp.broadcast_object(None)
    if isinstance(handle, dict):
        raise RuntimeError(f"--online-train: TP rank 0 could not start the online path: {handle['error']}")
    kind = get_kind(cfg.draft_kind or "dflash")
    follower = SwapFollower(kind, worker, tp, handle) if isinstance(handle, SlotHandle) else None
    logger.info("sglang_ext: TP rank %d of %d: the online path runs on TP rank 0; this rank %s", tp.rank, tp.size,
                "follows its draft swaps" if follower else "only serves (capture only)")
    return OnlinePipeline(cfg=cfg, kind=kind, block_size=kind.served_block_size(worker), spec=None, metrics=None,
                          capture=None, handoff=None, supervisor=None, follower=follower, tp=tp)


def build_pipeline(cfg: OnlineTrainConfig, worker, server_args, tp: TPGroup | None = None) -> OnlinePipeline:
    """Everything --online-train runs in the scheduler process, for `worker` (SGLang's speculative worker).
    Raises on a bad setting (persist directory, draft names), so the server fails at startup."""
    kind = get_kind(cfg.draft_kind or "dflash")
    # Local directories, or the snapshots of repo ids that SGLang loaded (sglang_ext/online/hub.py).
    target, draft = target_source(server_args), draft_source(server_args)
    target_path = local_dir(target, allow_patterns=HUB_FILES, cache_first=True)
    draft_path = local_dir(draft, allow_patterns=HUB_FILES, cache_first=True)
    draft_cfg = kind.load_config(draft_path)
    # The target captures its layers in layer order, so the feature columns follow the sorted ids.
    layer_ids = sorted(kind.live_feature_layers(draft_cfg))
    spec = ReplaySpec(target_identity(target_path, name=target.path), layer_ids, int(draft_cfg.hidden_size),
                      STORAGE[cfg.storage_dtype])
    labels = {"model_name": str(server_args.served_model_name or server_args.model_path)}
    metrics = OnlineMetrics(labels)
    block_size = kind.served_block_size(worker)
    supervisor = None
    if cfg.trainer:
        supervisor = SwapApplier(cfg, kind, worker, metrics, target_path=target_path, draft_path=draft_path,
                                 block_size=block_size, tp=tp)
        atexit.register(supervisor.stop)
    vocab_size = target_info(target_path).vocab_size        # records are checked against it (poison)
    if cfg.persist_dir:                     # a directory of another target or layout fails the server now
        ShardWriter(cfg.persist_dir, spec).close()            # (the recorder process writes it)

    def recorder_spec(ring_fd: int, wake_fd: int) -> RecorderSpec:
        trainer = {}
        if supervisor is not None:
            trainer = dict(trainer_spec=supervisor.trainer_spec.to_json(), trainer_devices=list(supervisor.devices),
                           trainer_command=handoff.trainer_command(),
                           slot_layout=[(n, list(shape)) for n, shape in supervisor.layout],
                           slot_dtype=supervisor.trainer_spec.slot_dtype)
        return RecorderSpec(ring_fd=ring_fd, wake_fd=wake_fd, target=spec.target.to_dict(),
                            layer_ids=list(spec.layer_ids), hidden_size=spec.hidden_size,
                            storage_dtype=spec.storage_dtype, vocab_size=vocab_size, labels=labels, **trainer)

    handoff = Handoff(cfg.queue_bytes, recorder_spec, metrics)
    handoff.start(wait_s=RECORDER_START_S)                   # fails the server if it cannot record
    # capture -> feature pool (made once SGLang's KV pools exist: attach_feature_pool) -> recorder process
    capture = Capture(cfg, handoff.submit, metrics, width=len(layer_ids) * spec.hidden_size,
                      storage_dtype=spec.storage_dtype)
    refresh = None
    if supervisor is not None:
        capture.on_verified = supervisor.observe_verified    # served acceptance -> rollback watch
        # after a swap, stale draft KV is re-projected from the pool (one rank: refresh.py)
        projection = projection_for(kind.name, worker) if tp is None else None
        if projection is not None:
            refresh = DraftKVRefresh(lambda: capture.pool, metrics, projection)
    # radix-cache hits filled from the pool where serving's draft KV there is of the live version
    capture.fill_prefixes = cfg.prefix_fill == "auto" and (supervisor is None or refresh is not None)
    logger.info("sglang_ext: online training ready: %s draft, layers %s, hidden %d, replay budget %d bytes, "
                "persist %s, recorder process %d, trainer %s", kind.name, layer_ids, spec.hidden_size,
                cfg.replay_budget_bytes, cfg.persist_dir, handoff.pid,
                f"on {supervisor.device}, needs {supervisor.memory_need.describe()}, duty cycle "
                f"{cfg.duty_cycle:g}" if supervisor else "off (capture only)")
    return OnlinePipeline(cfg=cfg, kind=kind, block_size=block_size, spec=spec, metrics=metrics, capture=capture,
                          handoff=handoff, supervisor=supervisor, tp=tp, refresh=refresh)


def feature_pool(cfg: OnlineTrainConfig, runner, width: int, storage_dtype: str) -> FeaturePool:
    """The feature pool beside the target's KV cache (scheduler/pool.py), on the serving device: a row per KV
    slot of `runner` (the target's model runner, its KV pools allocated) by default, in the serving dtype (the
    dtype of the rows SGLang feeds the draft, so that re-projecting a stale prefix's draft KV from them gives
    the KV a fresh prefill would: refresh.py; records are cast to the storage dtype at release). Raises when it
    does not fit, so the server fails at startup."""
    allocator = runner.token_to_kv_pool_allocator
    page = max(1, int(getattr(allocator, "page_size", 1) or 1))
    kv_slots = int(allocator.size) + page + 1                 # SGLang's slot ids run from 1 to size (+ a page)
    dtype = getattr(runner, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.bfloat16 if storage_dtype == "float8_e4m3fn" else getattr(torch, storage_dtype)
    row_bytes = width * torch.empty((), dtype=dtype).element_size()
    rows = pool_rows(cfg.feature_pool, kv_slots, row_bytes)
    device = str(runner.device)
    check_pool_memory(rows * (row_bytes + 12), device_free_bytes(device), device, cfg.feature_pool)
    return FeaturePool(rows, width, dtype, device)
