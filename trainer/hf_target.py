"""The Qwen3-VL target run with HF transformers, offline: what `trainer.capture` and `trainer.evaluate` share.

    chat JSONL  --load_chat_jsonl-->  [ChatExample]          (validated: bad line / missing image -> ChatDataError)
    load_media(example)                   -> [PIL image | VideoClip]   (videos sampled as SGLang samples them)
    HFTarget(path).encode(text, media)    -> EncodedPrompt   input_ids [S], mRoPE positions [3, S], pixels
    HFTarget.forward(ids, positions, ...) -> TargetOutput    logits [n, V], features [n, K*H] (pre-deepstack)
    HFTarget.greedy(prompt, N)            -> [token ids]     the target's own greedy continuation

Target features (what a DFlash draft reads): for each requested layer k, the residual stream right after
decoder layer k, concatenated in layer-id order. HF's `Qwen3VLTextModel.forward` (and the MoE twin
`Qwen3VLMoeTextModel.forward`) add the deepstack visual embedding `deepstack_visual_embeds[k]` to the image /
video rows right AFTER layer k returns, for k < len(deepstack_visual_indexes) (0, 1, 2 for Qwen3-VL):

    hidden = layers[k](hidden)                    <- "pre"  : forward hook on layers[k] (its output)
    hidden = _deepstack_process(hidden, ...)      (k < n_deepstack; clones, then adds at visual rows)
    hidden = layers[k+1](hidden)                  <- "post" : forward pre-hook on layers[k+1] (its input)

"pre" is what capture writes and training uses. "post" is what stock SGLang 0.5.23 captures while serving
(`Qwen3LLMModel.forward` records the residual entering layer k+1, after `add_to_output` of the deepstack
slice), offered so the offline evaluator can mirror a stock server exactly. The two differ only at
image/video rows of prefill (deepstack is zero for text rows and in every decode/verify step), and there by
exactly the deepstack tensor: `tests/test_capture.py` checks post - pre == deepstack with torch.equal
(float32, bit-exact: HF computes the post rows as pre_rows + deepstack with the same op). Note that in
transformers 5.19 `output_hidden_states[k+1]` is recorded by a forward hook on the decoder layer too, so it
is also pre-deepstack; the post-deepstack stream is only visible as the next layer's input.

mRoPE positions: `model.model.get_rope_index` for a prompt ([3, S]); tokens appended after it (decode /
verify) sit at seq index t -> position t + rope_delta in all three rows, as in HF generation and SGLang's
verify (1-D positions + per-request mrope delta).

Video parts ({"type": "video", "video": path, ...options}): the frames are sampled and resized as SGLang
0.5.23's Qwen-VL processor does before calling the HF processor (`qwen_vl.preprocess_video`: torchcodec
decode, `smart_nframes` frame count, linspace frame indices, `smart_resize` + bilinear resize), then the HF
processor runs with those frames, their metadata and `do_sample_frames=False`, as SGLang calls it. The options
are SGLang's `--mm-process-config '{"video": {...}}'` keys (VIDEO_OPTIONS); give a part the same options as the
server that served it. The processor expands each video into per-frame timestamp text and vision start/end
tokens around the video pads; `EncodedPrompt.replacements` records that expansion for the loss mask.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

FEATURE_MODES = ("pre", "post")
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")   # model kwargs


# ---- chat data -------------------------------------------------------------------------------------------

class ChatDataError(ValueError):
    """A problem in a chat JSONL file, naming the file, the line and (when known) the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, field_name: str | None = None):
        self.path, self.line, self.field = str(path), line, field_name
        where = f"{path}" + (f":{line}" if line is not None else "") + (f" [{field_name}]" if field_name else "")
        super().__init__(f"{where}: {message}")


@dataclass
class ChatExample:
    """One conversation: messages in the HF chat format with image parts resolved to existing files."""
    messages: list[dict]            # [{"role", "content": str | [{"type": "text"|"image", ...}]}]
    image_paths: list[Path]         # every image part, in order of appearance
    source: str                     # file the example came from
    line: int                       # 1-based line number in that file
    videos: list["VideoRef"] = field(default_factory=list)   # every video part, in order of appearance

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (without) its final assistant turn: what a generation continues."""
        msgs = list(self.messages)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return msgs


def _resolve_image(value: Any, base: Path, path: Path, line: int, field_name: str, kind: str = "image") -> Path:
    if not isinstance(value, str) or not value:
        raise ChatDataError(path, line, f"{kind} must be a non-empty file path string, got {value!r}", field_name)
    if value.startswith(("http://", "https://", "data:")):
        raise ChatDataError(path, line, f"only local {kind} files are supported offline, got {value[:60]!r}",
                            field_name)
    p = Path(value.removeprefix("file://")).expanduser()
    if not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise ChatDataError(path, line, f"{kind} file not found: {p}", field_name)
    return p


# SGLang's `--mm-process-config '{"video": {...}}'` keys that decide which frames the model sees and their size
# (sglang/srt/multimodal/processors/qwen_vl.py QWEN_VIDEO_PREPROCESS_CONFIG_KEYS); a chat video part may carry them.
VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                 "resized_height", "resized_width")
_INT_VIDEO_OPTIONS = {"nframes", "min_frames", "max_frames", "resized_height", "resized_width"}


@dataclass
class VideoRef:
    """A chat video part: the file and its sampling options (a subset of VIDEO_OPTIONS)."""
    path: Path
    options: dict[str, float | int] = field(default_factory=dict)


def parse_video_options(part: dict, path: Path, line: int, where: str) -> dict[str, float | int]:
    """The VIDEO_OPTIONS of a video part, validated (positive numbers; fps xor nframes; both resized_* or none)."""
    opts = {}
    for key, value in part.items():
        if key in ("type", "video"):
            continue
        if key not in VIDEO_OPTIONS:
            raise ChatDataError(path, line, f"unknown video option {key!r} (expected one of {', '.join(VIDEO_OPTIONS)})",
                                f"{where}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                (key in _INT_VIDEO_OPTIONS and value != int(value)):
            kind = "a positive integer" if key in _INT_VIDEO_OPTIONS else "a positive number"
            raise ChatDataError(path, line, f"video option {key} must be {kind}, got {value!r}", f"{where}.{key}")
        opts[key] = int(value) if key in _INT_VIDEO_OPTIONS else float(value)
    if "fps" in opts and "nframes" in opts:
        raise ChatDataError(path, line, "give either fps or nframes, not both", where)
    if ("resized_height" in opts) != ("resized_width" in opts):
        raise ChatDataError(path, line, "give resized_height and resized_width together", where)
    return opts


def parse_chat_example(obj: Any, path: Path, line: int) -> ChatExample:
    """Validate one JSON object {"messages": [...]}; image paths are resolved against the file's directory."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise ChatDataError(path, line, 'expected a JSON object with a "messages" list')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(path, line, "must be a non-empty list", "messages")
    images, videos, clean = [], [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ChatDataError(path, line, 'each message needs a string "role"', where)
        content = msg.get("content")
        if isinstance(content, str):
            clean.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ChatDataError(path, line, f"content must be a string or a list of parts, got "
                                            f"{type(content).__name__}", where + ".content")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ChatDataError(path, line, 'text part needs a string "text"', pwhere)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                img = _resolve_image(part.get("image"), path.parent, path, line, pwhere + ".image")
                images.append(img)
                parts.append({"type": "image", "image": str(img)})
            elif kind == "video":
                video = _resolve_image(part.get("video"), path.parent, path, line, pwhere + ".video", "video")
                options = parse_video_options(part, path, line, pwhere)
                videos.append(VideoRef(video, options))
                parts.append({"type": "video", "video": str(video), **options})
            else:
                raise ChatDataError(path, line, f"unsupported part type {kind!r} (expected 'text', 'image' or "
                                                "'video')", pwhere)
        clean.append({"role": msg["role"], "content": parts})
    return ChatExample(messages=clean, image_paths=images, source=str(path), line=line, videos=videos)


def load_chat_jsonl(path: str | os.PathLike) -> list[ChatExample]:
    """Read and validate a whole chat JSONL file up front (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(path, None, "chat data file not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ChatDataError(path, n, f"bad JSON: {e.msg} (column {e.colno})") from e
            examples.append(parse_chat_example(obj, path, n))
    if not examples:
        raise ChatDataError(path, None, "no examples (empty file)")
    return examples


def load_images(example: ChatExample) -> list:
    from PIL import Image
    out = []
    for p in example.image_paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise ChatDataError(example.source, example.line, f"cannot read image {p}: {e}") from e
    return out


def load_media(example: ChatExample) -> list:
    """The example's images (PIL) then videos (VideoClip): what `HFTarget.encode` takes (each kind in order of
    appearance; the processor matches them to the image / video placeholders of its kind in order)."""
    videos = []
    for ref in example.videos:
        try:
            videos.append(load_video(ref.path, ref.options))
        except (OSError, RuntimeError, ValueError) as e:
            raise ChatDataError(example.source, example.line, f"cannot read video {ref.path}: {e}") from e
    return load_images(example) + videos


# ---- video: frames as SGLang samples them (sglang/srt/multimodal/processors/qwen_vl.py, 0.5.23) ------------

IMAGE_FACTOR = 28
IMAGE_MIN_PIXELS = 4 * 28 * 28            # smart_resize's defaults (used with resized_height / resized_width)
IMAGE_MAX_PIXELS = 16384 * 28 * 28        # $SGLANG_IMAGE_MAX_PIXELS default
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
FRAME_FACTOR = 2
VIDEO_FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200


def video_total_pixels() -> int:
    """SGLang's VIDEO_TOTAL_PIXELS (read from $VIDEO_MAX_PIXELS as SGLang reads it)."""
    return int(float(os.environ.get("VIDEO_MAX_PIXELS", 128000 * 28 * 28 * 0.9)))


@dataclass
class VideoClip:
    """Sampled, resized frames and the metadata the HF processor needs (its timestamps come from it)."""
    frames: torch.Tensor             # [T, 3, H, W] uint8
    metadata: dict                   # fps, duration, total_num_frames, frames_indices, video_backend


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    import math
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    import math
    return math.floor(x / f) * f


def video_num_frames(options: dict, total_frames: int, video_fps: float) -> int:
    """SGLang's `smart_nframes`: nframes (rounded to FRAME_FACTOR), else the clip's duration at `fps` clamped
    to [min_frames, max_frames] and to the clip."""
    if "nframes" in options:
        n = _round_by(options["nframes"], FRAME_FACTOR)
    else:
        fps = options.get("fps", VIDEO_FPS)
        min_frames = _ceil_by(options.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = _floor_by(options.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = _floor_by(min(min(max(n, min_frames), max_frames), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"{n} frames to sample, outside [{FRAME_FACTOR}, {total_frames}] (the clip has "
                         f"{total_frames} frames)")
    return int(n)


def video_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """SGLang's `smart_resize`: both sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    import math
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} above {MAX_RATIO}")
    h, w = max(factor, _round_by(height, factor)), max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = _floor_by(height / beta, factor), _floor_by(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil_by(height * beta, factor), _ceil_by(width * beta, factor)
    return h, w


def load_video(path: str | os.PathLike, options: dict | None = None) -> VideoClip:
    """Decode with torchcodec and sample / resize as SGLang's `qwen_vl.preprocess_video` does with video config
    `options` (VIDEO_OPTIONS; {} = SGLang's defaults: 2 fps, at least 4 frames)."""
    import numpy as np
    import torchvision
    from torchcodec.decoders import VideoDecoder
    from torchvision.transforms import InterpolationMode

    options = dict(options or {})
    decoder = VideoDecoder(str(path), dimension_order="NHWC")
    total, fps = int(decoder.metadata.num_frames), float(decoder.metadata.average_fps)
    n = video_num_frames(options, total, fps)
    idx = np.unique(np.linspace(0, total - 1, num=n, dtype=np.int64))
    video = decoder.get_frames_at(idx.tolist()).data.permute(0, 3, 1, 2)        # NHWC -> TCHW
    t, _, height, width = video.shape
    min_pixels = options.get("min_pixels", VIDEO_MIN_PIXELS)
    total_pixels = options.get("total_pixels", video_total_pixels())
    max_pixels = max(min(options.get("max_pixels", VIDEO_MAX_PIXELS), total_pixels / t * FRAME_FACTOR),
                     int(min_pixels * 1.05))
    max_pixels = min(options.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in options and "resized_width" in options:
        h, w = video_resize(options["resized_height"], options["resized_width"], IMAGE_FACTOR, IMAGE_MIN_PIXELS,
                            int(os.environ.get("SGLANG_IMAGE_MAX_PIXELS", IMAGE_MAX_PIXELS)))
    else:
        h, w = video_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    video = torchvision.transforms.functional.resize(video, [h, w], interpolation=InterpolationMode.BILINEAR)
    metadata = {"fps": fps, "duration": total / fps, "total_num_frames": total, "frames_indices": idx,
                "video_backend": "torchvision"}
    return VideoClip(frames=video, metadata=metadata)


# ---- the target ------------------------------------------------------------------------------------------

@dataclass
class EncodedPrompt:
    input_ids: torch.Tensor          # [S] long
    positions: torch.Tensor          # [3, S] long, mRoPE (t, h, w)
    rope_delta: int                  # a token appended at seq index t sits at position t + rope_delta
    vision: dict[str, torch.Tensor]  # VISION_INPUTS the processor returned, for the model (empty for text-only)
    is_vision: torch.Tensor          # [S] bool, image/video placeholder rows (where deepstack is added)
    offsets: torch.Tensor | None = None   # [S, 2] char offsets into the processor's expanded text
    # with offsets: each placeholder the processor expanded, (start, end) in the given text -> expanded length
    replacements: list[tuple[int, int, int]] | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class TargetOutput:
    logits: torch.Tensor             # [n, V] float32
    features: torch.Tensor           # [n, K*H] target layers concatenated in layer-id order
    per_layer: dict[int, torch.Tensor] = field(default_factory=dict)   # layer id -> [n, H] (same tensors)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFTarget:
    """A Qwen3-VL checkpoint (dense or MoE) with its processor, in eval mode, gradients off."""

    def __init__(self, path: str | os.PathLike, *, device: str | None = None, dtype: torch.dtype | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"target checkpoint {self.path} has no config.json")
        self.device = torch.device(device or default_device())
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.text_model = self.model.model.language_model
        self.layers = self.text_model.layers
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.text_model.config.hidden_size)
        vision_cfg = getattr(self.model.config, "vision_config", None)
        self.num_deepstack = len(getattr(vision_cfg, "deepstack_visual_indexes", None) or [])
        self.vision_token_ids = {int(i) for i in (getattr(self.model.config, "image_token_id", None),
                                                  getattr(self.model.config, "video_token_id", None))
                                 if i is not None}
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos]))
        return ids

    # ---- text + images -> tokens and positions ----
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, images: list | None = None, *, with_offsets: bool = False) -> EncodedPrompt:
        """Tokenize (expanding each image / video placeholder: image pads, or per-frame timestamps and vision
        start/end around video pads) and compute mRoPE positions. `images`: the media in order, PIL images and
        VideoClips (load_media); each kind is matched to its placeholders in order."""
        media = list(images or [])
        pictures = [m for m in media if not isinstance(m, VideoClip)]
        videos = [m for m in media if isinstance(m, VideoClip)]
        kwargs = {"return_offsets_mapping": True, "return_text_replacement_offsets": True} if with_offsets else {}
        if videos:       # frames already sampled as SGLang samples them; HF takes the timestamps from the metadata
            kwargs.update(videos=[v.frames for v in videos], video_metadata=[dict(v.metadata) for v in videos],
                          do_sample_frames=False)
        enc = self.processor(text=[text], images=pictures or None, return_tensors="pt", **kwargs)
        ids = enc["input_ids"][0].long()
        types = enc.get("mm_token_type_ids")
        types = types if types is not None else torch.zeros_like(enc["input_ids"])
        vision = {k: enc[k].to(self.device) for k in VISION_INPUTS if k in enc}
        for k in ("pixel_values", "pixel_values_videos"):
            if k in vision:
                vision[k] = vision[k].to(self.dtype)
        positions, delta = self.model.model.get_rope_index(
            enc["input_ids"], mm_token_type_ids=types, image_grid_thw=enc.get("image_grid_thw"),
            video_grid_thw=enc.get("video_grid_thw"))
        replacements = None
        if with_offsets:
            replacements = [(int(r["span"][0]), int(r["span"][1]), len(r["replacement"]))
                            for r in enc["text_replacement_offsets"][0]]
        return EncodedPrompt(input_ids=ids, positions=positions[:, 0].long().cpu(),
                             rope_delta=int(delta.reshape(-1)[0]), vision=vision, is_vision=types[0] != 0,
                             offsets=enc["offset_mapping"][0] if with_offsets else None, replacements=replacements)

    def continuation_positions(self, prompt: EncodedPrompt, start: int, n: int) -> torch.Tensor:
        """[3, n] mRoPE positions of n tokens appended at seq indices start .. start+n-1."""
        return (torch.arange(start, start + n) + prompt.rope_delta).expand(3, n).clone()

    def extend(self, prompt: EncodedPrompt, new_ids: list[int] | torch.Tensor) -> EncodedPrompt:
        """The prompt with tokens appended (positions continued with the rope delta; same pixels)."""
        new_ids = torch.as_tensor(new_ids, dtype=torch.long).reshape(-1)
        return EncodedPrompt(
            input_ids=torch.cat([prompt.input_ids, new_ids]),
            positions=torch.cat([prompt.positions, self.continuation_positions(prompt, len(prompt), len(new_ids))], 1),
            rope_delta=prompt.rope_delta, vision=prompt.vision,
            is_vision=torch.cat([prompt.is_vision, torch.zeros(len(new_ids), dtype=torch.bool)]))

    # ---- forward with feature capture ----
    def check_layer_ids(self, layer_ids: list[int] | tuple[int, ...]) -> None:
        bad = [k for k in layer_ids if not 0 <= int(k) < self.num_layers]
        if bad or not layer_ids:
            raise ValueError(f"target layer ids {list(layer_ids)} invalid for {self.path} with {self.num_layers} "
                             f"decoder layers (valid: 0..{self.num_layers - 1})")

    @contextmanager
    def capture(self, layer_ids: list[int] | tuple[int, ...], mode: str = "pre") -> Iterator[dict[int, torch.Tensor]]:
        """Hooks recording, per layer id k, the residual stream after layer k: "pre" = before the deepstack
        add (layer k's output), "post" = after it (layer k+1's input; the last layer has no deepstack)."""
        if mode not in FEATURE_MODES:
            raise ValueError(f"feature mode {mode!r} not in {FEATURE_MODES}")
        self.check_layer_ids(layer_ids)
        got: dict[int, torch.Tensor] = {}
        handles = []

        def on_output(k):
            def hook(module, args, output):
                got[k] = (output[0] if isinstance(output, tuple) else output)[0].detach()
            return hook

        def on_input(k):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                got[k] = hidden[0].detach()
            return hook

        try:
            for k in dict.fromkeys(int(i) for i in layer_ids):
                if mode == "post" and k + 1 < self.num_layers:
                    handles.append(self.layers[k + 1].register_forward_pre_hook(on_input(k), with_kwargs=True))
                else:
                    handles.append(self.layers[k].register_forward_hook(on_output(k)))
            yield got
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layer_ids: list[int] | tuple[int, ...] = (),
                *, cache=None, vision: dict | None = None, mode: str = "pre") -> TargetOutput:
        """One forward over input_ids [n] at mRoPE positions [3, n] (after whatever `cache` holds).
        Returns float32 logits [n, V] and the concatenated features [n, K*H] (empty when no layer ids)."""
        ids = input_ids.reshape(1, -1).to(self.device)
        kwargs = dict(vision or {})            # explicit position_ids: HF skips its own get_rope_index
        with self.capture(layer_ids, mode) if layer_ids else _null_capture() as got:
            out = self.model(input_ids=ids, position_ids=positions.reshape(3, 1, -1).to(self.device),
                             past_key_values=cache, use_cache=cache is not None, **kwargs)
        per_layer = {int(k): got[int(k)].float() for k in layer_ids}
        features = (torch.cat([per_layer[int(k)] for k in layer_ids], dim=-1) if layer_ids
                    else torch.empty(ids.shape[1], 0, device=self.device))
        return TargetOutput(logits=out.logits[0].float(), features=features, per_layer=per_layer)

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config.get_text_config())

    @staticmethod
    def crop_cache(cache, length: int) -> None:
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)

    @torch.no_grad()
    def greedy(self, prompt: EncodedPrompt, max_new_tokens: int, *, stop_at_eos: bool = True) -> list[int]:
        """The target's greedy continuation (KV cache), at most max_new_tokens, the EOS token included."""
        if max_new_tokens <= 0:
            return []
        cache = self.new_cache()
        out = self.forward(prompt.input_ids, prompt.positions, cache=cache, vision=prompt.vision)
        tokens = [int(out.logits[-1].argmax())]
        while len(tokens) < max_new_tokens and not (stop_at_eos and tokens[-1] in self.eos_token_ids):
            t = len(prompt) + len(tokens) - 1
            out = self.forward(torch.tensor([tokens[-1]]), self.continuation_positions(prompt, t, 1), cache=cache)
            tokens.append(int(out.logits[-1].argmax()))
        return tokens


@contextmanager
def _null_capture():
    yield {}
