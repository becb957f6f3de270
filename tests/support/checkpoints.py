"""Checks of an --online-train checkpoint run directory (<checkpoint_dir>/<run id>/) shared by the real-server
tests: which paths belong to a partial export, and the directory's privacy."""
from __future__ import annotations

import fnmatch
import stat
from pathlib import Path

from sglang_ext.online.trainer.checkpoints import PARTIAL_EXPORT, RUN_LOCK


def in_partial_export(p: Path, run_dir: Path) -> bool:
    """`p` is (in) a partial export (a trainer killed mid-export when its server stopped)."""
    return fnmatch.fnmatch(p.relative_to(run_dir).parts[0], PARTIAL_EXPORT)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private_run(run_dir: Path) -> None:
    """The run directory, its lock and everything in it are 0700 (directories) / 0600 (files); a partial
    export's directory is 0700, its contents (cut short before they were made private) are not checked."""
    assert mode(run_dir) == 0o700 and mode(run_dir / RUN_LOCK) == 0o600, run_dir
    for p in run_dir.rglob("*"):
        if in_partial_export(p, run_dir) and p.parent != run_dir:
            continue
        assert mode(p) == (0o700 if p.is_dir() else 0o600), (p, oct(mode(p)))
