"""Runs in the trainer process or group (`python -m sglang_ext.online.trainer.worker`), started by the recorder.

    worker.py         the process: records in, the training pool and held-out slice, the step loop
    guard.py          scores a candidate against the live draft; publishes it into the weight slot
    checkpoints.py    accepted versions exported to --online-train-checkpoint-dir
    group.py          a multi-device trainer: rank 0 commands, the other ranks follow

Imports no SGLang. (The draft kinds, the objective and the training step it runs are the top-level `trainer`
package's.)
"""
