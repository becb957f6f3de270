"""Hooks that are always on (GPU and CPU alike): fixes to SGLang itself that our features need, and the
target-feature convention a draft trained by us was trained on (`sglang_ext.target_features` in its
config.json, trainer.draft_kind), fed to it whether or not --online-train is on."""
from __future__ import annotations

import logging
import os
import sys

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger(__name__)
# the target features the served draft gets, decided once in the launcher (prepare_server_args, or
# Engine._launch_subprocesses for sglang.Engine) and read by every process it starts: "pre_deepstack" (our hook
# below) or "post_deepstack" (SGLang's own)
TARGET_FEATURES_ENV_VAR = "SGLANG_EXT_DRAFT_TARGET_FEATURES"


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


# ---- the draft's target-feature convention ------------------------------------------------------------------

# srt/models/qwen3_vl.py `Qwen3LLMModel.forward` (and qwen3_vl_moe.py `Qwen3MoeLLMModel.forward`): the aux
# hidden state for target layer k is captured at the start of layer k+1, after layer k's deepstack visual
# embedding was added (image/video rows of extend batches, k < 3). Subtract it again so the draft's features
# are the residual stream after layer k and before deepstack, as the HF capture records them.
# Exact up to one fp rounding of (h + d) - d: |error| <= ulp(|h + d|).
def pre_deepstack_aux_hidden_states(original, self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    deepstack = kwargs.get("input_deepstack_embeds", args[5] if len(args) > 5 else None)
    if deepstack is None or not isinstance(out, tuple) or getattr(self, "use_hf_deepstack_order", False):
        return out
    _, aux = out
    hidden_size = self.hidden_size
    for i, captured_layer in enumerate(sorted(self.layers_to_capture)):
        k = captured_layer - 1                       # the target layer whose output this capture is
        if i < len(aux) and k in self.deepstack_embed_to_decoder_layer:
            aux[i] = aux[i] - deepstack[:, k * hidden_size:(k + 1) * hidden_size].to(aux[i].dtype)
    return out


def served_target_features(marked: str | None, online_train: bool) -> str:
    """The target features the served draft gets: pre-deepstack with --online-train (what it records and trains
    on) or for a draft whose config.json says it learned them; otherwise SGLang's own (post-deepstack)."""
    from trainer.draft_kind import POST_DEEPSTACK, PRE_DEEPSTACK
    return PRE_DEEPSTACK if online_train or marked == PRE_DEEPSTACK else POST_DEEPSTACK


def draft_marker(server_args) -> tuple[str | None, str]:
    """(the served draft's sglang_ext.target_features marker or None, its config.json as named in logs). The
    draft path may be a local directory or a Hugging Face repo id, resolved as the online path resolves it
    (sglang_ext/online/hub.py); ValueError naming the file and key if the marker is malformed."""
    from sglang_ext.online.config import OnlineTrainConfigError
    from sglang_ext.online.hub import draft_source, local_dir
    from trainer.draft_kind import draft_target_features, read_draft_config

    source = draft_source(server_args)
    try:
        d, where = read_draft_config(local_dir(source, allow_patterns=["*.json"]))
    except (OnlineTrainConfigError, FileNotFoundError, ValueError) as e:
        # SGLang itself fails to load such a draft; say why here, and keep its default
        logger.warning("sglang_ext: cannot read the config.json of --speculative-draft-model-path %s (%s); the "
                       "draft gets SGLang's default target features", source.path, e)
        return None, source.path
    return draft_target_features(d, where), where


def online_train_on(argv) -> bool:
    """--online-train on the launch command line (or in SGLang's --config file)."""
    from sglang_ext.online.config import OnlineTrainConfigError
    from sglang_ext.online.flags import argv_with_sglang_config, parse_argv
    try:
        return parse_argv(argv_with_sglang_config(list(argv))) is not None
    except OnlineTrainConfigError:              # the --online-train hook reports it (it ran before this one)
        return False


def decide_and_publish(server_args, online: bool) -> None:
    """Decide which target features the served draft gets (its config.json marker, --online-train), log it, and
    hand the decision to every process SGLang starts from here through $SGLANG_EXT_DRAFT_TARGET_FEATURES.
    ValueError naming the file and key for a malformed marker."""
    global _decided_for
    os.environ.pop(TARGET_FEATURES_ENV_VAR, None)
    _decided_for = server_args
    if not getattr(server_args, "speculative_draft_model_path", None):
        return
    marked, where = draft_marker(server_args)
    served = served_target_features(marked, online)
    os.environ[TARGET_FEATURES_ENV_VAR] = served
    why = ("--online-train records and trains on them" if online else
           f"{where} says sglang_ext.target_features={marked}" if marked else
           f"{where} has no sglang_ext.target_features marker: SGLang's default")
    logger.info("sglang_ext: the draft gets %s target features at Qwen3-VL deepstack layers (%s)",
                served.replace("_", "-"), why)


_decided_for = None                 # the ServerArgs the decision above was made for


# srt/server_args.py `prepare_server_args` (AFTER; the `sglang serve` / launch_server command line, before any
# scheduler process starts): decide with the command line's --online-train; a bad marker is a usage error.
def decide_draft_target_features(server_args, argv, *args, **kwargs):
    try:
        decide_and_publish(server_args, online_train_on(argv))
    except ValueError as e:
        sys.stderr.write(f"sglang serve: error: --speculative-draft-model-path: {e}\n")
        raise SystemExit(2) from None
    return None


# srt/entrypoints/engine.py `Engine._launch_subprocesses` (BEFORE; every launch, `sglang.Engine(...)` included,
# which never calls prepare_server_args): decide here unless the command line's hook above already did for
# these server args.
def decide_draft_target_features_at_launch(cls, server_args, *args, **kwargs):
    if _decided_for is not server_args:
        from sglang_ext.online.config import OnlineTrainConfig
        online = OnlineTrainConfig.from_env()
        decide_and_publish(server_args, online is not None and online.enabled)
    return None


def feeds_pre_deepstack() -> bool:
    """In a process SGLang started: whether the served draft gets pre-deepstack target features (decided by the
    launcher; --online-train always does)."""
    from sglang_ext.online.config import OnlineTrainConfig
    from trainer.draft_kind import PRE_DEEPSTACK
    if os.environ.get(TARGET_FEATURES_ENV_VAR) == PRE_DEEPSTACK:
        return True
    cfg = OnlineTrainConfig.from_env()
    return cfg is not None and cfg.enabled


def register_general_hooks() -> None:
    HookRegistry.register("sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration.set_dflash_layers_to_capture",
                          qwen3_vl_set_dflash_layers_to_capture, HookType.REPLACE)
    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner._extend_forward_kwargs",
                          extend_forward_kwargs_in_model_dtype, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", decide_draft_target_features,
                          HookType.AFTER)
    HookRegistry.register("sglang.srt.entrypoints.engine.Engine._launch_subprocesses",
                          decide_draft_target_features_at_launch, HookType.BEFORE)
    if feeds_pre_deepstack():
        HookRegistry.register("sglang.srt.models.qwen3_vl.Qwen3LLMModel.forward", pre_deepstack_aux_hidden_states,
                              HookType.AROUND)
        HookRegistry.register("sglang.srt.models.qwen3_vl_moe.Qwen3MoeLLMModel.forward",
                              pre_deepstack_aux_hidden_states, HookType.AROUND)
