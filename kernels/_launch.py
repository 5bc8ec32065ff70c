"""Launch-side helpers shared by the Triton wrappers (flow_step, group_advantages, per_sample_mse).

Each wrapper sizes its tiles for the machine that runs them: large tiles under the Triton
interpreter (every program is a numpy evaluation in Python, so fewer programs is faster) and
GPU-sized tiles when the kernels are compiled. ``assume_gpu(sm_count)`` makes the wrappers take
the GPU plan for CPU tensors too; the tests use it to run the GPU tile plan under the
interpreter, and ``kernels/compile_check.py`` uses it to record the exact launches a GPU would
compile and compile them for sm_80 / sm_90 on a machine without one.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

# SM count to plan for while ``assume_gpu`` is active; None: decide from the tensor.
_assumed_sm_count: Optional[int] = None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_tiles(t: torch.Tensor) -> bool:
    """True when the kernels run compiled on a GPU (or a GPU is assumed): use the GPU tile plan."""
    if _assumed_sm_count is not None:
        return True
    return t.device.type == "cuda" and not interpreter_enabled()


def sm_count(device: torch.device) -> int:
    if _assumed_sm_count is not None:
        return _assumed_sm_count
    return _cuda_sm_count(device.index if device.index is not None
                          else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _major_minor(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def interpreter_incompatibility() -> str:
    """Why Triton's interpreter cannot run these kernels with the installed packages ("" if it
    can). Triton <= 3.6's interpreter turns a scalar kernel argument used as a loop bound into a
    Python int with ``int()`` of a one-element array, which numpy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"); Triton 3.7 squeezes the array
    first. Found running the suite under triton 3.6.0 + numpy 2.4.6 (every interpreted launch
    with a runtime loop bound failed); numpy 2.3.5 ran it. Compiled (GPU) Triton is unaffected."""
    try:
        import numpy
        import triton
    except ImportError:
        return ""
    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                "(int() of a one-element array); use numpy < 2.4 or triton >= 3.7")
    return ""


def require_launchable(t: torch.Tensor, op: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under a working interpreter."""
    if interpreter_enabled():
        problem = interpreter_incompatibility()
        if problem:
            raise RuntimeError(f"{op} (triton): {problem}")
        return
    if t.device.type == "cuda" or _assumed_sm_count is not None:
        return
    raise RuntimeError(f"{op} (triton): tensors are on {t.device}; Triton needs CUDA tensors, "
                       "or TRITON_INTERPRET=1 (set before triton is imported) for CPU tensors")


def launch_device(args) -> Optional[torch.device]:
    """The CUDA device a wrapper's kernels must launch on: that of its first tensor argument
    (None for CPU tensors under the interpreter)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device if a.device.type == "cuda" and not interpreter_enabled() else None
    return None


def on_tensor_device(wrapper):
    """Run a Triton wrapper with its tensors' device current. Triton launches on the *current*
    device and its current stream (triton.runtime.jit: driver.active.get_current_device()), not
    on the tensors' device: tensors on cuda:1 while cuda:0 is current (a model moved with
    .to("cuda:1") without torch.cuda.set_device) would be launched on the wrong GPU. The C++
    CUDA ops take a CUDAGuard for the same reason."""
    @functools.wraps(wrapper)
    def run(*args, **kwargs):
        device = launch_device(args)
        if device is None:
            return wrapper(*args, **kwargs)
        with torch.cuda.device(device):
            return wrapper(*args, **kwargs)
    return run


@contextlib.contextmanager
def assume_gpu(sms: int = 132) -> Iterator[None]:
    """Plan launches as on a GPU with ``sms`` SMs (132: H100 SXM / H200), whatever the tensors'
    device. Not thread-safe; meant for tests and the compile check."""
    global _assumed_sm_count
    previous, _assumed_sm_count = _assumed_sm_count, int(sms)
    try:
        yield
    finally:
        _assumed_sm_count = previous


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
