"""NVIDIA MPS quota manager for co-running light reward workers on one GPU (issue 5).

TeleBoost (seed 000, §6.1.2) co-runs a GRPO reward stage's lightweight reward workers under MPS
with per-worker SM quotas, grouping them so that T_reward = sum_g max_{w in g} C_w(q_w) is small
(Eq. 7-9). This package provides the three parts:

* profiles -- measure C_w(q) in fresh processes under ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
  (:func:`profile_workers`), save/load them with device and versions (:class:`ProfileSet`);
* planner  -- :func:`plan` (``greedy`` as in the report, ``exact`` to check it, ``serial`` and
  ``concurrent`` baselines), :func:`compare`, :func:`predict_makespan`;
* runtime  -- a private MPS daemon (:class:`MpsDaemon`) and :func:`run_plan` / :func:`run_groups`,
  which run groups in sequence and each group's workers concurrently (processes or Ray actors),
  collecting results and errors, killing hung workers, and falling back -- with a warning that
  says why -- when MPS is unavailable.

    import tbkernels.mps as mps
    p = mps.plan({"cnn": {25: 0.60, 50: 0.36, 100: 0.28},
                  "vit": {25: 0.90, 50: 0.50, 100: 0.33}}, method="greedy")
    print(p)                           # groups of (worker, quota_percent), predicted makespan

The command line is ``python -m tbkernels.mps {profile,plan,run,show}``; see docs/mps.md.
"""
from .daemon import (MpsDaemon, MpsUnavailable, MpsUnavailableWarning, gpu_info,
                     mps_available)
from .planner import Plan, compare, concurrent_makespan, plan, predict_makespan
from .profiles import (ProfileSet, ProfilingError, RuntimeCurve, environment_info, interpolate,
                       load_profiles, profile_workers, save_profiles, validate_profiles)
from .runtime import (RunReport, WorkerResult, WorkerSpec, resolve_backend, run_groups,
                      run_plan)
from .workers import (crashing_worker, failing_setup_worker, hanging_worker,
                      hard_crashing_worker, reward_worker, reward_workers, simulated_worker)

__all__ = [
    "MpsDaemon", "MpsUnavailable", "MpsUnavailableWarning", "gpu_info", "mps_available",
    "Plan", "compare", "concurrent_makespan", "plan", "predict_makespan",
    "ProfileSet", "ProfilingError", "RuntimeCurve", "environment_info", "interpolate",
    "load_profiles", "profile_workers", "save_profiles", "validate_profiles",
    "RunReport", "WorkerResult", "WorkerSpec", "resolve_backend", "run_groups", "run_plan",
    "crashing_worker", "failing_setup_worker", "hanging_worker", "hard_crashing_worker",
    "reward_worker", "reward_workers", "simulated_worker",
]
