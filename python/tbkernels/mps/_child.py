"""Child side of :mod:`tbkernels.mps.runtime`: builds and runs reward workers in a fresh process.

Started as ``python <this file> JOBFILE`` -- by path, not ``-m tbkernels.mps._child``, because
importing the tbkernels package imports torch and torch._dynamo (~3 s of CPU per process), which a
worker that never touches torch (a rule-based scorer, a simulated worker) should not pay. This file
therefore uses the standard library only, and the environment (MPS quota, pipe directory) is set
by the parent at exec time, i.e. before anything here could initialise CUDA.

Protocol (files in the run directory, written atomically by rename):
  1. build the worker (``factory`` workers: ``target(**kwargs)`` returns the step callable, then
     ``warmup`` untimed calls), then create ``<result>.ready``;
  2. wait for the line ``go`` on stdin (the parent releases a whole group at once, so process start,
     imports and model building never count towards the group's time);
  3. call the step ``repeats`` times, timing each; write ``<result>`` (a pickle: status, value or
     error and traceback, timestamps from ``time.monotonic()``, which is system-wide on Linux and
     so comparable across the group's processes).

Modes: ``process`` (one worker in the main thread); ``threads`` (one process, a thread per worker;
used for green contexts, where SM partitions are per context within one process); ``green``
(threads, each inside a ``torch.cuda.green_contexts.GreenContext`` sized to its quota).
"""
import importlib
import importlib.util
import os
import pickle
import sys
import threading
import time
import traceback

QUOTA_ATTR = "tbk_mps_quota"  # set on the worker's thread: its quota in percent
_LOAD_LOCK = threading.Lock()


def fix_sys_path(parent_path):
    # Running a file puts its directory first on sys.path, which would make this package's
    # modules importable as top-level names ("profiles", "planner") and shadow the user's.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    for p in parent_path or []:
        if p not in sys.path and os.path.abspath(p or ".") != here:
            sys.path.append(p)


def resolve(target):
    """``"package.module:attr"`` or ``"/path/to/file.py:attr"`` (``attr`` may be dotted)."""
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"worker target {target!r} must look like 'module:callable' or "
                         "'/path/file.py:callable'")
    mod_name, _, attr = target.rpartition(":")
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = os.path.abspath(mod_name)
        name = "_tbk_mps_worker_" + "".join(c if c.isalnum() else "_" for c in path)
        # Thread backends build several workers at once; without the lock a second thread could
        # pick up the module from sys.modules before the first has finished executing it.
        with _LOAD_LOCK:
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load worker file {path!r}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
    else:
        module = importlib.import_module(mod_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"worker target {target!r} is not callable")
    return obj


def build(entry):
    """Return (step, setup_seconds)."""
    t0 = time.monotonic()
    fn = resolve(entry["target"])
    kwargs = entry.get("kwargs") or {}
    if entry.get("factory"):
        step = fn(**kwargs)
        if not callable(step):
            raise TypeError(f"factory worker {entry['name']!r}: {entry['target']} returned "
                            f"{type(step).__name__}, expected the callable to time")
        for _ in range(int(entry.get("warmup") or 0)):
            step()
            _sync()
    else:
        def step():
            return fn(**kwargs)
    return step, time.monotonic() - t0


def _sync():
    # Time GPU work to completion: a step that only enqueues kernels would look instantaneous.
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
        except Exception:
            pass


def run(step, repeats):
    times, value = [], None
    t_start = time.monotonic()
    for _ in range(max(1, int(repeats or 1))):
        t0 = time.monotonic()
        value = step()
        _sync()
        times.append(time.monotonic() - t0)
    return value, times, t_start, time.monotonic()


def write_result(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(pack(data), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def pack(data):
    # The envelope holds only builtins; the worker's value and exception are pickled separately so
    # the parent can always read the status, error text and traceback even when it cannot import
    # the class of the value or exception (e.g. one defined in a worker loaded from a file path).
    data = dict(data)
    for key in ("value", "exception"):
        obj = data.pop(key, None)
        if obj is None:
            continue
        try:
            data[key + "_blob"] = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # it cannot cross a process boundary
            if key == "value":
                data.update(status="error", phase="result", error_type=type(e).__name__,
                            error=f"result of type {type(obj).__name__} cannot be pickled: {e!r}",
                            traceback=traceback.format_exc())
    return data


def touch(path):
    with open(f"{path}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{path}.tmp", path)


def error_result(e, phase, **extra):
    data = dict(status="error", phase=phase, error=f"{type(e).__name__}: {e}", exception=e,
                error_type=type(e).__name__, traceback=traceback.format_exc(), pid=os.getpid())
    data.update(extra)
    return data


class _Entry:
    def __init__(self, spec):
        self.spec = spec
        self.lock = threading.Lock()
        self.done = False
        self.ready = False
        self.t_start = None

    def finish(self, data):
        # Exactly one result per entry: a thread that finishes after its timeout was recorded must
        # not overwrite the timeout result the parent may already have read.
        with self.lock:
            if self.done:
                return
            self.done = True
            write_result(self.spec["result"], data)


def _green_context(quota):
    import torch
    from torch.cuda import green_contexts
    if not getattr(green_contexts, "SUPPORTED", False):
        raise RuntimeError("this torch was built without green context support")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = max(1, int(round(quota / 100.0 * sms)))
    ctx = green_contexts.GreenContext.create(num_sms=n, device_id=0)
    return ctx, n, sms


def _worker(entry, go, mode):
    try:
        _worker_body(entry, go, mode)
    except BaseException as e:
        # Safety net: whatever went wrong, the entry gets a result (finish() is idempotent), so
        # the parent never waits for a ready file that will not come.
        entry.finish(error_result(e, "internal"))


def _worker_body(entry, go, mode):
    spec = entry.spec
    threading.current_thread().__dict__[QUOTA_ATTR] = spec["quota"]
    extra = {"pid": os.getpid(), "notes": []}
    stream_ctx, ctx = None, None
    if mode == "green":
        try:
            ctx, n, sms = _green_context(spec["quota"])
            ctx.set_context()
            import torch
            stream_ctx = torch.cuda.stream(ctx.Stream())
            extra["notes"].append(f"green context with {n} of {sms} SMs")
        except Exception as e:  # run unpartitioned, and say so in the result
            extra["notes"].append(f"green context unavailable, ran unpartitioned: {type(e).__name__}: {e}")
            ctx = None
    try:
        if stream_ctx is not None:
            stream_ctx.__enter__()
        try:
            step, setup_s = build(spec)
        except BaseException as e:
            entry.finish(error_result(e, "setup", **extra))
            return
        extra["setup_s"] = setup_s
        touch(spec["ready"])
        entry.ready = True
        go.wait()
        entry.t_start = time.monotonic()
        try:
            value, times, t0, t1 = run(step, spec.get("repeats"))
        except BaseException as e:
            entry.finish(error_result(e, "run", t_start=entry.t_start, t_end=time.monotonic(), **extra))
            return
        entry.finish(dict(status="ok", value=value, times=times, t_start=t0, t_end=t1, **extra))
    finally:
        if stream_ctx is not None:
            try:
                stream_ctx.__exit__(None, None, None)
            except Exception:
                pass
        if ctx is not None:
            try:
                ctx.pop_context()
            except Exception:
                pass


def _watch_parent(ppid):
    # Workers run in their own session (so a timeout can kill their whole process group), which
    # also means they get no SIGHUP if the parent dies. Without this a hung worker orphaned by a
    # killed parent would run forever.
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(70)


def main(argv):
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                     name="tbk-mps-parent-watch").start()
    with open(argv[1], "rb") as f:
        job = pickle.load(f)
    fix_sys_path(job.get("sys_path"))
    mode = job["mode"]
    entries = [_Entry(s) for s in job["entries"]]

    if mode == "process":
        entry = entries[0]
        threading.current_thread().__dict__[QUOTA_ATTR] = entry.spec["quota"]
        try:
            step, setup_s = build(entry.spec)
        except BaseException as e:
            entry.finish(error_result(e, "setup"))
            return 0
        touch(entry.spec["ready"])
        if sys.stdin.readline().strip() != "go":
            return 0  # the parent cancelled this group (another worker's setup hung or it was interrupted)
        t_go = time.monotonic()
        try:
            value, times, t0, t1 = run(step, entry.spec.get("repeats"))
        except BaseException as e:
            entry.finish(error_result(e, "run", t_start=t_go, t_end=time.monotonic(), setup_s=setup_s))
            return 0
        entry.finish(dict(status="ok", value=value, times=times, t_start=t0, t_end=t1,
                          setup_s=setup_s, pid=os.getpid()))
        return 0

    # threads / green: one thread per worker, released together.
    go = threading.Event()
    threads = [threading.Thread(target=_worker, args=(e, go, mode), daemon=True,
                                name=f"tbk-mps-{e.spec['name']}") for e in entries]
    for t in threads:
        t.start()
    if sys.stdin.readline().strip() != "go":
        os._exit(0)
    t_go = time.monotonic()
    go.set()
    for e, t in zip(entries, threads):
        timeout = e.spec.get("timeout")
        remaining = None if timeout is None else max(0.0, t_go + timeout - time.monotonic())
        t.join(remaining)
        if t.is_alive():
            # A thread cannot be killed; record the timeout and leave it behind -- os._exit below
            # ends the process, which is the only way to stop it.
            e.finish(dict(status="timeout", phase="run", error=f"no result within {timeout:g} s; "
                          "thread abandoned", t_start=e.t_start or t_go, t_end=time.monotonic(),
                          pid=os.getpid()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
