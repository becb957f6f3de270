"""EAGLE3 as a draft kind: `trainer.eagle3_draft` (model, draft vocabulary), `trainer.eagle3_objective` (the
training-time-test loss), SGLang's EAGLE3 chain verify rule (offline evaluator) and where SGLang serves it.

Not there yet: the offline evaluator for trees (topk > 1) and live capture for --online-train
(`ServingFacts.feed_method` is None, so --online-train refuses an EAGLE3 draft at startup).
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

    @torch.no_grad()
    def simulate_prompt(self, target, draft: Eagle3Draft, text: str, images: list, *, block_size: int,
                        max_new_tokens: int, ignore_eos: bool = True, context_features: str = "pre",
                        name: str = ""):
        """One request through SGLang's EAGLE3 chain (speculative_num_steps = B-1, topk 1, B draft tokens):
          prefill     the target runs the prompt (0..p-1); its greedy token is the bonus x_p;
          extend      the draft runs positions 0..p-1 with the aux features of the target and the NEXT tokens
                      (ids rotated left, the bonus last); its proposal at p-1 is d_1
                      (`_draft_extend_for_prefill` / `_draft_extend_for_decode`);
          decode      steps s = 1..B-2: token d_s at position p-1+s, hidden = the previous step's aux, attending
                      to the extend's keys and its own earlier steps' (`draft_forward`): d_{s+1};
          verify      the target runs [bonus, d_1..d_{B-1}] at positions p..p+B-1; accept the leading d_i equal
                      to the target's greedy prediction at i-1, commit accept + 1 tokens (the new bonus last);
          the aux features of the committed verify rows join the extend context, and the loop goes on.
        The finish rule and tau are the DFlash evaluator's (trainer/evaluate.py)."""
        from trainer.evaluate import PromptTau, accept_histogram, finished_len

        K = len(draft.cfg.aux_layer_ids)
        layers = list(draft.cfg.aux_layer_ids)
        prompt = target.encode(text, images)
        cache = target.new_cache()
        out = target.forward(prompt.input_ids, prompt.positions, layers, cache=cache, vision=prompt.vision,
                             mode=context_features)
        ids = prompt.input_ids.tolist()
        aux_feats = out.features[:, :K * draft.cfg.target_width]                 # [p, K*Ht]
        bonus = int(out.logits[-1].argmax())
        output = [bonus]
        done = finished_len(output, 1, max_new_tokens, ignore_eos, target.eos_token_ids)
        accepts = []
        while done is None:
            p = len(prompt) + len(output) - 1                                    # committed length
            committed = ids + output[:-1]                                        # tokens 0..p-1
            rotated = torch.tensor(committed[1:] + [bonus], device=target.device)
            extend_aux, normed, keys, values = draft.extend(aux_feats.to(target.dtype), rotated)
            proposals = [draft.propose(normed[-1])]
            h = extend_aux[-1]
            for s in range(1, block_size - 1):
                h, nrm, keys, values = draft.decode(h, proposals[-1], p - 1 + s, keys, values)
                proposals.append(draft.propose(nrm))
            candidates = torch.tensor([bonus] + proposals, device=target.device)
            verify = target.forward(candidates, target.continuation_positions(prompt, p, block_size), layers,
                                    cache=cache, mode=context_features)
            target_predict = verify.logits.argmax(-1)
            matches = (candidates[1:] == target_predict[:-1]).int()
            accept = int(matches.cumprod(0).sum())
            commit = accept + 1
            bonus = int(target_predict[accept])
            output += candidates[1:accept + 1].tolist() + [bonus]
            accepts.append(accept)
            aux_feats = torch.cat([aux_feats, verify.features[:commit, :K * draft.cfg.target_width]])
            target.crop_cache(cache, p + commit)
            done = finished_len(output, commit, max_new_tokens, ignore_eos, target.eos_token_ids)
        return PromptTau(name=name, completion_tokens=done, verify_steps=len(accepts),
                         accept_histogram=accept_histogram(accepts, block_size),
                         committed_per_step=[a + 1 for a in accepts], output_ids=output[:done],
                         prompt_tokens=len(prompt))


EAGLE3 = register_kind(Eagle3Kind())
