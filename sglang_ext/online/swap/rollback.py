"""Rollback on served acceptance (issue 14, item 6): the guard compares a candidate with the live draft on
held-out records before a swap; this watches what the swapped-in version actually serves, and sends it back.

    RollbackWatch      pure bookkeeping, fed by the scheduler thread with the tokens committed per verify step
                       (one entry per request and step) and the draft version that proposed them:
                         * while no swap is on probation, the live version's last `steps` accept lengths are
                           kept: its recent level;
                         * at a swap, that level becomes the baseline (when at least `min_baseline` steps were
                           seen; else the new version is not judged) and the new version is on probation;
                         * after `steps` of its own verify steps: if its mean accept length is below the
                           baseline by more than `tolerance`, the verdict is a rollback; otherwise it is kept,
                           and its probation steps start its own recent level.
                       While a version is on probation the supervisor swaps in nothing newer (each version is
                       judged against the one it replaced).
    load_draft_weights the checkpoint's weights (version 0), for the slot's keep buffer at startup.

The supervisor (sglang_ext/online/recorder/supervisor.py) keeps the previous version's weights in the weight slot's keep
buffer (host shared memory, serving dtype: what a TP follower can read too), restores them at the top of a
scheduler iteration on every TP rank, counts and logs the rollback, and tells the trainer through the slot header
(`rollbacks`), which resets to the keep buffer's weights (trainer/guard.py, `Guard.reset_after_rollback`).
"""
from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Verdict:
    version: int            # the version on probation
    rollback: bool          # True: swap the previous version back in
    baseline: float         # mean accept length of the previous version over its last steps
    served: float           # mean accept length of `version` over its probation
    steps: int              # verify steps of `version` seen (the probation length)
    baseline_steps: int

    def describe(self) -> str:
        return (f"mean accept length {self.served:.3f} over {self.steps} verify steps vs {self.baseline:.3f} of "
                f"the previous version over its last {self.baseline_steps}")


class RollbackWatch:
    def __init__(self, steps: int, tolerance: float, min_baseline: int | None = None):
        if steps <= 0:
            raise ValueError(f"RollbackWatch: steps must be positive, got {steps}")
        self.steps = steps
        self.tolerance = tolerance
        self.min_baseline = max(1, steps // 4) if min_baseline is None else min_baseline
        self.live = 0                               # the version serving
        self.recent: deque[int] = deque(maxlen=steps)   # the live version's latest accept lengths
        self.watching: int | None = None            # the version on probation
        self.previous: int | None = None            # ... and the one it replaced
        self.baseline: list[int] = []               # the replaced version's latest accept lengths
        self.probation: list[int] = []              # the watched version's accept lengths so far
        self.verdict: Verdict | None = None         # decided, not yet acted on (the supervisor's next tick)

    @property
    def busy(self) -> bool:
        """A version is on probation (or its verdict waits): swap nothing newer in."""
        return self.watching is not None or (self.verdict is not None and self.verdict.rollback)

    def observe(self, commit_lens: list[int], version: int) -> Verdict | None:
        """Accept lengths of one verify step, proposed by `version`; returns the verdict when it is reached."""
        if self.watching is None:
            if version == self.live:
                self.recent.extend(commit_lens)
            return None
        if version != self.watching:                 # steps of the replaced version, verified late
            return None
        self.probation.extend(commit_lens[:self.steps - len(self.probation)])
        if len(self.probation) < self.steps:
            return None
        return self._decide()

    def _decide(self) -> Verdict:
        base = sum(self.baseline) / len(self.baseline)
        served = sum(self.probation) / len(self.probation)
        verdict = Verdict(self.watching, base - served > self.tolerance, base, served, len(self.probation),
                          len(self.baseline))
        if not verdict.rollback:                     # kept: its probation is its recent level
            self.recent = deque(self.probation, maxlen=self.steps)
            self.watching = None
        self.verdict = verdict
        return verdict

    def swapped(self, version: int) -> bool:
        """`version` went live; returns whether it is on probation (enough steps of the replaced one seen)."""
        self.verdict = None
        previous, self.live = self.live, version
        if len(self.recent) >= self.min_baseline:
            self.watching, self.previous = version, previous
            self.baseline, self.probation = list(self.recent), []
        else:
            self.watching = None
        self.recent = deque(maxlen=self.steps)
        return self.watching is not None

    def rolled_back(self) -> int:
        """The watched version was swapped out again: the previous one is live, with its recent level back.
        Returns that version."""
        if self.watching is None or self.previous is None:
            raise RuntimeError("RollbackWatch: no version on probation to roll back")
        self.live = self.previous
        self.recent = deque(self.baseline, maxlen=self.steps)
        self.watching, self.previous, self.verdict = None, None, None
        self.baseline, self.probation = [], []
        return self.live

    def take_rollback(self) -> Verdict | None:
        """The verdict, when it is a rollback not acted on yet (the supervisor's tick)."""
        v = self.verdict
        return v if v is not None and v.rollback else None


def load_draft_weights(draft_dir: str | Path, layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of the draft checkpoint in `draft_dir` named as the slot layout (`model.` prefix stripped), in
    `dtype`: version 0, which a rollback of version 1 goes back to."""
    from safetensors import safe_open

    wanted = {name: tuple(shape) for name, shape in layout}
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(draft_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names = [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
        with safe_open(str(f), framework="pt") as st:
            for key in names:
                name = key.removeprefix("model.")
                if name in wanted:
                    out[name] = st.get_tensor(key).to(dtype)
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise ValueError(f"draft checkpoint {draft_dir}: no weights for {missing[:4]}")
    return out
