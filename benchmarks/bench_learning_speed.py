"""Learning speed of --online-train: how fast a live server teaches a random DFlash draft, and an A/B against
another git revision in the same invocation.

    python benchmarks/bench_learning_speed.py [--compare REV] [--repeats N] [--requests 120] [--out DIR]

Every run: real SGLang on the torch_cpu platform serves a small learnable target with DFLASH (block 4), a random
DFlash draft (the same files for every run) and `--online-train` with every other flag at its default. The
target is the quick reference workload (`--target quick`, default: a tiny Qwen3-VL trained here for 30 s on
stdlib code, prose and images, whose greedy continuations of its 12 code prompts a draft can learn; built once,
cached) or the demo's (`--target workload`: 3 minutes, 200 code prompts). The run sends --requests greedy
requests of --max-new-tokens tokens one after the other (the code prompts, cycled) and reports, per window of
--window requests, the served accept length (from each response's meta_info) and the trainer's numbers on
/metrics; at the end of the traffic:

    accept length, first / last window    served, mean over the window's requests
    trainer steps, steps/s                 optimizer steps when the traffic ended, over the traffic's wall time
    tokens trained/s                       trainer tokens over the traffic's wall time
    trainer held-out tau                   the guard's offline tau of the live draft on its held-out slice
    swaps                                  draft versions swapped into the live decoder
    CPU cores: trainer / server            CPU seconds of the trainer process and of the rest of the server's
                                           processes over the traffic's wall time (they share the machine)

--compare REV runs the same at REV: a git worktree checked out to a temporary directory, put first on the
server's PYTHONPATH (the installed package's SGLang entry points then import REV's sglang_ext, and its
trainer process REV's trainer). Runs are interleaved with this checkout: current, REV, current, REV, ...
(--repeats pairs); with several repeats the table adds each revision's means. Prints the table and writes
<out>/learning_speed.json and <out>/learning_speed.png (accept length per window, trainer steps over time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BLOCK_SIZE = 4
METRICS = ("trainer_steps", "trainer_tokens", "heldout_accept_length", "swaps_total", "trainer_records",
           "draft_version", "rollbacks_total", "trainer_restarts_total", "trainer_hung_total")
FIGURES = ("accept_first", "accept_last", "steps", "steps_per_s", "tokens_per_s", "heldout_tau", "swaps",
           "trainer_cores", "server_cores")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.strip()


def describe_checkout() -> str:
    """HEAD's short sha, '+dirty' when tracked files have uncommitted changes."""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


class Worktree:
    """A detached git worktree of `rev` in a temporary directory (removed on exit)."""

    def __init__(self, rev: str):
        try:
            self.sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
        except subprocess.CalledProcessError:
            raise SystemExit(f"--compare {rev}: not a commit of {REPO_ROOT}") from None
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-learning-rev-"))
        self.path = self.tmp / self.sha[:10]

    def __enter__(self) -> "Worktree":
        git("worktree", "add", "--detach", str(self.path), self.sha)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=REPO_ROOT, capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def online_numbers(server) -> dict:
    """The trainer's numbers on /metrics (a name an older revision does not export reads 0)."""
    from sglang_ext.launcher import metric_value

    text = server.metrics()
    return {name: metric_value(text, "sglang:online_train_" + name) for name in METRICS}


def cpu_seconds(server) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the trainer process and by the rest of the server's processes."""
    import psutil

    from sglang_ext.demo.traffic import server_processes
    out = {"trainer": 0.0, "server": 0.0}
    for p in server_processes(server):
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())       # the trainer module of this checkout, or of an older one (--compare)
            out["trainer" if "online.trainer.worker" in cmd or "trainer_worker" in cmd else "server"] += t.user + t.system
        except psutil.Error:                     # a process that ended meanwhile
            pass
    return out


def run_once(label: str, code_root: Path, target_dir: Path, draft_dir: Path, prompts: list, args,
             log_dir: Path) -> dict:
    """One server with --online-train running the code at `code_root`: the traffic, its windows, the figures."""
    from sglang_ext.launcher import draft_args, launch_server

    pythonpath = [str(code_root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    server_args = draft_args(draft_dir, BLOCK_SIZE) + ["--online-train"] + list(args.server_arg)
    print(f"\n[{label}] code at {code_root}: starting the server", flush=True)
    accept: list[float] = []
    rows: list[dict] = []
    with launch_server(target_dir, server_args, log_dir=log_dir, name=f"learning-{label.split()[0]}",
                       env={"PYTHONPATH": os.pathsep.join(pythonpath)}) as server:
        t0, cpu0 = time.monotonic(), cpu_seconds(server)
        for i in range(args.requests):
            text, images = prompts[i % len(prompts)]
            r = server.generate(text, images, max_new_tokens=args.max_new_tokens)
            accept.append(float(r["meta_info"].get("spec_accept_length", 0.0)))
            if (i + 1) % args.window == 0 or i + 1 == args.requests:
                m = online_numbers(server)
                rows.append({"requests": i + 1, "t": time.monotonic() - t0,
                             "accept_length": statistics.fmean(accept[-args.window:]), **m})
                print(f"[{label}] {i + 1:4d} requests {rows[-1]['t']:5.0f}s  accept length "
                      f"{rows[-1]['accept_length']:.2f}  trainer steps {m['trainer_steps']:4.0f}  held-out tau "
                      f"{m['heldout_accept_length']:.2f}  swaps {m['swaps_total']:.0f}", flush=True)
        wall = time.monotonic() - t0
        final, cpu1 = online_numbers(server), cpu_seconds(server)
    w = args.window
    return {"label": label, "code": str(code_root), "wall_s": wall, "accept_lengths": accept, "rows": rows,
            "accept_first": statistics.fmean(accept[:w]), "accept_last": statistics.fmean(accept[-w:]),
            "steps": final["trainer_steps"], "steps_per_s": final["trainer_steps"] / wall,
            "tokens_per_s": final["trainer_tokens"] / wall, "heldout_tau": final["heldout_accept_length"],
            "swaps": final["swaps_total"], "final": final,
            "trainer_cores": (cpu1["trainer"] - cpu0["trainer"]) / wall,
            "server_cores": (cpu1["server"] - cpu0["server"]) / wall}


def summarize(runs: list[dict]) -> dict:
    """Each figure's mean over `runs` (one revision's)."""
    return {k: statistics.fmean(r[k] for r in runs) for k in FIGURES} | {"runs": len(runs)}


def table(runs: list[dict], summaries: dict[str, dict], window: int) -> str:
    lines = [f"| run | accept length, first {window} | last {window} | trainer steps | steps/s | tokens trained/s "
             f"| trainer held-out tau | swaps | CPU cores: trainer / server |", "|" + " --- |" * 9]

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r['accept_first']:.2f} | {r['accept_last']:.2f} | {r['steps']:.0f} | "
                f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['heldout_tau']:.2f} | {r['swaps']:.1f} | "
                f"{r['trainer_cores']:.2f} / {r['server_cores']:.2f} |")

    lines += [row(f"{i + 1}. {r['label']}", r) for i, r in enumerate(runs)]
    if any(s["runs"] > 1 for s in summaries.values()):
        lines += [row(f"mean of {s['runs']}: {label}", s) for label, s in summaries.items()]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> Path | None:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_offline_pipeline import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(r["label"] for r in runs))}
    for r in runs:
        label = r["label"] if r is next(x for x in runs if x["label"] == r["label"]) else None   # one legend entry
        ax.plot([x["requests"] for x in r["rows"]], [x["accept_length"] for x in r["rows"]], marker="o",
                color=colors[r["label"]], label=label)
        ax2.plot([x["t"] for x in r["rows"]], [x["trainer_steps"] for x in r["rows"]], marker="o",
                 color=colors[r["label"]], label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("requests served")
    ax.set_ylabel(f"served accept length (window mean, block {BLOCK_SIZE})")
    ax.legend(fontsize=8)
    ax2.set_xlabel("seconds of traffic")
    ax2.set_ylabel("trainer steps")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", metavar="REV", help="also run at this git revision (a worktree), interleaved "
                    "with this checkout")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each revision (default 1)")
    ap.add_argument("--requests", type=int, default=120, help="requests per run, one at a time (default 120)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per request (default 32)")
    ap.add_argument("--window", type=int, default=20, help="requests per row of the curve (default 20)")
    ap.add_argument("--target", choices=["quick", "workload"], default="quick",
                    help="the learnable target: the quick reference workload (default; 12 code prompts) or the "
                         "demo's (200 code prompts)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the workload is built (default $SGLANG_EXT_CACHE or ~/.cache/sglang_ext)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="an extra server argument for every run, repeated per token (e.g. "
                         "--server-arg=--online-train-lr --server-arg=1e-3)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                    help="where the JSON and the plot go (default benchmarks/results)")
    args = ap.parse_args(argv)
    for name in ("repeats", "requests", "max_new_tokens", "window"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.window > args.requests:
        ap.error("--window must not exceed --requests")

    from sglang_ext.demo.traffic import make_random_draft
    from sglang_ext.demo.workload import build_workload, record_prompt

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    quick = args.target == "quick"
    workload = build_workload(args.cache_dir, minutes=0.5 if quick else 3.0, quick=quick)
    prompts = [record_prompt(r) for r in workload.prompts("A", "train")]
    draft = make_random_draft(workload.target_dir, work / "random-draft", block_size=BLOCK_SIZE)
    current = describe_checkout()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (server and trainer share them)"
    print(f"target {workload.target_dir} ({len(prompts)} code prompts); random draft {draft}; machine: {machine}",
          flush=True)

    runs: list[dict] = []
    compare = Worktree(args.compare) if args.compare else None
    try:
        if compare is not None:
            compare.__enter__()
        for _ in range(args.repeats):
            runs.append(run_once(f"current ({current})", REPO_ROOT, workload.target_dir, draft, prompts, args,
                                 work / "logs"))
            if compare is not None:
                runs.append(run_once(f"{args.compare} ({compare.sha[:7]})", compare.path, workload.target_dir,
                                     draft, prompts, args, work / "logs"))
    finally:
        if compare is not None:
            compare.__exit__()

    labels = list(dict.fromkeys(r["label"] for r in runs))
    summaries = {label: summarize([r for r in runs if r["label"] == label]) for label in labels}
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/bench_learning_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "target": str(workload.target_dir), "block_size": BLOCK_SIZE, "runs": runs, "summary": summaries}
    (args.out / "learning_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(runs, args.out / "learning_speed.png", f"--online-train from a random DFlash draft, "
               f"{args.requests} sequential requests of {args.max_new_tokens} tokens ({machine})")
    print("\n" + table(runs, summaries, args.window))
    if len(labels) == 2:
        a, b = summaries[labels[0]], summaries[labels[1]]
        print(f"\ncurrent vs {args.compare}: accept length over the last {args.window} requests "
              f"{a['accept_last']:.2f} vs {b['accept_last']:.2f}; trainer steps {a['steps']:.0f} vs {b['steps']:.0f}")
    print(f"\nmachine: {machine}\nwrote {args.out / 'learning_speed.json'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
