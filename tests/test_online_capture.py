"""--online-train, part 1, against real SGLang on the CPU platform: serving is unchanged, the captured
features are HF's pre-deepstack features and the very tensors the live draft consumed, the persisted shards
hold exactly the finished requests (never one that opted out), /metrics agrees with meta_info, trainer/finetune.py
trains on them, and radix-cache hits of multi-turn traffic are filled with the features first consumed."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sglang_ext.demo.prompts import chat_prompt, make_image, mixed_requests
from sglang_ext.launcher import ServerError, draft_args, launch_server, metric_value
from support.plugin import plugin_env
from support.servers import launch_servers, run_concurrently

pytestmark = pytest.mark.server
MAX_NEW = 20
BUDGET_BYTES = 300_000          # small, so the in-memory buffer must evict


def persisted_rids(persist: Path) -> set:
    """The rids of the records in the replay directory now (empty until the first shard lands)."""
    from trainer.replay import ReplayError, ReplayReader
    try:
        reader = ReplayReader(persist)
        return {reader.read(i).meta["rid"] for i in range(len(reader))}
    except (ReplayError, OSError):
        return set()


def _dumps_by_rid(dump_dir: Path) -> dict:
    """rid -> {start position: (features [n, F], draft layer-0 keys [n, Hkv, D])} from the debug dump."""
    out: dict = {}
    for path in sorted(dump_dir.glob("call-*.pt")):
        d = torch.load(path)
        for rid, start, feats, keys in zip(d["rids"], d["starts"], d["features"], d["draft_k_layer0"]):
            out.setdefault(rid, {})[int(start)] = (feats, keys)
    return out


def _assemble(chunks: dict, length: int, feature_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.zeros(length, feature_dim)
    covered = torch.zeros(length, dtype=torch.bool)
    for start, (f, _) in sorted(chunks.items()):
        n = min(f.shape[0], length - start)
        if n > 0:
            feats[start:start + n] = f[:n]
            covered[start:start + n] = True
    return feats, covered


@pytest.fixture(scope="module")
def plain_outputs(plain_reference):
    """mixed_requests(6, 2) and a plain server's greedy outputs (conftest's session-wide plain_reference)."""
    return plain_reference("dense", MAX_NEW)


def test_online_train_dense_end_to_end(tiny, server_log_dir, plain_outputs, tmp_path):
    from trainer.dflash_draft import DFlashDraft, rope_cos_sin
    from trainer.hf_target import HFTarget
    from trainer.replay import ReplayReader

    requests, expected = plain_outputs
    persist, dump_dir = tmp_path / "replay", tmp_path / "dump"
    dump_dir.mkdir()
    # Small prefill chunks: every prompt here is prefilled in several chunks (the plain server does not chunk).
    # Capture only (part 1): no trainer, so the live draft keeps the weights the checks below recompute with.
    args = draft_args(tiny.draft_dense) + ["--online-train", "--online-train-capture-only",
                                            "--online-train-persist-dir", str(persist),
                                            "--online-train-shard-seconds", "1",   # a shard a second, read here
                                            "--online-train-replay-budget", str(BUDGET_BYTES),
                                            # malloc_trim all through the run: serving and capture unchanged
                                            "--online-train-malloc-trim-seconds", "0.5",
                                            "--chunked-prefill-size", "16"]
    with launch_server(tiny.dense, args, log_dir=server_log_dir, name="online-dense",
                       env=plugin_env(dump_dir=dump_dir)) as server:
        before = server.metrics()
        sequential = [server.generate(t, im, max_new_tokens=MAX_NEW) for t, im in requests]
        after_sequential = server.metrics()

        # Concurrent traffic: mixed text/image requests, two long ones aborted while running.
        concurrent_reqs = mixed_requests(n_text=4, n_image=2)
        aborted_rids = [f"to-abort-{i}" for i in range(2)]

        def long_request(rid):
            body = {"text": chat_prompt("Tell me a very long story."), "rid": rid,
                    "sampling_params": {"max_new_tokens": 1000, "temperature": 0.0, "ignore_eos": True}}
            try:
                return server.post("/generate", body)
            except ServerError as e:
                return {"error": str(e)}

        # ... and two requests that opted out of training (custom_params), through /generate and the OpenAI API.
        opt_out = {"online_train_opt_out": True}
        opted_out_rids = ["opted-out-generate", "opted-out-chat"]
        opted_out_bodies = [
            ("/generate", {"text": requests[0][0], "rid": opted_out_rids[0], "sampling_params": {
                "max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True, "custom_params": opt_out}}),
            ("/v1/chat/completions", {"model": "default", "rid": opted_out_rids[1], "max_tokens": 8,
                                      "temperature": 0.0, "custom_params": opt_out,
                                      "messages": [{"role": "user", "content": "Name a colour."}]})]

        with ThreadPoolExecutor(10) as pool:
            long_futures = [pool.submit(long_request, rid) for rid in aborted_rids]
            futures = [pool.submit(server.generate, t, im, MAX_NEW) for t, im in concurrent_reqs]
            opted_futures = [pool.submit(server.post, path, body) for path, body in opted_out_bodies]
            time.sleep(3.0)
            for rid in aborted_rids:
                server.post("/abort_request", {"rid": rid})
            concurrent = [f.result() for f in futures]
            aborted = [f.result() for f in long_futures]
            opted_generate, opted_chat = [f.result() for f in opted_futures]

        finished = sequential + concurrent
        # Records are assembled after the response goes out, and the warm-up request's record counts too: wait
        # until every finished request is in the shards, not only for the counters to reach len(finished).
        finished_rids = {r["meta_info"]["id"] for r in finished}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            metrics = server.metrics()
            if metric_value(metrics, "sglang:online_train_persisted_records_total") >= \
                    metric_value(metrics, "sglang:online_train_recorded_records_total") >= len(finished) and \
                    finished_rids <= persisted_rids(persist):
                break
            time.sleep(0.5)

    # 1. Serving is unchanged: greedy DFLASH + capture == plain serving (float32).
    assert [r["output_ids"] for r in sequential] == expected
    for a in aborted:
        reason = a.get("meta_info", {}).get("finish_reason", {}) if "error" not in a else {"type": "abort"}
        assert reason.get("type") == "abort", a
        assert len(a.get("output_ids", [])) < 1000

    # Opted-out requests are served as usual (greedy output as plain serving) ...
    assert opted_generate["output_ids"] == expected[0]
    assert opted_chat["choices"][0]["message"]["content"]

    # 2. The shards hold exactly the finished requests, tokens in order, loss mask on generated tokens.
    reader = ReplayReader(persist)
    assert not reader.skipped
    records = {}
    for i in range(len(reader)):
        rec = reader.read(i)
        records[rec.meta["rid"]] = rec
    assert finished_rids <= set(records)
    assert not set(aborted_rids) & set(records)
    # Opted-out requests are recorded nowhere: not in the shards, which hold every record the buffer made (the
    # trainer is fed the same records), and counted.
    assert not set(opted_out_rids) & set(records)
    assert metric_value(metrics, "sglang:online_train_dropped_requests_total", reason="opted_out") == 2
    assert len(set(records) - set(finished_rids)) <= 1            # SGLang's own startup warmup request
    hf = HFTarget(tiny.dense, device="cpu", dtype=torch.float32)
    for (text, images), result in zip(requests + concurrent_reqs, finished):
        rec = records[result["meta_info"]["id"]]
        prompt = hf.encode(text, images)
        n_prompt = len(prompt)
        assert rec.meta["prompt_len"] == n_prompt
        assert rec.input_ids[:n_prompt].tolist() == prompt.input_ids.tolist()
        generated = rec.input_ids[n_prompt:].tolist()
        assert generated == result["output_ids"][:len(generated)] and len(generated) >= MAX_NEW - 1
        gaps = rec.meta["feature_gaps"]
        assert all(a < b <= n_prompt for a, b in gaps)             # only radix-cache prefix hits
        want_mask = torch.zeros(len(rec), dtype=torch.bool)
        want_mask[n_prompt:] = True
        assert torch.equal(rec.loss_mask, want_mask)
        full = hf.extend(prompt, generated)
        assert torch.equal(rec.positions, full.positions)          # mRoPE positions, image rows included

    # 3. Features: HF pre-deepstack features, and exactly what the live draft consumed.
    dumps = _dumps_by_rid(dump_dir)
    draft = DFlashDraft.from_pretrained(tiny.draft_dense).float().eval()
    layer_ids = sorted(draft.cfg.target_layer_ids)
    checked_image_rows = 0
    for (text, images), result in zip(requests, sequential):
        rid = result["meta_info"]["id"]
        rec = records[rid]
        consumed, covered = _assemble(dumps[rid], len(rec), rec.features.shape[1])
        # the persisted rows are the consumed rows (bf16 storage)
        assert torch.equal(rec.features[covered].float(), consumed[covered].to(torch.bfloat16).float())
        # ... and they produced the draft's context keys: recompute layer-0 keys from them
        for start, (feats, keys) in dumps[rid].items():
            pos = torch.arange(start, start + feats.shape[0])
            cos, sin = rope_cos_sin(pos, draft.cfg)
            with torch.no_grad():
                k, _ = draft.layers[0].self_attn.context_kv(draft.project_context(feats[None]), cos[None], sin[None])
            torch.testing.assert_close(k[0].transpose(0, 1), keys, rtol=1e-4, atol=1e-4)
        # ... and they equal HF's pre-deepstack capture (fp32; different kernels: atol 1e-4)
        full = hf.extend(hf.encode(text, images), rec.input_ids[len(hf.encode(text, images)):].tolist())
        pre = hf.forward(full.input_ids, full.positions, layer_ids, vision=full.vision, mode="pre").features
        torch.testing.assert_close(consumed[covered], pre[covered], rtol=1e-4, atol=1e-4)
        if images:
            post = hf.forward(full.input_ids, full.positions, layer_ids, vision=full.vision, mode="post").features
            image_rows = full.is_vision & covered
            assert image_rows.any()
            # the check can tell: post-deepstack features differ at image rows of layers < 3
            assert (post[image_rows] - pre[image_rows]).abs().max() > 1e-2
            checked_image_rows += int(image_rows.sum())
    assert checked_image_rows > 0
    # chunked prefill really happened: some prompt was captured in several extend chunks
    prefill_chunks = [sum(1 for start in dumps[r["meta_info"]["id"]] if start < records[r["meta_info"]["id"]]
                          .meta["prompt_len"]) for r in sequential]
    assert max(prefill_chunks) >= 2, prefill_chunks

    # 4. /metrics agrees with meta_info (sequential phase: nothing else ran). meta_info's accept length is
    # completion_tokens / verify steps, completion_tokens counting the prefill token and capped at
    # max_new_tokens; the worker may run one verify step past a request's end (overlap scheduling), whose
    # commits the metrics count too: at most one extra step and block_size extra tokens per request.
    metas = [r["meta_info"] for r in sequential]
    n_req, block = len(metas), 4
    steps = sum(m["spec_verify_ct"] for m in metas)
    committed = sum(m["completion_tokens"] - 1 for m in metas)
    for m in metas:
        assert m["spec_accept_length"] == pytest.approx(m["completion_tokens"] / m["spec_verify_ct"])

    def delta(name, **labels):
        return metric_value(after_sequential, name, **labels) - metric_value(before, name, **labels)

    metric_steps = delta("sglang:online_train_accept_length_count")
    metric_committed = delta("sglang:online_train_accept_length_sum")
    assert steps <= metric_steps <= steps + n_req
    assert committed <= metric_committed <= committed + block * n_req
    assert metric_committed / metric_steps == pytest.approx(committed / steps, rel=0.1)
    for position in (1, 2, 3):
        assert delta("sglang:online_train_proposed_drafts_total", position=str(position)) == metric_steps
    assert delta("sglang:online_train_accepted_tokens_total") == metric_committed - metric_steps
    # records are assembled off the hot path: count them after the flush wait, against the shards
    assert metric_value(metrics, "sglang:online_train_recorded_records_total") == len(records)
    assert metric_value(metrics, "sglang:online_train_persisted_records_total") == len(records)
    assert metric_value(metrics, "sglang:online_train_persist_lost_records_total") == 0    # writes never failed
    assert metric_value(metrics, "sglang:online_train_dropped_requests_total", reason="aborted") >= len(aborted_rids)
    assert metric_value(metrics, "sglang:online_train_replay_bytes") <= BUDGET_BYTES
    assert metric_value(metrics, "sglang:online_train_replay_dropped_records_total") > 0
    assert metric_value(metrics, "sglang:online_train_replay_dropped_records_total") == \
        metric_value(metrics, "sglang:online_train_recorded_records_total") - \
        metric_value(metrics, "sglang:online_train_replay_records")
    assert metric_value(metrics, "sglang:online_train_draft_version") == 0
    assert metric_value(metrics, "sglang:online_train_malloc_trims_total") >= 1
    assert metric_value(metrics, "sglang:online_train_malloc_trim_seconds_total") > 0
    # what the online path costs the scheduler thread: its hooks' time, and the iterations to divide it by (at
    # least one per verify step of the sequential phase, where each iteration verified one request)
    assert metric_value(metrics, "sglang:online_train_scheduler_iterations_total") >= metric_steps
    assert metric_value(metrics, "sglang:online_train_scheduler_seconds_total") > 0

    # 5. trainer/finetune.py trains from the shards unchanged.
    out = tmp_path / "finetuned"
    proc = subprocess.run([sys.executable, "-m", "trainer.finetune", "--replay", str(persist),
                           "--target-model-path", str(tiny.dense), "--draft-model-path", str(tiny.draft_dense),
                           "--output", str(out), "--max-steps", "3", "--batch-size", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    # ... and stock SGLang serves the exported draft: capture -> shards -> finetune -> serve, greedy unchanged.
    with launch_server(tiny.dense, draft_args(out), log_dir=server_log_dir, name="serve-finetuned") as served:
        text, images = requests[-1]
        again = served.generate(text, images, max_new_tokens=MAX_NEW)
    assert again["output_ids"] == expected[-1]
    assert again["meta_info"]["spec_verify_ct"] > 0


def test_online_train_moe_pre_deepstack(tiny, server_log_dir, tmp_path):
    from trainer.hf_target import HFTarget

    dump_dir = tmp_path / "dump"
    dump_dir.mkdir()
    text, images = chat_prompt("What colour is the shape?", 1), [make_image(7)]
    with launch_server(tiny.moe, draft_args(tiny.draft_moe) + ["--online-train", "--online-train-capture-only"],
                       log_dir=server_log_dir,
                       name="online-moe", env=plugin_env(dump_dir=dump_dir)) as server:
        result = server.generate(text, images, max_new_tokens=8)
    hf = HFTarget(tiny.moe, device="cpu", dtype=torch.float32)
    prompt = hf.encode(text, images)
    chunks = _dumps_by_rid(dump_dir)[result["meta_info"]["id"]]
    layer_ids = json.loads((tiny.draft_moe / "config.json").read_text())["dflash_config"]["target_layer_ids"]
    consumed, covered = _assemble(chunks, len(prompt), len(layer_ids) * hf.hidden_size)
    pre = hf.forward(prompt.input_ids, prompt.positions, sorted(layer_ids), vision=prompt.vision, mode="pre").features
    image_rows = prompt.is_vision & covered
    assert image_rows.any()
    torch.testing.assert_close(consumed[covered], pre[covered], rtol=1e-4, atol=1e-4)


def test_radix_hits_are_filled_from_the_feature_pool(tiny, server_log_dir, tmp_path):
    """Multi-turn traffic: turn 2 and 3 of a chat are the earlier turns' whole conversation, and two requests
    share a system prompt, so SGLang serves those prefixes from its radix cache and the target never recomputes
    them. Their records are filled from the feature pool (capture only: the draft KV serving reads there is of the
    one version) with exactly the rows the live draft consumed when the prefix was first computed (the test
    plugin's debug dump); only positions never recorded (the last token of a finished turn) stay gaps. The same
    with the prefix store on: the pool leaves it nothing to fill. The shard written at the stop stores those
    prefixes once: each later turn lists the earlier turn's feature rows (trainer.replay feature_runs)."""
    from transformers import AutoTokenizer

    from trainer.replay import ReplayReader, read_manifest

    tok = AutoTokenizer.from_pretrained(tiny.dense)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    system = "<|im_start|>system\n" + "You are a careful assistant who answers briefly. " * 6 + "<|im_end|>\n"
    questions = ["def main(args):", "Now add a docstring.", "And a test for it."]

    def launcher(store: str, name: str) -> launch_server:
        persist, dump_dir = tmp_path / name / "replay", tmp_path / name / "dump"
        dump_dir.mkdir(parents=True)
        args = draft_args(tiny.draft_dense) + ["--online-train", "--online-train-capture-only",
                                                "--online-train-persist-dir", str(persist),
                                                "--online-train-prefix-store", store]   # one shard, at the stop
        return launch_server(tiny.dense, args, log_dir=server_log_dir, name=f"online-{name}",
                             env=plugin_env(dump_dir=dump_dir))

    def traffic(server) -> str:
        before = metric_value(server.metrics(), "sglang:online_train_recorded_records_total")   # warm-up
        ids: list[int] = []
        for turn, q in enumerate(questions):               # one chat, three turns, each the whole conversation
            ids = ids + encode(("<|im_end|>\n" if turn else "") + f"<|im_start|>user\n{q}<|im_end|>\n"
                               "<|im_start|>assistant\n")
            out = server.post("/generate", {"input_ids": ids, "rid": f"chat-{turn}", "sampling_params": {
                "max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}})
            ids = ids + out["output_ids"]
        for rid, q in (("system-a", "What is a list?"), ("system-b", "What is a dict?")):
            server.post("/generate", {"input_ids": encode(system + chat_prompt(q)), "rid": rid, "sampling_params": {
                "max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            metrics = server.metrics()
            if metric_value(metrics, "sglang:online_train_recorded_records_total") >= before + 5:
                break
            time.sleep(0.5)
        return metrics

    def read(name: str) -> tuple[dict, dict, dict]:
        reader = ReplayReader(tmp_path / name / "replay")
        records = {reader.read(i).meta["rid"]: reader.read(i) for i in range(len(reader))}
        (shard,) = read_manifest(tmp_path / name / "replay")["shards"]          # the stop wrote them all
        rows = {r["meta"]["rid"]: [row for start, n in r["feature_runs"] for row in range(start, start + n)]
                for r in shard["records"]}
        return records, _dumps_by_rid(tmp_path / name / "dump"), rows

    # The same traffic to a server with the store on and to one with it off (started together).
    with launch_servers(launcher("64MB", "prefix-store"), launcher("0", "no-prefix-store")) as servers:
        metrics, metrics_off = run_concurrently(*(lambda s=s: traffic(s) for s in servers))
    (records, dumps, rows), (records_off, dumps_off, rows_off) = read("prefix-store"), read("no-prefix-store")

    ours = ["chat-0", "chat-1", "chat-2", "system-a", "system-b"]
    for records, dumps, metrics, rows in ((records, dumps, metrics, rows), (records_off, dumps_off, metrics_off,
                                                                            rows_off)):
        assert set(ours) <= set(records)
        order = [rid for rid in records if rid not in ours] + ours   # SGLang's warm-up request came first

        def first_consumed(later: str, pos: int) -> torch.Tensor:
            """The row the live draft consumed at `pos` when the earliest request with `later`'s tokens up to
            there computed it (SGLang's warm-up shares the chat template's first tokens)."""
            ids = records[later].input_ids
            for rid in order[:order.index(later)]:
                other = records[rid].input_ids
                if len(other) > pos and torch.equal(other[:pos + 1], ids[:pos + 1]):
                    for start, (feats, _) in dumps.get(rid, {}).items():
                        if start <= pos < start + feats.shape[0]:
                            return feats[pos - start]
            raise AssertionError(f"{later}: no earlier request computed position {pos}")

        pool_total = 0
        for later, earlier in (("chat-1", "chat-0"), ("chat-2", "chat-1"), ("system-b", "system-a")):
            rec, first = records[later], records[earlier]
            from_pool, gaps = rec.meta["prefix_pool_rows"], rec.meta["feature_gaps"]
            assert from_pool > 0 and rec.meta["prefix_filled_rows"] == 0, (later, rec.meta)
            # only the earlier request's last token (never recorded) may remain a gap, at most one row
            assert sum(b - a for a, b in gaps) <= 1 and all(a == len(first) for a, _ in gaps), (later, gaps)
            # what it consumed itself starts after the hit; below that, the rows came from the pool: they equal
            # the rows the live draft consumed when that prefix was first computed
            hit = min(dumps[later])
            assert hit == from_pool + sum(b - a for a, b in gaps), (later, hit, from_pool, gaps)
            for pos in range(hit):
                if not any(a <= pos < b for a, b in gaps):
                    want = first_consumed(later, pos).to(torch.bfloat16).float()
                    assert torch.equal(rec.features[pos].float(), want), (later, pos)
            pool_total += from_pool
            # stored once: the later record's leading rows are the earlier record's own (a chat turn's whole
            # record; under the system prompt at least the radix hit)
            shared = next((i for i, (a, b) in enumerate(zip(rows[later], rows[earlier])) if a != b),
                          min(len(rows[later]), len(rows[earlier])))
            assert shared == len(first) if later.startswith("chat") else shared >= from_pool, (later, shared)
        assert metric_value(metrics, "sglang:online_train_prefix_rows_total", result="filled") >= pool_total
