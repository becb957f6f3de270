"""The target-feature convention travels with the draft (issue 16, item 4).

Drafts trained on our captures learned PRE-deepstack Qwen3-VL features (trainer/capture.py, --online-train);
stock SGLang feeds a draft POST-deepstack ones at image/video rows of target layers below 3. Every export of a
draft kind records the convention in config.json (`sglang_ext.target_features`), and the always-on plugin hooks
(sglang_ext/hooks.py) feed a marked draft pre-deepstack features whether or not --online-train is on; an
unmarked draft keeps SGLang's default (and --online-train, as before, always feeds pre-deepstack).

Unit tests: every kind's export writes the marker (once, keeping other keys of our object), SGLang's own config
parsing loads it, a draft without it loads as before, and the launcher's decision for every case (local dir,
Hugging Face repo id, --online-train, a malformed marker, sglang.Engine). Two real-SGLang tests (CPU platform,
float32): the same DFLASH draft marked and unmarked, served without --online-train, one image request each; the
features each live draft consumed (the test plugin's debug dump) are HF's pre-deepstack capture and HF's
post-deepstack one. And the marked draft under `sglang.Engine(...)` (no command line): pre-deepstack too."""
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_ext.hooks import (TARGET_FEATURES_ENV_VAR, decide_draft_target_features,
                              decide_draft_target_features_at_launch, feeds_pre_deepstack, served_target_features)
from sglang_ext.online.config import ENV_VAR as ONLINE_ENV_VAR
from trainer.draft_kind import (CONVENTION_KEY, POST_DEEPSTACK, PRE_DEEPSTACK, TARGET_FEATURES_KEY,
                                draft_target_features, get_kind, kinds, with_target_features)

# the smallest draft of each kind for the tiny dense target (every registered kind must be listed here)
KIND_DIMS = {
    "dflash": dict(num_layers=1, feature_layers=[1, 2, 3], num_heads=4, num_kv_heads=4, head_dim=64,
                   intermediate_size=128),
    "eagle3": dict(num_layers=1, feature_layers=[0, 2, 3], num_heads=4, num_kv_heads=2, head_dim=64,
                   intermediate_size=128),
}


def _target_config(tiny) -> dict:
    return json.loads((tiny.dense / "config.json").read_text())


def _export(kind_name: str, tiny, out: Path, *, base: dict | None = None) -> Path:
    """A from-scratch draft of `kind_name` for the tiny dense target, exported to `out` (its config made from
    `base`, a config.json dict, when given)."""
    kind = get_kind(kind_name)
    target = _target_config(tiny)
    dims = dict(KIND_DIMS[kind_name])
    if kind_name == "dflash":
        dims["mask_token_id"] = target["text_config"]["vocab_size"] - 1     # the tiny targets' spare row
    cfg = kind.load_config(base) if base is not None else \
        kind.config_for_target(target, block_size=4, **dims)
    return kind.from_scratch(cfg, seed=0).export(out, dtype=torch.float32)


def _config(draft: Path) -> dict:
    return json.loads((draft / "config.json").read_text())


def _copy_draft(draft: Path, out: Path, marker: str | None) -> Path:
    """`draft` with config.json marked `marker` (None: no marker at all); the weights linked."""
    out.mkdir(parents=True)
    for f in draft.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = {k: v for k, v in _config(draft).items() if k != CONVENTION_KEY}
    if marker is not None:
        cfg = with_target_features(cfg, marker)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ---- exports -------------------------------------------------------------------------------------------------

def test_every_kind_is_covered():
    assert set(kinds()) == set(KIND_DIMS), "add the new draft kind's smallest dims to KIND_DIMS"


@pytest.mark.parametrize("kind_name", sorted(KIND_DIMS))
def test_every_kind_export_writes_the_marker(tiny, tmp_path, kind_name):
    from sglang.srt.utils.hf_transformers_utils import get_config

    kind = get_kind(kind_name)
    first = _export(kind_name, tiny, tmp_path / "first")
    cfg = _config(first)
    assert cfg[CONVENTION_KEY] == {TARGET_FEATURES_KEY: PRE_DEEPSTACK}
    assert draft_target_features(cfg) == PRE_DEEPSTACK
    # Our loader takes the marked config; the marker belongs to the export, not to the kind's config (neither a
    # field nor in `extra`), so the loaded config is the one exported and a re-export writes the marker once ...
    loaded = kind.load_config(first)
    assert CONVENTION_KEY not in loaded.extra and CONVENTION_KEY not in loaded.to_dict()
    kind.from_pretrained(first, loaded)
    with pytest.raises(ValueError, match="sglang_ext.target_features is 'post'"):   # a malformed one is named
        kind.load_config({**cfg, CONVENTION_KEY: {TARGET_FEATURES_KEY: "post"}})
    # ... and SGLang's own config parsing ignores the key (an attribute like any unknown config.json key).
    hf = get_config(str(first), trust_remote_code=False)
    assert getattr(hf, CONVENTION_KEY) == {TARGET_FEATURES_KEY: PRE_DEEPSTACK}
    assert hf.architectures == cfg["architectures"]

    # Re-exporting a loaded draft (finetune --draft-model-path, the online trainer) writes the marker once,
    # sets it to what this export learned whatever the input said, and keeps other keys of our object.
    base = {**cfg, CONVENTION_KEY: {TARGET_FEATURES_KEY: POST_DEEPSTACK, "note": "kept"}}
    again = _config(_export(kind_name, tiny, tmp_path / "again", base=base))
    assert again[CONVENTION_KEY] == {TARGET_FEATURES_KEY: PRE_DEEPSTACK, "note": "kept"}
    assert base[CONVENTION_KEY][TARGET_FEATURES_KEY] == POST_DEEPSTACK          # the input is not modified
    assert {k: v for k, v in again.items() if k != CONVENTION_KEY} == \
        {k: v for k, v in cfg.items() if k != CONVENTION_KEY}
    # to_dict (what --draft-config files and finetune's resume check hold) adds nothing of its own
    fresh = kind.config_for_target(_target_config(tiny), block_size=4, **{
        **KIND_DIMS[kind_name], **({"mask_token_id": 1} if kind_name == "dflash" else {})})
    assert CONVENTION_KEY not in fresh.to_dict()


@pytest.mark.parametrize("kind_name", sorted(KIND_DIMS))
def test_a_draft_without_the_marker_loads_as_before(tiny, tmp_path, kind_name):
    kind = get_kind(kind_name)
    marked = _export(kind_name, tiny, tmp_path / "marked")
    unmarked = _copy_draft(marked, tmp_path / "unmarked", None)
    assert CONVENTION_KEY not in _config(unmarked)
    assert draft_target_features(_config(unmarked)) is None
    a, b = kind.load_config(marked), kind.load_config(unmarked)
    assert a == b and CONVENTION_KEY not in b.to_dict()
    ma, mb = kind.from_pretrained(marked, a), kind.from_pretrained(unmarked, b)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.mark.parametrize("bad, message", [
    ({CONVENTION_KEY: "pre_deepstack"}, "must be an object"),
    ({CONVENTION_KEY: {TARGET_FEATURES_KEY: "pre-deepstack"}}, "sglang_ext.target_features is 'pre-deepstack'"),
])
def test_a_malformed_marker_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        draft_target_features(bad, "x/config.json")
    assert draft_target_features({CONVENTION_KEY: {"other": 1}}) is None      # our object without the key


# ---- the launcher's decision (prepare_server_args, AFTER) ------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(TARGET_FEATURES_ENV_VAR, raising=False)
    monkeypatch.delenv(ONLINE_ENV_VAR, raising=False)
    return monkeypatch


def _decide(draft, argv=()) -> str | None:
    args = SimpleNamespace(model_path="unused", revision=None, speculative_draft_model_path=str(draft),
                           speculative_draft_model_revision=None, download_dir=None, speculative_algorithm="DFLASH")
    assert decide_draft_target_features(args, list(argv)) is None          # the server args are unchanged
    return os.environ.get(TARGET_FEATURES_ENV_VAR)


def test_served_convention_table():
    assert served_target_features(PRE_DEEPSTACK, False) == PRE_DEEPSTACK
    assert served_target_features(None, False) == POST_DEEPSTACK
    assert served_target_features(POST_DEEPSTACK, False) == POST_DEEPSTACK
    for marked in (PRE_DEEPSTACK, POST_DEEPSTACK, None):                    # --online-train: as today
        assert served_target_features(marked, True) == PRE_DEEPSTACK


def test_launcher_decides_once_and_children_follow(tiny, tmp_path, clean_env, caplog):
    marked = _copy_draft(tiny.draft_dense, tmp_path / "marked", PRE_DEEPSTACK)
    unmarked = _copy_draft(tiny.draft_dense, tmp_path / "unmarked", None)
    caplog.set_level(logging.INFO, logger="sglang_ext.hooks")

    assert _decide(marked) == PRE_DEEPSTACK and feeds_pre_deepstack()
    assert _decide(unmarked) == POST_DEEPSTACK and not feeds_pre_deepstack()
    assert _decide(unmarked, ["--online-train"]) == PRE_DEEPSTACK and feeds_pre_deepstack()
    lines = [r.getMessage() for r in caplog.records if r.name == "sglang_ext.hooks"]
    assert len(lines) == 3
    assert "pre-deepstack" in lines[0] and "sglang_ext.target_features=pre_deepstack" in lines[0]
    assert "post-deepstack" in lines[1] and "no sglang_ext.target_features marker" in lines[1]
    assert "pre-deepstack" in lines[2] and "--online-train" in lines[2]
    # a child process of an --online-train server feeds pre-deepstack whatever the launcher decided
    clean_env.setenv(TARGET_FEATURES_ENV_VAR, POST_DEEPSTACK)
    clean_env.setenv(ONLINE_ENV_VAR, json.dumps({"enabled": True}))
    assert feeds_pre_deepstack()
    # no speculative draft: no decision, and no stale one left in the environment
    args = SimpleNamespace(speculative_draft_model_path=None)
    decide_draft_target_features(args, [])
    assert TARGET_FEATURES_ENV_VAR not in os.environ


def test_engine_launch_decides_unless_the_command_line_did(tiny, tmp_path, clean_env, caplog):
    """sglang.Engine(...) never calls prepare_server_args: the decision is made when its subprocesses launch
    (Engine._launch_subprocesses, which `sglang serve` reaches too: there it is not made twice)."""
    marked = _copy_draft(tiny.draft_dense, tmp_path / "marked", PRE_DEEPSTACK)
    unmarked = _copy_draft(tiny.draft_dense, tmp_path / "unmarked", None)
    caplog.set_level(logging.INFO, logger="sglang_ext.hooks")

    def args(draft):
        return SimpleNamespace(model_path="unused", revision=None, speculative_draft_model_path=str(draft),
                               speculative_draft_model_revision=None, download_dir=None,
                               speculative_algorithm="DFLASH")

    engine_args = args(marked)                                            # sglang.Engine: no command line
    assert decide_draft_target_features_at_launch(object, engine_args) is None
    assert os.environ[TARGET_FEATURES_ENV_VAR] == PRE_DEEPSTACK and feeds_pre_deepstack()
    decide_draft_target_features_at_launch(object, args(unmarked))        # another engine, another decision
    assert os.environ[TARGET_FEATURES_ENV_VAR] == POST_DEEPSTACK
    cli_args = args(unmarked)                                             # `sglang serve ... --online-train`
    decide_draft_target_features(cli_args, ["--online-train"])
    assert os.environ[TARGET_FEATURES_ENV_VAR] == PRE_DEEPSTACK
    decide_draft_target_features_at_launch(object, cli_args)              # the same server args: kept
    assert os.environ[TARGET_FEATURES_ENV_VAR] == PRE_DEEPSTACK
    assert len([r for r in caplog.records if r.name == "sglang_ext.hooks"]) == 3
    bad = _copy_draft(tiny.draft_dense, tmp_path / "bad", None)           # a bad marker: an error naming it
    (bad / "config.json").write_text(json.dumps({**_config(bad), CONVENTION_KEY: {TARGET_FEATURES_KEY: "pre"}}))
    with pytest.raises(ValueError, match="sglang_ext.target_features"):
        decide_draft_target_features_at_launch(object, args(bad))


def test_launcher_reads_a_repo_id_through_the_local_hf_cache(tiny, tmp_path, clean_env):
    import huggingface_hub.constants as constants
    from test_online_hub_ids import hub_snapshot

    repo = "sglang-ext-test/tiny-dflash-marked"
    cache = tmp_path / "hub"
    hub_snapshot(cache, repo, _copy_draft(tiny.draft_dense, tmp_path / "marked", PRE_DEEPSTACK), "a" * 40)
    clean_env.setattr(constants, "HF_HUB_OFFLINE", True)
    clean_env.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert _decide(repo) == PRE_DEEPSTACK
    # a repo id that is nowhere: SGLang's default (SGLang itself then fails to load it), with a warning
    assert _decide("sglang-ext-test/not-cached") == POST_DEEPSTACK


def test_a_malformed_marker_fails_the_launch(tiny, tmp_path, clean_env, capsys):
    bad = _copy_draft(tiny.draft_dense, tmp_path / "bad", None)
    (bad / "config.json").write_text(json.dumps({**_config(bad), CONVENTION_KEY: {TARGET_FEATURES_KEY: "pre"}}))
    with pytest.raises(SystemExit) as e:
        _decide(bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-draft-model-path" in err and "config.json" in err and "sglang_ext.target_features" in err


# ---- real SGLang: a marked and an unmarked draft served without --online-train -----------------------------------

def _consumed(dump_dir: Path, rid: str, length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the live draft consumed for request `rid` (the test plugin's dump), by position, over the
    first `length` positions, and which of them it consumed."""
    feats, covered = torch.zeros(length, width), torch.zeros(length, dtype=torch.bool)
    for path in sorted(dump_dir.glob("call-*.pt")):
        d = torch.load(path)
        for r, start, f in zip(d["rids"], d["starts"], d["features"]):
            n = min(f.shape[0], length - int(start))
            if r == rid and n > 0:
                feats[start:start + n], covered[start:start + n] = f[:n], True
    return feats, covered


def _hf_features(tiny, text, images):
    """HF's capture of the prompt: (encoded prompt, pre-deepstack features, post-deepstack features, the
    draft's target layer ids, hidden size, the feature columns of deepstack layers, max |post - pre| there)."""
    from trainer.hf_target import HFTarget
    hf = HFTarget(tiny.dense, device="cpu", dtype=torch.float32)
    prompt = hf.encode(text, images)
    layer_ids = sorted(_config(tiny.draft_dense)["dflash_config"]["target_layer_ids"])
    assert any(k < 3 for k in layer_ids)                                  # deepstack layers are among them
    H = hf.hidden_size
    pre = hf.forward(prompt.input_ids, prompt.positions, layer_ids, vision=prompt.vision, mode="pre").features
    post = hf.forward(prompt.input_ids, prompt.positions, layer_ids, vision=prompt.vision, mode="post").features
    image_rows = prompt.is_vision
    assert image_rows.any()
    deepstack_cols = torch.cat([torch.arange(i * H, (i + 1) * H) for i, k in enumerate(layer_ids) if k < 3])
    gap = (post[image_rows][:, deepstack_cols] - pre[image_rows][:, deepstack_cols]).abs().max()
    assert gap > 1e-2, gap                                                # the check can tell them apart
    return prompt, pre, post, layer_ids, H, deepstack_cols, gap


@pytest.mark.server
def test_marked_draft_gets_pre_deepstack_without_online_train(tiny, server_log_dir, tmp_path):
    from sglang_ext.demo.prompts import chat_prompt, make_image
    from sglang_ext.launcher import draft_args, launch_server
    from support.plugin import plugin_env
    from support.servers import launch_servers, run_concurrently

    text, images = chat_prompt("What colour is the shape?", 1), [make_image(3)]
    drafts = {name: _copy_draft(tiny.draft_dense, tmp_path / name, marker)
              for name, marker in (("marked", PRE_DEEPSTACK), ("unmarked", None))}
    dumps = {name: tmp_path / f"dump-{name}" for name in drafts}

    def launcher(name):
        dumps[name].mkdir()
        return launch_server(tiny.dense, draft_args(drafts[name]), log_dir=server_log_dir,
                             name=f"convention-{name}", env=plugin_env(dump_dir=dumps[name]))

    def serve(server):
        return server.generate(text, images, max_new_tokens=4), server.log_tail(400_000)

    with launch_servers(*(launcher(n) for n in drafts)) as servers:
        runs = dict(zip(drafts, run_concurrently(*(lambda s=s: serve(s) for s in servers))))

    prompt, pre, post, layer_ids, H, deepstack_cols, gap = _hf_features(tiny, text, images)
    image_rows = prompt.is_vision

    got = {}
    for name, (result, log) in runs.items():
        assert result["meta_info"]["spec_verify_ct"] > 0
        consumed, covered = _consumed(dumps[name], result["meta_info"]["id"], len(prompt.input_ids),
                                      len(layer_ids) * H)
        # every image row fed the draft (the first rows may be radix-cache hits of the warm-up request)
        assert covered[image_rows].all() and covered.sum() > len(covered) // 2, name
        got[name] = consumed, covered
        want = "pre-deepstack" if name == "marked" else "post-deepstack"
        assert f"sglang_ext: the draft gets {want} target features" in log, name
    # marked: HF's pre-deepstack capture on every row it consumed (fp32; different kernels: atol 1e-4), image
    # rows of the deepstack layers included
    consumed, covered = got["marked"]
    torch.testing.assert_close(consumed[covered], pre[covered], rtol=1e-4, atol=1e-4)
    marked_err = (consumed[covered] - pre[covered]).abs().max()
    # unmarked: SGLang's own, post-deepstack (the same as pre-deepstack away from the image rows of layers < 3)
    consumed, covered = got["unmarked"]
    torch.testing.assert_close(consumed[covered], post[covered], rtol=1e-4, atol=1e-4)
    off = (consumed[image_rows][:, deepstack_cols] - pre[image_rows][:, deepstack_cols]).abs().max()
    assert off > 1e-2, off
    print(f"\nmarked vs HF pre-deepstack: max |diff| {marked_err:.2e}; unmarked vs pre at image rows of layers < 3: "
          f"{off:.3f} (post - pre there: {gap:.3f})")


ENGINE_SCRIPT = """
import json, sys
import sglang

if __name__ == "__main__":
    model, draft, image, text, out = sys.argv[1:6]
    engine = sglang.Engine(model_path=model, device="cpu", dtype="float32", max_total_tokens=16384,
                           max_running_requests=16, mem_fraction_static=0.5, speculative_algorithm="DFLASH",
                           speculative_draft_model_path=draft, log_level="info")
    try:
        result = engine.generate(prompt=text, image_data=[image],
                                 sampling_params={"max_new_tokens": 4, "temperature": 0.0})
    finally:
        engine.shutdown()
    with open(out, "w") as f:
        json.dump(result["meta_info"], f)
"""


@pytest.mark.server
def test_marked_draft_gets_pre_deepstack_from_sglang_engine(tiny, server_log_dir, tmp_path):
    """sglang.Engine(...) (the offline engine API: no command line, no prepare_server_args) with a marked
    draft: the draft consumes HF's pre-deepstack features."""
    import subprocess
    import sys

    from sglang_ext.demo.prompts import chat_prompt, make_image
    from support.plugin import plugin_env

    text, images = chat_prompt("What colour is the shape?", 1), [make_image(3)]
    draft = _copy_draft(tiny.draft_dense, tmp_path / "marked", PRE_DEEPSTACK)
    dump, image, out = tmp_path / "dump", tmp_path / "image.png", tmp_path / "meta_info.json"
    dump.mkdir()
    images[0].save(image)
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in (TARGET_FEATURES_ENV_VAR, ONLINE_ENV_VAR)}
    env.pop("TRITON_INTERPRET", None)
    env.update(plugin_env(dump_dir=dump), SGLANG_PLATFORM="torch_cpu")
    log_path = server_log_dir / "convention-engine.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(script), str(tiny.dense), str(draft), str(image), text, str(out)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=900)
    assert proc.returncode == 0, log_path.read_text()[-4000:]
    meta = json.loads(out.read_text())
    assert meta["spec_verify_ct"] > 0

    prompt, pre, post, layer_ids, H, deepstack_cols, gap = _hf_features(tiny, text, images)
    image_rows = prompt.is_vision
    consumed, covered = _consumed(dump, meta["id"], len(prompt.input_ids), len(layer_ids) * H)
    assert covered[image_rows].all() and covered.sum() > len(covered) // 2
    torch.testing.assert_close(consumed[covered], pre[covered], rtol=1e-4, atol=1e-4)
    off_post = (consumed[image_rows][:, deepstack_cols] - post[image_rows][:, deepstack_cols]).abs().max()
    assert off_post > 1e-2, off_post                                      # not SGLang's post-deepstack
