"""Per-worker scaling profiles C_w(q): validation, interpolation, JSON, and measurement.

A profile maps a worker name to ``{quota_percent: seconds}``: the runtime of one reward-stage call of
that worker when its process is limited to ``quota_percent`` of the GPU's threads by MPS
(``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``). TeleBoost (seed 000, §6.1.2) guides its planner with exactly
these "per-worker scaling profiles (measured runtime under different quotas)".

Interpolation between profiled quotas is piecewise linear in 1/q by default (``interp="inv"``):
on each segment C(q) = a + b/q, which is Amdahl's law for a worker with a serial part a and a part b
that scales with the number of SMs. It reproduces such a worker exactly from two measurements, where
linear-in-q interpolation would overestimate the runtime between them. ``interp="linear"`` is
offered for comparison. Above the largest profiled quota the runtime is flat (the value at that
quota: we never extrapolate a speed-up we did not measure); below the smallest profiled quota it is
undefined and asking for it raises ``ValueError``.
"""
from __future__ import annotations

import bisect
import datetime
import json
import math
import numbers
import os
import platform
import statistics
import sys
from typing import Any, Iterable, Mapping

PROFILES_FORMAT = "tbkernels.mps.profiles"
FORMAT_VERSION = 1
INTERP_MODES = ("inv", "linear")


# ----------------------------------------------------------------------------------- validation
def _as_quota(key: Any, worker: str) -> float:
    # JSON object keys are always strings, so "50" is accepted as 50; anything else must be a real
    # number. bool is an int subclass but True as a quota is a bug, not 1 %.
    if isinstance(key, bool):
        raise TypeError(f"profiles[{worker!r}]: quota {key!r} is a bool; expected a percentage in (0, 100]")
    if isinstance(key, str):
        try:
            q = float(key)
        except ValueError:
            raise TypeError(f"profiles[{worker!r}]: quota {key!r} is not a number; "
                            "expected a percentage in (0, 100]") from None
    elif isinstance(key, numbers.Real):
        q = float(key)
    else:
        raise TypeError(f"profiles[{worker!r}]: quota {key!r} has type {type(key).__name__}; "
                        "expected a number (percent) in (0, 100]")
    if not math.isfinite(q) or not 0.0 < q <= 100.0:
        raise ValueError(f"profiles[{worker!r}]: quota {key!r} is outside (0, 100] "
                         "(quotas are percentages of the GPU's threads)")
    return q


def _as_runtime(value: Any, worker: str, quota: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"profiles[{worker!r}][{quota:g}]: runtime {value!r} has type "
                        f"{type(value).__name__}; expected seconds as a positive number")
    t = float(value)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"profiles[{worker!r}][{quota:g}]: runtime {value!r} must be a positive, "
                         "finite number of seconds")
    return t


def validate_profiles(profiles: Any) -> dict[str, dict[float, float]]:
    """Check ``profiles`` and return it normalised: ``{worker: {quota (float, ascending): seconds}}``.

    Raises ``TypeError`` for wrong types and ``ValueError`` for empty profiles, quotas outside
    (0, 100], duplicate quotas ("50" and 50) and non-positive or non-finite runtimes. Every message
    names the worker and quota at fault.
    """
    if isinstance(profiles, ProfileSet):
        profiles = profiles.runtimes
    if not isinstance(profiles, Mapping):
        raise TypeError(f"profiles must be a mapping {{worker: {{quota_percent: seconds}}}}, "
                        f"got {type(profiles).__name__}")
    if not profiles:
        raise ValueError("profiles is empty: need at least one worker with at least one profiled quota")
    out: dict[str, dict[float, float]] = {}
    for worker, table in profiles.items():
        if not isinstance(worker, str):
            raise TypeError(f"profiles: worker name {worker!r} must be a str, got {type(worker).__name__}")
        if not worker:
            raise ValueError("profiles: worker name must not be empty")
        if not isinstance(table, Mapping):
            raise TypeError(f"profiles[{worker!r}] must be a mapping {{quota_percent: seconds}}, "
                            f"got {type(table).__name__}")
        if not table:
            raise ValueError(f"profiles[{worker!r}] is empty: profile at least one quota (ideally 100)")
        clean: dict[float, float] = {}
        for key, value in table.items():
            q = _as_quota(key, worker)
            if q in clean:
                raise ValueError(f"profiles[{worker!r}]: quota {q:g} appears twice (keys {key!r} and an "
                                 "earlier one that means the same percentage)")
            clean[q] = _as_runtime(value, worker, q)
        out[worker] = dict(sorted(clean.items()))
    return out


# -------------------------------------------------------------------------------- interpolation
class RuntimeCurve:
    """C(q) for one worker from its profiled points.

    ``interp="inv"`` (default): linear in 1/q between neighbouring profiled quotas (C = a + b/q on
    each segment). ``interp="linear"``: linear in q. Exact at profiled quotas, flat above the largest
    one, ``ValueError`` below the smallest one.
    """

    __slots__ = ("name", "quotas", "runtimes", "interp")

    def __init__(self, table: Mapping[Any, Any], interp: str = "inv", name: str = "worker"):
        if interp not in INTERP_MODES:
            raise ValueError(f"interp must be one of {INTERP_MODES}, got {interp!r}")
        clean = validate_profiles({name: table})[name]
        self.name = name
        self.quotas = list(clean)
        self.runtimes = list(clean.values())
        self.interp = interp

    @property
    def min_quota(self) -> float:
        return self.quotas[0]

    @property
    def max_quota(self) -> float:
        return self.quotas[-1]

    def __call__(self, q: float) -> float:
        q = float(q)
        if not math.isfinite(q) or q <= 0.0 or q > 100.0 + 1e-9:
            raise ValueError(f"{self.name}: quota {q!r} is outside (0, 100]")
        # A hair of tolerance so a grid quota computed as 5*k equals a profiled 15.0 etc.
        if q < self.quotas[0] - 1e-9:
            raise ValueError(f"{self.name}: quota {q:g} % is below the smallest profiled quota "
                             f"{self.quotas[0]:g} %; runtimes are not extrapolated downwards "
                             "(profile that quota, or plan with a coarser grid)")
        if q >= self.quotas[-1]:
            return self.runtimes[-1]
        i = bisect.bisect_right(self.quotas, q)
        q0, q1 = self.quotas[i - 1], self.quotas[i]
        t0, t1 = self.runtimes[i - 1], self.runtimes[i]
        if q <= q0:  # within tolerance of the lower point
            return t0
        if self.interp == "inv":
            w = (1.0 / q0 - 1.0 / q) / (1.0 / q0 - 1.0 / q1)
        else:
            w = (q - q0) / (q1 - q0)
        return t0 + w * (t1 - t0)

    def __repr__(self) -> str:
        pts = ", ".join(f"{q:g}:{t:.4g}" for q, t in zip(self.quotas, self.runtimes))
        return f"RuntimeCurve({self.name!r}, {{{pts}}}, interp={self.interp!r})"


def interpolate(table: Mapping[Any, Any], quota: float, interp: str = "inv") -> float:
    """Runtime of one worker at ``quota`` percent from its ``{quota: seconds}`` profile."""
    return RuntimeCurve(table, interp=interp)(quota)


# ----------------------------------------------------------------------------------- ProfileSet
class ProfileSet(Mapping):
    """Profiles plus where they came from; a read-only mapping ``{worker: {quota: seconds}}``.

    ``meta`` holds the device, versions, whether MPS enforced the quotas while measuring, the
    backend and its reason; ``samples`` the individual timings behind each median; ``workers`` the
    worker definitions (target, kwargs, factory) so a later ``run`` can rebuild them.
    """

    def __init__(self, runtimes: Mapping, meta: Mapping | None = None,
                 samples: Mapping | None = None, workers: Mapping | None = None):
        self.runtimes = validate_profiles(runtimes)
        self.meta = dict(meta or {})
        self.samples = {w: {float(q): list(v) for q, v in s.items()} for w, s in (samples or {}).items()}
        self.workers = {w: dict(d) for w, d in (workers or {}).items()}

    def __getitem__(self, worker):
        return self.runtimes[worker]

    def __iter__(self):
        return iter(self.runtimes)

    def __len__(self):
        return len(self.runtimes)

    def to_dict(self) -> dict:
        def qkey(q):
            # shortest text that reads back as the same float (f"{q:g}" kept 6 digits, which
            # merged 33.33331 and 33.33332 and changed 100/3); whole numbers without ".0"
            q = float(q)
            return str(int(q)) if q.is_integer() else repr(q)
        workers = {}
        for w, table in self.runtimes.items():
            entry: dict[str, Any] = {"runtimes": {qkey(q): t for q, t in table.items()}}
            if w in self.samples:
                entry["samples"] = {qkey(q): v for q, v in self.samples[w].items()}
            entry.update(self.workers.get(w, {}))
            workers[w] = entry
        return {"format": PROFILES_FORMAT, "version": FORMAT_VERSION, **self.meta, "workers": workers}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ProfileSet":
        if not isinstance(data, Mapping):
            raise TypeError(f"profiles document must be a JSON object, got {type(data).__name__}")
        if "format" not in data:
            # A bare {worker: {quota: seconds}} object, e.g. written by hand.
            return cls(data)
        if data["format"] != PROFILES_FORMAT:
            raise ValueError(f"not a profiles document: format is {data['format']!r}, "
                             f"expected {PROFILES_FORMAT!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"profiles document version {data.get('version')!r} is not supported "
                             f"(this tbkernels reads version {FORMAT_VERSION})")
        workers = data.get("workers")
        if not isinstance(workers, Mapping):
            raise ValueError("profiles document has no 'workers' object")
        runtimes, samples, specs = {}, {}, {}
        for w, entry in workers.items():
            if not isinstance(entry, Mapping) or "runtimes" not in entry:
                raise ValueError(f"profiles document: worker {w!r} has no 'runtimes' object")
            runtimes[w] = entry["runtimes"]
            if "samples" in entry:
                samples[w] = entry["samples"]
            specs[w] = {k: v for k, v in entry.items() if k not in ("runtimes", "samples")}
        meta = {k: v for k, v in data.items() if k not in ("format", "version", "workers")}
        return cls(runtimes, meta=meta, samples=samples, workers=specs)

    def save(self, path: str | os.PathLike) -> None:
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProfileSet":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"ProfileSet({len(self)} workers, device={self.meta.get('device', {}).get('name')!r})"


def save_profiles(profiles, path, meta: Mapping | None = None) -> ProfileSet:
    """Write ``profiles`` (a ProfileSet or a plain mapping) as JSON; returns the ProfileSet."""
    ps = profiles if isinstance(profiles, ProfileSet) else ProfileSet(
        profiles, meta={**environment_info(), **(meta or {})})
    ps.save(path)
    return ps


def load_profiles(path) -> ProfileSet:
    """Read profiles written by :func:`save_profiles` / ``python -m tbkernels.mps profile``."""
    return ProfileSet.load(path)


def _write_json(path, data) -> None:
    # Write-then-rename so an interrupted write never leaves half a JSON file behind.
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- environment
def environment_info(device: int = 0) -> dict:
    """Device and versions to store beside measurements: GPU name and driver from NVML when
    ``nvidia-ml-py`` is importable, else ``nvidia-smi``; torch and CUDA versions; Python; host.

    It never initialises CUDA in this process (an MPS client must get its quota before CUDA
    starts, and this process is not meant to be one)."""
    from .daemon import gpu_info  # local: daemon imports nothing from here, but keep import light

    info: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }
    gpu = gpu_info(device)
    if gpu is not None:
        info["device"] = {"kind": "cuda", "index": device, **{k: v for k, v in gpu.items() if k != "driver"}}
    else:
        info["device"] = {"kind": "cpu", "name": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count()}
    versions: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch
        versions["torch"] = torch.__version__
        versions["cuda"] = torch.version.cuda
    except ImportError:
        versions["torch"] = None
    versions["driver"] = gpu.get("driver") if gpu else None
    try:
        from importlib.metadata import version
        versions["tbkernels"] = version("tbkernels")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        versions["tbkernels"] = None
    info["versions"] = versions
    return info


# --------------------------------------------------------------------------------- measurement
class ProfilingError(RuntimeError):
    """Some worker failed at every quota. ``missing``: those workers; ``failures``: every failed
    point (worker, quota, status, error); ``partial``: a :class:`ProfileSet` of the workers that
    were measured (None when none was), with the same ``meta``, so their timings are not lost."""

    def __init__(self, message: str, *, missing: list, failures: list,
                 partial: ProfileSet | None):
        super().__init__(message)
        self.missing, self.failures, self.partial = list(missing), list(failures), partial

    def __reduce__(self):
        # keyword-only fields: the default reduce would call cls(message) and fail to unpickle
        # (a process pool or a Ray task returning it)
        return (_rebuild_profiling_error, (self.args[0], self.missing, self.failures,
                                           self.partial))


def _rebuild_profiling_error(message, missing, failures, partial):
    return ProfilingError(message, missing=missing, failures=failures, partial=partial)


def profile_workers(workers: Iterable, quotas: Iterable[float] = (25, 50, 75, 100), *,
                    repeats: int = 3, warmup: int = 1, backend: str = "auto", daemon=None,
                    timeout: float | None = 600.0, setup_timeout: float | None = 600.0,
                    progress=True, device: int = 0) -> ProfileSet:
    """Measure C_w(q) for each worker at each quota, one fresh process per (worker, quota).

    A fresh process per point is required, not an optimisation we skipped: MPS reads
    ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` once, when the client's CUDA context is created, so the
    variable is put in the child's environment before it starts. Inside the child the worker is
    built (``factory=True`` workers), called ``warmup`` times, then timed ``repeats`` times after a
    start barrier; the profile stores the median and ``samples`` keeps every timing.

    ``workers``: :class:`~tbkernels.mps.runtime.WorkerSpec` objects. ``backend``: as for
    :func:`~tbkernels.mps.runtime.run_groups`; without MPS the quota is *not enforced* — the result
    records ``quota_enforced: false`` and the reason, and a warning says so.

    Points that fail are left out and listed in ``meta["failures"]``. A worker with no successful
    point raises :class:`ProfilingError` once every worker has been measured; its ``partial``
    holds the profiles of the workers that did succeed (``partial.save(path)`` keeps them), so a
    long profiling run is not lost to one broken worker.
    """
    from .runtime import WorkerSpec, run_groups, resolve_backend
    from .daemon import MpsDaemon, sigterm_unwinds

    specs = list(workers)
    if not specs:
        raise ValueError("workers is empty: nothing to profile")
    for s in specs:
        if not isinstance(s, WorkerSpec):
            raise TypeError(f"workers must be WorkerSpec objects, got {type(s).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"worker names must be unique, got {names}")
    qs = sorted({_as_quota(q, "quotas") for q in quotas})
    if not qs:
        raise ValueError("quotas is empty: give at least one percentage in (0, 100]")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    say = _progress_printer(progress)

    chosen, reason = resolve_backend(backend, device=device, daemon=daemon)
    own_daemon = None
    term_guard = sigterm_unwinds().__enter__()     # SIGTERM stops our daemon too (see runtime)
    try:
        if chosen == "mps" and daemon is None:
            own_daemon = daemon = MpsDaemon(device=device).start()
        runtimes: dict[str, dict[float, float]] = {}
        samples: dict[str, dict[float, list]] = {}
        failures: list[dict] = []
        total, k = len(specs) * len(qs), 0
        for spec in specs:
            timed = spec.replace(repeats=repeats, warmup=warmup)
            for q in qs:
                k += 1
                rep = run_groups([[(timed, q)]], backend=chosen, daemon=daemon, timeout=timeout,
                                 setup_timeout=setup_timeout, progress=False, device=device,
                                 _backend_reason=reason)
                r = rep.results[spec.name]
                if r.ok and r.times:
                    med = statistics.median(r.times)
                    runtimes.setdefault(spec.name, {})[q] = med
                    samples.setdefault(spec.name, {})[q] = list(r.times)
                    say(f"[{k}/{total}] {spec.name} @ {q:g}%: {med:.4g} s "
                        f"(median of {len(r.times)}, setup {r.setup_s:.2f} s)")
                else:
                    failures.append({"worker": spec.name, "quota": q, "status": r.status,
                                     "error": r.error})
                    say(f"[{k}/{total}] {spec.name} @ {q:g}%: FAILED ({r.status}: {r.error})")
        meta = environment_info(device)
        meta.update({"backend": chosen, "backend_reason": reason, "quota_enforced": chosen == "mps",
                     "repeats": repeats, "warmup": warmup, "failures": failures})
        if chosen == "green":
            meta["quota_enforced"] = "green-contexts (SM partition per thread, not MPS)"
        missing = [s.name for s in specs if s.name not in runtimes]
        measured = [s for s in specs if s.name in runtimes]
        result = ProfileSet(runtimes, meta=meta, samples=samples,
                            workers={s.name: s.describe() for s in measured}) if measured else None
        if missing:
            details = "; ".join(f"{f['worker']}@{f['quota']:g}: {f['status']}: {f['error']}"
                                for f in failures if f["worker"] in missing)
            raise ProfilingError(f"profiling failed at every quota for {missing}: {details}",
                                 missing=missing, failures=failures, partial=result)
        return result
    finally:
        try:
            if own_daemon is not None:
                own_daemon.stop()
        finally:
            term_guard.__exit__(None, None, None)


def _progress_printer(progress):
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: None
