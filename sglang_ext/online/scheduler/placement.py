"""Where the trainer runs and whether it fits, decided in the scheduler process at startup (no SGLang here).

    resolve_trainer_devices   --online-train-device -> one device per trainer rank ("auto": the serving GPU, or cpu)
    trainer_memory_need       what the trainer will hold, from the checkpoints' shapes (nothing is loaded)
    check_group_memory        fail at startup, with the flag to change, when it does not fit

A server whose trainer cannot fit fails before it serves (scheduler/swap_applier.py calls these once).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sglang_ext.online.swap import weight_slot as ws
from trainer.draft_kind import get_kind
from trainer.target import target_info
from trainer.train_step import Precision


@dataclass(frozen=True)
class MemoryNeed:
    """What the trainer process holds on its device besides activations (bytes)."""
    trainable: int      # trained draft weights: fp32 master + gradient + AdamW m and v + the guard's live copy
    fixed: int          # the kind's fixed weights (e.g. EAGLE3's vocabulary maps), in the draft and the live copy
    target_head: int    # frozen embedding and lm_head of the target, in the compute dtype (once when tied)

    @property
    def total(self) -> int:
        return self.trainable + self.fixed + self.target_head

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"{self.total / gib:.2f} GiB (draft + gradients + AdamW + guard copy {self.trainable / gib:.2f}, "
                f"fixed weights {self.fixed / gib:.2f}, frozen embedding + lm_head {self.target_head / gib:.2f}; "
                f"activations come on top)")


def trainer_memory_need(draft_kind: str, draft_path: str, target_path: str, device: str) -> MemoryNeed:
    """The trainer's memory on `device`, from the checkpoints' shapes (nothing is loaded)."""
    kind = get_kind(draft_kind)
    fixed_names = kind.serving.fixed_weights
    trainable = ws.layout_numel(ws.draft_layout(draft_path, exclude=fixed_names))
    everything = ws.layout_numel(ws.draft_layout(draft_path))
    info = target_info(target_path)
    head = info.vocab_size * info.hidden_size * (1 if info.tie_word_embeddings else 2)
    dtype_bytes = torch.empty((), dtype=Precision.for_device(device).dtype).element_size()
    return MemoryNeed(trainable=20 * trainable, fixed=2 * 4 * (everything - trainable),
                      target_head=head * dtype_bytes)


def resolve_trainer_devices(cfg, serving_device) -> list[str]:
    """One device per trainer rank; a list's CUDA indices are checked against this process's GPUs."""
    devices = cfg.trainer_devices
    if devices == ["auto"]:
        dev = torch.device(serving_device)
        if dev.type != "cuda":
            return ["cpu"]
        return [f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"]   # the serving GPU
    if any(d.startswith("cuda") for d in devices):
        if not torch.cuda.is_available():
            raise ValueError(f"--online-train-device {cfg.trainer_device}: no CUDA device in this process")
        count = torch.cuda.device_count()
        missing = [d for d in devices if d != "cuda" and int(d.split(":")[1]) >= count]
        if missing:
            raise ValueError(f"--online-train-device {cfg.trainer_device}: {', '.join(missing)} out of range, "
                             f"this process sees {count} GPU(s) (cuda:0..cuda:{count - 1}; CUDA_VISIBLE_DEVICES "
                             f"renumbers them)")
    return devices


def check_group_memory(need, devices: list[str], max_memory: int | None, free_fn=None) -> None:
    """`check_trainer_memory` for every device of a trainer group; ranks sharing host memory (cpu entries)
    are checked together: their needs add up."""
    free_fn = free_fn or device_free_bytes
    for device in dict.fromkeys(devices):
        ranks = devices.count(device)
        if ranks == 1:
            check_trainer_memory(need, device, max_memory, free_fn(device))
            continue
        total = dataclasses.replace(need, trainable=need.trainable * ranks, fixed=need.fixed * ranks,
                                    target_head=need.target_head * ranks)
        check_trainer_memory(total, f"{device} ({ranks} trainer ranks)",
                             None if max_memory is None else max_memory * ranks, free_fn(device))


def device_free_bytes(device: str) -> int | None:
    """Free memory on `device` now (CUDA: after SGLang's pools; CPU: MemAvailable); None when unknown."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return mem_available_bytes()


def mem_available_bytes() -> int | None:
    """The kernel's MemAvailable (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_trainer_memory(need, device: str, max_memory: int | None, free: int | None) -> None:
    """Fail at startup when the trainer cannot fit: its need (`MemoryNeed`) over the budget
    (--online-train-max-memory), or the budget (default: the need) over what is free on its device."""
    gib = 2 ** 30
    if max_memory is not None and need.total > max_memory:
        raise ValueError(f"--online-train: the trainer needs about {need.describe()}, over --online-train-max-memory "
                         f"{max_memory / gib:.2f} GiB: raise --online-train-max-memory, or train elsewhere "
                         f"(--online-train-device), or serve a smaller draft")
    budget = max_memory if max_memory is not None else need.total
    if free is not None and budget > free:
        what = (f"--online-train-max-memory {max_memory / gib:.2f} GiB" if max_memory is not None
                else f"the trainer's need, about {need.describe()},")
        raise ValueError(f"--online-train: {what} is more than the {free / gib:.2f} GiB free on {device} after "
                         f"SGLang's pools: lower --mem-fraction-static (if the trainer shares the serving GPU), "
                         f"lower --online-train-max-memory, or move the trainer with --online-train-device "
                         f"(cpu or another cuda:N)")
