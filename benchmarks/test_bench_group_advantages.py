"""group_advantages against the ways GRPO trainers compute advantages today, in one session.

Baselines (re-implemented here from SPEC.md §1.4 and §2.1; nothing is imported from those repos):

* ``eager_flow_grpo_tracker``: Flow-GRPO's ``PerPromptStatTracker.update(type="grpo")`` with the
  training loop around it: rewards go torch -> numpy (float64), prompts are strings, each unique
  prompt's rewards are found with a boolean mask, advantages come back with ``torch.as_tensor``.
* ``eager_dance_grpo``: DanceGRPO's Python loop over contiguous groups, in torch.
* ``eager_vectorized``: the same math in one shot (``view(-1, G)``, mean/std over dim 1) -- the
  fair, strong eager baseline.
* ``compiled_vectorized``: ``torch.compile`` of ``eager_vectorized`` (static shapes).

tbkernels, for every backend that runs on this device (the Triton interpreter is never timed):

* ``tbkernels_<b>``: contiguous groups (``group_size``), ``preset="dance_grpo"``;
* ``tbkernels_<b>_ids``: an int64 id per sample, groups shuffled through the batch as in
  Flow-GRPO's gathered batch, ``preset="flow_grpo"``;
* ``tbkernels_<b>_prompts``: the prompt strings themselves as ``group_ids`` -- the drop-in
  replacement of the tracker call.

Every implementation's output is checked against the float64 reference of the same semantics, so a
row can only exist for code that computed the right advantages. The presets' ±5 clamp never binds
here: with G <= 24 no z-score reaches 5 (at most sqrt(G-1) for ddof=0, (G-1)/sqrt(G) for ddof=1).

On a GPU, CUDA-event latency of one call against an empty kernel launch, and the number of kernels
one call launches (``torch.profiler``), are recorded too.
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import tbkernels
from .results import BENCH_DEVICE as DEVICE, EMPTY_LAUNCH_OP

try:
    import triton
except ImportError:  # the Triton empty-launch floor is then skipped
    triton = None

OP = "group_advantages"
DTYPE = "float32"
NO_CLIP = math.inf


# --------------------------------------------------------------------------------------------
# Workloads.

@dataclass(frozen=True)
class Shape:
    batch: int
    group_size: int

    @property
    def num_groups(self) -> int:
        return self.batch // self.group_size

    @property
    def label(self) -> str:
        return f"B{self.batch}_gs{self.group_size}"


# Flow-GRPO's default epoch (48 prompts x 24 images), a typical 512 x 8 batch, and two large
# batches where memory traffic, not Python, should dominate.
SHAPES = [Shape(1152, 24), Shape(4096, 8), Shape(65536, 16), Shape(1_000_000, 16)]


class Workload:
    """Rewards plus both group layouts for one shape, and the float64 answers to check against."""

    def __init__(self, shape: Shape):
        self.shape = shape
        gen = torch.Generator().manual_seed(0)
        # Offset from 0, like real reward-model scores; a one-pass variance would show here.
        self.rewards = (torch.randn(shape.batch, generator=gen) * 0.7 + 3.0).to(DEVICE)
        # Flow-GRPO's gathered batch interleaves prompts: every group has G members, anywhere.
        self.group_of = (torch.randperm(shape.batch, generator=gen) // shape.group_size)
        self.group_ids = self.group_of.to(DEVICE)
        self._expected: dict[str, torch.Tensor] = {}

    @functools.cached_property
    def prompts(self) -> list[str]:
        texts = [f"prompt {g:07d}: a red square moves left to right over a blue background"
                 for g in range(self.shape.num_groups)]
        return [texts[g] for g in self.group_of.tolist()]

    def expected(self, grouping: str) -> torch.Tensor:
        if grouping not in self._expected:
            r = self.rewards.double()
            if grouping == "contiguous":
                adv = tbkernels.group_advantages(r, self.shape.group_size, preset="dance_grpo",
                                                 clip=NO_CLIP, backend="reference")
            else:
                adv = tbkernels.group_advantages(r, group_ids=self.group_ids, preset="flow_grpo",
                                                 clip=NO_CLIP, backend="reference")
            self._expected[grouping] = adv
        return self._expected[grouping]

    def bytes_moved(self, grouping: str) -> int:
        """The least traffic the task needs: rewards read and advantages written once (+ ids)."""
        per_sample = 4 + 4 + (8 if grouping == "ids" else 0)
        return per_sample * self.shape.batch


@functools.lru_cache(maxsize=1)  # one shape at a time: cases are ordered shape-major
def workload(shape: Shape) -> Workload:
    return Workload(shape)


# --------------------------------------------------------------------------------------------
# Baselines.

class PerPromptStatTracker:
    """Flow-GRPO's tracker, ``type="grpo"``, ``global_std=False`` (SPEC.md §1.4).

    Two passes over ``np.unique(prompts)`` with a boolean mask per prompt, as upstream does:
    first append this batch's rewards to the prompt's history, then normalise by the history's
    ``np.mean`` and population ``np.std`` + 1e-4. Upstream builds the mask once more in the
    second pass; reusing it makes this baseline slightly faster than the original, never slower.
    """

    def __init__(self):
        self.stats: dict[str, list] = {}

    def update(self, prompts, rewards) -> np.ndarray:
        prompts = np.array(prompts)
        rewards = np.array(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.zeros_like(rewards)
        for prompt in unique:
            self.stats.setdefault(prompt, []).extend(rewards[prompts == prompt])
        for prompt in unique:
            history = np.stack(self.stats[prompt])
            mask = prompts == prompt
            mean = np.mean(history, axis=0, keepdims=True)
            std = np.std(history, axis=0, keepdims=True) + 1e-4
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def clear(self) -> None:
        self.stats = {}


def flow_grpo_advantages(tracker: PerPromptStatTracker, prompts, rewards: torch.Tensor):
    """Flow-GRPO's training step around the tracker: to numpy, update, back to the device."""
    advantages = tracker.update(prompts, rewards.cpu().numpy())
    # Flow-GRPO clears once per epoch; clearing every call keeps stats = this batch's groups.
    tracker.clear()
    return torch.as_tensor(advantages).to(rewards.device)


def dance_grpo_loop(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DanceGRPO (``--use_group``): one slice, mean and unbiased std per contiguous group."""
    advantages = torch.zeros_like(rewards)
    for i in range(len(rewards) // group_size):
        lo, hi = i * group_size, (i + 1) * group_size
        group = rewards[lo:hi]
        advantages[lo:hi] = (group - group.mean()) / (group.std() + 1e-8)
    return advantages


def vectorized(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + 1e-8)).view(-1)


# --------------------------------------------------------------------------------------------
# Implementations under test: name, the semantics its output is checked against, a factory.

@dataclass(frozen=True)
class Impl:
    name: str
    grouping: str                                # "contiguous" (DanceGRPO) or "ids" (Flow-GRPO)
    make: Callable[[Workload], Callable[[], torch.Tensor]]
    max_batch: int | None = None                 # Python-bound: beyond this, seconds per call


def _tracker(w: Workload):
    tracker, prompts = PerPromptStatTracker(), w.prompts
    return lambda: flow_grpo_advantages(tracker, prompts, w.rewards)


def _dance(w: Workload):
    return lambda: dance_grpo_loop(w.rewards, w.shape.group_size)


def _vectorized(w: Workload):
    return lambda: vectorized(w.rewards, w.shape.group_size)


def _compiled(w: Workload):
    compiled = torch.compile(vectorized, dynamic=False)
    return lambda: compiled(w.rewards, w.shape.group_size)


def tbkernels_call(w: Workload, backend: str, form: str, check_finite: bool = True):
    """One public-API call; ``form`` is how groups are given: contiguous, ids or prompts."""
    r, gs = w.rewards, w.shape.group_size
    if form == "contiguous":
        return lambda: tbkernels.group_advantages(r, gs, preset="dance_grpo", backend=backend,
                                                  check_finite=check_finite)
    ids = w.group_ids if form == "ids" else w.prompts
    return lambda: tbkernels.group_advantages(r, group_ids=ids, preset="flow_grpo",
                                              backend=backend, check_finite=check_finite)


def timed_backends() -> list[str]:
    status = tbkernels.backends(DEVICE)
    # Under TRITON_INTERPRET=1 "triton" runs on CPU tensors, but that times the Python interpreter.
    return [b for b in ("cpu", "cuda", "triton", "reference")
            if status[b].available and not (b == "triton" and DEVICE.type == "cpu")]


# Left out where one call takes seconds: the tracker compares every prompt string against all B
# (O(B^2 / G), ~7 s per call at B=65536); DanceGRPO's loop makes ~5 small torch calls per group
# (~1.2 s per call at B=1M).
BASELINES = [
    Impl("eager_flow_grpo_tracker", "ids", _tracker, max_batch=4096),
    Impl("eager_dance_grpo", "contiguous", _dance, max_batch=65536),
    Impl("eager_vectorized", "contiguous", _vectorized),
    Impl("compiled_vectorized", "contiguous", _compiled),
]


def tbkernels_impls() -> list[Impl]:
    impls = []
    for b in timed_backends():
        impls += [
            Impl(f"tbkernels_{b}", "contiguous", lambda w, b=b: tbkernels_call(w, b, "contiguous")),
            Impl(f"tbkernels_{b}_ids", "ids", lambda w, b=b: tbkernels_call(w, b, "ids")),
            Impl(f"tbkernels_{b}_prompts", "ids", lambda w, b=b: tbkernels_call(w, b, "prompts")),
        ]
    return impls


def cases():
    out = []
    for shape in SHAPES:
        for impl in BASELINES + tbkernels_impls():
            if impl.max_batch is None or shape.batch <= impl.max_batch:
                out.append(pytest.param(shape, impl, id=f"{shape.label}-{impl.name}"))
    return out


# --------------------------------------------------------------------------------------------
# Helpers.

def on_device(fn):
    """Make a call's time include its GPU work: CUDA launches return before the kernels finish."""
    if DEVICE.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out
    return synced


def check_matches(out: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{name} computed different advantages: {m}")


def run_benchmark(benchmark, fn):
    if benchmark.enabled:
        fn()  # first-call costs (lazy init, torch.compile) would otherwise skew the calibration
    return benchmark(fn)


def stats_of(benchmark):
    return benchmark.stats.stats if benchmark.stats else None


# --------------------------------------------------------------------------------------------
# The suite.

@pytest.mark.parametrize("shape,impl", cases())
def test_group_advantages(benchmark, recorder, shape, impl):
    w = workload(shape)
    out = run_benchmark(benchmark, on_device(impl.make(w)))
    check_matches(out, w.expected(impl.grouping), impl.name)
    recorder.add_timing(OP, impl.name, shape.label, DTYPE, stats_of(benchmark),
                        bytes_moved=w.bytes_moved(impl.grouping))


# --------------------------------------------------------------------------------------------
# GPU only: launch-bound latency and kernel counts.

needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda",
                                reason="CUDA-event latency and kernel counts need a CUDA device")
LATENCY_SHAPES = [Shape(1024, 8), Shape(65536, 16)]
LATENCY_REPS = 200

if triton is not None:
    @triton.jit
    def _empty_kernel(x_ptr):
        pass


def cuda_event_latency_us(fn, reps: int = LATENCY_REPS) -> float:
    """Median time from a start event to an end event around one call, the stream idle before.

    With the stream idle, the start event fires at once, so the interval includes the host work
    that launches the call's kernels: for small calls that, not the kernels, is the latency.
    """
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def gpu_activity(fn) -> Counter:
    """Counts of GPU trace events by category ("kernel", "gpu_memcpy", "gpu_memset") of one call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    return Counter(e.get("cat") for e in events if e.get("ph") == "X")


def record_gpu_counts(recorder, op, backend, shape, dtype, fn) -> None:
    counts = gpu_activity(fn)
    if counts["kernel"] == 0:
        # Every call here launches a kernel: zero means CUPTI saw nothing (no permission, say).
        warnings.warn(f"torch.profiler recorded no kernels for {backend}; launch count not recorded")
        return
    recorder.add(op, backend, shape, dtype, "kernel_launches", counts["kernel"])
    recorder.add(op, backend, shape, dtype, "memcpy_memset_ops",
                 counts["gpu_memcpy"] + counts["gpu_memset"])


def empty_launch(kind: str):
    buf = torch.zeros(1, device=DEVICE)
    if kind == "torch_add_1elem":
        return lambda: buf.add_(1)
    if triton is None:
        pytest.skip("triton is not importable: no empty Triton kernel to time")
    return lambda: _empty_kernel[(1,)](buf)


@needs_cuda
@pytest.mark.parametrize("kind", ["torch_add_1elem", "triton_empty_kernel"])
def test_gpu_empty_launch(benchmark, recorder, kind):
    launch = empty_launch(kind)
    run_benchmark(benchmark, on_device(launch))
    recorder.add_timing(EMPTY_LAUNCH_OP, kind, "1", DTYPE, stats_of(benchmark))
    recorder.add(EMPTY_LAUNCH_OP, kind, "1", DTYPE, "latency_us", cuda_event_latency_us(launch))
    record_gpu_counts(recorder, EMPTY_LAUNCH_OP, kind, "1", DTYPE, launch)


@needs_cuda
@pytest.mark.parametrize("form", ["contiguous", "ids"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", LATENCY_SHAPES, ids=lambda s: s.label)
def test_gpu_latency(benchmark, recorder, shape, backend, form):
    status = tbkernels.backends(DEVICE)[backend]
    if not status.available:
        pytest.skip(f"{backend} backend unavailable: {status.reason}")
    w = workload(shape)
    call = tbkernels_call(w, backend, form, check_finite=False)
    out = run_benchmark(benchmark, on_device(call))
    grouping = "contiguous" if form == "contiguous" else "ids"
    name = f"tbkernels_{backend}{'' if form == 'contiguous' else '_ids'}_nocheck"
    check_matches(out, w.expected(grouping), name)
    recorder.add_timing(OP, name, shape.label, DTYPE, stats_of(benchmark),
                        bytes_moved=w.bytes_moved(grouping))
    recorder.add(OP, name, shape.label, DTYPE, "latency_us", cuda_event_latency_us(call))
    record_gpu_counts(recorder, OP, name, shape.label, DTYPE, call)
