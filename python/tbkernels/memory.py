"""Peak-memory measurement of a block of code: torch's allocator and NVML on a GPU, the peak
resident set on a CPU.

    import tbkernels
    with tbkernels.memory.peak_memory() as mem:      # CUDA device if tensors live there, else CPU
        loss, _ = tbkernels.dpo_backward(chosen_fn, rejected_fn, beta=100.0, mode="recompute")
    print(mem)                                       # one line; mem.as_dict() for a CSV
    mem.peak_extra                                   # bytes above what was in use at entry

What is measured (DESIGN.md, "Real parts": NVML and torch's allocator statistics):

* CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after
  ``reset_peak_memory_stats`` at entry (the allocator's exact peaks: live tensors, and what the
  caching allocator holds), and — when ``nvidia-ml-py`` is importable — the device memory in use
  as NVML reports it (``nvmlDeviceGetMemoryInfo().used``, sampled every ``nvml_interval``
  seconds on a background thread, so its peak can miss a spike shorter than that; it counts every
  process on the device and the CUDA context).
* :func:`peak_tensor_memory` (any device): the exact peak of bytes held by tensor storages created
  inside the block, counted through a ``TorchDispatchMode`` (autograd's backward included): no
  allocator in the number at all, so it separates a real difference of a few hundred KiB from
  allocator noise. For measurement runs (it slows every op), not for training.
* CPU: the process's peak resident set, ``VmHWM`` from ``/proc/self/status`` after resetting it to
  the current RSS through ``/proc/self/clear_refs`` (Linux >= 4.0). glibc keeps freed blocks
  resident unless they were mmapped: run with a fixed threshold such as
  ``MALLOC_MMAP_THRESHOLD_=131072`` (as ``bench_flow_grpo.py`` does; ``dpo_memory.py`` uses
  32768) so that RSS tracks live tensors. Where the reset is impossible the peak is the
  process's lifetime peak and ``rss_reset`` is False. Nested blocks keep their own peaks.
  The RSS is the whole process's: memory freed inside the block by something else -- another
  thread, or a garbage collection releasing older cycles that hold tensors -- lowers it and hides
  part of the block's own peak. For a clean number call ``gc.collect()`` before the block and
  keep other threads quiet (or count tensors exactly with :func:`peak_tensor_memory`).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass

import torch

__all__ = ["PeakMemory", "PeakTensorMemory", "peak_memory", "peak_tensor_memory", "rss_bytes"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """The process's current resident set (bytes), None where /proc is unavailable."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


# Open CPU peak_memory blocks, innermost last, each with the highest VmHWM read before an inner
# block reset it: the kernel keeps one peak per process, so a nested block's reset would
# otherwise erase what the enclosing block had seen.
_OPEN_CPU_BLOCKS: list[list] = []
_OPEN_CPU_LOCK = threading.Lock()


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                        # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """What :func:`peak_memory` measured (bytes; None where not measured on this device)."""
    device: str
    # CUDA: torch's caching allocator
    start_allocated: int | None = None
    peak_allocated: int | None = None
    end_allocated: int | None = None
    start_reserved: int | None = None
    peak_reserved: int | None = None
    # CUDA: NVML device memory in use (all processes), sampled
    device_used_start: int | None = None
    device_used_peak: int | None = None
    device_total: int | None = None
    nvml: str | None = None                     # why NVML numbers are missing, when they are
    # CPU: resident set
    start_rss: int | None = None
    peak_rss: int | None = None
    end_rss: int | None = None
    rss_reset: bool | None = None

    @property
    def peak(self) -> int | None:
        """Peak allocated (CUDA) or peak RSS (CPU)."""
        return self.peak_allocated if self.peak_allocated is not None else self.peak_rss

    @property
    def start(self) -> int | None:
        return self.start_allocated if self.start_allocated is not None else self.start_rss

    @property
    def peak_extra(self) -> int | None:
        """Peak minus what was in use at entry: the block's own high-water mark."""
        if self.peak is None or self.start is None:
            return None
        return self.peak - self.start

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_extra"] = self.peak_extra
        return d

    def __str__(self) -> str:
        def mib(x):
            return "n/a" if x is None else f"{x / 2**20:.1f} MiB"
        if self.peak_allocated is not None:
            s = (f"{self.device}: peak allocated {mib(self.peak_allocated)} "
                 f"(+{mib(self.peak_extra)} over entry), peak reserved {mib(self.peak_reserved)}")
            if self.device_used_peak is not None:
                s += f", NVML device used peak {mib(self.device_used_peak)}"
            return s
        return (f"{self.device}: peak RSS {mib(self.peak_rss)} (+{mib(self.peak_extra)} over "
                f"entry){'' if self.rss_reset else ', lifetime peak (VmHWM could not be reset)'}")


class _NvmlSampler:
    def __init__(self, device: torch.device, interval: float):
        self.handle = None
        self.reason = None
        self.peak = self.start = self.total = None
        self._stop = threading.Event()
        self._thread = None
        self.interval = interval
        try:
            import pynvml                                   # nvidia-ml-py
            pynvml.nvmlInit()
            self._nvml = pynvml
            index = device.index if device.index is not None else torch.cuda.current_device()
            try:
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(
                    uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
            except Exception:                               # older drivers / torch: by index
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:                              # not installed, no driver, ...
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def __enter__(self):
        if self.handle is None:
            return self
        info = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        self.start = self.peak = int(info.used)
        self.total = int(info.total)

        def loop():
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self._used())
        self._thread = threading.Thread(target=loop, name="tbk-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._used())
        return False


@contextlib.contextmanager
def peak_memory(device: str | torch.device | None = None, *, nvml_interval: float = 0.005):
    """Measure the peak memory of the enclosed block.

    Parameters
    ----------
    device : ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or None
        None: the current CUDA device when CUDA is available, else the CPU.
    nvml_interval : float
        Seconds between NVML samples (CUDA only).

    Yields
    ------
    :class:`PeakMemory`, filled in when the block exits (also when it raises). CUDA work is
    synchronised at entry and exit, so the numbers cover the block's kernels.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    result = PeakMemory(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.start_allocated = torch.cuda.memory_allocated(device)
        result.start_reserved = torch.cuda.memory_reserved(device)
        sampler = _NvmlSampler(device, nvml_interval)
        result.nvml = sampler.reason
        try:
            with sampler:
                yield result
                torch.cuda.synchronize(device)
        finally:
            result.peak_allocated = torch.cuda.max_memory_allocated(device)
            result.peak_reserved = torch.cuda.max_memory_reserved(device)
            result.end_allocated = torch.cuda.memory_allocated(device)
            result.device_used_start, result.device_used_peak = sampler.start, sampler.peak
            result.device_total = sampler.total
        return
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures CUDA devices and the CPU, not {device.type}")
    with _OPEN_CPU_LOCK:
        hwm = _status_kib("VmHWM")
        for entry in _OPEN_CPU_BLOCKS:          # keep the enclosing blocks' peaks
            if hwm is not None:
                entry[1] = max(entry[1], hwm)
        result.rss_reset = _reset_hwm()
        entry = [result, 0]
        _OPEN_CPU_BLOCKS.append(entry)
    result.start_rss = rss_bytes()
    try:
        yield result
    finally:
        with _OPEN_CPU_LOCK:
            _OPEN_CPU_BLOCKS.remove(entry)
            hwm = _status_kib("VmHWM")
        result.peak_rss = None if hwm is None else max(hwm, entry[1]) * 1024
        result.end_rss = rss_bytes()
        if result.peak_rss is None:                  # no /proc: the lifetime peak, in KiB
            import resource
            result.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result.rss_reset = False


@dataclass
class PeakTensorMemory:
    """What :func:`peak_tensor_memory` counted (bytes of tensor storages created in the block)."""
    peak_bytes: int = 0
    live_at_exit: int = 0
    allocations: int = 0
    peak_op: str | None = None                   # the op whose output set the peak


@contextlib.contextmanager
def peak_tensor_memory():
    """Exact peak of the bytes held by tensors created inside the block.

    Every op's outputs are seen through a ``TorchDispatchMode`` (forward and backward: autograd
    runs CPU backward work on the calling thread, and the mode is carried into it); each new
    storage is counted from its creation until it is freed (a finalizer on the storage). Views
    share their base's storage and count once. Tensors that existed before the block (weights,
    inputs) are not counted; memory used inside a kernel without a tensor is not seen.

    Works on the ``meta`` device too, where nothing is computed or allocated: run a model built
    under ``torch.device("meta")`` on meta inputs and this counts the bytes its tensors *would*
    hold, at full size, in seconds (``benchmarks/dpo_memory.py --meta`` does that for Wan2.1-1.3B).
    What differs on a real device: allocator rounding and caching, kernel workspaces, and any op
    whose meta implementation allocates differently from its device kernel (attention: call a
    memory-efficient kernel explicitly, since meta SDPA takes the math path).

    Yields
    ------
    :class:`PeakTensorMemory`, updated live and final when the block exits (tensors freed
    after it no longer change ``live_at_exit``).
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_flatten

    result = PeakTensorMemory()
    live: dict = {}
    lock = threading.Lock()
    open_ = [True]                               # False once the block has exited

    def storage_key(storage):
        # meta storages have no address (data_ptr 0); their StorageImpl pointer is unique while
        # they are alive, which is as long as a key is kept
        if storage.device.type == "meta":
            return ("meta", storage._cdata)
        return (storage.device, storage.data_ptr())

    def storages(t):
        # A wrapper subclass (DTensor under FSDP2, ...) owns no memory itself: its inner tensors
        # do, and they are what is counted.
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    yield from storages(inner)
        else:
            yield t.untyped_storage()

    def freed(key, nbytes):
        with lock:
            if live.pop(key, None) is not None and open_[0]:
                result.live_at_exit -= nbytes

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # An output that shares storage with an input (a view of it, or the input itself
            # after an in-place or out= op) is not new memory. Without this check a view, made
            # inside the block, of a weight made before it (``weight.t()`` in every ``Linear``)
            # would count as a new weight-sized allocation.
            inputs = set()
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor):
                    inputs.update(storage_key(s) for s in storages(a))
            outputs = [s for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                       for s in storages(t)]
            for storage in outputs:
                nbytes = storage.nbytes()
                key = storage_key(storage)
                if nbytes == 0 or key in inputs:
                    continue
                with lock:
                    if key in live:
                        continue
                    live[key] = nbytes
                    result.allocations += 1
                    result.live_at_exit += nbytes
                    if result.live_at_exit > result.peak_bytes:
                        result.peak_bytes = result.live_at_exit
                        result.peak_op = str(func)
                weakref.finalize(storage, freed, key, nbytes)
            return out

    try:
        with _Counter():
            yield result
    finally:
        with lock:
            open_[0] = False
