"""Video on the CPU platform: clips made here, decoded by SGLang's own decoder without pinning (the always-on
hooks of sglang_ext/video_hooks.py), and served by real SGLang: plain == DFLASH greedy on video requests mixed
with image and text requests, and --online-train records video requests as such."""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sglang_ext.demo.clips import clip_frames, make_clip


def test_ffmpeg_libraries_load():
    """torchcodec (SGLang's video decoder) needs the system FFmpeg libraries; .ci/run installs them. Fails,
    never skips, without them: the video tests below would be meaningless."""
    proc = subprocess.run([sys.executable, "-c", "import torchcodec.decoders, torchcodec.encoders"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, ("torchcodec cannot load the FFmpeg shared libraries (install them: "
                                  "apt-get install -y --no-install-recommends ffmpeg):\n" + proc.stderr[-3000:])


@pytest.mark.parametrize("direction", ["right", "left", "down", "up"])
def test_clip_square_moves(tmp_path, direction):
    frames = clip_frames(direction, "red", frames=6, size=(64, 48))
    red = (frames[:, 0].int() > 150) & (frames[:, 1].int() < 100)          # [T, H, W]
    ys, xs = [], []
    for t in range(frames.shape[0]):
        y, x = torch.nonzero(red[t], as_tuple=True)
        ys.append(float(y.float().mean()))
        xs.append(float(x.float().mean()))
    axis, sign = {"right": (xs, 1), "left": (xs, -1), "down": (ys, 1), "up": (ys, -1)}[direction]
    assert all(sign * (b - a) > 0 for a, b in zip(axis, axis[1:])), axis
    # the encoded clip decodes to (nearly) the same frames (H.264, crf 18)
    from torchcodec.decoders import VideoDecoder
    path = make_clip(tmp_path / f"{direction}.mp4", direction, frames=6, size=(64, 48), fps=4)
    decoded = VideoDecoder(str(path)).get_frames_at(list(range(6))).data
    assert decoded.shape == frames.shape
    assert (decoded.float() - frames.float()).abs().mean() < 4.0


DECODE_PROBE = r"""
import asyncio, inspect, json, sys
import torch
from sglang_ext.cpu import activate
activate()
from sglang.srt.plugins import load_plugins
load_plugins()                                   # what every SGLang process does, the launcher included
from sglang.srt.utils import video_decoder
from sglang.srt.utils.video_decoder import VideoDecoderWrapper
from sglang.srt.multimodal.processors import qwen_vl
from sglang_ext.video_hooks import skip_pinning
path = sys.argv[1]
out = {"cuda": torch.cuda.is_available(), "skip_pinning": skip_pinning()}
frames = {}
for threads in (1, 0):                           # one decoder; parallel decoders (_parallel_decode)
    t = VideoDecoderWrapper(path, num_decode_threads=threads).get_frames_as_tensor([0, 2, 4, 6])
    frames[threads] = t
    out[f"threads{threads}"] = {"shape": list(t.shape), "pinned": t.is_pinned()}
out["threads_equal"] = torch.equal(frames[1], frames[0])
video, meta = asyncio.run(qwen_vl.preprocess_video(VideoDecoderWrapper(path)))
out["preprocess"] = {"shape": list(video.shape), "pinned": video.is_pinned(), "frames": meta["frames_indices"].tolist()}
# the stock functions, unhooked, pin (and so fail without CUDA): the hooks are what makes the difference
out["stock_is_cpu_engine"] = inspect.unwrap(video_decoder._is_cpu_engine)()
from sglang.srt.utils.common import is_cpu
out["sglang_is_cpu_untouched"] = is_cpu() is False and qwen_vl._is_cpu is False
print("RESULT" + json.dumps(out))
"""


def test_sglang_decodes_video_without_pinning(tmp_path):
    """SGLang's own video decoding (VideoDecoderWrapper, one and several decoders; qwen_vl.preprocess_video)
    in a fresh interpreter with the plugin loaded on the torch_cpu platform: no pinning without CUDA, and
    SGLang's is_cpu() unchanged for everything else."""
    path = make_clip(tmp_path / "clip.mp4", "right", frames=8)
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLUGINS",)}
    env["SGLANG_PLATFORM"] = "torch_cpu"
    proc = subprocess.run([sys.executable, "-c", DECODE_PROBE, str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert out["skip_pinning"] == (not out["cuda"])
    for threads in ("threads1", "threads0"):
        assert out[threads]["shape"] == [4, 64, 96, 3]
        assert out[threads]["pinned"] == out["cuda"]
    assert out["threads_equal"]
    assert out["preprocess"]["pinned"] == out["cuda"]
    assert out["preprocess"]["shape"][:2] == [len(out["preprocess"]["frames"]), 3]
    assert out["stock_is_cpu_engine"] is False         # stock SGLang would pin here
    assert out["sglang_is_cpu_untouched"]


# ---- real SGLang: one plain and one DFLASH (+ --online-train capture) server for the whole module ----------

MAX_NEW = 12
VIDEO_QUESTION = "Which way does the square move?"


@dataclass
class VideoServing:
    """What the two servers answered to the same concurrent batch, and what the DFLASH server recorded."""
    names: list[str]                     # one per request, e.g. "generate-video-right"
    bodies: list[tuple[str, dict]]       # (path, body)
    plain: list[dict]
    dflash: list[dict]
    records: dict                        # rid -> ReplayRecord (persisted by --online-train)
    dumps: dict                          # rid -> {start: (features, draft keys)} (test plugin's debug dump)
    clips: dict                          # direction -> mp4 path
    video_token_id: int                  # the target's <|video_pad|> (config.json video_token_id)


def _sampling(max_new: int) -> dict:
    return {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}


def video_batch(clips: dict) -> list[tuple[str, str, dict]]:
    """(name, path, body): video, image, image+video and text requests through /generate, and a video_url
    request through the OpenAI chat API. Every body has its own rid."""
    from sglang_ext.demo.clips import video_chat_prompt
    from sglang_ext.demo.prompts import chat_prompt, make_image
    from sglang_ext.launcher import image_to_data_url

    def generate(name, text, images=(), videos=()):
        body = {"text": text, "rid": name, "sampling_params": _sampling(MAX_NEW)}
        if images:
            body["image_data"] = [image_to_data_url(im) for im in images]
        if videos:
            body["video_data"] = [str(v) for v in videos]
        return name, "/generate", body

    chat = {"model": "default", "rid": "chat-video-down", "max_tokens": MAX_NEW, "temperature": 0.0,
            "ignore_eos": True, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": str(clips["down"])}},
                {"type": "text", "text": VIDEO_QUESTION}]}]}
    return [
        generate("generate-video-right", video_chat_prompt(VIDEO_QUESTION), videos=[clips["right"]]),
        generate("generate-video-left", video_chat_prompt(VIDEO_QUESTION), videos=[clips["left"]]),
        generate("generate-image-video", video_chat_prompt("Compare the picture and the clip.", n_images=1),
                 images=[make_image(3)], videos=[clips["up"]]),
        generate("generate-image", chat_prompt("What colour is the shape?", 1), images=[make_image(0)]),
        generate("generate-text-0", chat_prompt("def main(args):")),
        generate("generate-text-1", chat_prompt("Explain what a decorator is in Python.")),
        ("chat-video-down", "/v1/chat/completions", chat),
    ]


@pytest.fixture(scope="module")
def video_serving(tiny, server_log_dir, tmp_path_factory) -> VideoServing:
    from concurrent.futures import ThreadPoolExecutor

    from sglang_ext.launcher import draft_args, launch_server
    from support.plugin import plugin_env
    from support.servers import launch_servers, run_concurrently
    from trainer.replay import ReplayReader

    root = tmp_path_factory.mktemp("video")
    clips = {d: make_clip(root / f"{d}.mp4", d, colour=c) for d, c in
             (("right", "red"), ("left", "blue"), ("down", "green"), ("up", "orange"))}
    persist, dump_dir = root / "replay", root / "dump"
    dump_dir.mkdir()
    batch = video_batch(clips)
    dflash_args = draft_args(tiny.draft_dense) + ["--online-train", "--online-train-capture-only",
                                                  "--online-train-persist-dir", str(persist),
                                                  "--online-train-shard-seconds", "1"]

    def serve(server) -> list[dict]:
        with ThreadPoolExecutor(len(batch)) as pool:         # one concurrent batch
            futures = [pool.submit(server.post, path, body) for _, path, body in batch]
            return [f.result() for f in futures]

    with launch_servers(launch_server(tiny.dense, log_dir=server_log_dir, name="plain-video"),
                        launch_server(tiny.dense, dflash_args, log_dir=server_log_dir, name="dflash-video",
                                      env=plugin_env(dump_dir=dump_dir))) as (plain, dflash):
        plain_out, dflash_out = run_concurrently(lambda: serve(plain), lambda: serve(dflash))
        rids = {body["rid"] for _, _, body in batch}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not rids <= _persisted(persist):
            time.sleep(0.5)
    reader = ReplayReader(persist)
    records = {r.meta["rid"]: r for r in (reader.read(i) for i in range(len(reader)))}
    return VideoServing(names=[n for n, _, _ in batch], bodies=[(p, b) for _, p, b in batch], plain=plain_out,
                        dflash=dflash_out, records=records, dumps=_dumps_by_rid(dump_dir), clips=clips,
                        video_token_id=json.loads((Path(tiny.dense) / "config.json").read_text())["video_token_id"])


def _dumps_by_rid(dump_dir: Path) -> dict:
    """rid -> {start position: (features [n, F], draft layer-0 keys)} from the test plugin's debug dump."""
    out: dict = {}
    for path in sorted(dump_dir.glob("call-*.pt")):
        d = torch.load(path)
        for rid, start, feats, keys in zip(d["rids"], d["starts"], d["features"], d["draft_k_layer0"]):
            out.setdefault(rid, {})[int(start)] = (feats, keys)
    return out


def _persisted(persist) -> set:
    from trainer.replay import ReplayError, ReplayReader
    try:
        reader = ReplayReader(persist)
        return {reader.read(i).meta["rid"] for i in range(len(reader))}
    except (ReplayError, OSError):
        return set()


@pytest.mark.server
def test_video_plain_equals_dflash_greedy(video_serving):
    """Video requests (/generate video_data, chat video_url), mixed with image and text requests in one
    concurrent batch: DFLASH greedy output == plain greedy output (float32, CPU platform)."""
    s = video_serving
    for name, plain, dflash in zip(s.names, s.plain, s.dflash):
        if name.startswith("chat"):
            assert plain["usage"]["completion_tokens"] == dflash["usage"]["completion_tokens"] == MAX_NEW, name
            assert dflash["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"], name
        else:
            assert len(plain["output_ids"]) == MAX_NEW, name
            assert dflash["output_ids"] == plain["output_ids"], name


@pytest.mark.server
def test_online_capture_records_video_requests(video_serving):
    """--online-train records every request of the batch, each with the modalities it carried."""
    s = video_serving
    want = {"generate-video-right": ["video"], "generate-video-left": ["video"], "chat-video-down": ["video"],
            "generate-image-video": ["image", "video"], "generate-image": ["image"],
            "generate-text-0": [], "generate-text-1": []}
    assert set(want) <= set(s.records), sorted(s.records)
    for rid, modalities in want.items():
        assert s.records[rid].meta["modalities"] == modalities, (rid, s.records[rid].meta)
    # the clips reached the model: same tokens for two clips, different target features at the video rows
    right, left = s.records["generate-video-right"], s.records["generate-video-left"]
    assert torch.equal(right.input_ids, left.input_ids)
    video_rows = right.input_ids == s.video_token_id
    assert video_rows.sum() >= 4          # the tiny processor caps a frame pair at 128x128 px: 2 pads per pair here
    assert (right.features[video_rows] - left.features[video_rows]).abs().max() > 1e-2


# ---- offline capture takes video (trainer/hf_target.py, trainer/capture.py) ---------------------------------

def _video_chat(tmp_path, parts_extra: dict | None = None, assistant: str | None = "It moves right."):
    from sglang_ext.demo.prompts import make_image
    make_clip(tmp_path / "right.mp4", "right")
    make_image(1).save(tmp_path / "shape.png")
    user = [{"type": "image", "image": "shape.png"}, {"type": "video", "video": "right.mp4", **(parts_extra or {})},
            {"type": "text", "text": "Which way does the square move?"}]
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.mark.parametrize("extra, error", [
    ({"fps": 2, "nframes": 4}, "either fps or nframes"),
    ({"max_frames": 2.5}, "max_frames must be a positive integer"),
    ({"fps": -1}, "fps must be a positive number"),
    ({"speed": 2}, "unknown video option 'speed'"),
    ({"resized_height": 64}, "resized_height and resized_width together"),
])
def test_chat_video_part_errors_name_the_field(tmp_path, extra, error):
    from trainer.hf_target import ChatDataError, load_chat_jsonl
    path = _video_chat(tmp_path, extra)
    with pytest.raises(ChatDataError, match=error) as e:
        load_chat_jsonl(path)
    assert "chat.jsonl:1" in str(e.value) and "messages[0].content[1]" in str(e.value)


def test_chat_video_file_missing_is_an_error(tmp_path):
    from trainer.hf_target import ChatDataError, load_chat_jsonl
    path = tmp_path / "missing.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "video", "video": "nope.mp4"}, {"type": "text", "text": "?"}]}]}) + "\n")
    with pytest.raises(ChatDataError, match=r"missing.jsonl:1 \[messages\[0\].content\[0\].video\]: video file not found"):
        load_chat_jsonl(path)


def test_offline_capture_of_a_video_chat(tiny, tmp_path):
    """Image + video + text prompt with an assistant answer: the processor expands the video into per-frame
    timestamp text and vision start/end around the pads; the loss mask is exactly the answer, mRoPE positions
    are HF's get_rope_index with the video grid."""
    from trainer.capture import CaptureOptions, capture_example
    from trainer.hf_target import HFTarget, load_chat_jsonl

    example = load_chat_jsonl(_video_chat(tmp_path, {"fps": 2, "max_frames": 8}))[0]
    assert [v.options for v in example.videos] == [{"fps": 2.0, "max_frames": 8}]
    hf = HFTarget(tiny.dense, device="cpu", dtype=torch.float32)
    rec = capture_example(hf, example, CaptureOptions(layer_ids=[1, 2]))
    tok = hf.tokenizer
    text = tok.decode(rec.input_ids)
    assert "seconds>" in text and text.count("<|video_pad|>") == int((rec.input_ids == hf.model.config.video_token_id).sum())
    assert tok.decode(rec.input_ids[rec.loss_mask]) == "It moves right.<|im_end|>"
    assert rec.meta["num_videos"] == 1 and rec.meta["num_images"] == 1
    video_rows = rec.input_ids == hf.model.config.video_token_id
    assert video_rows.any()
    # video rows get 3-D positions (h / w differ from t somewhere), and text after them continues past the max
    assert (rec.positions[:, video_rows] != rec.positions[0, video_rows]).any()
    assert rec.features.shape == (len(rec), 2 * hf.hidden_size)


def _assemble(chunks: dict, length: int, feature_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The debug dump's consumed feature rows of one request laid out by position, and which rows it covers."""
    feats = torch.zeros(length, feature_dim)
    covered = torch.zeros(length, dtype=torch.bool)
    for start, (f, _) in sorted(chunks.items()):
        n = min(f.shape[0], length - start)
        if n > 0:
            feats[start:start + n] = f[:n]
            covered[start:start + n] = True
    return feats, covered


@pytest.mark.server
def test_offline_capture_of_video_equals_live_capture(tiny, video_serving, tmp_path):
    """The offline capture (trainer/capture.py, HF) of a video prompt == what --online-train captured live for
    the same request (token ids, mRoPE positions, loss mask, features at the video rows; float32): the chat
    request through capture_example --regenerate from chat JSONL, the /generate request through HFTarget.encode."""
    from trainer.capture import CaptureOptions, capture_example, resolve_layer_ids
    from trainer.hf_target import HFTarget, load_chat_jsonl, load_video

    s = video_serving
    hf = HFTarget(tiny.dense, device="cpu", dtype=torch.float32)
    layer_ids = resolve_layer_ids(hf.num_layers, draft_model_path=str(tiny.draft_dense))
    chat_path, chat_body = s.bodies[s.names.index("chat-video-down")]
    jsonl = tmp_path / "chat.jsonl"
    user = chat_body["messages"][0]["content"]
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "video", "video": user[0]["video_url"]["url"]}, user[1]]}]}) + "\n")
    example = load_chat_jsonl(jsonl)[0]
    offline = {"chat-video-down": capture_example(hf, example, CaptureOptions(
        layer_ids=layer_ids, regenerate=True, max_new_tokens=MAX_NEW))}
    # /generate with video_data: the same prompt text, the clip sampled as the server samples it
    _, body = s.bodies[s.names.index("generate-video-right")]
    prompt = hf.encode(body["text"], [load_video(body["video_data"][0])])
    live = s.records["generate-video-right"]
    full = hf.extend(prompt, live.input_ids[len(prompt):].tolist())
    out = hf.forward(full.input_ids, full.positions, layer_ids, vision=full.vision, mode="pre")
    offline["generate-video-right"] = type(live)(input_ids=full.input_ids, features=out.features,
                                                 positions=full.positions,
                                                 loss_mask=torch.arange(len(full)) >= len(prompt), meta={})
    checked = 0
    for rid, off in offline.items():
        live = s.records[rid]
        # live records end where the last token's features were computed (the final token may have none); the
        # offline regeneration stops at EOS or MAX_NEW: compare the common prefix, at least the prompt + 8
        n = min(len(off), len(live))
        assert n >= int((~off.loss_mask).sum()) + 8, (rid, len(off), len(live))
        off = type(off)(input_ids=off.input_ids[:n], features=off.features[:n], positions=off.positions[:, :n],
                        loss_mask=off.loss_mask[:n], meta=off.meta)
        assert torch.equal(off.input_ids, live.input_ids[:n]), rid
        assert torch.equal(off.positions, live.positions[:, :n]), rid
        assert torch.equal(off.loss_mask, live.loss_mask[:n]), rid
        video_rows = off.input_ids == s.video_token_id
        assert video_rows.sum() >= 4, rid
        # features: live persisted rows are bf16; the dumped rows are the fp32 tensors the draft consumed
        consumed, covered = _assemble(s.dumps[rid], len(live), live.features.shape[1])
        rows = video_rows & covered[:n]
        assert rows.sum() == video_rows.sum(), rid                      # every video row was consumed
        torch.testing.assert_close(consumed[:n][rows], off.features[rows], rtol=1e-4, atol=1e-4)
        covered_n = covered[:n]
        torch.testing.assert_close(consumed[:n][covered_n], off.features[covered_n], rtol=1e-4, atol=1e-4)
        assert torch.equal(live.features[:n][rows], consumed[:n][rows].to(torch.bfloat16).float())
        checked += int(rows.sum())
    assert checked > 0
