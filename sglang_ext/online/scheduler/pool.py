"""The feature pool: target features beside the KV cache, indexed by the same token slots (scheduler process).

    pool = FeaturePool(rows, width, dtype, device)
    pool.write(slots, target_hidden[, committed])    # one device op per forward: the rows SGLang feeds the live
                                                     # draft, at the KV slots of their tokens
    rows, covered = pool.gather(slots)               # at request release: a request's rows, by position

A KV slot is what SGLang's scheduler allocates and `req_to_token` stores (a virtual id under the unified pool).
Row `slot % rows` holds the features of the token in `slot`, and `tags[slot % rows] == slot` says it does. With
the default size (one row per KV slot) no two live slots share a row, so the features of every token whose KV is
live (a running request's, a radix-cached prefix's) stay in the pool exactly as long as that KV does: a request
served from the radix cache finds its prefix's features here, written when the prefix was computed. A smaller
pool (--online-train-feature-pool SIZE) shares rows between slots: a row overwritten by another slot fails its
tag and that position becomes a gap of the record (zero features, out of the loss), never another token's row.

Rows are kept in the serving dtype (the dtype of what SGLang feeds the draft), with the draft version that wrote
each token's draft KV from them (`versions`): after a hot swap, refresh.py re-projects the draft KV of rows of an
older version under the live weights, which gives what a fresh prefill would.

Verify steps write all of a step's rows in one op; the rows past each request's committed prefix go to a scratch
row, and their slots' tags are cleared (those slots hold no committed token; SGLang reuses them). No host sync:
the slots, the commit lengths and the rows stay on the device.
"""
from __future__ import annotations

import torch

from sglang_ext.online.config import OnlineTrainConfigError


class FeaturePool:
    def __init__(self, rows: int, width: int, dtype: torch.dtype, device: torch.device | str):
        if rows < 1 or width < 1:
            raise ValueError(f"feature pool: {rows} rows of width {width}")
        self.rows = int(rows)
        self.width = int(width)
        # one more row: the scratch row that uncommitted verify rows are written to
        self.features = torch.zeros(self.rows + 1, self.width, dtype=dtype, device=device)
        self.tags = torch.full((self.rows + 1,), -1, dtype=torch.int64, device=device)
        # the draft version whose weights wrote the draft KV of each row's token (refresh.py re-projects the rows
        # of an older version before a draft forward reads them)
        self.versions = torch.zeros(self.rows + 1, dtype=torch.int32, device=device)
        self.row_bytes = self.width * self.features.element_size()

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size() + self.tags.numel() * 12

    def write(self, slots: torch.Tensor, rows: torch.Tensor, committed: torch.Tensor | None = None,
              version: int = 0) -> None:
        """rows[i] (the features of the token in KV slot slots[i]) into the pool; with `committed` (bool, one per
        row) only the committed rows, the others' tags cleared. version: the live draft's, which writes these
        tokens' draft KV from the same rows."""
        slots = slots.reshape(-1).to(self.tags.device, torch.int64)
        rows = rows[:slots.shape[0]]
        index = slots % self.rows
        self.versions[index] = version
        if committed is None:
            self.tags[index] = slots
            self.features[index] = rows.to(self.features.dtype)
            return
        committed = committed.reshape(-1)
        self.tags[index] = torch.where(committed, slots, -1)
        self.features[torch.where(committed, index, self.rows)] = rows.to(self.features.dtype)

    def stale(self, slots: torch.Tensor, live: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stale, gone) bool masks over `slots`: stale where the row is the slot's and its draft KV was written
        by another version than `live`; gone where the row is not the slot's any more (its features were
        overwritten by another slot's: that draft KV cannot be re-projected)."""
        slots = slots.reshape(-1).to(self.tags.device, torch.int64)
        index = slots % self.rows
        mine = self.tags[index] == slots
        return mine & (self.versions[index] != live), ~mine

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n, width], covered bool [n]) of the tokens in `slots`: covered where the row is that slot's."""
        slots = slots.reshape(-1).to(self.tags.device, torch.int64)
        index = slots % self.rows
        return self.features[index], self.tags[index] == slots

    def stamp(self, slots: torch.Tensor, version: int) -> None:
        """The draft KV of the tokens in `slots` is now of `version` (re-projected: refresh.py)."""
        self.versions[slots.reshape(-1).to(self.tags.device, torch.int64) % self.rows] = version


def pool_rows(size: str, kv_slots: int, row_bytes: int) -> int:
    """Rows of the pool for --online-train-feature-pool `size` ("auto": one per KV slot, or bytes)."""
    if size == "auto":
        return kv_slots
    from sglang_ext.online.config import parse_size
    nbytes = parse_size(size, "--online-train-feature-pool")
    rows = nbytes // (row_bytes + 12)
    if rows < 1:
        raise OnlineTrainConfigError(f"--online-train-feature-pool {size}: less than one row of {row_bytes + 12} "
                                     f"bytes")
    return min(rows, kv_slots)


def check_pool_memory(nbytes: int, free: int | None, device: str, size: str) -> None:
    """Fail at startup when the pool cannot fit beside SGLang's pools."""
    if free is not None and nbytes > free:
        gib = 2 ** 30
        raise OnlineTrainConfigError(
            f"--online-train: the feature pool needs {nbytes / gib:.2f} GiB on {device} (--online-train-feature-pool "
            f"{size}), more than the {free / gib:.2f} GiB free after SGLang's pools: give a smaller size "
            f"(e.g. --online-train-feature-pool 1GiB; positions whose rows were overwritten become gaps of the records)"
            f", or lower --mem-fraction-static")
