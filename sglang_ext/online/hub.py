"""--model-path and --speculative-draft-model-path as Hugging Face repo ids (e.g. `z-lab/Qwen3-8B-DFlash-b16`).

Stock SGLang accepts a repo id for either: its loader (srt/model_loader/weight_utils.py) fetches it with
`huggingface_hub.snapshot_download(repo, revision=..., cache_dir=--download-dir,
local_files_only=HF_HUB_OFFLINE)` and loads from the snapshot directory. The online path reads files of both
(the draft's config.json and weights, the target's config.json, embedding and lm_head), so it resolves the same
names the same way, to the same snapshot directory: --revision for the target, --speculative-draft-model-revision
for the draft, --download-dir as the cache, only the local cache under HF_HUB_OFFLINE=1. A local directory is
used as it is. Paths are read through SGLang's resolving view, so a path SGLang itself resolved (ModelScope,
GGUF) is the one used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from sglang_ext.online.config import OnlineTrainConfigError


@dataclass(frozen=True)
class ModelSource:
    """One model as the server was told to load it."""
    flag: str                    # the launch flag that named it (for errors)
    path: str                    # a local directory or a repo id
    revision: str | None         # branch, tag or commit (None: main)
    download_dir: str | None     # --download-dir: the Hugging Face cache to use (None: HF_HUB_CACHE)


def _view(server_args):
    try:
        from sglang.srt.arg_groups.overrides import resolving_view
    except ImportError:                     # an SGLang without declared resolutions: the fields are final
        return server_args
    return resolving_view(server_args)


def target_source(server_args) -> ModelSource:
    v = _view(server_args)
    return ModelSource("--model-path", str(v.model_path), getattr(v, "revision", None),
                       getattr(v, "download_dir", None))


def draft_source(server_args) -> ModelSource:
    v = _view(server_args)
    return ModelSource("--speculative-draft-model-path", str(v.speculative_draft_model_path),
                       getattr(v, "speculative_draft_model_revision", None), getattr(v, "download_dir", None))


def local_dir(source: ModelSource, *, allow_patterns: list[str] | None = None, cache_first: bool = False) -> str:
    """The local directory of `source`: itself if it is a directory, else the snapshot of the repo id in the
    Hugging Face cache, fetched as SGLang's loader fetches it (`allow_patterns`: which files a fetch gets).
    `cache_first`: take a snapshot already in the cache without asking the Hub (after SGLang loaded the model,
    the snapshot it loaded is there). OnlineTrainConfigError naming the flag if it cannot be had."""
    if os.path.isdir(source.path):
        return source.path
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    kwargs = dict(revision=source.revision, cache_dir=source.download_dir, allow_patterns=allow_patterns)
    try:
        if cache_first and not offline:
            try:
                return snapshot_download(source.path, local_files_only=True, **kwargs)
            except Exception:               # noqa: BLE001 - not cached (yet): fetch it as SGLang would
                pass
        return snapshot_download(source.path, local_files_only=offline, **kwargs)
    except Exception as e:                  # noqa: BLE001 - any failure is a startup error naming the flag
        revision = f" at revision {source.revision}" if source.revision else ""
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "on the Hugging Face Hub"
        raise OnlineTrainConfigError(f"{source.flag} {source.path}: not a local directory, and not found as a repo "
                                     f"id{revision} {where}: {type(e).__name__}: {e}") from None


def resolve_draft_kind(server_args) -> str:
    """The kind of the served draft (from its config.json), checked against --speculative-algorithm."""
    from trainer.draft_kind import kind_for_draft
    source = draft_source(server_args)              # a directory, or a repo id: its config.json, fetched as
    path = source.path                              # SGLang fetches it (local_dir)
    local = local_dir(source, allow_patterns=["*.json"])
    try:
        kind = kind_for_draft(local)
    except (ValueError, FileNotFoundError) as e:
        raise OnlineTrainConfigError(f"--speculative-draft-model-path {path}: {e}") from None
    algo = str(server_args.speculative_algorithm).upper()
    if not kind.serving.capture:
        raise OnlineTrainConfigError(f"--speculative-draft-model-path {path} is a {kind.name} draft; --online-train "
                                     f"cannot capture {kind.serving.algorithm} traffic yet")
    if kind.serving.algorithm != algo:
        raise OnlineTrainConfigError(f"--speculative-draft-model-path {path} is a {kind.name} draft, served with "
                                     f"--speculative-algorithm {kind.serving.algorithm}, not {algo}")
    return kind.name
