"""Serving cost of `--online-train`: DFLASH decode throughput plain, with capture only, and with the co-located
trainer at two duty cycles, on the same traffic with the same draft, in one run.

    python benchmarks/bench_online_cost.py                     # 8 requests x 64 tokens, 7 rounds, dense
    python benchmarks/bench_online_cost.py --quick             # smoke run: 4 x 32 tokens, 2 rounds
    python benchmarks/bench_online_cost.py --configs capture,persist,plain2 --rounds 9 --out /tmp/res
    python benchmarks/bench_online_cost.py --gpu               # default (CUDA) platform instead of torch_cpu

What is measured. The same tiny Qwen3-VL target (sglang_ext.demo.tiny_models, "copy" kind) and its
hand-built DFlash draft (block size 4) are served by real SGLang 0.5.23, float32, in these configs:

    plain     --speculative-algorithm DFLASH --enable-metrics
    capture   ... --online-train --online-train-capture-only       (capture -> replay buffer; no trainer)
    online    ... --online-train, duty cycle 1.0                    (capture + the trainer process, training
    online25  ... --online-train --online-train-duty-cycle 0.25       all the time / a quarter of the time)
  and, only when named in --configs:
    persist   capture + --online-train-persist-dir <tmp>           (+ replay shards written to disk)
    plain2    a second plain server: an A/A control of how much two identical servers differ on this machine

The trainer configs train from the served draft but never swap (--online-train-swap-every is set past any
step the run reaches), so every config serves the same draft and the throughput ratio is the cost of the
online path alone (capture, records, the trainer competing for the machine), not a draft that got better.

The servers are started one after the other and then kept up together (about 1.5 GB of RAM each on CPU),
each warmed up with one unmeasured round. On CPU a trainer config (online, online25) computes whether its server
is measured or not, so it is never up during another config's rounds: the plain server stays up (idle, with
--sleep-on-idle, it costs nothing) and the configs without a trainer alternate rounds with it as above; then
each trainer config is started alone beside it, measured in a block of rounds, stopped, and plain is measured
in a block of the same rounds right after (its baseline: the paired ratios of a trainer config are against
that block, minutes apart at most, not against rounds from the start of the run; "bracketed").
--sequential instead runs one server at a time for every config (start, warm up, measure, stop; chosen when RAM
is short), each compared with plain's rounds from the start of the run. A round sends N concurrent greedy
/generate requests (default 8;
a quarter of them with one synthetic image, the rest text) with ignore_eos and max_new_tokens M (default
64), so every request generates exactly M tokens. Rounds go to the configs alternately, in an order that
reverses every round (A B C, C B A, A B C, ...), so slow drift of the machine's other load hits every config
alike. Round r sends the same prompts to every config, and prompts/images are unique per round, so the
radix cache only ever reuses the few tokens of the shared chat-template prefix (every other prompt row is
computed, and captured). Every config runs with
--enable-metrics (which --online-train turns on by itself) and --sleep-on-idle, so the configs differ only
in the online path. On CPU each server runs torch with one thread (OMP_NUM_THREADS=1; --threads to change it),
see the caveats.

The scheduler thread's own cost: sglang:online_train_scheduler_seconds_total (the time spent in the online
path's part of SGLang's hooks: capture, request release, the swap point) over
sglang:online_train_scheduler_iterations_total, in milliseconds per scheduler iteration, over the measured
rounds. What other threads of the scheduler process take from it (the GIL) is not in that figure; it shows in
the throughput.

Per round and config: decode throughput = generated tokens / wall time of the round (first request sent ->
last answer; the prompts are short, 20-40 tokens, so prefill is a small part of it); per request (from
SGLang's meta_info): time per output token after the first (TPOT, the mean inter-token latency; with
speculative decoding tokens arrive in bursts of accept-length tokens), time to first token, and the accept
length (tokens per verify step, which must match between configs for the throughput comparison to mean
anything). Reported: the median tokens/s per config with min/max and IQR over rounds, the ratio
config/plain of the medians and the median/min/max of the per-round paired ratios (rounds adjacent in
time), CPU-seconds the server used per 1000 tokens (from /proc: less sensitive to other load than wall
time, since it counts only our server's processes; the trainer process is one of them), the other load on
the machine during the rounds, and from /metrics the captured feature rows and bytes, records persisted,
trainer steps and the scheduler thread's online-path milliseconds per iteration. Writes
<out>/online_cost_<variant>[_quick][_gpu].json (default out: benchmarks/results/, gitignored) and, only
when matplotlib is installed, a PNG of tokens/s per round.

Caveats.
  * CPU: the torch_cpu platform runs a tiny model (6 layers, hidden 256) where a forward costs milliseconds,
    so the fixed per-step Python overhead of the capture (per request and step: a host tensor, a copy, two
    Prometheus counter updates; per verify step two .tolist() calls and the accept histogram) is a much
    larger share of a step than on a real model on a GPU, while the feature bytes are tiny (3 layers x 256
    x fp32 = 3 KB per token). The ratio here is a statement about overheads, not about a production target.
  * The machine is small and shared (2 cores, other jobs running): absolute tokens/s move by tens of
    percent between minutes; only the paired ratio and its spread are worth reading, and a ratio within the
    spread means "no measurable cost". Idle servers run with --sleep-on-idle (without it an idle SGLang
    scheduler busy-polls about one full core, which would halve the CPU left for the measured server);
    the CPU the idle servers used during other configs' rounds is reported as a check.
  * Threads: with torch's default of one OpenMP thread per core (2 here), the DFLASH servers' speed on this
    shared machine is dominated by OpenMP spinning, not by the model: in our runs plain DFLASH did 4-40
    tokens/s with both of its threads burning a full core each, while the same server with one thread did
    ~210, and the --online-train server with two threads did 130-220 (its worker thread spun far less;
    apparently the extra host work between forwards changes the OpenMP threads' wait pattern). That made
    capture look 4-30x *faster*, an artifact. So on CPU every server gets OMP_NUM_THREADS=1 by default
    (--threads 0 keeps torch's default, to reproduce the artifact).
  * Two cores: a trainer computing all the time (online) takes a core the server could otherwise use for its
    tokenizer, detokenizer and the other servers' idle loops; on a GPU machine it runs on its own device.
  * One server per config: whatever makes one server instance faster than another (where its memory
    landed, which core its thread was on) is confounded with the config. Run with --configs
    online,persist,plain2 to see how far two identical plain servers differ.
  * Greedy outputs are compared across configs (capture must not change serving); with concurrent batching
    tiny float differences between batch compositions could in principle flip a near-tie, so a mismatch is
    reported, not fatal.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from sglang_ext.demo.prompts import IMAGE_QUESTIONS, TEXT_PROMPTS, chat_prompt, make_image  # noqa: E402
from sglang_ext.launcher import draft_args, launch_server, metric_value  # noqa: E402
from sglang_ext.online.scheduler.placement import mem_available_bytes  # noqa: E402

CONFIGS = ("plain", "capture", "online", "online25")   # the default set
EXTRA_CONFIGS = ("persist", "plain2")            # only when named in --configs
CAPTURING = ("capture", "persist", "online", "online25")
DUTY_CYCLES = {"online": 1.0, "online25": 0.25}  # the trainer's share of wall time
NEVER_SWAP = 10**9                               # --online-train-swap-every: the trainer trains, never publishes
CLK_TCK = os.sysconf("SC_CLK_TCK")
METRICS = ("captured_tokens_total", "captured_bytes_total", "recorded_records_total", "recorded_tokens_total",
           "persisted_records_total", "replay_dropped_records_total", "scheduler_seconds_total",
           "scheduler_iterations_total", "trainer_steps")


# ---------------------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------------------

def workload(round_tag: str, n_requests: int, image_every: int) -> list[tuple[str, list]]:
    """n_requests (prompt, images): every `image_every`-th one has one image; unique per round_tag."""
    reqs = []
    for i in range(n_requests):
        tag = f"[{round_tag}.{i}] "
        if image_every and i % image_every == image_every - 1:
            seed = (zlib.crc32(round_tag.encode()) % 100_000) * 100 + i
            reqs.append((chat_prompt(tag + IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)], 1), [make_image(seed)]))
        else:
            reqs.append((chat_prompt(tag + TEXT_PROMPTS[i % len(TEXT_PROMPTS)]), []))
    return reqs


# ---------------------------------------------------------------------------------------------------------
# /proc accounting (Linux)
# ---------------------------------------------------------------------------------------------------------

def _group_stat_fields(pgid: int, with_pid: bool = False):
    """/proc/<pid>/stat fields after the command name (state ppid pgrp ...) of each live process in group
    `pgid` (a server and its children); with_pid: (pid, fields)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                yield (int(entry), fields) if with_pid else fields
        except (OSError, IndexError, ValueError):
            continue


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of the live processes in process group `pgid`."""
    return sum(int(f[11]) + int(f[12]) for f in _group_stat_fields(pgid)) / CLK_TCK     # utime, stime


ROLES = (("sglang::scheduler", "scheduler"), ("sglang::detokenizer", "detokenizer"),
         ("online.recorder.process", "recorder"), ("online.trainer.worker", "trainer"))


def process_role(pid: int) -> str:
    """Which of a server's processes `pid` is, from its command line (SGLang names its processes)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    return next((role for key, role in ROLES if key in cmd), "tokenizer+http" if "launch_server" in cmd else "other")


def group_cpu_by_role(pgid: int) -> dict[str, float]:
    """user+system CPU seconds of the live processes in process group `pgid`, summed by process_role."""
    out: dict[str, float] = {}
    for pid, f in _group_stat_fields(pgid, with_pid=True):
        role = process_role(pid)
        out[role] = out.get(role, 0.0) + (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent not idle (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


def group_rss_bytes(pgid: int) -> int:
    return sum(int(f[21]) for f in _group_stat_fields(pgid)) * os.sysconf("SC_PAGE_SIZE")      # rss (pages)


# ---------------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------------

def online_metrics(server) -> dict:
    text = server.metrics()
    return {m: metric_value(text, "sglang:online_train_" + m) for m in METRICS}


def server_env(threads: int) -> dict:
    if threads <= 0:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def server_args(config: str, draft: Path, persist_dir: Path, gpu: bool, n_servers: int) -> list[str]:
    # --online-train turns on --enable-metrics; the baseline gets it too, so the ratio is the capture's cost.
    args = draft_args(draft) + ["--sleep-on-idle", "--enable-metrics"]
    if gpu:   # launch_server(cpu=False) adds nothing: pick the dtype and share the GPU between the servers
        args += ["--dtype", "float32", "--max-running-requests", "16",
                 "--mem-fraction-static", f"{min(0.8 / n_servers, 0.5):.2f}"]
    if config in ("capture", "persist"):
        args += ["--online-train", "--online-train-capture-only"]   # the capture cost alone (no trainer)
    elif config in DUTY_CYCLES:
        args += ["--online-train", "--online-train-duty-cycle", str(DUTY_CYCLES[config]),
                 "--online-train-swap-every", str(NEVER_SWAP)]
    if config == "persist":
        # a shard every second (the default rolls one per 300 s or 65536 tokens): the write cost is measured
        args += ["--online-train-persist-dir", str(persist_dir), "--online-train-shard-seconds", "1"]
    return args


def run_round(server, requests: list, max_new_tokens: int, pgid_of: dict, active: str) -> dict:
    """Send all requests at once; wait for every answer. Returns the round's measurements."""
    cpu0 = {c: group_cpu_seconds(p) for c, p in pgid_of.items()}
    roles0 = group_cpu_by_role(pgid_of[active])
    busy0, self0 = machine_busy_seconds(), self_cpu_seconds()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(server.generate, text, images, max_new_tokens) for text, images in requests]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    busy1, self1 = machine_busy_seconds(), self_cpu_seconds()
    cpu1 = {c: group_cpu_seconds(p) for c, p in pgid_of.items()}
    roles1 = group_cpu_by_role(pgid_of[active])
    metas = [r["meta_info"] for r in results]
    tokens = sum(int(m["completion_tokens"]) for m in metas)
    verify = sum(int(m.get("spec_verify_ct") or 0) for m in metas)
    tpot = [(m["e2e_latency"] - m["first_token_latency"]) / (m["completion_tokens"] - 1)
            for m in metas if m.get("first_token_latency") is not None and m["completion_tokens"] > 1]
    ttft = [m["first_token_latency"] for m in metas if m.get("first_token_latency") is not None]
    server_cpu = cpu1[active] - cpu0[active]
    all_servers_cpu = sum(cpu1[c] - cpu0[c] for c in cpu1)
    return {
        "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "accept_length": tokens / verify if verify else None,
        "tpot_ms_median": 1000 * statistics.median(tpot) if tpot else None,
        "ttft_ms_median": 1000 * statistics.median(ttft) if ttft else None,
        "server_cpu_s": server_cpu,
        "server_cpu_s_by_process": {role: roles1[role] - roles0.get(role, 0.0) for role in roles1},
        "idle_servers_cpu_s": all_servers_cpu - server_cpu,
        "other_load_cores": max(0.0, (busy1 - busy0) - all_servers_cpu - (self1 - self0)) / wall,
        "output_ids": [r["output_ids"] for r in results],
    }


# ---------------------------------------------------------------------------------------------------------
# Statistics and report
# ---------------------------------------------------------------------------------------------------------

def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarize(rounds: dict[str, list[dict]], metrics: dict[str, dict],
              baselines: dict[str, list[dict]] | None = None) -> dict:
    """baselines: the plain rounds each config is paired with (default: plain's first rounds)."""
    out = {}
    for config, rs in rounds.items():
        tps = [r["tokens_per_s"] for r in rs]
        q1, q3 = quartiles(tps)
        tokens = sum(r["tokens"] for r in rs)
        acc = [r["accept_length"] for r in rs if r["accept_length"] is not None]
        tpot = [r["tpot_ms_median"] for r in rs if r["tpot_ms_median"] is not None]
        ttft = [r["ttft_ms_median"] for r in rs if r["ttft_ms_median"] is not None]
        out[config] = {
            "rounds": len(rs), "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps), "tokens_per_s_q1": q1, "tokens_per_s_q3": q3,
            "tokens_per_s_rounds": tps,
            "accept_length_mean": statistics.fmean(acc) if acc else None,
            "tpot_ms_median": statistics.median(tpot) if tpot else None,
            "ttft_ms_median": statistics.median(ttft) if ttft else None,
            "server_cpu_s_per_1k_tokens": 1000 * sum(r["server_cpu_s"] for r in rs) / tokens,
            "server_cpu_s_per_1k_tokens_by_process": {
                role: 1000 * sum(r["server_cpu_s_by_process"].get(role, 0.0) for r in rs) / tokens
                for role in sorted({role for r in rs for role in r["server_cpu_s_by_process"]})},
            "idle_servers_cpu_s_per_round": statistics.fmean(r["idle_servers_cpu_s"] for r in rs),
            "other_load_cores_mean": statistics.fmean(r["other_load_cores"] for r in rs),
            "generated_tokens": tokens,
            "metrics_measured_rounds": metrics.get(config),
            "scheduler_ms_per_iteration": scheduler_ms_per_iteration(metrics.get(config)),
        }
    for config in rounds:
        base = (baselines or {}).get(config) or rounds.get("plain")
        if config == "plain" or not base:
            continue
        paired = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rounds[config], base)]
        base_tokens = sum(b["tokens"] for b in base)
        base_cpu = 1000 * sum(b["server_cpu_s"] for b in base) / base_tokens
        base_tps = statistics.median(b["tokens_per_s"] for b in base)
        cpu_ratio = out[config]["server_cpu_s_per_1k_tokens"] / base_cpu
        cpu_paired = [(r["server_cpu_s"] / r["tokens"]) / (b["server_cpu_s"] / b["tokens"])
                      for r, b in zip(rounds[config], base)]
        cq1, cq3 = quartiles(cpu_paired)
        out[config].update({
            "baseline_tokens_per_s_median": base_tps,
            "ratio_of_medians": out[config]["tokens_per_s_median"] / base_tps,
            "paired_ratio_median": statistics.median(paired), "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired), "paired_ratios": paired,
            "cpu_per_token_ratio": cpu_ratio,
            "cpu_per_token_paired_ratio_median": statistics.median(cpu_paired),
            "cpu_per_token_paired_ratio_q1": cq1, "cpu_per_token_paired_ratio_q3": cq3,
            "identical_outputs": sum(a == b for r, p in zip(rounds[config], base)
                                     for a, b in zip(r["output_ids"], p["output_ids"])),
            "compared_outputs": sum(len(r["output_ids"]) for r in rounds[config]),
        })
    return out


def scheduler_ms_per_iteration(m: dict | None) -> float | None:
    """The online path's milliseconds on the scheduler thread per scheduler iteration (/metrics deltas)."""
    if not m or not m.get("scheduler_iterations_total"):
        return None
    return 1000 * m["scheduler_seconds_total"] / m["scheduler_iterations_total"]


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(summary: dict, settings: dict) -> None:
    print(f"\nserving cost of --online-train: {settings['variant']} tiny Qwen3-VL + DFlash draft, "
          f"{settings['platform']}, float32; {settings['requests']} concurrent requests "
          f"({settings['image_requests']} with an image) x {settings['max_new_tokens']} new tokens, "
          f"{settings['rounds']} measured rounds per config, {settings['mode']}, "
          f"server threads {settings['server_threads']}")
    head = (f"{'config':8} {'tok/s med':>9} {'min':>7} {'max':>7} {'IQR':>15} {'ratio':>6} "
            f"{'paired ratio med [min, max]':>28} {'TPOT ms':>8} {'TTFT ms':>8} {'acc len':>7} "
            f"{'cpu s/1k tok':>12} {'cpu/tok paired med [IQR]':>24} {'other load':>10}")
    print(head)
    print("-" * len(head))
    for config, s in summary.items():
        ratio = fmt(s.get("ratio_of_medians"), ".3f") if "ratio_of_medians" in s else "1"
        paired = (f"{s['paired_ratio_median']:.3f} [{s['paired_ratio_min']:.3f}, {s['paired_ratio_max']:.3f}]"
                  if "paired_ratio_median" in s else "-")
        cpu = (f"{s['cpu_per_token_paired_ratio_median']:.3f} [{s['cpu_per_token_paired_ratio_q1']:.3f}, "
               f"{s['cpu_per_token_paired_ratio_q3']:.3f}]" if "cpu_per_token_paired_ratio_median" in s else "1")
        print(f"{config:8} {s['tokens_per_s_median']:9.1f} {s['tokens_per_s_min']:7.1f} {s['tokens_per_s_max']:7.1f} "
              f"{s['tokens_per_s_q1']:7.1f}-{s['tokens_per_s_q3']:<7.1f} {ratio:>6} {paired:>28} "
              f"{fmt(s['tpot_ms_median']):>8} {fmt(s['ttft_ms_median'], '.0f'):>8} "
              f"{fmt(s['accept_length_mean'], '.3f'):>7} {s['server_cpu_s_per_1k_tokens']:12.2f} {cpu:>24} "
              f"{s['other_load_cores_mean']:9.2f}c")
    print("(ratio = median tok/s / plain's; paired ratio = per round vs plain's adjacent round; "
          "cpu s/1k tok = CPU the server's processes used per 1000 generated tokens, and its per-round ratio "
          "to plain's; other load = cores busy with other jobs during the rounds)")
    print("\n| config | decode tok/s (median) | ratio to plain | paired ratio, median [min, max] | accept length "
          "| online path on the scheduler thread, ms per iteration | trainer steps |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config, s in summary.items():
        m = s.get("metrics_measured_rounds") or {}
        paired = (f"{s['paired_ratio_median']:.3f} [{s['paired_ratio_min']:.3f}, {s['paired_ratio_max']:.3f}]"
                  if "paired_ratio_median" in s else "-")
        steps = f"{m['trainer_steps']:.0f}" if config in DUTY_CYCLES and m else "-"
        print(f"| {config} | {s['tokens_per_s_median']:.1f} | {fmt(s.get('ratio_of_medians', 1.0), '.3f')} | {paired} "
              f"| {fmt(s['accept_length_mean'], '.3f')} | {fmt(s['scheduler_ms_per_iteration'], '.3f')} | {steps} |")
    for config, s in summary.items():
        m = s.get("metrics_measured_rounds")
        extra = []
        if m and m.get("captured_tokens_total"):
            extra.append(f"captured {int(m['captured_tokens_total'])} rows, {m['captured_bytes_total'] / 1e6:.2f} MB "
                         f"({m['captured_bytes_total'] / m['captured_tokens_total']:.0f} B/row; "
                         f"{m['captured_tokens_total'] / s['generated_tokens']:.2f} rows per generated token), "
                         f"{int(m['recorded_records_total'])} records")
            if m.get("persisted_records_total"):
                extra.append(f"{int(m['persisted_records_total'])} persisted")
            if s.get("persist_dir_bytes"):
                extra.append(f"{s['persist_dir_bytes'] / 1e6:.2f} MB of shards on disk")
        if "compared_outputs" in s:
            extra.append(f"greedy outputs identical to plain: {s['identical_outputs']}/{s['compared_outputs']}")
        extra.append("CPU s/1k tokens by process: " + ", ".join(
            f"{role} {v:.2f}" for role, v in s["server_cpu_s_per_1k_tokens_by_process"].items()))
        extra.append(f"idle servers' CPU during its rounds {s['idle_servers_cpu_s_per_round']:.2f} s/round")
        if s.get("rss_bytes"):
            extra.append(f"RSS {s['rss_bytes'] / 2**30:.2f} GiB (summed over its processes)")
        print(f"  {config}: " + "; ".join(extra))


def maybe_plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for config, s in summary.items():
        ax.plot(range(1, len(s["tokens_per_s_rounds"]) + 1), s["tokens_per_s_rounds"], "o-", label=config)
    ax.set_xlabel("round")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("DFLASH decode throughput with and without --online-train")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None, help="concurrent requests per round (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per request (default 64)")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds per config (default 7)")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="unmeasured rounds per server first (default 1)")
    ap.add_argument("--image-every", type=int, default=4,
                    help="every k-th request carries an image (default 4: a quarter; 0: text only)")
    ap.add_argument("--variant", choices=["dense", "moe"], default="dense", help="tiny target (default dense)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS + EXTRA_CONFIGS)} (default "
                         f"{','.join(CONFIGS)}; plain is always run; plain2 is a second plain server, an A/A "
                         "control of how much two identical servers differ)")
    ap.add_argument("--sequential", action="store_true",
                    help="one server at a time (all its rounds, then the next) instead of alternating rounds "
                         "between servers kept up together (trainer configs on CPU: bracketed, see above); "
                         "chosen automatically when RAM is short")
    ap.add_argument("--gpu", action="store_true", help="serve on the default (CUDA) platform, not torch_cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of every server (default 1 on CPU, unset with --gpu; 0: leave unset)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="where the JSON (and PNG) go (default benchmarks/results/)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 requests x 32 tokens, 2 rounds")
    args = ap.parse_args(argv)
    n_req = args.requests or (4 if args.quick else 8)
    max_new = args.max_new_tokens or (32 if args.quick else 64)
    n_rounds = args.rounds or (2 if args.quick else 7)
    threads = args.threads if args.threads is not None else (0 if args.gpu else 1)
    configs = ["plain"] + [c.strip() for c in args.configs.split(",") if c.strip() and c.strip() != "plain"]
    configs = list(dict.fromkeys(configs))
    unknown = sorted(set(configs) - set(CONFIGS + EXTRA_CONFIGS))
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {CONFIGS + EXTRA_CONFIGS}")
    if n_req < 1 or max_new < 2 or n_rounds < 1:
        ap.error("--requests >= 1, --max-new-tokens >= 2 and --rounds >= 1 are needed")

    from sglang_ext.demo.tiny_models import tiny_models

    models = tiny_models()
    target = models.dense if args.variant == "dense" else models.moe
    draft = models.draft_dense if args.variant == "dense" else models.draft_moe
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_online_cost_"))
    persist_dir = work / "replay"
    log_dir = out_dir / "logs"

    sequential = args.sequential
    free = [c for c in configs if c not in DUTY_CYCLES]
    avail = mem_available_bytes()
    if not sequential and not args.gpu and avail is not None and avail < (len(free) + 1) * 3 * 2**30:
        print(f"only {avail / 2**30:.1f} GiB of RAM available: running the configs one after the other "
              f"(--sequential) instead of keeping {len(free) + 1} servers up together")
        sequential = True
    # A trainer computes all the time whether its server is measured or idle: on a shared CPU it is never up during
    # another config's rounds (bracketed: each trainer config alone beside the idle plain server, then plain).
    bracketed = not sequential and not args.gpu and any(c in DUTY_CYCLES for c in configs)

    image_requests = sum(1 for i in range(n_req) if args.image_every and i % args.image_every == args.image_every - 1)
    settings = {"variant": args.variant, "requests": n_req, "image_requests": image_requests,
                "max_new_tokens": max_new, "rounds": n_rounds, "warmup_rounds": args.warmup_rounds,
                "configs": configs,
                "mode": "sequential" if sequential else "bracketed" if bracketed else "alternating",
                "platform": "cuda" if args.gpu else "torch_cpu", "quick": args.quick,
                "server_threads": threads or "default",
                "target": str(target), "draft": str(draft), "host": platform.node(), "cpus": os.cpu_count(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"settings: {json.dumps({k: v for k, v in settings.items() if k not in ('target', 'draft')})}")

    rounds: dict[str, list[dict]] = {c: [] for c in configs}
    baselines: dict[str, list[dict]] = {}     # bracketed: a trainer config's own block of plain rounds
    metrics: dict[str, dict] = {}
    extra: dict[str, dict] = {c: {} for c in configs}
    commands: dict[str, list[str]] = {}
    t_start = time.perf_counter()

    def start(stack: contextlib.ExitStack, config: str):
        t0 = time.perf_counter()
        server = stack.enter_context(launch_server(
            target, server_args(config, draft, persist_dir, args.gpu, 1 if sequential else len(configs)),
            log_dir=log_dir, name=f"bench-{config}", cpu=not args.gpu, env=server_env(threads)))
        commands[config] = server.args
        print(f"[{time.perf_counter() - t_start:6.0f}s] {config}: server up on port {server.port} "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
        return server

    def warm(server, config: str, pgid_of: dict):
        for w in range(args.warmup_rounds):
            r = run_round(server, workload(f"warm{w}", n_req, args.image_every), max_new, pgid_of, config)
            print(f"[{time.perf_counter() - t_start:6.0f}s] {config}: warm-up {w + 1}: {r['tokens_per_s']:.1f} tok/s",
                  flush=True)

    def measure(server, config: str, r: int, pgid_of: dict, tag: str = "r", into: list | None = None):
        res = run_round(server, workload(f"{tag}{r}", n_req, args.image_every), max_new, pgid_of, config)
        rounds[config].append(res)
        if into is not None:
            into.append(res)
        print(f"[{time.perf_counter() - t_start:6.0f}s] round {r + 1}/{n_rounds} {config:7}: "
              f"{res['tokens_per_s']:7.1f} tok/s, TPOT {fmt(res['tpot_ms_median'])} ms, "
              f"accept len {fmt(res['accept_length'], '.3f')}, server CPU {res['server_cpu_s']:.1f} s, "
              f"other load {res['other_load_cores']:.2f} cores", flush=True)

    def settle(server, config: str, want_records: float = 0) -> dict:
        """/metrics once the replay buffer's thread has caught up (records assembled, shards flushed)."""
        m = online_metrics(server)
        if config not in CAPTURING:
            return m
        settled = ("captured_tokens_total", "recorded_records_total", "persisted_records_total")
        deadline, last = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            caught_up = m["recorded_records_total"] >= want_records and (
                config != "persist" or m["persisted_records_total"] >= m["recorded_records_total"])
            now = [m[k] for k in settled]         # (a trainer's steps and the scheduler's clock keep moving)
            if caught_up and now == last:
                break
            last = now
            time.sleep(1.0)
            m = online_metrics(server)
        return m

    def finish(server, config: str, before: dict):
        if config in CAPTURING:
            m = settle(server, config, before["recorded_records_total"] + n_rounds * n_req)
            metrics[config] = {k: m[k] - before[k] for k in METRICS}

    def alternate(stack: contextlib.ExitStack, group: list[str]) -> dict:
        """`group`'s servers up together, each warmed up, then rounds alternating between them (the order
        reversed every round); returns the servers (up until `stack` closes)."""
        servers = {c: start(stack, c) for c in group}
        pgid_of = {c: s.process.pid for c, s in servers.items()}
        for config in group:
            warm(servers[config], config, pgid_of)
        before = {c: settle(s, c) for c, s in servers.items()}
        for r in range(n_rounds):
            for config in (group if r % 2 == 0 else group[::-1]):
                measure(servers[config], config, r, pgid_of)
        for config in group:
            finish(servers[config], config, before[config])
            extra[config]["rss_bytes"] = group_rss_bytes(servers[config].process.pid)
        return servers

    def alone(config: str, tag: str = "r", beside: dict | None = None) -> None:
        """`config`'s server up on its own (beside: the pgids of idle servers kept up), warmed up, its rounds,
        then stopped."""
        with contextlib.ExitStack() as stack:
            server = start(stack, config)
            pgid_of = {**(beside or {}), config: server.process.pid}
            warm(server, config, pgid_of)
            before = settle(server, config)
            for r in range(n_rounds):
                measure(server, config, r, pgid_of, tag=tag)
            finish(server, config, before)
            extra[config]["rss_bytes"] = group_rss_bytes(server.process.pid)

    try:
        if bracketed:
            with contextlib.ExitStack() as stack:
                servers = alternate(stack, [c for c in configs if c not in DUTY_CYCLES])      # plain first
                plain = servers["plain"]
                for config in [c for c in configs if c in DUTY_CYCLES]:
                    # stopped before plain's rounds: its trainer never runs during them
                    alone(config, tag=f"{config}-r", beside={"plain": plain.process.pid})
                    baselines[config] = []
                    pgid_of = {"plain": plain.process.pid}
                    for r in range(n_rounds):                  # the same prompts, right after, trainer gone
                        measure(plain, "plain", r, pgid_of, tag=f"{config}-r", into=baselines[config])
                extra["plain"]["rss_bytes"] = group_rss_bytes(plain.process.pid)
        elif sequential:
            for config in configs:
                alone(config)
        else:
            with contextlib.ExitStack() as stack:
                alternate(stack, configs)
        if "persist" in configs:
            extra["persist"]["persist_dir_bytes"] = dir_bytes(persist_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = summarize(rounds, metrics, baselines)
    for config, e in extra.items():
        summary[config].update(e)
    settings["elapsed_s"] = time.perf_counter() - t_start
    print_report(summary, settings)

    suffix = ("_quick" if args.quick else "") + ("_gpu" if args.gpu else "")
    json_path = out_dir / f"online_cost_{args.variant}{suffix}.json"
    for rs in rounds.values():               # outputs were only needed for the comparison
        for r in rs:
            r.pop("output_ids", None)
    json_path.write_text(json.dumps({"settings": settings, "commands": commands, "summary": summary,
                                     "rounds": rounds}, indent=2))
    print(f"wrote {json_path}")
    maybe_plot(summary, out_dir / f"online_cost_{args.variant}{suffix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
