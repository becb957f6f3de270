"""Shared by the online-training test, the demo and the benchmark: a random DFlash draft for a workload
target, traffic from a workload prompt set, /metrics parsing, and finding the trainer process."""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_ext.testing.tiny_models import default_target_layer_ids, draft_config_dict

TRAINER_MODULE = "sglang_ext.online.trainer_worker"


def make_random_draft(target_dir: Path, out: Path, *, block_size: int = 4, num_layers: int = 1,
                      target_layers: list[int] | None = None, seed: int = 0) -> Path:
    """An untrained DFlash draft for `target_dir` (from-scratch init, exported in SGLang's format)."""
    from trainer.dflash_draft import DFlashDraft, DraftConfig

    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    n_layers = target_config.get("text_config", target_config)["num_hidden_layers"]
    layers = list(target_layers or default_target_layer_ids(n_layers, 3))
    cfg = draft_config_dict(target_config, num_layers=num_layers, block_size=block_size, target_layer_ids=layers)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    draft = DFlashDraft.from_scratch(DraftConfig.from_json(out), seed=seed)
    draft.export(out, dtype=torch.bfloat16)
    return out


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` (exact metric name) whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def online_metrics(server) -> dict:
    """The online-training numbers of /metrics, by short name."""
    text = server.get_text("/metrics")
    p = "sglang:online_train_"
    names = ["draft_version", "trainer_up", "trainer_steps", "trainer_loss", "trainer_tokens_per_second",
             "trainer_records", "heldout_accept_length", "swaps_total", "swaps_in_flight_total",
             "trainer_restarts_total", "seconds_since_last_swap", "recorded_records_total",
             "swap_latency_seconds_count", "swap_latency_seconds_sum"]
    out = {n: metric_value(text, p + n) for n in names}
    for reason in ("worse", "nan"):
        out[f"rejected_{reason}"] = metric_value(text, p + "rejected_swaps_total", reason=reason)
    return out


def trainer_pids(server) -> list[int]:
    """Trainer processes under the server's process tree."""
    import psutil
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            if TRAINER_MODULE in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


@dataclass
class Served:
    index: int           # position in the traffic
    prompt: int          # index of the prompt
    t_done: float        # seconds since the traffic started
    accept_length: float
    output_ids: list


def send_traffic(server, prompts: list[tuple[str, list]], order: list[int], *, max_new_tokens: int,
                 concurrency: int = 4, on_done=None, t0: float | None = None) -> list[Served]:
    """Send prompts[order[i]] with `concurrency` requests in flight; results in completion order."""
    t0 = time.monotonic() if t0 is None else t0
    lock = threading.Lock()
    done: list[Served] = []

    def one(i: int) -> None:
        text, images = prompts[order[i]]
        r = server.generate(text, images, max_new_tokens=max_new_tokens, ignore_eos=True)
        s = Served(i, order[i], time.monotonic() - t0, float(r["meta_info"].get("spec_accept_length", 0.0)),
                   r["output_ids"])
        with lock:
            done.append(s)
            if on_done is not None:
                on_done(s, len(done))

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(one, i) for i in range(len(order))]:
            f.result()
    return done


SWAP_LOG = re.compile(r"draft version (\d+) swapped in \(([\d.]+) ms, (\d+) requests in flight, "
                      r"scheduler iteration ([\d.]+) ms")


def swaps_from_log(log_text: str) -> list[tuple[int, float, int, float]]:
    """(version, latency ms, requests in flight, average scheduler iteration ms) of every logged swap."""
    return [(int(v), float(ms), int(n), float(it)) for v, ms, n, it in SWAP_LOG.findall(log_text)]
