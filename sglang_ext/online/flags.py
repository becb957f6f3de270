"""The `--online-train*` flags on SGLang's command line (`python -m sglang.launch_server ... --online-train`).

    add_arguments(parser)           our flags, in their own group of SGLang's --help
    parse_argv(argv)                a launch command line -> OnlineTrainConfig (None without --online-train)
    argv_with_sglang_config(argv)   the same keys in SGLang's own --config FILE.yaml, merged as SGLang merges them

Parsed once in the launching process; its children read the result from $SGLANG_EXT_ONLINE_TRAIN (config.py).
"""
from __future__ import annotations

import argparse

from sglang_ext.online.config import (_FLAG_TO_FIELD, LEARN_FROM, OnlineTrainConfig, OnlineTrainConfigError,
                                      check_value, config_key_label, parse_size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sglang-ext online training",
                                  "Learn the speculative draft from live traffic (sglang-ext plugin).")
    g.add_argument("--online-train", action="store_true",
                   help="capture the target's pre-deepstack hidden states of live requests into a replay buffer "
                        "and train the served draft from them (needs --speculative-algorithm DFLASH with a "
                        "DFlash draft, or EAGLE3 with an EAGLE3 draft; EAGLE3 unrolls as many draft steps as "
                        "--speculative-num-steps)")
    g.add_argument("--online-train-config", metavar="FILE",
                   help="JSON file with online-train settings, keys named as the fields of "
                        "sglang_ext.online.config.OnlineTrainConfig (e.g. replay_budget_bytes, persist_dir, lr, "
                        "swap_every, guard_tolerance, weight_decay, warmup_steps, max_seq_len); command-line "
                        "flags override it. Values are typed as the fields: booleans are JSON true/false, "
                        "integers are integers (not 8.0 or \"8\"), numbers are finite, *_bytes take an "
                        "integer or a size string (\"512MB\"); anything else stops the launch naming the key. "
                        "The online-train-* keys of SGLang's --config YAML are the same flags (the command "
                        "line wins over them, they over this file)")
    g.add_argument("--online-train-replay-budget", metavar="SIZE",
                   help="bytes of captured features kept in memory, e.g. 512MB or 2GiB (default 2GiB); "
                        "the oldest records are dropped past it, and counted")
    g.add_argument("--online-train-persist-dir", metavar="DIR",
                   help="also write finished records as replay shards (trainer/finetune.py reads them); "
                        "files are created with mode 0600")
    g.add_argument("--online-train-storage-dtype", choices=["bf16", "fp8"],
                   help="dtype of persisted features: bf16, or fp8 e4m3 with a per-token scale (default bf16)")
    g.add_argument("--online-train-shard-seconds", type=float, metavar="SECONDS",
                   help="with --online-train-persist-dir: records wait in memory until a shard holds shard_tokens "
                        "tokens (default 65536) or the oldest waited this long (default 300), then one shard is "
                        "written (or once their features hold half the replay budget, at most 64MiB, at most a "
                        "quarter of --online-train-persist-max-bytes); a failed write is retried, the "
                        "records kept (bounded by the replay budget; past it the oldest are counted as lost, "
                        "sglang:online_train_persist_lost_records_total). Records still "
                        "waiting when the server is killed are lost")
    g.add_argument("--online-train-persist-max-bytes", metavar="SIZE",
                   help="retention of --online-train-persist-dir, e.g. 200GiB: after each shard the oldest shards "
                        "are deleted until the directory fits, shards and listing files (manifest, journals) "
                        "together (counted in sglang:online_train_persist_pruned_*_total); shards are then at "
                        "most a quarter of it (in feature bytes); default 0: unlimited")
    g.add_argument("--online-train-malloc-trim-seconds", type=float, metavar="SECONDS",
                   help="how often the replay buffer's thread hands freed heap pages back to the OS (glibc "
                        "malloc_trim; records freed oldest first otherwise leave the scheduler's RSS creeping up); "
                        "a call holds each malloc arena's lock while it walks it, about 12 ms in the CPU soak "
                        "(sglang:online_train_malloc_trim_seconds_total); default 60, 0: off")
    g.add_argument("--online-train-learn-from", choices=list(LEARN_FROM),
                   help="which requests to record, by the inputs SGLang received with them: all (default); text: "
                        "no image, video or audio; image: at least one image; video: at least one video; "
                        "multimodal: at least one image, video or audio (a request with both an image and a "
                        "video counts as image, video and multimodal)")
    g.add_argument("--online-train-sample-rate", type=float, metavar="P",
                   help="record this fraction of eligible requests (default 1.0)")
    g.add_argument("--online-train-include-prompt-loss", action="store_true", default=None,
                   help="put prompt tokens in the loss mask too (default: generated tokens only)")
    g.add_argument("--online-train-max-record-tokens", type=int, metavar="N",
                   help="requests longer than N tokens are not recorded (counted as dropped; default 32768)")
    g.add_argument("--online-train-prefix-store", metavar="SIZE",
                   help="bytes of recorded features kept by token prefix, e.g. 256MiB (default 0: off): a "
                        "prompt prefix served from SGLang's radix cache (a chat's earlier turns, a shared system "
                        "prompt) is not recomputed; by default its rows come from the feature pool (capture only, "
                        "and the trainer without --tp, whose draft KV is refreshed after swaps); elsewhere "
                        "(--tp with the trainer), and for rows a smaller pool lost, they are "
                        "filled from here; rows not found stay gaps (zero features, out of the loss), counted in "
                        "sglang:online_train_prefix_rows_total. Off by default: without the refresh, the draft KV "
                        "of cached prefixes comes from older draft versions after a hot swap, so serving does not "
                        "see what the filled rows teach")
    g.add_argument("--online-train-prefix-fill", choices=["auto", "off"],
                   help="radix-cache hits of a record (a chat's earlier turns, a shared system prompt: not "
                        "recomputed for it): auto (default) fills them from the feature pool, with the rows the "
                        "live draft was fed when the prefix was computed, wherever the draft KV serving reads there "
                        "is of the live version (capture only; the trainer without --tp: its draft KV is refreshed "
                        "after swaps); off leaves them to --online-train-prefix-store, else gaps")
    g.add_argument("--online-train-feature-pool", metavar="SIZE",
                   help="the feature pool on the serving device, beside SGLang's KV cache: the target features fed "
                        "to the live draft, one row per KV slot, written by one device op per forward and read once "
                        "when a request finishes (default auto: a row for every KV slot, so the features of a "
                        "radix-cached prefix live as long as its KV; about width x 2 bytes per KV token). A size "
                        "(e.g. 1GiB) makes slots share rows: a position whose row was overwritten becomes a gap of "
                        "its record. Checked against free memory at startup")
    g.add_argument("--online-train-capture-only", action="store_true", default=None,
                   help="record traffic (and persist it) but start no trainer: the draft is never changed")
    g.add_argument("--online-train-device", metavar="DEV",
                   help="where the trainer process trains: auto (the serving device, default), cpu, cuda or "
                        "cuda:N (another GPU); or a comma-separated list, e.g. cuda:1,cuda:2, for a data-parallel "
                        "trainer (DDP, one process per device: nccl on GPUs; cpu,cpu gives gloo ranks on this "
                        "host) that publishes through the same guard and staged swap. A list is all cuda:N "
                        "(each once, each present) or all cpu, and cannot go with --online-train-capture-only")
    g.add_argument("--online-train-threads", type=int, metavar="N",
                   help="torch CPU threads of the trainer process (default 1, leaving the rest to serving)")
    g.add_argument("--online-train-max-memory", metavar="SIZE",
                   help="memory the trainer may use on its device, e.g. 6GiB: checked at startup against its "
                        "estimated need (draft, gradients, AdamW state, frozen embedding and lm_head) and against "
                        "what is free there after SGLang's pools; on CUDA also enforced (the trainer's "
                        "allocator is capped: past it the trainer process fails and is restarted, serving goes on). "
                        "Default: its estimated need, which must fit what is free")
    g.add_argument("--online-train-duty-cycle", type=float, metavar="F",
                   help="fraction of wall time the trainer may compute, in (0, 1]; after each step it sleeps "
                        "so that it computes at most this share (default 1.0: no pause). Lower it when "
                        "training shares the serving device and serving throughput matters more")
    g.add_argument("--online-train-replay-policy", choices=["recency", "uniform"],
                   help="how each training step draws records from the trainer's pool: recency (default: a "
                        "record recency_half_life records older, default 64, is half as likely; adapts faster "
                        "after a traffic shift, forgets older traffic faster) or uniform (every pooled record "
                        "alike). Compared by benchmarks/bench_adaptation.py")
    g.add_argument("--online-train-queue-bytes", metavar="SIZE",
                   help="byte bound of each queue between capture, the replay buffer, the supervisor and the "
                        "trainer (default 256MiB); past it the oldest items are dropped and counted "
                        "(sglang:online_train_queue_dropped_records_total)")
    g.add_argument("--online-train-lr", type=float, metavar="LR",
                   help="AdamW learning rate, constant after a short warmup (default 6e-4)")
    g.add_argument("--online-train-batch-size", type=int, metavar="N",
                   help="replay records per training step (default 8)")
    g.add_argument("--online-train-num-anchors", type=int, metavar="N",
                   help="DFlash blocks sampled per record per step (default 64; EAGLE3 trains on every position)")
    g.add_argument("--online-train-swap-every", type=int, metavar="STEPS",
                   help="training steps between candidate drafts; each is scored against the live draft on "
                        "held-out recent traffic and swapped in only if it is not worse (default 25)")
    g.add_argument("--online-train-min-records", type=int, metavar="N",
                   help="finished requests to wait for before training starts (default 8)")
    g.add_argument("--online-train-holdout-every", type=int, metavar="N",
                   help="every N-th recorded request is held out for the swap guard, never trained on "
                        "(default 5)")
    g.add_argument("--online-train-checkpoint-dir", metavar="DIR",
                   help="export every accepted draft version here in SGLang's draft format "
                        "(version-NNNNNN/, the newest --online-train-keep-checkpoints kept)")
    g.add_argument("--online-train-keep-checkpoints", type=int, metavar="N",
                   help="accepted versions kept in --online-train-checkpoint-dir (default 3)")
    g.add_argument("--online-train-heartbeat-timeout", type=float, metavar="SECONDS",
                   help="a trainer process whose heartbeat is older than this (hung, or not reading its records) "
                        "is reported down (trainer_up 0), killed and restarted; serving goes on (default 60). "
                        "With a device list the whole group is killed and restarted when rank 0's heartbeat is "
                        "this old (a hung rank stalls rank 0 in the next collective) or any rank exits")
    add_rollback_arguments(g)


def add_rollback_arguments(g) -> None:
    """Rollback on served acceptance (sglang_ext/online/swap/rollback.py)."""
    g.add_argument("--online-train-rollback-steps", type=int, metavar="N",
                   help="after a swap, watch the new draft version's served acceptance over its next N verify "
                        "steps (one per request and step) and swap the previous version back in if its mean "
                        "accept length is lower than the previous version's over its last N steps by more than "
                        "--online-train-rollback-tolerance; counted in sglang:online_train_rollbacks_total, and "
                        "the trainer goes on from the restored weights. Nothing newer is swapped in while a "
                        "version is watched. Keeps one more copy of the draft in host memory, in the serving "
                        "dtype (default 200; 0: off)")
    g.add_argument("--online-train-rollback-tolerance", type=float, metavar="X",
                   help="drop in mean accept length (tokens per verify step) that triggers a rollback "
                        "(default 0.25)")


def parse_argv(argv: list[str]) -> OnlineTrainConfig | None:
    """Our flags from a launch command line; None when --online-train is absent."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    ns, _ = parser.parse_known_args(argv)
    given = [k for k, v in vars(ns).items() if k != "online_train" and v is not None]
    if not ns.online_train:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise OnlineTrainConfigError(f"{flags} given without --online-train")
        return None
    values: dict = {}
    if ns.online_train_config:
        for key, v in OnlineTrainConfig.from_file(ns.online_train_config).items():
            values[key] = check_value(key, v, config_key_label(ns.online_train_config, key))
    for flag, field_name in _FLAG_TO_FIELD.items():
        v = getattr(ns, flag)
        if v is not None:
            values[field_name] = check_value(field_name, v, "--" + flag.replace("_", "-"))
    if ns.online_train_capture_only:
        values["trainer"] = False
    for name, what in (("replay_budget_bytes", "--online-train-replay-budget"),
                       ("prefix_store_bytes", "--online-train-prefix-store"),
                       ("max_memory_bytes", "--online-train-max-memory"),
                       ("queue_bytes", "--online-train-queue-bytes"),
                       ("persist_max_bytes", "--online-train-persist-max-bytes")):
        if values.get(name) is not None:
            values[name] = parse_size(values[name], what,
                                      allow_zero=name in ("prefix_store_bytes", "persist_max_bytes"))
    return OnlineTrainConfig(enabled=True, **values).validate()


def argv_with_sglang_config(argv: list[str]) -> list[str]:
    """`argv` with the keys of SGLang's own `--config FILE.yaml` merged in exactly as SGLang's
    prepare_server_args merges them (its ConfigArgumentMerger over its parser, which holds our flags): our
    `online-train-*` keys there act as the same flags, and the command line wins over the file. A --config that
    SGLang cannot read is left to SGLang to report."""
    if "--config" not in argv:
        return list(argv)
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    if not any(a.dest == "online_train" for a in parser._actions):
        add_arguments(parser)
    try:
        return ConfigArgumentMerger(parser).merge_config_with_args(list(argv))
    except Exception:                       # noqa: BLE001 - SGLang raises its own error for this file next
        return list(argv)
