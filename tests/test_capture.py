"""trainer.capture: pre-deepstack features (exact, against HF's own forward), replay round trip, --regenerate
= the target's greedy output, clear errors for bad data."""
import json

import pytest
import torch

from sglang_ext.demo.prompts import IMAGE_QUESTIONS, make_image
from trainer.capture import main as capture_main
from trainer.capture import resolve_layer_ids, run_capture
from trainer.hf_target import ChatDataError, HFTarget
from trainer.replay import ReplayReader
from trainer.target import target_identity


@pytest.fixture(scope="module")
def dense(tiny):
    return HFTarget(tiny.dense, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    for i in range(2):
        make_image(i).save(d / f"img{i}.png")
    return d


def image_turn(path, question):
    return {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": question}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _hf_reference(target, enc):
    """HF's own forward: output_hidden_states, the input each decoder layer receives (= residual stream after the
    previous layer, deepstack included) and the deepstack tensors it adds, recorded by hooks local to this test."""
    layer_inputs, deepstack = {}, []
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, k=k: layer_inputs.__setitem__(k, (args[0] if args else kwargs["hidden_states"])[0]),
        with_kwargs=True) for k, layer in enumerate(target.layers)]
    original = target.text_model._deepstack_process

    def record(hidden, mask, embeds):
        deepstack.append((mask[0].clone(), embeds.clone()))
        return original(hidden, mask, embeds)
    target.text_model._deepstack_process = record
    try:
        with torch.no_grad():
            out = target.model(input_ids=enc.input_ids[None], position_ids=enc.positions[:, None],
                               output_hidden_states=True, **enc.vision)
    finally:
        del target.text_model._deepstack_process
        for h in handles:
            h.remove()
    return out.hidden_states, layer_inputs, deepstack


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_features_are_pre_deepstack_exactly(tiny, dense, variant):
    target = dense if variant == "dense" else HFTarget(tiny.moe, device="cpu", dtype=torch.float32)
    text = target.render([image_turn("x.png", IMAGE_QUESTIONS[0])], add_generation_prompt=True)
    enc = target.encode(text, [make_image(0)])
    L, n_ds = target.num_layers, target.num_deepstack
    assert n_ds == 3 and enc.is_vision.sum() > 0
    layer_ids = list(range(L))
    got = target.forward(enc.input_ids, enc.positions, layer_ids, vision=enc.vision, mode="pre").per_layer
    hidden_states, layer_inputs, deepstack = _hf_reference(target, enc)
    assert len(deepstack) == n_ds
    rows = enc.is_vision
    for k in range(L - 1):
        post = layer_inputs[k + 1]                          # what SGLang captures: the residual entering layer k+1
        pre = got[k]
        if k < n_ds:
            mask, embeds = deepstack[k]
            assert torch.equal(mask, rows)
            assert embeds.abs().max() > 0
            # exactly the deepstack tensor apart at image rows (HF computes post = pre + deepstack), equal elsewhere
            assert torch.equal(pre[rows] + embeds, post[rows]), f"layer {k}"
            assert not torch.equal(pre[rows], post[rows])
            assert torch.equal(pre[~rows], post[~rows]), f"layer {k}"
        else:
            assert torch.equal(pre, post), f"layer {k} (no deepstack) must equal HF exactly"
        # transformers 5.19 records output_hidden_states[k+1] with a hook on layer k's output: pre-deepstack too
        assert torch.equal(pre, hidden_states[k + 1][0]), f"layer {k}"
    post_mode = target.forward(enc.input_ids, enc.positions, layer_ids, vision=enc.vision, mode="post").per_layer
    for k in range(L - 1):
        assert torch.equal(post_mode[k], layer_inputs[k + 1])


def test_default_layers():
    assert resolve_layer_ids(6) == [1, 2, 3]                    # K capped at L-3; layers 0-2 not skipped
    assert resolve_layer_ids(36) == [1, 9, 17, 25, 33]          # the published Qwen3-8B DFlash layers
    assert resolve_layer_ids(6, layers=[0, 2]) == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer_ids(6, layers=[6])
    with pytest.raises(ValueError, match="duplicates"):
        resolve_layer_ids(6, layers=[1, 1])


def test_capture_round_trip(tiny, dense, data_dir, tmp_path):
    rows = [
        {"messages": [image_turn("img0.png", IMAGE_QUESTIONS[0]), {"role": "assistant", "content": "It is red."}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "def main(args):"},
                      {"role": "assistant", "content": "return 0"},
                      image_turn(str(data_dir / "img1.png"), IMAGE_QUESTIONS[1]),
                      {"role": "assistant", "content": "Two shapes."}]},
    ]
    data = write_jsonl(data_dir / "chat.jsonl", rows)
    out = tmp_path / "replay"
    summary = run_capture(tiny.dense, data, out, draft_model_path=str(tiny.draft_dense), progress=False)
    assert summary.layer_ids == [1, 2, 3] and summary.records == 2

    reader = ReplayReader(out, layer_ids=[1, 2, 3], hidden_size=dense.hidden_size,
                          target_config_hash=target_identity(tiny.dense).config_hash, strict=True)
    assert len(reader) == 2
    for i, row in enumerate(rows):
        rec = reader[i]
        assert rec.meta["line"] == i + 1
        msgs = row["messages"]
        images = [make_image(j) for j in ([0] if i == 0 else [1])]
        enc = dense.encode(dense.render(msgs), images)
        assert rec.input_ids.tolist() == enc.input_ids.tolist()               # tokens in order
        assert rec.positions.shape == (3, len(rec)) and torch.equal(rec.positions, enc.positions)
        tok = dense.tokenizer
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        # the loss covers exactly the assistant turns, each with its end-of-turn token
        assert tok.decode(rec.input_ids[rec.loss_mask]) == "".join(a + "<|im_end|>" for a in answers)
        in_loss = rec.input_ids[rec.loss_mask].tolist()
        assert not set(in_loss) & dense.vision_token_ids
        pre = dense.forward(enc.input_ids, enc.positions, [1, 2, 3], vision=enc.vision).features
        assert rec.features.shape == pre.shape
        torch.testing.assert_close(rec.features, pre, rtol=1 / 128, atol=1e-3)  # bf16 storage

    # appending a prompt-loss capture with fp8 storage to a bf16 directory is refused (one spec per directory)
    with pytest.raises(ValueError, match="storage_dtype"):
        run_capture(tiny.dense, data, out, layers=[1, 2, 3], dtype="fp8", progress=False)
    out2 = tmp_path / "replay-prompt-loss"
    run_capture(tiny.dense, data, out2, layers=[0, 4], dtype="fp8", include_prompt_loss=True, progress=False)
    rec = ReplayReader(out2, layer_ids=[0, 4])[0]
    assert torch.equal(rec.loss_mask, ~torch.isin(rec.input_ids, torch.tensor(sorted(dense.vision_token_ids))))


def _greedy_without_cache(target, msgs, images, n):
    """Independent reference: full forward over the growing sequence, positions from get_rope_index each time."""
    enc = target.processor(text=[target.render(msgs, add_generation_prompt=True)], images=images, return_tensors="pt")
    ids = enc["input_ids"]
    out = []
    for _ in range(n):
        types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(out), dtype=torch.long)], 1)
        seq = torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1)
        with torch.no_grad():
            logits = target.model(input_ids=seq, mm_token_type_ids=types, pixel_values=enc["pixel_values"],
                                  image_grid_thw=enc["image_grid_thw"]).logits
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in target.eos_token_ids:
            break
    return ids[0].tolist(), out


def test_regenerate_uses_targets_greedy_output(tiny, dense, data_dir, tmp_path):
    msgs = [image_turn("img1.png", IMAGE_QUESTIONS[1]), {"role": "assistant", "content": "Not what the target says."}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (tmp_path / "img1.png").write_bytes((data_dir / "img1.png").read_bytes())
    n = 12
    run_capture(tiny.dense, data, tmp_path / "replay", layers=[1, 2, 3], regenerate=True, max_new_tokens=n,
                progress=False)
    rec = ReplayReader(tmp_path / "replay")[0]
    prompt_ids, greedy = _greedy_without_cache(dense, msgs[:1], [make_image(1)], n)
    assert rec.meta["regenerated"] is True
    assert rec.input_ids.tolist() == prompt_ids + greedy
    assert rec.input_ids[rec.loss_mask].tolist() == greedy                  # only the target's own tokens
    assert rec.loss_mask.tolist() == [False] * len(prompt_ids) + [True] * len(greedy)
    full = dense.processor(text=[dense.render(msgs[:1], add_generation_prompt=True)], images=[make_image(1)],
                           return_tensors="pt")
    types = torch.cat([full["mm_token_type_ids"], torch.zeros(1, len(greedy), dtype=torch.long)], 1)
    positions, _ = dense.model.model.get_rope_index(rec.input_ids[None], mm_token_type_ids=types,
                                                    image_grid_thw=full["image_grid_thw"])
    assert torch.equal(rec.positions, positions[:, 0])


def test_bad_inputs_name_file_and_line(tiny, data_dir, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    missing = {"messages": [image_turn("nope.png", "what?"), {"role": "assistant", "content": "x"}]}
    data = write_jsonl(data_dir / "missing.jsonl", [good, missing])
    with pytest.raises(ChatDataError) as e:
        run_capture(tiny.dense, data, tmp_path / "r1", layers=[1], progress=False)
    msg = str(e.value)
    assert f"{data}:2" in msg and str(data_dir / "nope.png") in msg and "messages[0].content[0].image" in msg
    assert not (tmp_path / "r1").exists()                       # nothing written: data is checked up front

    bad_json = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"messages": [oops'])
    assert capture_main(["--target-model-path", str(tiny.dense), "--data", str(bad_json),
                         "--output", str(tmp_path / "r2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad_json}:3" in err and "bad JSON" in err

    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ChatDataError, match=f"{no_answer}:1.*--regenerate"):
        run_capture(tiny.dense, no_answer, tmp_path / "r3", layers=[1], progress=False)
