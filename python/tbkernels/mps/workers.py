"""Ready-made :class:`~tbkernels.mps.runtime.WorkerSpec` builders.

* :func:`reward_workers` / :func:`reward_worker`: the four light reward workers of
  :mod:`tbkernels.mps.rewards` (small CNN, small ViT, sharpness, motion) on synthetic video.
* :func:`simulated_worker` and friends: workers that sleep for the runtime their profile gives
  at their quota, or crash, or hang -- for testing the runtime and demonstrating it on a CPU.

Targets point at the files by path, so a worker process imports torch only when the worker needs
it and never the whole tbkernels package (see ``_child.py``).
"""
from __future__ import annotations

import math
import os

from .profiles import RuntimeCurve, validate_profiles
from .runtime import WorkerSpec

_HERE = os.path.dirname(os.path.abspath(__file__))
SIM_FILE = os.path.join(_HERE, "_sim.py")
REWARDS_FILE = os.path.join(_HERE, "rewards.py")
REWARD_KINDS = ("cnn", "vit", "sharpness", "motion")


def reward_worker(kind: str, name: str | None = None, **kwargs) -> WorkerSpec:
    """One reward worker; ``kwargs`` go to the scorer factory (``batch``, ``frames``, ``size``,
    ``iters``, ``device``, ``threads``, ``seed``...), except ``warmup``/``repeats``/``timeout``/
    ``mem_limit`` which configure the WorkerSpec."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
    spec_kw = {k: kwargs.pop(k) for k in ("warmup", "repeats", "timeout", "mem_limit") if k in kwargs}
    spec_kw.setdefault("warmup", 1)  # first call pays for cuDNN/cuBLAS heuristics and allocations
    return WorkerSpec(name=name or kind, target=f"{REWARDS_FILE}:{kind}_scorer", kwargs=kwargs,
                      factory=True, **spec_kw)


def reward_workers(kinds=REWARD_KINDS, **kwargs) -> list[WorkerSpec]:
    """The benchmark's four workers with shared factory arguments."""
    return [reward_worker(k, **dict(kwargs)) for k in kinds]


def simulated_worker(name: str, profile, *, scale: float = 1.0, interp: str = "inv",
                     **spec_kw) -> WorkerSpec:
    """A worker whose call sleeps ``scale * C(q)`` seconds, C interpolated from ``profile``
    (``{quota: seconds}``) exactly as the planner does, at whichever quota it is given.

    The runtime table covers every integer percentage from the smallest profiled quota to 100 plus
    the profiled quotas (so any plan on an integer quota grid can be run); another quota makes the
    worker fail with a KeyError naming it.
    """
    curve = RuntimeCurve(validate_profiles({name: profile})[name], interp=interp, name=name)
    quotas = {float(q) for q in range(max(1, math.ceil(curve.min_quota)), 101)} | set(curve.quotas)
    table = {q: curve(q) for q in sorted(quotas)}
    return WorkerSpec(name=name, target=f"{SIM_FILE}:simulated",
                      kwargs={"table": table, "scale": float(scale)}, **spec_kw)


def crashing_worker(name: str, message: str = "simulated reward worker failure", **spec_kw) -> WorkerSpec:
    """Raises RuntimeError(message) when called."""
    return WorkerSpec(name=name, target=f"{SIM_FILE}:crash", kwargs={"message": message}, **spec_kw)


def hard_crashing_worker(name: str, code: int = 3, **spec_kw) -> WorkerSpec:
    """Kills its own process with ``os._exit(code)`` (no exception, no result), like a segfault."""
    return WorkerSpec(name=name, target=f"{SIM_FILE}:hard_crash", kwargs={"code": code}, **spec_kw)


def hanging_worker(name: str, **spec_kw) -> WorkerSpec:
    """Never returns; only its timeout ends it."""
    return WorkerSpec(name=name, target=f"{SIM_FILE}:hang", **spec_kw)


def failing_setup_worker(name: str, message: str = "simulated setup failure", **spec_kw) -> WorkerSpec:
    """A factory worker whose build raises ValueError(message)."""
    return WorkerSpec(name=name, target=f"{SIM_FILE}:failing_factory", kwargs={"message": message},
                      factory=True, **spec_kw)
