"""Prometheus metrics of the online path, in SGLang's `sglang:` style, on SGLang's own /metrics.

SGLang runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set by the launcher before
children spawn); prometheus_client picks its value class at import time, so it is imported here lazily,
inside the scheduler process. --online-train turns on --enable-metrics.

    sglang:online_train_accepted_tokens_total{position}   accepted draft tokens, by draft position (1..B-1)
    sglang:online_train_proposed_drafts_total{position}   draft tokens proposed, by position
    sglang:online_train_accept_length                      histogram: tokens committed per verify step
    sglang:online_train_draft_version                      version of the live draft (0 = the one loaded)
    sglang:online_train_captured_tokens_total              feature rows captured
    sglang:online_train_captured_bytes_total               bytes of those rows
    sglang:online_train_recorded_records_total / _tokens_total   finished requests turned into records
    sglang:online_train_dropped_requests_total{reason}     aborted / too_long
    sglang:online_train_replay_bytes, _replay_records, _replay_budget_bytes, _replay_dropped_records_total
    sglang:online_train_persisted_records_total            records written to shards
"""
from __future__ import annotations


class OnlineMetrics:
    def __init__(self, labels: dict[str, str] | None = None):
        from prometheus_client import Counter, Gauge, Histogram

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
                                     buckets=[1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32])
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
        self._version.labels(**self.labels).set(0)

    def verified(self, commit_lens: list[int], block_size: int) -> None:
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

    def persisted(self, n: int) -> None:
        self._persisted.labels(**self.labels).inc(n)

    def set_draft_version(self, version: int) -> None:
        self._version.labels(**self.labels).set(version)
