"""Hooks that are always on (GPU and CPU alike): fixes to SGLang itself that our features need."""
from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType


# srt/models/qwen3_vl.py `Qwen3VLForConditionalGeneration.set_dflash_layers_to_capture` calls
# `self.model.set_dflash_layers_to_capture`, which the dense inner `Qwen3LLMModel` lacks (AttributeError at
# startup with DFLASH, GPU too). The inner forward already honours `layers_to_capture`; set it directly.
def qwen3_vl_set_dflash_layers_to_capture(self, layer_ids):
    if not self.pp_group.is_last_rank:
        return
    if layer_ids is None:
        raise ValueError("DFLASH requires explicit layer_ids for aux hidden capture.")
    self.capture_aux_hidden_states = True
    shifted = [i + 1 for i in layer_ids]          # capture the residual entering layer i+1 = output of layer i
    if hasattr(self.model, "set_dflash_layers_to_capture"):
        self.model.set_dflash_layers_to_capture(shifted)
    else:
        self.model.layers_to_capture = shifted


# srt/model_executor/model_runner.py `ModelRunner._extend_forward_kwargs` casts `forward_batch.input_embeds`
# with a hard-coded `.bfloat16()`. The DFLASH draft block is fed that way, so serving in float32/float16 dies
# with a dtype mismatch at the draft's qkv_proj (and bf16 rounding would alter fp32 results anyway). Cast to
# the runner's own dtype instead; a no-op for bf16 models.
def extend_forward_kwargs_in_model_dtype(original, self, forward_batch, *args, **kwargs):
    out = original(self, forward_batch, *args, **kwargs)
    embeds = out.get("input_embeds")
    if forward_batch.input_embeds is None or embeds is None or embeds.dtype == self.dtype:
        return out
    embeds = forward_batch.input_embeds.to(self.dtype)
    if forward_batch.replace_embeds is not None and forward_batch.replace_positions is not None:
        embeds[forward_batch.replace_positions] = forward_batch.replace_embeds.to(self.dtype)
    out["input_embeds"] = embeds
    return out


def register_general_hooks() -> None:
    HookRegistry.register("sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration.set_dflash_layers_to_capture",
                          qwen3_vl_set_dflash_layers_to_capture, HookType.REPLACE)
    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner._extend_forward_kwargs",
                          extend_forward_kwargs_in_model_dtype, HookType.AROUND)
