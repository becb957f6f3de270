"""The draft that serves is the draft that was swapped in (issue 27, item 1; sglang_ext/online/scheduler/refresh.py),
against real SGLang on the CPU platform (float32, DFLASH and EAGLE3 as a chain, 4 tokens per verify, radix cache
on): a shared system prompt
is cached under the first draft version; the trainer learns from live traffic and at least 3 versions are
swapped in; then the same probe drafts exactly as it does right after /flush_cache (equal accept lengths and
outputs) while its prefix comes from the radix cache (its cached_tokens say so), because the prefix's draft KV,
written by version 0, is re-projected from the feature pool under the live version before the draft reads it
(DFlash: the context projection of the target features; EAGLE3: its layer's K/V of the next token's embedding and
the aux features).
The control: the probe served again with its prefix cached under the live version agrees too. On /metrics,
refreshed tokens are counted and no stale token is served."""
import time

import pytest

from sglang_ext.demo.prompts import chat_prompt, system_turn
from sglang_ext.demo.traffic import make_random_draft, online_metrics, send_traffic
from sglang_ext.demo.workload import record_prompt
from sglang_ext.launcher import draft_args, launch_server, metric_value
from sglang_ext.online.config import OPT_OUT_KEY

pytestmark = pytest.mark.server
BLOCK = 4
MAX_NEW = 32
MIN_SWAPS = 3
ATTEMPTS = 8                   # probe triples tried until one ran under a single live version
LR = {"dflash": "1e-3", "eagle3": "1e-2"}   # versions far enough apart that stale draft KV shows
EAGLE3_AUX_LAYERS = [1, 2, 3]  # SGLang's default aux layers collide for the 6-layer target


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_cached_prefix_drafts_as_after_flush_across_swaps(kind, quick_workload, server_log_dir, tmp_path):
    records = quick_workload.prompts("A", "train")
    traffic = [record_prompt(r) for r in records if not record_prompt(r)[1]]        # text prompts
    system = system_turn("You are a careful Python programmer. Here is the module under review:\n"
                         + "\n".join(t for t, _ in traffic[:3]))
    question = records[-1]["messages"][0]["content"]
    probe = system + chat_prompt(question if isinstance(question, str) else "Explain the module.")
    draft = make_random_draft(quick_workload.target_dir, tmp_path / "random-draft", block_size=BLOCK, kind=kind,
                              target_layers=EAGLE3_AUX_LAYERS if kind == "eagle3" else None)
    args = draft_args(draft, BLOCK) + [
        "--online-train", "--online-train-lr", LR[kind], "--online-train-swap-every", "5",
        "--online-train-min-records", "4", "--online-train-holdout-every", "5"]

    with launch_server(quick_workload.target_dir, args, log_dir=server_log_dir,
                       name=f"online-kv-refresh-{kind}") as server:
        def served() -> dict:
            r = server.generate(probe, max_new_tokens=MAX_NEW, custom_params={OPT_OUT_KEY: True})
            meta = r["meta_info"]
            return {"output_ids": r["output_ids"], "accept": meta["spec_accept_length"],
                    "histogram": meta.get("spec_correct_drafts_histogram"),     # verify steps by drafts accepted
                    "cached": meta.get("cached_tokens", 0), "prompt": meta["prompt_tokens"]}

        first = served()                                       # the prefix's draft KV: version 0
        assert online_metrics(server)["draft_version"] == 0
        cached_at = 0                                          # the version that wrote the cached prefix's KV

        def train_until(predicate, timeout=600):
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, f"no swap in {timeout}s: {online_metrics(server)}"
                send_traffic(server, traffic, list(range(len(traffic))), max_new_tokens=MAX_NEW)

        train_until(lambda: online_metrics(server)["swaps_total"] >= MIN_SWAPS)
        trials = []
        for _ in range(ATTEMPTS):
            train_until(lambda: online_metrics(server)["draft_version"] != cached_at)
            live = online_metrics(server)["draft_version"]
            cached = served()                                  # prefix from the radix cache, KV of `cached_at`
            assert "Cache flushed" in server.get_text("/flush_cache")
            fresh = served()                                   # prefix computed again under the live version
            control = served()                                 # prefix cached under the live version
            after = online_metrics(server)["draft_version"]
            trials.append({"stale_version": cached_at, "live": live, "after": after, "cached": cached,
                           "fresh": fresh, "control": control})
            print({k: (v["accept"], v["cached"], v["histogram"]) if isinstance(v, dict) else v
                   for k, v in trials[-1].items()}, flush=True)
            cached_at = after
            if after == live:
                break
        text = server.metrics()

    trial = trials[-1]
    assert trial["live"] == trial["after"] != trial["stale_version"], \
        f"no probe triple ran under one live version in {ATTEMPTS} tries: {trials}"
    cached, fresh, control = trial["cached"], trial["fresh"], trial["control"]
    # the cached probe really read its prefix from the radix cache, the fresh one did not
    assert cached["cached"] >= len(system) // 8 and control["cached"] >= len(system) // 8, trial
    assert fresh["cached"] < cached["cached"], trial
    # the target's greedy output never depends on the draft
    assert cached["output_ids"] == fresh["output_ids"] == control["output_ids"] == first["output_ids"]
    # control: a prefix cached under the live version drafts as a fresh prefill
    assert control["accept"] == fresh["accept"] and control["histogram"] == fresh["histogram"], trial
    # the point: a prefix cached under version 0, served after >= 3 swaps, drafts as the live version does
    assert cached["accept"] == fresh["accept"] and cached["histogram"] == fresh["histogram"], trial
    assert metric_value(text, "sglang:online_train_draft_kv_refreshed_tokens_total") >= cached["cached"]
    assert metric_value(text, "sglang:online_train_draft_kv_stale_tokens_served_total") == 0
    assert metric_value(text, "sglang:online_train_swaps_total") >= MIN_SWAPS
