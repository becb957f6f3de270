"""Adaptation you can trust: how well --online-train does on requests it never trained on, against a draft
trained offline to convergence on the same traffic, and how fast it recovers when the traffic changes
(real SGLang, CPU platform unless --gpu, DFLASH block size 4, the reference workload):

    python benchmarks/bench_adaptation.py [--phase-requests 500 300 300] [--policies uniform recency]

1. Online: for each replay policy (--online-train-replay-policy), a server starts from the same random draft
   with --online-train and serves three phases of the workload's train prompts, cycled, 4 in flight: code
   (domain A), then prose (B), then image prompts (the shifts). Every --window requests it serves --probes
   held-out prompts of the current domain (the eval split, opted out of training: custom_params
   {"online_train_opt_out": true}) and reads their served tau; at every phase boundary, the probes of all
   three domains (what the draft knows of each before the next shift: forgetting). The first policy's
   server persists its traffic (--online-train-persist-dir); probes are never persisted.
2. Offline reference: for each phase k, `python -m trainer.finetune` trains the same random draft on the shards
   persisted up to the end of phase k (all traffic so far), for --ref-minutes (a calibrated step count with
   a full cosine schedule; its loss curve is in the JSON), and a plain DFLASH server measures its served tau
   on the same probe sets.
3. Report: held-out tau against requests for each policy; per phase the reference, the online level at the
   end of the phase and its ratio, the requests the online draft needed to reach 0.9x the reference
   (goal: phase 1 within 500; after each shift within 300), forgetting. Table + <out>/adaptation.json +
   <out>/adaptation.png.

CPU cost with the defaults: about 12 minutes per policy and 4 per reference phase, ~35-40 min in all on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_offline_pipeline import Settings, calibrate_steps, pyplot, run_finetune  # noqa: E402

BLOCK_SIZE = 4
DOMAINS = (("A", "code"), ("B", "prose"), ("image", "images"))     # the phases, in order: two shifts
GOAL_RATIO = 0.9
GOAL_REQUESTS = (500, 300, 300)     # phase 1: reach GOAL_RATIO x reference within; after a shift: recover within
ONLINE_ARGS = ["--online-train-lr", "1e-3", "--online-train-swap-every", "10", "--online-train-min-records", "8"]


def wait_persisted(server, timeout: float = 120) -> dict:
    """Wait until every recorded request is in a shard; -> the counters."""
    from sglang_ext.launcher import metric_value
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        recorded = metric_value(text, "sglang:online_train_recorded_records_total")
        persisted = metric_value(text, "sglang:online_train_persisted_records_total")
        if persisted >= recorded or time.monotonic() > deadline:
            return {"recorded": recorded, "persisted": persisted}
        time.sleep(0.5)


def run_policy(policy: str, target_dir: Path, draft: Path, phases: list[dict], *, window: int, max_new_tokens: int,
               concurrency: int, log_dir: Path, persist: Path | None, gpu: bool) -> dict:
    """One online run through every phase; rows every `window` requests, all-domain probes at boundaries."""
    from sglang_ext.demo.traffic import online_metrics, probe_tau, send_traffic
    from sglang_ext.launcher import draft_args, launch_server
    from trainer.replay import read_manifest

    args = draft_args(draft, BLOCK_SIZE) + ["--online-train", "--online-train-replay-policy", policy] + ONLINE_ARGS
    if persist is not None:
        args += ["--online-train-persist-dir", str(persist)]
    if gpu:
        args += ["--dtype", "float32"]
    rows, boundaries, shards_at_end = [], [], []
    probe = lambda ps: probe_tau(server, ps, max_new_tokens=max_new_tokens, concurrency=concurrency)  # noqa: E731
    t0 = time.monotonic()
    with launch_server(target_dir, args, log_dir=log_dir, cpu=not gpu, name=f"adapt-{policy}") as server:
        served = 0
        for k, ph in enumerate(phases):
            boundaries.append({"before_phase": k, "requests": served,
                               "probe_tau": {p["domain"]: probe(p["probes"]) for p in phases}})
            print(f"[{policy}] phase {k + 1} ({ph['name']}): {ph['requests']} requests; held-out tau before: "
                  + ", ".join(f"{d} {t:.2f}" for d, t in boundaries[-1]["probe_tau"].items()), flush=True)
            i = 0
            while i < ph["requests"]:
                n = min(window, ph["requests"] - i)
                order = [(ph["offset"] + i + j) % len(ph["prompts"]) for j in range(n)]
                done = send_traffic(server, ph["prompts"], order, max_new_tokens=max_new_tokens,
                                    concurrency=concurrency)
                i += n
                served += n
                m = online_metrics(server)
                row = {"policy": policy, "phase": k, "domain": ph["domain"], "requests": served, "phase_requests": i,
                       "t": round(time.monotonic() - t0, 1),
                       "train_tau": statistics.fmean(s.accept_length for s in done),
                       "probe_tau": probe(ph["probes"]), "draft_version": m["draft_version"],
                       "trainer_steps": m["trainer_steps"], "trainer_loss": m["trainer_loss"],
                       "swaps": m["swaps_total"]}
                rows.append(row)
                print(f"[{policy}] {served:5d} requests ({ph['name']} {i:4d}) train tau {row['train_tau']:.2f} "
                      f"held-out tau {row['probe_tau']:.2f} version {row['draft_version']:.0f} "
                      f"steps {row['trainer_steps']:.0f} ({row['t'] / 60:.1f} min)", flush=True)
            if persist is not None:
                counts = wait_persisted(server)
                shards_at_end.append({"shards": len(read_manifest(persist)["shards"]), **counts})
        boundaries.append({"before_phase": len(phases), "requests": served,
                           "probe_tau": {p["domain"]: probe(p["probes"]) for p in phases}})
    return {"rows": rows, "boundaries": boundaries, "shards_at_end": shards_at_end,
            "wall_s": round(time.monotonic() - t0, 1)}


def replay_prefix(replay: Path, n_shards: int, out: Path) -> Path:
    """A replay directory holding the first `n_shards` shards of `replay` (links + a cut manifest)."""
    from trainer.replay import MANIFEST, read_manifest

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = read_manifest(replay)
    manifest["shards"] = manifest["shards"][:n_shards]
    for shard in manifest["shards"]:
        os.symlink(replay / shard["file"], out / shard["file"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def reference_drafts(replay: Path, shards_at_end: list[dict], target_dir: Path, random_draft: Path, work: Path,
                     s: Settings) -> list[dict]:
    """Phase k's reference: the random draft fine-tuned offline on all traffic persisted up to the end of k."""
    refs = []
    for k, cut in enumerate(shards_at_end):
        data = replay_prefix(replay, cut["shards"], work / f"replay-upto-{k}")
        calibration = calibrate_steps(data, target_dir, random_draft / "config.json", work, s, progress=False,
                                      init_from=random_draft)
        print(f"reference {k + 1}: finetune on {cut['persisted']:.0f} records ({cut['shards']} shards), "
              f"{calibration['max_steps']} steps (~{s.minutes:g} min) ...", flush=True)
        run = run_finetune(f"reference-{k}", data, target_dir, random_draft / "config.json", work / f"ref-{k}", s,
                           max_steps=calibration["max_steps"], max_minutes=3 * s.minutes, progress=False,
                           init_from=random_draft)
        losses = [r["loss"] for r in run.log if "loss" in r]
        tail = losses[-max(1, len(losses) // 5):]
        refs.append({"phase": k, "draft": str(work / f"ref-{k}"), "records": cut["persisted"],
                     "steps": run.steps, "wall_s": run.wall_s, "final_loss": run.final_loss,
                     "loss_last_fifth_mean": statistics.fmean(tail) if tail else None,
                     "loss_curve": [(r["step"], r["loss"]) for r in run.log if "loss" in r]})
    return refs


def serve_references(refs: list[dict], phases: list[dict], target_dir: Path, *, max_new_tokens: int,
                     concurrency: int, log_dir: Path, gpu: bool) -> None:
    from sglang_ext.demo.traffic import probe_tau
    from sglang_ext.launcher import draft_args, launch_server

    for ref in refs:
        args = draft_args(Path(ref["draft"]), BLOCK_SIZE) + (["--dtype", "float32"] if gpu else [])
        with launch_server(target_dir, args, log_dir=log_dir, cpu=not gpu, name=f"ref-{ref['phase']}") as server:
            ref["probe_tau"] = {p["domain"]: probe_tau(server, p["probes"], max_new_tokens=max_new_tokens,
                                                       concurrency=concurrency) for p in phases}
        print(f"reference {ref['phase'] + 1}: held-out tau "
              + ", ".join(f"{d} {t:.2f}" for d, t in ref["probe_tau"].items()), flush=True)


def summarize(policy_run: dict, refs: list[dict], phases: list[dict]) -> list[dict]:
    """Per phase: reference level, online level at the phase end, ratio, requests to reach GOAL_RATIO x ref."""
    out = []
    for k, ph in enumerate(phases):
        ref = refs[k]["probe_tau"][ph["domain"]]
        rows = [r for r in policy_run["rows"] if r["phase"] == k]
        start = policy_run["boundaries"][k]["probe_tau"][ph["domain"]]
        reached = next((r["phase_requests"] for r in rows if r["probe_tau"] >= GOAL_RATIO * ref), None)
        end = rows[-1]["probe_tau"]
        out.append({"phase": k, "domain": ph["domain"], "name": ph["name"], "reference_tau": ref,
                    "start_tau": start, "end_tau": end, "end_ratio": end / ref, "best_ratio": max(
                        r["probe_tau"] for r in rows) / ref,
                    # the same level measured on the gain over no speculation (tau 1): stricter when ref is near 1
                    "end_gain_ratio": (end - 1) / (ref - 1) if ref > 1.0 else None,
                    "requests_to_goal": reached, "goal_requests": GOAL_REQUESTS[min(k, len(GOAL_REQUESTS) - 1)],
                    "goal_met": reached is not None and reached <= GOAL_REQUESTS[min(k, len(GOAL_REQUESTS) - 1)]})
    return out


def report(result: dict) -> str:
    phases, refs = result["phases"], result["references"]
    lines = [f"bench_adaptation: {result['machine']}; DFlash block {BLOCK_SIZE}, 1-layer draft from random; "
             f"{result['settings']['concurrency']} in flight, {result['settings']['max_new_tokens']} new tokens; "
             f"held-out probes: {result['settings']['probes']} eval prompts per domain, opted out", "",
             "held-out served tau against requests served (every window):",
             "| requests | phase | " + " | ".join(f"{p} train | {p} held-out" for p in result["policies"]) + " |",
             "|" + " --- |" * (2 + 2 * len(result["policies"]))]
    by_policy = {p: result["online"][p]["rows"] for p in result["policies"]}
    for i, row in enumerate(by_policy[result["policies"][0]]):
        cells = " | ".join(f"{by_policy[p][i]['train_tau']:.2f} | {by_policy[p][i]['probe_tau']:.2f}"
                           for p in result["policies"])
        lines.append(f"| {row['requests']} | {phases[row['phase']]['name']} | {cells} |")
    lines += ["", "per phase (reference: the random draft fine-tuned offline on all traffic persisted so far):",
              "| phase | reference tau | policy | held-out tau at start | at end | end / ref | (end-1) / (ref-1) | "
              f"best / ref | requests to {GOAL_RATIO}x ref | goal |", "|" + " --- |" * 10]
    for p in result["policies"]:
        for s in result["summary"][p]:
            got = s["requests_to_goal"]
            gain = f"{s['end_gain_ratio']:.2f}" if s["end_gain_ratio"] is not None else "-"
            lines.append(f"| {s['phase'] + 1} {s['name']} | {s['reference_tau']:.2f} | {p} | {s['start_tau']:.2f} | "
                         f"{s['end_tau']:.2f} | {s['end_ratio']:.2f} | {gain} | {s['best_ratio']:.2f} | "
                         f"{got if got is not None else 'not reached'} | <= {s['goal_requests']}: "
                         f"{'met' if s['goal_met'] else 'NOT met'} |")
    lines += ["", "forgetting (held-out tau of every domain at each boundary):",
              "| policy | after | " + " | ".join(p["name"] for p in phases) + " |", "|" + " --- |" * (2 + len(phases))]
    for p in result["policies"]:
        for b in result["online"][p]["boundaries"][1:]:
            after = phases[b["before_phase"] - 1]["name"]
            lines.append(f"| {p} | {after} | " + " | ".join(f"{b['probe_tau'][ph['domain']]:.2f}" for ph in phases)
                         + " |")
    for ref in refs:
        lines.append(f"| reference {ref['phase'] + 1} (offline, {ref['steps']} steps, loss {ref['final_loss']:.3f}) "
                     f"| {phases[ref['phase']]['name']} | "
                     + " | ".join(f"{ref['probe_tau'][ph['domain']]:.2f}" for ph in phases) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    phases = result["phases"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, p in enumerate(result["policies"]):
        run = result["online"][p]
        for k, ph in enumerate(phases):        # each phase's curve starts at the probe before its first request
            b = run["boundaries"][k]
            rows = [r for r in run["rows"] if r["phase"] == k]
            ax.plot([b["requests"]] + [r["requests"] for r in rows],
                    [b["probe_tau"][ph["domain"]]] + [r["probe_tau"] for r in rows], marker="o", ms=3,
                    color=f"C{i}", label=f"online, {p} replay: held-out tau" if k == 0 else None)
    start = 0
    for k, ph in enumerate(phases):
        end = start + ph["requests"]
        ref = result["references"][k]["probe_tau"][ph["domain"]]
        ax.hlines(ref, start, end, colors="black", linestyles="--", lw=1,
                  label="offline reference (same traffic)" if k == 0 else None)
        ax.hlines(GOAL_RATIO * ref, start, end, colors="grey", linestyles=":", lw=1,
                  label=f"{GOAL_RATIO}x reference" if k == 0 else None)
        if k:
            ax.axvline(start, color="tab:red", lw=0.8)
        ax.text((start + end) / 2, 0.02, ph["name"], ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
        start = end
    ax.set_xlabel("requests served (training traffic)")
    ax.set_ylabel(f"served tau on held-out prompts (block {BLOCK_SIZE})")
    ax.set_title("online adaptation under domain shifts: code -> prose -> images", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-requests", type=int, nargs=3, default=[500, 300, 300], metavar=("CODE", "PROSE", "IMAGES"),
                    help="training requests per phase (default 500 300 300)")
    ap.add_argument("--policies", nargs="+", choices=["uniform", "recency"], default=["uniform", "recency"],
                    help="replay policies compared, one online run each (default both)")
    ap.add_argument("--window", type=int, default=50, help="requests between probes (default 50)")
    ap.add_argument("--probes", type=int, default=8, help="held-out prompts per domain (default 8)")
    ap.add_argument("--ref-minutes", type=float, default=3.0,
                    help="offline finetune budget per reference draft (default 3: where the offline curve of "
                         "bench_offline_pipeline levels off on this machine)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workload-minutes", type=float, default=3.0, help="workload target budget (default 3, cached)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--gpu", action="store_true", help="serve on the default (CUDA) platform")
    args = ap.parse_args(argv)
    if min(args.phase_requests) <= 0 or args.window <= 0 or args.probes <= 0:
        ap.error("--phase-requests, --window and --probes must be positive")

    from sglang_ext.demo.traffic import make_random_draft
    from sglang_ext.demo.workload import build_workload, record_prompt

    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-adaptation-"))
    workload = build_workload(args.cache_dir, minutes=args.workload_minutes)
    target_dir = workload.target_dir
    random_draft = make_random_draft(target_dir, work / "random-draft", block_size=BLOCK_SIZE)
    phases = []
    for (domain, name), n in zip(DOMAINS, args.phase_requests):
        phases.append({"domain": domain, "name": name, "requests": n, "offset": 0,
                       "prompts": [record_prompt(r) for r in workload.prompts(domain, "train")],
                       "probes": [record_prompt(r) for r in workload.prompts(domain, "eval")[:args.probes]]})
    print(f"workload {target_dir}; phases " + ", ".join(f"{p['name']} {p['requests']} requests "
                                                         f"({len(p['prompts'])} prompts cycled)" for p in phases),
          flush=True)
    online = {}
    replay = work / "replay"
    for i, policy in enumerate(args.policies):
        online[policy] = run_policy(policy, target_dir, random_draft, phases, window=args.window,
                                    max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                                    log_dir=work / "logs", persist=replay if i == 0 else None, gpu=args.gpu)
    s = Settings(minutes=args.ref_minutes, work_dir=str(work), draft_layers=1, threads=os.cpu_count() or 1)
    refs = reference_drafts(replay, online[args.policies[0]]["shards_at_end"], target_dir, random_draft, work, s)
    serve_references(refs, phases, target_dir, max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                     log_dir=work / "logs", gpu=args.gpu)
    result = {"settings": {**vars(args), "out": str(args.out), "cache_dir": str(args.cache_dir),
                           "reference_finetune": asdict(s), "online_args": ONLINE_ARGS},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores" + (", GPU" if args.gpu else ""),
              "policies": args.policies,
              "phases": [{k: v for k, v in p.items() if k not in ("prompts", "probes")} for p in phases],
              "online": online, "references": refs,
              "summary": {p: summarize(online[p], refs, phases) for p in args.policies}}
    result["wall_min"] = round((time.monotonic() - t_start) / 60, 1)
    text = report(result)
    print("\n" + text)
    (args.out / "adaptation.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / "adaptation.md").write_text(text + "\n")
    png = plot(result, args.out / "adaptation.png")
    print(f"\nwrote {args.out / 'adaptation.json'}, {args.out / 'adaptation.md'}, {png or '(no matplotlib: no PNG)'}; "
          f"{result['wall_min']} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
