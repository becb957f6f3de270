"""Rollback on served acceptance (issue 14, item 6; sglang_ext/online/swap/rollback.py) and per-version acceptance on
/metrics (item 7): the watch's decisions, the weight slot's keep buffer, the trainer's reset to the restored
weights, the role-labelled per-version series; and against real SGLang on the CPU platform (float32, DFLASH,
block size 4): a version that passes the held-out guard but serves worse (test-only fault: the trainer publishes
the good candidate's weights with the final norm negated, after the guard scored the good one) is rolled back
after at most --online-train-rollback-steps verify steps, counted on /metrics, with greedy output equal to plain
serving throughout."""
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.swap.rollback import RollbackWatch, load_draft_weights

# -- the watch ------------------------------------------------------------------------------------------------


def test_watch_rolls_back_a_version_that_serves_worse():
    watch = RollbackWatch(steps=10, tolerance=0.25)
    watch.observe([3, 3, 2, 3, 3, 3, 2, 3], version=0)          # version 0's recent level: 2.75
    assert not watch.busy
    assert watch.swapped(1) and watch.busy                        # on probation: nothing newer may go live
    assert watch.observe([3] * 4, version=0) is None             # late steps of version 0 do not count for 1
    assert watch.observe([1] * 6, version=1) is None
    verdict = watch.observe([1, 2, 1, 1, 1, 1, 1], version=1)    # the 10th step decides (the rest ignored)
    assert verdict is not None and verdict.rollback and verdict.version == 1 and verdict.steps == 10
    assert verdict.baseline == pytest.approx(2.75) and verdict.served == pytest.approx(1.1)
    assert watch.busy and watch.take_rollback() is verdict
    assert watch.rolled_back() == 0                               # version 0 live again, its level kept
    assert not watch.busy and watch.take_rollback() is None
    assert watch.live == 0 and list(watch.recent) == [3, 3, 2, 3, 3, 3, 2, 3]


def test_watch_keeps_a_version_within_the_tolerance():
    watch = RollbackWatch(steps=4, tolerance=0.25)
    watch.observe([2, 2, 2, 2, 2], version=0)                    # only the last 4 are the recent level
    assert watch.swapped(1)
    verdict = watch.observe([2, 2, 2, 1], version=1)              # 1.75: dropped by exactly 0.25, kept
    assert verdict is not None and not verdict.rollback
    assert not watch.busy and watch.take_rollback() is None
    assert list(watch.recent) == [2, 2, 2, 1]                      # its probation is its recent level
    assert watch.swapped(2)                                        # the next version is judged against it
    assert watch.observe([1, 1, 1, 1], version=2).rollback         # 1.0 < 1.75 - 0.25


def test_watch_does_not_judge_without_a_baseline():
    watch = RollbackWatch(steps=8, tolerance=0.25)                  # min_baseline: steps // 4 = 2
    watch.observe([3], version=0)
    assert not watch.swapped(1) and not watch.busy                  # one step of version 0: nothing to compare
    assert watch.observe([1] * 20, version=1) is None
    assert watch.swapped(2)                                         # version 1 served enough meanwhile
    with pytest.raises(RuntimeError):
        RollbackWatch(steps=4, tolerance=0.1).rolled_back()
    with pytest.raises(ValueError):
        RollbackWatch(steps=0, tolerance=0.1)


# -- the weight slot's keep buffer, the trainer's reset ---------------------------------------------------------

@pytest.fixture(scope="module")
def draft_dir(tiny, tmp_path_factory):
    from sglang_ext.demo.traffic import make_random_draft
    return make_random_draft(tiny.dense_random, tmp_path_factory.mktemp("draft") / "d", block_size=4)


def test_slot_keep_buffer(draft_dir):
    layout = ws.draft_layout(draft_dir)
    plain = ws.WeightSlot.create(layout)
    owner = ws.WeightSlot.create(layout, torch.bfloat16, keep=True)
    try:
        assert not plain.has_keep and owner.has_keep
        with pytest.raises(RuntimeError, match="keep buffer"):
            plain.keep
        assert os.fstat(owner.fd).st_size == ws.slot_bytes(layout, torch.bfloat16, keep=True)
        weights = load_draft_weights(draft_dir, layout, torch.bfloat16)      # version 0, in the serving dtype
        for name, t in weights.items():
            owner.keep[name].copy_(t)
        other = ws.WeightSlot.attach(os.dup(owner.fd), layout, torch.bfloat16)   # keep inferred from the size
        assert other.has_keep and other.keep.keys() == weights.keys()
        assert all(torch.equal(other.keep[n], weights[n]) for n in weights)
        for name in weights:                      # the keep buffer is not one of the two version buffers
            assert other.keep[name].data_ptr() not in (owner.weights_of(0)[name].data_ptr(),
                                                       owner.weights_of(1)[name].data_ptr())
        other.close()
    finally:
        plain.close()
        owner.close()


def test_trainer_resets_to_the_restored_version(tiny, draft_dir):
    """The slot says version 2 was rolled back to version 1 (in the keep buffer): the trainer loads it into the
    draft and the guard's live copy, starts a fresh optimizer and marks the versions it published before as stale;
    a trainer started later (a restart) goes on from the keep buffer too."""
    from test_online_trainer_unit import _trainer

    slot = ws.WeightSlot.create(ws.draft_layout(draft_dir), keep=True)
    trainer, _ = _trainer(tiny, draft_dir, slot=slot)
    restored = {n: torch.randn_like(t) for n, t in slot.keep.items()}
    for name, t in restored.items():
        slot.keep[name].copy_(t)
    h = slot.header
    h.keep_version, h.live_in_keep, h.rolled_back_version = 1, 1, 2
    h.published = h.applied = 3                                      # 3 was trained from 2 before the reset
    assert not trainer.reset_after_rollback()                        # no rollback yet
    h.rollbacks = 1
    assert trainer.reset_after_rollback()
    assert h.rollback_seen == 1 and h.reset_published == 3
    draft_state, live_state = trainer.draft.state_dict(), trainer.live.state_dict()
    for name, t in restored.items():
        assert torch.equal(draft_state[name].float(), t) and torch.equal(live_state[name].float(), t), name
    assert not trainer.reset_after_rollback()                        # once per rollback
    restarted, _ = _trainer(tiny, draft_dir, slot=slot)             # live_in_keep, nothing newer published
    assert restarted.resumed_version == 1
    assert all(torch.equal(restarted.draft.state_dict()[n].float(), t) for n, t in restored.items())
    slot.close()


def test_per_version_metrics_roles():
    """Two label values (role current / previous), moved at each swap and exchanged by a rollback (in a fresh
    process: prometheus_client's registry is global)."""
    code = r"""
from prometheus_client import REGISTRY, generate_latest
from sglang_ext.online.metrics import OnlineMetrics
m = OnlineMetrics({"model_name": "t"})
m.verified([1, 3, 4], 4)
m.swapped(1, 0.001, 0)
m.verified([2, 2], 4, version=0)          # verified late: version 0's steps
m.verified([1, 1], 4)
m.swapped(2, 0.001, 0)
m.verified([1], 4)
m.rolled_back(2, 1)
m.verified([2], 4)
print(generate_latest(REGISTRY).decode())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
                         ).stdout
    from sglang_ext.launcher import metric_value

    def role(name, r):
        return metric_value(out, f"sglang:online_train_version_{name}", role=r)
    assert role("number", "current") == 1 and role("number", "previous") == 2
    assert role("verify_steps", "current") == 3 and role("accept_length", "current") == pytest.approx(4 / 3)
    assert role("accepted_tokens", "current") == 1 and role("proposed_drafts", "current") == 9
    assert role("verify_steps", "previous") == 1 and role("accept_length", "previous") == 1.0
    assert metric_value(out, "sglang:online_train_rollbacks_total") == 1
    assert metric_value(out, "sglang:online_train_draft_version") == 1
    series = [line for line in out.splitlines() if line.startswith("sglang:online_train_version_accept_length{")]
    assert len(series) == 2, series                                  # bounded: two label values, ever

    # The accept-length histogram per role (cumulative buckets as gauges): current = version 1, served [1, 1]
    # then, after the rollback, [2]; previous = version 2, served [1].
    def bucket(r, le):
        return metric_value(out, "sglang:online_train_version_accept_length_bucket", role=r, le=le)
    assert [bucket("current", le) for le in ("1.0", "2.0", "3.0", "32.0", "+Inf")] == [2, 3, 3, 3, 3]
    assert [bucket("previous", le) for le in ("1.0", "2.0", "+Inf")] == [1, 1, 1]
    hist = [line for line in out.splitlines()
            if line.startswith("sglang:online_train_version_accept_length_bucket{")]
    assert len(hist) == 2 * 13, hist                                  # 12 bounds + Inf, two roles, ever


# -- against real SGLang ----------------------------------------------------------------------------------------

BLOCK = 4
MAX_NEW = 24
ROLLBACK_STEPS = 48
ROLLBACK_WITHIN_S = 300    # rounds until a whole round has served after the rollback, on a loaded machine too
ROLLED_BACK = re.compile(r"draft version (\d+) rolled back after (\d+) verify steps: version (\d+) restored")


def steps_and_histogram(metrics_text: str) -> dict[str, tuple[float, float]]:
    """role -> (version_verify_steps, its accept-length histogram's +Inf bucket) in one /metrics scrape."""
    from sglang_ext.launcher import metric_value
    return {role: (metric_value(metrics_text, "sglang:online_train_version_verify_steps", role=role),
                   metric_value(metrics_text, "sglang:online_train_version_accept_length_bucket", role=role,
                                le="+Inf"))
            for role in ("current", "previous")}


@pytest.mark.server
def test_a_version_that_serves_worse_is_rolled_back(tiny, plain_reference, server_log_dir, tmp_path):
    from sglang_ext.demo.traffic import online_metrics
    from sglang_ext.launcher import draft_args, launch_server, metric_value
    from support.plugin import plugin_env

    requests, expected = plain_reference("dense", MAX_NEW)
    config = tmp_path / "online.json"
    config.write_text('{"guard_tolerance": 1.0}')           # the guard passes the (good) candidate it scores
    args = draft_args(tiny.draft_dense, BLOCK) + [
        "--online-train", "--online-train-config", str(config), "--online-train-lr", "1e-9",
        "--online-train-swap-every", "2", "--online-train-min-records", "2", "--online-train-holdout-every", "2",
        "--online-train-batch-size", "2", "--online-train-num-anchors", "8",
        "--online-train-rollback-steps", str(ROLLBACK_STEPS), "--online-train-rollback-tolerance", "0.25"]
    rounds = []
    with launch_server(tiny.dense, args, log_dir=server_log_dir, name="online-rollback",
                       env=plugin_env(trainer_faults="serve_worse_version=1")) as server:
        r, deadline = 0, time.monotonic() + ROLLBACK_WITHIN_S
        while time.monotonic() < deadline:
            with ThreadPoolExecutor(1) as pool:                     # one at a time: clean per-step acceptance
                results = list(pool.map(lambda req: server.generate(req[0], req[1], max_new_tokens=MAX_NEW),
                                        requests))
            for i, (want, got) in enumerate(zip(expected, results)):   # greedy output unchanged throughout
                assert got["output_ids"] == want, (r, i)
            m = online_metrics(server)
            text = server.metrics()
            rounds.append({"round": r, "tau": sum(x["meta_info"]["spec_accept_length"] for x in results) / len(results),
                           "version": m["draft_version"], "swaps": m["swaps_total"],
                           "rollbacks": metric_value(text, "sglang:online_train_rollbacks_total"),
                           "steps_and_histogram": steps_and_histogram(text)})
            print(rounds[-1], flush=True)
            if rounds[-1]["rollbacks"] >= 1 and len(rounds) >= 2 and rounds[-2]["rollbacks"] >= 1:
                break                                               # a whole round served after the rollback
            r += 1
        deadline = time.monotonic() + 30
        while "the server rolled draft version" not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        log_text = server.log_path.read_text()
        text = server.metrics()

    for line in log_text.splitlines():                # the watch's verdicts, for the record
        if "sglang_ext: draft version" in line and ("rolled back after" in line or "kept after" in line
                                                     or "not applied" in line):
            print(line[line.find("sglang_ext:"):])
    assert "fault: version 1 will be published with its final norm negated" in log_text
    rolled = ROLLED_BACK.findall(log_text)
    assert rolled, log_text[-4000:]
    version, steps, restored = map(int, rolled[0])
    assert (version, restored) == (1, 0) and steps <= ROLLBACK_STEPS, rolled
    assert metric_value(text, "sglang:online_train_rollbacks_total") >= 1
    assert "the server rolled draft version 1 back to version 0" in log_text    # the trainer reset to it
    # per-version acceptance on /metrics: the two roles, and version 1 served worse than version 0 did
    series = [line for line in text.splitlines() if line.startswith("sglang:online_train_version_accept_length{")]
    assert len(series) == 2 and all('role="current"' in x or 'role="previous"' in x for x in series), series
    # each role's histogram counts the same verify steps as its mean, in every scrape (a version that went live
    # just before a scrape may have none yet: some scrape must show counted steps)
    scrapes = [x["steps_and_histogram"] for x in rounds] + [steps_and_histogram(text)]
    for scrape in scrapes:
        for role, (verify_steps, inf_bucket) in scrape.items():
            assert inf_bucket == verify_steps, (role, scrape)
    assert max(verify_steps for scrape in scrapes for verify_steps, _ in scrape.values()) > 0, scrapes
    served = re.search(r"draft version 1 serves worse than the previous version \(mean accept length ([\d.]+) over "
                       r"\d+ verify steps vs ([\d.]+)", log_text)
    assert served and float(served.group(1)) < float(served.group(2)) - 0.25, served
    assert rounds[-1]["tau"] > float(served.group(1)), rounds         # serving recovered after the rollback
