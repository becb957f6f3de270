"""The production online trainer with faults injected, for tests (run by the test plugin as the trainer process,
or imported by unit tests). Faults, comma separated in $SGLANG_EXT_TEST_TRAINER_FAULTS:

  nan_steps=A-B            the A-th..B-th step this process attempts gets NaN features (so a NaN loss)
  worse_once_live_tau=T    the first candidate offered while the live draft's held-out tau is >= T is replaced
                           by a clearly worse one (final norm negated: every logit flips sign)
  serve_worse_version=K    version K passes the guard as the good candidate but is published with the final norm
                           negated (the slot gets weights that serve worse than the guard saw): what the server's
                           rollback on served acceptance must catch (sglang_ext/online/swap/rollback.py)
  hang_once_after=N        after its N-th step the process stops reading records and stops beating (hung, not
                           dead), once: the first process to hang creates $SGLANG_EXT_TEST_HANG_FLAG, and
                           processes started after that do not hang
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from sglang_ext.online.trainer.worker import OnlineTrainer, main

FAULTS_ENV = "SGLANG_EXT_TEST_TRAINER_FAULTS"
HANG_FLAG_ENV = "SGLANG_EXT_TEST_HANG_FLAG"
log = logging.getLogger("sglang_ext.trainer")


def parse_faults(text: str | None) -> dict:
    faults: dict = {"nan_steps": (0, -1), "worse_once_live_tau": None, "hang_once_after": None,
                    "serve_worse_version": None}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key == "nan_steps":
            a, _, b = value.partition("-")
            faults["nan_steps"] = (int(a), int(b or a))
        elif key == "worse_once_live_tau":
            faults["worse_once_live_tau"] = float(value)
        elif key == "hang_once_after":
            faults["hang_once_after"] = int(value)
        elif key == "serve_worse_version":
            faults["serve_worse_version"] = int(value)
        else:
            raise ValueError(f"${FAULTS_ENV}: unknown fault {key!r} (nan_steps=A-B, worse_once_live_tau=T, "
                             "hang_once_after=N, serve_worse_version=K)")
    return faults


class FaultyTrainer(OnlineTrainer):
    def __init__(self, spec, faults: dict | None = None):
        super().__init__(spec)
        self.faults = faults if faults is not None else parse_faults(os.environ.get(FAULTS_ENV))
        self.injected_worse = False
        self._injecting = False
        self.hung = threading.Event()

    def train_once(self):
        stats = super().train_once()
        n, flag = self.faults["hang_once_after"], os.environ.get(HANG_FLAG_ENV)
        if n is not None and flag and self.local_steps >= n and not os.path.exists(flag):
            open(flag, "w").close()
            log.info("fault: trainer hangs now (stops reading records and beating)")
            self.hung.set()
            while True:
                time.sleep(3600)
        return stats

    def recv(self, conn):
        while self.hung.is_set():
            time.sleep(3600)
        return super().recv(conn)

    def sample_batch(self):
        batch = super().sample_batch()
        a, b = self.faults["nan_steps"]
        if a <= self.local_steps + 1 <= b:
            batch.target_hidden.fill_(float("nan"))
        return batch

    def candidate(self):
        model, state = super().candidate()
        if self.faults.get("serve_worse_version") == self.slot.published + 1:   # the guard scores `model`
            state = {**state, "norm.weight": -state["norm.weight"]}
            log.info("fault: version %d will be published with its final norm negated (the guard scores the "
                     "good candidate)", self.slot.published + 1)
        threshold = self.faults["worse_once_live_tau"]
        self._injecting = False
        if threshold is None or self.injected_worse or self.score(self.live) < threshold:
            return model, state
        self.injected_worse = self._injecting = True
        state["norm.weight"] = -state["norm.weight"]
        worse = self.kind.from_scratch(self.draft.cfg)
        worse.load_state_dict({**self.draft.state_dict(), **state})     # the kind's fixed weights as loaded
        self.attach(worse)
        return worse, state

    def maybe_publish(self):
        before = self.slot.published
        super().maybe_publish()
        if self._injecting:
            self._injecting = False
            outcome = "was PUBLISHED" if self.slot.published > before else "was refused"
            log.info("fault: the injected-worse candidate %s (guard: candidate tau %.3f, live %.3f)", outcome,
                     self.slot.header.candidate_tau, self.slot.header.live_tau)


if __name__ == "__main__":
    sys.exit(main(trainer_cls=FaultyTrainer))
