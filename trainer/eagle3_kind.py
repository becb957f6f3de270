"""EAGLE3 as a draft kind: `trainer.eagle3_draft` (model, draft vocabulary), `trainer.eagle3_objective` (the
training-time-test loss), and where SGLang serves it.

Not there yet (issue "EAGLE3 end to end"): the offline evaluator's EAGLE3 verify rule, serving on the CPU
platform, and live capture for --online-train (`ServingFacts.feed_method` is None, so --online-train refuses
an EAGLE3 draft at startup).
"""
from __future__ import annotations

import os

import torch

from trainer.draft_kind import DraftKind, ObjectiveOutput, ServingFacts, register_kind
from trainer.eagle3_draft import Eagle3Config, Eagle3Draft, draft_vocab_from_counts
from trainer.eagle3_objective import eagle3_loss
from trainer.target import load_target_final_norm


class Eagle3Kind(DraftKind):
    name = "eagle3"
    architectures = ("LlamaForCausalLMEagle3",)
    serving = ServingFacts(
        algorithm="EAGLE3",
        worker_class="sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2",
        feed_method=None,
        # SGLang's LlamaForCausalLMEagle3.load_weights stacks q/k/v and gate/up
        stacked_params=(("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
                        ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj")),
    )
    objective_knobs = ("ttt_steps", "step_decay", "chunk_rows")

    # -- config and model --
    def load_config(self, source: str | os.PathLike | dict) -> Eagle3Config:
        if isinstance(source, dict):
            return Eagle3Config.from_dict(source)
        return Eagle3Config.from_json(source)

    def config_for_target(self, target_config: dict, *, num_layers: int, block_size: int,
                          feature_layers: list[int] | None = None, **dims) -> Eagle3Config:
        if num_layers != 1:
            raise ValueError(f"an EAGLE3 draft has one decoder layer, got num_layers={num_layers}")
        return Eagle3Config.for_target(target_config, block_size=block_size, aux_layer_ids=feature_layers, **dims)

    def from_scratch(self, cfg: Eagle3Config, seed: int | None = None) -> Eagle3Draft:
        return Eagle3Draft.from_scratch(cfg, seed=seed)

    def from_pretrained(self, path: str | os.PathLike, cfg: Eagle3Config | None = None) -> Eagle3Draft:
        return Eagle3Draft.from_pretrained(path, cfg)

    def feature_layers(self, cfg: Eagle3Config) -> list[int]:
        return cfg.feature_layer_ids

    def check_head(self, cfg: Eagle3Config, embed_rows: int, where: str) -> None:
        if cfg.vocab_size != embed_rows:
            raise ValueError(f"draft vocab_size {cfg.vocab_size} != the target's {embed_rows} embedding rows "
                             f"({where}): t2d covers the target vocabulary")

    def attach_target(self, model: Eagle3Draft, embed_tokens, lm_head, target_path) -> None:
        norm, eps = load_target_final_norm(target_path, dtype=embed_tokens.dtype)
        model.attach_target(embed_tokens, lm_head, norm.to(embed_tokens.device), eps)

    def init_from_replay(self, model: Eagle3Draft, reader) -> None:
        """A from-scratch draft with a reduced vocabulary takes the most frequent trained-on target tokens."""
        cfg = model.cfg
        if cfg.draft_vocab_size >= cfg.vocab_size:
            return
        counts = torch.zeros(cfg.vocab_size, dtype=torch.long)
        for i in range(len(reader)):
            rec = reader.read(i)
            counts += torch.bincount(rec.input_ids[rec.loss_mask.bool()], minlength=cfg.vocab_size)[:cfg.vocab_size]
        model.set_draft_vocab(draft_vocab_from_counts(counts, cfg.draft_vocab_size).to(model.d2t.device))

    # -- training --
    def loss(self, model: Eagle3Draft, batch, *, generator: torch.Generator | None = None, backend: str = "auto",
             ttt_steps: int = 7, step_decay: float = 0.8, chunk_rows: int = 1024) -> ObjectiveOutput:
        return eagle3_loss(model, batch.target_hidden, batch.input_ids, batch.loss_mask, ttt_steps=ttt_steps,
                           step_decay=step_decay, backend=backend, chunk_rows=chunk_rows)

    # -- offline evaluation: not yet --
    def load_for_hf_target(self, target, path):
        raise NotImplementedError("offline tau for EAGLE3 drafts (SGLang's EAGLE3 verify rule) is not implemented "
                                  "yet; use --served")

    def simulate_prompt(self, target, draft, text, images, **kwargs):
        raise NotImplementedError("offline tau for EAGLE3 drafts (SGLang's EAGLE3 verify rule) is not implemented "
                                  "yet; use --served")


EAGLE3 = register_kind(Eagle3Kind())
