"""A private NVIDIA MPS control daemon: start, status, stop, and the client environment.

The daemon is the real ``nvidia-cuda-mps-control`` (DESIGN.md: "Real parts, not stand-ins"),
started with its own ``CUDA_MPS_PIPE_DIRECTORY`` and ``CUDA_MPS_LOG_DIRECTORY`` so it neither
joins nor disturbs a system-wide MPS daemon (default pipe directory ``/tmp/nvidia-mps``), and it
is always stopped again -- by ``stop()``, at interpreter exit (``atexit``), when the ``with`` block
is left by an exception, and on SIGTERM/SIGINT inside a ``with`` block. We never change the card's
settings (compute mode, MIG); if they do not allow MPS we report why and the runtime falls back.

Clients reach the daemon through the same pipe directory; each client's limits are environment
variables read once when its CUDA context is created (NVIDIA MPS docs, "Environment Variables"):
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (the quota) and ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``
(``"0=2048M"``: device ordinal as the client sees it, then the limit). ``CUDA_VISIBLE_DEVICES`` is
set for the daemon only: the MPS server remaps devices, so clients see the chosen GPU as device 0
and must not carry the daemon's value (the docs warn that doing so is an error).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Mapping

BINARY = "nvidia-cuda-mps-control"
PID_FILE = "nvidia-cuda-mps-control.pid"


class MpsUnavailable(RuntimeError):
    """MPS cannot be used here; ``str(e)`` says exactly why."""


class MpsUnavailableWarning(RuntimeWarning):
    """Emitted once per reason when the runtime falls back from MPS to plain concurrency."""


_WARNED: set[str] = set()
_WARN_LOCK = threading.Lock()


def warn_once(message: str, category=MpsUnavailableWarning) -> bool:
    """Warn with ``message`` unless this exact message was already issued in this process."""
    with _WARN_LOCK:
        if message in _WARNED:
            return False
        _WARNED.add(message)
    warnings.warn(message, category, stacklevel=_caller_stacklevel())
    return True


def _caller_stacklevel() -> int:
    # Point the warning at the first frame outside this package (the user's call), not at the
    # internal helper that noticed the problem.
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


# ------------------------------------------------------------------------------------ detection
def gpu_info(device: int = 0) -> dict | None:
    """Name, driver, UUID, MIG and compute mode of GPU ``device``, or None when there is no GPU.

    Uses NVML (``nvidia-ml-py``) when importable, else ``nvidia-smi``; never initialises CUDA in
    this process.
    """
    try:
        import pynvml  # provided by the nvidia-ml-py distribution
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no usable GPU
            pynvml = None
    if pynvml is not None:
        try:
            if device >= pynvml.nvmlDeviceGetCount():
                return None
            h = pynvml.nvmlDeviceGetHandleByIndex(device)

            def s(x):
                return x.decode() if isinstance(x, bytes) else x
            info = {"name": s(pynvml.nvmlDeviceGetName(h)),
                    "driver": s(pynvml.nvmlSystemGetDriverVersion()),
                    "uuid": s(pynvml.nvmlDeviceGetUUID(h)),
                    "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                    "source": "nvml"}
            try:
                info["mig"] = bool(pynvml.nvmlDeviceGetMigMode(h)[0])
            except Exception:  # pre-Ampere: no MIG
                info["mig"] = False
            try:
                mode = pynvml.nvmlDeviceGetComputeMode(h)
                info["compute_mode"] = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited",
                                        3: "Exclusive_Process"}.get(mode, str(mode))
            except Exception:
                pass
            return info
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    fields = "name,driver_version,uuid,memory.total,mig.mode.current,compute_mode"
    try:
        out = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                              "-i", str(device)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    parts = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
    if len(parts) < 6:
        return None
    name, driver, uuid, mem, mig, mode = parts[:6]
    info = {"name": name, "driver": driver, "uuid": uuid, "mig": mig.lower() == "enabled",
            "compute_mode": mode, "source": "nvidia-smi"}
    try:
        info["memory_total_bytes"] = int(float(mem)) * 2**20
    except ValueError:
        pass
    return info


def mps_available(device: int = 0, binary: str | None = None) -> tuple[bool, str]:
    """(ok, reason): the checks that can be made without starting a daemon.

    In order: the control binary on PATH, a GPU at index ``device``, MIG off (quota planning
    assumes the whole GPU; MPS inside MIG slices is not what we plan for), compute mode not
    Prohibited. Permission problems only show when starting -- :meth:`MpsDaemon.start` raises
    :class:`MpsUnavailable` with the daemon's own message then.
    """
    path = _find_binary(binary)
    if path is None:
        where = binary if binary else "PATH"
        return False, f"{BINARY} not found on {where} (NVIDIA driver utilities not installed)"
    gpu = gpu_info(device)
    if gpu is None:
        return False, (f"no NVIDIA GPU at index {device} (neither NVML nor nvidia-smi reports one)")
    if gpu.get("mig"):
        return False, (f"MIG mode is enabled on GPU {device} ({gpu.get('name')}); the quota plan "
                       "assumes a whole GPU and we do not change the card's MIG setting")
    if gpu.get("compute_mode") == "Prohibited":
        return False, f"GPU {device} compute mode is Prohibited; no CUDA context can be created"
    return True, f"{path} present, GPU {device}: {gpu.get('name')}, driver {gpu.get('driver')}"


def _find_binary(binary: str | None) -> str | None:
    if binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else shutil.which(binary)
    return shutil.which(BINARY)


class sigterm_unwinds:
    """While active on the main thread, SIGTERM raises ``SystemExit(143)`` instead of killing
    the interpreter on the spot, so ``finally`` blocks run: the MPS daemon is stopped, worker
    processes are killed, temporary directories are removed. (Default SIGTERM skips all of it,
    and a batch scheduler's ``scancel`` or a ``timeout`` sends exactly that.) A handler the
    program installed itself is left alone, as is SIGINT, which already raises
    KeyboardInterrupt. Re-entrant: nested uses restore what they found."""

    def __init__(self):
        self._old = None

    @staticmethod
    def _raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    self._old = signal.signal(signal.SIGTERM, self._raise_exit)
            except (ValueError, OSError):   # not allowed here (embedded interpreter etc.)
                self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            try:
                signal.signal(signal.SIGTERM, self._old)
            except (ValueError, OSError, TypeError):
                pass
            self._old = None


def _short_tempdir(prefix: str) -> str:
    # The pipe directory holds Unix sockets, whose paths are limited to ~107 bytes; a long $TMPDIR
    # (common on clusters) would make the daemon fail with an unhelpful error, so use /tmp then.
    base = tempfile.gettempdir()
    if len(base) > 60 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def _physical_device(device: int) -> str:
    # The daemon is started with CUDA_VISIBLE_DEVICES naming one GPU. If this process already has
    # CUDA_VISIBLE_DEVICES (e.g. from a scheduler), `device` indexes into that list.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        items = [v.strip() for v in visible.split(",") if v.strip()]
        if device >= len(items):
            raise MpsUnavailable(f"device {device} is not among CUDA_VISIBLE_DEVICES={visible!r}")
        return items[device]
    return str(device)


def format_mem_limit(mem_limit, ordinal: int = 0) -> str:
    """Value for ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``: an int is bytes (rounded up to MiB), a str
    like ``"2G"``/``"512M"`` is a size for the client's device 0, and a str containing ``=`` is
    passed through as a full ``"ordinal=limit,..."`` list."""
    if isinstance(mem_limit, bool):
        raise TypeError("mem_limit must be bytes (int) or a size string like '2G', got a bool")
    if isinstance(mem_limit, int):
        if mem_limit <= 0:
            raise ValueError(f"mem_limit must be positive, got {mem_limit}")
        return f"{ordinal}={-(-mem_limit // 2**20)}M"
    if isinstance(mem_limit, str):
        s = mem_limit.strip()
        if "=" in s:
            return s
        if not re.fullmatch(r"\d+(\.\d+)?[KMGT]?B?", s, flags=re.I):
            raise ValueError(f"mem_limit {mem_limit!r} is not a size like '2G' or '512M'")
        return f"{ordinal}={s}"
    raise TypeError(f"mem_limit must be an int (bytes) or str, got {type(mem_limit).__name__}")


def format_quota(quota: float) -> str:
    return f"{int(round(quota))}" if abs(quota - round(quota)) < 1e-9 else f"{quota:g}"


# --------------------------------------------------------------------------------------- daemon
class MpsDaemon:
    """A private ``nvidia-cuda-mps-control -d`` for one GPU.

    >>> with MpsDaemon(device=0) as d:                       # doctest: +SKIP
    ...     env = d.client_env(quota=40, mem_limit="8G")     # pass to a subprocess
    """

    def __init__(self, device: int = 0, *, binary: str | None = None, pipe_dir: str | None = None,
                 log_dir: str | None = None, startup_timeout: float = 30.0,
                 check_gpu: bool = True):
        if not isinstance(device, int) or isinstance(device, bool) or device < 0:
            raise ValueError(f"device must be a GPU index >= 0, got {device!r}")
        self.device = device
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.check_gpu = check_gpu
        self._pipe_dir, self._log_dir = pipe_dir, log_dir
        self._own_dirs: list[str] = []
        self.pipe_dir: str | None = None
        self.log_dir: str | None = None
        self.pid: int | None = None
        self.last_log = ""
        self._path: str | None = None
        self._atexit = None
        self._term_guard: sigterm_unwinds | None = None
        self._lock = threading.RLock()

    # -- environment
    def daemon_env(self) -> dict:
        env = dict(os.environ)
        env["CUDA_MPS_PIPE_DIRECTORY"] = self.pipe_dir
        env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        env["CUDA_VISIBLE_DEVICES"] = _physical_device(self.device)
        return env

    def client_env(self, quota: float | None = None, mem_limit=None,
                   base: Mapping[str, str] | None = None) -> dict:
        """Environment for a client process of this daemon, limited to ``quota`` percent of the
        GPU's threads and, optionally, ``mem_limit`` of pinned device memory."""
        if not self.running:
            raise RuntimeError("MPS daemon is not running; start() it before building client envs")
        env = dict(os.environ if base is None else base)
        env["CUDA_MPS_PIPE_DIRECTORY"] = self.pipe_dir
        env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the server already exposes only our GPU, as device 0
        if quota is not None:
            if not 0 < float(quota) <= 100:
                raise ValueError(f"quota must be in (0, 100] percent, got {quota!r}")
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = format_quota(float(quota))
        else:
            env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        if mem_limit is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = format_mem_limit(mem_limit)
        else:
            env.pop("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", None)
        return env

    # -- lifecycle
    def start(self) -> "MpsDaemon":
        """Start the daemon; raises :class:`MpsUnavailable` with the reason if it cannot run."""
        with self._lock:
            if self.running:
                return self
            if self.check_gpu:
                ok, reason = mps_available(self.device, self.binary)
                if not ok:
                    raise MpsUnavailable(reason)
            self._path = _find_binary(self.binary)
            if self._path is None:
                raise MpsUnavailable(f"{self.binary or BINARY} not found")
            self.pipe_dir = self._pipe_dir or self._mkdir("tbk-mps-pipe-")
            self.log_dir = self._log_dir or self._mkdir("tbk-mps-log-")
            env = self.daemon_env()
            # Output goes to a file, not a pipe: `-d` forks, and a pipe inherited by the background
            # process would keep subprocess.run waiting for an EOF that never comes.
            with tempfile.TemporaryFile(mode="w+") as out_f:
                try:
                    proc = subprocess.run([self._path, "-d"], env=env, stdin=subprocess.DEVNULL,
                                          stdout=out_f, stderr=subprocess.STDOUT,
                                          timeout=self.startup_timeout)
                except (OSError, subprocess.TimeoutExpired) as e:
                    self._kill_by_pidfile()
                    self._cleanup_dirs()
                    raise MpsUnavailable(f"could not run `{self._path} -d`: {e}") from None
                out_f.seek(0)
                output = out_f.read()
            if proc.returncode != 0:
                msg = output.strip() or f"exit status {proc.returncode}"
                log = self._read_log()
                self._cleanup_dirs()
                raise MpsUnavailable(f"`{self._path} -d` failed: {msg}"
                                     + (f"; control.log: {log[-500:]}" if log else ""))
            # `-d` forks; the daemon is ready once it answers on its pipe.
            deadline = time.monotonic() + self.startup_timeout
            while True:
                rc, text = self._control("get_server_list", timeout=10)
                if rc == 0:
                    break
                if time.monotonic() > deadline:
                    log = self._read_log()
                    self._kill_by_pidfile()
                    self._cleanup_dirs()
                    raise MpsUnavailable(f"MPS control daemon did not answer within "
                                         f"{self.startup_timeout:g} s: {text.strip()} {log[-500:]}")
                time.sleep(0.05)
            self.pid = self._read_pid()
            self._atexit = self._stop_at_exit
            atexit.register(self._atexit)
            return self

    def stop(self, timeout: float = 30.0) -> None:
        """``echo quit | nvidia-cuda-mps-control`` with our pipe directory, wait for the daemon to
        exit, then remove the directories we created. Idempotent. If the daemon ignores ``quit``
        it is sent SIGTERM (it is our own child; its pid comes from its pid file) and a warning
        says so."""
        with self._lock:
            if self.pipe_dir is None:
                return
            try:
                rc, text = self._control("quit", timeout=timeout)
                deadline = time.monotonic() + timeout
                while self._alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._alive():
                    warnings.warn(f"MPS control daemon (pid {self.pid}) did not exit after 'quit' "
                                  f"within {timeout:g} s ({text.strip()}); sending SIGTERM",
                                  RuntimeWarning, stacklevel=2)
                    self._kill_by_pidfile()
                self.last_log = self._read_log()
            finally:
                if self._atexit is not None:
                    atexit.unregister(self._atexit)
                    self._atexit = None
                self._cleanup_dirs()
                self.pipe_dir = self.log_dir = None
                self.pid = None

    def status(self) -> dict:
        """{"running", "pid", "pipe_dir", "log_dir", "servers"} -- ``servers`` are the PIDs the
        daemon reports for ``get_server_list`` (an MPS server starts with its first client)."""
        st = {"running": False, "pid": self.pid, "pipe_dir": self.pipe_dir, "log_dir": self.log_dir,
              "servers": []}
        if self.pipe_dir is None:
            return st
        rc, text = self._control("get_server_list", timeout=10)
        st["running"] = rc == 0
        st["servers"] = [int(t) for t in text.split() if t.isdigit()]
        return st

    @property
    def running(self) -> bool:
        return self.pipe_dir is not None and self._alive()

    # -- context manager with signal handling
    def __enter__(self) -> "MpsDaemon":
        self.start()
        # Default SIGTERM kills the interpreter without unwinding, which would leak the daemon;
        # as SystemExit it unwinds through __exit__ (and runs atexit).
        self._term_guard = sigterm_unwinds().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            guard, self._term_guard = self._term_guard, None
            if guard is not None:
                guard.__exit__(None, None, None)

    # -- internals
    def _mkdir(self, prefix: str) -> str:
        d = _short_tempdir(prefix)
        self._own_dirs.append(d)
        return d

    def _cleanup_dirs(self) -> None:
        for d in self._own_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._own_dirs = []

    def _control(self, command: str, timeout: float) -> tuple[int, str]:
        env = dict(os.environ)
        env["CUDA_MPS_PIPE_DIRECTORY"] = self.pipe_dir
        env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        with tempfile.TemporaryFile(mode="w+") as out_f:
            try:
                proc = subprocess.run([self._path or BINARY], input=command + "\n", env=env,
                                      stdout=out_f, stderr=subprocess.STDOUT, text=True,
                                      timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                return -1, str(e)
            out_f.seek(0)
            return proc.returncode, out_f.read()

    def _read_pid(self) -> int | None:
        try:
            with open(os.path.join(self.pipe_dir, PID_FILE)) as f:
                return int(f.read().strip())
        except (OSError, ValueError, TypeError):
            return None

    def _alive(self) -> bool:
        pid = self.pid or (self._read_pid() if self.pipe_dir else None)
        if pid is None:
            # No pid file (older drivers): ask the daemon itself.
            return self.pipe_dir is not None and self._control("get_server_list", timeout=10)[0] == 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie (exited, not yet reaped by init) counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except OSError:
            return True

    def _kill_by_pidfile(self) -> None:
        pid = self.pid or (self._read_pid() if self.pipe_dir else None)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass

    def _read_log(self) -> str:
        if not self.log_dir:
            return ""
        try:
            with open(os.path.join(self.log_dir, "control.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _stop_at_exit(self) -> None:
        try:
            self.stop(timeout=10.0)
        except Exception:  # at exit there is nobody left to tell but stderr
            import traceback
            traceback.print_exc()

    def __repr__(self) -> str:
        return (f"MpsDaemon(device={self.device}, running={self.running}, pipe_dir={self.pipe_dir!r}, "
                f"pid={self.pid})")
