"""`--online-train`: a running SGLang server teaches its own speculative draft.

Each sub-package is the code of one process (docs/architecture.md has the table: file -> process -> what it owns):

    scheduler/   SGLang's scheduler process (every TP rank; capture and the hand-off on rank 0): the hooks, capture,
                 the hand-off into the ring, the swap of published versions, the TP followers, the trainer's
                 placement and memory check at startup
    recorder/    the recorder process: finished requests -> records -> the replay buffer, shards and retention; the
                 trainer's supervisor
    trainer/     the trainer process (or group): the step loop, the guard, checkpoints, the multi-device group
    swap/        shared by the scheduler and the trainer: the weight slot, staged copies, rollback verdicts

What every process reads sits at this level: config.py (OnlineTrainConfig, from $SGLANG_EXT_ONLINE_TRAIN),
flags.py (the --online-train* flags, parsed at launch), protocol.py and finished.py (what crosses a process
boundary), ring.py, queues.py, metrics.py (sglang:online_train_* on SGLang's /metrics), hub.py (hub ids).

Importing this package imports nothing. Only scheduler/ imports SGLang (hooks.py, at registration); recorder/,
trainer/ and swap/ import without it.
"""
