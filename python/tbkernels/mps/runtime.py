"""Run a plan: groups in sequence, each group's workers concurrently, each under its MPS quota.

Executors:
  * ``process`` (default): one subprocess per worker, started as ``python _child.py JOB`` with the
    worker's environment (MPS pipe directory, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, pinned memory
    limit) fixed at exec time -- the only way to be sure the quota is in place before CUDA starts.
    A crashing worker (exception, segfault, ``os._exit``) or a hanging one (killed at its timeout)
    never blocks the others; every worker gets a :class:`WorkerResult`.
  * ``ray``: one Ray actor per worker, with the same variables in ``runtime_env["env_vars"]`` and a
    fractional ``num_gpus`` equal to its quota (TeleBoost modified RayWorkerGroup so reward
    workers may share a GPU; fractional GPUs alone limit nothing, the MPS quota does). Optional:
    used only when ``ray`` is importable.

Backends (what limits each worker): ``mps`` (a private :class:`~tbkernels.mps.daemon.MpsDaemon`),
``process`` (plain concurrency, quotas not enforced), ``threads`` (all of a group's workers as
threads of one process), ``green`` (threads, each in a ``torch.cuda.green_contexts`` green context
with ``round(q/100 * SMs)`` SMs), ``auto`` (mps if it can run, else green if there is a GPU and
this torch has green contexts, else process -- and a warning, once per reason, says why).

Every group is started behind a barrier: workers are built (imports, model construction, CUDA
context, warm-up) first and released together, so a group's time is the time from the first
worker's start to the last worker's end, as in Eq. 7, not process start-up.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .daemon import (MpsDaemon, MpsUnavailable, format_mem_limit, format_quota, gpu_info,
                     mps_available, sigterm_unwinds, warn_once)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
BACKENDS = ("auto", "mps", "process", "threads", "green")
EXECUTORS = ("process", "ray")
QUOTA_ENV = "TBK_MPS_QUOTA"  # the planned quota, visible to every worker whatever the backend
_POLL_S = 0.005


# ------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class WorkerSpec:
    """A reward worker to run in its own process.

    ``target``: ``"package.module:callable"`` or ``"/path/file.py:callable"``. Plain workers are
    timed as ``target(**kwargs)``. With ``factory=True``, ``target(**kwargs)`` builds the worker
    (load the model, move it to the GPU) and returns the zero-argument callable that is timed;
    ``warmup`` untimed calls follow the build. ``repeats`` timed calls are made (the result is the
    last one's). ``timeout`` (seconds, from the group's start) overrides the run's default.
    ``mem_limit``: pinned device memory limit under MPS (bytes or ``"4G"``). ``env``: extra
    environment variables for this worker's process.
    """

    name: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory: bool = False
    warmup: int = 0
    repeats: int = 1
    timeout: float | None = None
    mem_limit: Any = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"WorkerSpec.name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.target, str) or ":" not in self.target:
            raise ValueError(f"WorkerSpec({self.name!r}).target must look like 'module:callable' or "
                             f"'/path/file.py:callable', got {self.target!r}")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"WorkerSpec({self.name!r}).kwargs must be a mapping")
        for attr, lo in (("warmup", 0), ("repeats", 1)):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"WorkerSpec({self.name!r}).{attr} must be an int >= {lo}, got {v!r}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"WorkerSpec({self.name!r}).timeout must be positive seconds or None")
        if self.mem_limit is not None:
            format_mem_limit(self.mem_limit)  # raises with a clear message if malformed
        if not isinstance(self.env, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise TypeError(f"WorkerSpec({self.name!r}).env must map str to str")

    def replace(self, **changes) -> "WorkerSpec":
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        """JSON-friendly description (stored in profiles so ``run`` can rebuild the worker)."""
        d = {"target": self.target, "factory": self.factory, "warmup": self.warmup,
             "repeats": self.repeats}
        try:
            import json
            json.dumps(dict(self.kwargs))
            d["kwargs"] = dict(self.kwargs)
        except TypeError:
            d["kwargs_repr"] = repr(dict(self.kwargs))
        if self.mem_limit is not None:
            d["mem_limit"] = self.mem_limit
        return d

    @classmethod
    def from_description(cls, name: str, d: Mapping) -> "WorkerSpec":
        if "target" not in d:
            raise ValueError(f"worker {name!r}: no 'target' recorded; cannot rebuild it")
        if "kwargs_repr" in d:
            raise ValueError(f"worker {name!r}: its kwargs were not JSON and were stored only as "
                             f"{d['kwargs_repr']}; build its WorkerSpec in Python instead")
        return cls(name=name, target=_relocate_builtin(d["target"]), kwargs=dict(d.get("kwargs", {})),
                   factory=bool(d.get("factory", False)), warmup=int(d.get("warmup", 0)),
                   repeats=int(d.get("repeats", 1)), mem_limit=d.get("mem_limit"))


def _relocate_builtin(target: str) -> str:
    """A recorded target at one of this package's own worker files (the built-in reward and
    simulated workers are recorded by path) whose file no longer exists there -- the profiles
    were made by another installation, venv or node -- points at this installation's copy."""
    path, sep, attr = target.rpartition(":")
    here = os.path.dirname(os.path.abspath(__file__))
    parts = os.path.normpath(path).split(os.sep)
    if (sep and path.endswith(".py") and not os.path.exists(path) and len(parts) >= 3
            and parts[-3:-1] == ["tbkernels", "mps"] and parts[-1] in _BUILTIN_WORKER_FILES):
        return f"{os.path.join(here, parts[-1])}:{attr}"
    return target


_BUILTIN_WORKER_FILES = ("_sim.py", "rewards.py")


@dataclass
class WorkerResult:
    """What happened to one worker. ``status``: ``ok``, ``error`` (an exception, in ``phase``
    ``setup`` or ``run``), ``timeout`` (killed), ``crashed`` (the process died without a result,
    e.g. a segfault; ``returncode`` and the log tail say more)."""

    name: str
    status: str
    quota: float
    group: int
    value: Any = None
    error: str | None = None
    error_type: str | None = None
    exception: BaseException | None = None
    traceback: str | None = None
    phase: str | None = None
    times: list = field(default_factory=list)
    setup_s: float | None = None
    t_start: float | None = None
    t_end: float | None = None
    returncode: int | None = None
    pid: int | None = None
    log: str = ""
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def run_s(self) -> float | None:
        if self.t_start is None or self.t_end is None:
            return None
        return self.t_end - self.t_start


@dataclass
class RunReport:
    backend: str
    backend_reason: str
    executor: str
    groups: list
    group_times: list
    results: dict
    wall_s: float

    @property
    def makespan(self) -> float:
        """Sum over groups of (last end - first start): Eq. 8, measured."""
        return sum(self.group_times)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())

    def failures(self) -> dict:
        return {n: r for n, r in self.results.items() if not r.ok}

    def raise_on_failure(self) -> None:
        bad = self.failures()
        if bad:
            lines = [f"{n}: {r.status} ({r.phase}): {r.error}" for n, r in bad.items()]
            raise RuntimeError("reward workers failed:\n  " + "\n  ".join(lines))

    def __str__(self) -> str:
        lines = [f"backend {self.backend} ({self.backend_reason}); executor {self.executor}; "
                 f"makespan {self.makespan:.4g} s over {len(self.groups)} group(s); "
                 f"wall {self.wall_s:.3g} s incl. start-up"]
        for i, (g, t) in enumerate(zip(self.groups, self.group_times)):
            parts = []
            for w, q in g:
                r = self.results[w]
                rs = f"{r.run_s:.3g}s" if r.run_s is not None else "-"
                parts.append(f"{w}@{format_quota(q)}% {r.status} {rs}")
            lines.append(f"  group {i + 1}: {t:.4g} s  [" + ", ".join(parts) + "]")
        for n, r in self.failures().items():
            lines.append(f"  {n}: {r.status} in {r.phase}: {r.error}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- backend choice
def _green_supported() -> bool:
    try:
        import torch
        from torch.cuda import green_contexts
    except Exception:
        return False
    return bool(getattr(green_contexts, "SUPPORTED", False)) and torch.version.cuda is not None


def resolve_backend(backend: str = "auto", *, device: int = 0, daemon: MpsDaemon | None = None,
                    warn: bool = True) -> tuple[str, str]:
    """(backend actually used, why). ``auto`` falls back from MPS with a warning (once per reason);
    an explicitly requested backend that cannot run raises instead of falling back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if daemon is not None and backend in ("auto", "mps"):
        if not daemon.running:
            raise RuntimeError(f"the MpsDaemon passed in is not running ({daemon!r}); start() it first")
        return "mps", f"private MPS daemon {daemon.pipe_dir}"
    if backend == "mps":
        ok, reason = mps_available(device)
        if not ok:
            raise MpsUnavailable(reason)
        return "mps", reason
    if backend == "green":
        if gpu_info(device) is None or not _green_supported():
            raise RuntimeError("backend='green' needs a GPU and a torch built with CUDA green context "
                               "support (torch.cuda.green_contexts.SUPPORTED)")
        return "green", "requested"
    if backend in ("process", "threads"):
        return backend, "requested (quotas not enforced)"
    ok, reason = mps_available(device)
    if ok:
        return "mps", reason
    return _fallback(reason, device, warn)


def _fallback(reason: str, device: int, warn: bool) -> tuple[str, str]:
    if gpu_info(device) is not None and _green_supported():
        chosen = "green"
        how = "torch green contexts (each worker a thread with its quota's share of SMs)"
    else:
        chosen = "process"
        how = "plain process concurrency; quotas are NOT enforced"
    why = f"MPS unavailable: {reason}; falling back to {how}"
    if warn:
        warn_once(why)
    return chosen, why


# ---------------------------------------------------------------------------------- the runner
class _Slot:
    def __init__(self, spec: WorkerSpec, quota: float, group: int, rundir: str, index: int):
        self.spec, self.quota, self.group = spec, float(quota), group
        stem = os.path.join(rundir, f"{index:03d}")
        self.result_path, self.ready_path = stem + ".result", stem + ".ready"
        self.proc: _Proc | None = None
        self.result: WorkerResult | None = None
        self.timeout: float | None = None

    def child_entry(self) -> dict:
        s = self.spec
        return {"name": s.name, "target": s.target, "kwargs": dict(s.kwargs), "factory": s.factory,
                "warmup": s.warmup, "repeats": s.repeats, "quota": self.quota,
                "timeout": self.timeout, "result": self.result_path, "ready": self.ready_path}

    def make_result(self, status, **kw) -> WorkerResult:
        return WorkerResult(name=self.spec.name, status=status, quota=self.quota, group=self.group, **kw)

    def poll_file(self) -> bool:
        if self.result is not None:
            return True
        if not os.path.exists(self.result_path):
            return False
        with open(self.result_path, "rb") as f:
            d = pickle.load(f)  # builtins only (see _child.write_result)
        _unpack_blobs(d)
        status = d.pop("status")
        self.result = self.make_result(status, **{k: v for k, v in d.items()
                                                  if k in WorkerResult.__dataclass_fields__})
        if not self.result.ok and self.proc is not None:
            self.result.log = self.proc.log_tail()
        return True


class _Proc:
    def __init__(self, slots: list[_Slot], mode: str, env: dict, rundir: str, tag: str):
        self.slots, self.mode = slots, mode
        job = {"mode": mode, "entries": [s.child_entry() for s in slots], "sys_path": list(sys.path)}
        self.job_path = os.path.join(rundir, f"{tag}.job")
        with open(self.job_path, "wb") as f:
            pickle.dump(job, f)
        self.log_path = os.path.join(rundir, f"{tag}.log")
        self._log = open(self.log_path, "wb")
        # New session: the worker and anything it forks (data loader workers) form one process
        # group that we can kill as a whole on timeout, without touching anything else.
        self.popen = subprocess.Popen([sys.executable, CHILD, self.job_path], stdin=subprocess.PIPE,
                                      stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        for s in slots:
            s.proc = self
        self.released = False

    def go(self) -> None:
        self._send(b"go\n")
        self.released = True

    def cancel(self) -> None:
        self._send(b"")

    def _send(self, data: bytes) -> None:
        try:
            if data:
                self.popen.stdin.write(data)
            self.popen.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it already exited; its result (or absence of one) tells the story

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, grace: float = 2.0) -> None:
        if self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # == its pid: started with start_new_session=True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        try:
            self._log.close()
        except OSError:
            pass

    def log_tail(self, n: int = 3000) -> str:
        try:
            self._log.flush()
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _child_env(spec: WorkerSpec, quota: float, backend: str, daemon: MpsDaemon | None) -> dict:
    env = dict(os.environ)
    env.update(spec.env)
    if backend == "mps":
        env = daemon.client_env(quota=quota, mem_limit=spec.mem_limit, base=env)
    env[QUOTA_ENV] = format_quota(quota)
    # Unbuffered so a crashing worker's last words reach its log.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_groups(groups: Sequence[Sequence[tuple[WorkerSpec, float]]], *, backend: str = "auto",
               daemon: MpsDaemon | None = None, timeout: float | None = 600.0,
               setup_timeout: float | None = 600.0, prestart: str = "group",
               executor: str = "process", progress=False, device: int = 0, keep_dir: bool = False,
               _backend_reason: str | None = None) -> RunReport:
    """Run ``groups`` one after another; the ``(WorkerSpec, quota_percent)`` pairs of a group run
    concurrently. Returns a :class:`RunReport`; failures are collected, never raised (call
    ``report.raise_on_failure()`` if a failure should stop you).

    ``timeout``: seconds a worker may run after its group starts (``WorkerSpec.timeout`` wins);
    then it is killed and reported as ``timeout``. ``setup_timeout``: seconds to build it.
    ``prestart``: ``"group"`` starts a group's processes when the previous group is done (least
    memory); ``"all"`` starts every process up front and releases the groups one by one (hides
    start-up behind earlier groups; every worker's model stays resident meanwhile).
    ``daemon``: a running :class:`MpsDaemon` to use; otherwise ``backend="mps"``/``"auto"`` starts a
    private one for this call and stops it before returning.
    """
    t_wall = time.monotonic()
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if prestart not in ("group", "all"):
        raise ValueError(f"prestart must be 'group' or 'all', got {prestart!r}")
    for arg, value in (("timeout", timeout), ("setup_timeout", setup_timeout)):
        # 0 or a negative number would kill every worker at once, NaN would never time out
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise ValueError(f"{arg} must be positive seconds (or None / inf: no limit), got "
                             f"{value!r}")
    timeout = None if timeout == math.inf else timeout
    setup_timeout = None if setup_timeout == math.inf else setup_timeout
    groups = [list(g) for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("groups must be a non-empty list of non-empty groups of (WorkerSpec, quota)")
    names = []
    for gi, g in enumerate(groups):
        for item in g:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], WorkerSpec)):
                raise TypeError(f"group {gi}: items must be (WorkerSpec, quota_percent) tuples, got {item!r}")
            q = item[1]
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 100:
                raise ValueError(f"group {gi}: quota for {item[0].name!r} must be in (0, 100], got {q!r}")
            names.append(item[0].name)
    if len(set(names)) != len(names):
        raise ValueError(f"every worker may appear once across all groups; got {names}")
    say = _printer(progress)

    if _backend_reason is not None and backend in BACKENDS[1:]:
        chosen, reason = backend, _backend_reason
    else:
        chosen, reason = resolve_backend(backend, device=device, daemon=daemon)
    if executor == "ray" and chosen in ("threads", "green"):
        raise ValueError(f"executor='ray' runs each worker in its own actor process; backend {chosen!r} "
                         "needs threads in one process")
    own_daemon = rundir = None
    slots: list[list[_Slot]] = []
    procs: list[_Proc] = []
    group_times: list[float] = []
    # SIGTERM (a scheduler's cancel, `timeout`) must unwind through the finally below too:
    # worker processes killed, the private daemon stopped, the run directory removed.
    term_guard = sigterm_unwinds().__enter__()
    try:
        if chosen == "mps" and daemon is None:
            try:
                own_daemon = daemon = MpsDaemon(device=device).start()
            except MpsUnavailable as e:
                if backend == "mps":
                    raise
                chosen, reason = _fallback(str(e), device, warn=True)
        if chosen != "mps" and any(s.mem_limit is not None for g in groups for s, _ in g):
            warn_once(f"pinned device memory limits are only enforced by MPS; backend {chosen!r} ignores them",
                      RuntimeWarning)

        rundir = tempfile.mkdtemp(prefix="tbk-mps-run-")
        k = 0
        for gi, g in enumerate(groups):
            row = []
            for spec, q in g:
                s = _Slot(spec, q, gi, rundir, k)
                s.timeout = spec.timeout if spec.timeout is not None else timeout
                row.append(s)
                k += 1
            slots.append(row)
        if executor == "ray":
            group_times = _run_ray(slots, chosen, daemon, setup_timeout, say)
        else:
            started: dict[int, list[_Proc]] = {}

            def start(gi):
                if gi not in started:
                    started[gi] = _spawn(slots[gi], chosen, daemon, rundir, gi)
                    procs.extend(started[gi])
                return started[gi]

            if prestart == "all":
                for gi in range(len(slots)):
                    start(gi)
            for gi, row in enumerate(slots):
                gprocs = start(gi)
                say(f"group {gi + 1}/{len(slots)}: " + ", ".join(
                    f"{s.spec.name}@{format_quota(s.quota)}%" for s in row) + " ...")
                t = _run_one_group(row, gprocs, setup_timeout)
                group_times.append(t)
                bad = [s.spec.name + ":" + s.result.status for s in row if not s.result.ok]
                say(f"group {gi + 1}/{len(slots)} done in {t:.3f} s" + (f" (failed: {bad})" if bad else ""))
                for p in gprocs:  # let it exit (frees its GPU context) before the next group starts
                    try:
                        p.popen.wait(10.0)
                    except subprocess.TimeoutExpired:
                        p.kill()
    finally:
        try:
            for p in procs:
                p.cancel()
                p.kill(grace=1.0)
                p.close()
            if own_daemon is not None:
                own_daemon.stop()
            if rundir is not None and not keep_dir:
                shutil.rmtree(rundir, ignore_errors=True)
        finally:
            term_guard.__exit__(None, None, None)
    results = {s.spec.name: s.result for row in slots for s in row}
    return RunReport(backend=chosen, backend_reason=reason, executor=executor,
                     groups=[[(s.spec.name, s.quota) for s in row] for row in slots],
                     group_times=group_times, results=results, wall_s=time.monotonic() - t_wall)


def _spawn(row: list[_Slot], backend: str, daemon, rundir: str, gi: int) -> list[_Proc]:
    if backend in ("threads", "green"):
        # One process for the group: green-context SM partitions exist within one process only.
        env = dict(os.environ)
        for s in row:
            env.update(s.spec.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return [_Proc(row, backend, env, rundir, f"g{gi:03d}")]
    return [_Proc([s], "process", _child_env(s.spec, s.quota, backend, daemon), rundir,
                  f"g{gi:03d}-{i:03d}") for i, s in enumerate(row)]


def _run_one_group(row: list[_Slot], gprocs: list[_Proc], setup_timeout: float | None) -> float:
    # --- setup: wait until every worker is built (ready), failed (result), or died.
    deadline = None if setup_timeout is None else time.monotonic() + setup_timeout
    while True:
        pending = []
        for s in row:
            if s.poll_file() or os.path.exists(s.ready_path):
                continue
            if not s.proc.alive():
                if not s.poll_file():  # it may have written its result just before exiting
                    s.result = s.make_result("crashed", phase="setup", returncode=s.proc.popen.returncode,
                                             error=f"process exited with status {s.proc.popen.returncode} "
                                                   "before it was ready", log=s.proc.log_tail())
                continue
            pending.append(s)
        if not pending:
            break
        if deadline is not None and time.monotonic() > deadline:
            for s in pending:
                s.proc.kill()
                for s2 in s.proc.slots:
                    if s2.result is None and not s2.poll_file():
                        s2.result = s2.make_result("timeout", phase="setup", log=s2.proc.log_tail(),
                                                   error=f"not ready within setup_timeout={setup_timeout:g} s; killed")
            break
        time.sleep(_POLL_S)

    # --- run: release everyone at once, then collect results, killing what overruns.
    t_go = time.monotonic()
    for p in gprocs:
        if p.alive():
            p.go()
    while True:
        waiting = False
        now = time.monotonic()
        for s in row:
            if s.poll_file():
                continue
            p = s.proc
            if not p.alive():
                if not s.poll_file():
                    rc = p.popen.returncode
                    s.result = s.make_result("crashed", phase="run", returncode=rc, t_start=t_go, t_end=now,
                                             error=f"process exited with status {rc} without a result"
                                                   + (f" (signal {-rc})" if rc is not None and rc < 0 else ""),
                                             log=p.log_tail())
                continue
            limit = s.timeout
            if p.mode != "process":
                # The child enforces per-thread limits itself; this is only the backstop for a child
                # that cannot (e.g. stuck in C code holding the GIL). No limit if any thread has none.
                limits = [x.timeout for x in p.slots]
                limit = None if any(t is None for t in limits) else max(limits) + 5.0
            if limit is not None and now - t_go > limit:
                p.kill()
                for s2 in p.slots:
                    if s2.result is None and not s2.poll_file():
                        s2.result = s2.make_result("timeout", phase="run", t_start=t_go, t_end=now,
                                                   returncode=p.popen.returncode, log=p.log_tail(),
                                                   error=f"still running after {limit:g} s; killed")
                continue
            waiting = True
        if not waiting:
            break
        time.sleep(_POLL_S)
    starts = [s.result.t_start for s in row if s.result.t_start is not None]
    ends = [s.result.t_end for s in row if s.result.t_end is not None]
    return (max(ends) - min(starts)) if starts and ends else 0.0


# ------------------------------------------------------------------------------------------ Ray
class _RayWorker:
    """Body of a Ray actor: same build/run code as the subprocess child, in a Ray worker process
    whose environment Ray set from ``runtime_env["env_vars"]`` before the process started."""

    def __init__(self, entry: dict, sys_path: list):
        self.entry = entry
        self.step = None
        import importlib.util
        spec = importlib.util.spec_from_file_location("_tbk_mps_child", CHILD)
        self.child = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.child)
        self.child.fix_sys_path(sys_path)

    def setup(self) -> dict:
        import threading
        threading.current_thread().__dict__[self.child.QUOTA_ATTR] = self.entry["quota"]
        try:
            self.step, setup_s = self.child.build(self.entry)
        except BaseException as e:
            return self.child.pack(self.child.error_result(e, "setup"))
        return {"status": "ready", "setup_s": setup_s, "pid": os.getpid()}

    def run(self) -> dict:
        t_go = time.monotonic()
        try:
            value, times, t0, t1 = self.child.run(self.step, self.entry.get("repeats"))
        except BaseException as e:
            return self.child.pack(self.child.error_result(e, "run", t_start=t_go, t_end=time.monotonic()))
        return self.child.pack({"status": "ok", "value": value, "times": times, "t_start": t0,
                                "t_end": t1, "pid": os.getpid()})


def _ray_env(s: _Slot, backend: str, daemon) -> dict:
    full = _child_env(s.spec, s.quota, backend, daemon)
    # Only what differs from our own environment goes into runtime_env; Ray workers inherit the rest.
    delta = {k: v for k, v in full.items() if os.environ.get(k) != v}
    if backend == "mps":
        # MPS clients must not carry CUDA_VISIBLE_DEVICES (the server remaps our GPU to device 0);
        # Ray would set it for a GPU actor unless told not to.
        delta["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    return delta


def _run_ray(slots: list[list[_Slot]], backend: str, daemon, setup_timeout, say) -> list[float]:
    try:
        import ray
        # a directory named ray on sys.path (Ray's own temp dir /tmp/ray, with the current
        # directory /tmp) imports as an empty namespace package: that is not Ray
        if not hasattr(ray, "remote"):
            raise ImportError
    except ImportError:
        raise ImportError("executor='ray' needs the 'ray' package (pip install ray); "
                          "the default executor='process' does not") from None
    own = not ray.is_initialized()
    if own:
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        actor_cls = ray.remote(_RayWorker)
        times = []
        for gi, row in enumerate(slots):
            say(f"group {gi + 1}/{len(slots)} (ray): " + ", ".join(
                f"{s.spec.name}@{format_quota(s.quota)}%" for s in row))
            actors = {}
            for s in row:
                opts = {"runtime_env": {"env_vars": _ray_env(s, backend, daemon)},
                        # The quota as a fractional GPU lets the group's actors share one GPU (their
                        # quotas sum to <= 100 %); num_cpus=0 so a small machine can host them all.
                        "num_gpus": s.quota / 100.0 if has_gpu else 0, "num_cpus": 0,
                        "max_restarts": 0}
                actors[s.spec.name] = actor_cls.options(**opts).remote(s.child_entry(), list(sys.path))
            setup_refs = {actors[s.spec.name].setup.remote(): s for s in row}
            ready, not_ready = ray.wait(list(setup_refs), num_returns=len(setup_refs),
                                        timeout=setup_timeout)
            live = []
            for ref in not_ready:
                s = setup_refs[ref]
                ray.kill(actors[s.spec.name], no_restart=True)
                s.result = s.make_result("timeout", phase="setup",
                                         error=f"not ready within setup_timeout={setup_timeout} s; actor killed")
            for ref in ready:
                s = setup_refs[ref]
                d = _ray_get(ray, ref, s, "setup")
                if d.get("status") == "ready":
                    live.append(s)
                else:
                    s.result = s.make_result(d.pop("status"), **_result_fields(d))
            t_go = time.monotonic()
            run_refs = {actors[s.spec.name].run.remote(): s for s in live}
            pending = dict(run_refs)
            while pending:
                now = time.monotonic()
                limits = [t_go + s.timeout for s in pending.values() if s.timeout is not None]
                wait_s = max(0.0, min(limits) - now) if limits else None
                done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
                for ref in done:
                    s = pending.pop(ref)
                    d = _ray_get(ray, ref, s, "run", t_go)
                    s.result = s.make_result(d.pop("status"), **_result_fields(d))
                now = time.monotonic()
                for ref, s in list(pending.items()):
                    if s.timeout is not None and now - t_go > s.timeout:
                        ray.kill(actors[s.spec.name], no_restart=True)
                        s.result = s.make_result("timeout", phase="run", t_start=t_go, t_end=now,
                                                 error=f"still running after {s.timeout:g} s; actor killed")
                        del pending[ref]
            for a in actors.values():  # free the GPU share before the next group
                ray.kill(a, no_restart=True)
            starts = [s.result.t_start for s in row if s.result.t_start is not None]
            ends = [s.result.t_end for s in row if s.result.t_end is not None]
            times.append((max(ends) - min(starts)) if starts and ends else 0.0)
        return times
    finally:
        if own:
            ray.shutdown()


def _ray_get(ray, ref, s: _Slot, phase: str, t_go: float | None = None) -> dict:
    try:
        d = ray.get(ref)
        _unpack_blobs(d)
        return d
    except ray.exceptions.RayActorError as e:  # the actor process died (segfault, os._exit)
        now = time.monotonic()
        return {"status": "crashed", "phase": phase, "error": f"actor died: {e}",
                "t_start": t_go, "t_end": now if t_go is not None else None}
    except Exception as e:  # our methods catch worker exceptions; this is Ray itself failing
        return {"status": "error", "phase": phase, "error": f"{type(e).__name__}: {e}"}


def _unpack_blobs(d: dict) -> None:
    if "value_blob" in d:
        try:
            d["value"] = pickle.loads(d.pop("value_blob"))
        except Exception as e:  # e.g. the value's class is not importable in this process
            d.update(status="error", phase="result", error_type=type(e).__name__,
                     error=f"result could not be unpickled in the parent: {type(e).__name__}: {e}")
    if "exception_blob" in d:
        try:
            d["exception"] = pickle.loads(d.pop("exception_blob"))
        except Exception:
            d["exception"] = None  # error text and traceback still say what happened


def _result_fields(d: dict) -> dict:
    return {k: v for k, v in d.items() if k in WorkerResult.__dataclass_fields__}


# -------------------------------------------------------------------------------- plan runner
def run_plan(plan, workers, **kwargs) -> RunReport:
    """Run a :class:`~tbkernels.mps.planner.Plan`. ``workers``: ``{name: WorkerSpec}`` or a list of
    WorkerSpec covering every worker in the plan. Other arguments as for :func:`run_groups`."""
    if isinstance(workers, Mapping):
        by_name = dict(workers)
    else:
        by_name = {}
        for w in workers:
            if not isinstance(w, WorkerSpec):
                raise TypeError(f"workers must be WorkerSpec objects, got {type(w).__name__}")
            by_name[w.name] = w
    missing = [w for w in plan.workers if w not in by_name]
    if missing:
        raise ValueError(f"plan names workers with no WorkerSpec: {missing}")
    groups = [[(by_name[w], q) for w, q in g] for g in plan.groups]
    return run_groups(groups, **kwargs)


def _printer(progress):
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: None
