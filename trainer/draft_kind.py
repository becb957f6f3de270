"""The draft-kind seam: everything the pipeline needs to know about one kind of speculative draft.

finetune, the evaluator, the offline capture, the online trainer and the hot-swap supervisor never name a
draft kind; they ask the registry for the kind of a draft checkpoint (by its config.json `architectures`)
and talk to it through `DraftKind`:

    kind = kind_for_draft("path/to/draft")         # e.g. the DFlash kind for ["DFlashDraftModel"]
    cfg = kind.load_config("path/to/draft")        # the kind's config dataclass
    model = kind.from_pretrained("path/to/draft", cfg)
    model.attach_target(embed_tokens, lm_head)     # frozen target head, never saved with the draft
    out = kind.loss(model, batch, generator=g)     # -> ObjectiveOutput (loss + acceptance proxy)
    model.export("out_dir")                        # the directory stock SGLang loads

A kind is one module (`trainer/dflash_kind.py` for DFlash) that subclasses `DraftKind` and calls
`register_kind` at import; the modules of the built-in kinds are listed in `BUILTIN_KINDS` and imported on
first lookup. See docs/architecture.md, "How to add a draft kind".
"""
from __future__ import annotations

import importlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from trainer.verify_sim import PromptTau
    from trainer.hf_target import HFTarget
    from trainer.target import TargetInfo
    from trainer.train_step import Batch

# kind name -> module that defines and registers it (imported lazily, on the first lookup)
BUILTIN_KINDS = {"dflash": "trainer.dflash_kind", "eagle3": "trainer.eagle3_kind"}


# ---- what every kind's objective returns ------------------------------------------------------------------

@dataclass
class ObjectiveOutput:
    """One batch through a draft's training objective. "slot" is a draft position: DFlash block slot k,
    or an EAGLE-style unrolled step."""
    loss: torch.Tensor            # scalar, weighted mean over the labelled slots
    slot_correct: torch.Tensor    # [B] long: argmax == label, per draft position
    slot_count: torch.Tensor      # [B] long: labelled tokens per position
    accept_sum: torch.Tensor      # scalar: sum over fully labelled proposals of 1 + leading correct positions
    full_blocks: torch.Tensor     # scalar long: how many fully labelled proposals
    weight_sum: torch.Tensor      # scalar: sum of loss weights (the loss denominator)
    # loss == sum(numerator / denominator for numerator, denominator in loss_terms): the loss as ratios of sums
    # over the batch, so data-parallel ranks can divide their numerators by the denominators summed over all
    # ranks and together get the gradient of one process on the whole batch (trainer.train_step). Empty: the
    # loss is one weighted mean, ((loss * weight_sum, weight_sum),).
    loss_terms: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    @property
    def accuracy(self) -> float:
        n = int(self.slot_count.sum())
        return float(self.slot_correct.sum()) / n if n else float("nan")

    @property
    def slot_accuracy(self) -> list[float]:
        return [c / n if n else float("nan") for c, n in zip(self.slot_correct.tolist(), self.slot_count.tolist())]

    @property
    def accept_len(self) -> float:
        """Greedy acceptance length a proposal would get if verified against these labels (1 + leading
        matches), over fully labelled proposals: a training-time proxy for tau."""
        n = int(self.full_blocks)
        return float(self.accept_sum) / n if n else float("nan")


# ---- what a kind's model and config look like to the pipeline ------------------------------------------------

class DraftConfigLike(Protocol):
    hidden_size: int
    num_target_layers: int
    vocab_size: int
    block_size: int                 # tokens per verify step (bonus + proposals)

    def to_dict(self) -> dict: ...


class TrainableDraft(Protocol):
    cfg: Any

    def attach_target(self, embed_tokens: torch.Tensor, lm_head: torch.Tensor) -> None: ...
    def export(self, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path: ...
    def state_dict(self) -> dict: ...


# SGLang's Llama-style loaders stack q/k/v into qkv_proj and gate/up into gate_up_proj
STACKED_QKV_GATE_UP = (("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
                       ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"))


@dataclass(frozen=True)
class ServingFacts:
    """Where SGLang 0.5.23 serves this kind: what the online path hooks and what a hot swap must respect."""
    algorithm: str                                  # --speculative-algorithm
    worker_class: str                               # dotted path of SGLang's speculative worker (the scheduler
                                                    # starts it; the online pipeline is built in its __init__)
    capture: tuple[str, ...]                        # dotted paths of the methods through which target features
                                                    # enter the live draft (sglang_ext/online/scheduler/hooks.py has a
                                                    # capture hook per method name); (): --online-train cannot
                                                    # capture this kind
    stacked_params: tuple[tuple[str, str], ...]     # (our weight name part, SGLang's fused parameter part)
    draft_module: str = "draft_model"               # attribute path from the worker to SGLang's draft module
    renamed_params: tuple[tuple[str, str], ...] = ()  # (our name prefix, SGLang's) that its load_weights maps
    fixed_weights: tuple[str, ...] = ()             # weights the online path never swaps: SGLang derives state
                                                    # from them at load time (the trainer keeps them as loaded)


# ---- the interface ----------------------------------------------------------------------------------------

class DraftKind(ABC):
    name: str                                       # "dflash"
    architectures: tuple[str, ...]                  # config.json architectures this kind loads
    serving: ServingFacts
    objective_knobs: tuple[str, ...] = ()           # the keyword settings `loss` takes
    config_class: type                              # from_dict(d) / from_json(path) / to_dict()
    model_class: type                               # from_scratch(cfg, seed) / from_pretrained(path, cfg)

    # -- config and model --
    def load_config(self, source: str | os.PathLike | dict) -> DraftConfigLike:
        """A draft directory, its config.json, or the parsed dict -> the kind's config (ValueError if bad)."""
        if isinstance(source, dict):
            return self.config_class.from_dict(source)
        return self.config_class.from_json(source)

    @abstractmethod
    def config_for_target(self, target_config: dict, *, num_layers: int, block_size: int,
                          feature_layers: list[int] | None = None, **dims) -> DraftConfigLike:
        """A new draft config for a target (its config.json dict): what --draft-config would hold."""

    def from_scratch(self, cfg, seed: int | None = None) -> TrainableDraft:
        return self.model_class.from_scratch(cfg, seed=seed)

    def from_pretrained(self, path: str | os.PathLike, cfg=None) -> TrainableDraft:
        return self.model_class.from_pretrained(path, cfg)

    def set_block_size(self, cfg, block_size: int) -> None:
        if block_size < 2:
            raise ValueError(f"block size must be >= 2 (bonus + at least one proposal), got {block_size}")
        cfg.block_size = int(block_size)

    # -- capture: which target features the draft reads --
    @abstractmethod
    def feature_layers(self, cfg) -> list[int]:
        """Target layer ids whose hidden states are the draft's features, in replay column order."""

    def check_target(self, cfg, info: "TargetInfo", where: str) -> None:
        """Raise ValueError (naming `where`) when the draft does not fit the target's config."""
        if cfg.hidden_size != info.hidden_size:
            raise ValueError(f"draft hidden_size {cfg.hidden_size} != target hidden_size {info.hidden_size} "
                             f"({where}); {self.name} drafts share the target's width")
        bad = [i for i in self.feature_layers(cfg) if not 0 <= i < info.num_hidden_layers]
        if bad:
            raise ValueError(f"draft target layers {self.feature_layers(cfg)}: {bad} out of range for the "
                             f"target's {info.num_hidden_layers} layers ({where})")
        if cfg.num_target_layers != info.num_hidden_layers:
            raise ValueError(f"draft num_target_layers {cfg.num_target_layers} != target num_hidden_layers "
                             f"{info.num_hidden_layers} ({where}): the draft config was made for another target")

    def check_head(self, cfg, embed_rows: int, where: str) -> None:
        """Checks of the draft against the target's vocabulary (ValueError naming `where`)."""

    def attach_target(self, model, embed_tokens: torch.Tensor, lm_head: torch.Tensor,
                      target_path: str | os.PathLike) -> None:
        """Give the model the frozen target parts it needs (embedding and lm_head, in the model's device and
        the compute dtype; a kind that needs more reads it from `target_path`)."""
        model.attach_target(embed_tokens, lm_head)

    def init_from_replay(self, model, reader) -> None:
        """A from-scratch draft may take data-dependent state from the replay (e.g. a draft vocabulary)."""

    # -- training --
    @abstractmethod
    def loss(self, model, batch: "Batch", *, generator: torch.Generator | None = None, backend: str = "auto",
             **settings) -> ObjectiveOutput:
        """The kind's objective on one padded batch; `settings` are the kind's objective knobs."""

    def objective_settings(self, **knobs) -> dict:
        """The knobs (finetune flags, online settings) this kind's objective takes; the others are dropped."""
        return {k: v for k, v in knobs.items() if k in self.objective_knobs and v is not None}

    # -- offline evaluation: SGLang's verify rule replayed with an HF target --
    @abstractmethod
    def load_for_hf_target(self, target: "HFTarget", path: str | os.PathLike) -> TrainableDraft:
        """The draft with the target's embedding / lm_head, as SGLang's worker would use them."""

    @abstractmethod
    def simulate_prompt(self, target: "HFTarget", draft, text: str, images: list, *, block_size: int,
                        max_new_tokens: int, ignore_eos: bool = True, context_features: str = "pre",
                        name: str = "") -> "PromptTau":
        """One request through SGLang's greedy speculative loop for this kind, offline."""

    # -- serving --
    def server_args(self, draft_path: str | os.PathLike, block_size: int | None = None) -> list[str]:
        """launch_server arguments that serve `draft_path` with this kind."""
        args = ["--speculative-algorithm", self.serving.algorithm, "--speculative-draft-model-path", str(draft_path)]
        if block_size is not None:
            args += ["--speculative-num-draft-tokens", str(block_size)]
        return args

    def served_block_size(self, worker) -> int:
        """Tokens per verify step of a chain (bonus + proposals) SGLang's worker runs with: the most a verify
        step can accept."""
        return int(worker.block_size)

    def live_feature_layers(self, cfg) -> list[int]:
        """Target layer ids whose hidden states the live worker feeds the draft (what --online-train
        records), in replay column order. Default: the same as an offline capture (`feature_layers`)."""
        return self.feature_layers(cfg)

    def replay_layouts(self, cfg) -> list[list[int]]:
        """The replay column layouts (layer ids) this kind trains from: offline and live captures."""
        layouts = [list(self.feature_layers(cfg))]
        live = list(self.live_feature_layers(cfg))
        return layouts + ([live] if live != layouts[0] else [])

    def sglang_param_name(self, name: str) -> str:
        """Our weight name -> the parameter of SGLang's draft module that `load_weights` writes it into."""
        for ours, theirs in self.serving.renamed_params:
            if name.startswith(ours):
                name = theirs + name[len(ours):]
        for part, stacked in self.serving.stacked_params:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{stacked}.")
        return name

    def after_swap(self, worker) -> None:
        """Rebuild whatever SGLang's worker derived from the draft weights at load time."""


# ---- the target-feature convention a draft was trained on (config.json `sglang_ext.target_features`) ------
# Qwen3-VL adds deepstack visual embeddings to the residual stream after target layers 0-2 at image/video rows.
# Our captures (trainer/capture.py, --online-train) record the features BEFORE that add; stock SGLang's aux
# capture sees them after it. Every export of a draft kind records which it learned, and the always-on plugin
# hooks (sglang_ext/hooks.py) feed a marked draft that convention whether or not --online-train is on.

CONVENTION_KEY = "sglang_ext"                 # top-level config.json object of ours (SGLang / HF configs ignore it)
TARGET_FEATURES_KEY = "target_features"       # ... and its key naming the convention
PRE_DEEPSTACK = "pre_deepstack"               # residual stream after target layer k, before its deepstack add
POST_DEEPSTACK = "post_deepstack"             # after it: what stock SGLang 0.5.23 feeds a draft
TARGET_FEATURES = (PRE_DEEPSTACK, POST_DEEPSTACK)
TRAINED_TARGET_FEATURES = PRE_DEEPSTACK       # what every capture of ours records, so what our exports learned


def with_target_features(config: dict, convention: str = TRAINED_TARGET_FEATURES) -> dict:
    """A copy of a draft config.json dict recording `convention` at sglang_ext.target_features (any other key
    of the sglang_ext object is kept; the input, and the dicts it shares with a config's `extra`, untouched)."""
    if convention not in TARGET_FEATURES:
        raise ValueError(f"{CONVENTION_KEY}.{TARGET_FEATURES_KEY}: {convention!r} is not one of "
                         f"{list(TARGET_FEATURES)}")
    ours = config.get(CONVENTION_KEY) or {}
    if not isinstance(ours, dict):
        raise ValueError(f"draft config key {CONVENTION_KEY!r} must be an object, got {type(ours).__name__}")
    return {**config, CONVENTION_KEY: {**ours, TARGET_FEATURES_KEY: convention}}


def draft_target_features(config: dict, where: str = "draft config") -> str | None:
    """The convention a draft config.json dict records (PRE_DEEPSTACK / POST_DEEPSTACK), None if it has no
    marker (a draft not exported by this trainer: SGLang's default applies). ValueError naming `where` and the
    key if the marker is malformed."""
    ours = config.get(CONVENTION_KEY)
    if ours is None:
        return None
    if not isinstance(ours, dict):
        raise ValueError(f"{where}: key {CONVENTION_KEY!r} must be an object, got {type(ours).__name__}")
    value = ours.get(TARGET_FEATURES_KEY)
    if value is None:
        return None
    if value not in TARGET_FEATURES:
        raise ValueError(f"{where}: {CONVENTION_KEY}.{TARGET_FEATURES_KEY} is {value!r}, expected one of "
                         f"{list(TARGET_FEATURES)}")
    return value


def without_target_features(config: dict, where: str = "draft config") -> dict:
    """A draft config.json dict without its marker (checked first: ValueError naming `where` if malformed), for
    a kind's config to keep in `extra`: the marker belongs to the export, which writes what the exported draft
    learned, so a loaded config equals the one exported and the marker is written once. Other keys of our
    object are kept."""
    draft_target_features(config, where)
    ours = config.get(CONVENTION_KEY)
    if not isinstance(ours, dict) or TARGET_FEATURES_KEY not in ours:
        return config
    rest = {k: v for k, v in ours.items() if k != TARGET_FEATURES_KEY}
    return {**{k: v for k, v in config.items() if k != CONVENTION_KEY}, **({CONVENTION_KEY: rest} if rest else {})}


# ---- registry ---------------------------------------------------------------------------------------------

_KINDS: dict[str, DraftKind] = {}


def register_kind(kind: DraftKind) -> DraftKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"draft kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def _load_builtins() -> None:
    for name, module in BUILTIN_KINDS.items():
        if name not in _KINDS:
            importlib.import_module(module)


def kinds() -> dict[str, DraftKind]:
    _load_builtins()
    return dict(_KINDS)


def get_kind(name: str) -> DraftKind:
    known = kinds()
    if name not in known:
        raise ValueError(f"unknown draft kind {name!r}; known: {sorted(known)}")
    return known[name]


def kind_for_architectures(archs: list[str] | tuple[str, ...], where: str = "draft config") -> DraftKind:
    known = kinds()
    for kind in known.values():
        if any(a in kind.architectures for a in archs):
            return kind
    supported = sorted(a for k in known.values() for a in k.architectures)
    raise ValueError(f"{where}: architectures {list(archs)} is not a draft kind this trainer knows "
                     f"(supported: {supported})")


def read_draft_config(source: str | os.PathLike | dict) -> tuple[dict, str]:
    """(config dict, where) from a draft directory, a config.json path or a dict."""
    if isinstance(source, dict):
        return source, "draft config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"draft config not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d, str(path)


def kind_for_draft(source: str | os.PathLike | dict) -> DraftKind:
    """The kind of a draft checkpoint (directory, config.json or dict), from its `architectures`."""
    d, where = read_draft_config(source)
    archs = d.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ValueError(f"{where}: no 'architectures' list; a draft config names its kind there "
                         f"(e.g. {sorted(a for k in kinds().values() for a in k.architectures)})")
    return kind_for_architectures(archs, where)
