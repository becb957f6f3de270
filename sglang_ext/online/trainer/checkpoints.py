"""Checkpoints of the online trainer (trainer process): every accepted version exported for offline use.

    <checkpoint_dir>/<run id>/version-NNNNNN/     one per accepted version, the newest `keep` of this run kept

The run id is chosen once per server start by the supervisor. Directories are 0700 and files 0600 (a draft
trained on user traffic can memorise it). The trainer holds <run id>/.run.lock (flock) while it lives, so a
partial export of an ended run (killed mid-export at shutdown) is told from a live server's and deleted by the
next run's trainer. A stop signal (SIGTERM / SIGINT) that arrives while an export is being committed (renamed into
place, the oldest versions pruned) takes effect once that is done, so a stopped run never keeps more than `keep`.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("sglang_ext.trainer")
VERSION_DIR = re.compile(r"version-\d{6}")    # a checkpoint of a run: <checkpoint_dir>/<run id>/version-NNNNNN
PARTIAL_EXPORT = ".version-*.tmp"   # an export being written (renamed to version-NNNNNN when complete)
RUN_LOCK = ".run.lock"          # <run dir>/.run.lock: flock'd by the run's trainer while it lives (freed by any exit)


_committing = False            # inside CheckpointWriter's commit: a stop signal waits for its end
_stop_signal: int | None = None


def _stop(signum, frame) -> None:
    global _stop_signal
    if _committing:
        _stop_signal = signum
    else:
        _die_of(signum)


def _die_of(signum: int) -> None:
    """End this process the way `signum`'s default action would (killed by that signal, as without a handler)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def stop_signals_wait_for_commits() -> None:
    """In the trainer's main: SIGTERM and SIGINT end the process as before (killed by the signal), except during
    a checkpoint's commit, which they let finish first (a few renames and deletes)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


@contextmanager
def _commit():
    global _committing
    _committing = True
    try:
        yield
    finally:
        _committing = False
        if _stop_signal is not None:
            _die_of(_stop_signal)


def private_dir(path: Path) -> None:
    """`path` exists as a directory of mode 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def make_private(path: Path) -> None:
    """Everything under `path`: directories 0700, files 0600."""
    for p in path.rglob("*"):
        os.chmod(p, 0o700 if p.is_dir() else 0o600)


def hold_run_lock(run_dir: Path) -> int | None:
    """Lock `run_dir` as this process's (an flock on its RUN_LOCK file, 0600, released when the process exits
    however it exits); returns the fd to keep open, or None when another live process holds it."""
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def sweep_partial_exports(root: Path, own_run: Path) -> int:
    """Delete the partial exports (PARTIAL_EXPORT: a trainer killed mid-export, e.g. at server shutdown) of
    every run under `root` that has ended: its RUN_LOCK exists and no process holds it. Live runs (other
    servers sharing the directory), directories without a lock and complete versions are left alone. Returns
    the number deleted."""
    swept = 0
    for run_dir in sorted(root.iterdir()):
        if run_dir == own_run or not (run_dir / RUN_LOCK).is_file() or not any(run_dir.glob(PARTIAL_EXPORT)):
            continue
        fd = hold_run_lock(run_dir)
        if fd is None:                                  # its trainer lives
            continue
        try:
            for partial in run_dir.glob(PARTIAL_EXPORT):
                shutil.rmtree(partial, ignore_errors=True)
                swept += 1
                log.info("removed %s: a partial export of an ended run", partial)
        finally:
            os.close(fd)
    return swept


class CheckpointWriter:
    def __init__(self, checkpoint_dir: str, run_id: str, keep: int):
        self.root = Path(checkpoint_dir)
        self.run_dir = self.root / run_id
        self.keep = keep
        self.run_lock_fd: int | None = None     # RUN_LOCK of the run directory, taken at the first export

    def write(self, model, version: int) -> None:
        """Export `model` (the accepted version) to <checkpoint_dir>/<run id>/version-NNNNNN/ (directories 0700,
        files 0600: a draft trained on user traffic can memorise it), written under a temp name and renamed, then
        prune this run's oldest versions to keep_checkpoints. Other runs' directories (earlier server starts, other
        servers sharing checkpoint_dir) keep every version; of an ended run (its RUN_LOCK free) the partial export a
        shutdown cut short is deleted, once per trainer process."""
        root, run_dir = self.root, self.run_dir
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)     # an existing root keeps its mode
            private_dir(run_dir)
            if self.run_lock_fd is None:                           # this process's first export
                self.run_lock_fd = hold_run_lock(run_dir)
                sweep_partial_exports(root, run_dir)                # ... left by runs that have ended
            for stale in run_dir.glob(PARTIAL_EXPORT):             # an export cut short by a trainer restart
                shutil.rmtree(stale, ignore_errors=True)
            tmp = run_dir / f".version-{version:06d}.tmp"
            private_dir(tmp)
            model.export(tmp)
            make_private(tmp)
            final = run_dir / f"version-{version:06d}"
            with _commit():                 # a stop signal now waits for the pruning: never more than keep left
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
                kept = sorted(p for p in run_dir.iterdir() if VERSION_DIR.fullmatch(p.name) and p.is_dir())
                for old in kept[:max(0, len(kept) - self.keep)]:
                    doomed = run_dir / f".{old.name}.tmp"   # out of the versions at once; swept if cut short
                    os.rename(old, doomed)
                    shutil.rmtree(doomed)
        except OSError:
            log.exception("could not write the checkpoint of version %d to %s", version, run_dir)
