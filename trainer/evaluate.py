"""Acceptance of a draft against its target: tau = tokens committed per verify step, two ways.

    python -m trainer.evaluate --target-model-path TARGET --draft-model-path DRAFT --prompts FILE.jsonl \\
        --block-size 4 --max-new-tokens N [--offline] [--served] [--output report.json]

Same prompts (chat JSONL as in trainer.capture; a trailing assistant turn is dropped, the rest rendered with
the generation prompt), same block size, greedy, in both ways:

The draft's kind (trainer.draft_kind, from its config.json) supplies the model and SGLang's verify rule for it.

(a) offline (`evaluate_offline`): HF transformers target (trainer.hf_target, the capture code) + the trainer's
    draft, replaying SGLang 0.5.23's speculative loop for one request at a time (`DraftKind.simulate_prompt`).
    The loop, its verify and finish rules, and how tau is counted: trainer/verify_sim.py.
(b) served (`evaluate_served`): real SGLang (sglang_ext.launcher; the CPU platform by default) with the draft's
    --speculative-algorithm and --speculative-num-draft-tokens B, one request at a time, temperature 0,
    reading meta_info.

Context features: "pre" (default) feeds the draft the same pre-deepstack features trainer.capture records,
which is also what a server with this plugin installed feeds a draft under --online-train, and any draft whose
config.json carries our export marker (sglang_ext.target_features = pre_deepstack; every export writes it)
with or without --online-train (sglang_ext.hooks.pre_deepstack_aux_hidden_states subtracts the deepstack
again, up to one rounding). Stock SGLang 0.5.23 (or an unmarked draft) gets POST-deepstack features on the
prompt's image / video rows of layers k < 3 (`Qwen3LLMModel.forward` captures the residual entering layer
k+1): pass context_features="post" (--context-features post) to mirror that exactly on such a server. Text
rows and all decode rows are identical either way.

Numerics: offline and served run the same float32 weights; they agree exactly as long as no greedy argmax is a
near-tie that different kernels break differently. tests/test_evaluate.py compares per prompt: output ids,
verify steps, accept histograms and accept lengths must be equal.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.draft_kind import kind_for_draft
from trainer.hf_target import FEATURE_MODES, ChatExample, HFTarget, load_chat_jsonl, load_images, load_media
from trainer.verify_sim import PromptTau, accept_histogram, finished_len, simulate_chain  # noqa: F401 (also here)


@dataclass
class TauReport:
    mode: str                        # "offline" | "served"
    target: str
    draft: str
    block_size: int
    max_new_tokens: int
    prompts: list[PromptTau] = field(default_factory=list)
    context_features: str | None = None
    wall_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean over prompts of SGLang's per-request spec_accept_length."""
        vals = [p.accept_length for p in self.prompts if p.accept_length is not None]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def tau_pooled(self) -> float:
        """All completion tokens / all verify steps."""
        steps = sum(p.verify_steps for p in self.prompts)
        return sum(p.completion_tokens for p in self.prompts) / steps if steps else math.nan

    @property
    def tokens(self) -> int:
        return sum(p.completion_tokens for p in self.prompts)

    def to_dict(self) -> dict:
        d = asdict(self)
        for p, row in zip(self.prompts, d["prompts"]):
            row["accept_length"] = p.accept_length
        d.update(tau=self.tau, tau_pooled=self.tau_pooled, tokens=self.tokens)
        return d


def _short_name(example: ChatExample) -> str:
    return f"{Path(example.source).name}:{example.line}"


def _resolve_prompts(prompts: str | Path | list[ChatExample]) -> list[ChatExample]:
    return load_chat_jsonl(prompts) if isinstance(prompts, (str, Path)) else list(prompts)


# ---- (a) offline ---------------------------------------------------------------------------------------------

def evaluate_offline(target_dir: str | Path, draft_dir: str | Path, prompts: str | Path | list[ChatExample],
                     block_size: int, max_new_tokens: int, *, ignore_eos: bool = True, context_features: str = "pre",
                     device: str | None = None, dtype: torch.dtype | None = None, target: HFTarget | None = None,
                     progress: bool = True) -> TauReport:
    from tqdm import tqdm
    if block_size < 2:
        raise ValueError(f"block size must be >= 2 (bonus + at least one draft slot), got {block_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if context_features not in FEATURE_MODES:
        raise ValueError(f"context_features {context_features!r} not in {FEATURE_MODES}")
    t0 = time.monotonic()
    examples = _resolve_prompts(prompts)
    kind = kind_for_draft(draft_dir)
    target = target or HFTarget(target_dir, device=device, dtype=dtype)
    draft = kind.load_for_hf_target(target, draft_dir)
    report = TauReport(mode="offline", target=str(target_dir), draft=str(draft_dir), block_size=block_size,
                       max_new_tokens=max_new_tokens, context_features=context_features)
    for ex in tqdm(examples, desc="offline tau", unit="prompt", disable=not progress):
        text = target.render(ex.prompt_messages(), add_generation_prompt=True)
        report.prompts.append(kind.simulate_prompt(target, draft, text, load_media(ex), block_size=block_size,
                                                   max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                                                   context_features=context_features, name=_short_name(ex)))
    report.wall_s = time.monotonic() - t0
    return report


# ---- (b) served ----------------------------------------------------------------------------------------------

def served_prompt_tau(name: str, result: dict, block_size: int) -> PromptTau:
    """PromptTau from an SGLang /generate answer (output_ids + meta_info)."""
    meta = result["meta_info"]
    steps = int(meta.get("spec_verify_ct", 0))
    hist = list(meta.get("spec_correct_drafts_histogram") or [])
    hist = (hist + [0] * block_size)[:block_size] if len(hist) <= block_size else hist
    committed = sorted(a + 1 for a, n in enumerate(hist) for _ in range(n))
    if sum(hist) != steps:
        raise ValueError(f"{name}: SGLang reported {steps} verify steps but its accept histogram {hist} counts "
                         f"{sum(hist)}")
    completion = int(meta["completion_tokens"])
    if steps and not math.isclose(meta["spec_accept_length"], completion / steps, rel_tol=1e-9):
        raise ValueError(f"{name}: spec_accept_length {meta['spec_accept_length']} != completion_tokens / "
                         f"spec_verify_ct = {completion}/{steps}; SGLang's definition changed")
    return PromptTau(name=name, completion_tokens=completion, verify_steps=steps, accept_histogram=hist,
                     committed_per_step=committed, output_ids=list(result["output_ids"]),
                     prompt_tokens=int(meta.get("prompt_tokens", 0)))


def evaluate_served(target_dir: str | Path, draft_dir: str | Path, prompts: str | Path | list[ChatExample],
                    block_size: int, max_new_tokens: int, *, ignore_eos: bool = True, url: str | None = None,
                    log_dir: str | Path | None = None, cpu: bool = True, extra_args: list[str] | None = None,
                    progress: bool = True) -> TauReport:
    """Real SGLang: start one (CPU platform by default) with the draft's algorithm and block size B, or use `url`
    (a server the caller started with the same target, draft and --speculative-num-draft-tokens B)."""
    import tempfile

    from tqdm import tqdm

    from sglang_ext.launcher import SGLangClient, draft_args, image_to_data_url, launch_server
    t0 = time.monotonic()
    examples = _resolve_prompts(prompts)
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(target_dir)
    requests = [(_short_name(ex), processor.apply_chat_template(ex.prompt_messages(), tokenize=False,
                                                         add_generation_prompt=True), load_images(ex),
                 [str(v.path) for v in ex.videos])
                for ex in examples]
    report = TauReport(mode="served", target=str(target_dir), draft=str(draft_dir), block_size=block_size,
                       max_new_tokens=max_new_tokens)

    def run(server) -> None:
        for name, text, images, videos in tqdm(requests, desc="served tau", unit="prompt", disable=not progress):
            body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                                      "ignore_eos": ignore_eos}}
            if images:
                body["image_data"] = [image_to_data_url(im) for im in images]
            if videos:                       # sampled with the server's video config (give parts the same options)
                body["video_data"] = videos
            report.prompts.append(served_prompt_tau(name, server.post("/generate", body), block_size))

    if url is not None:
        run(SGLangClient(url))
    else:
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="sglang-eval-"))
        args = draft_args(Path(draft_dir), block_size) + list(extra_args or [])
        with launch_server(Path(target_dir), args, log_dir=log_dir, cpu=cpu, name="evaluate") as server:
            run(server)
    report.wall_s = time.monotonic() - t0
    return report


# ---- CLI -----------------------------------------------------------------------------------------------------

def format_table(reports: list[TauReport]) -> str:
    """Per prompt: accept length (and verify steps) of each report; then the mean and pooled tau."""
    names = [p.name for p in reports[0].prompts]
    head = f"{'prompt':<40}" + "".join(f"{r.mode + ' tau':>14}{'steps':>7}{'tokens':>8}" for r in reports)
    lines = [head, "-" * len(head)]

    def fmt(x):
        return f"{x:14.3f}" if x is not None else f"{'-':>14}"
    for i, name in enumerate(names):
        row = f"{name[-40:]:<40}"
        for r in reports:
            p = r.prompts[i]
            row += fmt(p.accept_length) + f"{p.verify_steps:7d}{p.completion_tokens:8d}"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'mean':<40}" + "".join(f"{r.tau:14.3f}{'':7}{r.tokens:8d}" for r in reports))
    lines.append(f"{'pooled (tokens / steps)':<40}" + "".join(f"{r.tau_pooled:14.3f}{'':15}" for r in reports))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate",
                                description="Acceptance length (tau) of a speculative draft (DFlash) against its "
                                            "target: offline simulation of SGLang's verify rule for the draft's "
                                            "kind and/or a real SGLang server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target-model-path", required=True, metavar="PATH")
    p.add_argument("--draft-model-path", required=True, metavar="PATH")
    p.add_argument("--prompts", required=True, metavar="FILE", help='chat JSONL: {"messages": [...]} per line')
    p.add_argument("--block-size", type=int, required=True,
                   help="tokens per verify step B (= --speculative-num-draft-tokens; DFlash: the block size)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--offline", action="store_true", help="simulate with HF transformers (default when neither given)")
    p.add_argument("--served", action="store_true", help="measure on a real SGLang server")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: ignore_eos, fixed lengths)")
    p.add_argument("--context-features", choices=FEATURE_MODES, default="pre",
                   help="offline draft context: pre-deepstack (as captured for training) or post (stock SGLang)")
    p.add_argument("--device", default=None, help="offline torch device (default: cuda if available)")
    p.add_argument("--url", default=None, help="served: use this running server instead of starting one")
    p.add_argument("--gpu", action="store_true", help="served: start SGLang on the GPU instead of the CPU platform")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="served: extra launch_server argument (repeatable, e.g. --server-arg=--dtype=bfloat16)")
    p.add_argument("--output", default="tau_report.json", metavar="FILE", help="JSON report")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_offline = args.offline or not args.served
    reports = []
    try:
        examples = load_chat_jsonl(args.prompts)
        common = dict(block_size=args.block_size, max_new_tokens=args.max_new_tokens, ignore_eos=not args.stop_at_eos,
                      progress=not args.no_progress)
        if run_offline:
            reports.append(evaluate_offline(args.target_model_path, args.draft_model_path, examples,
                                            context_features=args.context_features, device=args.device, **common))
        if args.served:
            reports.append(evaluate_served(args.target_model_path, args.draft_model_path, examples, url=args.url,
                                           cpu=not args.gpu, extra_args=args.server_arg, **common))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(reports))
    Path(args.output).write_text(json.dumps({r.mode: r.to_dict() for r in reports}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
