"""Offline capture: chat JSONL -> replay shards of pre-deepstack Qwen3-VL target features, with HF transformers.

    python -m trainer.capture --target-model-path TARGET --data chat.jsonl --output REPLAY_DIR \\
        [--layers 1 2 3 | --draft-model-path DRAFT | --num-features K] [--dtype bf16|fp8] \\
        [--regenerate --max-new-tokens N] [--include-prompt-loss]

Data: one JSON object per line, {"messages": [{"role": ..., "content": str | [parts]}]}, parts being
{"type": "text", "text": ...}, {"type": "image", "image": "<path>"} or {"type": "video", "video": "<path>",
...options} (relative paths are resolved against the JSONL file's directory; video options: SGLang's
`--mm-process-config` video keys, trainer.hf_target.VIDEO_OPTIONS, e.g. "fps", "max_frames"; frames are
sampled as the SGLang server samples them, so give the options the server uses). The whole file is validated
before the model is loaded: a bad JSON line or a missing image / video file is an error naming the file and
the line.

Per conversation, one ReplayRecord (see trainer/replay.py):
    input_ids  [S]       the chat-template rendering tokenized by the target's processor (images expanded)
    features   [S, K*H]  for each layer k in layer_ids (in that order): the residual stream after decoder
                         layer k and BEFORE the deepstack visual embedding of layer k is added (HF adds it at
                         image/video rows after layers k < len(deepstack_visual_indexes), see
                         trainer/hf_target.py). Layers 0-2 are therefore as usable as any other.
    positions  [3, S]    mRoPE position ids from the model's get_rope_index
    loss_mask  [S]       True on assistant tokens: each assistant turn's content and its end-of-turn token
                         (the template's whitespace after it excluded); --include-prompt-loss also sets every
                         non-image prompt token.
--regenerate: drafts must be trained on the target's OWN greedy outputs. The final assistant turn (if any) is
dropped and replaced by the target's greedy continuation of the rest (at most --max-new-tokens tokens, the
EOS token included when produced); the tokens are spliced as generated (no detokenize/retokenize). Only
the regenerated tokens are in the loss mask (earlier assistant turns were not written by this target);
--include-prompt-loss adds the prompt as above.

Exactness (tests/test_capture.py, float32, dense and MoE): at image rows of layers k < 3 the captured
features plus HF's own deepstack tensor equal, bit for bit (torch.equal, tolerance 0), the residual stream that
HF feeds layer k+1; at text rows and for layers >= 3 the two are bit-identical. Stored shards round the
features to bf16 (or fp8 with per-token-and-layer scales).

Target layers (default): the layers the draft's kind reads with --draft-model-path (DFlash:
dflash_config.target_layer_ids; EAGLE3: the aux layers plus the target's last layer), else K (--num-features,
default 5, at most L-3) evenly spaced in [1, L-3] (SGLang's build_target_layer_ids).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.dflash_draft import default_target_layer_ids
from trainer.draft_kind import kind_for_draft
from trainer.hf_target import ChatDataError, ChatExample, EncodedPrompt, HFTarget, load_chat_jsonl, load_media
from trainer.replay import STORAGE, ReplayRecord, ReplaySpec, ShardWriter
from trainer.target import target_identity, target_info

log = logging.getLogger("trainer.capture")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_NUM_FEATURES = 5      # published DFlash drafts read 5 target layers (one per draft layer)


# ---- layer choice -------------------------------------------------------------------------------------------

def resolve_layer_ids(num_target_layers: int, layers: list[int] | None = None, draft_model_path: str | None = None,
                      num_features: int | None = None) -> list[int]:
    """Explicit --layers, else the layers the draft's kind reads (DFlash: target_layer_ids), else evenly
    spaced in [1, L-3] (SGLang's DFlash default)."""
    draft_ids = None
    if draft_model_path is not None:
        kind = kind_for_draft(draft_model_path)
        cfg = kind.load_config(draft_model_path)
        if cfg.num_target_layers != num_target_layers:
            raise ValueError(f"draft {draft_model_path} was built for {cfg.num_target_layers} target layers, the "
                             f"target has {num_target_layers}")
        draft_ids = kind.feature_layers(cfg)
    if layers is not None:
        ids = [int(k) for k in layers]
        if draft_ids is not None and ids != draft_ids:
            raise ValueError(f"--layers {ids} differ from the layers the draft reads {draft_ids}: the replay "
                             "could not train that draft")
    elif draft_ids is not None:
        ids = draft_ids
    else:
        max_k = max(1, num_target_layers - 3)
        k = min(num_features or DEFAULT_NUM_FEATURES, max_k)
        ids = default_target_layer_ids(num_target_layers, k)
    if not ids:
        raise ValueError("no target layers to capture")
    if len(set(ids)) != len(ids):
        raise ValueError(f"target layer ids {ids} contain duplicates")
    bad = [k for k in ids if not 0 <= k < num_target_layers]
    if bad:
        raise ValueError(f"target layer ids {bad} out of range for a target with {num_target_layers} layers "
                         f"(valid: 0..{num_target_layers - 1})")
    return ids


# ---- loss mask -----------------------------------------------------------------------------------------------

def assistant_char_spans(target: HFTarget, example: ChatExample) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [start, end) char spans of every assistant turn's content + end-of-turn token).

    A turn's span starts where the template's generation prompt for it ends and stops at the end of that
    turn's rendering, trailing whitespace excluded. Needs a template that renders prefixes consistently."""
    messages = example.messages
    full = target.render(messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = target.render(messages[:i], add_generation_prompt=True) if i else ""
        through = target.render(messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise ChatDataError(example.source, example.line,
                                f"the chat template does not render messages[:{i}] as a prefix of the conversation; "
                                "cannot locate the assistant turn", f"messages[{i}]")
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _expanded_char_index(replacements: list[tuple[int, int, int]]) -> Callable[[int], int]:
    """Map char positions of the rendered text to positions in the processor's expanded text, given each
    placeholder it replaced: (start, end) in the rendered text -> length of its expansion (an image: n image
    pads; a Qwen3-VL video: per-frame timestamp text, vision start/end and video pads). Positions inside a
    placeholder map to its start."""
    def index(c: int) -> int:
        shift = 0
        for start, end, new_len in replacements:
            if end <= c:
                shift += new_len - (end - start)
            elif start < c:
                return start + shift
        return c + shift
    return index


def token_mask_from_spans(enc: EncodedPrompt, text: str, spans: list[tuple[int, int]],
                          target: HFTarget) -> torch.Tensor:
    """[S] bool: tokens whose first char lies inside one of the spans (spans in un-expanded `text`; `enc`
    encoded with offsets)."""
    if enc.offsets is None or enc.replacements is None:
        raise ValueError("token_mask_from_spans needs a prompt encoded with with_offsets=True")
    index = _expanded_char_index(enc.replacements)
    starts = enc.offsets[:, 0]
    mask = torch.zeros(len(enc), dtype=torch.bool)
    for a, b in spans:
        mask |= (starts >= index(a)) & (starts < index(b))
    return mask


# ---- one conversation -> one record --------------------------------------------------------------------------

@dataclass
class CaptureOptions:
    layer_ids: list[int]
    regenerate: bool = False
    max_new_tokens: int = 512
    include_prompt_loss: bool = False


def _count_parts(messages: list[dict], kind: str) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == kind)


def capture_example(target: HFTarget, example: ChatExample, opts: CaptureOptions) -> ReplayRecord:
    media = load_media(example)                      # images, then videos
    images, videos = media[:len(example.image_paths)], media[len(example.image_paths):]
    if opts.regenerate:
        prompt_msgs = example.prompt_messages()
        if not prompt_msgs:
            raise ChatDataError(example.source, example.line, "nothing to continue: no message before the "
                                                             "assistant turn", "messages")
        prompt_media = images[:_count_parts(prompt_msgs, "image")] + videos[:_count_parts(prompt_msgs, "video")]
        prompt = target.encode(target.render(prompt_msgs, add_generation_prompt=True), prompt_media)
        generated = target.greedy(prompt, opts.max_new_tokens)
        if not generated:
            raise ChatDataError(example.source, example.line, "the target generated no tokens")
        enc = target.extend(prompt, generated)
        loss_mask = torch.arange(len(enc)) >= len(prompt)
    else:
        text, spans = assistant_char_spans(target, example)
        if not spans:
            raise ChatDataError(example.source, example.line, "no assistant turn to train on (add one, or use "
                                                             "--regenerate to let the target write it)", "messages")
        enc = target.encode(text, media, with_offsets=True)
        loss_mask = token_mask_from_spans(enc, text, spans, target)
        if not loss_mask.any():
            raise ChatDataError(example.source, example.line, "the assistant turns tokenized to nothing")
    if opts.include_prompt_loss:
        loss_mask = loss_mask | ~enc.is_vision
    out = target.forward(enc.input_ids, enc.positions, opts.layer_ids, vision=enc.vision, mode="pre")
    meta = {"source": example.source, "line": example.line, "regenerated": opts.regenerate,
            "num_images": len(images), "num_videos": len(videos)}
    return ReplayRecord(input_ids=enc.input_ids, features=out.features.cpu(), positions=enc.positions,
                        loss_mask=loss_mask, meta=meta)


# ---- the job -------------------------------------------------------------------------------------------------

@dataclass
class CaptureSummary:
    output: str
    layer_ids: list[int]
    records: int
    tokens: int
    loss_tokens: int
    wall_s: float


def run_capture(target_model_path: str | Path, data: str | Path, output: str | Path, *,
                layers: list[int] | None = None, draft_model_path: str | None = None, num_features: int | None = None,
                dtype: str = "bf16", regenerate: bool = False, max_new_tokens: int = 512,
                include_prompt_loss: bool = False, device: str | None = None, model_dtype: str | None = None,
                max_shard_tokens: int = 1 << 16, progress: bool = True) -> CaptureSummary:
    from tqdm import tqdm
    t0 = time.monotonic()
    if dtype not in STORAGE:
        raise ValueError(f"--dtype {dtype!r} not in {sorted(STORAGE)}")
    if regenerate and max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if model_dtype is not None and model_dtype not in MODEL_DTYPES:
        raise ValueError(f"--model-dtype {model_dtype!r} not in {sorted(MODEL_DTYPES)}")
    info = target_info(target_model_path)                 # cheap checks first: config, then data, then weights
    layer_ids = resolve_layer_ids(info.num_hidden_layers, layers, draft_model_path, num_features)
    examples = load_chat_jsonl(data)
    spec = ReplaySpec(target=target_identity(target_model_path), layer_ids=tuple(layer_ids),
                      hidden_size=info.hidden_size, storage_dtype=STORAGE[dtype])
    writer = ShardWriter(output, spec, max_shard_tokens=max_shard_tokens)   # refuses an incompatible directory
    target = HFTarget(target_model_path, device=device, dtype=MODEL_DTYPES.get(model_dtype))
    opts = CaptureOptions(layer_ids=layer_ids, regenerate=regenerate, max_new_tokens=max_new_tokens,
                          include_prompt_loss=include_prompt_loss)
    tokens = loss_tokens = 0
    with writer:
        bar = tqdm(examples, desc="capture", unit="conv", disable=not progress)
        for example in bar:
            record = capture_example(target, example, opts)
            writer.add(record)
            tokens += len(record)
            loss_tokens += int(record.loss_mask.sum())
            bar.set_postfix(tokens=tokens, loss_tokens=loss_tokens)
    return CaptureSummary(output=str(output), layer_ids=layer_ids, records=len(examples), tokens=tokens,
                          loss_tokens=loss_tokens, wall_s=time.monotonic() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.capture",
                                description="Capture pre-deepstack Qwen3-VL target features for draft training "
                                            "(DFlash or EAGLE3) from chat JSONL, offline with HF transformers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target-model-path", required=True, metavar="PATH", help="local Qwen3-VL checkpoint (dense/MoE)")
    p.add_argument("--data", required=True, metavar="FILE", help='chat JSONL: {"messages": [...]} per line')
    p.add_argument("--output", required=True, metavar="DIR", help="replay directory (created or appended to)")
    lay = p.add_argument_group("target layers (default: the draft's, else evenly spaced in [1, L-3])")
    lay.add_argument("--layers", type=int, nargs="+", default=None, metavar="K", help="explicit target layer ids")
    lay.add_argument("--draft-model-path", default=None, metavar="DIR",
                     help="capture the layers this draft reads (DFlash: target_layer_ids; EAGLE3: aux layers + the "
                          "last layer)")
    lay.add_argument("--num-features", type=int, default=None, metavar="K",
                     help=f"how many evenly spaced layers without --layers/--draft-model-path "
                          f"(default {DEFAULT_NUM_FEATURES}, at most L-3)")
    p.add_argument("--dtype", choices=sorted(STORAGE), default="bf16", help="feature storage dtype in the shards")
    p.add_argument("--regenerate", action="store_true",
                   help="replace the final assistant turn by the target's greedy continuation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="cap on regenerated tokens")
    p.add_argument("--include-prompt-loss", action="store_true", help="also put (non-image) prompt tokens in the loss")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--model-dtype", choices=sorted(MODEL_DTYPES), default=None,
                   help="compute dtype of the target (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--max-shard-tokens", type=int, default=1 << 16, help="tokens per replay shard")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        s = run_capture(args.target_model_path, args.data, args.output, layers=args.layers,
                        draft_model_path=args.draft_model_path, num_features=args.num_features, dtype=args.dtype,
                        regenerate=args.regenerate, max_new_tokens=args.max_new_tokens,
                        include_prompt_loss=args.include_prompt_loss, device=args.device,
                        model_dtype=args.model_dtype, max_shard_tokens=args.max_shard_tokens,
                        progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:         # ChatDataError / ReplayError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("captured %d conversations, %d tokens (%d in the loss) of layers %s into %s in %.1fs",
             s.records, s.tokens, s.loss_tokens, s.layer_ids, s.output, s.wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
