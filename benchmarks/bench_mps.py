#!/usr/bin/env python
"""Reward-stage makespan with four light reward workers: serial vs concurrent vs the MPS plan.

    python benchmarks/bench_mps.py --quick --csv benchmarks/results/mps.csv     # < 1 min on a CPU
    python benchmarks/bench_mps.py --csv OUT/mps.csv                          # a GPU machine

The workers (tbkernels.mps.rewards) are a small CNN scorer and a small ViT scorer with random
weights, a sharpness metric (variance of the Laplacian) and a motion metric (mean frame
difference), all scoring the same synthetic video batch. Steps:

1. profile C_w(q) for each worker at a few quotas, each point in a fresh process with
   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set before CUDA starts (under a private MPS daemon);
2. plan groups and quotas (greedy, checked against exact) and predict every plan's makespan;
3. measure the makespan of: ``serial`` (one worker after another, no MPS), ``concurrent`` (all at
   once, no MPS: the GPU time-slices between the processes), ``mps_plan`` (the greedy plan under
   MPS) and, with MPS, ``mps_noquota`` (all at once under MPS without quotas).

Without a GPU or without MPS the workers run on the CPU / without quotas, the script says so, and
the planned run is labelled ``fallback_plan``: it measures the fallback, not MPS. Issue 5's GPU
acceptance (plan >= 1.5x serial and >= 10 % faster than concurrent) is checked and printed only
when the planned run really used MPS.

Rows are appended to ``--csv`` in the project's long format
(op, backend, shape, dtype, metric, value, device, commit).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time

import tbkernels.mps as mps

CSV_COLUMNS = ["op", "backend", "shape", "dtype", "metric", "value", "device", "commit"]


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def append_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def say(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 quotas, 3 rounds (CPU: < 1 min)")
    ap.add_argument("--csv", help="append result rows to this CSV")
    ap.add_argument("--out-dir", help="also write profiles.json and plan.json here")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--quotas", help="comma-separated quotas to profile (default 10,25,50,75,100; quick: 50,100)")
    ap.add_argument("--rounds", type=int, help="reward calls per worker in each measured run (quick: 3, else 10)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--iters", type=int, help="forward passes per reward call")
    args = ap.parse_args(argv)

    t_all = time.monotonic()
    ok, reason = mps.mps_available(args.device)
    gpu = mps.gpu_info(args.device)
    on_gpu = gpu is not None
    device_name = gpu["name"] if on_gpu else "cpu"
    if ok:
        say(f"MPS available: {reason}")
    else:
        say(f"MPS NOT available: {reason}")
        say("=> the planned run measures the fallback (no quotas), labelled fallback_plan"
            + ("" if on_gpu else "; no GPU: the reward workers run on the CPU"))

    # Sizes: on a GPU the workers must be light (one alone should not fill an H100) for
    # co-running to pay off; on a CPU, one thread per worker plays that role (2 cores, 4 workers).
    quick = args.quick
    batch = args.batch or (2 if quick else 4)
    frames = args.frames or (8 if quick else 16)
    size = args.size or (64 if (quick or not on_gpu) else 128)
    iters = args.iters or 4
    rounds = args.rounds or (3 if quick else 10)
    quotas = [float(q) for q in (args.quotas or ("50,100" if quick else "10,25,50,75,100")).split(",")]
    common = dict(batch=batch, frames=frames, size=size, iters=iters,
                  device="cuda" if on_gpu else "cpu", threads=None if on_gpu else 1)
    workers = mps.reward_workers(**common)
    by_name = {w.name: w for w in workers}
    shape = f"W={len(workers)};B={batch};T={frames};HW={size};iters={iters}"
    say(f"workers: {[w.name for w in workers]} on {common['device']}, video [{batch}, {frames}, 3, {size}, {size}]")

    # 1. profiles
    say(f"\n== profiling at quotas {quotas} ({'MPS' if ok else 'quotas NOT enforced'})")
    profiles = mps.profile_workers(workers, quotas, repeats=2 if quick else 5, warmup=1,
                                   backend="auto", device=args.device, progress=say)

    # 2. plans
    plans = mps.compare(profiles)
    greedy, serial_plan, conc_plan = plans["greedy"], plans["serial"], plans["concurrent"]
    say("\n== plans (predicted)")
    for key, p in plans.items():
        groups = " | ".join(", ".join(f"{w}@{q:g}" for w, q in g) for g in p.groups)
        say(f"  {key:<17} {p.predicted_makespan:9.4f} s   {groups}")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        profiles.save(os.path.join(args.out_dir, "profiles.json"))
        greedy.save(os.path.join(args.out_dir, "plan.json"))

    # 3. measurements
    # Each configuration is one launch in which every worker makes `rounds` consecutive reward
    # calls (as a long-lived reward worker would, step after step); the makespan is reported per
    # call. This keeps process start-up and model building (outside the timed region anyway) from
    # multiplying with the number of rounds.
    timed = {n: w.replace(repeats=rounds) for n, w in by_name.items()}

    def measure(label, plan, backend):
        rep = mps.run_plan(plan, timed, backend=backend, prestart="all", device=args.device,
                           timeout=600)
        if not rep.ok:
            say(str(rep))
            raise SystemExit(f"{label}: a worker failed; see above")
        per_call = rep.makespan / rounds
        say(f"  {label:<17} {per_call:9.4f} s per call   ({rounds} calls; backend {rep.backend}; "
            f"groups {', '.join(f'{t / rounds:.4f}' for t in rep.group_times)})")
        return per_call, rep

    say("\n== measured makespan")
    measured = {}
    measured["serial"], _ = measure("serial", serial_plan, "process")
    measured["concurrent"], _ = measure("concurrent", conc_plan, "process")
    plan_label = "mps_plan" if ok else "fallback_plan"
    measured[plan_label], plan_rep = measure(plan_label, greedy, "auto")
    if plan_rep.backend != "mps" and ok:  # MPS looked available but the daemon would not start
        plan_label = "fallback_plan"
        measured[plan_label] = measured.pop("mps_plan")
        say(f"  (the MPS daemon could not start: {plan_rep.backend_reason})")
    if plan_rep.backend == "mps":
        noquota = mps.Plan(method="mps_noquota", groups=conc_plan.groups, predicted_makespan=float("nan"),
                           group_times=[float("nan")])
        measured["mps_noquota"], _ = measure("mps_noquota", noquota, "mps")

    s, c, p = measured["serial"], measured["concurrent"], measured[plan_label]
    say(f"\nplan vs serial: {s / p:.2f}x   plan vs concurrent: {c / p:.2f}x   "
        f"(predicted plan {greedy.predicted_makespan:.4f} s, measured {p:.4f} s)")
    if plan_rep.backend == "mps":
        say(f"acceptance (issue 5): plan >= 1.5x serial: {'PASS' if s / p >= 1.5 else 'FAIL'}; "
            f"plan >= 10 % faster than concurrent: {'PASS' if c / p >= 1.10 else 'FAIL'}")
    else:
        say("acceptance thresholds apply to MPS on a GPU only; this run measured the fallback: "
            + plan_rep.backend_reason)

    if args.csv:
        commit, dev = git_commit(), device_name.replace(",", " ")
        rows = []
        for key in ("serial", "concurrent", "concurrent_share", "greedy", "exact"):
            if key in plans:
                rows.append(dict(op="mps_reward_stage", backend=key, shape=shape, dtype="float32",
                                 metric="predicted_makespan_s", value=f"{plans[key].predicted_makespan:.6g}",
                                 device=dev, commit=commit))
        for key, v in measured.items():
            rows.append(dict(op="mps_reward_stage", backend=key, shape=shape, dtype="float32",
                             metric="makespan_s", value=f"{v:.6g}", device=dev, commit=commit))
            rows.append(dict(op="mps_reward_stage", backend=key, shape=shape, dtype="float32",
                             metric="speedup_vs_serial", value=f"{s / v:.4g}", device=dev, commit=commit))
        append_csv(args.csv, rows)
        say(f"appended {len(rows)} rows to {args.csv}")
    say(f"total {time.monotonic() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
