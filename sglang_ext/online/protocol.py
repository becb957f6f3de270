"""What crosses the process boundaries between the scheduler, the recorder and the trainer (no SGLang here):

    RecorderSpec    argv[1] of `python -m sglang_ext.online.recorder.process`: the ring and pipes it inherits, the
                    replay's target identity, and how to start the trainer (JSON)
    finished requests   scheduler -> recorder through the ring (sglang_ext/online/finished.py)
    TrainerSpec     argv[1] of `python -m sglang_ext.online.trainer.worker`: the trainer's settings, the target
                    and draft, the device (of this rank) and the inherited file descriptors (JSON, type-checked
                    both ways); a multi-device trainer is world_size such processes, $RANK / $MASTER_PORT apart
    records         recorder -> trainer: one `ReplayRecord` per message on the socket (`encode_record` /
                    `decode_record`); reports (poison, the step's records) come back on it
    weights+status  the shared `WeightSlot` (sglang_ext/online/swap/weight_slot.py)
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import typing
import uuid
from dataclasses import dataclass

import torch

from trainer.replay import ReplayRecord

TRAINER_MODULE = "sglang_ext.online.trainer.worker"   # python -m TRAINER_MODULE '<TrainerSpec JSON>'


@dataclass(frozen=True)
class TrainerSettings:
    """How the online trainer trains, guards and publishes (from OnlineTrainConfig.trainer_settings())."""
    lr: float = 6e-4                      # AdamW, constant after warmup
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8                   # records per step
    num_anchors: int = 64                 # DFlash blocks sampled per record
    gamma: float = 7.0                    # DFlash slot-weight decay
    max_seq_len: int = 4096               # records are cut to this many tokens
    pool_budget_bytes: int = 2 << 30      # feature bytes of the training pool (oldest records go first)
    min_records: int = 8                  # training starts once this many records arrived
    swap_every: int = 25                  # steps between candidates
    holdout_every: int = 5                # every n-th record goes to the guard's held-out slice
    holdout_records: int = 32             # size of that slice (most recent)
    guard_tolerance: float = 0.0          # publish if candidate tau >= live tau - tolerance
    threads: int = 1                      # torch CPU threads
    checkpoint_dir: str | None = None     # export each accepted version here
    keep_checkpoints: int = 3
    inbox_bytes: int = 256 << 20          # records received, not yet pooled (oldest dropped past it, counted)
    duty_cycle: float = 1.0               # fraction of wall time the trainer computes; it sleeps the rest
    max_memory_bytes: int | None = None   # cap of the trainer's CUDA allocator (None: no cap)
    replay_policy: str = "recency"        # how steps draw from the pool: recency | uniform
    recency_half_life: float = 64.0       # records: with "recency", a record this much older is half as likely
    run_id: str = ""                      # checkpoints go to checkpoint_dir/<run_id>/ (one per server start,
                                          # kept across trainer restarts); "" -> the trainer picks one


@dataclass(frozen=True)
class TrainerSpec:
    settings: TrainerSettings
    target_path: str                      # local HF target checkpoint (embed_tokens / lm_head are read)
    draft_path: str                       # the draft SGLang loaded (initial weights and config)
    draft_kind: str                       # trainer.draft_kind name, e.g. "dflash"
    block_size: int                       # tokens per verify step the server runs with
    device: str                           # "cpu", "cuda:N"
    slot_fd: int                          # the WeightSlot's memfd, inherited
    records_fd: int = -1                  # our end of the records socket, inherited
    slot_dtype: str = "float32"           # the slot's weight dtype: the live draft's (serving) dtype
    world_size: int = 1                   # ranks of the trainer group (--online-train-device list); this
                                          # process's rank is $RANK. Rank 0 alone gets records_fd and slot_fd
    seed: int | None = None               # seed of the batch / anchor draws (None: the process id)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainerSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"trainer spec: invalid JSON ({e})") from None
        return _from_dict(cls, data, "trainer spec")


@dataclass(frozen=True)
class RecorderSpec:
    """argv[1] of `python -m sglang_ext.online.recorder.process` (JSON). The online-train settings come in the
    environment ($SGLANG_EXT_ONLINE_TRAIN), as in every process of the server."""
    ring_fd: int                    # the ring (ring.Ring), inherited
    wake_fd: int                    # read end of the wake pipe: a byte per entry; EOF when the scheduler is gone
    target: dict                    # the replay's target identity (trainer.target.TargetIdentity as a dict) ...
    layer_ids: list                 # ... its feature layers, in column order
    hidden_size: int
    storage_dtype: str
    vocab_size: int                 # token ids of records must index the target's embedding
    labels: dict                    # the metrics' labels (model_name)
    trainer_spec: str = ""          # TrainerSpec JSON of rank 0 ("": capture only)
    trainer_devices: list | None = None
    trainer_command: list | None = None   # argv before the spec: [python, -m, <trainer module>]
    slot_layout: list | None = None       # the weight slot (its descriptor is the trainer spec's slot_fd)
    slot_dtype: str = "float32"
    ready_fd: int = -1                    # write end of a pipe: "ok <pid>" once up, or why it could not start
    alive_fd: int = -1                    # write end of its life pipe, held open until it exits (never written)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RecorderSpec":
        return cls(**json.loads(text))


def _from_dict(cls, data, where: str):
    """Build dataclass `cls` from a JSON dict, checking every field's type (no bool for int, no float for int,
    finite floats); errors name the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}.{f.name}: missing")
            continue
        values[f.name] = _check(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**values)


def _check(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    args = typing.get_args(tp)
    if args and type(None) in args:                      # X | None
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          str: isinstance(value, str), bool: isinstance(value, bool)}.get(tp)
    if not ok:
        raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return float(value) if tp is float else value


def new_run_id() -> str:
    """A server run's name, chosen once per server start (TrainerSettings.run_id): its checkpoints go to
    <checkpoint_dir>/<run id>/version-NNNNNN/, so runs (and servers sharing a directory) never prune each other."""
    return f"run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


# ---- records ------------------------------------------------------------------------------------------------

def encode_record(record: ReplayRecord) -> bytes:
    """A finished replay record -> one message to the trainer (what training needs, the request id and, when
    the replay buffer numbered it, its sequence number: how the trainer names a poison record)."""
    buf = io.BytesIO()
    msg = {"input_ids": record.input_ids, "features": record.features, "positions": record.positions,
           "loss_mask": record.loss_mask, "rid": str(record.meta.get("rid", ""))}
    if isinstance(record.meta.get("seq"), int):
        msg["seq"] = record.meta["seq"]
    torch.save(msg, buf)
    return buf.getvalue()


def decode_record(payload: bytes) -> ReplayRecord:
    d = torch.load(io.BytesIO(payload), weights_only=True)
    meta = {"rid": d["rid"], **({"seq": int(d["seq"])} if "seq" in d else {})}
    return ReplayRecord(input_ids=d["input_ids"].long(), features=d["features"], positions=d["positions"],
                        loss_mask=d["loss_mask"].bool(), meta=meta)


# ---- poison records -----------------------------------------------------------------------------------------
# A record that would fail or corrupt a training step is dropped where it is first seen (the replay buffer,
# before it is persisted or sent; the trainer again on arrival) and counted by reason
# (sglang:online_train_poison_records_total{reason}). A record whose step raised is dropped by the trainer,
# which reports its seq back on the records socket (`poison_report`), so a restarted trainer is not re-sent it.
# The trainer also reports the seqs of the batch of each step (`step_report`; [] once the step is over): a
# record in the batches of two trainer processes that died outright in a step (a signal, no exception to
# catch) is dropped by the supervisor as "crashed".
POISON_REASONS = ("token_id", "non_finite", "shape", "step_failed", "crashed")


def check_record(record: ReplayRecord, vocab_size: int | None, width: int | None = None) -> str | None:
    """Why `record` must not be trained on (a POISON_REASONS entry and what is wrong), or None when it is fine:
    consistent shapes and dtypes (input_ids [S], features [S, width], positions [3, S], loss_mask [S], S > 0),
    token ids in [0, vocab_size), finite features."""
    try:
        ids, feats, pos = record.input_ids, record.features, record.positions
        S = int(ids.shape[0]) if ids.dim() == 1 else -1
        if S <= 0:
            return f"shape: input_ids {list(ids.shape)}, expected one non-empty dimension"
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            return f"shape: input_ids dtype {ids.dtype} is not an integer type"
        want = {"features": (S, width if width is not None else (feats.shape[1] if feats.dim() == 2 else -1)),
                "positions": (3, S), "loss_mask": (S,)}
        for name, shape in want.items():
            got = tuple(getattr(record, name).shape)
            if got != shape:
                return f"shape: {name} {list(got)}, expected {list(shape)}"
        if not feats.is_floating_point():
            return f"shape: features dtype {feats.dtype} is not floating point"
        if pos.is_floating_point():
            return f"shape: positions dtype {pos.dtype} is not an integer type"
        if vocab_size is not None:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size:
                return f"token_id: ids span [{lo}, {hi}], outside the vocabulary [0, {vocab_size})"
        if not bool(torch.isfinite(feats).all()):
            return "non_finite: features hold NaN or Inf"
    except Exception as e:                 # anything odd about the tensors themselves is a bad shape too
        return f"shape: {type(e).__name__}: {e}"
    return None


def poison_report(seq: int | None, reason: str) -> bytes:
    """Trainer -> scheduler on the records socket: the record numbered `seq` was dropped for `reason`."""
    return json.dumps({"poison": seq, "reason": reason}).encode()


def step_report(seqs: list[int]) -> bytes:
    """Trainer -> scheduler: the seqs of the records in the step starting now ([]: the step is over)."""
    return json.dumps({"step": seqs}).encode()


def parse_report(payload: bytes) -> tuple[str, object]:
    """A trainer report -> ("poison", (seq, reason)) or ("step", [seqs])."""
    d = json.loads(payload)
    if isinstance(d, dict) and "step" in d:
        seqs = d["step"]
        if not isinstance(seqs, list) or not all(isinstance(x, int) for x in seqs):
            raise ValueError(f"step report: unexpected {d!r}")
        return "step", seqs
    seq = d.get("poison") if isinstance(d, dict) else None
    reason = d.get("reason") if isinstance(d, dict) else None
    if not (seq is None or isinstance(seq, int)) or reason not in POISON_REASONS:
        raise ValueError(f"poison report: unexpected {d!r}")
    return "poison", (seq, reason)


def record_nbytes(record: ReplayRecord) -> int:
    return record.features.numel() * record.features.element_size()


__all__ = ["TrainerSettings", "TrainerSpec", "encode_record", "decode_record", "record_nbytes", "check_record",
           "poison_report", "step_report", "parse_report", "POISON_REASONS", "new_run_id"]
