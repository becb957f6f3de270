"""Video on the CPU platform: clips made here, decoded by SGLang's own decoder without pinning (the always-on
hooks of sglang_ext/video_hooks.py), and served by real SGLang: plain == DFLASH greedy on video requests mixed
with image and text requests, and --online-train records video requests as such."""
import json
import os
import subprocess
import sys

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
