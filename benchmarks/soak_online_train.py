"""Soak test of --online-train (not in CI): real SGLang (CPU platform unless --gpu) serving the reference
workload for --minutes under faults, DFLASH from a random draft, the trainer on:

    python benchmarks/soak_online_train.py [--minutes 30] [--out benchmarks/results]

Faults, all at once:
  * random aborts: --abort-rate of the requests are long ones aborted mid-generation (/abort_request);
  * image requests: --image-rate of the requests carry an image (the workload's picture prompts);
  * trainer kills: every --kill-every-min minutes the trainer process is killed with SIGKILL;
  * a persist directory that fills up: --online-train-persist-max-bytes is set to --persist-max-bytes, so the
    server keeps deleting its oldest shards for the whole run.

Reports, every --sample-s seconds and at the end: RSS of the server's processes (the trainer apart), server
errors (HTTP errors other than aborts; ERROR lines and tracebacks in the server log), finished requests against
records made (every finished request is within the record budget here, so every one must be recorded; SGLang's
own start-up warm-up request adds at most one), records persisted / lost, shards pruned, trainer restarts and
swaps, and what the replay buffer's malloc_trim gave back. RSS slope: least squares over the samples after
--warmup-min minutes, and over the second half of the run, in MB per hour.
Writes <out>/soak_online_train.json, .md (the table) and .png (RSS over time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

METRICS = {            # short name -> (metric, labels)
    "recorded": ("sglang:online_train_recorded_records_total", {}),
    "persisted": ("sglang:online_train_persisted_records_total", {}),
    "persist_lost": ("sglang:online_train_persist_lost_records_total", {}),
    "pruned_shards": ("sglang:online_train_persist_pruned_shards_total", {}),
    "dropped_aborted": ("sglang:online_train_dropped_requests_total", {"reason": "aborted"}),
    "dropped_too_long": ("sglang:online_train_dropped_requests_total", {"reason": "too_long"}),
    "restarts": ("sglang:online_train_trainer_restarts_total", {}),
    "hung": ("sglang:online_train_trainer_hung_total", {}),
    "swaps": ("sglang:online_train_swaps_total", {}),
    "version": ("sglang:online_train_draft_version", {}),
    "replay_bytes": ("sglang:online_train_replay_bytes", {}),
    "steps": ("sglang:online_train_trainer_steps", {}),
    "trainer_up": ("sglang:online_train_trainer_up", {}),
    "accept_sum": ("sglang:online_train_accept_length_sum", {}),
    "accept_count": ("sglang:online_train_accept_length_count", {}),
    "trims": ("sglang:online_train_malloc_trims_total", {}),
    "trim_seconds": ("sglang:online_train_malloc_trim_seconds_total", {}),
    "trim_released": ("sglang:online_train_malloc_trim_released_bytes_total", {}),
}


def read_metrics(server) -> dict:
    from sglang_ext.launcher import metric_value
    text = server.metrics()
    return {k: metric_value(text, name, **labels) for k, (name, labels) in METRICS.items()}


def process_rss(server, trainer_module: str) -> dict:
    """RSS in MB: `server` (every process of the server but the trainer) and `trainer`; `by_process`: each
    server process's RSS by its name (SGLang titles its processes, e.g. sglang::scheduler)."""
    import psutil

    from sglang_ext.demo.traffic import server_processes
    out = {"server": 0.0, "trainer": 0.0, "processes": 0, "by_process": {}}
    for p in server_processes(server):
        try:
            rss = p.memory_info().rss / 2**20
            key = "trainer" if trainer_module in " ".join(p.cmdline()) else "server"
            name = p.name()
        except psutil.Error:
            continue
        out[key] += rss
        out["processes"] += 1
        if name == "sglang::scheduler" and "scheduler_regions" not in out:
            out["scheduler_regions"] = memory_regions(p.pid)
        if key == "server":
            label = name if p.pid != server.process.pid else f"{name} (launcher)"
            while label in out["by_process"]:                  # two processes of one name
                label += "'"
            out["by_process"][label] = rss
    return out


ARENA_HEAP = 64 << 20      # glibc's thread arenas grow in heaps of at most this size, aligned to it


def memory_regions(pid: int) -> dict[str, float]:
    """RSS in MB of one process by the kind of mapping it is in (/proc/<pid>/smaps): `main_heap` (glibc's main
    arena, [heap]), `thread_arenas` (anonymous mappings aligned to and at most 64 MiB: the heaps of glibc's
    per-thread arenas), `anon_other` (other anonymous mappings: allocations glibc mmaps whole, Python's and
    other allocators' arenas), `file` (libraries, mapped files), `other` ([stack] and the like)."""
    out = {"main_heap": 0.0, "thread_arenas": 0.0, "anon_other": 0.0, "file": 0.0, "other": 0.0}
    kind = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if "-" in head[0] and not head[0].endswith(":"):
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    name = head[5].strip() if len(head) > 5 else ""
                    if name == "[heap]":
                        kind = "main_heap"
                    elif name.startswith("/"):
                        kind = "file"
                    elif name:
                        kind = "other"
                    elif start % ARENA_HEAP == 0 and end - start <= ARENA_HEAP:
                        kind = "thread_arenas"
                    else:
                        kind = "anon_other"
                elif head[0] == "Rss:" and kind is not None:
                    out[kind] += int(head[1]) / 1024
    except OSError:
        return {}
    return out


def growth_after(samples: list[dict], after_s: float, key: str) -> list[tuple[str, float]]:
    """(name, MB its RSS grew from the first sample after warm-up to the last), largest first, for each entry of
    the samples' rss[key]: "by_process" (each server process) or "scheduler_regions" (each kind of mapping of the
    scheduler process)."""
    after = [s for s in samples if s["t"] >= after_s and s["rss"].get(key)]
    if len(after) < 2:
        return []
    first, last = after[0]["rss"][key], after[-1]["rss"][key]
    return sorted(((k, last[k] - first[k]) for k in last if k in first), key=lambda kv: -kv[1])


def window_means(samples: list[dict], after_s: float, width_s: float, key: str = "server") -> list[tuple[float, float]]:
    """(start minute, mean RSS in MB) of each full `width_s` window of samples from `after_s` on: single samples
    jump by several MB as arenas grow and are trimmed, window means show whether the level still moves."""
    out = []
    end = max((s["t"] for s in samples), default=0.0)
    start = after_s
    while start + width_s <= end + 1e-6:
        vals = [s["rss"][key] for s in samples if start <= s["t"] < start + width_s]
        if vals:
            out.append((start / 60, statistics.fmean(vals)))
        start += width_s
    return out


def rss_summary(samples: list[dict], minutes: float, warmup_min: float) -> dict:
    """The RSS fields of the result, from the samples alone (so --report can recompute them from a saved run)."""
    after = [s["rss"]["server"] for s in samples if s["t"] >= warmup_min * 60] or [float("nan")]
    width_s = 600.0 if minutes >= 60 else 300.0
    return {
        "rss_server_after_warmup": [after[0], after[-1], max(after)],
        "rss_slope_mb_per_hour": {k: slope_mb_per_hour(samples, warmup_min * 60, k) for k in ("server", "trainer")},
        # the second half alone: whether what grows after warm-up levels off
        "rss_slope_second_half_mb_per_hour": slope_mb_per_hour(samples, minutes * 30, "server"),
        "rss_server_window_min": width_s / 60,
        "rss_server_window_means": window_means(samples, warmup_min * 60, width_s),
        "rss_growth_by_process": growth_after(samples, warmup_min * 60, "by_process"),
        "scheduler_growth_by_region": growth_after(samples, warmup_min * 60, "scheduler_regions"),
    }


def dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def slope_mb_per_hour(samples: list[dict], after_s: float, key: str) -> float | None:
    pts = [(s["t"], s["rss"][key]) for s in samples if s["t"] >= after_s]
    if len(pts) < 3:
        return None
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (v - mv) for t, v in pts) / var * 3600 if var else None


class Traffic:
    """Requests from `concurrency` threads until `stop` is set; counts what came back."""

    def __init__(self, server, text_prompts, image_prompts, *, max_new_tokens: int, abort_rate: float,
                 image_rate: float, seed: int):
        self.server, self.text_prompts, self.image_prompts = server, text_prompts, image_prompts
        self.max_new_tokens, self.abort_rate, self.image_rate = max_new_tokens, abort_rate, image_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counts = {"sent": 0, "finished": 0, "finished_image": 0, "aborted": 0, "abort_raced": 0,
                       "errors": 0}
        self.errors: list[str] = []
        self.n = 0

    def _next(self) -> tuple[int, bool, bool]:
        with self.lock:
            self.n += 1
            return self.n, self.rng.random() < self.abort_rate, self.rng.random() < self.image_rate

    def one(self) -> None:
        from sglang_ext.launcher import ServerError, image_to_data_url
        n, abort, image = self._next()
        text, images = (self.rng.choice(self.image_prompts) if image else self.rng.choice(self.text_prompts))
        rid = f"soak-{n}"
        body = {"text": text, "rid": rid, "sampling_params": {
            "max_new_tokens": 2000 if abort else self.max_new_tokens, "temperature": 0.0, "ignore_eos": True}}
        if images:
            body["image_data"] = [image_to_data_url(im) for im in images]
        timer = None
        if abort:
            timer = threading.Timer(random.uniform(0.5, 3.0), self._abort, args=(rid,))
            timer.start()
        with self.lock:
            self.counts["sent"] += 1
        try:
            r = self.server.post("/generate", body, timeout=900)
        except (ServerError, OSError) as e:
            with self.lock:
                self.counts["errors"] += 1
                self.errors.append(f"{rid}: {e}"[:500])
            return
        finally:
            if timer is not None:
                timer.cancel()
        reason = (r.get("meta_info", {}).get("finish_reason") or {}).get("type")
        with self.lock:
            if reason == "abort":
                self.counts["aborted"] += 1
            else:
                self.counts["finished"] += 1
                self.counts["finished_image"] += bool(images)
                self.counts["abort_raced"] += abort          # finished before its abort arrived: recorded

    def _abort(self, rid: str) -> None:
        try:
            self.server.post("/abort_request", {"rid": rid}, timeout=60)
        except Exception as e:                              # the request may be gone already
            with self.lock:
                self.errors.append(f"abort {rid}: {e}"[:500])

    def run(self, concurrency: int) -> list[threading.Thread]:
        def loop():
            while not self.stop.is_set():
                self.one()
        threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        return threads


def kill_trainers(server) -> int:
    from sglang_ext.demo.traffic import trainer_pids
    pids = trainer_pids(server)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def log_problems(log_text: str) -> dict:
    lines = log_text.splitlines()
    errors = [ln for ln in lines if re.search(r"\bERROR\b", ln)]
    return {"error_lines": len(errors), "tracebacks": sum("Traceback (most recent call last)" in ln for ln in lines),
            "first_error_lines": errors[:10]}


def plot(result: dict, path: Path) -> Path | None:
    """Two panels sharing the time axis: the server's RSS on its own scale (a creep of a few MB shows), with the
    window means after warm-up, and the trainer's (it drops to 0 at each kill)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_offline_pipeline import pyplot
    plt = pyplot()
    if plt is None:
        return None
    s = result["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.0), sharex=True, height_ratios=(2, 1))
    t = [x["t"] / 60 for x in s]
    top.plot(t, [x["rss"]["server"] for x in s], lw=0.8, label="server processes")
    width = result.get("rss_server_window_min", 0)
    for i, (start, mean) in enumerate(result.get("rss_server_window_means", [])):
        top.hlines(mean, start, start + width, color="black", lw=1.5,
                   label=f"{width:g}-minute means after warm-up" if i == 0 else None)
    bottom.plot(t, [x["rss"]["trainer"] for x in s], color="tab:orange", lw=0.8, label="trainer")
    for ax in (top, bottom):
        for k in result["kills"]:
            ax.axvline(k["t"] / 60, color="tab:red", lw=0.5, ls=":")
        ax.axvline(result["settings"]["warmup_min"], color="grey", lw=0.8, ls="--",
                   label="end of warm-up" if ax is top else None)
        ax.set_ylabel("RSS (MB)")
        ax.legend(fontsize=8, loc="lower right")
    bottom.set_xlabel("minutes (dotted: trainer killed)")
    top.set_title(f"--online-train soak, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    f = result["final"]
    c = result["traffic"]
    rows = [
        ("machine", result["machine"]),
        ("traffic time (min)", f"{result['settings']['minutes']:g}"),
        ("requests sent / finished / aborted / image (finished)",
         f"{c['sent']} / {c['finished']} / {c['aborted']} / {c['finished_image']}"),
        ("server errors (HTTP, not aborts)", c["errors"]),
        ("server log: ERROR lines / tracebacks", f"{result['log']['error_lines']} / {result['log']['tracebacks']}"),
        ("records made / expected (finished requests)", f"{f['recorded']:.0f} / {c['finished']}"),
        ("records persisted / lost", f"{f['persisted']:.0f} / {f['persist_lost']:.0f}"),
        ("shards pruned (persist max bytes)", f"{f['pruned_shards']:.0f}"),
        ("persist dir at end (bytes) / limit", f"{result['persist_dir_bytes']} / {result['settings']['persist_max_bytes']}"),
        ("trainer kills / restarts counted", f"{len(result['kills'])} / {f['restarts']:.0f}"),
        ("swaps / draft version / trainer steps", f"{f['swaps']:.0f} / {f['version']:.0f} / {f['steps']:.0f}"),
        ("served tau over the run", f"{result['tau']:.2f}"),
        ("in-memory replay buffer at end (MB) / budget", f"{f['replay_bytes'] / 2**20:.0f} / {result['settings']['replay_budget']}"),
        ("server RSS after warm-up: first / last / max (MB)",
         " / ".join(f"{v:.0f}" for v in result["rss_server_after_warmup"])),
        ("server RSS slope after warm-up (MB/hour)", f"{result['rss_slope_mb_per_hour']['server']:.1f}"
         if result["rss_slope_mb_per_hour"]["server"] is not None else "n/a"),
        ("server RSS slope over the second half (MB/hour)", f"{result['rss_slope_second_half_mb_per_hour']:.1f}"
         if result.get("rss_slope_second_half_mb_per_hour") is not None else "n/a"),
        (f"server RSS, {result.get('rss_server_window_min', 0):g}-minute means after warm-up (MB)",
         ", ".join(f"{v:.0f}" for _, v in result.get("rss_server_window_means", [])) or "n/a"),
        ("trainer RSS slope after warm-up (MB/hour, across restarts)",
         f"{result['rss_slope_mb_per_hour']['trainer']:.1f}"
         if result["rss_slope_mb_per_hour"]["trainer"] is not None else "n/a"),
        ("server RSS growth after warm-up by process (MB)",
         ", ".join(f"{k} {v:+.0f}" for k, v in result.get("rss_growth_by_process", [])) or "n/a"),
        ("scheduler RSS growth after warm-up by mapping (MB)",
         ", ".join(f"{k} {v:+.0f}" for k, v in result.get("scheduler_growth_by_region", [])) or "n/a"),
        ("malloc_trim (replay buffer thread): calls / mean ms / RSS given back (MB)",
         f"{f.get('trims', 0):.0f} / {1e3 * f.get('trim_seconds', 0) / max(1.0, f.get('trims', 0)):.1f} / "
         f"{f.get('trim_released', 0) / 2**20:.0f}"),
    ]
    lines = ["| measure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="traffic time (default 30)")
    ap.add_argument("--warmup-min", type=float, default=5.0, help="minutes left out of the RSS slope (default 5)")
    ap.add_argument("--kill-every-min", type=float, default=4.0, help="SIGKILL the trainer this often (default 4)")
    ap.add_argument("--abort-rate", type=float, default=0.1, help="share of requests aborted mid-way (default 0.1)")
    ap.add_argument("--image-rate", type=float, default=0.25, help="share of requests with an image (default 0.25)")
    ap.add_argument("--persist-max-bytes", default="2MB",
                    help="--online-train-persist-max-bytes of the server: small, so it fills up (default 2MB)")
    ap.add_argument("--replay-budget", default="64MB",
                    help="--online-train-replay-budget of the server (default 64MB): small, so the in-memory replay "
                         "buffer (and the trainer's pool, same budget) is full within the warm-up and RSS after it "
                         "shows growth past the budgets, not the buffers filling up to them")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--workload-minutes", type=float, default=3.0, help="workload target budget (cached)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true", help="serve on CUDA instead of the torch_cpu platform")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="run nothing: recompute the RSS figures, table and plot of a saved soak_online_train.json "
                         "from its samples and write them to --out")
    args = ap.parse_args(argv)
    if args.report is not None:
        result = json.loads(args.report.read_text())
        st = result["settings"]
        result.update(rss_summary(result["samples"], st["minutes"], st["warmup_min"]))
        write_report(result, args.out)
        return verdict(result)

    from sglang_ext.demo.online import BLOCK_SIZE
    from sglang_ext.demo.traffic import TRAINER_MODULE, make_random_draft
    from sglang_ext.demo.workload import build_workload, record_prompt
    from sglang_ext.launcher import draft_args, launch_server

    args.out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, " + ("GPU" if args.gpu else "no GPU") +
               f", {platform.system()}")
    work = Path(tempfile.mkdtemp(prefix="soak-online-"))
    workload = build_workload(args.cache_dir, minutes=args.workload_minutes)
    draft = make_random_draft(workload.target_dir, work / "random-draft", block_size=BLOCK_SIZE)
    text_prompts = [record_prompt(r) for r in workload.prompts("A", "train") + workload.prompts("B", "train")]
    image_prompts = [record_prompt(r) for r in workload.prompts("image", "train")]
    persist = work / "persist"
    server_args = draft_args(draft, BLOCK_SIZE) + [
        "--online-train", "--online-train-lr", "1e-3", "--online-train-swap-every", "10",
        "--online-train-min-records", "8", "--online-train-persist-dir", str(persist),
        "--online-train-persist-max-bytes", str(args.persist_max_bytes),
        "--online-train-replay-budget", str(args.replay_budget),
        "--online-train-checkpoint-dir", str(work / "checkpoints")]
    if args.gpu:
        server_args += ["--dtype", "float32"]
    env = {"SGLANG_EXT_KEEP_LOGS": "1"}
    os.environ.update(env)
    samples, kills = [], []
    print(f"soak: {args.minutes:g} min, work dir {work}", flush=True)
    with launch_server(workload.target_dir, server_args, log_dir=work / "logs", cpu=not args.gpu,
                       name="soak", startup_timeout=900) as server:
        traffic = Traffic(server, text_prompts, image_prompts, max_new_tokens=args.max_new_tokens,
                          abort_rate=args.abort_rate, image_rate=args.image_rate, seed=args.seed)
        t0 = time.monotonic()
        threads = traffic.run(args.concurrency)
        next_kill = args.kill_every_min * 60
        head = f"{'min':>5} {'sent':>5} {'done':>5} {'abort':>5} {'err':>4} {'recorded':>8} {'lost':>5} " \
               f"{'pruned':>6} {'restarts':>8} {'version':>7} {'server MB':>9} {'trainer MB':>10}"
        print(head, flush=True)
        while (t := time.monotonic() - t0) < args.minutes * 60:
            time.sleep(min(args.sample_s, max(0.1, args.minutes * 60 - t)))
            t = time.monotonic() - t0
            if t >= next_kill:
                kills.append({"t": t, "killed": kill_trainers(server)})
                next_kill += args.kill_every_min * 60
            try:
                m = read_metrics(server)
            except Exception as e:                       # /metrics down would be a server error
                traffic.errors.append(f"/metrics: {e}"[:500])
                traffic.counts["errors"] += 1
                continue
            with traffic.lock:
                counts = dict(traffic.counts)
            s = {"t": t, "rss": process_rss(server, TRAINER_MODULE), "metrics": m, "traffic": counts,
                 "persist_dir_bytes": dir_bytes(persist)}
            samples.append(s)
            print(f"{t / 60:5.1f} {counts['sent']:5d} {counts['finished']:5d} {counts['aborted']:5d} "
                  f"{counts['errors']:4d} {m['recorded']:8.0f} {m['persist_lost']:5.0f} {m['pruned_shards']:6.0f} "
                  f"{m['restarts']:8.0f} {m['version']:7.0f} {s['rss']['server']:9.0f} {s['rss']['trainer']:10.0f}",
                  flush=True)
        traffic.stop.set()
        for th in threads:
            th.join(timeout=900)
        deadline = time.monotonic() + 120            # the buffer thread records the last requests
        while time.monotonic() < deadline:
            final = read_metrics(server)
            if final["recorded"] >= traffic.counts["finished"]:
                break
            time.sleep(1.0)
        time.sleep(3.0)
        final = read_metrics(server)
        log = log_problems(server.log_path.read_text(errors="replace"))
        alive = server.process.poll() is None
    result = {
        "machine": machine, "date": time.strftime("%Y-%m-%d"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "work_dir": str(work), "samples": samples, "kills": kills, "final": final, "traffic": traffic.counts,
        "errors": traffic.errors[:50], "log": log, "server_alive_at_end": alive,
        "persist_dir_bytes": dir_bytes(persist),
        "tau": final["accept_sum"] / max(1.0, final["accept_count"]),
        **rss_summary(samples, args.minutes, args.warmup_min),
    }
    write_report(result, args.out)
    return verdict(result)


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak_online_train.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    day = result.get("date") or time.strftime("%Y-%m-%d")
    (out / "soak_online_train.md").write_text(f"# --online-train soak ({day})\n\n{md}\n")
    png = plot(result, out / "soak_online_train.png")
    print("\n" + md)
    print(f"\nwrote {out / 'soak_online_train.json'}" + (f", {png}" if png else ""))


def verdict(result: dict) -> int:
    final, counts, alive = result["final"], result["traffic"], result["server_alive_at_end"]
    expected_ok = counts["finished"] <= final["recorded"] <= counts["finished"] + 1   # + SGLang's warm-up request
    ok = alive and counts["errors"] == 0 and expected_ok and final["persist_lost"] == 0
    print("soak: " + ("PASS" if ok else "FAIL") + f" (server alive {alive}, errors {counts['errors']}, "
          f"recorded {final['recorded']:.0f} for {counts['finished']} finished, "
          f"lost {final['persist_lost']:.0f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
