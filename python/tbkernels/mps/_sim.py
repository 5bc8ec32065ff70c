"""Simulated reward workers for tests and CPU demos: standard library only.

Loaded by the runtime's child process by file path (see ``tbkernels.mps.workers.simulated_worker``)
so that a simulated worker costs a bare Python start, not an import of torch.

``simulated`` sleeps for the runtime its profile gives at the quota it was assigned, so a run of a
plan should take what the plan predicts: the runtime's grouping, barriers, quota plumbing and
timing can then be checked against the planner on a machine with no GPU.
"""
import os
import threading
import time

QUOTA_ATTR = "tbk_mps_quota"


def current_quota(default=100.0):
    """The quota (percent) this worker was given: the runtime sets it as an attribute of the
    worker's thread (thread backends) and as TBK_MPS_QUOTA in the process environment; under MPS
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE holds the same number."""
    q = getattr(threading.current_thread(), QUOTA_ATTR, None)
    if q is not None:
        return float(q)
    for var in ("TBK_MPS_QUOTA", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        if os.environ.get(var):
            return float(os.environ[var])
    return float(default)


def simulated(table, scale=1.0):
    """Sleep ``scale * table[q]`` seconds where q is this worker's quota; ``table`` maps quota
    (percent) to seconds and must contain every quota the worker can be given."""
    q = current_quota()
    hit = [t for k, t in table.items() if abs(float(k) - q) < 1e-6]
    if not hit:
        raise KeyError(f"simulated worker has no runtime for quota {q:g} % "
                       f"(table covers {min(map(float, table)):g}..{max(map(float, table)):g})")
    seconds = hit[0] * scale
    time.sleep(seconds)
    # Report what the process was given, so tests can check the runtime's environment plumbing.
    return {"quota": q, "slept": seconds, "pid": os.getpid(),
            "env_quota": os.environ.get("TBK_MPS_QUOTA"),
            "mps_quota": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
            "mps_pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}


def crash(message="simulated reward worker failure"):
    raise RuntimeError(message)


def hard_crash(code=3):
    # Dies without Python's unwinding, like a segfault would: no exception, no result file.
    os._exit(code)


def hang():
    while True:
        time.sleep(3600)


def failing_factory(message="simulated setup failure"):
    raise ValueError(message)


def sleeper_factory(seconds=0.05):
    def step():
        time.sleep(seconds)
        return seconds
    return step
