"""Runs in SGLang's scheduler process (every TP rank; capture and the hand-off on TP rank 0 only).

    hooks.py          every SGLang hook of the online path, registered in one place; the scheduler clock
    pipeline.py       this process's objects, wired at worker start
    capture.py        the feature rows SGLang feeds the live draft -> the pool; a finished request's rows out
    pool.py           the feature pool beside the KV cache, indexed by KV slot (one device op per forward)
    handoff.py        finished requests -> the shared-memory ring (one copy); starts and watches the recorder
    swap_applier.py   owns the weight slot: stages published versions, swaps them in, rolls back
    tp.py             TP ranks > 0 follow rank 0's swaps
    placement.py      the trainer's devices and memory need, checked at startup

Nothing here does per-record work: records, replay and persistence are the recorder process's.
"""
