"""Which implementations of an op exist here, and which one a call uses.

Every hot op has up to four implementations of one function (DESIGN.md, "The op contract"):
``reference`` (plain PyTorch), ``cpu`` (C++ in ``tbkernels._C``), ``cuda`` (CUDA in ``tbkernels._C``)
and ``triton``. A call picks one, in this order of precedence:

1. the op's ``backend=`` argument,
2. the ``TBK_BACKEND`` environment variable,
3. the fastest available for the tensor's device: CPU tensors ``cpu`` then ``reference`` (the
   Triton interpreter is for tests, never chosen automatically); CUDA tensors ``cuda``, then
   ``triton``, then ``reference``; meta tensors the compiled op (``cpu``: its meta kernel, which
   allocates what the CPU and CUDA kernels allocate), then ``reference``.

A forced backend that cannot run the call raises ``RuntimeError`` saying why; it never falls back
silently.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
# meta tensors (memory models, tracing) take the compiled op when there is one: its meta kernel
# allocates exactly the outputs, as the CPU and CUDA kernels do, where the reference's eager
# code would allocate its temporaries.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference"),
               "meta": ("cpu", "reference")}


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __str__(self) -> str:
        return ("yes: " if self.available else "no: ") + self.reason


@functools.lru_cache(maxsize=None)
def _compiled():
    """(module or None, why not)."""
    try:
        return importlib.import_module("tbkernels._C"), ""
    except ImportError as e:  # a source checkout without a build, or an ABI mismatch
        return None, f"tbkernels._C did not import ({e}); install with `pip install --no-build-isolation .`"


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return True, f"triton {triton.__version__}"


def _interpreter_incompatibility() -> str:
    try:
        from tbkernels.kernels._launch import interpreter_incompatibility
    except ImportError:                       # installed without the kernels subpackage
        return ""
    return interpreter_incompatibility()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name: str, device_type: str | None) -> BackendStatus:
    """Availability of one backend for tensors on ``device_type`` (None: on any device here)."""
    if name == "reference":
        if device_type == "cuda" and not torch.cuda.is_available():
            return BackendStatus(False, "plain PyTorch, but no CUDA device is visible")
        return BackendStatus(True, "plain PyTorch, any device and dtype")
    if name == "cpu":
        mod, why = _compiled()
        if mod is None:
            return BackendStatus(False, why)
        if device_type == "meta":
            return BackendStatus(True, "the compiled op's meta kernel (shapes and memory, no "
                                       "values)")
        if device_type not in (None, "cpu"):
            return BackendStatus(False, f"C++ CPU kernels take CPU tensors, not {device_type}")
        if not getattr(mod, "built_with_openmp", lambda: False)():
            return BackendStatus(True, "C++ kernels, 1 thread (built without OpenMP)")
        return BackendStatus(True, f"C++ kernels, {torch.get_num_threads()} threads")
    if name == "cuda":
        mod, why = _compiled()
        if mod is None:
            return BackendStatus(False, why)
        if not mod.built_with_cuda():
            return BackendStatus(False, "tbkernels._C was built without CUDA (torch without CUDA "
                                        "or no nvcc at install time; TBK_BUILD_CUDA=1 forces it)")
        if not torch.cuda.is_available():
            return BackendStatus(False, "built with CUDA, but no CUDA device is visible")
        if device_type not in (None, "cuda"):
            return BackendStatus(False, f"CUDA kernels take CUDA tensors, not {device_type}")
        return BackendStatus(True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    if name == "triton":
        ok, why = _triton()
        if not ok:
            return BackendStatus(False, why)
        on_gpu = torch.cuda.is_available()
        if device_type == "cpu" or (device_type is None and not on_gpu):
            if _interpreting():
                problem = _interpreter_incompatibility()
                if problem:
                    return BackendStatus(False, problem)
                return BackendStatus(True, f"{why} interpreter (TRITON_INTERPRET=1; slow, for tests)")
            return BackendStatus(False, f"{why} needs a CUDA device, or TRITON_INTERPRET=1 for "
                                        "CPU tensors")
        if not on_gpu:
            return BackendStatus(False, f"{why}, but no CUDA device is visible")
        return BackendStatus(True, f"{why} on {torch.cuda.get_device_name()}")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends(device: str | torch.device | None = None) -> dict[str, BackendStatus]:
    """Which implementations can run here, and why the others cannot.

    Parameters
    ----------
    device : optional
        Report for tensors on this device (``"cpu"``, ``"cuda"``); default: anywhere on this machine.

    Returns
    -------
    dict mapping each of ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` to a
    :class:`BackendStatus` with ``available`` and ``reason``.
    """
    dtype = torch.device(device).type if device is not None else None
    return {name: _status(name, dtype) for name in BACKENDS}


@functools.lru_cache(maxsize=None)
def _runnable(name: str, device_type: str, interpreting: bool) -> BackendStatus:
    """_status for the per-call backend choice, memoized: what it depends on (the compiled
    module, CUDA's visibility, the installed Triton) does not change within a process, except
    TRITON_INTERPRET, which is part of the key. Saves ~10 us of host time per op call (CUDA's
    device-name query among it), which a fast GPU kernel would wait on."""
    return _status(name, device_type)


def resolve_backend(op: str, implemented: tuple[str, ...], device: torch.device,
                    backend: str | None) -> str:
    """The backend a call of ``op`` on tensors of ``device`` uses (see module docstring)."""
    forced = backend if backend is not None else os.environ.get("TBK_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {forced!r}"
                             + (" (from TBK_BACKEND)" if backend is None else ""))
        if forced not in implemented:
            raise RuntimeError(f"{op} has no {forced!r} implementation (it has {implemented})")
        status = _runnable(forced, device.type, _interpreting())
        if not status.available:
            raise RuntimeError(f"{op}: backend {forced!r} cannot run on {device.type} tensors "
                               f"here: {status.reason}")
        return forced
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        if name in implemented and _runnable(name, device.type, _interpreting()).available:
            return name
    return "reference"
