"""A server restart with --online-train-checkpoint-dir holding an earlier run's versions (issue 14, item 4), against
real SGLang on the CPU platform (float32): the first server exports its accepted versions under
<dir>/<run id>/version-NNNNNN/ and keeps the newest --online-train-keep-checkpoints; the second, started on the
first run's newest export with the same directory, writes its own run directory, keeps at most keep_checkpoints of
its own versions, and leaves every byte of the first run's versions as it was (a partial export the first
server's stop cut short, if any, is deleted). Directories 0700, files 0600. Greedy output
equals plain serving throughout. (The unit-level twin, with the supervisor and trainer but no server, is in
tests/test_online_safety.py.)"""
import hashlib
import time
from pathlib import Path

import pytest

from sglang_ext.launcher import draft_args, launch_server
from sglang_ext.online.trainer.checkpoints import PARTIAL_EXPORT, VERSION_DIR
from support.checkpoints import assert_private_run, in_partial_export, mode

pytestmark = pytest.mark.server
BLOCK = 4
MAX_NEW = 16
KEEP = 2
VERSIONS_WITHIN_S = 300    # traffic until KEEP + 1 swaps, however slow the trainer is on a loaded machine


def contents(run_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `run_dir` but partial exports."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and not in_partial_export(p, run_dir)}


def serve_until_versions(tiny, draft: Path, ckpt: Path, requests, expected, server_log_dir, name: str) -> int:
    """A server that swaps in (and exports) a version every two training steps; traffic until it has exported
    KEEP + 1 versions. Returns the last version exported."""
    from sglang_ext.demo.traffic import online_metrics

    config = ckpt.parent / "online.json"
    config.write_text('{"guard_tolerance": 1.0}')           # every finite candidate passes the guard
    args = draft_args(draft, BLOCK) + [
        "--online-train", "--online-train-config", str(config), "--online-train-lr", "1e-9",
        "--online-train-swap-every", "2", "--online-train-min-records", "2", "--online-train-holdout-every", "2",
        "--online-train-batch-size", "2", "--online-train-num-anchors", "8",
        "--online-train-checkpoint-dir", str(ckpt), "--online-train-keep-checkpoints", str(KEEP)]
    with launch_server(tiny.dense, args, log_dir=server_log_dir, name=name) as server:
        version, r, deadline = 0, 0, time.monotonic() + VERSIONS_WITHIN_S
        while time.monotonic() < deadline:
            for i, (req, want) in enumerate(zip(requests, expected)):
                got = server.generate(req[0], req[1], max_new_tokens=MAX_NEW)
                assert got["output_ids"] == want[:MAX_NEW], (name, r, i)     # greedy output unchanged
            version = int(online_metrics(server)["draft_version"])
            if version > KEEP:
                break
            r += 1
        assert version > KEEP, f"{name}: only {version} versions swapped in after {r} rounds ({VERSIONS_WITHIN_S} s)"
        deadline = time.monotonic() + 60                        # the export follows the swap
        while not list(ckpt.glob(f"run-*/version-{version:06d}/model.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.5)
    return version


def assert_kept_newest(run_dir: Path, last_seen: int) -> int:
    """`run_dir` holds exactly the KEEP newest versions of its run (the trainer may publish more after the
    traffic stops, so the newest is at least the last one seen); returns the newest."""
    kept = sorted(p.name for p in run_dir.iterdir() if VERSION_DIR.fullmatch(p.name))
    newest = int(kept[-1].removeprefix("version-"))
    assert newest >= last_seen and kept == [f"version-{v:06d}" for v in range(newest - KEEP + 1, newest + 1)], kept
    return newest


def test_restart_keeps_the_earlier_runs_checkpoints(tiny, plain_reference, server_log_dir, tmp_path):
    requests, expected = plain_reference("dense", MAX_NEW)
    requests, expected = requests[:4], expected[:4]
    ckpt = tmp_path / "ckpt"

    last1 = serve_until_versions(tiny, tiny.draft_dense, ckpt, requests, expected, server_log_dir, "ckpt-run-1")
    (run1,) = ckpt.iterdir()
    assert run1.name.startswith("run-")
    newest1 = assert_kept_newest(run1, last1)
    before = contents(run1)

    # Restart: resume from the first run's newest export, same checkpoint directory.
    last2 = serve_until_versions(tiny, run1 / f"version-{newest1:06d}", ckpt, requests, expected, server_log_dir,
                                 "ckpt-run-2")
    runs = sorted(ckpt.iterdir())
    assert len(runs) == 2 and run1 in runs
    (run2,) = [r for r in runs if r != run1]
    assert contents(run1) == before                              # nothing of the earlier run deleted or changed
    assert not list(run1.glob(PARTIAL_EXPORT))                   # ... but a partial export, if its stop left one
    assert_kept_newest(run2, last2)                              # its own versions, pruned to KEEP

    assert mode(ckpt) == 0o700
    for run in (run1, run2):
        assert_private_run(run)
