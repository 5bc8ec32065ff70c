#!/usr/bin/env python
"""Reward-stage makespan with four light reward workers: serial vs concurrent vs the MPS plan.

    python benchmarks/bench_mps.py --quick --csv benchmarks/results/local.csv   # < 1 min on a CPU
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

Rows are appended to ``--csv`` (only when given) through benchmarks/results.py, in the project's
long format with its header (op, backend, shape, dtype, metric, value, device, commit, timestamp,
command), so the file can be the one the other benchmarks write (gpu_check.sh's results.csv). op
``mps_reward_stage``; backend the configuration (``serial``, ``concurrent``, ``mps_plan`` /
``fallback_plan``, ``mps_noquota``, and the planner's ``greedy``, ``exact``, ``concurrent_share``);
shape the workload (``W=<workers>;B=;T=;HW=;iters=``); metrics ``predicted_makespan_s``,
``makespan_s`` (per reward call) and ``speedup_vs_serial``; device the GPU's name, or the CPU
model with ``(1 thread per worker)``; commit ``$TBK_COMMIT`` or git's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import tbkernels.mps as mps

OP = "mps_reward_stage"
PLAN_KEYS = ("serial", "concurrent", "concurrent_share", "greedy", "exact")


def _results():
    """benchmarks/results.py, imported only when rows are written: importing it asks torch.cuda
    whether there is a GPU, and this process leaves CUDA alone until its MPS runs are over.
    Run as a script this folder is already sys.path[0]; loaded by path (the tests do) it is put
    there only for this import: left there, it would shadow modules such as the tests' conftest
    in every process spawned afterwards."""
    here = str(Path(__file__).resolve().parent)
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        import results
    finally:
        if added:
            sys.path.remove(here)
    return results


def write_rows(path, plans: dict, measured: dict, shape: str, gpu_name: str | None,
               command: str, timestamp: str | None = None) -> int:
    """Append the predicted and measured makespans (and each measured configuration's speedup
    over ``serial``) to ``path`` through results.py's Recorder: the standard header and columns,
    one timestamp for the run. ``plans``: name -> object with ``predicted_makespan``; ``measured``:
    configuration -> seconds per call, ``serial`` included; ``timestamp``: the run's start (UTC,
    results.utc_now()'s format; default now). Returns the number of rows."""
    res = _results()
    device = gpu_name or f"{res.cpu_model()} (1 thread per worker)"
    rec = res.Recorder(enabled=True, device=device, commit=res.git_commit(), command=command,
                       timestamp=timestamp or res.utc_now())
    for key in PLAN_KEYS:
        if key in plans:
            rec.add(OP, key, shape, "float32", "predicted_makespan_s",
                    plans[key].predicted_makespan)
    serial = measured["serial"]
    for key, v in measured.items():
        rec.add(OP, key, shape, "float32", "makespan_s", v)
        rec.add(OP, key, shape, "float32", "speedup_vs_serial", serial / v)
    # No median_us / latency_us rows: finish() derives nothing from these, it only appends.
    rec.finish(Path(path))
    return len(rec.rows)


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
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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
        command = " ".join(["python benchmarks/bench_mps.py", *(argv if argv is not None
                                                                 else sys.argv[1:])])
        n = write_rows(args.csv, plans, measured, shape, device_name if on_gpu else None, command,
                       timestamp=started)
        say(f"appended {n} rows to {args.csv}")
    say(f"total {time.monotonic() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
