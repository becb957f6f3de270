"""A static demo: real SGLang serving a tiny Qwen3-VL with a hand-built DFlash draft (no training).

    python -m sglang_ext.demo.static [--variant dense|moe] [--max-new-tokens N] [--gpu]

Builds (once, cached) the tiny offline Qwen3-VL target and its hand-built DFlash draft, launches
`python -m sglang.launch_server ... --speculative-algorithm DFLASH` (on the torch_cpu platform unless
--gpu), sends text and image requests, and prints each answer with its accept length. It then asks a
non-speculative server the same questions and checks that greedy DFLASH produced the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_ext.demo.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["dense", "moe"], default="dense",
                    help="tiny Qwen3-VL target: dense (Qwen3VLForConditionalGeneration) or MoE")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per request (greedy)")
    ap.add_argument("--gpu", action="store_true", help="serve on the default (CUDA) platform instead of torch_cpu")
    ap.add_argument("--skip-check", action="store_true",
                    help="do not start the second, non-speculative server to check outputs")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where tiny models are built (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)")
    args = ap.parse_args(argv)

    from sglang_ext.demo.prompts import mixed_requests
    from sglang_ext.demo.tiny_models import tiny_models
    from sglang_ext.launcher import draft_args, launch_server

    print("building tiny models (cached after the first run) ...", flush=True)
    models = tiny_models(args.cache_dir)
    target = models.dense if args.variant == "dense" else models.moe
    draft = models.draft_dense if args.variant == "dense" else models.draft_moe
    requests = mixed_requests(n_text=4, n_image=2)
    log_dir = Path(tempfile.mkdtemp(prefix="sglang-ext-demo-"))
    extra = [] if not args.gpu else ["--dtype", "float32"]

    print(f"launching SGLang + DFLASH: target {target}\n                           draft  {draft}", flush=True)
    t0 = time.monotonic()
    with launch_server(target, draft_args(draft) + extra, log_dir=log_dir, cpu=not args.gpu,
                       name="demo-dflash") as server:
        print(f"server ready in {time.monotonic() - t0:.0f}s at {server.url}\n", flush=True)
        results = []
        print(f"{'#':>2}  {'kind':5}  {'accept len':>10}  {'verify steps':>12}  answer")
        for i, (text, images) in enumerate(requests):
            r = server.generate(text, images, max_new_tokens=args.max_new_tokens)
            results.append(r)
            m = r["meta_info"]
            answer = r["text"].replace("\n", "\\n")[:48]
            print(f"{i:>2}  {'image' if images else 'text':5}  {m.get('spec_accept_length', 0):>10.2f}  "
                  f"{m.get('spec_verify_ct', 0):>12}  {answer!r}", flush=True)
    mean_accept = sum(r["meta_info"].get("spec_accept_length", 0) for r in results) / len(results)
    print(f"\nmean accept length: {mean_accept:.2f} tokens per verify step (1.0 = no draft token accepted)")

    if args.skip_check:
        return 0
    print("checking against non-speculative greedy serving ...", flush=True)
    with launch_server(target, extra, log_dir=log_dir, cpu=not args.gpu, name="demo-plain") as plain:
        same = [plain.generate(t, im, max_new_tokens=args.max_new_tokens)["output_ids"] == r["output_ids"]
                for (t, im), r in zip(requests, results)]
    print(f"identical tokens with and without DFLASH: {sum(same)}/{len(same)} requests")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
