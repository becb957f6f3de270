"""Build (or load from the cache) the reference workload and report how good its tiny target is.

    python benchmarks/build_workload.py [--minutes 8] [--cache-dir DIR] [--force] [--quick] [--out FILE]

Prints the training summary (loss at start/end per domain, held-out loss, tokens/s, build time), then for
a few held-out prompts per domain the target's greedy continuation (HF transformers), with a degeneracy
check (fraction of distinct tokens in the first 48 greedy tokens; a single repeated token gives 1/48),
and, for images, whether the answers differ between images. Writes everything as JSON (--out, default
<workload>/summary.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sglang_ext.demo.workload import (DOMAINS, build_workload, distinct_fraction, hf_greedy, load_target,
                                         record_prompt)

N_TOKENS = 48


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _short(text: str, width: int = 400) -> str:
    return text if len(text) <= width else text[:width] + " [...]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext")
    ap.add_argument("--force", action="store_true", help="rebuild even if a finished build is cached")
    ap.add_argument("--quick", action="store_true", help="the small test-sized workload")
    ap.add_argument("--per-domain", type=int, default=4, help="held-out prompts shown per domain")
    ap.add_argument("--out", type=Path, default=None, help="JSON summary path (default <workload>/summary.json)")
    args = ap.parse_args(argv)

    start = time.monotonic()
    workload = build_workload(args.cache_dir, minutes=args.minutes, seed=args.seed, quick=args.quick,
                              force=args.force)
    wall = time.monotonic() - start
    stats = workload.stats
    print(f"\nworkload {workload.hash} at {workload.root}  ({'built' if wall > 30 else 'cached'}, {wall:.0f}s)")
    print(f"steps {stats['steps']}  train {stats['train_seconds']}s  data {stats['data_seconds']}s  "
          f"build {stats['build_seconds']}s  tokens {stats['tokens']}  tokens/s {stats['tokens_per_second']}")
    print(f"\n{'domain':8} {'steps':>6} {'loss start':>11} {'loss end':>9} {'held-out':>9}")
    for d in DOMAINS:
        print(f"{d:8} {stats['steps_per_domain'][d]:6d} {_fmt(stats['loss_start'][d]):>11} "
              f"{_fmt(stats['loss_end'][d]):>9} {_fmt(stats['heldout_loss'][d]):>9}")

    model, processor = load_target(workload.target_dir)
    tokenizer = processor.tokenizer
    samples: dict[str, list] = {}
    for domain in DOMAINS:
        records = workload.prompts(domain, "eval")
        n_show = len(records) if domain == "image" else args.per_domain    # every eval image: do answers differ?
        print(f"\n===== domain {domain}: held-out prompts =====")
        samples[domain] = []
        for record in records[:n_show]:
            ids = hf_greedy(model, processor, record, max_new_tokens=N_TOKENS)
            answer_ids = hf_greedy(model, processor, record, max_new_tokens=N_TOKENS, stop_at_eos=True)
            text, images = record_prompt(record)
            entry = {"id": record["id"], "source": record["source"], "prompt": text, "images": images,
                     "reference": record["reference"], "greedy": tokenizer.decode(answer_ids),
                     "greedy_48_ignore_eos": tokenizer.decode(ids), "distinct_fraction_48": distinct_fraction(ids)}
            samples[domain].append(entry)
            if domain == "image":
                print(f"{record['id']}  reference: {record['reference']!r:32}  greedy: {entry['greedy']!r}")
            elif len(samples[domain]) <= args.per_domain:
                user = record["messages"][0]["content"]
                print(f"--- {record['id']} ({record['source']})  distinct {entry['distinct_fraction_48']:.2f}")
                print(f"[user]\n{_short(user)}\n[target greedy]\n{_short(entry['greedy'])}\n[reference]\n"
                      f"{_short(record['reference'], 200)}")

    degeneracy = {d: round(sum(e["distinct_fraction_48"] for e in samples[d]) / len(samples[d]), 3)
                  for d in DOMAINS}
    image_answers = [e["greedy"] for e in samples["image"]]
    image_exact = sum(e["greedy"].split("<|im_end|>")[0].strip() == e["reference"].strip() for e in samples["image"])
    print(f"\nmean distinct-token fraction in {N_TOKENS}-token greedy outputs: {degeneracy}")
    print(f"image answers: {len(set(image_answers))} distinct over {len(image_answers)} images; "
          f"{image_exact} exactly right")

    summary = {"hash": workload.hash, "root": str(workload.root), "config": workload.config,
               "stats": {k: v for k, v in stats.items() if k != "loss_history"},
               "distinct_fraction_48": degeneracy, "image_distinct_answers": len(set(image_answers)),
               "image_exact": image_exact, "n_image": len(image_answers), "samples": samples}
    out = args.out or workload.root / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"summary written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
