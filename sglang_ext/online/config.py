"""`--online-train` settings: one dataclass, its argparse group, parsing and validation.

SGLang's ServerArgs has no API for new flags and `ServerArgs.from_cli_args` keeps declared fields only, so
the flags are added to SGLang's own parser (for `--help` and `--config` files) and read back from argv by
`sglang_ext.online.flags`. The parsed settings travel to the scheduler processes in the environment
variable below (children inherit the launcher's environment) and as `server_args._online_train`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ENV_VAR = "SGLANG_EXT_ONLINE_TRAIN"
# A request whose `custom_params` (SGLang's per-request field: /generate `sampling_params.custom_params`, the
# OpenAI APIs' `custom_params`) holds {OPT_OUT_KEY: true} is served as usual and never recorded or trained on.
OPT_OUT_KEY = "online_train_opt_out"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class OnlineTrainConfigError(ValueError):
    pass


def parse_size(text: str | int, what: str, allow_zero: bool = False) -> int:
    """'512MB', '2GiB', '1000000' -> bytes (allow_zero: also 0, '0' or 'off')."""
    if allow_zero and str(text).strip().lower() in ("0", "off"):
        return 0
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2) is None and not m.group(1):
            raise OnlineTrainConfigError(f"{what}: cannot parse size {text!r} (examples: 512MB, 2GiB, 1000000)")
        unit = (m.group(2) or "").lower()
        if unit not in _UNITS:
            raise OnlineTrainConfigError(f"{what}: unknown unit in {text!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OnlineTrainConfigError(f"{what} must be positive, got {text!r}")
    return value


# --online-train-learn-from values: all requests; text (no multimodal input); those with at least one image / video;
# those with any multimodal input (image, video or audio).
LEARN_FROM = ("all", "text", "image", "video", "multimodal")


@dataclass
class OnlineTrainConfig:
    enabled: bool = False
    replay_budget_bytes: int = 2 * 2**30         # in-memory replay buffer; oldest records are dropped past it
    persist_dir: str | None = None               # write finished records as replay shards here (mode 0600)
    storage_dtype: str = "bf16"                  # bf16 | fp8 (e4m3 + per-token scale) for persisted shards
    learn_from: str = "all"                      # all | text | image | video | multimodal (LEARN_FROM)
    sample_rate: float = 1.0                     # fraction of eligible requests recorded
    include_prompt_loss: bool = False            # loss mask over prompt tokens too (else generated only)
    max_record_tokens: int = 32768               # longer requests are dropped (counted), never truncated
    shard_tokens: int = 65536                    # tokens per persisted shard
    shard_seconds: float = 300.0                 # ... or a shard once the oldest waiting record is this old
    persist_max_bytes: int = 0                   # retention: oldest shards of persist_dir deleted past it (0: off)
    prefix_store_bytes: int = 0                  # features of recorded prefixes, to fill radix-cache hits (0: off)
    prefix_fill: str = "auto"                    # radix-cache hits of records: auto (from the feature pool where the
                                                 # draft KV serving reads is of the live version) | off (gaps, or the
                                                 # prefix store)
    feature_pool: str = "auto"                   # the device feature pool beside the KV cache: auto (a row per KV
                                                 # slot) or a size in bytes (rows shared by slots; overwritten: gaps)
    malloc_trim_seconds: float = 60.0            # the replay thread gives freed heap pages back this often (0: off)
    # -- the co-located trainer (part 2) --
    trainer: bool = True                         # False: capture only (no trainer process, no swaps)
    trainer_device: str = "auto"                 # auto (the serving device) | cpu | cuda | cuda:N, or a list
                                                 # "cuda:1,cuda:2" / "cpu,cpu": one DDP trainer rank per entry
    trainer_threads: int = 1                     # torch CPU threads of the trainer process
    lr: float = 6e-4                             # AdamW peak learning rate (constant after warmup)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8                          # records per training step
    num_anchors: int = 64                        # blocks sampled per record
    gamma: float = 7.0                           # slot-weight decay of the DFlash loss
    max_seq_len: int = 4096                      # records are cut to this many tokens for training
    min_records: int = 8                         # training starts once this many records arrived
    swap_every: int = 25                         # training steps between candidate publications
    holdout_every: int = 5                       # every n-th record goes to the guard's held-out slice
    holdout_records: int = 32                    # size of that slice (most recent)
    guard_tolerance: float = 0.0                 # swap if candidate tau >= live tau - tolerance
    checkpoint_dir: str | None = None            # export each accepted version here (SGLang draft format)
    keep_checkpoints: int = 3                    # accepted versions kept in checkpoint_dir
    heartbeat_timeout_s: float = 60.0            # a trainer silent this long is reported down, killed, restarted
    queue_bytes: int = 256 * 2**20               # bound of each queue between the stages (oldest dropped, counted)
    duty_cycle: float = 1.0                      # fraction of wall time the trainer may compute (sleeps the rest)
    max_memory_bytes: int | None = None          # the trainer's memory budget on its device (None: what is free)
    replay_policy: str = "recency"               # recency | uniform: how training steps draw from the pool
    recency_half_life: float = 64.0              # records (recency policy)
    rollback_steps: int = 200                    # verify steps a swapped-in version is watched (0: no rollback)
    rollback_tolerance: float = 0.25             # rolled back if its mean accept length is lower than the
                                                 # previous version's over its last rollback_steps by more
    # -- set at startup, not a setting: the draft's kind (trainer.draft_kind), from its config.json --
    draft_kind: str = ""

    def trainer_settings(self):
        """The part of this config the trainer process needs (sglang_ext.online.protocol.TrainerSettings)."""
        from sglang_ext.online.protocol import TrainerSettings
        return TrainerSettings(
            lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            batch_size=self.batch_size, num_anchors=self.num_anchors, gamma=self.gamma, max_seq_len=self.max_seq_len,
            pool_budget_bytes=self.replay_budget_bytes, min_records=self.min_records, swap_every=self.swap_every,
            holdout_every=self.holdout_every, holdout_records=self.holdout_records,
            guard_tolerance=self.guard_tolerance, threads=self.trainer_threads, checkpoint_dir=self.checkpoint_dir,
            keep_checkpoints=self.keep_checkpoints, inbox_bytes=self.queue_bytes, duty_cycle=self.duty_cycle,
            max_memory_bytes=self.max_memory_bytes, replay_policy=self.replay_policy,
            recency_half_life=self.recency_half_life)

    def validate(self) -> "OnlineTrainConfig":
        check_field_types(self)
        if self.storage_dtype not in ("bf16", "fp8"):
            raise OnlineTrainConfigError(f"online-train storage_dtype must be bf16 or fp8, got {self.storage_dtype!r}")
        if self.learn_from not in LEARN_FROM:
            raise OnlineTrainConfigError(f"online-train learn_from must be one of {', '.join(LEARN_FROM)}, got "
                                         f"{self.learn_from!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise OnlineTrainConfigError(f"online-train sample_rate must be in (0, 1], got {self.sample_rate}")
        for name in ("replay_budget_bytes", "max_record_tokens", "shard_tokens", "trainer_threads", "batch_size",
                     "num_anchors", "max_seq_len", "min_records", "swap_every", "holdout_every", "holdout_records",
                     "keep_checkpoints"):
            if int(getattr(self, name)) <= 0:
                raise OnlineTrainConfigError(f"online-train {name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "gamma", "heartbeat_timeout_s", "queue_bytes"):
            if not float(getattr(self, name)) > 0:
                raise OnlineTrainConfigError(f"online-train {name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "guard_tolerance", "prefix_store_bytes",
                     "persist_max_bytes"):
            if float(getattr(self, name)) < 0:
                raise OnlineTrainConfigError(f"online-train {name} must be >= 0, got {getattr(self, name)}")
        if self.prefix_fill not in ("auto", "off"):
            raise OnlineTrainConfigError(f"--online-train-prefix-fill must be auto or off, got {self.prefix_fill!r}")
        if self.feature_pool != "auto":
            parse_size(self.feature_pool, "--online-train-feature-pool")
        if not 0 < float(self.shard_seconds) < float("inf"):
            raise OnlineTrainConfigError(f"--online-train-shard-seconds must be a positive number of seconds, "
                                         f"got {self.shard_seconds}")
        if not 0 <= float(self.malloc_trim_seconds) < float("inf"):
            raise OnlineTrainConfigError(f"--online-train-malloc-trim-seconds must be a number of seconds >= 0 "
                                         f"(0: off), got {self.malloc_trim_seconds}")
        if self.replay_policy not in ("uniform", "recency"):
            raise OnlineTrainConfigError(f"--online-train-replay-policy must be uniform or recency, "
                                         f"got {self.replay_policy!r}")
        if not float(self.recency_half_life) > 0:
            raise OnlineTrainConfigError(f"online-train recency_half_life must be positive, "
                                         f"got {self.recency_half_life}")
        for name, flag in (("rollback_steps", "--online-train-rollback-steps"),
                           ("rollback_tolerance", "--online-train-rollback-tolerance")):
            if not float(getattr(self, name)) >= 0:
                raise OnlineTrainConfigError(f"{flag} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < float(self.duty_cycle) <= 1.0:
            raise OnlineTrainConfigError(f"--online-train-duty-cycle must be in (0, 1], got {self.duty_cycle}")
        if self.max_memory_bytes is not None and int(self.max_memory_bytes) <= 0:
            raise OnlineTrainConfigError(f"--online-train-max-memory must be positive, got {self.max_memory_bytes}")
        self.trainer_device = ",".join(self._check_devices())
        for name in ("persist_dir", "checkpoint_dir"):
            if getattr(self, name) is not None:
                self._check_dir(name)
        return self

    @property
    def trainer_devices(self) -> list[str]:
        """--online-train-device as a list: one entry per trainer rank (one entry: a single trainer process)."""
        value = self.trainer_device              # a config file may give a JSON list
        return [str(d).strip() for d in (value if isinstance(value, (list, tuple)) else str(value).split(","))]

    def _check_devices(self) -> list[str]:
        """The trainer's devices, checked as far as can be without touching CUDA (the index range is checked in
        the scheduler process, sglang_ext.online.scheduler.placement.resolve_trainer_devices)."""
        devices = self.trainer_devices
        given = ",".join(devices)
        flag = "--online-train-device"
        for d in devices:
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", d):
                raise OnlineTrainConfigError(f"{flag} must be auto, cpu, cuda or cuda:N, or a comma-separated list "
                                             f"of cpu or cuda:N entries (one trainer rank each), got {given!r}")
        if len(devices) == 1:
            return devices
        if "auto" in devices:
            raise OnlineTrainConfigError(f"{flag} {given}: auto stands alone; list the devices of the trainer "
                                         f"ranks (e.g. cuda:1,cuda:2 or cpu,cpu)")
        if "cuda" in devices:
            raise OnlineTrainConfigError(f"{flag} {given}: name each GPU of a list as cuda:N")
        if len({d.split(":")[0] for d in devices}) > 1:
            raise OnlineTrainConfigError(f"{flag} {given}: mixes cpu and cuda; the trainer ranks are one DDP "
                                         f"group (gloo on cpu, nccl on cuda), all cpu or all cuda:N")
        repeated = sorted({d for d in devices if d != "cpu" and devices.count(d) > 1})
        if repeated:
            raise OnlineTrainConfigError(f"{flag} {given}: {', '.join(repeated)} listed more than once (one trainer "
                                         f"rank per GPU; repeat only cpu, for gloo ranks on this host)")
        if not self.trainer:
            raise OnlineTrainConfigError(f"{flag} {given} ({len(devices)} trainer ranks) with "
                                         f"--online-train-capture-only: capture only starts no trainer")
        return devices

    def _check_dir(self, name: str) -> None:
        flag = "--online-train-" + name.replace("_", "-")
        path = Path(getattr(self, name))
        if path.exists() and not path.is_dir():
            raise OnlineTrainConfigError(f"{flag} {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise OnlineTrainConfigError(f"{flag} {path}: cannot create ({e})") from e
        if not os.access(path, os.W_OK):
            raise OnlineTrainConfigError(f"{flag} {path} is not writable")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "OnlineTrainConfig | None":
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return None
        return cls(**json.loads(raw))

    @classmethod
    def from_file(cls, path: str) -> dict:
        """Keys of a JSON config file (same names as the dataclass fields)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise OnlineTrainConfigError(f"--online-train-config {p}: no such file") from None
        except json.JSONDecodeError as e:
            raise OnlineTrainConfigError(f"--online-train-config {p}: invalid JSON ({e})") from None
        except (OSError, UnicodeDecodeError, RecursionError) as e:     # a directory, unreadable, not text, too deep
            raise OnlineTrainConfigError(f"--online-train-config {p}: cannot read it ({type(e).__name__}: "
                                         f"{e})") from None
        if not isinstance(data, dict):
            raise OnlineTrainConfigError(f"--online-train-config {p}: expected a JSON object")
        known = {f.name for f in fields(cls)} - {"enabled", "draft_kind"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OnlineTrainConfigError(f"--online-train-config {p}: unknown key(s) {unknown}; known: {sorted(known)}")
        return data


_FLAG_TO_FIELD = {"online_train_replay_budget": "replay_budget_bytes", "online_train_persist_dir": "persist_dir",
                  "online_train_storage_dtype": "storage_dtype", "online_train_learn_from": "learn_from",
                  "online_train_sample_rate": "sample_rate",
                  "online_train_include_prompt_loss": "include_prompt_loss",
                  "online_train_max_record_tokens": "max_record_tokens",
                  "online_train_device": "trainer_device", "online_train_threads": "trainer_threads",
                  "online_train_lr": "lr", "online_train_batch_size": "batch_size",
                  "online_train_num_anchors": "num_anchors", "online_train_swap_every": "swap_every",
                  "online_train_min_records": "min_records", "online_train_holdout_every": "holdout_every",
                  "online_train_checkpoint_dir": "checkpoint_dir",
                  "online_train_keep_checkpoints": "keep_checkpoints",
                  "online_train_heartbeat_timeout": "heartbeat_timeout_s",
                  "online_train_max_memory": "max_memory_bytes", "online_train_duty_cycle": "duty_cycle",
                  "online_train_queue_bytes": "queue_bytes", "online_train_prefix_store": "prefix_store_bytes",
                  "online_train_feature_pool": "feature_pool", "online_train_prefix_fill": "prefix_fill",
                  "online_train_shard_seconds": "shard_seconds",
                  "online_train_persist_max_bytes": "persist_max_bytes",
                  "online_train_malloc_trim_seconds": "malloc_trim_seconds",
                  "online_train_replay_policy": "replay_policy",
                  "online_train_rollback_steps": "rollback_steps",
                  "online_train_rollback_tolerance": "rollback_tolerance"}


def supported_algorithms() -> list[str]:
    """--speculative-algorithm values whose drafts --online-train can train: one per draft kind whose live
    features the online path can capture."""
    from trainer.draft_kind import kinds
    return sorted({kind.serving.algorithm for kind in kinds().values() if kind.serving.capture})


def check_server_args(cfg: OnlineTrainConfig, server_args) -> None:
    """Fail at startup, not at the first request."""
    algo = getattr(server_args, "speculative_algorithm", None)
    supported = supported_algorithms()
    if algo is None or str(algo).upper() not in supported:
        raise OnlineTrainConfigError(
            f"--online-train needs --speculative-algorithm {' or '.join(supported)} "
            f"(got {algo!r}): it trains the speculative draft")
    if not getattr(server_args, "speculative_draft_model_path", None):
        raise OnlineTrainConfigError("--online-train needs --speculative-draft-model-path (the draft to train)")
    # One learner per server: it runs on TP rank 0 (the others follow its swaps). Data-parallel replicas or
    # pipeline stages would each start their own, or see only part of the model: refused until supported.
    for flag, attr in (("--dp-size", "dp_size"), ("--attn-dp-size", "attn_dp_size"), ("--pp-size", "pp_size")):
        if int(getattr(server_args, attr, 1) or 1) > 1:
            raise OnlineTrainConfigError(f"--online-train does not support {flag} > 1 yet (got "
                                         f"{getattr(server_args, attr)}): serve with --tp only, or run one server "
                                         f"per replica")
    if getattr(server_args, "enable_dp_attention", False):
        raise OnlineTrainConfigError("--online-train does not support --enable-dp-attention (--attn-dp-size > 1) "
                                     "yet: serve with --tp only")


# ---- typed values (issue 14): every setting checked against its dataclass field's type ----------------------
# A JSON config file gives JSON types; the command line gives what argparse made of a flag (int / float / str,
# True for a switch). A boolean is only a JSON boolean or a switch, an integer only an integer (not a boolean,
# a float or a numeric string), a number finite; fields named *_bytes also take size strings ("512MB").

_KIND_OF = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
            (dict, "an object"))


@dataclass(frozen=True)
class FieldType:
    base: str              # bool | int | float | str
    optional: bool         # None (JSON null) allowed
    size: bool             # a byte count (field name *_bytes): also a size string; positive (or 0 if the default)

    def describe(self) -> str:
        words = {"bool": "a boolean (JSON true or false)", "int": "an integer", "float": "a finite number",
                 "str": "a string"}[self.base]
        if self.size:
            words = 'a size (an integer byte count, or a string such as "512MB" or "2GiB")'
        return words + (" or null" if self.optional else "")


def field_type(name: str) -> FieldType:
    """The type of OnlineTrainConfig.<name>, from its annotation ('int', 'str | None', ...)."""
    annotation = {f.name: f.type for f in fields(OnlineTrainConfig)}[name]
    parts = [p.strip() for p in str(annotation).split("|")]
    base = next(p for p in parts if p != "None")
    if base not in ("bool", "int", "float", "str"):
        raise TypeError(f"OnlineTrainConfig.{name}: unsupported annotation {annotation!r}")
    return FieldType(base, "None" in parts, base == "int" and name.endswith("_bytes"))


_DEFAULTS = {f.name: f.default for f in fields(OnlineTrainConfig)}


def _shown(value) -> str:
    """A value as the user wrote it, and its type: '"false" (a string)', '8.7 (a number)', 'null'."""
    if value is None:
        return "null"
    kind = next((word for t, word in _KIND_OF if isinstance(value, t)), type(value).__name__)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return f"{text} ({kind})"


def check_value(name: str, value, where: str):
    """`value` for OnlineTrainConfig.<name> if its type is right, normalised (size strings -> bytes, integers
    of float fields -> float, a device list -> "a,b"); else OnlineTrainConfigError naming `where` (the flag, or
    the config file and key), the value and the expected type."""
    t = field_type(name)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None:
        if t.optional:
            return None
    elif t.base == "bool":
        if isinstance(value, bool):
            return value
    elif t.size:
        if isinstance(value, str) or is_int:                # 0 only where the default is 0 ("0: off")
            return parse_size(value, where, allow_zero=_DEFAULTS.get(name) == 0)
    elif t.base == "int":
        if is_int:
            return value
    elif t.base == "float":
        if is_int or isinstance(value, float):
            if not math.isfinite(value):
                raise OnlineTrainConfigError(f"{where} must be a finite number, got {_shown(value)}")
            return float(value)
    elif isinstance(value, str):
        return value
    elif name == "trainer_device" and isinstance(value, (list, tuple)) and value \
            and all(isinstance(d, str) for d in value):
        return ",".join(value)                                      # a config file may list the devices
    raise OnlineTrainConfigError(f"{where} must be {t.describe()}, got {_shown(value)}")


def _flag_of(name: str) -> str | None:
    return next(("--" + flag.replace("_", "-") for flag, f in _FLAG_TO_FIELD.items() if f == name), None)


def config_key_label(path, key: str) -> str:
    """How an error names a key of --online-train-config FILE (and the flag that sets the same field)."""
    flag = _flag_of(key)
    return f"--online-train-config {path}: key {key!r}" + (f" (flag {flag})" if flag else "")


def check_field_types(cfg: OnlineTrainConfig) -> None:
    """Every field of `cfg` through check_value (settings built in code, or from the environment)."""
    for f in fields(cfg):
        where = _flag_of(f.name) or f"online-train {f.name}"
        setattr(cfg, f.name, check_value(f.name, getattr(cfg, f.name), where))


def check_device_indexes(cfg: OnlineTrainConfig, device_count: int | None = None) -> None:
    """At startup, in the launcher: every cuda / cuda:N of --online-train-device exists here
    (`device_count`: torch.cuda.device_count(), which honours CUDA_VISIBLE_DEVICES as the scheduler will)."""
    cuda = [d for d in cfg.trainer_devices if d.startswith("cuda")]
    if not cuda:
        return
    if device_count is None:
        import torch
        device_count = torch.cuda.device_count()
    missing = [d for d in cuda if device_count == 0 or (d != "cuda" and int(d.split(":")[1]) >= device_count)]
    if missing:
        have = f"this machine has {device_count} CUDA device{'' if device_count == 1 else 's'}"
        if device_count:
            have += f" (cuda:0..cuda:{device_count - 1}; CUDA_VISIBLE_DEVICES renumbers them)"
        raise OnlineTrainConfigError(f"--online-train-device {cfg.trainer_device}: {', '.join(missing)} is not "
                                     f"there, {have}")
