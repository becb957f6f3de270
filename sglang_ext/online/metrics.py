"""Prometheus metrics of the online path, in SGLang's `sglang:` style, on SGLang's own /metrics.

SGLang runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set by the launcher before
children spawn); prometheus_client picks its value class at import time, so it is imported here lazily,
inside the scheduler process and the recorder process (its child, sglang_ext/online/recorder/process.py), which both
write series of these families (`OnlineMetrics(owner=...)`). --online-train turns on --enable-metrics.

    sglang:online_train_accepted_tokens_total{position}   accepted draft tokens, by draft position (1..B-1)
    sglang:online_train_proposed_drafts_total{position}   draft tokens proposed, by position
    sglang:online_train_accept_length                      histogram: tokens committed per verify step
    sglang:online_train_draft_version                      version of the live draft (0 = the one loaded)
    sglang:online_train_captured_tokens_total              feature rows captured
    sglang:online_train_captured_bytes_total               bytes of those rows
    sglang:online_train_recorded_records_total / _tokens_total   finished requests turned into records
    sglang:online_train_dropped_requests_total{reason}     aborted / too_long / opted_out (custom_params)
    sglang:online_train_replay_bytes, _replay_records, _replay_budget_bytes, _replay_dropped_records_total
    sglang:online_train_persisted_records_total            records written to shards
    sglang:online_train_prefix_rows_total{result}          rows of radix-cache hits: filled (from the feature pool
                                                           or the prefix feature store) | gap (not found: zeros,
                                                           out of the loss)
    sglang:online_train_prefix_store_bytes                 bytes held by the prefix feature store
  trainer and swaps (part 2):
    sglang:online_train_trainer_up                         1 while the trainer process runs and beats
    sglang:online_train_trainer_restarts_total             trainer processes restarted after an exit
    sglang:online_train_recorder_restarts_total            recorder processes restarted after an exit
    sglang:online_train_trainer_hung_total                 trainers killed for a stale heartbeat or a stuck read
    sglang:online_train_queue_bytes{queue}                 bytes waiting in each queue of the path: ring
                                                           (scheduler -> recorder process, shared memory),
                                                           replay_inbox (-> replay buffer), supervisor (-> trainer),
                                                           trainer_inbox (in the trainer process)
    sglang:online_train_queue_dropped_records_total{queue} ... items dropped past that queue's byte bound
    sglang:online_train_trainer_steps                      optimiser steps so far (kept across restarts)
    sglang:online_train_trainer_loss                       loss of the latest step
    sglang:online_train_trainer_tokens_per_second          training throughput (EMA)
    sglang:online_train_trainer_tokens                     tokens trained on so far
    sglang:online_train_trainer_records                    records the trainer received
    sglang:online_train_heldout_accept_length              offline tau of the live draft on held-out traffic
    sglang:online_train_swaps_total                        draft versions swapped into the live decoder
    sglang:online_train_swaps_in_flight_total              ... of them with requests in flight
    sglang:online_train_rejected_swaps_total{reason}       candidates not swapped: worse (guard) | nan
    sglang:online_train_swap_latency_seconds               histogram: weight copy + helper rebuild
    sglang:online_train_seconds_since_last_swap            -1 before the first swap
    sglang:online_train_scheduler_seconds_total            seconds the online path spent on the scheduler thread
                                                           (its part of SGLang's hooks: capture, release, swap
                                                           point; sglang_ext.online.scheduler.hooks.SchedulerClock)
    sglang:online_train_scheduler_iterations_total         scheduler iterations (per-iteration cost: divide)
    sglang:online_train_draft_kv_refreshed_tokens_total    context tokens whose draft KV (written by an older
                                                           version) was re-projected under the live one
    sglang:online_train_draft_kv_stale_tokens_served_total ... that could not be (features gone): served stale
    sglang:online_train_draft_kv_refresh_seconds_total     scheduler time spent re-projecting
  persistence and poison records (issue 14):
    sglang:online_train_persisted_shards_total             replay shards written to the persist directory
    sglang:online_train_persisted_bytes_total              ... their bytes
    sglang:online_train_persist_errors_total               shard writes that failed (the records are kept, retried)
    sglang:online_train_persist_lost_records_total         records never persisted (past the bound of what waits
                                                           while writes fail, refused, or unwritten at shutdown)
    sglang:online_train_persist_pruned_shards_total / _bytes_total / _records_total   deleted by
                                                           --online-train-persist-max-bytes (oldest first)
    sglang:online_train_persist_swept_files_total          leftover temp / unlisted shard files deleted at startup
    sglang:online_train_persist_dir_bytes                  bytes of the persist directory: the shards it lists
                                                           and its listing files (manifest, journals)
    sglang:online_train_poison_records_total{reason}       records dropped as poison: token_id (outside the
                                                           vocabulary) | non_finite (features) | shape (in the
                                                           replay buffer or the trainer) | step_failed (its
                                                           training step raised) | crashed (in the step of two
                                                           trainer deaths in a row); never trained on or re-sent
  served acceptance per draft version (bounded: two label values, role="current" | "previous"):
    sglang:online_train_version_number{role}               the version in that role (-1: none yet)
    sglang:online_train_version_verify_steps{role}         verify steps (one per request and step) it served
    sglang:online_train_version_accepted_tokens{role}      accepted draft tokens it served
    sglang:online_train_version_proposed_drafts{role}      draft tokens it proposed
    sglang:online_train_version_accept_length{role}        its mean tokens committed per verify step
    sglang:online_train_version_accept_length_bucket{role,le}  its accept-length histogram (cumulative buckets
                                                           as gauges; histogram_quantile() reads them)
    sglang:online_train_rollbacks_total                    versions swapped back out for serving worse than
                                                           the previous one (rollback.RollbackWatch)
    Why roles and not the version number as the label: SGLang runs prometheus_client in multiprocess mode, where
    a label value cannot be removed (Counter.remove is not implemented there: the series stays in the mmap
    files), so a `version` label would grow one set of series per swap for the life of the server. With roles
    there are always two series per name; each swap moves "current" to "previous" and starts the new version's
    counts at 0 (so these are gauges of counts since the version went live, not counters), and a rollback
    exchanges the two. The version numbers they belong to are in version_number{role}.
"""
from __future__ import annotations

import bisect

# in data-flow order: the shared-memory ring (sglang_ext/online/ring.py), then sglang_ext/online/queues.py queues
QUEUES = ("ring", "replay_inbox", "supervisor", "trainer_inbox")
ACCEPT_LENGTH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)   # tokens committed per verify step


class OnlineMetrics:
    def __init__(self, labels: dict[str, str] | None = None, owner: str = "scheduler"):
        """owner: the process these series are written from, "scheduler" (capture, verify steps, swaps, versions)
        or "recorder" (records, replay buffer, shards, the trainer process): both write the same families into
        SGLang's multiprocess directory, and each sets the starting value only of the gauges it owns (a gauge
        reads as the process that wrote it last; a restarted recorder must not reset the live draft's version)."""
        from prometheus_client import Counter, Gauge, Histogram

        if owner not in ("scheduler", "recorder"):
            raise ValueError(f"OnlineMetrics owner {owner!r}: scheduler or recorder")
        self.owner = owner
        self.labels = dict(labels or {})
        names = list(self.labels)
        pos = names + ["position"]

        def counter(name, doc, extra=()):
            return Counter(f"sglang:online_train_{name}", doc, labelnames=names + list(extra))

        def gauge(name, doc):
            return Gauge(f"sglang:online_train_{name}", doc, labelnames=names, multiprocess_mode="mostrecent")

        self._accepted = Counter("sglang:online_train_accepted_tokens", "Accepted draft tokens by draft position",
                                 labelnames=pos)
        self._proposed = Counter("sglang:online_train_proposed_drafts", "Proposed draft tokens by draft position",
                                 labelnames=pos)
        self._accept_len = Histogram("sglang:online_train_accept_length",
                                     "Tokens committed per verify step (accepted drafts + bonus)", labelnames=names,
                                     buckets=ACCEPT_LENGTH_BUCKETS)
        self._version = gauge("draft_version", "Version of the live draft (0 = the checkpoint loaded at start)")
        self._captured_tokens = counter("captured_tokens", "Target feature rows captured")
        self._captured_bytes = counter("captured_bytes", "Bytes of captured target feature rows")
        self._recorded = counter("recorded_records", "Finished requests turned into replay records")
        self._recorded_tokens = counter("recorded_tokens", "Tokens in replay records")
        self._dropped = counter("dropped_requests", "Requests not recorded", extra=("reason",))
        self._replay_bytes = gauge("replay_bytes", "Feature bytes held by the in-memory replay buffer")
        self._replay_records = gauge("replay_records", "Records held by the in-memory replay buffer")
        self._replay_budget = gauge("replay_budget_bytes", "Byte budget of the in-memory replay buffer")
        self._replay_dropped = counter("replay_dropped_records", "Records evicted from the replay buffer (budget)")
        self._persisted = counter("persisted_records", "Records written to replay shards")
        self._prefix_rows = counter("prefix_rows", "Rows of radix-cache prefix hits in records: filled (from the "
                                    "feature pool or the prefix feature store), or left as a gap", extra=("result",))
        self._prefix_bytes = gauge("prefix_store_bytes", "Bytes held by the prefix feature store")
        self._trainer_up = gauge("trainer_up", "1 while the co-located trainer process runs")
        self._restarts = counter("trainer_restarts", "Trainer processes restarted after an exit")
        self._hung = counter("trainer_hung", "Trainer processes killed for a stale heartbeat or a stuck read")
        self._recorder_restarts = counter("recorder_restarts", "Recorder processes restarted after an exit")
        self._queue_bytes = Gauge("sglang:online_train_queue_bytes", "Bytes waiting in a queue of the online path",
                                  labelnames=names + ["queue"], multiprocess_mode="mostrecent")
        self._queue_dropped = counter("queue_dropped_records", "Items dropped from a queue of the online path "
                                      "(past its byte bound; the oldest go first)", extra=("queue",))
        self._steps = gauge("trainer_steps", "Trainer optimiser steps so far")
        self._loss = gauge("trainer_loss", "Loss of the trainer's latest step")
        self._tok_s = gauge("trainer_tokens_per_second", "Tokens trained per second (EMA)")
        self._tokens = gauge("trainer_tokens", "Tokens trained on so far")
        self._trainer_records = gauge("trainer_records", "Records the trainer received")
        self._heldout_tau = gauge("heldout_accept_length", "Offline tau of the live draft on held-out traffic")
        self._swaps = counter("swaps", "Draft versions swapped into the live decoder")
        self._swaps_in_flight = counter("swaps_in_flight", "Swaps done while requests were in flight")
        self._rejected = counter("rejected_swaps", "Candidate drafts not swapped in", extra=("reason",))
        self._swap_latency = Histogram("sglang:online_train_swap_latency_seconds",
                                       "Hot-swap latency: weight copy into the live draft + helper rebuild",
                                       labelnames=names, buckets=[1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3])
        self._since_swap = gauge("seconds_since_last_swap", "Seconds since the last swap (-1: none yet)")
        self._kv_refreshed = counter("draft_kv_refreshed_tokens", "Context tokens whose draft KV, written by an older "
                                     "draft version, was re-projected under the live one before a draft read it")
        self._kv_stale = counter("draft_kv_stale_tokens_served", "Context tokens served with draft KV of an older "
                                 "version (their features were no longer in the feature pool)")
        self._kv_refresh_s = counter("draft_kv_refresh_seconds", "Seconds spent re-projecting stale draft KV")
        if owner == "scheduler":
            self._version.labels(**self.labels).set(0)
            self._since_swap.labels(**self.labels).set(-1)
        else:
            self._trainer_up.labels(**self.labels).set(0)
        for queue in QUEUES:
            self._queue_dropped.labels(**self.labels, queue=queue).inc(0)
            if (queue == "ring") == (owner == "scheduler"):
                self._queue_bytes.labels(**self.labels, queue=queue).set(0)
        self._hung.labels(**self.labels).inc(0)
        if owner == "scheduler":
            for c in (self._kv_refreshed, self._kv_stale, self._kv_refresh_s):
                c.labels(**self.labels).inc(0)
        self._recorder_restarts.labels(**self.labels).inc(0)
        for reason in ("worse", "nan"):
            self._rejected.labels(**self.labels, reason=reason).inc(0)
        for result in ("filled", "gap"):
            self._prefix_rows.labels(**self.labels, result=result).inc(0)
        self._init_persist_metrics(counter, gauge)
        self._init_version_metrics(gauge, counter)

    def verified(self, commit_lens: list[int], block_size: int, version: int | None = None) -> None:
        """One verify step's tokens committed per request; `version`: the draft version that proposed them (None:
        the live one)."""
        self._version_verified(commit_lens, block_size, self.live_version if version is None else version)
        for c in commit_lens:
            self._accept_len.labels(**self.labels).observe(c)
        for position in range(1, block_size):
            accepted = sum(1 for c in commit_lens if c - 1 >= position)
            self._proposed.labels(**self.labels, position=str(position)).inc(len(commit_lens))
            if accepted:
                self._accepted.labels(**self.labels, position=str(position)).inc(accepted)

    def captured(self, rows: int, nbytes: int) -> None:
        self._captured_tokens.labels(**self.labels).inc(rows)
        self._captured_bytes.labels(**self.labels).inc(nbytes)

    def recorded(self, tokens: int) -> None:
        self._recorded.labels(**self.labels).inc()
        self._recorded_tokens.labels(**self.labels).inc(tokens)

    def dropped(self, reason: str) -> None:
        self._dropped.labels(**self.labels, reason=reason).inc()

    def replay_fill(self, nbytes: int, records: int, budget: int) -> None:
        self._replay_bytes.labels(**self.labels).set(nbytes)
        self._replay_records.labels(**self.labels).set(records)
        self._replay_budget.labels(**self.labels).set(budget)

    def replay_dropped(self) -> None:
        self._replay_dropped.labels(**self.labels).inc()

    def prefix_rows(self, filled: int, gap: int, store_bytes: int) -> None:
        if filled:
            self._prefix_rows.labels(**self.labels, result="filled").inc(filled)
        if gap:
            self._prefix_rows.labels(**self.labels, result="gap").inc(gap)
        self._prefix_bytes.labels(**self.labels).set(store_bytes)

    def persisted(self, n: int) -> None:
        self._persisted.labels(**self.labels).inc(n)

    def set_draft_version(self, version: int) -> None:
        self._version.labels(**self.labels).set(version)
        self.live_version = version

    # -- trainer / swaps ---------------------------------------------------------------------------------
    def trainer_restarted(self) -> None:
        self._restarts.labels(**self.labels).inc()

    def trainer_hung(self) -> None:
        self._hung.labels(**self.labels).inc()

    def queue(self, queue: str, nbytes: int, dropped: int = 0) -> None:
        """Fill of one queue (`QUEUES`) and the items it dropped since the last call."""
        self._queue_bytes.labels(**self.labels, queue=queue).set(nbytes)
        if dropped:
            self._queue_dropped.labels(**self.labels, queue=queue).inc(dropped)

    def swapped(self, version: int, latency_s: float, in_flight: int) -> None:
        self._version.labels(**self.labels).set(version)
        self._version_swapped(version)
        self._swaps.labels(**self.labels).inc()
        if in_flight:
            self._swaps_in_flight.labels(**self.labels).inc()
        self._swap_latency.labels(**self.labels).observe(latency_s)
        self._since_swap.labels(**self.labels).set(0)

    def rejected(self, reason: str, n: int) -> None:
        self._rejected.labels(**self.labels, reason=reason).inc(n)

    def trainer_status(self, *, up: bool, steps: float, loss: float, tokens_per_s: float, tokens: float,
                       records: float, heldout_tau: float) -> None:
        lab = self.labels
        self._trainer_up.labels(**lab).set(1 if up else 0)
        self._steps.labels(**lab).set(steps)
        self._loss.labels(**lab).set(loss)
        self._tok_s.labels(**lab).set(tokens_per_s)
        self._tokens.labels(**lab).set(tokens)
        self._trainer_records.labels(**lab).set(records)
        if heldout_tau == heldout_tau and heldout_tau > 0:
            self._heldout_tau.labels(**lab).set(heldout_tau)

    def swap_age(self, seconds: float | None) -> None:
        """Seconds since the last swap (None: none yet, the gauge stays -1)."""
        if seconds is not None:
            self._since_swap.labels(**self.labels).set(seconds)

    def recorder_restarted(self) -> None:
        self._recorder_restarts.labels(**self.labels).inc()

    # -- persistence, poison records, heap memory (issue 14) ---------------------------------------------
    def _init_persist_metrics(self, counter, gauge) -> None:
        from sglang_ext.online.protocol import POISON_REASONS
        self._persisted_shards = counter("persisted_shards", "Replay shards written to the persist directory")
        self._persisted_bytes = counter("persisted_bytes", "Bytes of replay shards written")
        self._persist_errors = counter("persist_errors", "Replay shard writes that failed (records kept, retried)")
        self._persist_lost = counter("persist_lost_records", "Records never persisted: past the bound of what "
                                     "waits while shard writes fail, refused by the writer, or unwritten at stop")
        self._pruned_shards = counter("persist_pruned_shards", "Shards deleted by --online-train-persist-max-bytes")
        self._pruned_bytes = counter("persist_pruned_bytes", "Bytes of shards deleted by the retention limit")
        self._pruned_records = counter("persist_pruned_records", "Records in shards deleted by the retention limit")
        self._swept = counter("persist_swept_files", "Leftover temp and unlisted shard files deleted at startup")
        self._dir_bytes = gauge("persist_dir_bytes",
                                "Bytes of the persist directory: listed shards, manifest and journals")
        self._poison = counter("poison_records", "Records dropped as poison (never trained on or re-sent)",
                               extra=("reason",))
        self._trims = counter("malloc_trims", "Times the replay buffer's thread handed freed heap pages back to "
                              "the OS (glibc malloc_trim, every --online-train-malloc-trim-seconds; "
                              "sglang_ext.online.recorder.memory)")
        self._trim_seconds = counter("malloc_trim_seconds", "Seconds spent in malloc_trim (it holds each malloc "
                                     "arena's lock while it walks it)")
        self._trim_released = counter("malloc_trim_released_bytes", "Scheduler RSS given back by malloc_trim")
        for c in (self._persisted_shards, self._persisted_bytes, self._persist_errors, self._persist_lost,
                  self._pruned_shards, self._pruned_bytes, self._pruned_records, self._swept, self._trims,
                  self._trim_seconds, self._trim_released):
            c.labels(**self.labels).inc(0)
        for reason in POISON_REASONS:
            self._poison.labels(**self.labels, reason=reason).inc(0)

    def persisted_shard(self, nbytes: int) -> None:
        self._persisted_shards.labels(**self.labels).inc()
        self._persisted_bytes.labels(**self.labels).inc(nbytes)

    def persist_error(self) -> None:
        self._persist_errors.labels(**self.labels).inc()

    def persist_lost(self, n: int) -> None:
        self._persist_lost.labels(**self.labels).inc(n)

    def persist_pruned(self, shards: int, nbytes: int, records: int) -> None:
        self._pruned_shards.labels(**self.labels).inc(shards)
        self._pruned_bytes.labels(**self.labels).inc(nbytes)
        self._pruned_records.labels(**self.labels).inc(records)

    def persist_swept(self, n: int) -> None:
        self._swept.labels(**self.labels).inc(n)

    def persist_dir_bytes(self, nbytes: int) -> None:
        self._dir_bytes.labels(**self.labels).set(nbytes)

    def malloc_trimmed(self, seconds: float, released_bytes: int) -> None:
        self._trims.labels(**self.labels).inc()
        self._trim_seconds.labels(**self.labels).inc(seconds)
        self._trim_released.labels(**self.labels).inc(released_bytes)       # TrimResult.released_bytes: >= 0

    def poison_records(self, reason: str, n: int = 1) -> None:
        self._poison.labels(**self.labels, reason=reason).inc(n)

    # -- served acceptance per draft version (issue 14, item 7) + rollbacks (item 6) ----------------------------
    ROLES = ("current", "previous")

    def _init_version_metrics(self, gauge, counter) -> None:
        from prometheus_client import Gauge

        def role_gauge(name, doc):
            return Gauge(f"sglang:online_train_{name}", doc, labelnames=list(self.labels) + ["role"],
                         multiprocess_mode="mostrecent")

        self.live_version = 0                   # the version serving now (its role is "current")
        # role -> [version, verify steps, accepted drafts, proposed drafts, tokens committed, steps per bucket]
        self._per_version = {"current": self._new_version_stats(0), "previous": self._new_version_stats(-1)}
        self._bucket_labels = [str(float(b)) for b in ACCEPT_LENGTH_BUCKETS] + ["+Inf"]
        self._v_number = role_gauge("version_number", "Draft version in this role (current: serving now; "
                                    "previous: the one before it, or the one rolled back); -1: none yet")
        self._v_steps = role_gauge("version_verify_steps", "Verify steps (per request) served by the version in "
                                   "this role since it went live")
        self._v_accepted = role_gauge("version_accepted_tokens", "Accepted draft tokens served by the version in "
                                      "this role since it went live")
        self._v_proposed = role_gauge("version_proposed_drafts", "Draft tokens proposed by the version in this "
                                      "role since it went live")
        self._v_accept_len = role_gauge("version_accept_length", "Mean tokens committed per verify step by the "
                                        "version in this role (0: no step yet)")
        # The accept-length histogram of the version in each role, its buckets as gauges (they restart at 0 when a
        # version goes live, which a Histogram cannot do): histogram_quantile() works on them as on any *_bucket.
        self._v_accept_hist = Gauge("sglang:online_train_version_accept_length_bucket",
                                    "Verify steps of the version in this role that committed at most `le` tokens "
                                    "(cumulative, since it went live)", labelnames=list(self.labels) + ["role", "le"],
                                    multiprocess_mode="mostrecent")
        self._scheduler_s = counter("scheduler_seconds", "Seconds the online path spent on the scheduler thread "
                                    "(capture, release and swap-point hooks)")
        self._scheduler_it = counter("scheduler_iterations", "Scheduler iterations (the online path's cost per "
                                     "iteration: scheduler_seconds / scheduler_iterations)")
        self._scheduler_s.labels(**self.labels).inc(0)
        self._scheduler_it.labels(**self.labels).inc(0)
        self._rollbacks = counter("rollbacks", "Draft versions rolled back after a swap: served acceptance "
                                  "dropped below the previous version's by more than the tolerance")
        self._rollbacks.labels(**self.labels).inc(0)
        if self.owner == "scheduler":
            self._publish_versions()

    def _publish_versions(self, roles=ROLES) -> None:
        for role in roles:
            version, steps, accepted, proposed, committed, _ = self._per_version[role]
            lab = dict(self.labels, role=role)
            self._v_number.labels(**lab).set(version)
            self._v_steps.labels(**lab).set(steps)
            self._v_accepted.labels(**lab).set(accepted)
            self._v_proposed.labels(**lab).set(proposed)
            self._v_accept_len.labels(**lab).set(committed / steps if steps else 0.0)
            for le, n in zip(self._bucket_labels, self._per_version[role][5]):
                self._v_accept_hist.labels(**lab, le=le).set(n)

    @staticmethod
    def _new_version_stats(version: int) -> list:
        return [version, 0, 0, 0, 0, [0] * (len(ACCEPT_LENGTH_BUCKETS) + 1)]

    def _version_verified(self, commit_lens: list[int], block_size: int, version: int) -> None:
        for role, stats in self._per_version.items():
            if stats[0] == version:             # steps of an older version, verified late: not counted
                stats[1] += len(commit_lens)
                stats[2] += sum(max(0, c - 1) for c in commit_lens)
                stats[3] += (block_size - 1) * len(commit_lens)
                stats[4] += sum(commit_lens)
                buckets = stats[5]
                for c in commit_lens:
                    for i in range(bisect.bisect_left(ACCEPT_LENGTH_BUCKETS, c), len(buckets)):
                        buckets[i] += 1          # cumulative: every bucket whose bound is >= c (and +Inf)
                self._publish_versions((role,))
                return

    def _version_swapped(self, version: int) -> None:
        """A new version went live: "current" becomes "previous"; the new one starts from 0."""
        self.live_version = version
        self._per_version = {"current": self._new_version_stats(version), "previous": self._per_version["current"]}
        self._publish_versions()

    def draft_kv(self, *, refreshed: int = 0, stale_served: int = 0, seconds: float = 0.0) -> None:
        """Draft KV refresh after swaps (scheduler/refresh.py)."""
        self._kv_refreshed.labels(**self.labels).inc(refreshed)
        self._kv_stale.labels(**self.labels).inc(stale_served)
        self._kv_refresh_s.labels(**self.labels).inc(seconds)

    def scheduler_time(self, seconds: float, iterations: int) -> None:
        self._scheduler_s.labels(**self.labels).inc(seconds)
        self._scheduler_it.labels(**self.labels).inc(iterations)

    def rolled_back(self, from_version: int, to_version: int) -> None:
        """`from_version` was swapped out again for `to_version` (the previous one): the roles exchange."""
        self.live_version = to_version
        self._version.labels(**self.labels).set(to_version)
        current, previous = self._per_version["current"], self._per_version["previous"]
        if previous[0] != to_version:            # not what "previous" held (should not happen): start it at 0
            previous = self._new_version_stats(to_version)
        self._per_version = {"current": previous, "previous": current}
        self._rollbacks.labels(**self.labels).inc()
        self._publish_versions()
