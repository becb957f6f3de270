"""`--online-train`: a running SGLang server teaches its own speculative draft. Read in data-flow order:

    config.py          the flags / JSON settings (OnlineTrainConfig), parsed and checked at startup
    hooks.py           every SGLang hook of the online path, registered in one place       (scheduler)
    pipeline.py        the scheduler process's objects, wired                              (scheduler)
    capture.py         feature rows of running requests -> CapturedRequest                 (scheduler)
    handoff.py         finished requests -> the ring; starts and watches the recorder      (scheduler)
    ring.py            the shared-memory ring between the two                               (both)
    recorder.py        the recorder process: ring -> records -> buffer, trainer supervisor  (recorder)
    buffer.py          records in memory under a byte budget, and as replay shards on disk (recorder)
    supervisor.py      starts / restarts the trainer process, sends it records             (recorder)
    swap_applier.py    owns the weight slot; stages and hot-swaps published versions       (scheduler)
    protocol.py        what crosses the process boundary (TrainerSpec, record messages)
    weight_slot.py     the shared memory the trainer publishes versions and status through
    trainer_worker.py  the trainer process (trainer.train_step, the draft kind's objective, the swap guard)
    metrics.py         sglang:online_train_* on SGLang's /metrics                           (both)

Importing this package imports nothing; weight_slot, protocol and trainer_worker import without SGLang.
"""
