"""sde_step_with_logprob and flow_grpo_loss: every backend against the readable float64 reference,
Flow-GRPO's own function re-implemented independently, gradients, ViPO maps, errors, compile."""
import math

import pytest
import torch

import tbkernels
from tbkernels.ops import flow_grpo
from tbkernels.ops._flow_grpo_reference import (flow_grpo_loss_reference, kl_reference,
                                                sde_step_reference)

from conftest import DEVICE, backend_params, value_and_grad

BACKENDS = backend_params(("reference", "cpu", "cuda", "triton"))
SDE_TYPES = ["flow_grpo", "dance_grpo", "wan", "cps", "ode"]
WAN_SCHEDULE = dict(sigma_max=0.985, sigma_min=0.02)
SHAPES = {"video_odd": (3, 5, 3, 7, 9), "image_odd": (2, 3, 11, 13), "b1": (1, 4, 2, 5, 6),
          "wan_small": (2, 16, 3, 12, 20)}


def _available(backend):
    st = tbkernels.backends(DEVICE)[backend]
    if not st.available:
        pytest.skip(st.reason)
    impl = __import__("tbkernels.ops.flow_grpo", fromlist=["IMPLEMENTED"]).IMPLEMENTED
    if backend not in impl:
        pytest.skip(f"flow_grpo has no {backend} implementation yet")


def latents(shape, dtype=torch.float64, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
            for _ in range(n)]


def sigmas(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(batch, generator=g, dtype=torch.float64) * 0.8 + 0.15
    s[0] = 1.0                                                      # the first step
    return s.to(DEVICE), (s - 0.07).to(DEVICE)


def extra(sde_type):
    return WAN_SCHEDULE if sde_type == "wan" else {}


def close(got, exp, tol):
    err = (got.double() - exp.double()).abs().max().item()
    scale = max(1.0, exp.double().abs().max().item())
    assert err <= tol * scale, (err, scale)


# ---------------------------------------------------------------------------------------------
# The step.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_step_matches_reference(backend, sde_type, reduction, shape):
    _available(backend)
    v, x, prev, _ = latents(shape, seed=sum(shape))
    s, sn = sigmas(shape[0])
    got = tbkernels.sde_step_with_logprob(v, s, sn, x, prev, sde_type=sde_type,
                                          logprob_reduction=reduction, backend=backend,
                                          **extra(sde_type))
    exp = sde_step_reference(v, s, sn, x, prev, sde_type=sde_type, logprob_reduction=reduction,
                             **extra(sde_type))
    assert got[0] is prev
    assert got[1].shape == exp[1].shape and got[1].dtype == torch.float64
    close(got[1], exp[1], 1e-12)
    close(got[2], exp[2], 1e-12)
    close(got[3].reshape(-1), exp[3], 1e-12)
    assert got[3].shape == (shape[0],) + (1,) * (len(shape) - 1)


def flow_grpo_sde_step_with_logprob(model_output, timestep_index, sigmas, sample, prev_sample,
                                    noise_level=0.7):
    """Independent re-implementation of Flow-GRPO's `sde_step_with_logprob` ('sde' branch) as the
    public code writes it: scheduler sigmas indexed by step, sigma_max = sigmas[1], fp32 math."""
    model_output, sample, prev_sample = model_output.float(), sample.float(), prev_sample.float()
    sigma = sigmas[timestep_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = sigmas[timestep_index + 1].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2)
                / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [0, 3, 8])
def test_flow_grpo_drop_in(backend, step):
    _available(backend)
    shift, steps = 3.0, 10
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float32)
    sched = (shift * t / (1 + (shift - 1) * t)).to(DEVICE)       # SD3-style shifted schedule
    shape = (4, 16, 3, 12, 20)
    v, x, _, _ = latents(shape, torch.float32, seed=step)
    prev = x + 0.05 * v                                            # a plausible stored x_{t+dt}
    idx = torch.full((shape[0],), step, device=DEVICE)
    exp = flow_grpo_sde_step_with_logprob(v, idx, sched, x, prev)
    got = tbkernels.sde_step_with_logprob(v, sched[idx], sched[idx + 1], x, prev, backend=backend)
    # Float rounding: float32 math in a different order on both sides.
    torch.testing.assert_close(got[1], exp[1], rtol=2e-5, atol=2e-5 * exp[1].abs().max().item())
    torch.testing.assert_close(got[2], exp[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], exp[3], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_sampling_respects_generator(backend, sde_type):
    _available(backend)
    shape = (2, 4, 3, 5, 6)
    v, x, _, _ = latents(shape, torch.float32, seed=3)
    s, sn = sigmas(2)
    g1 = torch.Generator(device=DEVICE).manual_seed(123)
    prev, logp, mean, _ = tbkernels.sde_step_with_logprob(v, s, sn, x, generator=g1,
                                                          sde_type=sde_type, backend=backend,
                                                          **extra(sde_type))
    g2 = torch.Generator(device=DEVICE).manual_seed(123)
    noise = None if sde_type == "ode" else torch.randn(shape, generator=g2, device=DEVICE)
    exp = sde_step_reference(v.double(), s, sn, x.double(), None, sde_type=sde_type,
                             noise=None if noise is None else noise.double(), **extra(sde_type))
    close(prev, exp[0], 1e-6)
    close(mean, exp[2], 1e-6)
    # The log-prob is that of the returned sample.
    again = tbkernels.sde_step_with_logprob(v, s, sn, x, prev, sde_type=sde_type, backend=backend,
                                            **extra(sde_type))
    close(logp, again[1], 1e-6)
    if sde_type == "ode":
        assert torch.equal(prev, mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_with_a_list_of_generators(backend):
    """Flow-GRPO hands the pipeline a list of per-prompt generators, which diffusers'
    randn_tensor accepts: sample i's noise comes from generator i (it raised a TypeError here).
    Checked against the reference with noise drawn that way; a CPU generator beside latents on
    another device draws on the CPU, as randn_tensor does."""
    _available(backend)
    shape = (3, 4, 2, 5, 6)
    v, x, _, _ = latents(shape, torch.float32, seed=45)
    s, sn = sigmas(3)

    def gens(device=DEVICE):
        return [torch.Generator(device=device).manual_seed(100 + i) for i in range(3)]
    prev, _, mean, _ = tbkernels.sde_step_with_logprob(v, s, sn, x, generator=gens(),
                                                       backend=backend)
    noise = torch.cat([torch.randn((1,) + shape[1:], generator=g, device=DEVICE)
                       for g in gens()])
    exp = sde_step_reference(v.double(), s, sn, x.double(), None, noise=noise.double())
    close(prev, exp[0], 1e-6)
    close(mean, exp[2], 1e-6)
    one = tbkernels.sde_step_with_logprob(v, s, sn, x, generator=gens()[:1], backend=backend)[0]
    assert torch.equal(one, tbkernels.sde_step_with_logprob(
        v, s, sn, x, generator=gens()[0], backend=backend)[0])
    if DEVICE != "cpu":
        on_cpu = tbkernels.sde_step_with_logprob(v, s, sn, x, generator=gens("cpu"),
                                                 backend=backend)[0]
        noise = torch.cat([torch.randn((1,) + shape[1:], generator=g) for g in gens("cpu")])
        exp = sde_step_reference(v.double(), s, sn, x.double(), None,
                                 noise=noise.to(DEVICE).double())
        close(on_cpu, exp[0], 1e-6)
    with pytest.raises(ValueError, match=r"one generator per sample \(B = 3\), got 2"):
        tbkernels.sde_step_with_logprob(v, s, sn, x, generator=gens()[:2], backend=backend)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        tbkernels.sde_step_with_logprob(v, s, sn, x, generator=123, backend=backend)
    empty = tbkernels.sde_step_with_logprob(v[:0], 0.8, 0.7, x[:0], generator=[],
                                            backend=backend)[0]
    assert empty.shape == (0,) + shape[1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "channel_sum", "none"])
def test_step_gradients(backend, sde_type, reduction):
    _available(backend)
    shape = (2, 3, 2, 5, 7)
    v, x, prev, w = latents(shape, seed=9)
    s, sn = sigmas(2)
    outs = []
    for b in ("reference_readable", backend):
        vv = v.clone().requires_grad_(True)
        if b == "reference_readable":
            _, logp, mean, _ = sde_step_reference(vv, s, sn, x, prev, sde_type=sde_type,
                                                  logprob_reduction=reduction, **extra(sde_type))
        else:
            _, logp, mean, _ = tbkernels.sde_step_with_logprob(
                vv, s, sn, x, prev, sde_type=sde_type, logprob_reduction=reduction, backend=b,
                **extra(sde_type))
        wl = torch.linspace(-1, 1, logp.numel(), dtype=torch.float64, device=DEVICE).view_as(logp)
        ((logp * wl).sum() + (mean * w).sum()).backward()
        outs.append(vv.grad)
    close(outs[1], outs[0], 1e-10)


def test_reference_gradcheck():
    shape = (2, 2, 2, 3, 3)
    v, x, prev, _ = latents(shape, seed=10)
    s, sn = sigmas(2)
    for sde_type in SDE_TYPES:
        fn = lambda vv: tbkernels.sde_step_with_logprob(  # noqa: E731
            vv, s, sn, x, prev, sde_type=sde_type, backend="reference", **extra(sde_type))[1]
        assert torch.autograd.gradcheck(fn, (v.clone().requires_grad_(True),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_numerics(backend, dtype):
    """Error vs float64 at most 2x that of eager PyTorch in the same dtype (+ an output ulp)."""
    _available(backend)
    shape = (2, 16, 3, 12, 20)
    v64, x64, _, _ = latents(shape, seed=11)
    s, sn = sigmas(2)
    prev64 = x64 + 0.02 * v64
    v, x, prev = (t.to(dtype) for t in (v64, x64, prev64))
    exact = sde_step_reference(v.double(), s, sn, x.double(), prev.double())
    got = tbkernels.sde_step_with_logprob(v, s, sn, x, prev, backend=backend)

    # Eager Flow-GRPO-style code run in `dtype` throughout.
    shp = (-1, 1, 1, 1, 1)
    sd, snd = s.to(dtype).view(shp), sn.to(dtype).view(shp)
    dt = snd - sd
    sig_t = 0.7 * torch.sqrt(sd / (1 - torch.where(sd == 1, snd, sd)))
    mean = x * (1 + sig_t ** 2 / (2 * sd) * dt) + v * (1 + sig_t ** 2 * (1 - sd) / (2 * sd)) * dt
    std = sig_t * torch.sqrt(-dt)
    lp = (-(prev - mean) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi))
    eager = lp.mean(dim=(1, 2, 3, 4))
    for g, e, ex in ((got[1], eager, exact[1]), (got[2], mean, exact[2])):
        err = (g.double() - ex).abs().max().item()
        err_eager = (e.double() - ex).abs().max().item()
        ulp = torch.finfo(g.dtype).eps * ex.abs().max().item()
        assert err <= 2 * err_eager + ulp, (err, err_eager, ulp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    _available(backend)
    base = latents((2, 4, 3, 6, 10), seed=12)
    v, x, prev = (t[..., ::2] for t in base[:3])                  # stride-2 last dim
    assert not v.is_contiguous()
    s, sn = sigmas(2)
    got = tbkernels.sde_step_with_logprob(v, s, sn, x, prev, backend=backend)
    exp = sde_step_reference(v, s, sn, x, prev)
    close(got[1], exp[1], 1e-12)
    close(got[2], exp[2], 1e-12)


# ---------------------------------------------------------------------------------------------
# Batch-strided latents: Flow-GRPO passes sample["latents"][:, j] and sample["next_latents"][:, j],
# slices of a [B, steps, C, (T,) H, W] trajectory. Each sample is contiguous, so the kernels read
# them in place at their batch stride; the results must be those of contiguous copies, bit for
# bit (same arithmetic in the same order), and nothing may be copied.

STRIDED_BACKENDS = backend_params(("cpu", "cuda", "triton"))


def trajectory_slice(shape, dtype, seed, steps, j):
    """``traj[:, j]`` of a random ``[B, steps, ...]`` trajectory: batch stride steps * numel/B."""
    g = torch.Generator().manual_seed(seed)
    traj = torch.randn((shape[0], steps) + tuple(shape[1:]), generator=g, dtype=torch.float64)
    return traj.to(dtype).to(DEVICE)[:, j]


def as_trajectory_slice(t, steps, j):
    """t's values as ``traj[:, j]`` of a ``[B, steps, ...]`` tensor whose other steps are NaN (a
    wrong stride reads them)."""
    traj = torch.full((t.shape[0], steps) + tuple(t.shape[1:]), float("nan"), dtype=t.dtype,
                      device=t.device)
    traj[:, j] = t
    return traj[:, j]


def strided_loss_inputs(shape, dtype, map_kind, seed=50):
    """(v, x, prev, ref, old, adv, amap, s, sn): the latents as trajectory slices of different
    batch strides, prev one noisy step after x, old_log_prob near the current log-prob; with a
    map, old_log_prob and the map as trajectory slices too (stored per step, read at [:, j])."""
    s, sn = sigmas(shape[0], seed=seed)
    x = trajectory_slice(shape, dtype, seed + 1, 4, 1)
    v = trajectory_slice(shape, dtype, seed + 2, 2, 0)
    noise = trajectory_slice(shape, dtype, seed + 3, 3, 2)
    prev_traj = torch.empty((shape[0], 5) + tuple(shape[1:]), dtype=dtype, device=DEVICE)
    prev = prev_traj[:, 3]
    bshape = (-1,) + (1,) * (len(shape) - 1)
    prev.copy_(x.double() + v.double() * (sn - s).view(bshape) + 0.2 * noise.double())
    ref = trajectory_slice(shape, dtype, seed + 4, 3, 1)
    ref.copy_(v.double() + 0.05 * ref.double())
    reduction = {None: "mean", "position": "channel_sum", "element": "none"}[map_kind]
    with torch.no_grad():
        old = tbkernels.sde_step_with_logprob(v.double() + 0.02 * ref.double(), s, sn, x.double(),
                                              prev.double(), logprob_reduction=reduction,
                                              backend="reference")[1].float()
    adv = torch.linspace(-2, 3, shape[0], device=DEVICE)
    amap = None
    if map_kind is not None:
        g = torch.Generator().manual_seed(seed + 5)
        amap = as_trajectory_slice(torch.rand(old.shape, generator=g).to(DEVICE), 3, 1)
        old = as_trajectory_slice(old, 4, 2)
    return v, x, prev, ref, old, adv, amap, s, sn


@pytest.mark.parametrize("backend", STRIDED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("map_kind", [None, "position", "element"])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 3, 5, 7), (1, 4, 6, 10), (2, 16, 2, 8, 12)],
                         ids=["video_odd", "image_b1", "video_vec"])
def test_loss_reads_trajectory_slices_in_place(backend, dtype, map_kind, with_ref, shape):
    """flow_grpo_loss on trajectory slices (the latents; with a map, old_log_prob and the map
    too) equals the loss on contiguous copies bit for bit: loss, metrics and gradient, for each
    map kind, with and without the reference term."""
    _available(backend)
    v, x, prev, ref, old, adv, amap, s, sn = strided_loss_inputs(shape, dtype, map_kind)
    if shape[0] > 1:
        assert not x.is_contiguous() and not prev.is_contiguous() and not v.is_contiguous()
        assert map_kind is None or not (old.is_contiguous() or amap.is_contiguous())
    results = []
    for layout in ("strided", "contiguous"):
        tensors = (v, x, prev, ref, old, amap) if layout == "strided" else tuple(
            None if t is None else t.contiguous() for t in (v, x, prev, ref, old, amap))
        vv = tensors[0].detach().requires_grad_(True)
        kw = dict(ref_model_output=tensors[3] if with_ref else None,
                  beta=0.1 if with_ref else 0.0, advantage_map=tensors[5], clip_range=0.05,
                  backend=backend)
        loss, metrics = tbkernels.flow_grpo_loss(vv, tensors[1], tensors[2], s, sn, tensors[4],
                                                 adv, **kw)
        loss.backward()
        results.append((loss.detach(), torch.stack(list(metrics.values())), vv.grad))
    for got, exp in zip(*results):
        assert torch.equal(got, exp), (got, exp)
    assert results[0][2].is_contiguous()


@pytest.mark.parametrize("backend", STRIDED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", flow_grpo.REDUCTIONS)
@pytest.mark.parametrize("sampling", [False, True])
def test_step_reads_trajectory_slices_in_place(backend, dtype, reduction, sampling):
    """sde_step_with_logprob on trajectory slices (and a batch-expanded sample: stride 0) equals
    the step on contiguous copies bit for bit: the sample drawn, the log-prob, the mean, and the
    gradient of all three."""
    _available(backend)
    shape = (3, 4, 3, 5, 7)
    v = trajectory_slice(shape, dtype, 60, 2, 1)
    x = trajectory_slice((1,) + shape[1:], dtype, 61, 1, 0).expand(shape)   # batch stride 0
    prev = None if sampling else trajectory_slice(shape, dtype, 62, 3, 2)
    s, sn = sigmas(shape[0], seed=63)
    results = []
    for layout in ("strided", "contiguous"):
        tensors = (v, x, prev) if layout == "strided" else tuple(
            None if t is None else t.contiguous() for t in (v, x, prev))
        vv = tensors[0].detach().requires_grad_(True)
        out, logp, mean, _ = tbkernels.sde_step_with_logprob(
            vv, s, sn, tensors[1], tensors[2], logprob_reduction=reduction, backend=backend,
            generator=torch.Generator(device=DEVICE).manual_seed(64))
        g = torch.Generator().manual_seed(65)
        weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in
                   (logp, mean, out)]
        total = (logp * weights[0]).sum() + (mean.float() * weights[1].float()).sum()
        if sampling:
            total = total + (out.float() * weights[2].float()).sum()
        total.backward()
        results.append((out.detach(), logp.detach(), mean.detach(), vv.grad))
    for got, exp in zip(*results):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("map_kind", [None, "position", "element"])
def test_trajectory_slices_are_not_copied(map_kind):
    """The loss's forward+backward on trajectory slices (latents, and with a map old_log_prob
    and the map) creates exactly the tensors it creates on contiguous inputs (tbkernels.memory's
    count on the CPU): no copy of any input. Before the kernels took batch strides, the slices
    cost 2 more latents (one copy each of sample and prev_sample, kept for the backward), and
    a per-element old_log_prob and map 2 float32 latents more."""
    _available("cpu")
    from tbkernels.memory import peak_tensor_memory
    shape = (2, 16, 3, 12, 20)
    v, x, prev, ref, old, adv, amap, s, sn = strided_loss_inputs(shape, torch.bfloat16, map_kind)
    peaks = []
    strided = (v, x, prev, ref, old, amap)
    for tensors in (strided, tuple(None if t is None else t.contiguous() for t in strided)):
        vv = tensors[0].detach().requires_grad_(True)
        args = (vv, tensors[1], tensors[2], s.cpu(), sn.cpu(), tensors[4], adv)
        kw = dict(ref_model_output=tensors[3], beta=0.1, advantage_map=tensors[5], backend="cpu")
        tbkernels.flow_grpo_loss(*args, **kw)[0].backward()         # warm the coefficient cache
        vv.grad = None
        with peak_tensor_memory() as tm:
            tbkernels.flow_grpo_loss(*args, **kw)[0].backward()
        peaks.append(tm.peak_bytes)
    latent = math.prod(shape) * 2
    assert peaks[0] == peaks[1], peaks
    if map_kind != "position":                 # the position map adds its [B, P] float32 log-prob
        assert peaks[0] <= latent + 4096, (peaks, latent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", flow_grpo.REDUCTIONS)
def test_bf16_model_output_with_fp32_latents_computes_in_fp32(backend, reduction):
    """A bfloat16 model_output with float32 latents (Flow-GRPO keeps its trajectory in float32
    and computes the step in float32) is computed in float32: log-prob and mean match the
    float64 formula on the same values to float32 rounding. Rounding the latents to bfloat16
    instead moves per-element log-probs by ~0.08 here, and the mean over a sample by ~1e-5."""
    _available(backend)
    shape = (2, 16, 3, 8, 12)
    g = torch.Generator().manual_seed(70)
    v = torch.randn(shape, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(shape, generator=g).to(DEVICE)
    s, sn = 0.8, 0.7
    prev, _, _, _ = tbkernels.sde_step_with_logprob(v.float(), s, sn, x, backend="reference",
                                                    generator=torch.Generator(device=DEVICE).manual_seed(71))
    exp = sde_step_reference(v.double(), torch.full((2,), s, dtype=torch.float64, device=DEVICE),
                             torch.full((2,), sn, dtype=torch.float64, device=DEVICE), x.double(),
                             prev.double(), logprob_reduction=reduction)
    vv = v.clone().requires_grad_(True)
    _, logp, mean, _ = tbkernels.sde_step_with_logprob(vv, s, sn, x, prev,
                                                       logprob_reduction=reduction,
                                                       backend=backend)
    assert logp.dtype == torch.float32 and mean.dtype == torch.float32
    close(logp, exp[1], 2e-6)
    close(mean, exp[2], 2e-6)
    logp.sum().backward()
    assert vv.grad.dtype == torch.bfloat16
    vref = v.double().requires_grad_(True)
    sde_step_reference(vref, torch.full((2,), s, dtype=torch.float64, device=DEVICE),
                       torch.full((2,), sn, dtype=torch.float64, device=DEVICE), x.double(),
                       prev.double(), logprob_reduction=reduction)[1].sum().backward()
    close(vv.grad, vref.grad, 2 * torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("map_kind", [None, "position", "element"])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ref_kind", ["none", "model_dtype", "fp32"])
def test_loss_with_fp32_latents_and_half_model_output(backend, map_kind, model_dtype, ref_kind):
    """flow_grpo_loss with a bfloat16 / float16 model_output beside float32 latents (the
    reference a model output too, or float32) equals the loss on model_output.float() (the
    float32 computation) bit for bit, its gradient that one's rounded to the model dtype. On the
    cpu backend the kernels read the pair as it is (a float32 reference: converted instead)."""
    _available(backend)
    shape = (2, 4, 3, 6, 10)
    v, x, prev, ref, old, adv, amap, s, sn = strided_loss_inputs(shape, torch.float32, map_kind)
    v16 = v.to(model_dtype)
    ref = {"none": None, "model_dtype": ref.to(model_dtype), "fp32": ref}[ref_kind]
    results = []
    for model_output, reference in ((v16, ref), (v16.float(), None if ref is None else ref.float())):
        vv = model_output.detach().requires_grad_(True)
        loss, metrics = tbkernels.flow_grpo_loss(vv, x, prev, s, sn, old, adv,
                                                 ref_model_output=reference,
                                                 beta=0.0 if ref is None else 0.1,
                                                 advantage_map=amap, clip_range=0.05,
                                                 backend=backend)
        loss.backward()
        results.append((loss.detach(), torch.stack(list(metrics.values())), vv.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2].dtype == model_dtype
    assert torch.equal(results[0][2], results[1][2].to(model_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", flow_grpo.REDUCTIONS)
def test_sampling_with_fp32_latents_and_bf16_model_output(backend, reduction):
    """Sampling with a bfloat16 model_output and a float32 sample draws the float32 sample, mean
    and log-prob that model_output.float() gives, bit for bit (the noise drawn in float32)."""
    _available(backend)
    shape = (3, 4, 2, 5, 7)
    g = torch.Generator().manual_seed(80)
    v = torch.randn(shape, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(shape, generator=g).to(DEVICE)
    s, sn = sigmas(3, seed=81)
    outs = [tbkernels.sde_step_with_logprob(
        model_output, s, sn, x, logprob_reduction=reduction, backend=backend,
        generator=torch.Generator(device=DEVICE).manual_seed(82)) for model_output in (v, v.float())]
    assert outs[0][0].dtype == torch.float32 and outs[0][2].dtype == torch.float32
    for got, exp in zip(outs[0], outs[1]):
        assert torch.equal(got, exp)


def test_mixed_dtypes_keep_the_lean_path():
    """On the cpu backend a bfloat16 model_output beside float32 latents costs what one dtype
    does: the loss's forward+backward creates the bfloat16 gradient and O(B) tensors, no float32
    copy of model_output nor float32 gradient (tbkernels.memory's count)."""
    _available("cpu")
    from tbkernels.memory import peak_tensor_memory
    shape = (2, 16, 3, 12, 20)
    v, x, prev, ref, old, adv, amap, s, sn = strided_loss_inputs(shape, torch.float32, None)
    vv = v.to(torch.bfloat16).requires_grad_(True)
    args = (vv, x.cpu(), prev.cpu(), s.cpu(), sn.cpu(), old.cpu(), adv.cpu())
    kw = dict(ref_model_output=ref.to(torch.bfloat16).cpu(), beta=0.1, backend="cpu")
    tbkernels.flow_grpo_loss(*args, **kw)[0].backward()
    vv.grad = None
    with peak_tensor_memory() as tm:
        tbkernels.flow_grpo_loss(*args, **kw)[0].backward()
    latent = math.prod(shape) * 2
    assert latent <= tm.peak_bytes <= latent + 4096, (tm.peak_bytes, latent)


@pytest.mark.parametrize("backend", STRIDED_BACKENDS)
def test_latent_ops_reject_unsupported_dtype_pairs(backend):
    """The latent ops take one dtype, or a bfloat16 / float16 model_output beside float32
    latents; any other pair (and a reference not of model_output's dtype) raises, naming it."""
    _available(backend)
    from tbkernels.ops._flow_grpo_coefs import step_coefficients
    forward = flow_grpo._forward_op(backend)
    shape = (2, 3, 4, 5)
    s, sn = sigmas(2)
    coefs = step_coefficients(s.cpu(), sn.cpu(), "flow_grpo", 0.7)[0].float().to(DEVICE)
    f32 = torch.randn(shape, device=DEVICE)
    for v, x, ref, match in (
            (f32, f32.bfloat16(), None, "sample"),
            (f32.double(), f32, None, "sample"),
            (f32.bfloat16(), f32.half(), None, "sample"),
            (f32.bfloat16(), f32, f32, "ref_model_output")):
        with pytest.raises(RuntimeError, match=match):
            forward(v, x, x, ref, coefs if v.dtype != torch.float64 else coefs.double(), 0,
                    False, False)


# ---------------------------------------------------------------------------------------------
# The fused loss.

def loss_reference(v, x, prev, s, sn, old, adv, ref=None, beta=0.0, amap=None, sde_type="flow_grpo",
                   kl_form="flow_grpo", vipo_form="clipped", clip_range=1e-4, reduction="mean"):
    _, logp, mean, std_dev_t = sde_step_reference(v, s, sn, x, prev, sde_type=sde_type,
                                                  logprob_reduction=reduction, **extra(sde_type))
    kl = None
    if ref is not None:
        _, _, mean_ref, _ = sde_step_reference(ref, s, sn, x, prev, sde_type=sde_type,
                                               **extra(sde_type))
        dt = (sn - s).reshape(-1)
        trans = std_dev_t * torch.sqrt(-dt) if sde_type in ("flow_grpo", "wan") else std_dev_t
        kl = kl_reference(mean, mean_ref, std_dev_t, trans, kl_form)
    return flow_grpo_loss_reference(logp, old, adv, advantage_map=amap, kl=kl, beta=beta,
                                    vipo_form=vipo_form, clip_range=clip_range)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("map_kind", [None, "position", "element"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_loss_and_gradient_match_reference(backend, sde_type, map_kind, with_ref):
    _available(backend)
    if with_ref and sde_type == "ode":
        pytest.skip("the ODE step has no transition std, so no KL (tested in test_bad_input)")
    shape = (3, 4, 2, 5, 7)
    v, x, ref, noise = latents(shape, seed=13)
    s, sn = sigmas(3)
    prev = sde_step_reference(v, s, sn, x, None, sde_type=sde_type, noise=noise,
                              **extra(sde_type))[0].detach()
    if sde_type == "ode":
        prev = prev + 0.1 * noise                  # a stored latent off the ODE's mean
    reduction = {None: "mean", "position": "channel_sum", "element": "none"}[map_kind]
    with torch.no_grad():
        old = sde_step_reference(v + 0.05 * ref, s, sn, x, prev, sde_type=sde_type,
                                 logprob_reduction=reduction, **extra(sde_type))[1]
    adv = torch.tensor([1.5, -0.7, 7.0], dtype=torch.float64, device=DEVICE)   # 7 gets clamped
    g = torch.Generator().manual_seed(14)
    amap = None
    if map_kind is not None:
        amap = torch.rand(old.shape, generator=g, dtype=torch.float64).to(DEVICE)
    # A clip range that the ratios straddle (the ODE's constant-free log-prob moves them less).
    clip = 1e-3 if sde_type == "ode" else 1e-2
    kw = dict(ref_model_output=ref if with_ref else None, beta=0.04 if with_ref else 0.0,
              advantage_map=amap, sde_type=sde_type, clip_range=clip, **extra(sde_type))
    results = []
    for b in ("readable", backend):
        vv = v.clone().requires_grad_(True)
        if b == "readable":
            loss, metrics = loss_reference(vv, x, prev, s, sn, old, adv,
                                           ref if with_ref else None, kw["beta"], amap, sde_type,
                                           reduction=reduction, clip_range=clip)
        else:
            loss, metrics = tbkernels.flow_grpo_loss(vv, x, prev, s, sn, old, adv, backend=b, **kw)
        loss.backward()
        results.append((loss, metrics, vv.grad))
    (l0, m0, g0), (l1, m1, g1) = results
    close(l1, l0, 1e-10)
    close(g1, g0, 1e-10)
    for key in ("approx_kl", "clipfrac", "kl", "ratio_mean"):
        close(m1[key], m0[key], 1e-10)
    if map_kind is not None:                                       # both branches of the max taken
        assert 0 < m1["clipfrac"].item() < 1, m1["clipfrac"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_form", ["flow_grpo", "exact"])
def test_kl_forms(backend, kl_form):
    _available(backend)
    shape = (2, 4, 2, 5, 6)
    v, x, prev, ref = latents(shape, seed=15)
    s, sn = sigmas(2)
    old = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    adv = torch.ones(2, dtype=torch.float64, device=DEVICE)
    _, m = tbkernels.flow_grpo_loss(v, x, prev, s, sn, old, adv, ref_model_output=ref, beta=0.1,
                                    kl_form=kl_form, backend=backend)
    # Independent closed form (SPEC §1.3): KL_exact = (|dt|/2)(sig_t(1-t)/(2t) + 1/sig_t)^2 |Δv|^2
    t, dt = s, (s - sn)
    sig_t = 0.7 * torch.sqrt(t / (1 - torch.where(t == 1, sn, t)))
    per_elem = ((v - ref) ** 2).mean(dim=(1, 2, 3, 4))
    exact = dt / 2 * (sig_t * (1 - t) / (2 * t) + 1 / sig_t) ** 2 * per_elem
    expected = exact if kl_form == "exact" else exact * dt     # flow_grpo form = |dt| x exact
    close(m["kl"], expected.mean(), 1e-12)


def test_vipo_simple_form():
    shape = (2, 4, 2, 5, 6)
    v, x, prev, _ = latents(shape, seed=16)
    s, sn = sigmas(2)
    old = torch.zeros(2, 2, 5, 6, dtype=torch.float64, device=DEVICE)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64, device=DEVICE)
    amap = torch.rand(2, 2, 5, 6, dtype=torch.float64, device=DEVICE)
    loss, _ = tbkernels.flow_grpo_loss(v, x, prev, s, sn, old, adv, advantage_map=amap,
                                       vipo_form="simple")
    logp = sde_step_reference(v, s, sn, x, prev, logprob_reduction="channel_sum")[1]
    close(loss, -(adv.view(-1, 1, 1, 1) * amap * logp).mean(), 1e-12)


def test_loss_never_differentiates_prev_or_reference():
    shape = (2, 3, 2, 4, 5)
    v, x, prev, ref = latents(shape, seed=17)
    s, sn = sigmas(2)
    prev.requires_grad_(True)
    ref.requires_grad_(True)
    vv = v.clone().requires_grad_(True)
    loss, _ = tbkernels.flow_grpo_loss(vv, x, prev, s, sn, torch.zeros(2, dtype=torch.float64),
                                       torch.ones(2, dtype=torch.float64), ref_model_output=ref,
                                       beta=0.5)
    loss.backward()
    assert vv.grad is not None and prev.grad is None and ref.grad is None


# ---------------------------------------------------------------------------------------------
# Bad input.

def _call(**over):
    shape = (2, 4, 2, 5, 6)
    v, x, prev, ref = latents(shape, torch.float32, seed=18)
    args = dict(model_output=v, sample=x, prev_sample=prev, sigma=0.8, sigma_next=0.7,
                old_log_prob=torch.zeros(2), advantages=torch.ones(2))
    args.update(over)
    return tbkernels.flow_grpo_loss(**args)


@pytest.mark.parametrize("over,error,match", [
    (dict(sigma=0.7, sigma_next=0.7), ValueError, "sigma_next must be < sigma"),
    (dict(sigma=0.5, sigma_next=0.6), ValueError, "sigma_next must be < sigma"),
    (dict(sigma=1.2, sigma_next=0.5), ValueError, r"sigma must lie in \(0, 1\]"),
    (dict(sigma=0.0, sigma_next=-0.1), ValueError, r"sigma must lie in \(0, 1\]"),
    (dict(sigma=torch.tensor([0.9, 0.8, 0.7]), sigma_next=0.5), ValueError, r"\[B\] = \[2\]"),
    (dict(sample=torch.zeros(2, 4, 2, 5, 7)), ValueError, "sample has shape"),
    (dict(prev_sample=torch.zeros(2, 4, 2, 5)), ValueError, "prev_sample has shape"),
    (dict(model_output=torch.zeros(2, 4, 5)), ValueError, "image"),
    (dict(advantage_map=torch.zeros(2, 2, 5, 7)), ValueError, "does not broadcast"),
    (dict(advantage_map=torch.zeros(2, 5, 6)), ValueError, "advantage_map must be"),
    (dict(old_log_prob=torch.zeros(3)), ValueError, "old_log_prob must have shape"),
    (dict(advantages=torch.zeros(2, 1)), ValueError, "advantages must have shape"),
    (dict(beta=0.1), ValueError, "needs ref_model_output"),
    (dict(sde_type="sde"), ValueError, "sde_type must be one of"),
    (dict(sde_type="wan"), ValueError, "sigma_max and sigma_min"),
    (dict(kl_form="reverse"), ValueError, "kl_form"),
    (dict(sde_type="ode", ref_model_output=torch.zeros(2, 4, 2, 5, 6)), ValueError, "no KL"),
    (dict(sigma_next=math.nan), ValueError, "sigma_next must be a finite number"),
    (dict(sde_type="wan", sigma_max=0.0, sigma_min=0.0), ValueError,
     r"degenerate transition .*sigma_min \+ \(sigma_max - sigma_min\)"),
    (dict(sde_type="wan", sigma_max=-0.5, sigma_min=-0.9), ValueError, "degenerate transition"),
    (dict(sigma=1.0, sigma_max=1.0), ValueError, r"degenerate transition .*1 - sigma_max"),
    (dict(beta=-0.1, ref_model_output=torch.zeros(2, 4, 2, 5, 6)), ValueError,
     "beta .* finite number >= 0"),
    (dict(beta=math.nan), ValueError, "beta .* finite number >= 0"),
    (dict(advantages=[1.0, -1.0]), TypeError, "advantages must be a tensor"),
    (dict(old_log_prob=torch.zeros(2, device="meta")), ValueError,
     "old_log_prob is on meta but model_output is on cpu"),
    (dict(advantages=torch.ones(2, dtype=torch.long)), TypeError, "advantages must be floating"),
    (dict(advantage_map=[[1.0]]), TypeError, "advantage_map must be a tensor"),
    (dict(sde_type="cps", sigma_next=0.0, ref_model_output=torch.zeros(2, 4, 2, 5, 6), beta=0.1),
     ValueError, r"KL to the reference is undefined at sample 0.*cps"),
    (dict(sde_type="cps", sigma_next=0.0, ref_model_output=torch.zeros(2, 4, 2, 5, 6),
          kl_form="exact", beta=0.1), ValueError, "KL to the reference is undefined"),
    (dict(noise_level=torch.tensor([0.7, 0.7])), TypeError, "noise_level must be a float"),
])
def test_bad_input(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


@pytest.mark.parametrize("kl_form", ["flow_grpo", "exact"])
def test_cps_last_step_kl_only_logged_is_inf(kl_form):
    """At CPS's last step (std 0) a KL in the loss raises (test_bad_input); a KL only logged
    (beta = 0) keeps the loss finite and reads inf, as before."""
    loss, metrics = _call(sde_type="cps", sigma_next=0.0, kl_form=kl_form,
                          ref_model_output=torch.zeros(2, 4, 2, 5, 6))
    assert math.isfinite(loss.item()) and metrics["kl"].item() == math.inf


@pytest.mark.parametrize("over,match", [
    (dict(sigma=0.5, sigma_next=0.6), "sigma_next must be < sigma"),
    (dict(sigma=1.5, sigma_next=0.6), r"sigma must lie in \(0, 1\]"),
    (dict(sigma_next=math.nan), "sigma_next must be a finite number"),
    (dict(sigma_next=-0.1), "sigma_next must be >= 0"),
    (dict(sde_type="wan", sigma_max=0.1, sigma_min=-0.9), "degenerate transition"),
    (dict(sigma=1.0, sigma_max=1.0), "degenerate transition"),
])
def test_bad_number_sigmas_are_refused_under_torch_compile(over, match):
    """Compiled with fullgraph=True, the checks of tensor values cannot run; sigmas given as
    numbers were not checked either, and the loss came out NaN (found by audit). Now Dynamo
    reports the ValueError ("Observed exception", our message in its debug context), also
    after valid calls with other numbers (which Dynamo may then trace symbolically), and those
    valid calls still match eager."""
    torch._dynamo.reset()
    v, x, prev, _ = latents((2, 4, 2, 5, 6), torch.float32, seed=18)
    old, adv = torch.zeros(2), torch.ones(2)

    def step(sigma=0.8, sigma_next=0.7, **kw):
        return tbkernels.flow_grpo_loss(v, x, prev, sigma, sigma_next, old, adv, **kw)[0]
    with pytest.raises(Exception, match=match):
        torch.compile(step, fullgraph=True)(**over)
    compiled = torch.compile(step, fullgraph=True)
    for s, sn in ((0.8, 0.7), (0.6, 0.4), (0.5, 0.3)):
        assert compiled(sigma=s, sigma_next=sn).item() == step(sigma=s, sigma_next=sn).item()
    with pytest.raises(Exception, match=match):
        compiled(**over)


@pytest.mark.parametrize("over,match", [
    (dict(sigma=0.5, sigma_next=0.6), "got sigma_next=0.6 >= sigma=0.5"),
    (dict(sigma=1.5, sigma_next=0.6), r"sigma must lie in \(0, 1\] .*got 1.5"),
    (dict(sde_type="cps", sigma_next=0.0, beta=0.1), "KL to the reference is undefined"),
])
def test_bad_input_is_refused_under_torch_compile_without_fullgraph(over, match):
    """Without fullgraph=True, the trace-time refusal makes Dynamo run the frames eagerly and
    compile each function they call as a frame of its own, where is_compiling() is true: the
    value checks skipped themselves there and the loss came out NaN / inf (found 2026-11-22).
    The checking helpers are never frames of their own now (ops/_compile.py): the eager error,
    values included, reaches the caller."""
    torch._dynamo.reset()
    v, x, prev, ref = latents((2, 4, 2, 5, 6), torch.float32, seed=46)
    old, adv = torch.zeros(2), torch.ones(2)

    def step(sigma=0.8, sigma_next=0.7, **kw):
        return tbkernels.flow_grpo_loss(v, x, prev, sigma, sigma_next, old, adv,
                                        ref_model_output=ref, **kw)[0]
    compiled = torch.compile(step)
    assert compiled().item() == step().item()
    with pytest.raises(ValueError, match=match):
        compiled(**over)


@pytest.mark.parametrize("kl_form", ["flow_grpo", "exact"])
def test_cps_last_step_kl_is_refused_under_torch_compile(kl_form):
    """CPS's last step with beta != 0 raises eagerly (its KL is infinite); compiled with
    fullgraph=True it returned inf. Now refused at trace time when sigma_next is a number,
    while beta = 0 there (KL only logged) still compiles and matches eager."""
    torch._dynamo.reset()
    v, x, prev, ref = latents((2, 4, 2, 5, 6), torch.float32, seed=47)
    old, adv = torch.zeros(2), torch.ones(2)

    def step(sigma_next, beta):
        return tbkernels.flow_grpo_loss(v, x, prev, 0.3, sigma_next, old, adv, sde_type="cps",
                                        ref_model_output=ref, beta=beta, kl_form=kl_form)[0]
    compiled = torch.compile(step, fullgraph=True)
    for sn, beta in ((0.2, 0.1), (0.0, 0.0)):
        assert compiled(sn, beta).item() == step(sn, beta).item()
    with pytest.raises(Exception, match="KL to the reference is undefined"):
        compiled(0.0, 0.1)


def test_torch_compile_fullgraph_when_beta_changes():
    """A KL coefficient that changes between calls (a schedule, or beta = 0 on some steps): on
    the second value Dynamo recompiles with beta as a symbolic float, and the argument check's
    math.isfinite(beta) failed the fullgraph trace ("torch.* op returned non-Tensor"; found
    2026-11-22). Comparisons trace; each value matches eager."""
    torch._dynamo.reset()
    v, x, prev, ref = latents((2, 4, 2, 5, 6), torch.float32, seed=48)
    old, adv = torch.zeros(2), torch.tensor([1.0, -1.0])

    def step(vv, beta):
        return tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, old, adv, ref_model_output=ref,
                                        beta=beta)[0]
    compiled = torch.compile(step, fullgraph=True)
    for beta in (0.1, 0.05, 0.0, 0.2):
        torch.testing.assert_close(value_and_grad(compiled, v, beta), value_and_grad(step, v, beta))
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(Exception, match="beta"):
            compiled(v, bad)


def test_torch_compile_a_sampler_schedule_of_number_sigmas_is_one_graph():
    """A sampler's schedule passes a new Python-float sigma at every step. torch.full(value)
    made AOTAutograd / Inductor bake each sigma into its graph: one graph per step, and with
    fullgraph=True the ninth raised FailOnRecompileLimitHit (torch._dynamo's recompile limit
    is 8; found by audit). Now the first recompile makes sigma symbolic and the rest reuse it."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    v, x, prev, _ = latents((2, 4, 2, 5, 6), torch.float32, seed=51)
    old, adv = torch.zeros(2), torch.tensor([1.0, -1.0])

    def step(vv, s):
        return tbkernels.flow_grpo_loss(vv, x, prev, s, s - 0.05, old, adv)[0]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for i in range(12):
        s = 0.95 - 0.05 * i
        torch.testing.assert_close(compiled(v, s), step(v, s))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_torch_compile_dynamic_latent_sizes_with_a_reference_is_one_graph():
    """dynamic=True, a KL reference, latents whose size changes (multi-resolution training):
    the KL weight's memo, keyed by the element count, specialised it (one graph per size, the
    recompile limit after 8; found by audit). Traced, the weight is computed without the memo."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    old, adv = torch.zeros(2), torch.tensor([1.0, -1.0])

    def step(vv, x, prev, ref):
        return tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, old, adv, ref_model_output=ref,
                                        beta=0.04)[0]
    compiled = torch.compile(step, backend="aot_eager", dynamic=True, fullgraph=True)
    for width in range(6, 16):
        v, x, prev, ref = latents((2, 4, 3, 5, width), torch.float32, seed=width)
        torch.testing.assert_close(compiled(v, x, prev, ref), step(v, x, prev, ref))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_settings_given_as_tensors_are_read_by_value():
    """noise_level / sigma_max / sigma_min as 0-d tensors were cache keys by identity: an in-place
    update (an annealed noise level) kept returning the old coefficients (found by audit)."""
    shape = (2, 4, 2, 5, 6)
    v, x, prev, _ = latents(shape, torch.float32, seed=44)
    eta = torch.tensor(0.7, dtype=torch.float64)        # float64: its value is the float's
    smax, smin = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)

    def logp(**kw):
        return tbkernels.sde_step_with_logprob(v, 0.8, 0.7, x, prev, **kw)[1]
    first = logp(noise_level=eta)
    assert torch.equal(first, logp(noise_level=0.7))
    eta.fill_(0.3)
    assert torch.equal(logp(noise_level=eta), logp(noise_level=0.3))
    assert not torch.equal(logp(noise_level=eta), first)
    wan = logp(sde_type="wan", sigma_max=smax, sigma_min=smin)
    smax.fill_(0.6)
    assert torch.equal(logp(sde_type="wan", sigma_max=smax, sigma_min=smin),
                       logp(sde_type="wan", sigma_max=0.6, sigma_min=0.1))
    assert not torch.equal(logp(sde_type="wan", sigma_max=smax, sigma_min=smin), wan)


def test_nan_check_behind_flag():
    v = latents((2, 4, 2, 5, 6), torch.float32, seed=19)[0].clone()
    v[1, 2, 1, 3, 4] = math.nan
    loss, _ = _call(model_output=v)                                # unchecked: no error
    assert math.isnan(loss.item())
    with pytest.raises(ValueError, match="model_output contains a non-finite value"):
        _call(model_output=v, check_finite=True)
    with pytest.raises(ValueError, match="prev_sample contains"):
        tbkernels.sde_step_with_logprob(v.nan_to_num(), 0.8, 0.7, v.nan_to_num(), v,
                                        check_finite=True)


def test_numpy_scalar_sigmas_equal_floats():
    """numpy.float32 is not a Python float (numpy.float64 is): both are accepted as numbers and
    give the result of the same Python floats."""
    np = pytest.importorskip("numpy")
    v, x, prev, _ = latents((2, 4, 2, 5, 6), torch.float32, seed=23)
    exp = tbkernels.sde_step_with_logprob(v, float(np.float32(0.8)), float(np.float32(0.7)), x,
                                          prev)[1]
    got = tbkernels.sde_step_with_logprob(v, np.float32(0.8), np.float32(0.7), x, prev)[1]
    assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("map_kind", [None, "position", "element"])
def test_empty_batch(backend, map_kind):
    """B = 0 (every sample of a micro-batch filtered out): no error, a NaN loss (the mean of
    nothing, as eager PyTorch gives) and an empty gradient. The metrics say what the reference
    backend says: means of nothing are NaN, but without a reference model kl is 0 (the kernels
    made it 0/0 = NaN)."""
    _available(backend)
    z = torch.zeros(0, 4, 2, 5, 6, dtype=torch.float64, device=DEVICE)
    amap = {None: None, "position": torch.zeros(0, 2, 5, 6, dtype=torch.float64, device=DEVICE),
            "element": torch.zeros_like(z)}[map_kind]
    old = torch.zeros((0,) if amap is None else amap.shape, dtype=torch.float64, device=DEVICE)
    for ref in (None, z):
        kw = dict(advantage_map=amap, ref_model_output=ref, beta=0.0 if ref is None else 0.1)
        vv = z.clone().requires_grad_(True)
        loss, metrics = tbkernels.flow_grpo_loss(vv, z, z, 0.8, 0.7, old, old.new_zeros(0),
                                                 backend=backend, **kw)
        loss.backward()
        assert math.isnan(loss.item()) and vv.grad.shape == z.shape
        _, expected = tbkernels.flow_grpo_loss(z, z, z, 0.8, 0.7, old, old.new_zeros(0),
                                               backend="reference", **kw)
        for key, value in expected.items():
            got = metrics[key].item()
            assert got == value.item() or (math.isnan(got) and math.isnan(value.item())), \
                (key, ref is None, got, value.item())
        assert ref is not None or metrics["kl"].item() == 0.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "reference" not in str(b)])
@pytest.mark.parametrize("map_kind", [None, "position", "element"])
@pytest.mark.parametrize("latent_dtype", [torch.float32, torch.float16])
def test_float16_gradient_survives_loss_scaling(backend, map_kind, latent_dtype):
    """float16 model output trained with a GradScaler's loss scale: the map paths computed the
    gradient of a unit loss in float16 and scaled it afterwards, so per-element gradients below
    float16's normal range (small advantages, large latents) were flushed to zero before the
    scale reached them (67 % zeros at Wan 480p per element). Now they equal the reference
    backend's, which applies the scale first."""
    _available(backend)
    shape = (2, 4, 3, 4, 6)
    v, x, prev, ref = latents(shape, torch.float32, seed=41)
    x, prev = x.to(latent_dtype), prev.to(latent_dtype)
    ref = (v + 0.01 * ref).half()
    g = torch.Generator().manual_seed(42)
    amap = {None: None, "position": torch.rand((2, 3, 4, 6), generator=g, dtype=torch.float64),
            "element": torch.rand(shape, generator=g, dtype=torch.float64)}[map_kind]
    amap = None if amap is None else amap.float().to(DEVICE)
    reduction = {None: "mean", "position": "channel_sum", "element": "none"}[map_kind]
    old = tbkernels.sde_step_with_logprob(v.double(), 0.8, 0.7, x.double(), prev.double(),
                                          logprob_reduction=reduction)[1].float()
    adv = torch.tensor([3e-4, -2e-4], device=DEVICE)       # small advantages: tiny gradients
    scale = 65536.0
    grads = {}
    for be in ("reference", backend):
        vv = v.half().requires_grad_(True)
        loss, _ = tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, old, adv, advantage_map=amap,
                                           ref_model_output=ref, beta=1e-4, clip_range=0.2,
                                           backend=be)
        (loss * scale).backward()
        grads[be] = vv.grad.float()
    exp, got = grads["reference"], grads[backend]
    assert exp.abs().min() > 0                             # the scaled gradient has no zeros
    assert (got == 0).sum().item() == 0, "scaled gradient entries flushed to zero"
    assert ((got - exp).norm() / exp.norm()).item() < 2e-3


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "reference" not in str(b)])
@pytest.mark.parametrize("grad_scale", [-3.0, 0.0, 1.0, 1000.5])
@pytest.mark.parametrize("ref_kind", [None, "ref"])
def test_float16_elem_gradient_any_incoming_gradient(backend, grad_scale, ref_kind):
    """A float16 model output with a per-element map: the backward recomputes the gradient with
    the incoming gradient g folded into the advantages and the KL weight (scaled by |g|, the sign
    applied after). Negative, zero and non-power-of-two g, with and without the KL term, and a
    second backward through a retained graph give the reference backend's gradient."""
    _available(backend)
    shape = (2, 4, 3, 4, 6)
    v, x, prev, ref = latents(shape, torch.float32, seed=43)
    ref = None if ref_kind is None else (v + 0.05 * ref).half()
    g = torch.Generator().manual_seed(44)
    amap = torch.rand(shape, generator=g, dtype=torch.float64).float().to(DEVICE)
    old = tbkernels.sde_step_with_logprob(v.double(), 0.8, 0.7, x.double(), prev.double(),
                                          logprob_reduction="none")[1].float()
    # one advantage beyond adv_clip_max (clamped before it is scaled), one inside
    adv = torch.tensor([7.0, -0.5], device=DEVICE)
    grads = {}
    for be in ("reference", backend):
        vv = v.half().requires_grad_(True)
        loss, _ = tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, old, adv, advantage_map=amap,
                                           ref_model_output=ref,
                                           beta=0.0 if ref is None else 0.3, clip_range=0.01,
                                           adv_clip_max=5.0, backend=be)
        (loss * grad_scale).backward(retain_graph=True)
        first = vv.grad.clone()
        vv.grad = None
        (loss * grad_scale).backward()
        assert torch.equal(vv.grad, first), be            # the retained graph: same gradient
        grads[be] = first.float()
    exp, got = grads["reference"], grads[backend]
    if grad_scale == 0.0:
        assert got.abs().max().item() == 0.0
        return
    assert exp.abs().max() > 0
    assert ((got - exp).norm() / exp.norm()).item() < 2e-3


def test_float16_elem_loss_memory_is_the_gradient():
    """The float16 per-element path allocates what bfloat16's does: the float16 gradient and
    O(B) tensors, no float32 copy of the inputs and no float32 gradient (it used to peak at
    four float16 latents)."""
    shape = (2, 16, 3, 6, 10)
    v, x, prev, ref = latents(shape, torch.float32, seed=45)
    v, x, prev, ref = (t.half().cpu() for t in (v, x, prev, ref))
    amap = torch.rand(shape)
    old = torch.full(shape, -1.0)
    adv = torch.tensor([1.0, -1.0])
    vv = v.clone().requires_grad_(True)
    kw = dict(advantage_map=amap, ref_model_output=ref, beta=0.1, backend="cpu")
    for _ in range(2):                     # the second: the coefficient table is cached
        vv.grad = None
        with tbkernels.memory.peak_tensor_memory() as tm:
            loss, _ = tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, old, adv, **kw)
            (loss * 65536.0).backward()
    latent = v.numel() * 2
    assert latent <= tm.peak_bytes <= latent + 4096, (tm.peak_bytes, latent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_backward_takes_expanded_logp_gradients_without_a_copy(backend, dtype):
    """sde_step_with_logprob(logprob_reduction="none") differentiated through logp.sum(), or
    with a per-sample or per-position weight broadcast against it: the incoming gradient is an
    expanded view, which the backward used to copy into a full-size float32 tensor (found by
    audit). It is now passed as a per-sample / per-position gradient: the same gradient as the
    dense one, and (kernel backends) no latent-sized allocation beyond the outputs and the
    gradient."""
    _available(backend)
    shape = (2, 16, 3, 6, 10)
    v, x, prev, _ = latents(shape, dtype, seed=49)
    w = torch.tensor([0.75, -1.5], device=DEVICE)
    pos = torch.rand((2, 1, 3, 6, 10), generator=torch.Generator().manual_seed(50)).to(DEVICE)
    weights = {"sum": None, "sample": w.view(2, 1, 1, 1, 1), "position": pos}
    for kind, weight in weights.items():
        grads, peaks = [], []
        for expanded in (False, True):
            vv = v.clone().requires_grad_(True)
            with tbkernels.memory.peak_tensor_memory() as tm:
                logp = tbkernels.sde_step_with_logprob(vv, 0.8, 0.7, x, prev,
                                                       logprob_reduction="none",
                                                       backend=backend)[1]
                if weight is None:
                    (logp.sum() if expanded else (logp * torch.ones_like(logp)).sum()).backward()
                else:
                    g = weight.to(logp.dtype).expand_as(logp)
                    logp.backward(g if expanded else g.contiguous())
            grads.append(vv.grad.double())
            peaks.append(tm.peak_bytes)
        dense, got = grads
        assert ((got - dense).abs().max() / dense.abs().max()).item() <= 4 * torch.finfo(dtype).eps, kind
        if "reference" not in str(backend) and DEVICE.type == "cpu":
            latent = v.numel() * v.element_size()
            logp_bytes = v.numel() * 4                           # float32 (float64 for fp64)
            assert peaks[1] <= logp_bytes + latent + latent // 8, (kind, peaks, latent)


@pytest.mark.parametrize("shape", [(2, 0, 3, 4), (0, 4, 3, 4)], ids=["C0", "B0"])
def test_step_backward_of_empty_latents_through_sum(shape):
    """logp.sum().backward() on empty latents (an expanded gradient with nothing to read): the
    compact-gradient path of the backward must not index into the empty dims."""
    v = torch.randn(shape, device=DEVICE, requires_grad=True)
    x = torch.randn(shape, device=DEVICE)
    for reduction in ("none", "channel_sum", "mean"):
        v.grad = None
        logp = tbkernels.sde_step_with_logprob(v, 0.8, 0.7, x, x, logprob_reduction=reduction)[1]
        logp.sum().backward()
        assert v.grad.shape == v.shape, reduction


def test_step_errors():
    v = torch.zeros(2, 4, 3, 5)
    with pytest.raises(ValueError, match="logprob_reduction"):
        tbkernels.sde_step_with_logprob(v, 0.8, 0.7, v, logprob_reduction="sum")
    with pytest.raises(ValueError, match="sample requires grad"):
        tbkernels.sde_step_with_logprob(v, 0.8, 0.7, v.clone().requires_grad_(True))


# ---------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("map_kind", [None, "position"])
def test_torch_compile_fullgraph_forward_backward(map_kind):
    torch._dynamo.reset()
    shape = (2, 4, 2, 5, 6)
    v, x, prev, ref = latents(shape, torch.float32, seed=20)
    s, sn = torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.5])
    old_shape = (2,) if map_kind is None else (2, 2, 5, 6)
    old = torch.full(old_shape, -3.0)
    adv = torch.tensor([1.0, -1.0])
    amap = None if map_kind is None else torch.rand(old_shape)

    def step(vv):
        loss, m = tbkernels.flow_grpo_loss(vv, x, prev, s, sn, old, adv, ref_model_output=ref,
                                           beta=0.01, advantage_map=amap, clip_range=0.3)
        return loss, m["clipfrac"]

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        vv = v.clone().requires_grad_(True)
        loss, _ = fn(vv)
        loss.backward()
        grads.append((loss.detach(), vv.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


@pytest.mark.parametrize("sampling,write_mean", [(False, False), (True, True), (False, True)])
def test_compiled_ops_pass_opcheck(sampling, write_mean):
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    from tbkernels.ops._flow_grpo_coefs import step_coefficients
    v, x, pn, ref = latents((2, 3, 2, 4, 5), torch.float32, seed=21)
    s, sn = sigmas(2)
    coefs = step_coefficients(s.cpu(), sn.cpu(), "flow_grpo", 0.7)[0].float()
    v, x, pn, ref = (t.cpu() for t in (v, x, pn, ref))
    # and the latents as trajectory slices (batch-strided): the fake's outputs stay contiguous
    x_s, pn_s = (torch.stack([torch.zeros_like(t), t, t], dim=1)[:, 1] for t in (x, pn))
    for reduction in (0, 1, 2):
        for xx, pp in ((x, pn), (x_s, pn_s)):
            torch.library.opcheck(torch.ops.tbkernels.flow_step_forward.default,
                                  (v.requires_grad_(True), xx, pp, ref, coefs, reduction,
                                   sampling, write_mean))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wan_480p_latent_loss_and_gradient(backend):
    """A full Wan2.1 480p latent (B = 1): values and gradients against the float64 reference."""
    _available(backend)
    if backend == "reference":
        pytest.skip("the reference is the ground truth here")
    shape = (1, 16, 21, 60, 104)
    v, x, ref, noise = latents(shape, torch.float32, seed=22)
    s, sn = torch.tensor([0.9], device=DEVICE), torch.tensor([0.85], device=DEVICE)
    prev = (x + 0.05 * noise).contiguous()
    old = torch.tensor([-0.5], device=DEVICE)
    adv = torch.tensor([1.3], device=DEVICE)
    grads = {}
    for name, dtype in (("exact", torch.float64), (backend, torch.float32)):
        vv = v.to(dtype).clone().requires_grad_(True)
        loss, m = tbkernels.flow_grpo_loss(
            vv, x.to(dtype), prev.to(dtype), s, sn, old.to(dtype), adv.to(dtype),
            ref_model_output=ref.to(dtype), beta=0.04, clip_range=10.0,
            backend="reference" if name == "exact" else backend)
        loss.backward()
        grads[name] = (loss.detach(), vv.grad, m["kl"])
    (l0, g0, k0), (l1, g1, k1) = grads["exact"], grads[backend]
    for got, exp in ((l1, l0), (k1, k0), (g1, g0)):
        # Relative to the largest value: gradients of a mean over 2M elements are ~1e-7.
        err = (got.double() - exp).abs().max().item()
        assert err <= 1e-5 * exp.abs().max().item(), (err, exp.abs().max().item())


_MEMORY_SCRIPT = r'''
import gc, json, sys, torch, tbkernels
backend, dtype = sys.argv[1], getattr(torch, sys.argv[2])
shape = (2, 16, 9, 32, 32)
g = torch.Generator().manual_seed(0)
v, x, noise, ref = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
prev = (x + 0.05 * noise).contiguous()
s, sn, old, adv = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), torch.zeros(2), torch.ones(2)
vv = v.clone().requires_grad_(True)
def step():
    loss, _ = tbkernels.flow_grpo_loss(vv, x, prev, s, sn, old, adv, ref_model_output=ref,
                                       beta=0.04, backend=backend)
    loss.backward()
step(); vv.grad = None; gc.collect()
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")
base = kib("VmRSS")
step()
print(json.dumps({"extra": (kib("VmHWM") - base) * 1024, "latent": vv.numel() * vv.element_size()}))
'''


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"),
                    reason="needs Linux /proc/self/clear_refs to reset the peak resident set")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_step_allocates_only_the_gradient(dtype, tmp_path):
    """Peak extra memory of forward+backward on the C++ backend: the gradient plus O(B) scalars."""
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    import json
    import os
    import subprocess
    import sys
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    # A fixed mmap threshold returns freed blocks to the OS, so the resident set tracks tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    runs = {}
    for backend in ("cpu", "reference"):
        out = subprocess.run([sys.executable, str(script), backend, dtype], capture_output=True,
                             text=True, env=env, timeout=300, check=True)
        runs[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    latent = runs["cpu"]["latent"]
    assert runs["cpu"]["extra"] <= latent + (1 << 20), runs          # grad + < 1 MiB
    assert runs["reference"]["extra"] >= 3 * latent, runs           # the check can tell


def _load_flow_bench():
    import importlib.util
    import pathlib
    import sys
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_flow_grpo.py"
    spec = importlib.util.spec_from_file_location("_tbk_bench_flow_grpo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("trajectory", [False, True], ids=["contiguous", "trajectory"])
def test_meta_memory_model_equals_cpu_count(dtype, trajectory):
    """bench_flow_grpo.py --meta models the GPU shapes' step memory on the meta device; at a
    size the CPU runs, the meta count equals the CPU count byte for byte, for Flow-GRPO's eager
    code and for tbkernels (whose compiled op's meta kernel allocates what the kernel does: the
    gradient and O(B) outputs, one latent in all), also with sample and prev_sample as Flow-GRPO
    passes them (--trajectory: [:, j] slices, read in place)."""
    bench = _load_flow_bench()
    shape = (2, 16, 3, 12, 20)
    latent = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    for name in ("eager", "tbkernels"):
        cpu = bench.peak_tensor_bytes(name, shape, dtype, torch.device("cpu"),
                                      trajectory=trajectory)
        meta = bench.peak_tensor_bytes(name, shape, dtype, torch.device("meta"),
                                       trajectory=trajectory)
        assert cpu == meta, (name, cpu, meta)
        if name == "tbkernels":
            assert latent <= meta <= latent + 4096, (meta, latent)
        else:                    # full-size float32 temporaries: 6 latents fp32, 18 bf16 ones
            assert meta >= 5 * latent


def test_meta_memory_model_mixed_trajectory_equals_cpu_count():
    """bench_flow_grpo.py --meta --mixed --trajectory (Flow-GRPO's own inputs: a bf16
    model_output and reference beside float32 trajectory slices): meta and CPU counts agree, and
    tbkernels' extra is the bf16 gradient alone (nothing converted, nothing copied)."""
    bench = _load_flow_bench()
    shape = (2, 16, 3, 12, 20)
    grad = math.prod(shape) * 2
    for name in ("eager", "tbkernels"):
        counts = [bench.peak_tensor_bytes(name, shape, torch.bfloat16, torch.device(dev),
                                          trajectory=True, latent_dtype=torch.float32)
                  for dev in ("cpu", "meta")]
        assert counts[0] == counts[1], (name, counts)
        if name == "tbkernels":
            assert grad <= counts[1] <= grad + 4096, (counts, grad)


@pytest.mark.parametrize("map_kind", ["position", "element"])
def test_meta_memory_model_with_a_map_equals_cpu_count(map_kind):
    """The same for bench_flow_grpo.py --meta --map: with a ViPO map, meta and CPU counts agree
    byte for byte for eager and tbkernels (whose extra is the gradient plus the float32
    [B, positions] log-prob buffer)."""
    bench = _load_flow_bench()
    shape = (2, 16, 3, 12, 20)
    latent = math.prod(shape) * 2
    positions = math.prod(shape) // (16 if map_kind == "position" else 1)
    for name in ("eager", "tbkernels"):
        counts = [bench.peak_tensor_bytes(name, shape, torch.bfloat16, torch.device(dev),
                                          map_kind) for dev in ("cpu", "meta")]
        assert counts[0] == counts[1], (name, counts)
        if name == "tbkernels":
            assert counts[1] <= latent + 4 * positions + 4096, (counts, latent)


# ---------------------------------------------------------------------------------------------
# The per-sample surrogate epilogue (tbkernels::flow_grpo_surrogate, csrc/flow_grpo_surrogate.h)

SURROGATE_BACKENDS = backend_params(("cpu", "cuda", "triton"))


def surrogate_inputs(batch, dtype, seed=0):
    """[B] inputs that visit every branch: ratios inside the clip range (the maximum's tie,
    where each side gets half the gradient), above and below it; advantages inside, beyond the
    clamp on both sides, and exactly 0."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(batch, generator=g, dtype=torch.float64) - 1.0
    kind = torch.arange(batch) % 4
    # delta = logp - old: 0 (ratio exactly 1: inside), small (inside), large +/- (clipped)
    delta = torch.where(kind == 0, torch.zeros(batch, dtype=torch.float64),
                        torch.where(kind == 1, 0.01 * torch.randn(batch, generator=g,
                                                                  dtype=torch.float64),
                                    0.2 + 0.3 * torch.rand(batch, generator=g, dtype=torch.float64)))
    delta = torch.where((kind == 3) & (torch.arange(batch) % 8 == 3), -delta, delta)
    old = logp - delta
    adv = torch.randn(batch, generator=g, dtype=torch.float64) * 4
    adv[::5] = 0.0
    ref_sq = torch.rand(batch, generator=g, dtype=torch.float64) * 3
    kl_w = torch.rand(batch, generator=g, dtype=torch.float64) * 1e-3
    return [t.to(dtype).to(DEVICE) for t in (logp, ref_sq, kl_w, old, adv)]


def surrogate_by_autograd(logp, ref_sq, kl_w, old, adv, clip, adv_max, beta, simple):
    """The plain-PyTorch surrogate (the reference backend's), differentiated by autograd in
    float64: loss, metrics [4] and the per-sample gradients the op returns as factors."""
    lp = logp.double().requires_grad_(True)
    rs = None if ref_sq is None else ref_sq.double().requires_grad_(True)
    loss, m = flow_grpo._policy_loss(lp, rs, None if kl_w is None else kl_w.double(), old.double(),
                                     adv.double(), None, clip, adv_max, beta,
                                     "simple" if simple else "clipped")
    inputs = [lp] + ([rs] if rs is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g_ref = grads[1] if rs is not None and grads[1] is not None else torch.zeros_like(lp)
    metrics = torch.stack([m[k].double() for k in flow_grpo._METRICS])
    return loss.detach(), metrics, torch.stack([grads[0], g_ref.detach()])


def _surrogate_op(backend):
    _available(backend)
    return flow_grpo._surrogate_op(backend)


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 8, 1500])
@pytest.mark.parametrize("with_ref,beta,simple", [(True, 0.04, False), (True, 0.0, False),
                                                  (False, 0.0, False), (True, 0.04, True)])
def test_surrogate_op_matches_autograd_of_the_formula(backend, dtype, batch, with_ref, beta,
                                                      simple):
    """Loss, metrics and per-sample gradients of the fused epilogue against autograd of the
    plain formula in float64, every branch visited (B = 1500 spans more than one Triton block).
    beta = 0 with a reference: the KL is a metric and d loss / d ref_sq is exactly 0."""
    op = _surrogate_op(backend)
    logp, ref_sq, kl_w, old, adv = surrogate_inputs(batch, dtype, seed=batch)
    if not with_ref:
        ref_sq = kl_w = None
    clip, adv_max = 0.1, 5.0
    loss, metrics, factors = op(logp, ref_sq, kl_w, old, adv, clip, adv_max, beta, simple)
    e_loss, e_metrics, e_factors = surrogate_by_autograd(logp, ref_sq, kl_w, old, adv, clip,
                                                         adv_max, beta, simple)
    assert loss.dtype == metrics.dtype == factors.dtype == dtype
    assert loss.shape == () and metrics.shape == (4,) and factors.shape == (2, batch)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    close(loss, e_loss, tol)
    close(metrics, e_metrics, tol)
    close(factors, e_factors, tol)
    if not (with_ref and beta != 0):
        assert (factors[1] == 0).all()
    if batch >= 8 and not simple:       # every branch was taken
        assert 0 < metrics[1].item() < 1


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_surrogate_op_rejects_bad_input(backend):
    op = _surrogate_op(backend)
    logp, ref_sq, kl_w, old, adv = surrogate_inputs(4, torch.float32)
    bad = [
        ((logp, ref_sq, None, old, adv), "go together"),
        ((logp, ref_sq, kl_w, old[:3], adv), "old_log_prob must be a"),
        ((logp, ref_sq, kl_w, old, adv.double()), "advantages must be a contiguous"),
        ((logp.half(), None, None, old.half(), adv.half()), "float32 or float64"),
        ((logp[None], None, None, old, adv), r"\[B\]"),
        ((torch.stack([logp, logp], 1)[:, 0], None, None, old, adv),       # stride 2
         "logp must be a contiguous"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            op(*args, 0.1, 5.0, 0.0, False)
    with pytest.raises(RuntimeError, match="must be > 0"):
        op(logp, None, None, old, adv, 0.0, 5.0, 0.0, False)


def test_surrogate_op_passes_opcheck():
    """Schema, fake (meta) kernel, registered autograd and torch.compile of the C++ op."""
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    logp, ref_sq, kl_w, old, adv = (t.cpu() for t in surrogate_inputs(6, torch.float32))
    for ref in (True, False):
        for beta in (0.0, 0.1):
            torch.library.opcheck(
                torch.ops.tbkernels.flow_grpo_surrogate.default,
                (logp.clone().requires_grad_(True),
                 ref_sq.clone().requires_grad_(True) if ref else None, kl_w if ref else None,
                 old, adv, 0.1, 5.0, beta, False))


# The surrogate with a ViPO map (tbkernels::flow_grpo_map_surrogate): one policy term per
# position, the gradient written over the log-prob.

def map_surrogate_inputs(batch, positions, dtype, shared_map=False, seed=0):
    """[B, P] log-probs with every branch of the [B] inputs above, [B] advantages (inside, beyond
    the clamp, 0) and a map >= 0 with zeros, [1, P] when shared by the batch."""
    logp, ref_sq, kl_w, old, _ = surrogate_inputs(batch * positions, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(batch, generator=g, dtype=torch.float64) * 4
    if batch > 2:
        adv[::3] = 0.0
    amap = torch.rand(1 if shared_map else batch, positions, generator=g, dtype=torch.float64) * 2
    amap[:, 3::7] = 0.0
    ref_sq, kl_w = ref_sq[:batch] * positions, kl_w[:batch]
    rows = (batch, positions)
    return [t.to(dtype).to(DEVICE) for t in (logp.reshape(rows), ref_sq, kl_w, old.reshape(rows),
                                             adv, amap)]


def map_surrogate_by_autograd(logp, ref_sq, kl_w, old, adv, amap, clip, adv_max, beta, simple):
    """_policy_loss (the reference backend's whole-tensor surrogate) with the map, differentiated
    by autograd in float64: loss, metrics, d loss / d logp [B, P] and d loss / d ref_sq [B]."""
    lp = logp.double().requires_grad_(True)
    rs = None if ref_sq is None else ref_sq.double().requires_grad_(True)
    loss, m = flow_grpo._policy_loss(lp, rs, None if kl_w is None else kl_w.double(), old.double(),
                                     adv.double(), amap.double(), clip, adv_max, beta,
                                     "simple" if simple else "clipped")
    inputs = [lp] + ([rs] if rs is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g_ref = (grads[1] if rs is not None and grads[1] is not None
             else torch.zeros(lp.shape[0], dtype=torch.float64, device=lp.device))
    metrics = torch.stack([m[k].double() for k in flow_grpo._METRICS])
    return loss.detach(), metrics, grads[0], g_ref.detach()


def _map_surrogate_op(backend):
    _available(backend)
    return flow_grpo._map_surrogate_op(backend)


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [(1, 1), (3, 41), (2, 70001)], ids=["1x1", "3x41", "2x70001"])
@pytest.mark.parametrize("shared_map", [False, True], ids=["map", "shared_map"])
@pytest.mark.parametrize("with_ref,beta,simple", [(True, 0.04, False), (True, 0.0, False),
                                                  (False, 0.0, False), (True, 0.04, True)])
def test_map_surrogate_op_matches_autograd_of_the_formula(backend, dtype, rows, shared_map,
                                                          with_ref, beta, simple):
    """Loss, metrics, the per-position gradient (written over logp) and d loss / d ref_sq against
    autograd of the plain formula in float64, every branch visited. 70001 positions span several
    CPU tasks (32768 positions each) and GPU blocks, with a ragged tail; a [1, P] map is shared
    by the batch."""
    op = _map_surrogate_op(backend)
    B, P = rows
    logp, ref_sq, kl_w, old, adv, amap = map_surrogate_inputs(B, P, dtype, shared_map, seed=P)
    if not with_ref:
        ref_sq = kl_w = None
    clip, adv_max = 0.1, 5.0
    e_loss, e_metrics, e_grad, e_dref = map_surrogate_by_autograd(
        logp, ref_sq, kl_w, old, adv, amap, clip, adv_max, beta, simple)
    buf = logp.clone()
    loss, metrics, dref = op(buf, ref_sq, kl_w, old, adv, amap, clip, adv_max, beta, simple)
    assert loss.dtype == metrics.dtype == dref.dtype == dtype
    assert loss.shape == () and metrics.shape == (4,) and dref.shape == (B,)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    close(loss, e_loss, tol)
    close(metrics, e_metrics, tol)
    close(buf, e_grad, tol)                     # logp now holds d loss / d logp
    close(dref, e_dref, tol)
    if not (with_ref and beta != 0):
        assert (dref == 0).all()
    if B * P >= 100 and not simple:             # both sides of the clip were taken
        assert 0 < metrics[1].item() < 1


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_map_surrogate_op_rejects_bad_input(backend):
    op = _map_surrogate_op(backend)
    logp, ref_sq, kl_w, old, adv, amap = map_surrogate_inputs(3, 5, torch.float32)
    bad = [
        ((logp, ref_sq, None, old, adv, amap), "go together"),
        ((logp, ref_sq, kl_w, old[:, :4], adv, amap), "old_log_prob must be a"),
        ((logp, ref_sq, kl_w, old, adv[:2], amap), "advantages must be a contiguous"),
        ((logp, ref_sq, kl_w, old, adv, amap[:2]), "advantage_map must be a"),
        ((logp, ref_sq, kl_w, old, adv, amap.t().contiguous().t()),
         "advantage_map must be a"),
        ((logp, ref_sq, kl_w, old, adv, amap.double()), "advantage_map must be a"),
        ((logp.half(), None, None, old.half(), adv.half(), amap.half()), "float32 or float64"),
        ((logp[0], None, None, old[0], adv, amap[0]), r"\[B, positions\]"),
        ((logp.t().contiguous().t(), None, None, old, adv, amap), "logp must be a contiguous"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            op(*args, 0.1, 5.0, 0.0, False)
    with pytest.raises(RuntimeError, match="must be > 0"):
        op(logp, None, None, old, adv, amap, 0.1, -1.0, 0.0, False)


def test_map_surrogate_op_passes_opcheck():
    """Schema (logp declared mutated), fake (meta) kernel and torch.compile of the C++ op."""
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    logp, ref_sq, kl_w, old, adv, amap = (t.cpu() for t in
                                          map_surrogate_inputs(4, 9, torch.float32))
    for ref in (True, False):
        torch.library.opcheck(
            torch.ops.tbkernels.flow_grpo_map_surrogate.default,
            (logp.clone(), ref_sq if ref else None, kl_w if ref else None, old, adv, amap, 0.1,
             5.0, 0.2, False))


# flow_grpo_loss with a per-element map as one op (tbkernels::flow_grpo_elem_loss): the step,
# the surrogate and d loss / d model_output in one pass.

ELEM_CLIP = 0.1


def elem_loss_inputs(shape, dtype, shared_map=False, seed=0):
    """Latents in `dtype`; coefs, kl_weight, old_log_prob [B, N], advantages and a map (with
    zeros; [1, N] when shared) in its accumulation dtype. old_log_prob puts each element's
    log-ratio inside the clip range, above or below it, but at least 0.01 from its edges, so
    float32 rounding of the log-prob (~1e-6 here) moves no element across the clip."""
    g = torch.Generator().manual_seed(seed)
    B, N = shape[0], math.prod(shape[1:])
    acc = flow_grpo._acc(dtype)
    v, x, ref, noise = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    s, sn = (t[:B] for t in sigmas(max(B, 1), seed=seed + 1))
    coefs = flow_grpo._coefficients(v.to(dtype), s.cpu(), sn.cpu(), "flow_grpo", 0.7, None,
                                    None)[0].cpu()
    cx, cv = coefs[:, 0].double(), coefs[:, 1].double()
    bshape = (B,) + (1,) * (len(shape) - 1)
    prev = cx.view(bshape) * x + cv.view(bshape) * v + 0.3 * noise
    ref = v + 0.05 * ref
    v, x, prev, ref = (t.to(dtype) for t in (v, x, prev, ref))
    logp64 = elem_logp64(v, x, prev, coefs)
    kind = torch.randint(0, 3, (B, N), generator=g)
    u = torch.rand(B, N, generator=g, dtype=torch.float64)
    # log(1.1) = 0.0953, log(0.9) = -0.1054
    delta = torch.where(kind == 0, -0.09 + 0.175 * u,
                        torch.where(kind == 1, 0.11 + 0.2 * u, -0.3 + 0.18 * u))
    old = (logp64 - delta).to(acc)
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 4
    adv[::3] = 0.0
    if B > 1:
        adv[1] = 9.0                                  # beyond the clamp
    amap = torch.rand(1 if shared_map else B, N, generator=g, dtype=torch.float64) * 2
    amap[:, 3::7] = 0.0
    # per-element KL weights scale as 1/N (a mean over the latent); 500/N makes the KL's share of
    # d loss / d v 10-100 % of the policy's here, so a lost KL term shows at any dtype
    kl_w = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5) * 500 / max(N, 1)
    return ([t.to(DEVICE) for t in (v, x, prev, ref)]
            + [t.to(acc).to(DEVICE) for t in (coefs, kl_w, old, adv, amap)])


def elem_logp64(v, x, prev, coefs):
    """The per-element log-prob [B, N] in float64 from the coefficient table (cx, cv, alpha,
    gamma): the step's formula, independent of every kernel."""
    c = coefs.double().cpu()
    rows = (v.shape[0], math.prod(v.shape[1:]))
    d = prev.double().cpu().reshape(rows) - (c[:, :1] * x.double().cpu().reshape(rows)
                                             + c[:, 1:2] * v.double().cpu().reshape(rows))
    return c[:, 2:3] * d * d + c[:, 3:4]


def elem_loss_by_autograd(v, x, prev, ref, coefs, kl_w, old, adv, amap, beta, simple):
    """Loss, metrics and d loss / d v in float64: the per-element log-prob, the plain-PyTorch
    surrogate with the map (_policy_loss) and the KL from sum (v - v_ref)^2, by autograd."""
    B = v.shape[0]
    vv = v.double().cpu().requires_grad_(True)
    c = coefs.double().cpu()
    d = (prev.double().cpu().reshape(B, -1)
         - (c[:, :1] * x.double().cpu().reshape(B, -1) + c[:, 1:2] * vv.reshape(B, -1)))
    logp = c[:, 2:3] * d * d + c[:, 3:4]
    ref_sq = None
    if ref is not None:
        ref_sq = ((vv - ref.double().cpu()) ** 2).reshape(B, -1).sum(1)
    loss, m = flow_grpo._policy_loss(logp, ref_sq, None if kl_w is None else kl_w.double().cpu(),
                                     old.double().cpu(), adv.double().cpu(), amap.double().cpu(),
                                     ELEM_CLIP, 5.0, beta, "simple" if simple else "clipped")
    (grad,) = torch.autograd.grad(loss, vv)
    metrics = torch.stack([m[k].double() for k in flow_grpo._METRICS])
    return loss.detach(), metrics.detach(), grad


def close_rel(got, exp, tol):
    """Max error relative to the largest magnitude of `exp` (gradients of a mean over millions
    of terms are ~1e-7: an absolute floor of 1 would make the check vacuous)."""
    err = (got.double().cpu() - exp.double().cpu()).abs().max().item()
    scale = exp.double().abs().max().item()
    assert err <= tol * scale, (err, scale, err / max(scale, 1e-300))


# The output's own rounding (grad_v is stored in the latent dtype) plus float32 accumulation.
ELEM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _elem_loss_op(backend):
    _available(backend)
    return flow_grpo._elem_loss_op(backend)


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 9), (2, 4, 3, 5, 7), (2, 3, 1, 150, 157)],
                         ids=["1x1", "image_odd", "video_odd", "2x70650"])
@pytest.mark.parametrize("shared_map", [False, True], ids=["map", "shared_map"])
@pytest.mark.parametrize("with_ref,beta,simple", [(True, 0.04, False), (True, 0.0, False),
                                                  (False, 0.0, False), (True, 0.04, True)])
def test_elem_loss_op_matches_autograd_of_the_formula(backend, dtype, shape, shared_map, with_ref,
                                                      beta, simple):
    """Loss, metrics and d loss / d model_output of the fused per-element op against float64
    autograd of the plain formula, every branch of the surrogate visited; 70650 elements per
    sample span several CPU tasks (32768 each) and GPU blocks with a ragged tail."""
    op = _elem_loss_op(backend)
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(shape, dtype, shared_map,
                                                                    seed=sum(shape))
    if not with_ref:
        ref = kl_w = None
    e_loss, e_metrics, e_grad = elem_loss_by_autograd(v, x, prev, ref, coefs, kl_w, old, adv,
                                                      amap, beta, simple)
    loss, metrics, grad = op(v, x, prev, ref, coefs, kl_w, old, adv, amap, ELEM_CLIP, 5.0, beta,
                             simple, True)
    acc = flow_grpo._acc(dtype)
    assert loss.dtype == metrics.dtype == acc and grad.dtype == dtype
    assert loss.shape == () and metrics.shape == (4,) and grad.shape == v.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    close_rel(loss, e_loss, tol)
    close_rel(metrics[[0, 3]], e_metrics[[0, 3]], tol)
    # clipfrac: the exact count ratio, rounded once to the accumulation dtype
    assert metrics[1].item() == torch.tensor(e_metrics[1].item(), dtype=acc).item()
    close_rel(metrics[2], e_metrics[2], tol)
    close_rel(grad, e_grad, ELEM_TOL[dtype])
    if math.prod(shape) >= 100 and not simple:
        assert 0 < metrics[1].item() < 1           # both sides of the clip were taken
    # without the gradient: the same loss and metrics, no latent-sized output
    loss2, metrics2, grad2 = op(v, x, prev, ref, coefs, kl_w, old, adv, amap, ELEM_CLIP, 5.0,
                                beta, simple, False)
    assert grad2.numel() == 0
    assert torch.equal(loss2, loss) and torch.equal(metrics2, metrics)


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_elem_loss_op_empty(backend):
    """No samples or no elements: NaN loss and metrics (means of nothing, as PyTorch's), an
    empty gradient, no error."""
    op = _elem_loss_op(backend)
    for shape in ((0, 3, 4, 5), (2, 0, 4, 5)):
        v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(shape, torch.float32)
        loss, metrics, grad = op(v, x, prev, ref, coefs, kl_w, old, adv, amap, 0.1, 5.0, 0.04,
                                 False, True)
        assert grad.shape == v.shape
        assert torch.isnan(loss) and torch.isnan(metrics[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_elem_loss_op_rejects_bad_input(backend):
    op = _elem_loss_op(backend)
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs((3, 2, 4, 5), torch.float32)
    bad = [
        ((v, x, prev, ref, coefs, None, old, adv, amap), "go together"),
        ((v, x[:2], prev, ref, coefs, kl_w, old, adv, amap), "sample"),
        ((v, x, prev.double(), ref, coefs, kl_w, old, adv, amap), "prev_sample"),
        ((v, x, prev, ref, coefs[:2], kl_w, old, adv, amap), "coefs"),
        ((v, x, prev, ref, coefs, kl_w, old[:, :4], adv, amap), "old_log_prob must be a"),
        ((v, x, prev, ref, coefs, kl_w, old, adv[:2], amap), "advantages must be a contiguous"),
        ((v, x, prev, ref, coefs, kl_w, old, adv, amap[:2]), "advantage_map must be a"),
        ((v, x, prev, ref, coefs, kl_w, old, adv, amap.double()),
         "advantage_map must be a"),
        ((v, x, prev, ref, coefs, kl_w, old, adv, amap.t().contiguous().t()),
         "advantage_map must be a"),
        ((v.transpose(2, 3), x, prev, ref, coefs, kl_w, old, adv, amap), "contiguous|sample"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            op(*args, 0.1, 5.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match="must be > 0"):
        op(v, x, prev, ref, coefs, kl_w, old, adv, amap, 0.0, 5.0, 0.0, False, True)


def test_elem_loss_op_passes_opcheck():
    """Schema, fake (meta) kernel and torch.compile of the C++ op."""
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    v, x, prev, ref, coefs, kl_w, old, adv, amap = (
        t.cpu() for t in elem_loss_inputs((2, 3, 4, 5), torch.float32))
    v_s, prev_s = (torch.stack([t, torch.zeros_like(t)], dim=1)[:, 0] for t in (v, prev))
    for with_ref in (True, False):
        for write_grad in (True, False):
            for vv, pp in ((v, prev), (v_s, prev_s)):         # contiguous, trajectory slices
                torch.library.opcheck(
                    torch.ops.tbkernels.flow_grpo_elem_loss.default,
                    (vv, x, pp, ref if with_ref else None, coefs, kl_w if with_ref else None,
                     old, adv, amap, 0.1, 5.0, 0.2, False, write_grad))


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_elem_loss_retain_graph_and_no_grad(backend):
    """flow_grpo_loss with a per-element map: a second backward through a retained graph gives
    the same gradient again (the first backward hands its buffer to autograd, the second
    recomputes it), and under no_grad (or a model_output without grad) the op writes no
    gradient yet returns the same loss and metrics."""
    _available(backend)
    shape = (2, 3, 2, 4, 5)
    v, x, ref, noise = latents(shape, seed=37)
    prev = (x + 0.1 * noise).contiguous()
    with torch.no_grad():
        old = tbkernels.sde_step_with_logprob(v + 0.05 * ref, 0.9, 0.8, x, prev,
                                              logprob_reduction="none", backend="reference")[1]
    amap = torch.rand(shape, generator=torch.Generator().manual_seed(38),
                      dtype=torch.float64).to(DEVICE)
    adv = torch.tensor([1.5, -0.7], dtype=torch.float64, device=DEVICE)
    kw = dict(ref_model_output=ref, beta=0.3, advantage_map=amap, clip_range=0.01,
              backend=backend)
    vv = v.clone().requires_grad_(True)
    loss, m = tbkernels.flow_grpo_loss(vv, x, prev, 0.9, 0.8, old, adv, **kw)
    (loss * 2.0).backward(retain_graph=True)
    g1 = vv.grad.clone()
    vv.grad = None
    (loss * 3.0).backward()
    close_rel(vv.grad, g1 * 1.5, 1e-12)
    with torch.no_grad():
        loss_ng, m_ng = tbkernels.flow_grpo_loss(vv, x, prev, 0.9, 0.8, old, adv, **kw)
    assert not loss_ng.requires_grad
    assert torch.equal(loss_ng, loss.detach())
    for key in flow_grpo._METRICS:
        assert torch.equal(m_ng[key], m[key])


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_metric_only_reference_is_not_read_in_backward(backend):
    """A reference given for the KL metric only (beta = 0): the loss path's backward gets no
    ref_model_output, so it streams two latents fewer; the gradient is unchanged (float64
    reference). With beta != 0 the reference is read."""
    _available(backend)
    from torch.utils._python_dispatch import TorchDispatchMode

    class BackwardArgs(TorchDispatchMode):
        refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("flow_step_backward", "flow_step_backward_triton"):
                self.refs.append(args[3])
            return func(*args, **(kwargs or {}))

    shape = (3, 4, 2, 5, 6)
    v, x, prev, ref = latents(shape, seed=31)
    s, sn = sigmas(3)
    old = torch.full((3,), -1.0, dtype=torch.float64, device=DEVICE)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=DEVICE)
    for beta in (0.0, 0.3):
        grads = []
        for b in ("reference", backend):
            vv = v.clone().requires_grad_(True)
            loss, m = tbkernels.flow_grpo_loss(vv, x, prev, s.cpu(), sn.cpu(), old, adv,
                                               ref_model_output=ref, beta=beta, clip_range=0.05,
                                               backend=b)
            rec = BackwardArgs()
            rec.refs = []
            with rec:
                loss.backward()
            grads.append((vv.grad, m["kl"]))
        close(grads[1][0], grads[0][0], 1e-10)
        close(grads[1][1], grads[0][1], 1e-10)
        assert grads[1][1].item() > 0                  # the KL metric is still computed
        assert len(rec.refs) == 1 and (rec.refs[0] is None) == (beta == 0), rec.refs


@pytest.mark.parametrize("map_kind", ["position", "element"])
def test_bench_map_variants_compute_the_same_loss(map_kind):
    """bench_flow_grpo.py --map: its eager ViPO code (Flow-GRPO's math with per-position ratios)
    and the tbkernels calls compute the same loss and gradient on the benchmark's inputs, so the
    timings compare like with like; the inputs' ratios straddle the clip range."""
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    bench = _load_flow_bench()
    d = bench.add_map_inputs(bench.make_inputs((2, 16, 3, 12, 20), torch.float32,
                                               torch.device("cpu")), map_kind)
    out = []
    for name, fn in bench.variants(torch.device("cpu"), map_kind).items():
        if fn is None or name == "tbkernels_triton":
            continue
        vv = d["v"].clone().requires_grad_(True)
        loss = fn(vv, d)
        loss.backward()
        out.append((name, loss.detach(), vv.grad))
    assert {n for n, _, _ in out} >= {"eager", "tbkernels_cpu"}
    (_, l0, g0) = out[0]
    for name, l1, g1 in out[1:]:
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-9, msg=name)
        # float32 log-probs rounded differently put a position or two on the other side of the
        # 1e-4 clip range (its gradient then switches between 0 and A*M*r): a wrong formula
        # would differ almost everywhere
        off = ~torch.isclose(g1, g0, rtol=1e-4, atol=1e-4 * g0.abs().max().item())
        assert off.float().mean().item() < 0.01, (name, off.float().mean().item())
    _, m = tbkernels.flow_grpo_loss(d["v"], d["x"], d["prev"], d["sigma_host"],
                                    d["sigma_next_host"], d["old_map"], d["adv"],
                                    advantage_map=d["amap"], clip_range=bench.CLIP)
    assert 0.05 < m["clipfrac"].item() < 0.95, m["clipfrac"]


@pytest.mark.parametrize("latent_dtype", [None, torch.float32], ids=["bf16", "mixed"])
def test_bench_bytes_model_counts_the_fused_path_traffic(latent_dtype):
    """bench_flow_grpo.py's bytes model (the bandwidth rows): per element, the fused op's one
    pass reads the bench's four latents, old_log_prob and map and writes the gradient, then the
    backward scales it; per position the [B, positions] log-prob adds its traffic; counted here
    from the bench's own input tensors, also for --mixed (float32 sample/prev_sample beside a
    bf16 model_output, reference and gradient)."""
    bench = _load_flow_bench()
    shape = (2, 16, 3, 12, 20)
    d = bench.make_inputs(shape, torch.bfloat16, torch.device("meta"), latent_dtype=latent_dtype)
    assert d["x"].dtype == d["prev"].dtype == (latent_dtype or torch.bfloat16)
    assert d["v"].dtype == d["ref"].dtype == torch.bfloat16
    latent_elt = None if latent_dtype is None else 4
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    latents = sum(nb(d[k]) for k in ("v", "x", "prev", "ref"))
    grad = nb(d["v"])
    assert bench.fused_bytes_moved(shape, 2, None, latent_elt) == {
        "forward": latents, "backward": latents + grad, "forward_backward": 2 * latents + grad}
    e = bench.add_map_inputs(dict(d), "element")
    model = bench.fused_bytes_moved(shape, 2, "element", latent_elt)
    assert model["forward"] == latents + nb(e["old_map"]) + nb(e["amap"]) + grad
    assert model["backward"] == 2 * grad
    p = bench.add_map_inputs(dict(d), "position")
    logp = nb(p["old_map"])                                   # [B, positions] float32
    model = bench.fused_bytes_moved(shape, 2, "position", latent_elt)
    assert model["forward"] == latents + logp + (3 * logp + logp)   # write; read 3, overwrite
    assert model["backward"] == latents + logp + grad + 2 * grad
    assert model["forward_backward"] == model["forward"] + model["backward"]


def test_host_overhead_counts():
    """bench_flow_grpo.py --host counts the launching ops of a forward+backward on a meta stand-in
    for a GPU: tbkernels launches fewer than Flow-GRPO's eager code, and host sigmas fewer than
    device sigmas (the coefficient table stays on the host)."""
    bench = _load_flow_bench()
    d = bench.make_inputs((2, 16, 3, 12, 20), torch.bfloat16, torch.device("meta"))
    eager = bench.device_ops(bench.eager_loss, d)
    host = bench.device_ops(bench.tbk_loss("cpu"), d)
    device = bench.device_ops(bench.tbk_loss("cpu", sigmas="device"), d)
    assert sum(host) < sum(eager), (host, eager)
    assert host[0] + 20 < device[0] and host[1] == device[1], (host, device)
    # forward: the fused step and the [B] epilogue; backward: the implicit ones_like of
    # loss.backward(), one multiply (both per-sample gradients) and the step's backward
    assert host == (2, 3), host
    # with a per-position map: the step and the map surrogate; backward: ones_like, the step's
    # backward and the scaling by the incoming gradient, whatever B (the per-sample slab loop
    # this replaced issued 233 ops per forward at Wan 480p B = 8, per position)
    dm = bench.add_map_inputs(dict(d), "position")
    assert bench.device_ops(bench.tbk_loss("cpu", map_kind="position"), dm) == (2, 3)
    # per element: one op that also writes the gradient; backward: ones_like and the scaling
    dm = bench.add_map_inputs(dict(d), "element")
    assert bench.device_ops(bench.tbk_loss("cpu", map_kind="element"), dm) == (1, 2)


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
def test_fused_loss_under_autocast(backend):
    """Flow-GRPO computes the loss inside the training step's autocast region: the model's bf16
    velocity meets float32 stored latents. The fused path gives the reference backend's loss
    and parameter gradient under the same autocast (same bf16 inputs, float32 accumulation)."""
    _available(backend)
    g = torch.Generator().manual_seed(34)
    shape = (2, 4, 2, 5, 6)
    h, x, noise, dref = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(4))
    prev, ref = x + 0.05 * noise, h + 0.01 * dref
    old = torch.full((2,), -1.0, device=DEVICE)
    adv = torch.tensor([1.0, -1.0], device=DEVICE)
    layer = torch.nn.Linear(6, 6).to(DEVICE)
    results = []
    for b in ("reference", backend):
        layer.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            v = layer(h)
            loss, _ = tbkernels.flow_grpo_loss(v, x, prev, 0.9, 0.8, old, adv,
                                               ref_model_output=ref, beta=0.04, clip_range=0.2,
                                               backend=b)
        assert v.dtype == torch.bfloat16 and loss.dtype == torch.float32
        loss.backward()
        results.append((loss.detach(), layer.weight.grad.clone()))
    close(results[1][0], results[0][0], 1e-6)
    close(results[1][1], results[0][1], 1e-5)


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
@pytest.mark.parametrize("map_kind", ["position", "element"])
@pytest.mark.parametrize("map_broadcast", ["none", "batch", "inner"])
@pytest.mark.parametrize("vipo_form", ["clipped", "simple"])
def test_map_loss_matches_reference(backend, map_kind, map_broadcast, vipo_form):
    """flow_grpo_loss with a ViPO map through the fused map surrogate: loss, metrics and gradient
    match the reference backend's whole-tensor PyTorch in float64, with beta != 0 and an
    incoming gradient other than 1, for a map of the log-prob's shape, one shared by the batch
    ([1, ...], read in place) and one broadcast inside a sample (materialised)."""
    _available(backend)
    shape = (3, 4, 2, 5, 7)
    v, x, ref, noise = latents(shape, seed=35)
    s, sn = sigmas(3)
    prev = (x + 0.1 * noise).contiguous()
    reduction = "channel_sum" if map_kind == "position" else "none"
    with torch.no_grad():
        old = tbkernels.sde_step_with_logprob(v + 0.05 * ref, s, sn, x, prev,
                                              logprob_reduction=reduction,
                                              backend="reference")[1]
    g = torch.Generator().manual_seed(36)
    amap_shape = list(old.shape)
    if map_broadcast == "batch":
        amap_shape[0] = 1
    elif map_broadcast == "inner":
        amap_shape[-2:] = [1, 1]
    amap = torch.rand(amap_shape, generator=g, dtype=torch.float64).to(DEVICE)
    adv = torch.tensor([1.5, -0.7, 7.0], dtype=torch.float64, device=DEVICE)
    results = []
    for b in ("reference", backend):
        vv = v.clone().requires_grad_(True)
        loss, m = tbkernels.flow_grpo_loss(vv, x, prev, s.cpu(), sn.cpu(), old, adv,
                                           ref_model_output=ref, beta=0.3, advantage_map=amap,
                                           clip_range=0.01, vipo_form=vipo_form, backend=b)
        (loss * 3.0).backward()                  # an incoming gradient other than 1
        results.append((loss.detach(), m, vv.grad))
    (l0, m0, g0), (l1, m1, g1) = results
    close(l1, l0, 1e-12)
    close(g1, g0, 1e-12)
    for key in flow_grpo._METRICS:
        close(m1[key], m0[key], 1e-12)
    assert 0 < m1["clipfrac"].item() < 1


def test_map_loss_memory_at_wan_size():
    """Peak tensor bytes of a forward+backward with a ViPO map on the meta device at Wan 480p,
    B = 8, bf16: per position the gradient plus one [B, positions] float32 buffer (1/8 latent);
    per element the gradient alone (the fused op keeps no log-prob; the unfused one kept 2
    latents of it, and the whole-tensor formula took 20 latents)."""
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    shape = (8, 16, 21, 60, 104)
    meta = torch.device("meta")
    lat = lambda: torch.empty(shape, dtype=torch.bfloat16, device=meta)  # noqa: E731
    v, x, prev, ref = lat().requires_grad_(True), lat(), lat(), lat()
    latent = math.prod(shape) * 2
    for per_position in (True, False):
        map_shape = (8,) + shape[2:] if per_position else shape
        old, amap = (torch.empty(map_shape, device=meta) for _ in range(2))
        adv = torch.empty(8, device=meta)

        def step():
            v.grad = None
            loss, _ = tbkernels.flow_grpo_loss(v, x, prev, 0.9, 0.8, old, adv,
                                               ref_model_output=ref, beta=0.04,
                                               advantage_map=amap, backend="cpu")
            loss.backward()
        step()
        with tbkernels.memory.peak_tensor_memory() as tm:
            step()
        buffer = math.prod(map_shape) * 4 if per_position else 0
        assert tm.peak_bytes <= latent + buffer + 2**20, (per_position, tm.peak_bytes / latent)


class _SimulatedGPU:
    """A stand-in for torch.cuda with one stream: the host's clock advances by what it spends
    issuing work, the device runs the queue in order, each item starting when both the device
    is free and the host has issued it. Times in seconds; one sleep cycle is 1 ns."""

    def __init__(self, host_per_call, device_per_call):
        self.host = self.device_free = 0.0
        self.host_per_call, self.device_per_call = host_per_call, device_per_call
        self.sleeps = []
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = gpu._enqueue(0.0)

            def query(self):
                return self.t <= gpu.host

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3
        self.Event = Event

    def _enqueue(self, seconds):
        self.device_free = max(self.device_free, self.host) + seconds
        return self.device_free

    def _sleep(self, cycles):
        self.sleeps.append(cycles)
        self._enqueue(cycles * 1e-9)

    def synchronize(self):
        self.host = max(self.host, self.device_free)

    def call(self):
        self.host += self.host_per_call
        self._enqueue(self.device_per_call)


def test_host_ahead_timing_measures_device_time_not_issue_time():
    """bench_flow_grpo's GPU device timing: with the host slower to issue a step (300 us) than
    the device to run it (100 us), per-step events would report the issue time; behind a long
    enough sleep the events see the device time. A sleep too short for the queueing is detected
    and lengthened; a host that never gets ahead is an error, not a number."""
    bench = _load_flow_bench()
    gpu = _SimulatedGPU(host_per_call=300e-6, device_per_call=100e-6)
    seconds = bench.time_host_ahead(gpu.call, reps=50, cycles=1_000_000, cuda=gpu)
    assert seconds == pytest.approx(100e-6, rel=1e-9)
    # 50 calls take 15 ms to issue: 1 ms and 4 ms of sleep were too short, 16 ms was enough
    assert gpu.sleeps[:3] == [1_000_000, 4_000_000, 16_000_000], gpu.sleeps
    gpu = _SimulatedGPU(host_per_call=1.0, device_per_call=100e-6)
    with pytest.raises(bench.HostNotAhead):
        bench.time_host_ahead(gpu.call, reps=50, cycles=1_000_000, cuda=gpu)


def test_device_only_rows(capsys):
    """bench_flow_grpo's device-time section end to end on the CPU: the real eager and tbkernels
    loss steps run (forward+backward), a simulated stream supplies each variant's device time
    (eager 1 ms, tbkernels 0.1 ms, both slower to issue than to run), and the rows and
    speedups come out of the device times, not the issue times."""
    bench = _load_flow_bench()
    from results import Recorder
    d = bench.make_inputs((2, 16, 1, 4, 6), torch.float32, torch.device("cpu"))
    gpu = _SimulatedGPU(host_per_call=3e-3, device_per_call=0.0)

    def on_gpu(fn, device_seconds):
        def run(vv, dd):
            gpu.host += gpu.host_per_call
            gpu._enqueue(device_seconds)
            return fn(vv, dd)
        return run
    fns = {"eager": on_gpu(bench.eager_loss, 1e-3),
           "tbkernels_cpu": on_gpu(bench.tbk_loss("cpu"), 1e-4)}
    rec = Recorder(enabled=True, device="sim", commit="x", command="test")
    bench.device_only(fns, d, 5, bw=1e12, nbytes=1e8, shape_s="s", dtype_s="float32",
                      recorder=rec, cuda=gpu)
    rows = {(r["backend"], r["metric"]): float(r["value"]) for r in rec.rows}
    assert rows[("eager", "median_us")] == pytest.approx(1000.0)
    assert rows[("tbkernels_cpu", "median_us")] == pytest.approx(100.0)
    assert rows[("tbkernels_cpu", "achieved_gb_per_s")] == pytest.approx(1000.0)
    assert rows[("tbkernels_cpu", "fraction_of_copy_bw")] == pytest.approx(1.0)
    assert rows[("tbkernels_cpu", "speedup_vs_eager")] == pytest.approx(10.0)
    assert {r["op"] for r in rec.rows} == {"flow_grpo_loss.forward_backward_device"}
    assert "speedup vs eager: 10.00x" in capsys.readouterr().out


def test_host_sigmas_put_no_coefficient_work_on_the_latent_device():
    """Sigmas given as numbers or CPU tensors: the checks and the coefficient table run on the
    host and reach the device as one copy each (coefficients, std_dev_t, the KL weight), and the
    whole forward is then the step's op and the surrogate epilogue's, so a GPU step does not
    launch ~40 tiny kernels nor sync three times before its kernel; noise levels seen before
    cost no copy at all (cached). Meta latents stand in for a GPU here: every op touching them
    is recorded. Sigmas on the device keep the device path."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class DeviceOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.device.type == "meta"
                   for t in tree_flatten((args, kwargs, out))[0]):
                self.ops.append(func.__name__.split(".")[0])
            return out

    shape = (2, 4, 3, 4, 6)
    lat = lambda: torch.empty(shape, device="meta", dtype=torch.bfloat16)  # noqa: E731
    v, x, prev, ref = lat().requires_grad_(True), lat(), lat(), lat()
    old, adv = torch.empty(2, device="meta"), torch.empty(2, device="meta")
    free = {"detach", "view", "expand", "select", "empty", "_to_copy"}     # no arithmetic
    flow_grpo._COEF_CACHE.clear()
    for sigma, sigma_next, host, copies in [
            (0.8, 0.7, True, 3),              # computed, copied (table, std, KL weight)
            (torch.tensor([0.8, 0.8], dtype=torch.float64),                 # the same values:
             torch.tensor([0.7, 0.7], dtype=torch.float64), True, 0),   # cached
            (torch.tensor([0.8, 0.9]), torch.tensor([0.7, 0.6]), True, 3),
            (torch.tensor([0.8, 0.9], device="meta"), torch.tensor([0.7, 0.6], device="meta"),
             False, None)]:
        rec = DeviceOps()
        with rec:
            tbkernels.flow_grpo_loss(v, x, prev, sigma, sigma_next, old, adv,
                                     ref_model_output=ref, beta=0.04, backend="cpu")
        before = rec.ops[:rec.ops.index("flow_step_forward")]
        arithmetic = [op for op in before if op not in free]
        if host:
            assert arithmetic == [] and before.count("_to_copy") == copies, before
            after = rec.ops[rec.ops.index("flow_step_forward"):]
            assert after == ["flow_step_forward", "flow_grpo_surrogate", "unbind"], after
        else:
            assert len(arithmetic) > 20, before       # the table computed on the device
    # the host path still checks its sigmas, every time (a failed check caches nothing)
    for _ in range(2):
        with pytest.raises(ValueError, match="sigma_next must be < sigma"):
            tbkernels.flow_grpo_loss(v, x, prev, 0.5, 0.6, old, adv, backend="cpu")


def test_cached_coefficient_tables_are_keyed_and_never_handed_out():
    """The host-sigma cache is keyed by everything the table depends on, and the std_dev_t that
    sde_step_with_logprob returns is a fresh tensor: writing into it changes no later call."""
    flow_grpo._COEF_CACHE.clear()
    lat = lambda dt: torch.zeros((2, 4, 3, 4, 6), device="meta", dtype=dt)  # noqa: E731
    base = flow_grpo._coefficients(lat(torch.bfloat16), 0.8, 0.7, "flow_grpo", 0.7, None, None)
    twice = torch.tensor([0.8, 0.8], dtype=torch.float64)       # the same values, per sample
    again = flow_grpo._coefficients(lat(torch.bfloat16), twice, 0.7, "flow_grpo", 0.7, None, None)
    assert again[0] is base[0]                                   # the same entry
    for other in [dict(sigma=0.9), dict(noise_level=0.5), dict(sde_type="dance_grpo"),
                  dict(dtype=torch.float64)]:
        args = dict(dtype=torch.bfloat16, sigma=0.8, noise_level=0.7, sde_type="flow_grpo")
        args.update(other)
        got = flow_grpo._coefficients(lat(args["dtype"]), args["sigma"], 0.7, args["sde_type"],
                                      args["noise_level"], None, None)
        assert got[0] is not base[0], other
    # values: the cached table equals a freshly computed CPU one
    cpu = flow_grpo._coefficients(torch.zeros(2, 4, 3, 4, 6, dtype=torch.bfloat16), 0.8, 0.7,
                                  "flow_grpo", 0.7, None, None)
    assert cpu[0].dtype == base[0].dtype and cpu[0].shape == base[0].shape
    # sde_step_with_logprob on float64 latents (whose std_dev_t needs no cast) hits the cached
    # entry, and returns its own std_dev_t storage, not the cached one
    f64 = flow_grpo._coefficients(lat(torch.float64), 0.8, 0.7, "flow_grpo", 0.7, None, None)
    *_, std = tbkernels.sde_step_with_logprob(lat(torch.float64), 0.8, 0.7, lat(torch.float64),
                                              lat(torch.float64), backend="cpu")
    assert std.untyped_storage()._cdata != f64[1].untyped_storage()._cdata


def test_coefficient_cache_is_per_cuda_stream(monkeypatch):
    """A table copied to the device on one CUDA stream is not handed to an eager call on another
    (its asynchronous copy may still be queued there): each stream gets its own entry. A call
    capturing a CUDA graph (on the capture's own stream) takes an entry made before the capture
    instead of capturing a copy from a pinned host buffer. Streams and capture are simulated
    (meta latents stand in for the device; no GPU here)."""
    assert flow_grpo._stream_state(torch.device("cpu")) == (None, False)   # CPU / meta
    state = [("s1", False)]
    monkeypatch.setattr(flow_grpo, "_stream_state", lambda device: state[0])
    flow_grpo._COEF_CACHE.clear()
    lat = torch.zeros((2, 4, 3, 4, 6), device="meta")

    def table(stream, capturing=False, sigma=0.8):
        state[0] = (stream, capturing)
        return flow_grpo._coefficients(lat, sigma, 0.7, "flow_grpo", 0.7, None, None)[0]

    s1 = table("s1")
    s2 = table("s2")
    assert s2 is not s1                                   # another stream: its own copy
    assert table("s1") is s1 and table("s2") is s2        # each hits its own entry
    assert table("graph", capturing=True) is s1           # capture: an entry made before it
    assert table("s3") is not s1                          # eager on a new stream: a new entry
    fresh = table("graph", capturing=True, sigma=0.9)     # nothing made before: computed
    assert fresh is not s1 and table("graph", capturing=True, sigma=0.9) is fresh


def test_kl_weight_is_the_kl_formula_and_memoized_with_the_table():
    """kl = ref_sq * w with w = cv^2 / (2 numel s^2) (s: std_dev_t for kl_form "flow_grpo", the
    transition std for "exact"); a cached table keeps its w, so a revisited noise level
    launches nothing for the KL weight either."""
    from tbkernels.ops._flow_grpo_coefs import step_coefficients
    lat = torch.zeros(2, 4, 3, 4, 6)
    coefs, std, memo = flow_grpo._coefficients(lat, 0.8, 0.7, "flow_grpo", 0.7, None, None)
    table, sig_t = step_coefficients(torch.full((2,), 0.8, dtype=torch.float64),
                                     torch.full((2,), 0.7, dtype=torch.float64), "flow_grpo", 0.7)
    for kl_form, s in (("flow_grpo", sig_t), ("exact", table[:, 4])):
        w = flow_grpo._kl_weight(coefs, std, kl_form, 96, torch.float32, memo)
        expected = table[:, 1] ** 2 / (2 * 96 * s ** 2)
        torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
        assert flow_grpo._kl_weight(coefs, std, kl_form, 96, torch.float32, memo) is w
    flow_grpo._COEF_CACHE.clear()
    meta = torch.zeros(2, 4, 3, 4, 6, device="meta")
    first = flow_grpo._coefficients(meta, 0.8, 0.7, "flow_grpo", 0.7, None, None)
    w = flow_grpo._kl_weight(*first[:2], "flow_grpo", 96, torch.float32, first[2])
    again = flow_grpo._coefficients(meta, 0.8, 0.7, "flow_grpo", 0.7, None, None)
    assert flow_grpo._kl_weight(*again[:2], "flow_grpo", 96, torch.float32, again[2]) is w


# ---------------------------------------------------------------------------------------------
# Rollouts under torch.inference_mode(), and double backward.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("map_kind", [None, "position", "element"])
def test_rollout_under_inference_mode_then_train(backend, map_kind):
    """The usual loop: the rollout samples under torch.inference_mode() (which also builds the
    cached coefficient table of its noise levels), then training at the same noise levels is
    given those inference tensors (latents, old log-prob, reference, advantages, map) directly.
    The loss and the gradient equal those of the same values as ordinary tensors, bit for bit,
    and a differentiable step on an inference-mode sample works too."""
    _available(backend)
    flow_grpo._COEF_CACHE.clear()
    shape = (2, 4, 3, 6, 5)
    v, x, noise, _ = latents(shape, seed=71)
    reduction = {None: "mean", "position": "channel_sum", "element": "none"}[map_kind]
    with torch.inference_mode():
        x_inf = x.clone()
        prev, old, _, _ = tbkernels.sde_step_with_logprob(
            v + 0.05 * noise, 0.61, 0.53, x_inf, logprob_reduction=reduction, backend=backend,
            generator=torch.Generator(DEVICE).manual_seed(3))
        ref = v + 0.01 * noise
        adv = torch.tensor([1.2, -0.8], dtype=torch.float64, device=DEVICE)
        amap = None if map_kind is None else torch.rand_like(old)
    assert prev.is_inference() and old.is_inference()
    grads, losses = [], []
    for inference in (True, False):
        args = (x_inf, prev, old, adv, ref, amap)
        if not inference:
            args = tuple(None if t is None else t.clone() for t in args)
        xs, ps, olds, advs, refs, amaps = args
        vv = v.clone().requires_grad_(True)
        loss, _ = tbkernels.flow_grpo_loss(vv, xs, ps, 0.61, 0.53, olds, advs,
                                           ref_model_output=refs, beta=0.2, clip_range=0.3,
                                           advantage_map=amaps, backend=backend)
        loss.backward()
        grads.append(vv.grad)
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    vv = v.clone().requires_grad_(True)
    lp = tbkernels.sde_step_with_logprob(vv, 0.61, 0.53, x_inf, prev, backend=backend)[1]
    lp.sum().backward()
    assert vv.grad is not None and bool(torch.isfinite(vv.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_by_the_kernels(backend):
    """A backward with create_graph=True (a gradient penalty, a Hessian-vector product): the
    reference backend differentiates twice; the kernel backends have no second derivative and
    say so, rather than returning a gradient whose graph is missing (a penalty on it would
    silently be zero)."""
    _available(backend)
    shape = (2, 3, 2, 4, 5)
    v, x, prev, ref = latents(shape, seed=73)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64, device=DEVICE)
    cases = {}
    for map_kind in (None, "position", "element"):
        amap = (None if map_kind is None else
                torch.rand(shape if map_kind == "element" else (2, 2, 4, 5),
                           dtype=torch.float64, device=DEVICE))
        old = torch.zeros((2,) if amap is None else amap.shape, dtype=torch.float64,
                          device=DEVICE)
        cases[f"loss_{map_kind}"] = lambda vv, amap=amap, old=old: tbkernels.flow_grpo_loss(
            vv, x, prev, 0.9, 0.8, old, adv, ref_model_output=ref, beta=0.1, clip_range=0.5,
            advantage_map=amap, backend=backend)[0]
    cases["step"] = lambda vv: tbkernels.sde_step_with_logprob(
        vv, 0.9, 0.8, x, prev, logprob_reduction="none", backend=backend)[1].sum()
    for name, fn in cases.items():
        vv = v.clone().requires_grad_(True)
        out = fn(vv)
        if backend == "reference":
            (g,) = torch.autograd.grad(out, vv, create_graph=True)
            (gg,) = torch.autograd.grad((g * g).sum(), vv)
            assert gg.abs().sum() > 0, name
        else:
            with pytest.raises(RuntimeError, match="no second derivative"):
                torch.autograd.grad(out, vv, create_graph=True)
            (g,) = torch.autograd.grad(fn(vv), vv)       # first order unaffected
            assert bool(torch.isfinite(g).all()), name


@pytest.mark.parametrize("backend", SURROGATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["per_sample", "shared", "trajectory"])
def test_elem_loss_reads_reduced_precision_old_log_prob_and_map(backend, dtype, layout):
    """A per-element old_log_prob and map stored in bfloat16 / float16 beside float32 latents:
    the fused per-element loss reads them as stored (widened per element) instead of making
    float32 copies, each a latent-sized temporary. The loss, metrics and gradient equal those of
    the same values given in float32, bit for bit, and the step's only latent-sized tensor is
    the gradient (also for a batch-shared map and for [:, j] trajectory slices)."""
    _available(backend)
    shape = (2, 16, 3, 6, 10)
    v, x, noise, ref = latents(shape, torch.float32, seed=91)
    prev = (x + 0.1 * noise).contiguous()
    with torch.no_grad():
        old = tbkernels.sde_step_with_logprob(v + 0.01 * ref, 0.8, 0.7, x, prev,
                                              logprob_reduction="none", backend="reference")[1]
    g = torch.Generator().manual_seed(92)
    old = (old + 1e-3 * torch.randn(shape, generator=g).to(DEVICE)).to(dtype)
    amap = torch.rand((1,) + shape[1:] if layout == "shared" else shape,
                      generator=g).to(DEVICE, dtype)
    if layout == "trajectory":                         # step 2 of 4 stored steps
        old = torch.stack([old] * 4, dim=1)[:, 2]
        amap = torch.stack([amap] * 4, dim=1)[:, 2]
    adv = torch.tensor([1.3, -0.6], device=DEVICE)
    kw = dict(ref_model_output=ref, beta=0.1, clip_range=1e-2, backend=backend)
    results = []
    for o, m in ((old, amap), (old.float(), amap.float())):
        vv = v.clone().requires_grad_(True)
        loss, metrics = tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, o, adv,
                                                 advantage_map=m, **kw)
        loss.backward()
        results.append((loss.detach(), torch.stack(list(metrics.values())), vv.grad))
    for got, exp in zip(*results):
        assert torch.equal(got, exp)
    if backend in flow_grpo._REDUCED_ROW_BACKENDS:
        vv = v.clone().requires_grad_(True)
        with tbkernels.memory.peak_tensor_memory() as tm:
            tbkernels.flow_grpo_loss(vv, x, prev, 0.8, 0.7, old, adv, advantage_map=amap,
                                     **kw)[0].backward()
        assert tm.peak_bytes <= v.numel() * 4 + 4096, tm
