"""Flow-GRPO loss step: eager PyTorch (as Flow-GRPO writes it), torch.compile of that code, and each
tbkernels backend — forward, backward, forward+backward — with bytes moved, achieved bandwidth
against the measured device copy bandwidth, and peak extra memory.

    python benchmarks/bench_flow_grpo.py                 # CPU: Wan 480p latent [4,16,21,60,104] fp32
    python benchmarks/bench_flow_grpo.py --quick         # small shape, for a smoke run
    python benchmarks/bench_flow_grpo.py --gpu           # GPU shapes: bf16 [8,16,21,60,104] and 720p
    python benchmarks/bench_flow_grpo.py --meta          # the GPU shapes' step memory, modeled
    python benchmarks/bench_flow_grpo.py --host          # host overhead: device ops, host time
    python benchmarks/bench_flow_grpo.py --map both      # with a ViPO advantage map (per position
                                                         # and per element); combines with --gpu
    python benchmarks/bench_flow_grpo.py --gpu --mixed --trajectory
                     # Flow-GRPO's own inputs: bf16 model_output/reference beside float32 latents,
                     # sample/prev_sample (and old log-prob/map) as [:, j] trajectory slices

Rows go to the results CSV (benchmarks/results/results.csv, or $TBK_RESULTS_CSV) with op
``flow_grpo_loss`` (``flow_grpo_loss_map_position`` / ``_map_element`` with a map: times,
speedups and memory), with ``_trajectory`` appended under --trajectory; under --mixed the dtype
column reads ``bfloat16/float32`` (model_output/latents). Peak extra memory: on a GPU ``max_memory_allocated`` minus what was allocated
before the step; on a CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus
the resident set before the step, each variant in its own process (with a fixed glibc mmap
threshold, so freed tensors leave the resident set) so one cannot inflate another's peak. "Extra" includes the gradient the step must produce, so the floor is one latent.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# results.py beside this file. Run as a script, this folder is already sys.path[0]; loaded by
# path (the tests do) it is put there only for this import: left there, it would shadow
# modules such as the tests' conftest in every process spawned afterwards.
_HERE = str(Path(__file__).resolve().parent)
_ADDED = _HERE not in sys.path
if _ADDED:
    sys.path.insert(0, _HERE)
try:
    from results import Recorder, device_name, git_commit  # noqa: E402
finally:
    if _ADDED:
        sys.path.remove(_HERE)

import tbkernels  # noqa: E402
from tbkernels.ops import flow_grpo as fg  # noqa: E402

OP = "flow_grpo_loss"
BETA, CLIP = 0.04, 1e-4


# Flow-GRPO stores a rollout's latents as [B, steps, C, T, H, W] (sample["latents"] and
# sample["next_latents"]) and trains on the slices [:, j]; --trajectory gives x and prev so, and
# with a ViPO map the per-step old log-prob and the map (stored per step the same way).
TRAJECTORY_STEPS, TRAJECTORY_STEP = 10, 3


def _as_trajectory_slice(t):
    """t's values as step TRAJECTORY_STEP of a [B, TRAJECTORY_STEPS, ...] trajectory (a
    batch-strided view, each sample contiguous)."""
    traj = t.new_empty((t.shape[0], TRAJECTORY_STEPS) + tuple(t.shape[1:]))
    view = traj[:, TRAJECTORY_STEP]
    if t.device.type != "meta":
        view.copy_(t)
    return view


def make_inputs(shape, dtype, device, seed=0, trajectory=False, latent_dtype=None):
    """Step inputs: model_output v and the reference in ``dtype``, sample x and prev_sample in
    ``latent_dtype`` (default ``dtype``; Flow-GRPO keeps its trajectory in float32 beside a bf16
    transformer, --mixed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    latent_dtype = latent_dtype or dtype
    def rnd(dt):
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)
    v, x = rnd(dtype), rnd(latent_dtype)
    prev = (x + 0.05 * rnd(latent_dtype)).contiguous()
    ref = (v + 0.01 * rnd(dtype)).contiguous()
    if trajectory:
        x, prev = _as_trajectory_slice(x), _as_trajectory_slice(prev)
    b = shape[0]
    sigma = torch.full((b,), 0.8, device=device)
    sigma_next = torch.full((b,), 0.7, device=device)
    old = torch.full((b,), -1.0, device=device)
    adv = torch.linspace(-1.5, 1.5, b, device=device)
    # the same noise levels on the host, as a scheduler keeps them: what tbkernels is given
    # (its checks and coefficient table then cost the device nothing; flow_grpo.py)
    return dict(v=v, x=x, prev=prev, ref=ref, sigma=sigma, sigma_next=sigma_next, old=old, adv=adv,
                sigma_host=torch.full((b,), 0.8), sigma_next_host=torch.full((b,), 0.7))


MAP_KINDS = ("position", "element")


def add_map_inputs(d, map_kind, seed=1, trajectory=False):
    """ViPO inputs for ``map_kind`` "position" (``[B, (T,) H, W]``, broadcast over channels) or
    "element" (the latent's shape): float32 ``amap`` in [0, 2) and ``old_map``, the current
    policy's log-prob of that shape plus noise of the clip range's size, so the per-position
    ratios straddle the clip range as in training. ``trajectory``: both as [:, j] slices."""
    v = d["v"]
    reduction = "channel_sum" if map_kind == "position" else "none"
    shape = (v.shape[0],) + tuple(v.shape[2:]) if map_kind == "position" else tuple(v.shape)
    if v.device.type == "meta":
        d["amap"] = torch.empty(shape, device=v.device)
        d["old_map"] = torch.empty(shape, device=v.device)
        if trajectory:
            d["amap"], d["old_map"] = map(_as_trajectory_slice, (d["amap"], d["old_map"]))
        return d
    g = torch.Generator(device="cpu").manual_seed(seed)
    d["amap"] = (2 * torch.rand(shape, generator=g)).to(v.device)
    with torch.no_grad():
        logp = tbkernels.sde_step_with_logprob(v, d["sigma_host"], d["sigma_next_host"], d["x"],
                                               d["prev"], logprob_reduction=reduction)[1]
    d["old_map"] = (logp + 2 * CLIP * torch.randn(shape, generator=g).to(v.device)).contiguous()
    if trajectory:
        d["amap"], d["old_map"] = map(_as_trajectory_slice, (d["amap"], d["old_map"]))
    return d


def eager_loss(vv, d):
    """Flow-GRPO's training-step math, written as its code writes it (fp32 casts included)."""
    return _eager(vv, d, None)


def _eager(vv, d, map_kind):
    """Flow-GRPO's eager code; with a ViPO map (``map_kind`` "position" or "element") the
    log-prob is left per position (summed over channels, ViPO's dense form) or per element, the
    ratio is per position and the advantage is A_b * M."""
    model_output, sample, prev_sample = vv.float(), d["x"].float(), d["prev"].float()
    sigma = d["sigma"].view(-1, *([1] * (vv.ndim - 1)))
    sigma_prev = d["sigma_next"].view(-1, *([1] * (vv.ndim - 1)))
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_prev, sigma))) * 0.7
    mean = (sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    if map_kind is None:
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    elif map_kind == "position":
        log_prob = log_prob.sum(dim=1)
    with torch.no_grad():
        ref = d["ref"].float()
        mean_ref = (sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
                    + ref * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, vv.ndim)), keepdim=True) / (2 * std_dev_t ** 2)
    advantages = torch.clamp(d["adv"], -5.0, 5.0)
    if map_kind is None:
        ratio = torch.exp(log_prob - d["old"])
    else:
        ratio = torch.exp(log_prob - d["old_map"])
        advantages = advantages.view(-1, *([1] * (log_prob.ndim - 1))) * d["amap"]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
    return torch.mean(torch.maximum(unclipped, clipped)) + BETA * torch.mean(kl)


def tbk_loss(backend, sigmas="host", map_kind=None):
    """tbkernels' loss; ``sigmas="host"`` passes the noise levels as CPU tensors (the intended
    use), ``"device"`` as tensors on the latents' device (checks and table on the device);
    ``map_kind`` as in add_map_inputs."""
    key, key_next = ("sigma_host", "sigma_next_host") if sigmas == "host" else ("sigma",
                                                                              "sigma_next")

    def fn(vv, d):
        loss, _ = tbkernels.flow_grpo_loss(vv, d["x"], d["prev"], d[key], d[key_next],
                                           d["old"], d["adv"], ref_model_output=d["ref"],
                                           beta=BETA, clip_range=CLIP, backend=backend)
        return loss

    def fn_map(vv, d):
        loss, _ = tbkernels.flow_grpo_loss(vv, d["x"], d["prev"], d[key], d[key_next],
                                           d["old_map"], d["adv"], ref_model_output=d["ref"],
                                           beta=BETA, clip_range=CLIP, advantage_map=d["amap"],
                                           backend=backend)
        return loss
    return fn if map_kind is None else fn_map


def variants(device, map_kind=None):
    """name -> loss function (None: built by ``build``). ``tbkernels_<backend>_compiled`` is
    ``torch.compile(fullgraph=True)`` of the tbkernels call on the fastest backend here: the bandwidth
    kernels stay the custom ops, Inductor fuses the per-sample [B] math around them (on a GPU
    the eager [B] math is some 70 tiny launches per forward+backward). With a map the same
    names, on the map inputs (add_map_inputs)."""
    out = {"eager": eager_loss if map_kind is None else (lambda vv, d: _eager(vv, d, map_kind)),
           "torch_compile": None}
    status = tbkernels.backends(device)
    available = [name for name in fg.IMPLEMENTED
                 if status[name].available and not (name == "triton" and device.type == "cpu")]
    for name in available:
        out[f"tbkernels_{name}"] = tbk_loss(name, map_kind=map_kind)
    fast = [name for name in ("cuda", "cpu", "triton") if name in available]
    if fast:
        out[f"tbkernels_{fast[0]}_compiled"] = None
    return out


def build(name, device, map_kind=None):
    if name == "torch_compile":
        return torch.compile(variants(device, map_kind)["eager"])
    if name.startswith("tbkernels_") and name.endswith("_compiled"):
        return torch.compile(tbk_loss(name[len("tbkernels_"):-len("_compiled")],
                                      map_kind=map_kind), fullgraph=True)
    return variants(device, map_kind)[name]


# ------------------------------------------------------------------------------------------------
# Timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, reps):
    """Median seconds of fn() over reps after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class HostNotAhead(RuntimeError):
    pass


def time_host_ahead(fn, reps, rounds=3, cycles=100_000_000, cuda=None):
    """Median over ``rounds`` of the GPU's seconds per ``fn()`` with the host ahead of the GPU.

    Each round queues a long ``torch.cuda._sleep`` and then ``reps`` calls of fn behind it: the
    host has issued every call before the GPU reaches the first one, so the events around the
    calls time device work only, back to back, as in a training step, where the model's own
    kernels keep the GPU busy while the host issues the loss. (A per-call event pair with a sync
    in between times the host's issue time instead whenever that is longer than the kernels,
    and adds one launch latency to a single short kernel such as the bandwidth copy.) A round
    whose sleep ended before the host finished issuing is retried with a 4x longer sleep.
    ``cuda`` is torch.cuda (tests pass a stand-in)."""
    cuda = cuda or torch.cuda
    fn()
    fn()
    cuda.synchronize()
    seconds = []
    for _ in range(rounds):
        for _attempt in range(4):
            cuda._sleep(cycles)
            slept = cuda.Event()
            slept.record()
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            ahead = not slept.query()         # the sleep still running: nothing waited on us
            cuda.synchronize()
            if ahead:
                seconds.append(start.elapsed_time(end) / 1e3 / reps)
                break
            cycles *= 4
        else:
            raise HostNotAhead(f"the host did not get ahead of the GPU even behind a "
                               f"{cycles // 4}-cycle sleep")
    return statistics.median(seconds)


def copy_bandwidth(shape, dtype, device, reps):
    src = torch.randn(shape, device=device).to(dtype)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    seconds = (time_host_ahead(copy, reps) if device.type == "cuda"
               else time_call(copy, device, reps))
    return 2 * src.numel() * src.element_size() / seconds


def time_backward(loss_fn, vv, d, device, reps):
    """Median seconds of backward alone: each repetition builds a fresh graph untimed."""
    times = []
    for i in range(reps + 2):
        vv.grad = None
        loss = loss_fn(vv, d)
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss.backward()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            loss.backward()
            seconds = time.perf_counter() - t0
        if i >= 2:                                 # two warm-ups, as time_call
            times.append(seconds)
    return statistics.median(times)


def time_phases(loss_fn, d, device, reps):
    """Forward (no grad) and backward alone, for one variant."""
    vv = d["v"].clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return loss_fn(vv, d)

    return {"forward": time_call(fwd, device, reps),
            "backward": time_backward(loss_fn, vv, d, device, reps)}


def time_forward_backward_interleaved(fns, d, device, reps):
    """Median seconds of forward+backward per variant, the variants timed in rotating order
    within each round: the headline ratios are then taken side by side, so a slow stretch of the
    machine (or of the kernel's page-fault path, which on a CPU makes the full-size temporaries
    of eager and compiled code cost 1x-3x from one minute to the next) hits every variant alike."""
    names = list(fns)
    vv = d["v"].clone().requires_grad_(True)

    def step(name):
        vv.grad = None
        fns[name](vv, d).backward()

    for name in names:                              # two warm-ups each
        step(name)
        step(name)
    sync(device)
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step(name)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------
# Peak extra memory, one process per variant

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(name, shape, dtype, device, map_kind=None, trajectory=False,
                     latent_dtype=None):
    d = make_inputs(shape, dtype, device, trajectory=trajectory, latent_dtype=latent_dtype)
    if map_kind is not None:
        add_map_inputs(d, map_kind, trajectory=trajectory)
    fn = build(name, device, map_kind)
    vv = d["v"].clone().requires_grad_(True)
    fn(vv, d).backward()                       # warm-up: compilation, allocator growth
    vv.grad = None
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(vv, d).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                           # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    fn(vv, d).backward()
    return (_rss_kib("VmHWM") - base) * 1024


def peak_tensor_bytes(name, shape, dtype, device, map_kind=None, trajectory=False,
                      latent_dtype=None):
    """Exact bytes of the tensors one forward+backward creates (tbkernels.memory's count). On
    the meta device this is the memory model of a step at any size: eager's temporaries are the
    same ops' outputs there, and tbkernels' compiled op runs its meta kernel, which allocates
    what the CPU, CUDA and Triton kernels allocate (their outputs; Triton adds O(B) partials).
    ``trajectory``: sample and prev_sample as Flow-GRPO passes them, [:, j] slices;
    ``latent_dtype``: theirs, when it differs from model_output's (--mixed)."""
    d = make_inputs(shape, dtype, device, trajectory=trajectory, latent_dtype=latent_dtype)
    if map_kind is not None:
        add_map_inputs(d, map_kind, trajectory=trajectory)
    # meta: the compiled ops' meta kernels. Host sigmas and one step first: the step measured is
    # the steady state of a schedule whose noise levels were seen before (coefficient table
    # cached, on the CPU as on the meta device), so both devices take the same path.
    fn = (variants(torch.device("cpu"), map_kind)["eager"] if name == "eager"
          else tbk_loss(None, map_kind=map_kind))
    vv = d["v"].clone().requires_grad_(True)
    fn(vv, d).backward()
    vv.grad = None
    with tbkernels.memory.peak_tensor_memory() as tm:
        fn(vv, d).backward()
    return tm.peak_bytes


def dtype_label(dtype, latent_dtype=None):
    """The CSV's dtype column: ``bfloat16``, or ``bfloat16/float32`` for model_output/latents."""
    name = str(dtype).replace("torch.", "")
    if latent_dtype is None or latent_dtype == dtype:
        return name
    return f"{name}/{str(latent_dtype).replace('torch.', '')}"


def op_label(map_kind, trajectory):
    return (OP if map_kind is None else f"{OP}_map_{map_kind}") + ("_trajectory" if trajectory
                                                                    else "")


def run_meta(shapes, dtypes, recorder, map_kinds=(None,), trajectory=False, latent_dtype=None):
    meta = torch.device("meta")
    for shape, dtype, kind in itertools.product(shapes, dtypes, map_kinds):
        shape_s, dtype_s = "x".join(map(str, shape)), dtype_label(dtype, latent_dtype)
        op = op_label(kind, trajectory)
        # "latents" count model_output's dtype: the gradient the step must produce is one
        latent = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        peaks = {name: peak_tensor_bytes(name, shape, dtype, meta, kind, trajectory, latent_dtype)
                 for name in ("eager", "tbkernels")}
        sliced = "sample/prev_sample" + ("" if kind is None else "/old_log_prob/map")
        print(f"\n{shape_s} {dtype_s}{'' if kind is None else f', per-{kind} ViPO map'}"
              f"{f', {sliced} as [:, j] trajectory slices' if trajectory else ''} "
              f"(one latent = {latent / 2**20:.0f} MiB):")
        for name, b in peaks.items():
            recorder.add(f"{op}.forward_backward", name, shape_s, dtype_s, "peak_tensor_bytes", b)
            print(f"  {name:<10} peak tensors of forward+backward {b / 2**20:9.1f} MiB "
                  f"({b / latent:.2f} latents)")
        ratio = peaks["tbkernels"] / peaks["eager"]
        recorder.add(f"{op}.forward_backward", "tbkernels", shape_s, dtype_s,
                     "peak_tensor_ratio_vs_eager", ratio)
        print(f"  tbkernels / eager: {ratio:.3f}")


# ------------------------------------------------------------------------------------------------
# Host overhead: what a GPU would wait on when the step's kernels are fast

# aten ops that launch no kernel (views, metadata, allocation)
_NO_LAUNCH = {"detach", "view", "expand", "select", "slice", "_unsafe_view", "reshape", "alias",
              "t", "as_strided", "empty", "empty_like", "unsqueeze", "squeeze", "permute",
              "unbind"}


def device_ops(fn, d):
    """(forward, backward) counts of aten ops that touch a meta tensor and launch work, in a
    step after a first one: on a GPU each would be a kernel launch (a few microseconds of host
    time each)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func.__name__.split(".")[0] not in _NO_LAUNCH
                    and any(isinstance(t, torch.Tensor) and t.device.type == "meta"
                            for t in tree_flatten((args, kwargs, out))[0])):
                self.n += 1
            return out

    vv = d["v"].clone().requires_grad_(True)
    fn(vv, d).backward()                       # the steady state: a schedule's levels seen before
    vv.grad = None
    with Count() as fwd:
        loss = fn(vv, d)
    with Count() as bwd:
        loss.backward()
    return fwd.n, bwd.n


def _with_map(fn, kind):
    """fn on the inputs plus a ViPO map of this kind, built once per inputs dict (so the map
    variants can share the host-overhead harness's inputs)."""
    def call(vv, d):
        key = ("map", kind)
        if key not in d:
            d[key] = add_map_inputs(dict(d), kind)
        return fn(vv, d[key])
    return call


def host_overhead(recorder, reps=300):
    """Per forward+backward: device ops at the GPU shape (meta stand-in) and host time at a tiny
    CPU shape (Python and dispatcher cost, no CUDA launch cost), per variant, side by side."""
    gpu_shape, tiny = (8, 16, 21, 60, 104), (8, 16, 1, 2, 2)
    fns = {"eager": eager_loss, "tbkernels_cpu": tbk_loss("cpu"),
           "tbkernels_cpu_device_sigmas": tbk_loss("cpu", sigmas="device")}
    for kind in MAP_KINDS:
        fns[f"eager_map_{kind}"] = _with_map(lambda vv, d, k=kind: _eager(vv, d, k), kind)
        fns[f"tbkernels_cpu_map_{kind}"] = _with_map(tbk_loss("cpu", map_kind=kind), kind)
    meta = make_inputs(gpu_shape, torch.bfloat16, torch.device("meta"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    small = make_inputs(tiny, torch.float32, torch.device("cpu"))
    fns_timed = dict(fns, tbkernels_cpu_compiled=build("tbkernels_cpu_compiled",
                                                         torch.device("cpu")))
    times = time_forward_backward_interleaved(fns_timed, small, torch.device("cpu"), reps)
    table = coefficient_table_us(meta["v"], reps)
    torch.set_num_threads(threads)
    shape_s = "x".join(map(str, gpu_shape))
    print(f"\nhost overhead per forward+backward (device ops counted on meta at {shape_s} bf16; "
          f"host time at {'x'.join(map(str, tiny))} fp32 on the CPU, 1 thread):")
    for name in fns_timed:
        line = f"  {name:<30}"
        if name in fns:
            f_ops, b_ops = device_ops(fns[name], meta)
            recorder.add(f"{OP}.host", name, shape_s, "bfloat16", "device_ops_forward", f_ops)
            recorder.add(f"{OP}.host", name, shape_s, "bfloat16", "device_ops_backward", b_ops)
            line += f" device ops {f_ops:3d} + {b_ops:3d}"
        else:
            line += " " * 27
        recorder.add(f"{OP}.host", name, "x".join(map(str, tiny)), "float32", "host_us",
                     times[name] * 1e6)
        print(line + f"   host {times[name] * 1e6:7.0f} us", flush=True)
    print("  the coefficient stage alone, host sigmas, latents off the CPU (meta; the CPU rows "
          "above compute the table on the CPU instead):")
    for kind, us in table.items():
        recorder.add(f"{OP}.host", f"coefficient_table_{kind}", shape_s, "bfloat16", "host_us", us)
        print(f"    {kind:<15} {us:7.1f} us", flush=True)


def coefficient_table_us(latent, reps):
    """Host time of flow_grpo_loss's coefficient stage for latents off the CPU (meta here) with
    host sigmas: computed and checked (a schedule's first visit of a noise level) and cached
    (every later visit), with sigmas as [B] CPU tensors or as Python floats."""
    sigma, sigma_next = torch.full((latent.shape[0],), 0.8), torch.full((latent.shape[0],), 0.7)

    def stage():
        return fg._coefficients(latent, sigma, sigma_next, "flow_grpo", 0.7, None, None)

    def uncached():
        fg._COEF_CACHE.clear()
        return stage()

    def stage_floats():
        return fg._coefficients(latent, 0.8, 0.7, "flow_grpo", 0.7, None, None)

    stage()
    cpu = torch.device("cpu")
    return {"computed": time_call(uncached, cpu, reps) * 1e6,
            "cached": time_call(stage, cpu, reps) * 1e6,
            "cached_floats": time_call(stage_floats, cpu, reps) * 1e6}


def measure_memory_in_child(name, shape, dtype, device, map_kind=None, trajectory=False,
                            latent_dtype=None):
    cmd = [sys.executable, __file__, "--child-memory", name, "--shape", ",".join(map(str, shape)),
           "--dtype", str(dtype).replace("torch.", ""), "--device", device.type]
    if map_kind is not None:
        cmd += ["--map", map_kind]
    if trajectory:
        cmd += ["--trajectory"]
    if latent_dtype is not None:
        cmd += ["--latent-dtype", str(latent_dtype).replace("torch.", "")]
    # A fixed mmap threshold makes glibc return every large block to the OS when it is freed
    # (its default threshold grows after the first free, and freed blocks then stay resident),
    # so the resident set tracks live tensors and its peak is the step's peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1200, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ------------------------------------------------------------------------------------------------

def fused_bytes_moved(shape, elt, map_kind=None, latent_elt=None):
    """Bytes tbkernels' fused path must move per phase; eager moves far more, and the same count
    is its useful work. model_output, the reference and grad_v of `elt` bytes, sample and
    prev_sample of `latent_elt` (default `elt`), float32 log-probs and maps, beta != 0 (the
    reference is read for the gradient too). "A latent" below is one of each of these.
    No map: forward reads v, x, prev, ref; backward reads them again and writes grad_v.
    Per position (P = numel / C): the step also writes the [B, P] log-prob, the map surrogate
    reads it with old_log_prob and the map and overwrites it; the backward reads it once more
    beside the four latents, writes grad_v, and scales grad_v in place (read + write).
    Per element: one pass reads the four latents, old_log_prob and the map and writes grad_v;
    the backward scales grad_v in place."""
    numel = math.prod(shape)
    model = numel * elt                                  # v, the reference, grad_v
    pair = 2 * numel * (elt if latent_elt is None else latent_elt)   # sample and prev_sample
    inputs = 2 * model + pair                            # the four latents read
    if map_kind is None:
        fwd, bwd = inputs, inputs + model
    elif map_kind == "position":
        positions = numel // shape[1]
        fwd, bwd = inputs + 20 * positions, inputs + 3 * model + 4 * positions
    else:
        fwd, bwd = inputs + model + 8 * numel, 2 * model
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}


def run(shapes, dtypes, device, reps, recorder, memory=True, map_kind=None, trajectory=False,
        latent_dtype=None):
    op_name = op_label(map_kind, trajectory)
    for shape in shapes:
        for dtype in dtypes:
            shape_s = "x".join(map(str, shape))
            dtype_s = dtype_label(dtype, latent_dtype)
            elt = torch.empty((), dtype=dtype).element_size()
            latent_elt = (None if latent_dtype is None
                          else torch.empty((), dtype=latent_dtype).element_size())
            bytes_moved = fused_bytes_moved(shape, elt, map_kind, latent_elt)
            bw = copy_bandwidth(shape, dtype, device, reps)
            recorder.add("device_copy", "torch", shape_s, dtype_s, "copy_gb_per_s", bw / 1e9)
            print(f"\n{shape_s} {dtype_s}: device copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
            d = make_inputs(shape, dtype, device, trajectory=trajectory,
                            latent_dtype=latent_dtype)
            if latent_dtype is not None:
                print(f"  sample/prev_sample in {str(latent_dtype).replace('torch.', '')}",
                      flush=True)
            if trajectory:
                print(f"  sample/prev_sample{'' if map_kind is None else ', old_log_prob, map'}"
                      " as [:, j] trajectory slices", flush=True)
            if map_kind is not None:
                add_map_inputs(d, map_kind, trajectory=trajectory)
                print(f"  with a per-{map_kind} ViPO advantage map", flush=True)
            fns = {name: build(name, device, map_kind) for name in variants(device, map_kind)}
            print(f"  forward+backward, {reps} rounds interleaved over {len(fns)} variants ...",
                  flush=True)
            fwd_bwd = time_forward_backward_interleaved(fns, d, device, reps)
            medians = {}
            for name, fn in fns.items():
                print(f"  {name:<24}", end="", flush=True)
                phases = time_phases(fn, d, device, reps)
                phases["forward_backward"] = fwd_bwd[name]
                medians[name] = phases
                for phase, seconds in phases.items():
                    op = f"{op_name}.{phase}"
                    recorder.add(op, name, shape_s, dtype_s, "median_us", seconds * 1e6)
                    achieved = bytes_moved[phase] / seconds
                    recorder.add(op, name, shape_s, dtype_s, "bytes_moved", bytes_moved[phase])
                    recorder.add(op, name, shape_s, dtype_s, "achieved_gb_per_s", achieved / 1e9)
                    recorder.add(op, name, shape_s, dtype_s, "fraction_of_copy_bw", achieved / bw)
                line = "  ".join(f"{p} {s * 1e3:8.2f} ms" for p, s in phases.items())
                if memory:
                    extra = measure_memory_in_child(name, shape, dtype, device, map_kind,
                                                    trajectory, latent_dtype)
                    recorder.add(f"{op_name}.forward_backward", name, shape_s, dtype_s,
                                 "peak_extra_bytes", extra)
                    line += f"  peak extra {extra / 2**20:8.1f} MiB"
                print(line, flush=True)
            for name, phases in medians.items():
                if not name.startswith("tbkernels"):
                    continue
                for base in ("eager", "torch_compile"):
                    if base in medians:
                        ratio = medians[base]["forward_backward"] / phases["forward_backward"]
                        recorder.add(f"{op_name}.forward_backward", name, shape_s, dtype_s,
                                     f"speedup_vs_{base}", ratio)
                        print(f"  {name} forward+backward speedup vs {base}: {ratio:.2f}x")
            if device.type == "cuda":
                device_only(fns, d, reps, bw, bytes_moved["forward_backward"], shape_s, dtype_s,
                            recorder, op_name=op_name)


def device_only(fns, d, reps, bw, nbytes, shape_s, dtype_s, recorder, cuda=None, op_name=OP):
    """forward+backward timed with the host ahead of the GPU (time_host_ahead): the kernels'
    own time, which is what a training step pays when the model keeps the GPU busy. Rows under
    op flow_grpo_loss.forward_backward_device, every variant by the same method."""
    vv = d["v"].clone().requires_grad_(True)
    print(f"  forward+backward, device time with the host ahead ({reps} steps per round):")
    times = {}
    for name, fn in fns.items():
        def step(fn=fn):
            vv.grad = None
            fn(vv, d).backward()
        try:
            times[name] = time_host_ahead(step, reps, cuda=cuda)
        except HostNotAhead as e:
            print(f"  {name:<24} {e}")
            continue
        op = f"{op_name}.forward_backward_device"
        recorder.add(op, name, shape_s, dtype_s, "median_us", times[name] * 1e6)
        achieved = nbytes / times[name]
        recorder.add(op, name, shape_s, dtype_s, "achieved_gb_per_s", achieved / 1e9)
        recorder.add(op, name, shape_s, dtype_s, "fraction_of_copy_bw", achieved / bw)
        line = (f"  {name:<24} {times[name] * 1e3:8.3f} ms  {achieved / 1e9:7.1f} GB/s "
                f"({achieved / bw:.1%} of copy)")
        print(line, flush=True)
    for name in times:
        if name.startswith("tbkernels"):
            for base in ("eager", "torch_compile"):
                if base in times:
                    ratio = times[base] / times[name]
                    recorder.add(f"{op_name}.forward_backward_device", name, shape_s,
                                 dtype_s, f"speedup_vs_{base}", ratio)
                    print(f"  {name} device-time speedup vs {base}: {ratio:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shape, 3 repetitions, no memory")
    p.add_argument("--gpu", action="store_true", help="GPU shapes (bf16 480p and 720p, B=8)")
    p.add_argument("--meta", action="store_true",
                   help="the --gpu shapes' forward+backward tensor memory, eager vs tbkernels, "
                        "counted on the meta device (no GPU, no timing)")
    p.add_argument("--host", action="store_true",
                   help="host overhead only: device ops per step (meta stand-in for a GPU) and "
                        "host time per step at a tiny CPU shape, eager vs tbkernels")
    p.add_argument("--map", choices=MAP_KINDS + ("both",), default=None,
                   help="time flow_grpo_loss with a ViPO advantage map of this kind instead")
    p.add_argument("--trajectory", action="store_true",
                   help="sample and prev_sample (and with --map the old log-prob "
                        "and the map) as Flow-GRPO passes them, [:, j] slices of "
                        f"[B, {TRAJECTORY_STEPS}, ...] trajectories (batch-strided)")
    p.add_argument("--mixed", action="store_true",
                   help="model_output and the reference in bfloat16, sample and prev_sample in "
                        "float32, as Flow-GRPO keeps its trajectory beside a bf16 transformer")
    p.add_argument("--latent-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-record", action="store_true", help="print only, write no CSV rows")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child_memory:
        shape = tuple(int(s) for s in args.shape.split(","))
        extra = peak_extra_bytes(args.child_memory, shape, getattr(torch, args.dtype),
                                 torch.device(args.device), args.map, args.trajectory,
                                 args.latent_dtype and getattr(torch, args.latent_dtype))
        print(json.dumps({"peak_extra_bytes": extra}))
        return

    if args.host or args.meta:
        # modes without a timed device: host overhead (CPU + meta counts), memory model (meta)
        device = torch.device("cpu" if args.host else "meta")
        recorder = Recorder(enabled=not args.no_record, device=device_name(device),
                            commit=git_commit(),
                            command=("python benchmarks/bench_flow_grpo.py "
                                     + " ".join(sys.argv[1:])).strip())
        if args.host:
            print(f"{OP} host overhead on {recorder.device}, commit {recorder.commit}")
            host_overhead(recorder, reps=args.reps or 300)
        else:
            print(f"{OP} tensor memory on {recorder.device}, commit {recorder.commit}")
            kinds = ((None,) if args.map is None else MAP_KINDS if args.map == "both"
                     else (args.map,))
            run_meta([(8, 16, 21, 60, 104), (8, 16, 21, 90, 160)], [torch.bfloat16], recorder,
                     kinds, args.trajectory, torch.float32 if args.mixed else None)
        path = recorder.finish()
        if path:
            print(f"\nrows appended to {path}")
        return
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device visible")
    if args.quick:
        shapes, dtypes, reps = [(2, 16, 3, 24, 40)], [torch.float32], args.reps or 3
    elif args.gpu:
        shapes = [(8, 16, 21, 60, 104), (8, 16, 21, 90, 160)]
        dtypes, reps = [torch.bfloat16], args.reps or 20
    else:
        shapes, dtypes, reps = [(4, 16, 21, 60, 104)], [torch.float32], args.reps or 15
    latent_dtype = None
    if args.mixed:
        dtypes, latent_dtype = [torch.bfloat16], torch.float32
    command = "python benchmarks/bench_flow_grpo.py " + " ".join(sys.argv[1:])
    recorder = Recorder(enabled=not args.no_record, device=device_name(device),
                        commit=git_commit(), command=command.strip())
    print(f"{OP} on {recorder.device}, commit {recorder.commit}")
    kinds = [None] if args.map is None else MAP_KINDS if args.map == "both" else [args.map]
    for kind in kinds:
        run(shapes, dtypes, device, reps, recorder, memory=not args.quick, map_kind=kind,
            trajectory=args.trajectory, latent_dtype=latent_dtype)
    path = recorder.finish()
    if path:
        print(f"\nrows appended to {path}")


if __name__ == "__main__":
    main()
