"""`--online-train`: a running SGLang server teaches its own speculative draft. Read in data-flow order:

    config.py          the flags / JSON settings (OnlineTrainConfig), parsed and checked at startup
    hooks.py           every SGLang hook of the online path, registered in one place
    pipeline.py        the scheduler process's objects, wired: capture -> buffer -> supervisor
    capture.py         feature rows of running requests -> CapturedRequest -> ReplayRecord
    buffer.py          records in memory under a byte budget, and as replay shards on disk
    supervisor.py      starts / restarts the trainer process, sends it records, hot-swaps its versions
    protocol.py        what crosses the process boundary (TrainerSpec, record messages)
    weight_slot.py     the shared memory the trainer publishes versions and status through
    trainer_worker.py  the trainer process (trainer.train_step, the draft kind's objective, the swap guard)
    metrics.py         sglang:online_train_* on SGLang's /metrics

Importing this package imports nothing; weight_slot, protocol and trainer_worker import without SGLang.
"""
