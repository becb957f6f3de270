"""Traffic for the online demo (and the online-training test and benchmark): a random draft for a workload
target, prompts sent with requests in flight, the online-training numbers of /metrics, the trainer process."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_ext.demo.prompts import chat_prompt
from sglang_ext.demo.tiny_models import tiny_draft_config
from sglang_ext.launcher import metric_value
from sglang_ext.online.config import OPT_OUT_KEY

TRAINER_MODULE = "sglang_ext.online.trainer.worker"


def make_random_draft(target_dir: Path, out: Path, *, block_size: int = 4, num_layers: int = 1,
                      target_layers: list[int] | None = None, seed: int = 0, kind: str = "dflash") -> Path:
    """An untrained (tiny) draft of `kind` for `target_dir` (from-scratch init, exported in SGLang's format).
    DFlash: `num_layers` layers reading 3 target layers; EAGLE3: one layer over the aux layers `target_layers`
    (default [1, 2, 3]: SGLang's default aux layers collide for a 6-layer target), the full vocabulary."""
    from trainer.draft_kind import get_kind

    draft_kind = get_kind(kind)
    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    if kind == "dflash":
        cfg = tiny_draft_config(target_config, num_layers=num_layers, block_size=block_size,
                                target_layer_ids=target_layers)
    else:
        cfg = draft_kind.config_for_target(target_config, num_layers=1, block_size=block_size,
                                           feature_layers=target_layers or [1, 2, 3], num_heads=4, num_kv_heads=4,
                                           head_dim=64, intermediate_size=512)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    return draft_kind.from_scratch(cfg, seed=seed).export(out, dtype=torch.bfloat16)


def online_metrics(server) -> dict:
    """The online-training numbers of /metrics, by short name."""
    text = server.metrics()
    p = "sglang:online_train_"
    names = ["draft_version", "trainer_up", "trainer_steps", "trainer_loss", "trainer_tokens_per_second",
             "trainer_records", "heldout_accept_length", "swaps_total", "swaps_in_flight_total",
             "trainer_restarts_total", "seconds_since_last_swap", "recorded_records_total",
             "swap_latency_seconds_count", "swap_latency_seconds_sum"]
    out = {n: metric_value(text, p + n) for n in names}
    for reason in ("worse", "nan"):
        out[f"rejected_{reason}"] = metric_value(text, p + "rejected_swaps_total", reason=reason)
    return out


def server_processes(server) -> list:
    """Every process of the server: its process group (launch_server starts each server in a session of its own,
    so the group id is the launcher's pid). The recorder and the trainer are in it, though not descendants of the
    launcher (the recorder is started detached, sglang_ext/online/scheduler/handoff.py)."""
    import psutil
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == server.process.pid:
                out.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def processes_running(server, module: str) -> list[int]:
    """Pids of the server's processes running `python -m <module>` (or a script of that name)."""
    import psutil
    pids = []
    for p in server_processes(server):
        try:
            if module in p.cmdline():
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def trainer_pids(server, module: str = TRAINER_MODULE) -> list[int]:
    """Trainer processes (`python -m <module>`) of the server."""
    return processes_running(server, module)


@dataclass
class Served:
    index: int           # position in the traffic
    prompt: int          # index of the prompt
    t_done: float        # seconds since the traffic started
    accept_length: float
    output_ids: list


def send_traffic(server, prompts: list[tuple[str, list]], order: list[int], *, max_new_tokens: int,
                 concurrency: int = 4, on_done=None, t0: float | None = None,
                 opt_out: bool = False) -> list[Served]:
    """Send prompts[order[i]] with `concurrency` requests in flight; results in completion order. opt_out: the
    requests ask --online-train not to record them (held-out probes)."""
    t0 = time.monotonic() if t0 is None else t0
    lock = threading.Lock()
    done: list[Served] = []

    def one(i: int) -> None:
        text, images = prompts[order[i]]
        r = server.generate(text, images, max_new_tokens=max_new_tokens, ignore_eos=True,
                            custom_params={OPT_OUT_KEY: True} if opt_out else None)
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



def probe_tau(server, probes: list[tuple[str, list]], *, max_new_tokens: int, concurrency: int = 4) -> float:
    """Served tau (mean over requests) of held-out prompts sent once each, opted out of training."""
    done = send_traffic(server, probes, list(range(len(probes))), max_new_tokens=max_new_tokens,
                        concurrency=concurrency, opt_out=True)
    return sum(s.accept_length for s in done) / len(done)

@dataclass
class ChatTurn:
    chat: int            # index of the chat
    turn: int            # 0, 1, ...
    prompt_len: int      # tokens of this turn's prompt (the whole conversation so far)
    accept_length: float
    output_ids: list
    t_done: float = 0.0  # seconds since the traffic started


def send_chats(server, tokenizer, chats: list[list[str]], *, max_new_tokens: int, concurrency: int = 4,
               system: str | None = None, opt_out: bool = False, t0: float | None = None) -> list[ChatTurn]:
    """Multi-turn traffic: each chat's turns in order, each turn's prompt = the whole conversation so far as
    token ids (the earlier turns' prompts and generated tokens exactly, so the server's radix cache serves
    them), `system` (a system turn, e.g. demo.prompts.system_turn()) first; `concurrency` chats at a time."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    t0 = time.monotonic() if t0 is None else t0
    lock = threading.Lock()
    done: list[ChatTurn] = []

    def one(c: int) -> None:
        ids = encode(system) if system else []
        for t, message in enumerate(chats[c]):
            ids = ids + encode(("<|im_end|>\n" if t else "") + chat_prompt(message))
            params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
            if opt_out:
                params["custom_params"] = {OPT_OUT_KEY: True}
            r = server.post("/generate", {"input_ids": ids, "sampling_params": params})
            with lock:
                done.append(ChatTurn(c, t, len(ids), float(r["meta_info"].get("spec_accept_length", 0.0)),
                                     r["output_ids"], time.monotonic() - t0))
            ids = ids + r["output_ids"]

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(one, c) for c in range(len(chats))]:
            f.result()
    return done


SWAP_LOG = re.compile(r"draft version (\d+) swapped in \(([\d.]+) ms, (\d+) requests in flight, "
                      r"scheduler iteration ([\d.]+) ms")


def swaps_from_log(log_text: str) -> list[tuple[int, float, int, float]]:
    """(version, latency ms, requests in flight, average scheduler iteration ms) of every logged swap."""
    return [(int(v), float(ms), int(n), float(it)) for v, ms, n, it in SWAP_LOG.findall(log_text)]
