"""trainer.train_step: the one training step finetune and the online trainer share; its precision choice (bf16
autocast through the Triton kernel on CUDA, fp32 on CPU) and its handling of non-finite losses and gradients."""
import json
import os

import pytest
import torch

import trainer.finetune as finetune
from sglang_ext.online.swap import weight_slot as ws
from sglang_ext.online.config import OnlineTrainConfig
from sglang_ext.online.protocol import TrainerSpec
from sglang_ext.online.trainer.worker import OnlineTrainer
from support.synthetic import synthetic_records, tiny_draft_config, write_tiny_target
from trainer.draft_kind import get_kind
from trainer.replay import ReplaySpec, write_replay
from trainer.target import load_target_head, target_identity
from trainer.train_step import Precision, TrainStep, pad_batch

KIND = get_kind("dflash")


@pytest.fixture
def setup(tmp_path):
    """A tiny target, a from-scratch DFlash draft for it (exported), and replay shards of its 2 feature layers."""
    target = write_tiny_target(tmp_path / "target", hidden_size=64, num_layers=4, vocab_size=300)
    cfg = tiny_draft_config(hidden_size=64, target_layer_ids=(1, 2))
    KIND.from_scratch(cfg, seed=0).export(tmp_path / "draft", dtype=torch.float32)
    records = synthetic_records(12, num_layers=2, hidden_size=64)
    write_replay(tmp_path / "replay", ReplaySpec(target_identity(target), (1, 2), 64, "bfloat16"), records)
    return tmp_path, records


def _step(d, precision: Precision):
    draft = KIND.from_pretrained(d / "draft")
    embed, lm_head, _ = load_target_head(d / "target", dtype=precision.dtype)
    draft.attach_target(embed, lm_head)
    return TrainStep(KIND, draft, precision, lr=1e-3, objective={"num_anchors": 4})


def test_precision_defaults():
    cuda = Precision.for_device("cuda")
    assert cuda.dtype == torch.bfloat16 and cuda.kernel == "triton"       # bf16 tiles of spec_kernels on a GPU
    cpu = Precision.for_device("cpu")
    assert cpu.dtype == torch.float32 and cpu.kernel == "reference"
    assert Precision.for_device("cpu", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown attention backend"):
        Precision.for_device("cpu", attention_backend="flash")


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
def test_bf16_step_runs_the_triton_kernel_on_bf16_inputs(setup, monkeypatch):
    """What a CUDA step does (bf16 autocast + the Triton kernel), on this machine's device."""
    import spec_kernels.dflash_attention as kernel

    d, records = setup
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = _step(d, Precision.for_device(device, torch.bfloat16, "auto" if device == "cuda" else "triton"))
    step.draft.to(device)
    seen = []
    real = kernel.BlockAttentionFunction.apply
    monkeypatch.setattr(kernel.BlockAttentionFunction, "apply",
                        lambda q, *a: seen.append(q.dtype) or real(q, *a))
    stats = step.run([pad_batch(records[:2], 64)], generators=[torch.Generator().manual_seed(0)])
    assert stats.applied and stats.loss == stats.loss
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in step.draft.parameters()} == {torch.float32}     # fp32 master weights


def test_non_finite_loss_or_gradient_is_not_applied(setup):
    d, records = setup
    step = _step(d, Precision.for_device("cpu"))
    before = {k: v.clone() for k, v in step.draft.state_dict().items()}
    bad = pad_batch(records[:2], 64)
    bad.target_hidden[0, 3] = float("nan")
    stats = step.run([bad])
    assert not stats.applied and stats.skipped == "loss is nan"
    hook = step.draft.fc.weight.register_hook(lambda g: g * float("inf"))
    stats = step.run([pad_batch(records[:2], 64)])
    hook.remove()
    assert not stats.applied and stats.skipped.startswith("gradient norm is")
    assert all(torch.equal(before[k], v) for k, v in step.draft.state_dict().items())
    assert all(p.grad is None for p in step.draft.parameters())
    stats = step.run([pad_batch(records[:2], 64), pad_batch(records[2:4], 64)])    # two micro-batches
    assert stats.applied and len(stats.micro_losses) == 2 and stats.tokens == sum(len(r) for r in records[:4])
    assert not all(torch.equal(before[k], v) for k, v in step.draft.state_dict().items())


def test_finetune_and_the_online_trainer_run_the_same_step(setup, monkeypatch):
    d, records = setup
    calls = []
    real = TrainStep.run

    def spy(self, batches, **kw):
        calls.append(type(self.draft).__name__)
        return real(self, batches, **kw)

    monkeypatch.setattr(TrainStep, "run", spy)
    finetune.main(["--replay", str(d / "replay"), "--target-model-path", str(d / "target"), "--draft-model-path",
                   str(d / "draft"), "--output", str(d / "out"), "--batch-size", "4", "--num-anchors", "4",
                   "--max-steps", "2", "--no-progress"])
    assert len(calls) == 2

    slot = ws.WeightSlot.create(ws.draft_layout(d / "draft"))
    try:
        cfg = OnlineTrainConfig(enabled=True, batch_size=2, num_anchors=4)
        spec = TrainerSpec(settings=cfg.trainer_settings(), target_path=str(d / "target"),
                           draft_path=str(d / "draft"), draft_kind="dflash", block_size=4, device="cpu",
                           slot_fd=os.dup(slot.fd))
        trainer = OnlineTrainer(spec)
        for r in records:
            trainer.inbox.put(r)
        trainer.drain()
        stats = trainer.train_once()
        assert stats.applied and trainer.step == 1 and slot.header.steps == 1
        assert isinstance(trainer.step_fn, TrainStep)
    finally:
        slot.close()
    assert calls == ["DFlashDraft"] * 3
    summary = json.loads((d / "out" / "training_summary.json").read_text())
    assert summary["draft_kind"] == "dflash" and summary["steps"] == 2
