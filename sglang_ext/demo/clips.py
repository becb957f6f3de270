"""Small synthetic mp4 clips (a coloured square moving across a white frame) for tests, the demo and benchmarks.

    make_clip("/tmp/right.mp4", direction="right", colour="red")      # 8 frames, 96x64, 4 fps, H.264

Encoded with torchcodec (needs the system FFmpeg shared libraries, e.g. `apt-get install ffmpeg`), the same
library SGLang decodes video with.
"""
from __future__ import annotations

import os
from pathlib import Path

from sglang_ext.demo.prompts import COLOURS

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
DIRECTIONS = ("right", "left", "down", "up")


def clip_frames(direction: str = "right", colour: str = "red", frames: int = 8, size: tuple[int, int] = (96, 64),
                square: int = 16):
    """uint8 [frames, 3, H, W]: a `colour` square crossing a white frame towards `direction`."""
    import torch

    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} not in {DIRECTIONS}")
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} not in {sorted(COLOURS)}")
    width, height = size
    out = torch.full((frames, 3, height, width), 255, dtype=torch.uint8)
    rgb = torch.tensor(COLOURS[colour], dtype=torch.uint8)[:, None, None]
    for t in range(frames):
        f = t / max(1, frames - 1)
        x = round(f * (width - square)) if direction in ("right", "left") else (width - square) // 2
        y = round(f * (height - square)) if direction in ("down", "up") else (height - square) // 2
        if direction == "left":
            x = width - square - x
        if direction == "up":
            y = height - square - y
        out[t, :, y:y + square, x:x + square] = rgb
    return out


def make_clip(path: str | os.PathLike, direction: str = "right", colour: str = "red", frames: int = 8,
              size: tuple[int, int] = (96, 64), fps: float = 4.0) -> Path:
    """Write the clip of `clip_frames` as H.264 mp4 at `path` (parent created); returns the path."""
    from torchcodec.encoders import VideoEncoder

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    VideoEncoder(clip_frames(direction, colour, frames, size), frame_rate=fps).to_file(
        path, codec="libx264", pixel_format="yuv420p", crf=18)
    return path


def video_chat_prompt(user_text: str, n_videos: int = 1, n_images: int = 0) -> str:
    """The tiny models' chat format with image then video placeholders before the text."""
    from sglang_ext.demo.prompts import IMAGE_PLACEHOLDER
    return (f"<|im_start|>user\n{IMAGE_PLACEHOLDER * n_images}{VIDEO_PLACEHOLDER * n_videos}{user_text}"
            f"<|im_end|>\n<|im_start|>assistant\n")
