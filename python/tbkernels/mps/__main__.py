"""``python -m tbkernels.mps``: profile reward workers, plan groups and quotas, run, show.

    python -m tbkernels.mps status
    python -m tbkernels.mps profile --rewards cnn,vit,sharpness,motion --quotas 25,50,75,100 -o prof.json
    python -m tbkernels.mps profile --worker mine=my_pkg.rewards:make_scorer --factory -o prof.json
    python -m tbkernels.mps plan prof.json -o plan.json
    python -m tbkernels.mps run plan.json --profiles prof.json
    python -m tbkernels.mps show plan.json

Progress goes to stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _pairs(items, what):
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: {what} must look like NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _json_arg(text, what):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {what}: not valid JSON ({e}): {text!r}") from None


def cmd_status(args) -> int:
    from .daemon import gpu_info, mps_available
    from .runtime import resolve_backend
    ok, reason = mps_available(args.device)
    print(f"MPS usable: {'yes' if ok else 'no'} -- {reason}")
    gpu = gpu_info(args.device)
    print(f"GPU {args.device}: {json.dumps(gpu) if gpu else 'none'}")
    chosen, why = resolve_backend("auto", device=args.device, warn=False)
    print(f"backend='auto' would use: {chosen} ({why})")
    return 0


def cmd_profile(args) -> int:
    from .profiles import ProfilingError, load_profiles, profile_workers
    from .runtime import WorkerSpec
    from .workers import REWARD_KINDS, reward_worker, simulated_worker

    specs = []
    if args.rewards:
        kw = _json_arg(args.reward_kwargs, "--reward-kwargs") if args.reward_kwargs else {}
        for kind in args.rewards.split(","):
            kind = kind.strip()
            if kind not in REWARD_KINDS:
                raise SystemExit(f"error: --rewards: unknown kind {kind!r} (choose from {REWARD_KINDS})")
            specs.append(reward_worker(kind, **kw))
    kwargs = {k: _json_arg(v, f"--kwargs {k}=") for k, v in _pairs(args.kwargs, "--kwargs").items()}
    targets = _pairs(args.worker, "--worker")
    unknown = sorted(set(kwargs) - set(targets))
    if unknown:
        raise SystemExit(f"error: --kwargs for {', '.join(map(repr, unknown))}, which no --worker "
                         f"names (workers: {', '.join(map(repr, targets)) or 'none'})")
    for name, target in targets.items():
        specs.append(WorkerSpec(name=name, target=target, kwargs=kwargs.get(name, {}),
                                factory=args.factory))
    if args.simulate:
        for name, table in load_profiles(args.simulate).items():
            specs.append(simulated_worker(name, table, scale=args.scale))
    if not specs:
        raise SystemExit("error: nothing to profile: give --rewards, --worker or --simulate")
    try:
        ps = profile_workers(specs, args.quotas, repeats=args.repeats, warmup=args.warmup,
                             backend=args.backend, timeout=args.timeout, device=args.device,
                             progress=True)
    except ProfilingError as e:
        # keep what was measured: the other workers' timings may have taken an hour
        kept = ""
        if e.partial is not None:
            root, ext = os.path.splitext(args.output)
            partial_path = f"{root}.partial{ext or '.json'}"
            e.partial.save(partial_path)
            kept = (f"; the {len(e.partial)} measured workers ({', '.join(e.partial)}) were "
                    f"written to {partial_path}")
        print(f"error: {e}{kept}", file=sys.stderr)
        return 1
    ps.save(args.output)
    print(f"wrote {args.output}: {len(ps)} workers x {len(args.quotas)} quotas, backend "
          f"{ps.meta['backend']} (quota enforced: {ps.meta['quota_enforced']})")
    _print_profiles(ps)
    return 0


def cmd_plan(args) -> int:
    from .planner import compare, plan
    from .profiles import load_profiles

    ps = load_profiles(args.profiles)
    if ps.meta.get("quota_enforced") is False:
        print(f"warning: these profiles were measured without MPS ({ps.meta.get('backend_reason')}); "
              "quotas were not enforced, so C(q) says little about real MPS runtimes", file=sys.stderr)
    plans = compare(ps, quota_step=args.step, interp=args.interp)
    serial = plans["serial"].predicted_makespan
    print(f"{'plan':<18}{'predicted makespan':>20}{'vs serial':>11}  groups")
    for key, p in plans.items():
        groups = " | ".join(", ".join(f"{w}@{q:g}" for w, q in g) for g in p.groups)
        print(f"{key:<18}{p.predicted_makespan:>18.4g} s{serial / p.predicted_makespan:>10.2f}x  {groups}")
    if "exact" in plans:
        gap = plans["greedy"].predicted_makespan / plans["exact"].predicted_makespan - 1
        print(f"greedy is {100 * gap:.2f} % above the exact optimum on this grid")
    chosen = plans.get(args.method) or plan(ps, args.method, quota_step=args.step, interp=args.interp)
    print()
    print(chosen)
    if args.output:
        chosen.save(args.output)
        print(f"wrote {args.output}")
    return 0


def cmd_run(args) -> int:
    from .planner import Plan
    from .profiles import load_profiles
    from .runtime import WorkerSpec, run_plan

    p = Plan.load(args.plan)
    ps = load_profiles(args.profiles)
    workers = {}
    for name in p.workers:
        if name not in ps.workers or "target" not in ps.workers[name]:
            raise SystemExit(f"error: {args.profiles} does not record how to build worker {name!r}")
        workers[name] = WorkerSpec.from_description(name, ps.workers[name])
    report = run_plan(p, workers, backend=args.backend, timeout=args.timeout, executor=args.executor,
                      prestart=args.prestart, device=args.device, progress=True)
    print(report)
    print(f"predicted {p.predicted_makespan:.4g} s, measured {report.makespan:.4g} s")
    return 0 if report.ok else 1


def _print_profiles(ps) -> None:
    quotas = sorted({q for t in ps.values() for q in t})
    print(f"{'worker':<14}" + "".join(f"{q:>10g}%" for q in quotas))
    for w, t in ps.items():
        print(f"{w:<14}" + "".join(f"{t[q]:>10.4g}s" if q in t else f"{'-':>11}" for q in quotas))


def cmd_show(args) -> int:
    from .planner import PLAN_FORMAT, Plan
    from .profiles import ProfileSet

    with open(args.file) as f:
        data = json.load(f)
    if isinstance(data, dict) and data.get("format") == PLAN_FORMAT:
        print(Plan.from_dict(data))
        return 0
    ps = ProfileSet.from_dict(data)
    meta = ps.meta
    dev = meta.get("device", {})
    print(f"profiles: {len(ps)} workers; device {dev.get('name')} ({dev.get('kind')}); "
          f"versions {json.dumps(meta.get('versions', {}))}")
    if "backend" in meta:
        print(f"measured with backend {meta['backend']} -- quota enforced: {meta.get('quota_enforced')}"
              f" ({meta.get('backend_reason')})")
    _print_profiles(ps)
    for f_ in meta.get("failures", []):
        print(f"  failed: {f_['worker']} @ {f_['quota']:g}%: {f_['status']}: {f_['error']}")
    return 0


def _format_warning(message, category, filename, lineno, line=None):
    # a command line's warnings are for its user: "warning: ...", without the "<frozen runpy>:88:
    # MpsUnavailableWarning:" location that Python's default format adds
    return f"warning: {message}\n"


def main(argv=None) -> int:
    import warnings
    saved = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _main(argv)
    finally:                    # main() called from Python: leave its warnings as they were
        warnings.formatwarning = saved


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m tbkernels.mps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=int, default=0, help="GPU index (default 0)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    sub.add_parser("status", help="can MPS run here, and what 'auto' would do")

    pp = sub.add_parser("profile", help="measure C_w(q) for workers at quotas; write JSON")
    pp.add_argument("--rewards", help="built-in reward workers, e.g. cnn,vit,sharpness,motion")
    pp.add_argument("--reward-kwargs", help='JSON kwargs for the built-in workers, e.g. \'{"batch": 8}\'')
    pp.add_argument("--worker", action="append", metavar="NAME=TARGET",
                    help="a worker by import path 'pkg.mod:fn' or '/file.py:fn' (repeatable)")
    pp.add_argument("--kwargs", action="append", metavar="NAME=JSON", help="kwargs for --worker NAME")
    pp.add_argument("--factory", action="store_true",
                    help="--worker targets are factories returning the callable to time")
    pp.add_argument("--simulate", metavar="PROFILES_JSON",
                    help="simulated workers that sleep C(q) from these profiles (for testing)")
    pp.add_argument("--scale", type=float, default=1.0, help="time scale for --simulate")
    pp.add_argument("--quotas", type=_floats, default=[25.0, 50.0, 75.0, 100.0])
    pp.add_argument("--repeats", type=int, default=3)
    pp.add_argument("--warmup", type=int, default=1)
    pp.add_argument("--backend", default="auto", choices=["auto", "mps", "process", "green"])
    pp.add_argument("--timeout", type=float, default=600.0)
    pp.add_argument("-o", "--output", required=True)

    pl = sub.add_parser("plan", help="plan groups and quotas from profiles; compare with baselines")
    pl.add_argument("profiles")
    pl.add_argument("--method", default="greedy", choices=["greedy", "exact", "serial", "concurrent"])
    pl.add_argument("--step", type=float, default=5.0, help="quota grid step in percent")
    pl.add_argument("--interp", default="inv", choices=["inv", "linear"])
    pl.add_argument("-o", "--output")

    pr = sub.add_parser("run", help="run a saved plan with the workers recorded in the profiles")
    pr.add_argument("plan")
    pr.add_argument("--profiles", required=True)
    pr.add_argument("--backend", default="auto", choices=["auto", "mps", "process", "threads", "green"])
    pr.add_argument("--executor", default="process", choices=["process", "ray"])
    pr.add_argument("--prestart", default="group", choices=["group", "all"])
    pr.add_argument("--timeout", type=float, default=600.0)

    ps = sub.add_parser("show", help="pretty-print a saved plan or profiles")
    ps.add_argument("file")

    args = ap.parse_args(argv)
    command = {"status": cmd_status, "profile": cmd_profile, "plan": cmd_plan, "run": cmd_run,
               "show": cmd_show}[args.cmd]
    from .daemon import MpsUnavailable
    try:
        return command(args)
    except (OSError, ValueError, TypeError, MpsUnavailable) as e:
        # a missing or malformed file, a bad profile, MPS refused: the user's to fix, said in
        # one line (TBK_DEBUG=1 shows the traceback)
        if os.environ.get("TBK_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}  (TBK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
