"""The reference workload: a quick (30 s of training) build into a temporary cache, its files, splits and
cache, the trained target in HF transformers, and one real SGLang server (CPU platform) serving it."""
import json
import time

import pytest
import torch
from PIL import Image

from sglang_ext.demo.tiny_models import VOCAB_SIZE
from sglang_ext.demo.workload import (DOMAINS, SPLITS, WorkloadConfig, build_workload, hf_greedy, load_target,
                                      record_prompt, render_image, workload_hash)
from sglang_ext.demo.workload.images import EVAL_IMAGE_SEED_OFFSET, IMAGE_SIZE
from sglang_ext.demo.workload.sources import IMAGE_QUESTION, SampleMaker
from sglang_ext.launcher import launch_server

QUICK_MINUTES = 0.5


@pytest.fixture(scope="module")
def cache_dir(workload_cache_dir):
    return workload_cache_dir


@pytest.fixture(scope="module")
def workload(quick_workload):
    return quick_workload       # built once per session in conftest.py (the same config as QUICK_MINUTES)


@pytest.fixture(scope="module")
def hf_target(workload):
    return load_target(workload.target_dir)


def _source_key(record) -> str:
    """What the split is made by: the stdlib file (A), the pydoc topic (B), the image seed (image)."""
    return record["source"].split(":")[0]


def test_layout_and_prompt_schema(workload):
    assert (workload.root / "DONE").is_file()
    assert workload.root.name == f"workload-{workload.hash}"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "processor_config.json", "chat_template.jinja"):
        assert (workload.target_dir / name).is_file(), name
    expected_counts = {(d, "train"): n_train for d, n_train, _ in WorkloadConfig.make(quick=True).n_prompts}
    expected_counts.update({(d, "eval"): n_eval for d, _, n_eval in WorkloadConfig.make(quick=True).n_prompts})
    all_ids = set()
    for domain in DOMAINS:
        for split in SPLITS:
            records = workload.prompts(domain, split)
            assert len(records) == expected_counts[(domain, split)]
            for record in records:
                assert set(record) >= {"id", "domain", "split", "source", "messages", "reference"}
                assert (record["domain"], record["split"]) == (domain, split)
                assert record["id"] not in all_ids
                all_ids.add(record["id"])
                (message,) = record["messages"]
                assert message["role"] == "user"
                content = message["content"]
                if domain == "image":
                    assert [part["type"] for part in content] == ["image", "text"]
                    assert content[1]["text"] == IMAGE_QUESTION
                else:
                    assert isinstance(content, str) and content.strip()
                    if domain == "A":
                        assert content.startswith("Continue the code:\n")
                assert record["reference"].strip()
                text, images = record_prompt(record)
                assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
                assert text.count("<|image_pad|>") == len(images) == (1 if domain == "image" else 0)


def test_splits_are_disjoint(workload):
    for domain in DOMAINS:
        train, held_out = workload.prompts(domain, "train"), workload.prompts(domain, "eval")
        # Held-out prompts come from other stdlib files / pydoc topics / image seeds than training prompts ...
        assert not {_source_key(r) for r in train} & {_source_key(r) for r in held_out}, domain
        assert not {json.dumps(r["messages"]) for r in train} & {json.dumps(r["messages"]) for r in held_out}


def test_multi_turn_chats(workload):
    """Workload.chats: 3-turn chats of consecutive text prompts of one prompt set; train and eval chats share
    no message."""
    train, held_out = workload.chats("A", "train"), workload.chats("A", "eval")
    assert train and held_out
    assert all(len(chat) == 3 and all(isinstance(m, str) and m for m in chat) for chat in train + held_out)
    texts = [r["messages"][0]["content"] for r in workload.prompts("A", "train")]
    assert train[0] == texts[:3] and train[1] == texts[3:6]
    assert not {m for c in train for m in c} & {m for c in held_out for m in c}


def test_training_data_excludes_held_out_sources(workload):
    """The target trains only on SampleMaker's train split: no held-out file / topic is in it."""
    from transformers import AutoTokenizer

    maker = SampleMaker(AutoTokenizer.from_pretrained(workload.root / "tokenizer"), WorkloadConfig.make(quick=True))
    train_files = {source.split(":")[0] for source, _ in maker.code["train"]}
    eval_files = {source.split(":")[0] for source, _ in maker.code["eval"]}
    train_topics = {topic for topic, _ in maker.prose["train"]}
    eval_topics = {topic for topic, _ in maker.prose["eval"]}
    assert train_files and eval_files and not train_files & eval_files
    assert train_topics and eval_topics and not train_topics & eval_topics
    assert {_source_key(r) for r in workload.prompts("A", "eval")} <= eval_files
    assert {_source_key(r) for r in workload.prompts("B", "eval")} <= eval_topics
    assert all(int(r["source"].removeprefix("image-seed-")) >= EVAL_IMAGE_SEED_OFFSET
               for r in workload.prompts("image", "eval"))


def test_images_load_and_match_their_captions(workload):
    for split in SPLITS:
        for record in workload.prompts("image", split):
            path = record["messages"][0]["content"][0]["image"]
            assert path.startswith(str(workload.image_dir.resolve()))
            with Image.open(path) as image:
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
                seed = int(record["source"].removeprefix("image-seed-"))
                rendered, spec = render_image(seed)
                assert image.convert("RGB").tobytes() == rendered.tobytes()
                assert spec.caption == record["reference"]


def test_render_image_is_deterministic_and_varied():
    captions = {render_image(seed)[1].caption for seed in range(40)}
    assert len(captions) > 10
    assert render_image(7)[0].tobytes() == render_image(7)[0].tobytes()


def test_training_stats(workload):
    stats = workload.stats
    assert stats["steps"] > 0 and stats["tokens"] > 0 and stats["tokens_per_second"] > 0
    assert stats["train_seconds"] >= QUICK_MINUTES * 60 * 0.9
    assert all(torch.isfinite(torch.tensor(v)) for v in stats["heldout_loss"].values())
    # The bigram warm start already beats a uniform guess over the vocabulary at the first step.
    assert stats["loss_first_step"] < torch.log(torch.tensor(float(VOCAB_SIZE))).item()


def test_target_loads_in_hf_and_generates(workload, hf_target):
    model, processor = hf_target
    for domain in ("A", "image"):
        record = workload.prompts(domain, "eval")[0]
        ids = hf_greedy(model, processor, record, max_new_tokens=8)
        assert len(ids) == 8 and all(0 <= i < VOCAB_SIZE for i in ids)
        assert processor.tokenizer.decode(ids)


def test_cache_hit_returns_same_build(cache_dir, workload):
    done_mtime = (workload.root / "DONE").stat().st_mtime_ns
    start = time.monotonic()
    again = build_workload(cache_dir, minutes=QUICK_MINUTES, quick=True, progress=False)
    assert time.monotonic() - start < 10                    # no training, no data preparation
    assert again.hash == workload.hash and again.root == workload.root
    assert (again.root / "DONE").stat().st_mtime_ns == done_mtime
    assert again.stats["steps"] == workload.stats["steps"]
    assert sorted(p.name for p in cache_dir.iterdir()) == [workload.root.name]     # no temp dirs left
    # The hash covers the config.
    other = WorkloadConfig.make(minutes=QUICK_MINUTES, quick=True, seed=1)
    assert workload_hash(other) != workload.hash
    assert workload_hash(WorkloadConfig.make(minutes=QUICK_MINUTES, quick=True)) == workload.hash


@pytest.mark.server
def test_sglang_serves_the_workload_target(workload, hf_target, server_log_dir):
    model, processor = hf_target
    text_record, image_record = workload.prompts("A", "eval")[0], workload.prompts("image", "eval")[0]
    n_new = 8
    with launch_server(workload.target_dir, log_dir=server_log_dir, name="workload") as server:
        results = {}
        for record in (text_record, image_record):
            text, images = record_prompt(record)
            results[record["id"]] = server.generate(text, images, max_new_tokens=n_new)
    for record in (text_record, image_record):
        out = results[record["id"]]
        text, images = record_prompt(record)
        hf_inputs = processor(text=[text], images=[Image.open(p) for p in images] or None, return_tensors="pt")
        # SGLang saw the same prompt as HF (for the image: the 16 expanded image tokens) ...
        assert out["meta_info"]["prompt_tokens"] == hf_inputs["input_ids"].shape[1]
        assert len(out["output_ids"]) == n_new
        # ... and its greedy tokens are HF's (fp32 on both sides; held on 23 prompts x 32 tokens when measured).
        hf_ids = hf_greedy(model, processor, record, max_new_tokens=n_new)
        assert out["output_ids"] == hf_ids, (record["id"], out["output_ids"], hf_ids)
