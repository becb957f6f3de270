"""Runs in the recorder process (`python -m sglang_ext.online.recorder.process`), started by TP rank 0's scheduler.

    process.py        the process: ring -> records -> replay buffer; stops without losing a finished record
    records.py        a finished request -> a replay record
    buffer.py         records under a byte budget; shards on disk, retention (its own thread)
    prefix_store.py   features of radix-cached prefixes, to fill records whose prefix was not recomputed
    memory.py         freed heap pages back to the OS (malloc_trim)
    supervisor.py     starts, feeds, watches and restarts the trainer process or group

Imports no SGLang.
"""
