"""How a trained version reaches the live draft: the weight slot both the trainer and the scheduler process map,
and what the scheduler does with it (staging, rollback).

    weight_slot.py    shared memory the trainer publishes versions and its status through (memfd, seqlock)
    staging.py        (scheduler) a published version copied into staging buffers off the scheduler thread,
                      then swapped in place
    rollback.py       (scheduler) served acceptance of a new version vs the previous one: keep or roll back

Imports no SGLang.
"""
