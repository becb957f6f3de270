"""Hooks that add `--online-train` to SGLang's command line (always registered; inert unless used)."""
from __future__ import annotations

import logging
import os
import sys

from sglang_ext.online.config import ENV_VAR, OnlineTrainConfigError, add_arguments, check_server_args, parse_argv

logger = logging.getLogger(__name__)


# srt/server_args.py `ServerArgs.add_cli_args`: add our argument group to SGLang's parser, so
# `python -m sglang.launch_server --help` lists it and argparse (and `--config` files) accept our flags.
def add_online_train_cli_args(original, parser, *args, **kwargs):
    out = original(parser, *args, **kwargs)
    if not any(a.dest == "online_train" for a in parser._actions):
        add_arguments(parser)
    return out


# srt/server_args.py `prepare_server_args`: `ServerArgs.from_cli_args` drops fields it does not declare, so
# read our flags back from argv, validate them against the parsed server args (fail fast at startup), and
# hand them to the scheduler processes through the environment (and as a private ServerArgs attribute).
def prepare_server_args_with_online_train(original, argv, *args, **kwargs):
    try:
        cfg = parse_argv(list(argv))
    except OnlineTrainConfigError as e:
        sys.stderr.write(f"sglang serve: error: {e}\n")
        raise SystemExit(2) from None
    server_args = original(argv, *args, **kwargs)
    if cfg is None:
        os.environ.pop(ENV_VAR, None)
        return server_args
    try:
        check_server_args(cfg, server_args)
    except OnlineTrainConfigError as e:
        sys.stderr.write(f"sglang serve: error: {e}\n")
        raise SystemExit(2) from None
    os.environ[ENV_VAR] = cfg.to_env()
    server_args._online_train = cfg.to_env()
    server_args.enable_metrics = True          # our metrics live on SGLang's /metrics
    logger.info("sglang_ext: online training capture enabled: %s", cfg)
    return server_args
