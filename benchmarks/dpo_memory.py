"""Peak memory and step time of DPO steps on a video DiT, per memory mode of dpo_backward.

Flow-DPO steps on a video diffusion transformer in each memory mode of ``tbkernels.dpo_backward``
(standard / decoupled / recompute), with and without activation checkpointing, full fine-tuning
and LoRA (issue 4).

    python benchmarks/dpo_memory.py --small            # CPU (~140 s): peak RSS, a process per mode
    python benchmarks/dpo_memory.py --small --sweep    # + peak memory vs layers and frames, plot
    python benchmarks/dpo_memory.py --small --sweep --no-grid  # the sweep and plot alone
    python benchmarks/dpo_memory.py --wide             # CPU (~20 min): Wan2.1-1.3B width, 1-2 layers
    python benchmarks/dpo_memory.py --gpu              # Wan2.1-1.3B-like, 480p x 2 s and 720p
    python benchmarks/dpo_memory.py --gpu --sweep      # + the layers / frames sweep on the GPU
    python benchmarks/dpo_memory.py --plot             # only the plot, from the CSV

The model is diffusers' ``WanTransformer3DModel`` with random weights built from a config (no
download) when diffusers is importable, else ``TinyDiT`` below (the same block structure:
3D patch embedding, adaLN-modulated self-attention, cross-attention to text, GELU FFN). The
"wan1.3b" configuration is Wan2.1-T2V-1.3B's: dim 1536 (12 heads x 128), 30 layers, FFN 8960,
patch 1x2x2, 16 latent channels, text dim 4096 (512 tokens); 480p x 2 s is a latent
[1, 16, 9, 60, 104] (33 frames at 16 fps, VAE 4x temporal / 8x spatial), 720p [1, 16, 9, 90, 160].
GPU runs use float32 master weights under bfloat16 autocast.

One step: ``zero_grad(set_to_none=True)`` and ``dpo_backward`` with Flow-DPO (beta 100) on a
chosen and a rejected latent sharing noise and t, reference errors given as constants (the
reference forward is outside the step and the same for every mode). No optimizer step: its state
is the same in every mode. Each configuration is also measured as the second micro-batch of a
gradient-accumulation step (shape suffix ``|accum``; ``.grad`` already holds the first
micro-batch's gradients): there standard DPO's single backward keeps one branch's whole parameter
gradient in autograd's buffers until the other branch reaches each parameter, while the decoupled
and recompute backwards add each branch into ``.grad`` in place (``--no-accum`` skips these runs).

Memory: a fresh process per (mode, configuration) (three at a time on a CPU, sharing the cores;
one after the other on a GPU): build, a warm-up step, then several measured steps through
``tbkernels.memory.peak_memory`` — ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident
set on a CPU (VmHWM reset through /proc/self/clear_refs, glibc's mmap threshold fixed at 32 KiB so
that freed tensors leave the resident set). Each measured peak is an upper bound of the step's true
high-water mark (the heap keeps a few freed small blocks resident), so the smallest is reported.
``peak_extra_bytes`` is the peak minus the memory in use before the step (weights, inputs):
activations, gradients, temporaries. On a CPU one more step runs under
``tbkernels.memory.peak_tensor_memory`` (``peak_tensor_bytes``: the exact peak of the bytes of
the tensors the step creates, with no allocator in it) to tell real differences from RSS noise.

Time: one process runs every configuration, the three modes in rotating order for several rounds
(paired, so machine-load drift cancels), with the default allocator; medians and the median of
the per-round ratios to standard.

Rows go to benchmarks/results/results.csv (or $TBK_RESULTS_CSV) with op ``dpo_memory``, backend =
mode, shape = ``config|full or lora|ckpt or no_ckpt|L<layers>|<latent shape>``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# results.py beside this file. Run as a script, this folder is already sys.path[0]; loaded by
# path (the tests do) it is put there only for this import: left there, it would shadow
# modules such as the tests' conftest in every process spawned afterwards.
_HERE = str(Path(__file__).resolve().parent)
_ADDED = _HERE not in sys.path
if _ADDED:
    sys.path.insert(0, _HERE)
try:
    from results import (CpuMeter, Recorder, csv_path, device_name,  # noqa: E402
                         git_commit, read_rows)
finally:
    if _ADDED:
        sys.path.remove(_HERE)

import tbkernels  # noqa: E402

OP = "dpo_memory"
MODES = ("standard", "decoupled", "recompute")
BETA = 100.0

CONFIGS = {
    # Wan2.1-T2V-1.3B
    "wan1.3b": dict(dim=1536, heads=12, ffn=8960, layers=30, text_dim=4096, text_len=512),
    # The CPU suite: the same architecture, scaled down so a step takes a fraction of a second.
    "wan-small": dict(dim=128, heads=4, ffn=512, layers=4, text_dim=64, text_len=16),
    # tests/test_dpo.py's smoke configuration
    "wan-tiny": dict(dim=32, heads=2, ffn=64, layers=2, text_dim=16, text_len=4),
}
LATENTS = {
    "480p_2s": (1, 16, 9, 60, 104),
    "480p_1f": (1, 16, 1, 60, 104),     # one latent frame of 480p (1560 tokens): --wide on a CPU
    "720p_2s": (1, 16, 9, 90, 160),
    "small": (1, 16, 5, 16, 24),
    "tiny": (1, 16, 2, 4, 6),
}


# ------------------------------------------------------------------------------------------------
# Models

def _sinusoidal(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cq = nn.Linear(dim, dim)
        self.ckv = nn.Linear(dim, 2 * dim)
        self.cproj = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def _attn(self, q, k, v):
        b, n, d = q.shape
        h = self.heads
        q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)

    def forward(self, x, text, temb6):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + temb6).unbind(1)
        h = self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + gate1[:, None] * self.proj(self._attn(q, k, v))
        k, v = self.ckv(text).chunk(2, dim=-1)
        x = x + self.cproj(self._attn(self.cq(self.norm2(x)), k, v))
        h = self.norm3(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + gate2[:, None] * self.ffn(h)


class TinyDiT(nn.Module):
    """A Wan-style video DiT (used when diffusers is not installed): patch embedding, blocks of
    adaLN-modulated self-attention + cross-attention to text + GELU FFN, unpatchify. Called like
    WanTransformer3DModel: ``model(hidden_states, timestep, encoder_hidden_states,
    return_dict=False)[0]``."""

    def __init__(self, dim, heads, ffn, layers, text_dim, in_channels=16, patch=(1, 2, 2),
                 freq_dim=256):
        super().__init__()
        self.patch, self.freq_dim, self.out_channels = patch, freq_dim, in_channels
        self.gradient_checkpointing = False
        self.patch_embedding = nn.Conv3d(in_channels, dim, patch, patch)
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, ffn) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, in_channels * math.prod(patch))

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None):
        self.gradient_checkpointing = True
        self._checkpoint = gradient_checkpointing_func or (
            lambda module, *args: torch.utils.checkpoint.checkpoint(module, *args,
                                                                    use_reentrant=False))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        b, c, f, hh, ww = hidden_states.shape
        pt, ph, pw = self.patch
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        temb = self.time_embedding(_sinusoidal(timestep, self.freq_dim).to(x.dtype))
        temb6 = self.time_projection(temb).unflatten(1, (6, -1))
        text = self.text_embedding(encoder_hidden_states)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._checkpoint(block, x, text, temb6)
            else:
                x = block(x, text, temb6)
        x = self.proj_out(self.norm_out(x))
        x = x.reshape(b, f // pt, hh // ph, ww // pw, c, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, f, hh, ww)
        return (x,)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with the base frozen (peft's default init: B = 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = (alpha or rank) / rank

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(model: nn.Module, rank: int) -> int:
    """Freeze the model and wrap every nn.Linear inside its transformer blocks (attention and FFN
    projections, as LoRA fine-tuning of Wan does). Returns the number of trainable parameters."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, LoRALinear(child, rank))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(config: str, layers: int | None, use_diffusers: bool):
    c = dict(CONFIGS[config])
    if layers is not None:
        c["layers"] = layers
    if use_diffusers:
        from diffusers import WanTransformer3DModel
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=c["heads"],
            attention_head_dim=c["dim"] // c["heads"], in_channels=16, out_channels=16,
            text_dim=c["text_dim"], freq_dim=256, ffn_dim=c["ffn"], num_layers=c["layers"],
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
        return model, "diffusers.WanTransformer3DModel", c
    return TinyDiT(c["dim"], c["heads"], c["ffn"], c["layers"], c["text_dim"]), "TinyDiT", c


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------
# One DPO step

def make_batch(latent, cfg, device, seed=0):
    """Chosen / rejected clean latents sharing noise and t (Flow-DPO), text states, and constant
    reference errors."""
    g = torch.Generator().manual_seed(seed)
    x0_w, x0_l, noise = (torch.randn(latent, generator=g) for _ in range(3))
    b = latent[0]
    t = torch.sigmoid(torch.randn(b, generator=g))            # logit-normal(0, 1), as Flow-GRPO
    text = torch.randn(b, cfg["text_len"], cfg["text_dim"], generator=g)
    tt = t.view(-1, 1, 1, 1, 1)
    batch = dict(xt_w=(1 - tt) * x0_w + tt * noise, xt_l=(1 - tt) * x0_l + tt * noise,
                 target_w=noise - x0_w, target_l=noise - x0_l, t=t, text=text,
                 ref_w=torch.full((b,), 2.0), ref_l=torch.full((b,), 2.0))
    return {k: v.to(device) for k, v in batch.items()}


def dpo_step(model, batch, mode, autocast_dtype=None, zero_grad=True):
    # meta tensors have no values: no finiteness check (it reads the loss on the host)
    check_finite = batch["t"].device.type != "meta"

    def branch(xt, target):
        def fn():
            ctx = (torch.autocast(xt.device.type, dtype=autocast_dtype) if autocast_dtype
                   else contextlib.nullcontext())
            with ctx:
                pred = model(hidden_states=xt, timestep=batch["t"] * 1000,
                             encoder_hidden_states=batch["text"], return_dict=False)[0]
            return tbkernels.per_sample_mse(pred, target)
        return fn

    if zero_grad:
        model.zero_grad(set_to_none=True)
    loss, _ = tbkernels.dpo_backward(branch(batch["xt_w"], batch["target_w"]),
                                     branch(batch["xt_l"], batch["target_l"]), beta=BETA,
                                     loss="flow_dpo", ref_chosen=batch["ref_w"],
                                     ref_rejected=batch["ref_l"], mode=mode, model=model,
                                     check_finite=check_finite)
    return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(spec):
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with device:                           # parameters created (and initialised) on the device
        model, kind, cfg = build_model(spec["config"], spec.get("layers"), spec["diffusers"])
    model = model.to(device)
    if spec["ft"] == "lora":
        add_lora(model, spec.get("lora_rank", 32))
        model = model.to(device)
    if spec["ckpt"] and device.type == "meta":
        # the recomputation runs inside the backward, outside the step's GpuSemanticsOnMeta
        # region: give it its own (real autocast is restored there by checkpoint itself)
        model.enable_gradient_checkpointing(
            lambda module, *args: torch.utils.checkpoint.checkpoint(
                module.__call__, *args, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _meta_semantics(spec))))
    elif spec["ckpt"]:
        model.enable_gradient_checkpointing()
    latent = tuple(spec["latent"])
    batch = make_batch(latent, cfg, device)
    amp = torch.bfloat16 if device.type == "cuda" else None     # meta: GpuSemanticsOnMeta
    return device, model, kind, cfg, batch, amp


def _model_summary(model, kind):
    return dict(model=kind, params=sum(p.numel() for p in model.parameters()),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))


def child_memory(specs):
    """Peak memory of one step for each configuration, in this process (one per mode).

    Per configuration: build, one warm-up step, then ``measure`` measured steps; the reported
    peak is the smallest of them. With ``spec["accum"]`` the measured step is the second
    micro-batch of a gradient-accumulation step: one unmeasured micro-batch first fills ``.grad``
    (in ``start_bytes``), and the measured one adds to it. Every measured peak is an upper bound of the step's true
    high-water mark (live tensors plus allocator overhead: on a CPU the heap keeps a few freed
    small blocks resident, on a GPU the caching allocator is exact and they agree), so the
    minimum is the tightest one; ``peak_extra_all`` keeps them all.
    """
    results = []
    for spec in specs:
        device, model, kind, cfg, batch, amp = setup(spec)
        out = _model_summary(model, kind)
        runs = []
        try:
            dpo_step(model, batch, spec["mode"], amp)          # warm-up: allocator, lazy init
            accum = bool(spec.get("accum"))

            def prepare():
                model.zero_grad(set_to_none=True)
                if accum:                                      # the first micro-batch
                    dpo_step(model, batch, spec["mode"], amp, zero_grad=False)
                gc.collect()
                _sync(device)

            for _ in range(spec.get("measure", 4 if device.type == "cpu" else 2)):
                prepare()
                with tbkernels.memory.peak_memory(device) as mem:
                    dpo_step(model, batch, spec["mode"], amp, zero_grad=False)
                runs.append(mem)
            if device.type == "cpu":
                # the allocator-free count: exact bytes of the tensors the step creates
                prepare()
                with tbkernels.memory.peak_tensor_memory() as tm:
                    dpo_step(model, batch, spec["mode"], amp, zero_grad=False)
                out["peak_tensor_bytes"] = tm.peak_bytes
        except torch.OutOfMemoryError as e:
            out["oom"] = str(e).splitlines()[0]
        if runs:
            best = min(runs, key=lambda m: m.peak_extra)
            out.update(peak_bytes=best.peak, peak_extra_bytes=best.peak_extra,
                       start_bytes=best.start, peak_extra_all=[m.peak_extra for m in runs])
            if best.peak_reserved is not None:
                out["peak_reserved_bytes"] = best.peak_reserved
            if best.device_used_peak is not None:
                out["nvml_used_peak_bytes"] = best.device_used_peak
        results.append(out)
        del model, batch, runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def child_timing(specs):
    """Step times of every mode, per configuration, interleaved in rotating order over rounds
    (paired rounds: a slow stretch of the machine hits every mode alike)."""
    results = []
    for spec in specs:
        device, model, kind, cfg, batch, amp = setup(spec)
        modes = list(spec["modes"])
        try:
            for m in modes:                                    # warm-up
                dpo_step(model, batch, m, amp)
        except torch.OutOfMemoryError as e:
            results.append(dict(model=kind, oom=str(e).splitlines()[0]))
            continue
        times = {m: [] for m in modes}
        meter = CpuMeter()
        for r in range(spec["rounds"]):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                _sync(device)
                t0 = time.perf_counter()
                dpo_step(model, batch, m, amp)
                _sync(device)
                times[m].append(time.perf_counter() - t0)
        ratios = {m: statistics.median(a / s for a, s in zip(times[m], times["standard"]))
                  for m in modes}
        medians = {m: statistics.median(v) for m, v in times.items()}
        results.append(dict(model=kind, median_s=medians, ratio_vs_standard=ratios,
                            others_cpu_pct=meter.others_pct()))
        del model, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------
# --meta: the tensor-liveness model at full size

class GpuSemanticsOnMeta(torch.overrides.TorchFunctionMode):
    """What a bf16-autocast CUDA step would allocate, on meta tensors.

    Autocast does not act on meta tensors, so its lower-precision list is emulated: float32
    tensor arguments of linear / convolution / matmul-family ops and of attention are cast to
    bfloat16 (a new tensor per call, as autocast's per-region weight cache gives when each weight
    is used once per forward, which holds for these models); every other op runs in its inputs'
    dtype, as under autocast (Wan's FP32LayerNorm upcasts by itself). Autocast's float32 list is
    not emulated. For Wan that matters only for the q/k ``rms_norm``: through torch 2.11 it has
    no autocast rule and runs its composite path on the bf16 activation, on the GPU as here; from
    torch 2.12 it is on the float32 list and runs a fused CUDA kernel that meta cannot reproduce
    (docs/verification.md). Attention goes to a flash-attention kernel (saved state q, k, v, out and a float32
    logsumexp, as on the GPU) because meta SDPA would take the math path and hold the L x L
    attention matrix."""

    LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.mm, torch.bmm,
             torch.addmm, torch.baddbmm, torch.Tensor.__matmul__, torch.Tensor.matmul}

    def __init__(self, autocast_dtype=torch.bfloat16):
        super().__init__()
        self.autocast_dtype = autocast_dtype             # None: no autocast emulation

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            if (kwargs.get("attn_mask") is not None or kwargs.get("is_causal")
                    or kwargs.get("dropout_p")):
                raise NotImplementedError("--meta models unmasked, dropout-free attention only")
            q, k, v = (self._low(t) for t in (q, k, v))
            out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, scale=kwargs.get("scale"))
            return out
        if func in self.LOWER:
            args = tuple(self._low(a) for a in args)
            kwargs = {k: self._low(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _low(self, t):
        if (self.autocast_dtype is not None and isinstance(t, torch.Tensor)
                and t.dtype == torch.float32):
            return t.to(self.autocast_dtype)
        return t


def _meta_semantics(spec):
    # spec["meta_autocast"] False: float32 throughout (the tests compare that with a CPU count)
    return GpuSemanticsOnMeta(torch.bfloat16 if spec.get("meta_autocast", True) else None)


def child_meta(specs):
    """The tensor-liveness model of one step per configuration, in this process: the model and
    inputs on the meta device, GPU semantics emulated (GpuSemanticsOnMeta), bytes counted by
    ``tbkernels.memory.peak_tensor_memory``. ``start_bytes``: parameters, inputs and (``accum``)
    the first micro-batch's gradients; ``peak_bytes`` = start + the step's peak."""
    results = []
    for spec in specs:
        device, model, kind, cfg, batch, _ = setup(spec)
        out = _model_summary(model, kind)
        with _meta_semantics(spec):
            model.zero_grad(set_to_none=True)
            if spec.get("accum"):                              # the first micro-batch
                dpo_step(model, batch, spec["mode"], zero_grad=False)
            held = [p for p in model.parameters()] + [p.grad for p in model.parameters()
                                                      if p.grad is not None]
            start = sum(t.untyped_storage().nbytes() for t in held)
            start += sum(t.untyped_storage().nbytes() for t in batch.values())
            with tbkernels.memory.peak_tensor_memory() as tm:
                dpo_step(model, batch, spec["mode"], zero_grad=False)
        out.update(peak_tensor_bytes=tm.peak_bytes, peak_extra_bytes=tm.peak_bytes,
                   start_bytes=start, peak_bytes=start + tm.peak_bytes,
                   peak_op=tm.peak_op)
        results.append(out)
    return results


# ------------------------------------------------------------------------------------------------
# Parent: runs the children, records the rows

def run_child(spec, timeout=3600):
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if spec.get("kind") == "memory":
        # glibc's default mmap threshold grows after the first free, and freed blocks then stay
        # resident: fix it (low enough that a small model's activations are mmapped too) so
        # that the resident set tracks live tensors, and trim the heap top eagerly. Timing runs
        # keep the default allocator (this makes every allocation a fresh, page-faulted mmap).
        env["MALLOC_MMAP_THRESHOLD_"] = "32768"
        env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {spec}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shape_key(spec):
    return "|".join([spec["config"], spec["ft"], "ckpt" if spec["ckpt"] else "no_ckpt",
                     f"L{spec['layers']}", "x".join(map(str, spec["latent"]))]
                    + (["accum"] if spec.get("accum") else [])
                    + (["sweep"] if spec.get("sweep") else []))


def suite(args, device):
    if args.small:
        config, latents = "wan-small", ["small"]
        sweep_layers, sweep_frames = [1, 2, 4, 8], [2, 5, 9, 13]
    elif args.tiny:
        config, latents = "wan-tiny", ["tiny"]
        sweep_layers, sweep_frames = [1, 2], [2, 3]
    elif args.wide:
        config, latents = "wan1.3b", ["480p_1f"]
        sweep_layers, sweep_frames = [1, 2], [1, 2]
    else:
        config, latents = "wan1.3b", ["480p_2s", "720p_2s"]
        sweep_layers, sweep_frames = [5, 10, 20, 30], [3, 5, 9, 13]
    if args.latent:
        latents = args.latent
    base = dict(config=config, device=device.type, diffusers=args.diffusers,
                layers=CONFIGS[config]["layers"], lora_rank=args.lora_rank)
    grid = []
    # --wide: Wan2.1-1.3B's width at a CPU-sized depth and length, so no checkpointing runs
    # (with it the modes are equal anyway) and each depth in --layers is a configuration
    depths = (args.layers or [1, 2]) if args.wide else [base["layers"]]
    for lat in ([] if args.no_grid else latents):
        for layers in depths:
            for ft in ("full", "lora"):
                for ckpt in ((False,) if args.wide else (False, True)):
                    cfg = dict(base, layers=layers, latent=LATENTS[lat], ft=ft, ckpt=ckpt)
                    grid.append(cfg)
                    if args.accum:
                        grid.append(dict(cfg, accum=True))
    sweep = []
    if args.sweep:
        lat0 = LATENTS[latents[0]]
        for layers in sweep_layers:
            sweep.append(dict(base, layers=layers, latent=lat0, ft="full", ckpt=False, sweep=True))
        for frames in sweep_frames:
            if frames == lat0[2]:
                continue
            lat = (lat0[0], lat0[1], frames, lat0[3], lat0[4])
            sweep.append(dict(base, latent=lat, ft="full", ckpt=False, sweep=True))
    return grid, sweep


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="the CPU configuration (wan-small)")
    size.add_argument("--tiny", action="store_true", help="a smoke run (seconds)")
    size.add_argument("--wide", action="store_true",
                      help="CPU: Wan2.1-1.3B's width (dim 1536, FFN 8960, text 4096) with few "
                           "layers (--layers, default 1 2) on one 480p latent frame")
    p.add_argument("--gpu", action="store_true", help="run on the CUDA device")
    p.add_argument("--meta", action="store_true",
                   help="--gpu's sizes as a tensor-liveness model on the meta device: no GPU, "
                        "no compute, seconds per configuration (bf16 autocast emulated)")
    p.add_argument("--sweep", action="store_true", help="also peak memory vs layers and frames")
    p.add_argument("--no-grid", action="store_true",
                   help="with --sweep: only the sweep (not the modes x checkpointing x LoRA grid)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per configuration")
    p.add_argument("--jobs", type=int, default=None,
                   help="memory processes run at once (default: 3 on CPU, 1 on GPU)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="with --wide: the depths to run")
    p.add_argument("--no-accum", dest="accum", action="store_false",
                   help="skip the gradient-accumulation micro-step (.grad already filled) memory "
                        "runs")
    p.add_argument("--latent", action="append", choices=sorted(LATENTS), default=None,
                   help="latent size(s) to run (default: 480p_2s and 720p_2s with --gpu)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false",
                   help="use TinyDiT even when diffusers is installed")
    p.add_argument("--no-record", action="store_true", help="print only, write no CSV rows")
    p.add_argument("--plot", action="store_true", help="only (re)draw the plot from the CSV")
    p.add_argument("--out", default=None, help="plot file (default results/dpo_memory_<dev>.png)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_timing(spec["specs"]) if spec.get("kind") == "timing"
                         else child_memory(spec["specs"])))
        return
    device = torch.device("cuda" if args.gpu else "meta" if args.meta else "cpu")
    if args.plot:
        print(plot(csv_path(), device_name(device), args.out))
        return
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device visible")
    if not (args.small or args.tiny or args.wide or args.gpu or args.meta):
        sys.exit("choose --small (CPU), --wide (CPU, Wan width), --tiny (smoke), --gpu "
                 "(Wan2.1-1.3B sizes) or --meta (those sizes as a tensor-liveness model)")
    if args.wide and (args.gpu or args.meta):
        sys.exit("--wide is the CPU stand-in for --gpu's sizes; run --gpu alone on a GPU")
    if args.gpu and args.meta:
        sys.exit("--meta models what --gpu measures; choose one")
    args.diffusers = args.diffusers and diffusers_available()
    rounds = args.rounds or (3 if args.tiny or args.wide else 9 if args.small else 5)
    # CPU: three memory processes at once, the cores shared out (peak memory does not depend on
    # the timing); GPU: one at a time (they share the device).
    jobs = args.jobs or (1 if args.gpu else len(MODES))
    threads = None if args.gpu else max(1, (os.cpu_count() or 1) // jobs)
    command = "python benchmarks/dpo_memory.py " + " ".join(a for a in sys.argv[1:])
    recorder = Recorder(enabled=not (args.no_record or args.tiny), device=device_name(device),
                        commit=git_commit(), command=command.strip())
    grid, sweep = suite(args, device)
    dtype = {"cuda": "bf16-autocast", "meta": "bf16-autocast-emulated"}.get(device.type,
                                                                           "float32")
    print(f"{OP} on {recorder.device}, commit {recorder.commit}, model "
          f"{'diffusers WanTransformer3DModel' if args.diffusers else 'TinyDiT'}")
    t_start = time.perf_counter()

    # memory: a fresh process per (mode, configuration): the heap's state (which freed blocks
    # stay resident) is then the same for every measurement
    configs = grid + sweep
    jobs_spec = [dict(kind="memory", threads=threads, specs=[dict(s, mode=m)])
                 for s in configs for m in MODES]
    if device.type == "meta":                  # nothing is allocated: run them all here
        results = []
        for i, job in enumerate(jobs_spec, 1):
            spec = job["specs"][0]
            results.append(child_meta([spec])[0])
            print(f"  [{i}/{len(jobs_spec)}] {shape_key(spec)} {spec['mode']}: peak "
                  f"{results[-1]['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = [r[0] for r in pool.map(run_child, jobs_spec)]
    mem = {}
    for job, res in zip(jobs_spec, results):
        spec = job["specs"][0]
        m = spec["mode"]
        key = shape_key(spec)
        mem.setdefault(key, {})[m] = res
        if "oom" in res:
            recorder.add(OP, m, key, dtype, "oom", 1)
            continue
        for metric in ("peak_bytes", "peak_extra_bytes", "start_bytes", "peak_reserved_bytes",
                       "nvml_used_peak_bytes", "peak_tensor_bytes", "trainable_params"):
            if res.get(metric) is not None:
                recorder.add(OP, m, key, dtype, metric, res[metric])
    print(f"\n{'configuration':<52} {'mode':<10} {'peak':>9} {'extra':>9} {'extra/std':>9}"
          + (f" {'tensors':>9} {'tens/std':>8}" if device.type != "cuda" else ""))
    for key, by_mode in mem.items():
        std = by_mode.get("standard", {})
        for m in MODES:
            res = by_mode[m]
            if "oom" in res:
                print(f"{key:<52} {m:<10} {'OOM':>9}")
                continue
            ratio = res["peak_extra_bytes"] / std["peak_extra_bytes"] if std.get(
                "peak_extra_bytes") else float("nan")
            line = (f"{key:<52} {m:<10} {res['peak_bytes'] / 2**20:8.0f}M "
                    f"{res['peak_extra_bytes'] / 2**20:8.0f}M {ratio:9.3f}")
            if m != "standard" and std.get("peak_extra_bytes"):
                recorder.add(OP, m, key, dtype, "peak_extra_ratio_vs_standard", ratio)
                recorder.add(OP, m, key, dtype, "peak_ratio_vs_standard",
                             res["peak_bytes"] / std["peak_bytes"])
            if res.get("peak_tensor_bytes") is not None and std.get("peak_tensor_bytes"):
                tratio = res["peak_tensor_bytes"] / std["peak_tensor_bytes"]
                if m != "standard":
                    recorder.add(OP, m, key, dtype, "peak_tensor_ratio_vs_standard", tratio)
                line += f" {res['peak_tensor_bytes'] / 2**20:8.1f}M {tratio:8.3f}"
            print(line)

    # time: one process for every configuration, modes interleaved
    timed = [s for s in grid if not s.get("accum")       # the same step, timed once
             and not any("oom" in r for r in mem[shape_key(s)].values())
             and device.type != "meta"]                  # a model has no time
    if timed:
        print(f"\n{'configuration':<52} {'mode':<10} {'median':>9} {'vs std':>8}")
    timing = [dict(s, modes=list(MODES), rounds=rounds) for s in timed]
    results = run_child(dict(kind="timing", specs=timing)) if timing else []
    for spec, res in zip(timed, results):
        key = shape_key(spec)
        if "oom" in res:
            continue
        for m in MODES:
            recorder.add(OP, m, key, dtype, "step_median_s", res["median_s"][m])
            if m != "standard":
                recorder.add(OP, m, key, dtype, "time_ratio_vs_standard",
                             res["ratio_vs_standard"][m])
            print(f"{key:<52} {m:<10} {res['median_s'][m] * 1e3:8.1f}ms "
                  f"{res['ratio_vs_standard'][m]:8.3f}")
        if res.get("others_cpu_pct") is not None:
            recorder.add(OP, "all", key, dtype, "others_cpu_pct", res["others_cpu_pct"])
            print(f"{'':<52} (other processes used {res['others_cpu_pct']:.0f}% of the CPU)")
    print(f"\nsuite took {time.perf_counter() - t_start:.0f} s")
    path = recorder.finish()
    if path:
        print(f"rows appended to {path}")
        if args.sweep:
            print(plot(path, recorder.device, args.out))


# ------------------------------------------------------------------------------------------------
# Plot: peak extra memory vs layers and vs frames, one line per mode (latest session)

def plot(path, device, out=None):
    rows = [r for r in read_rows(path) if r["op"] == OP and r["device"] == device
            and r["metric"] == "peak_extra_bytes" and r["shape"].endswith("|sweep")]
    if not rows:
        return f"no sweep rows for {device} in {path}"
    latest = max(r["timestamp"] for r in rows)
    rows = [r for r in rows if r["timestamp"] == latest]
    series = {"layers": {}, "frames": {}}
    parts = [r["shape"].split("|") for r in rows]
    layers = [int(p[3][1:]) for p in parts]
    frames = [int(p[4].split("x")[2]) for p in parts]
    # the sweep varies one of the two around the base configuration (the most common values)
    base_l = max(set(layers), key=layers.count)
    base_f = max(set(frames), key=frames.count)
    for r, lay, fr in zip(rows, layers, frames):
        gib = float(r["value"]) / 2**20
        if fr == base_f:
            series["layers"].setdefault(r["backend"], []).append((lay, gib))
        if lay == base_l:
            series["frames"].setdefault(r["backend"], []).append((fr, gib))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: " + json.dumps(series)
    kind = ("meta" if device.startswith("meta") else
            "gpu" if "cpu" not in device.lower() and "thread" not in device else "cpu")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, by_mode) in zip(axes, series.items()):
        for mode in MODES:
            pts = sorted(by_mode.get(mode, []))
            if pts:
                # decoupled lies on standard on one device: dashed, so both stay visible
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=mode,
                        linestyle="--" if mode == "decoupled" else "-")
        ax.set_xlabel("transformer layers" if name == "layers" else "latent frames")
        ax.set_ylabel({"cpu": "peak extra RSS of one DPO step (MiB)",
                       "meta": "modeled peak tensor bytes of one DPO step (MiB)"}.get(
                           kind, "peak extra memory of one DPO step (MiB)"))
        ax.set_title(f"vs {name} ({'frames' if name == 'layers' else 'layers'} fixed at "
                     f"{base_f if name == 'layers' else base_l})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Flow-DPO step peak memory per mode: {device}", fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else Path(path).parent / f"dpo_memory_{kind}.png"
    fig.savefig(out, dpi=110)
    return f"plot written to {out}"


if __name__ == "__main__":
    main()
