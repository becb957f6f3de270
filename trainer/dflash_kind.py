"""DFlash (block diffusion) as a draft kind: `trainer.dflash_draft` (model), `trainer.objective` (loss),
SGLang 0.5.23's DFLASH verify rule (offline evaluator) and where SGLang serves it (online path)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.dflash_draft import DFlashDraft, DraftConfig
from trainer.draft_kind import STACKED_QKV_GATE_UP, DraftKind, ObjectiveOutput, ServingFacts, register_kind
from trainer.objective import dflash_loss


class DFlashKind(DraftKind):
    name = "dflash"
    architectures = ("DFlashDraftModel",)
    serving = ServingFacts(
        algorithm="DFLASH",
        worker_class="sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2",
        # prefill rows (extend lens) and the committed rows of each verify step (commit lens)
        capture=("sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc",),
        # SGLang's DFlashDraftModel stacks q/k/v and gate/up when it loads weights
        stacked_params=STACKED_QKV_GATE_UP,
    )
    objective_knobs = ("num_anchors", "gamma", "chunk_rows", "anchors")
    config_class = DraftConfig
    model_class = DFlashDraft

    # -- config and model --
    def config_for_target(self, target_config: dict, *, num_layers: int, block_size: int,
                          feature_layers: list[int] | None = None, **dims) -> DraftConfig:
        if "mask_token_id" not in dims:
            raise ValueError("a DFlash draft needs mask_token_id: a vocabulary id the target never produces")
        return DraftConfig.for_target(target_config, num_layers=num_layers, block_size=block_size,
                                      target_layer_ids=feature_layers, **dims)

    def feature_layers(self, cfg: DraftConfig) -> list[int]:
        return list(cfg.target_layer_ids)

    def check_head(self, cfg: DraftConfig, embed_rows: int, where: str) -> None:
        if cfg.mask_token_id >= embed_rows:
            raise ValueError(f"draft mask_token_id {cfg.mask_token_id} is outside the target vocabulary "
                             f"({embed_rows} embedding rows in {where})")

    # -- training --
    def loss(self, model: DFlashDraft, batch, *, generator: torch.Generator | None = None, backend: str = "auto",
             num_anchors: int = 512, gamma: float = 7.0, chunk_rows: int = 2048,
             anchors: torch.Tensor | None = None) -> ObjectiveOutput:
        return dflash_loss(model, batch.target_hidden, batch.input_ids, batch.loss_mask, num_anchors=num_anchors,
                           gamma=gamma, anchors=anchors, generator=generator, backend=backend, chunk_rows=chunk_rows)

    # -- offline evaluation --
    def load_for_hf_target(self, target, path: str | os.PathLike) -> DFlashDraft:
        """The draft with the target's embedding and lm_head, as SGLang's worker uses them; a mask_embedding.pt
        next to the draft replaces the mask row (`_maybe_merge_trained_mask_embedding`)."""
        path = Path(path)
        draft = DFlashDraft.from_pretrained(path).to(target.device, target.dtype).eval()
        if draft.cfg.num_target_layers != target.num_layers or draft.cfg.hidden_size != target.hidden_size:
            raise ValueError(f"draft {path} expects a target with {draft.cfg.num_target_layers} layers and hidden "
                             f"size {draft.cfg.hidden_size}; {target.path} has {target.num_layers} and "
                             f"{target.hidden_size}")
        embed = target.model.get_input_embeddings().weight.detach()
        mask_file = path / "mask_embedding.pt"
        if mask_file.is_file():
            saved = torch.load(mask_file, map_location="cpu", weights_only=True)
            if int(saved["mask_token_id"]) != draft.cfg.mask_token_id:
                raise ValueError(f"{mask_file}: mask_token_id {saved['mask_token_id']} != draft config's "
                                 f"{draft.cfg.mask_token_id}")
            embed = embed.clone()
            embed[draft.cfg.mask_token_id] = saved["embedding"].to(embed)
        draft.attach_target(embed, target.model.get_output_embeddings().weight.detach())
        return draft

    def simulate_prompt(self, target, draft: DFlashDraft, text: str, images: list, *, block_size: int, **kwargs):
        """SGLang's DFLASH greedy loop (`DFlashWorkerV2.forward_batch_generation`): the block [bonus, MASK x (B-1)]
        at positions p..p+B-1, seeing the context of positions < p, proposes argmax(lm_head) of slots 1..B-1."""
        from trainer.verify_sim import simulate_chain

        def propose(context, committed, bonus):
            p = len(committed)
            block_ids = torch.full((1, block_size), draft.cfg.mask_token_id, dtype=torch.long, device=target.device)
            block_ids[0, 0] = bonus
            hidden = draft(context[None].to(target.dtype), block_ids, torch.tensor([[p]], device=target.device))
            return draft.logits(hidden[0, 1:]).argmax(-1).tolist()                      # [B-1]

        return simulate_chain(target, draft.cfg.target_layer_ids, text, images, propose, block_size=block_size,
                              **kwargs)

    # -- serving --
    def after_swap(self, worker) -> None:
        if getattr(worker, "_use_fused_kv_materialize", False):
            worker._init_fused_kv_helper()        # it keeps stacked copies of the k/v projection weights


DFLASH = register_kind(DFlashKind())
