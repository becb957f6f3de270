"""EAGLE3 as a draft kind: `trainer.eagle3_draft` (model, draft vocabulary), `trainer.eagle3_objective` (the
training-time-test loss), SGLang's EAGLE3 chain verify rule (offline evaluator) and where SGLang serves it.

Live capture (--online-train) records what SGLang's EAGLE worker feeds the draft: the aux layers only. The
target's last layer is not among them, so live records train on the served tokens (hard labels: under greedy
serving, the target's argmax) instead of the target's distribution; offline captures carry the last layer too
(trainer/eagle3_objective.py takes either).

Not there yet: the offline evaluator for trees (topk > 1).
"""
from __future__ import annotations

import os

import torch

from trainer.draft_kind import STACKED_QKV_GATE_UP, DraftKind, ObjectiveOutput, ServingFacts, register_kind
from trainer.eagle3_draft import Eagle3Config, Eagle3Draft, draft_vocab_from_counts
from trainer.eagle3_objective import eagle3_loss
from trainer.target import load_target_final_norm


class Eagle3Kind(DraftKind):
    name = "eagle3"
    architectures = ("LlamaForCausalLMEagle3",)
    serving = ServingFacts(
        algorithm="EAGLE3",
        worker_class="sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2",
        # the draft extend after a prefill (extend rows) and after each verify (the accepted path's rows)
        capture=("sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._draft_extend_for_prefill",
                 "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._draft_extend_for_decode"),
        # SGLang's LlamaForCausalLMEagle3.load_weights stacks q/k/v and gate/up and reads midlayer as layers.0
        stacked_params=STACKED_QKV_GATE_UP,
        renamed_params=(("midlayer.", "layers.0."),),
        draft_module="draft_worker.draft_runner.model",
        # load_weights turns d2t into the draft's hot_token_id, which the worker copies at startup: the draft
        # vocabulary of a live draft stays as loaded
        fixed_weights=("d2t", "t2d"),
    )
    objective_knobs = ("ttt_steps", "step_decay", "chunk_rows")
    config_class = Eagle3Config
    model_class = Eagle3Draft

    # -- config and model --
    def config_for_target(self, target_config: dict, *, num_layers: int, block_size: int,
                          feature_layers: list[int] | None = None, **dims) -> Eagle3Config:
        if num_layers != 1:
            raise ValueError(f"an EAGLE3 draft has one decoder layer, got num_layers={num_layers}")
        return Eagle3Config.for_target(target_config, block_size=block_size, aux_layer_ids=feature_layers, **dims)

    def feature_layers(self, cfg: Eagle3Config) -> list[int]:
        return cfg.feature_layer_ids

    def live_feature_layers(self, cfg: Eagle3Config) -> list[int]:
        return list(cfg.aux_layer_ids)

    def served_block_size(self, worker) -> int:
        return int(worker.speculative_num_steps) + 1

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

    # -- serving --
    def server_args(self, draft_path, block_size: int | None = None) -> list[str]:
        """A chain: topk 1, B - 1 draft steps, B tokens per verify."""
        args = ["--speculative-algorithm", self.serving.algorithm, "--speculative-draft-model-path", str(draft_path)]
        if block_size is not None:
            args += ["--speculative-num-steps", str(block_size - 1), "--speculative-eagle-topk", "1",
                     "--speculative-num-draft-tokens", str(block_size)]
        return args

    # -- offline evaluation: SGLang's EAGLE worker (eagle_worker_v2.py), chain (topk 1), greedy --
    def load_for_hf_target(self, target, path: str | os.PathLike) -> Eagle3Draft:
        draft = Eagle3Draft.from_pretrained(path).to(target.device, target.dtype).eval()
        if draft.cfg.hidden_size != target.hidden_size or draft.cfg.num_target_layers != target.num_layers:
            raise ValueError(f"draft {path} expects a target with {draft.cfg.num_target_layers} layers and hidden "
                             f"size {draft.cfg.hidden_size}; {target.path} has {target.num_layers} and "
                             f"{target.hidden_size}")
        embed = target.model.get_input_embeddings().weight.detach()
        draft.attach_target(embed, target.model.get_output_embeddings().weight.detach())
        return draft

    def simulate_prompt(self, target, draft: Eagle3Draft, text: str, images: list, *, block_size: int, **kwargs):
        """SGLang's EAGLE3 chain (speculative_num_steps = B-1, topk 1, B draft tokens), greedy:
          extend      the draft runs the committed positions 0..p-1 with the target's aux features and the NEXT
                      tokens (ids rotated left, the bonus last); its proposal at p-1 is d_1
                      (`_draft_extend_for_prefill` / `_draft_extend_for_decode`);
          decode      steps s = 1..B-2: token d_s at position p-1+s, hidden = the previous step's aux, attending
                      to the extend's keys and its own earlier steps' (`draft_forward`): d_{s+1};
        then the common verify (trainer.verify_sim.simulate_chain)."""
        from trainer.verify_sim import simulate_chain

        def propose(context, committed, bonus):
            p = len(committed)
            rotated = torch.tensor(committed[1:] + [bonus], device=target.device)
            aux, normed, keys, values = draft.extend(context.to(target.dtype), rotated)
            proposals, h = [draft.propose(normed[-1])], aux[-1]
            for s in range(1, block_size - 1):
                h, normed_s, keys, values = draft.decode(h, proposals[-1], p - 1 + s, keys, values)
                proposals.append(draft.propose(normed_s))
            return proposals

        return simulate_chain(target, list(draft.cfg.aux_layer_ids), text, images, propose, block_size=block_size,
                              **kwargs)


EAGLE3 = register_kind(Eagle3Kind())
