"""--model-path and --speculative-draft-model-path given as Hugging Face repo ids work with --online-train as
they do in stock SGLang (issue 14): resolved to the snapshot in the local Hugging Face cache (revision flags,
--download-dir, HF_HUB_OFFLINE=1), the same directory SGLang's own cache lookup finds. No network: the cache
is laid out here from the tiny models (models--org--name/snapshots/<commit>/..., refs/main)."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from sglang_ext.online.config import OnlineTrainConfigError
from sglang_ext.online.hub import resolve_draft_kind
from sglang_ext.online.hub import draft_source, local_dir, target_source

TARGET_REPO = "sglang-ext-test/tiny-qwen3vl-dense"
DRAFT_REPO = "sglang-ext-test/tiny-dflash-dense"
COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40


def hub_snapshot(cache: Path, repo: str, source: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay out `source`'s files as the snapshot `commit` of `repo` in the Hugging Face cache `cache` (files
    linked, as the hub cache links snapshots to blobs), with refs/<ref> pointing at it."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(source).iterdir():
        (snapshot / f.name).symlink_to(f.resolve())
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, tiny, monkeypatch):
    """An HF cache holding the tiny target (main) and the tiny draft (main = A, plus commit B), offline."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hub"
    snaps = {"target": hub_snapshot(cache, TARGET_REPO, tiny.dense, COMMIT_A),
             "draft": hub_snapshot(cache, DRAFT_REPO, tiny.draft_dense, COMMIT_A),
             "draft_b": hub_snapshot(cache, DRAFT_REPO, tiny.draft_random, COMMIT_B, ref=None)}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache, snaps


def _args(**kw):
    base = dict(model_path=TARGET_REPO, revision=None, speculative_draft_model_path=DRAFT_REPO,
                speculative_draft_model_revision=None, download_dir=None, speculative_algorithm="DFLASH")
    return SimpleNamespace(**{**base, **kw})


def test_repo_ids_resolve_to_the_cached_snapshots(offline_cache):
    from sglang.srt.utils.common import find_local_repo_dir        # SGLang's own lookup of a cached repo
    _, snaps = offline_cache
    args = _args()
    target = local_dir(target_source(args), cache_first=True)
    draft = local_dir(draft_source(args), allow_patterns=["*.json"])
    assert Path(target) == snaps["target"].resolve() and Path(draft) == snaps["draft"].resolve()
    assert Path(find_local_repo_dir(TARGET_REPO)).resolve() == Path(target)
    assert (Path(draft) / "config.json").is_file() and (Path(target) / "model.safetensors").is_file()
    assert resolve_draft_kind(args) == "dflash"


def test_revision_flags_and_download_dir_are_honoured(offline_cache, tmp_path, tiny):
    from sglang.srt.utils.common import find_local_repo_dir
    cache, snaps = offline_cache
    pinned = _args(speculative_draft_model_revision=COMMIT_B)
    assert Path(local_dir(draft_source(pinned))) == snaps["draft_b"].resolve()
    assert Path(find_local_repo_dir(DRAFT_REPO, COMMIT_B)).resolve() == snaps["draft_b"].resolve()
    assert Path(local_dir(target_source(_args(revision=COMMIT_A)))) == snaps["target"].resolve()
    # --download-dir is the cache SGLang's loader uses (cache_dir): a repo only there is found there
    other = tmp_path / "download-dir"
    elsewhere = hub_snapshot(other, TARGET_REPO, tiny.dense, COMMIT_C)
    assert Path(local_dir(target_source(_args(download_dir=str(other))))) == elsewhere.resolve()


def test_local_directories_are_used_as_they_are(tiny):
    args = _args(model_path=str(tiny.dense), speculative_draft_model_path=str(tiny.draft_dense))
    assert local_dir(target_source(args)) == str(tiny.dense)
    assert local_dir(draft_source(args)) == str(tiny.draft_dense)


def test_a_repo_id_not_in_the_offline_cache_is_a_clean_error(offline_cache):
    with pytest.raises(OnlineTrainConfigError, match=r"--speculative-draft-model-path nobody/missing: not a local "
                                                     r"directory, and not found as a repo id in the local Hugging "
                                                     r"Face cache \(HF_HUB_OFFLINE=1\)"):
        resolve_draft_kind(_args(speculative_draft_model_path="nobody/missing"))
    with pytest.raises(OnlineTrainConfigError, match=rf"--model-path {TARGET_REPO}: not a local directory, and not "
                                                     rf"found as a repo id at revision {COMMIT_C}"):
        local_dir(target_source(_args(revision=COMMIT_C)))
    with pytest.raises(OnlineTrainConfigError, match=r"--speculative-draft-model-path /no/such/draft: not a local "
                                                     r"directory"):
        resolve_draft_kind(_args(speculative_draft_model_path="/no/such/draft"))


@pytest.mark.server
def test_real_server_serves_and_trains_from_repo_ids(tiny, server_log_dir, tmp_path):
    """Real SGLang on the CPU platform, DFLASH with --online-train, both models named by repo id, offline:
    it serves, and the online path records the finished requests and starts its trainer."""
    import time

    from sglang_ext.demo.prompts import mixed_requests
    from sglang_ext.launcher import launch_server, metric_value
    from trainer.draft_kind import kind_for_draft

    cache = tmp_path / "hub"
    hub_snapshot(cache, TARGET_REPO, tiny.dense, COMMIT_A)
    hub_snapshot(cache, DRAFT_REPO, tiny.draft_dense, COMMIT_A)
    assert not Path(TARGET_REPO).exists() and not Path(DRAFT_REPO).exists()     # names, not paths here
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = kind_for_draft(tiny.draft_dense).server_args(DRAFT_REPO) + ["--online-train",
                                                                       "--online-train-min-records", "2"]
    requests = mixed_requests(n_text=3, n_image=1)
    with launch_server(TARGET_REPO, args, log_dir=server_log_dir, name="online-hub-ids", env=env) as server:
        outputs = [server.generate(text, images, max_new_tokens=12) for text, images in requests]
        assert all(len(o["output_ids"]) == 12 for o in outputs)
        assert all(o["meta_info"].get("spec_verify_ct", 0) > 0 for o in outputs)     # the draft proposed
        deadline, recorded, trainer_up = time.monotonic() + 180, 0.0, 0.0
        while time.monotonic() < deadline:
            text = server.metrics()
            recorded = metric_value(text, "sglang:online_train_recorded_records_total")
            trainer_up = metric_value(text, "sglang:online_train_trainer_up")
            if recorded >= len(requests) and trainer_up == 1:
                break
            time.sleep(1.0)
        log = server.log_tail(400_000)
    assert recorded >= len(requests), recorded
    assert trainer_up == 1, log[-3000:]                  # the trainer loaded target and draft from the snapshots
    assert "online training ready: dflash draft" in log
