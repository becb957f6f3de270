r"""The reference workload: a tiny Qwen3-VL target trained on CPU in minutes, plus prompt sets per domain.

    build_workload(cache_dir=None, *, minutes=8.0, seed=0, quick=False, force=False, threads=1) -> Workload

Three domains of chat traffic, all in the tiny models' chat format (tiny_models.CHAT_TEMPLATE):

    A      Python code from the standard library (functions and classes, normalised by ast.unparse:
           no comments or docstrings, one formatting style, so fewer bits per token to learn).
           user "Continue the code:\n<first 2-6 lines of a definition>"
           assistant "```python\n<the following lines>\n```" (the closing fence and <|im_end|> only where
           the definition ends within the length limit). The fence gives every code answer the same first
           token, which the short training ties to the instruction (without it, code answers began with
           the most common first word of the other domains, "The").
    B      English prose from pydoc_data/topics.py (the language reference `help()` shows), headings,
           grammar and code blocks dropped. user "<a sentence>"  assistant: the rest of the paragraph and
           the following ones.
    image  Synthetic 128x128 pictures (16 image tokens): one to three shapes (circle / square / triangle)
           of one colour, or a large seven-segment digit. user <image> "Describe the image."
           assistant "Two red circles." / "A blue square." / "The digit 7, in green."
           Colour, count, shape and digit are only in the pixels, so image tokens change the answer.

Splits are by source: stdlib files (A, by hash), pydoc topics (B, whole topics in hash order until 15%
of the prose) and image seeds (eval seeds >= 1e9) - held-out prompts come from files / topics / images
the target never saw. Training samples are drawn afresh each step from the train sources.

Target. `Qwen3VLForConditionalGeneration` with tiny_models' dense config (6 layers, hidden 256, the small
vision tower) and byte-level BPE tokenizer, trained from scratch within a wall-clock budget (`minutes`,
which includes the two warm starts below):

  1. bigram warm start (~8 s): token-pair counts of ~2000 training samples are fitted by a factorised
     bigram model, rmsnorm(E[token]) @ W.T, copied into embed_tokens (unit-RMS rows) / lm_head. The untrained
     network then already predicts like a bigram model (loss ~3.0 instead of ln 544 = 6.3). In a 2-minute
     code-only run this gave held-out loss 2.90 against 3.48 from plain random init.
  2. vision warm start (10% of the budget): the vision tower alone is trained so that every image token
     linearly predicts the picture's colour / kind / count / digit (probe heads thrown away), then its
     mergers are rescaled to unit-RMS outputs. Without it the answers ignored the image for the whole
     budget (they followed the caption prior), although with oracle features the decoder learnt colours
     in ~40 steps: the random tower was the bottleneck.
  3. chat training for the rest: fp32, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, grad clip 1,
     lr 4e-3, 10 warmup steps, then cosine to 10% over the elapsed fraction of the remaining time, so the
     schedule completes whatever speed the shared CPU has). Each step draws a domain (A 65%, B 15%,
     image 20%); text batches are 8 samples of at most 256 tokens, right-padded (causal attention never
     looks right, so no attention mask is needed); image batches hold 32 pictures. Next-token loss on
     every text token (user and assistant turns; not image placeholders or padding).

Threads: one torch thread by default. On the 2 shared cores of the dev machine, torch.set_num_threads(2)
ran a training step 3-8x slower than one thread whenever another job was busy (OpenMP threads spin at
barriers while their partner core is taken): one thread gave 1000-2400 tokens/s for 8x256-token batches
(depending on the load), two threads 300-1100 (about as fast as one with OMP_WAIT_POLICY=PASSIVE set
before torch is imported). The result depends on the CPU time the budget buys: under load (~1/2 core)
an 8-minute build does ~360 steps / ~550k tokens.

Cache. Everything lives in <cache>/workload-<hash>/, hash = sha256 of this file's source, the tiny
models' recipe, the config and the library versions. It is built into a temporary sibling and renamed
into place (a DONE marker written last), so a reader never sees half a workload and two concurrent
builders do not clash. Layout:

    workload.json                 config, hash, versions, training stats (also in Workload.stats)
    target/                       HF + SGLang loadable checkpoint, tokenizer, processor, generation_config
    tokenizer/                    the tokenizer alone (tiny_models.build_tokenizer_dir)
    prompts/{A,B,image}/{train,eval}.jsonl
    images/{train,eval}/*.png     the pictures the image prompts point to (absolute paths in the JSONL)
    DONE

Prompt record (one JSON object per line):

    {"id": "A-eval-0003", "domain": "A", "split": "eval", "source": "<file:line / topic / image-seed-N>",
     "messages": [{"role": "user", "content": "Continue the code:\n..."}],      # text: a plain string
     "reference": "<the true continuation / caption>"}
    image: "content": [{"type": "image", "image": "/abs/path.png"}, {"type": "text", "text": "Describe ..."}]

`record_prompt(record)` turns a record into (prompt text, image paths) for SGLang's /generate;
`load_target` + `hf_greedy` run it through HF transformers.
"""
from __future__ import annotations

from sglang_ext.demo.workload.build import (Workload, WorkloadConfig, build_workload, distinct_fraction, hf_greedy,
                                            load_target, workload_hash)
from sglang_ext.demo.workload.images import ImageSpec, render_image
from sglang_ext.demo.workload.sources import DOMAINS, SPLITS, read_jsonl, record_prompt

__all__ = ["DOMAINS", "SPLITS", "ImageSpec", "Workload", "WorkloadConfig", "build_workload", "distinct_fraction",
           "hf_greedy", "load_target", "read_jsonl", "record_prompt", "render_image", "workload_hash"]
