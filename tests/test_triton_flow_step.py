"""Triton backend of the flow-matching GRPO step (kernels/flow_step.py) against the reference.

``flow_step_forward_triton`` / ``flow_step_backward_triton`` are called directly and compared
with ``_forward_reference`` of ``tbkernels.ops.flow_grpo`` (and, for the backward, with autograd
through it): float64 to rounding, float32/bfloat16/float16 under the numerics rule (error vs
float64 at most 2x that of eager PyTorch computing in that dtype, plus one output ulp).

The kernels run under the Triton interpreter (pytest with TRITON_INTERPRET=1 in the environment;
it has to be set before triton is imported, so this file does not set it) on CPU tensors, or
natively on CUDA tensors when a GPU is present.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import pathlib
import sys
import time

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported ({exc!r})", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not HAS_CUDA:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton is "
                "imported", allow_module_level=True)

import tbkernels  # noqa: E402
from tbkernels.ops import flow_grpo  # noqa: E402
from tbkernels.ops._flow_grpo_coefs import step_coefficients  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_by_path(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


try:
    from tbkernels.kernels import flow_step as fs
except Exception:  # package installed without the kernels subpackage
    fs = _load_by_path("_tbkernels_triton_flow_step", ROOT / "kernels" / "flow_step.py")

forward = fs.flow_step_forward_triton
backward = fs.flow_step_backward_triton
reference = flow_grpo._forward_reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = {"video_odd": (3, 5, 3, 7, 9), "image_odd": (2, 3, 11, 13), "b1": (1, 4, 2, 5, 6)}
# (sampling, prev_or_noise given, ref given, write_mean)
MODES = {
    "train": (False, True, True, False),        # flow_grpo_loss with a reference policy
    "train_mean": (False, True, False, True),
    "no_prev": (False, False, True, False),     # prev defaults to the mean: d = 0
    "sample": (True, True, False, True),        # sde_step_with_logprob sampling
    "sample_ref": (True, True, True, False),
    "ode": (True, False, False, True),          # deterministic sampling: prev = mean
}

# Worst error vs float64 per (dtype, output), printed at the end of the module (visible with -s).
MAX_ERR: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if MAX_ERR:
        print("\nmax |triton - float64| (and of eager PyTorch computing in that dtype):")
        for k, (err, eager) in sorted(MAX_ERR.items()):
            print(f"  {k}: {err:.3g} (eager {eager:.3g})")


def _record(key, err, eager):
    old = MAX_ERR.get(key, (0.0, 0.0))
    MAX_ERR[key] = (max(old[0], err), max(old[1], eager))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_coefs(batch, dtype, seed=1, sde_type="flow_grpo"):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(batch, generator=g, dtype=torch.float64) * 0.8 + 0.15
    s[:1] = 1.0                                                     # the first step
    coefs, _ = step_coefficients(s, s - 0.07, sde_type, 0.7)
    return coefs.to(acc_of(dtype)).contiguous().to(DEVICE)


def make_inputs(shape, dtype, seed=0):
    """v, x, noise, ref in dtype; prev = a plausible stored sample (mean + s * noise)."""
    g = torch.Generator().manual_seed(seed)
    v, x, noise, dref = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    coefs = make_coefs(shape[0], dtype, seed + 1)
    c = coefs.double().cpu()
    shp = (-1,) + (1,) * (len(shape) - 1)
    prev = c[:, 0].view(shp) * x + c[:, 1].view(shp) * v + c[:, 4].view(shp) * noise
    ref = v + 0.1 * dref
    out = [t.to(dtype).to(DEVICE) for t in (v, x, prev, noise, ref)]
    return (*out, coefs)


def up(t):
    return None if t is None else t.double()


def eager_forward(v, x, pn, ref, coefs, reduction, sampling):
    """The op's math done by eager PyTorch entirely in v.dtype (no float32 upcast)."""
    dt = v.dtype
    shp = (-1,) + (1,) * (v.ndim - 1)
    cx, cv, alpha, gamma, s = (coefs[:, i].to(dt).reshape(shp) for i in range(5))
    mean = cx * x + cv * v
    if sampling:
        prev = mean + s * pn if pn is not None else mean
    else:
        prev = pn if pn is not None else mean
    d = prev.detach() - mean
    logp = alpha * d * d + gamma
    red = tuple(range(1, v.ndim))
    if reduction == 0:
        logp = logp.mean(dim=red)
    elif reduction == 1:
        logp = logp.sum(dim=1)
    ref_sq = ((v - ref) ** 2).sum(red) if ref is not None else torch.zeros(
        v.shape[0], dtype=dt, device=v.device)
    return logp, ref_sq, mean, prev


def max_err(got, exact):
    if exact.numel() == 0:
        return 0.0
    return (got.double() - exact.double()).abs().max().item()


def ulp(dtype, exact):
    return torch.finfo(dtype).eps * (exact.double().abs().max().item() if exact.numel() else 0.0)


def assert_rule(key, got, eager, exact):
    """Error vs float64 at most 2x that of eager PyTorch in the input dtype, plus one output ulp."""
    err, err_eager = max_err(got, exact), max_err(eager, exact)
    _record(key, err, err_eager)
    assert err <= 2 * err_eager + ulp(got.dtype, exact), (key, err, err_eager)


def close(got, exp, tol):
    if exp.numel() == 0:
        return
    err = max_err(got, exp)
    scale = max(1.0, exp.double().abs().max().item())
    assert err <= tol * scale, (err, scale)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def check_forward(shape, dtype, reduction, mode, seed=0):
    sampling, has_pn, has_ref, write_mean = MODES[mode]
    v, x, prev, noise, ref, coefs = make_inputs(shape, dtype, seed)
    pn = (noise if sampling else prev) if has_pn else None
    r = ref if has_ref else None
    got = forward(v, x, pn, r, coefs, reduction, sampling, write_mean)
    logp, ref_sq, mean, new_prev = got
    acc = acc_of(dtype)

    # contract: shapes and dtypes, empties where not requested
    assert logp.shape == flow_grpo._logp_shape(shape, reduction) and logp.dtype == acc
    assert ref_sq.shape == (shape[0],) and ref_sq.dtype == acc
    for out, on in ((mean, write_mean), (new_prev, sampling)):
        assert out.dtype == dtype and out.device == v.device
        assert out.shape == (shape if on else (0,))
    if not has_ref:
        assert torch.all(ref_sq == 0)

    # float64 truth on the exactly upcast inputs
    exact = reference(up(v), up(x), up(pn), up(r), coefs.double(), reduction, sampling, True)
    # the log-prob is that of the returned sample
    exact_logp = exact[0] if not sampling else reference(
        up(v), up(x), up(new_prev), None, coefs.double(), reduction, False, False)[0]

    # the same-dtype reference (float32 math for half types): same rounding of mean / prev
    same = reference(v, x, pn, r, coefs, reduction, sampling, write_mean)
    if dtype == torch.float64:
        close(logp, exact_logp, 1e-12)
        close(ref_sq, exact[1], 1e-12)
        close(mean, same[2], 1e-12)
        close(new_prev, same[3], 1e-12)
        close(logp, same[0], 1e-12)
        return
    if not HAS_CUDA:
        # interpreter: numpy float32 math in the reference's order, round-to-nearest-even output
        for g_out, s_out in ((mean, same[2]), (new_prev, same[3])):
            assert torch.equal(g_out, s_out)
    else:
        # a GPU may contract mean = cx*x + cv*v into an FMA: at most one output ulp apart
        for g_out, s_out in ((mean, same[2]), (new_prev, same[3])):
            if s_out.numel():
                assert max_err(g_out, s_out) <= ulp(dtype, s_out)

    eager = eager_forward(v, x, pn, r, coefs, reduction, sampling)
    eager_logp_exact = exact[0] if not sampling else reference(
        up(v), up(x), up(eager[3]), None, coefs.double(), reduction, False, False)[0]
    name = str(dtype).replace("torch.", "")
    err, err_eager = max_err(logp, exact_logp), max_err(eager[0], eager_logp_exact)
    _record(f"{name} logp", err, err_eager)
    assert err <= 2 * err_eager + ulp(logp.dtype, exact_logp), (err, err_eager)
    if has_ref:
        assert_rule(f"{name} ref_sq", ref_sq, eager[1], exact[1])
    if write_mean:
        assert_rule(f"{name} mean", mean, eager[2], exact[2])
    if sampling:
        assert_rule(f"{name} prev", new_prev, eager[3], exact[3])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_forward(dtype, shape, reduction, mode):
    check_forward(shape, dtype, reduction, mode, seed=sum(shape) + reduction)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

# (grad_logp, grad_mean, grad_ref_sq, prev given)
GRADS = {
    "all": (True, True, True, True),
    "logp": (True, False, False, True),
    "mean_ref": (False, True, True, True),
    "logp_no_prev": (True, False, False, False),   # d = 0: grad_logp contributes nothing
    "none": (False, False, False, True),           # grad_v = 0
}


def autograd_grad(v, x, prev, ref, coefs, reduction, gl, gm, gq, fn):
    vv = v.detach().clone().requires_grad_(True)
    logp, ref_sq, mean, _ = fn(vv, x, prev, ref, coefs, reduction, False)
    total = vv.sum() * 0
    if gl is not None:
        total = total + (logp * gl.to(logp.dtype)).sum()
    if gm is not None:
        total = total + (mean * gm.to(mean.dtype)).sum()
    if gq is not None:
        total = total + (ref_sq * gq.to(ref_sq.dtype)).sum()
    total.backward()
    return vv.grad


def _reference_fn(v, x, prev, ref, coefs, reduction, sampling):
    return reference(v, x, prev, ref, coefs, reduction, sampling, True)


def check_backward(shape, dtype, reduction, grads, seed=0):
    want_gl, want_gm, want_gq, has_prev = GRADS[grads]
    v, x, prev, _, ref, coefs = make_inputs(shape, dtype, seed)
    acc = acc_of(dtype)
    g = torch.Generator().manual_seed(seed + 7)
    lshape = flow_grpo._logp_shape(shape, reduction)

    def rand(shp, dt, want):
        if not want:
            return None
        return torch.randn(shp, generator=g, dtype=torch.float64).to(dt).to(DEVICE)

    gl = rand(lshape, acc, want_gl)
    gm = rand(shape, dtype, want_gm)
    gq = rand(shape[0], acc, want_gq)
    p = prev if has_prev else None
    got = backward(v, x, p, ref, coefs, reduction, gl, gm, gq)
    assert got.shape == v.shape and got.dtype == dtype
    exact = autograd_grad(up(v), up(x), up(p), up(ref), coefs.double(), reduction, up(gl), up(gm),
                          up(gq), _reference_fn)
    if grads == "none":
        assert torch.all(got == 0)
    if dtype == torch.float64:
        close(got, exact, 1e-12)
        return
    eager = autograd_grad(v, x, p, ref, coefs, reduction, gl, gm, gq, eager_forward)
    assert_rule(f"{str(dtype).replace('torch.', '')} grad_v", got, eager, exact)


@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_backward(dtype, shape, reduction, grads):
    check_backward(shape, dtype, reduction, grads, seed=sum(shape) + 3 * reduction)


# ------------------------------------------------------------------------------------------------
# Tiling, offsets, sizes
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles so that small latents span many programs: masked tail tiles, several partials
    per sample, and the finalize kernel's loop over more partials than its block."""
    small = dict(fwd_max=32, fwd_min=32, fwd_programs_per_sm=0, bwd=64)
    for name in list(fs._CONFIGS):
        monkeypatch.setitem(fs._CONFIGS, name, small)
    monkeypatch.setattr(fs, "_FINALIZE_BLOCK", 4)


@pytest.mark.parametrize("shape,dtype", [((3, 5, 3, 7, 9), torch.float64),
                                         ((2, 3, 11, 13), torch.bfloat16)],
                         ids=["video-float64", "image-bfloat16"])
def test_multi_tile(small_tiles, shape, dtype):
    for reduction, mode in itertools.product((0, 1, 2), ("train", "sample")):
        check_forward(shape, dtype, reduction, mode, seed=5)
    for reduction in (0, 1, 2):
        check_backward(shape, dtype, reduction, "all", seed=6)


def test_gpu_tile_configuration(monkeypatch):
    """The tiles chosen for an H100 (132 SMs), also run under the interpreter when there is no
    GPU: the forward tile shrinks towards 256 positions to fill the SMs."""
    monkeypatch.setattr(fs._launch, "_assumed_sm_count", 132)
    for shape in [(1, 2, 3, 30, 30), (2, 3, 11, 13)]:     # S = 2700: two backward tiles
        for reduction in (0, 1, 2):
            check_forward(shape, torch.float32, reduction, "train", seed=8)
            check_forward(shape, torch.float64, reduction, "sample_ref", seed=8)
            check_backward(shape, torch.float64, reduction, "all", seed=9)


def test_int64_offsets(monkeypatch):
    """The int64 offset variant (used from 2**31 elements on) on small inputs."""
    monkeypatch.setattr(fs, "_INT32_OFFSET_LIMIT", 0)
    for reduction in (0, 1, 2):
        check_forward((2, 3, 11, 13), torch.float64, reduction, "sample_ref", seed=10)
        check_backward((2, 3, 11, 13), torch.float64, reduction, "all", seed=11)


@pytest.mark.parametrize("idx64", [False, True])
def test_map_surrogate_multi_tile(monkeypatch, idx64):
    """flow_grpo_map_surrogate_triton with tiny tiles (many programs per sample, masked tails, a
    finalize loop over more partials than its block) and the int64-offset variant: loss,
    metrics, the gradient written over logp and d loss / d ref_sq match autograd of the plain
    formula (flow_grpo._policy_loss) in float64."""
    monkeypatch.setitem(fs._MAP_TILE, "gpu", 16)
    monkeypatch.setitem(fs._MAP_TILE, "interpreter", 16)
    monkeypatch.setattr(fs, "_FINALIZE_BLOCK", 4)
    if idx64:
        monkeypatch.setattr(fs, "_INT32_OFFSET_LIMIT", 0)
    g = torch.Generator().manual_seed(40)
    B, P = 3, 41
    logp = torch.randn(B, P, generator=g, dtype=torch.float64) - 1
    old = logp - 0.2 * torch.randn(B, P, generator=g, dtype=torch.float64)
    adv = torch.tensor([2.0, -7.0, 0.5], dtype=torch.float64)
    ref_sq = torch.rand(B, generator=g, dtype=torch.float64)
    kl_w = torch.rand(B, generator=g, dtype=torch.float64)
    for shared in (False, True):
        amap = torch.rand(1 if shared else B, P, generator=g, dtype=torch.float64)
        args = [t.to(DEVICE) for t in (ref_sq, kl_w, old, adv, amap)]
        lp = logp.clone().requires_grad_(True)
        rs = ref_sq.clone().requires_grad_(True)
        e_loss, e_m = flow_grpo._policy_loss(lp, rs, kl_w, old, adv, amap, 0.1, 5.0, 0.3,
                                             "clipped")
        e_grad, e_dref = torch.autograd.grad(e_loss, [lp, rs])
        buf = logp.clone().to(DEVICE)
        loss, metrics, dref = fs.flow_grpo_map_surrogate_triton(buf, *args, 0.1, 5.0, 0.3, False)
        torch.testing.assert_close(loss.cpu(), e_loss.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(metrics.cpu(),
                                   torch.stack([e_m[k] for k in flow_grpo._METRICS]),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(buf.cpu(), e_grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dref.cpu(), e_dref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# The fused per-element loss (flow_grpo_elem_loss_triton)
# ------------------------------------------------------------------------------------------------

elem_loss = fs.flow_grpo_elem_loss_triton
ELEM_SHAPES = {"1x1x1x1": (1, 1, 1, 1), "3x5x7x9": (3, 5, 7, 9), "2x4x3x5x7": (2, 4, 3, 5, 7)}
# (reference given, beta, simple form, map shared by the batch, write_grad)
ELEM_MODES = {
    "kl": (True, 0.3, False, False, True),          # a reference policy in the loss
    "kl_metric": (True, 0.0, False, True, True),    # reference for the metric only
    "no_ref": (False, 0.0, False, False, True),
    "simple": (True, 0.3, True, True, True),        # vipo_form="simple"
    "no_grad": (True, 0.3, False, False, False),
}
ELEM_CLIP, ELEM_ADV_MAX = 0.05, 5.0


def elem_loss_inputs(shape, dtype, has_ref=True, shared_map=False, seed=0):
    """The op's arguments: latents as make_inputs (prev a plausible stored sample), old_log_prob
    near the float64 log-prob so that the ratios straddle both clip bounds, advantages inside,
    beyond the clamp and 0, a map >= 0 with zeros ([1, N] when shared)."""
    v, x, prev, _, ref, coefs = make_inputs(shape, dtype, seed)
    B, N = shape[0], math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed + 31)
    c = coefs.double().cpu()
    d = prev.double().cpu().reshape(B, N) - (c[:, :1] * x.double().cpu().reshape(B, N)
                                             + c[:, 1:2] * v.double().cpu().reshape(B, N))
    logp = c[:, 2:3] * (d * d) + c[:, 3:4]
    old = logp + 0.08 * torch.randn(B, N, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -7.0, 0.0, -0.4, 3.0] * B, dtype=torch.float64)[:B]
    amap = torch.rand(1 if shared_map else B, N, generator=g, dtype=torch.float64) * 2
    amap[:, 3::7] = 0.0
    kl_w = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    acc = acc_of(dtype)
    old, adv, amap, kl_w = (t.to(acc).to(DEVICE) for t in (old, adv, amap, kl_w))
    return (v, x, prev, ref if has_ref else None, coefs, kl_w if has_ref else None, old, adv,
            amap)


def elem_loss_by_autograd(v, x, prev, ref, coefs, kl_w, old, adv, amap, clip, adv_max, beta,
                          simple, dt):
    """The op's formula in plain PyTorch computed in dt: the step's per-element log-prob, the
    clipped (or simple) surrogate with the map-weighted advantage, the KL from the reference.
    Returns loss, metrics [4], d loss / d v by autograd (in dt, shaped like v) and the ratios."""
    B = v.shape[0]
    vv = v.to(dt).reshape(B, -1).detach().requires_grad_(True)
    xx, pp = x.to(dt).reshape(B, -1), prev.to(dt).reshape(B, -1)
    cx, cv, alpha, gamma = (coefs.to(dt)[:, i:i + 1] for i in range(4))
    d = pp - (cx * xx + cv * vv)
    logp = alpha * (d * d) + gamma
    a = adv.to(dt).clamp(-adv_max, adv_max)[:, None] * amap.to(dt)
    delta = logp - old.to(dt)
    ratio = torch.exp(delta)
    if simple:
        terms = -(a * logp)
    else:
        terms = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    loss = terms.mean()
    kl = torch.zeros((), dtype=dt, device=v.device)
    if ref is not None:
        ref_sq = ((vv - ref.to(dt).reshape(B, -1)) ** 2).sum(1)
        kl = (ref_sq * kl_w.to(dt)).mean()
        if beta != 0:
            loss = loss + beta * kl
    (grad,) = torch.autograd.grad(loss, vv)
    metrics = torch.stack([0.5 * (delta.detach() ** 2).mean(),
                           ((ratio.detach() - 1).abs() > clip).to(dt).mean(), kl.detach(),
                           ratio.detach().mean()])
    return loss.detach(), metrics, grad.reshape(v.shape), ratio.detach()


def near_clip_bounds(r_exact, r_acc, clip, acc):
    """Positions whose float64 ratio is within the accumulation dtype's error of a clip bound
    (the eager ratio's error there, or 16 ulps): the clamp's gradient switches at the bound, and
    the clipfrac count at |r - 1| = clip, so there the dtype may legitimately take the other
    side."""
    band = 4 * (r_acc.double() - r_exact).abs() + 16 * torch.finfo(acc).eps * r_exact.abs()
    return (((r_exact - (1 - clip)).abs() <= band) | ((r_exact - (1 + clip)).abs() <= band))


def check_elem_loss(shape, dtype, mode, seed=0):
    has_ref, beta, simple, shared, write_grad = ELEM_MODES[mode]
    args = elem_loss_inputs(shape, dtype, has_ref, shared, seed)
    consts = (ELEM_CLIP, ELEM_ADV_MAX, beta, simple)
    loss, metrics, grad_v = elem_loss(*args, *consts, write_grad)
    acc = acc_of(dtype)
    assert loss.shape == () and metrics.shape == (4,) and loss.dtype == metrics.dtype == acc
    assert grad_v.dtype == dtype and grad_v.shape == (shape if write_grad else (0,))

    exact = elem_loss_by_autograd(*(up(t) for t in args), *consts, torch.float64)
    eager = elem_loss_by_autograd(*args, *consts, acc)          # PyTorch in the accumulation dtype
    near = near_clip_bounds(exact[3], eager[3], ELEM_CLIP, acc).reshape(shape)
    assert near.double().mean() < 0.05                          # what is excluded stays rare
    if not simple and math.prod(shape) >= 100:                  # both sides of the clip taken
        assert 0 < exact[1][1].item() < 1
    slack = near.sum().item() / near.numel()                    # clipfrac: near positions may flip
    far = ~near
    if dtype == torch.float64:
        close(loss, exact[0], 1e-12)
        close(metrics[[0, 2, 3]], exact[1][[0, 2, 3]], 1e-12)
        assert abs(metrics[1].item() - exact[1][1].item()) <= slack + 1e-12
        if write_grad:
            scale = exact[2].abs().max().item()
            assert max_err(grad_v[far], exact[2][far]) <= 1e-12 * scale
        return
    name = str(dtype).replace("torch.", "")
    assert_rule(f"{name} elem loss", loss, eager[0], exact[0])
    for i, key in ((0, "approx_kl"), (2, "kl"), (3, "ratio_mean")):
        assert_rule(f"{name} elem {key}", metrics[i], eager[1][i], exact[1][i])
    assert abs(metrics[1].item() - exact[1][1].item()) <= slack + 1e-7
    if write_grad:
        assert_rule(f"{name} elem grad_v", grad_v[far], eager[2].to(dtype)[far], exact[2][far])


@pytest.mark.parametrize("mode", list(ELEM_MODES))
@pytest.mark.parametrize("shape", list(ELEM_SHAPES.values()), ids=list(ELEM_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_elem_loss(dtype, shape, mode):
    """Loss, metrics and d loss / d model_output against autograd of the formula in float64,
    under the numerics rule (eager PyTorch in the accumulation dtype as the yardstick)."""
    check_elem_loss(shape, dtype, mode, seed=sum(shape) + len(mode))


@pytest.mark.parametrize("plan", ["small_tiles", "small_tiles_idx64", "gpu"])
def test_elem_loss_tiling(monkeypatch, plan):
    """Tiny tiles (many programs per sample, masked tails; the finalize loops over more
    partials than its block, and over [BLOCK_B, BLOCK_T] blocks of the per-sample sums both
    ways: 20 tiles per sample in blocks of 4, and 1 tile per sample for 5 samples in blocks of
    4), their int64-offset variant, and the GPU plan (2048-element tiles, 2 per sample)."""
    if plan == "gpu":
        monkeypatch.setattr(fs._launch, "_assumed_sm_count", 132)
        cases = [((2, 3, 30, 30), torch.float64), ((2, 3, 30, 30), torch.bfloat16)]
    else:
        for key in list(fs._ELEM_TILE):
            monkeypatch.setitem(fs._ELEM_TILE, key, 16)
        monkeypatch.setattr(fs, "_FINALIZE_BLOCK", 4)
        if plan == "small_tiles_idx64":
            monkeypatch.setattr(fs, "_INT32_OFFSET_LIMIT", 0)
        cases = [((3, 5, 7, 9), torch.float64), ((5, 1, 3, 5), torch.float64),
                 ((3, 5, 7, 9), torch.bfloat16)]
    for shape, dtype in cases:
        for mode in ("kl", "kl_metric", "no_ref"):
            check_elem_loss(shape, dtype, mode, seed=41)


def test_elem_loss_empty():
    """B = 0 and N = 0: no tile launch; the means over no policy terms are NaN (as the map
    surrogate's), the KL mean is NaN over no samples and 0 over samples without elements."""
    nan = float("nan")
    for shape, kl in (((0, 3, 4, 5), nan), ((2, 0, 3, 4), 0.0), ((2, 3, 0), 0.0)):
        B, N = shape[0], math.prod(shape[1:])
        v = torch.zeros(shape, device=DEVICE)
        coefs = torch.ones(B, 5, device=DEVICE)
        rows = torch.zeros(B, N, device=DEVICE)
        b = torch.ones(B, device=DEVICE)
        for write_grad in (False, True):
            loss, metrics, grad_v = elem_loss(v, v, v, v, coefs, b, rows, b, rows, 0.1, 5.0, 0.5,
                                              False, write_grad)
            assert loss.isnan() and grad_v.shape == (shape if write_grad else (0,))
            expect = torch.tensor([nan, nan, kl, nan])
            torch.testing.assert_close(metrics.cpu(), expect, equal_nan=True)


def _cpp_elem_loss_registered():
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("tbkernels::flow_grpo_elem_loss",
                                                              "CPU")
    except RuntimeError:                                        # the schema is not defined
        return False


def test_elem_loss_bad_arguments():
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs((2, 3, 4, 5), torch.float32)

    def call(op=elem_loss, **kw):
        a = dict(model_output=v, sample=x, prev_sample=prev, ref_model_output=ref, coefs=coefs,
                 kl_weight=kl_w, old_log_prob=old, advantages=adv, advantage_map=amap,
                 clip_range=0.1, adv_clip_max=5.0, beta=0.1, simple=False, write_grad=True)
        a.update(kw)
        return op(*a.values())

    bad = [
        (dict(model_output=v[0, 0], sample=x[0, 0]), r"model_output must be \[B, C"),
        (dict(sample=x.double()), r"sample \(.*\) must have model_output's dtype"),
        (dict(prev_sample=prev[:1]), "prev_sample must be a tensor like sample"),
        (dict(prev_sample=None), "prev_sample must be a tensor like sample"),
        (dict(ref_model_output=ref.transpose(2, 3).contiguous().transpose(2, 3)),
         "ref_model_output must be a tensor like model_output"),
        (dict(model_output=v.transpose(2, 3).contiguous().transpose(2, 3)),
         r"\(a batch stride is allowed\)"),
        (dict(coefs=coefs.double()), "coefs must be"),
        (dict(kl_weight=None), "go together"),
        (dict(ref_model_output=None), "go together"),
        # old_log_prob and advantage_map: any row stride, each row contiguous (the C++ message
        # adds "with each row contiguous" after the shape, so match the common prefix)
        (dict(old_log_prob=old[:, :-1]), "old_log_prob must be a "),
        (dict(old_log_prob=old.double()), "old_log_prob must be a "),
        (dict(old_log_prob=old.t().contiguous().t()), "old_log_prob must be a "),
        (dict(advantages=adv[:1]), "advantages must be a contiguous"),
        (dict(advantage_map=amap.reshape(2, 3, 20)), "advantage_map must be a "),
        (dict(advantage_map=amap[:, :-1]), "advantage_map must be a "),
        (dict(advantage_map=amap.t().contiguous().t()), "advantage_map must be a "),
        (dict(kl_weight=kl_w.double()), "kl_weight must be a contiguous"),
        (dict(clip_range=0.0), "must be > 0"),
        (dict(adv_clip_max=-1.0), "must be > 0"),
    ]
    for kw, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call(**kw)
    if _cpp_elem_loss_registered() and not HAS_CUDA:
        # the C++ op rejects the same arguments with the same messages (a missing prev_sample is
        # the schema's error there)
        call = functools.partial(call, op=torch.ops.tbkernels.flow_grpo_elem_loss)
        for kw, match in bad:
            if "prev_sample" not in kw:
                with pytest.raises(RuntimeError, match=match):
                    call(**kw)


@pytest.mark.skipif(not _cpp_elem_loss_registered(),
                    reason="tbkernels::flow_grpo_elem_loss has no CPU kernel in the installed "
                           "extension")
@pytest.mark.skipif(HAS_CUDA, reason="compares the interpreter's numpy float math with the C++ "
                                     "op's; compiled Triton may contract products into FMAs and "
                                     "approximates exp (test_elem_loss's numerics rule holds)")
@pytest.mark.parametrize("mode", list(ELEM_MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_elem_loss_matches_cpp_op(dtype, mode):
    """Against the C++ CPU op on the same inputs: the same float32 (float64) operations per
    element, so grad_v within one output ulp plus a few accumulation-dtype ulps of the largest
    gradient (the two exps may differ in the last bits), the loss and metrics to a few ulps;
    [1, N] maps, empty tensors and several CPU tasks (N > 32768) included."""
    has_ref, beta, simple, shared, write_grad = ELEM_MODES[mode]
    acc = acc_of(dtype)
    for shape in ((3, 5, 7, 9), (2, 4, 3, 64, 65), (0, 3, 4, 5), (2, 3, 0)):
        args = elem_loss_inputs(shape, dtype, has_ref, shared, seed=len(mode))
        consts = (ELEM_CLIP, ELEM_ADV_MAX, beta, simple, write_grad)
        c_loss, c_metrics, c_grad = torch.ops.tbkernels.flow_grpo_elem_loss(*args, *consts)
        loss, metrics, grad_v = elem_loss(*args, *consts)
        assert grad_v.shape == c_grad.shape and grad_v.dtype == c_grad.dtype
        tol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(acc).eps
        torch.testing.assert_close(loss, c_loss, rtol=tol, atol=tol, equal_nan=True)
        torch.testing.assert_close(metrics, c_metrics, rtol=tol, atol=tol, equal_nan=True)
        if c_grad.numel():
            ex = elem_loss_by_autograd(*(up(t) for t in args), *consts[:4], torch.float64)
            eager = elem_loss_by_autograd(*args, *consts[:4], acc)
            far = ~near_clip_bounds(ex[3], eager[3], ELEM_CLIP, acc).reshape(shape)
            tol_g = ulp(dtype, c_grad) + 4 * ulp(acc, c_grad)
            assert max_err(grad_v[far], c_grad[far]) <= tol_g


@pytest.mark.skipif(not hasattr(torch.ops.tbkernels, "flow_grpo_elem_loss_triton"),
                    reason="tbkernels::flow_grpo_elem_loss_triton is not registered")
@pytest.mark.parametrize("mode", ["kl", "no_ref", "no_grad"])
def test_elem_loss_opcheck(mode):
    """Schema, fake (shapes, dtypes, no aliasing between outputs) of the registered custom op."""
    has_ref, beta, simple, shared, write_grad = ELEM_MODES[mode]
    args = elem_loss_inputs((2, 3, 4, 5), torch.float32, has_ref, shared, seed=3)
    torch.library.opcheck(torch.ops.tbkernels.flow_grpo_elem_loss_triton,
                          (*args, ELEM_CLIP, ELEM_ADV_MAX, beta, simple, write_grad))


def test_wan_latent_fast():
    """A Wan 2.1 latent [2, 16, 21, 60, 104] (4.2M elements), fp32: forward (training form: prev
    and reference given, mean-reduced) and backward, against the float32 reference."""
    shape = (2, 16, 21, 60, 104)
    g = torch.Generator().manual_seed(21)
    v, x, noise, dref = (torch.randn(shape, generator=g) for _ in range(4))
    coefs = make_coefs(2, torch.float32, 22)
    v, x = v.to(DEVICE), x.to(DEVICE)
    prev = (coefs[:, 0].view(-1, 1, 1, 1, 1) * x + coefs[:, 1].view(-1, 1, 1, 1, 1) * v
            + coefs[:, 4].view(-1, 1, 1, 1, 1) * noise.to(DEVICE))
    ref = v + 0.1 * dref.to(DEVICE)
    gl = torch.tensor([0.5, -1.5], device=DEVICE)
    gq = torch.tensor([0.01, 0.02], device=DEVICE)

    t0 = time.perf_counter()
    logp, ref_sq, mean, new_prev = forward(v, x, prev, ref, coefs, 0, False, False)
    t1 = time.perf_counter()
    grad_v = backward(v, x, prev, ref, coefs, 0, gl, None, gq)
    t2 = time.perf_counter()
    print(f"\nWan {list(shape)} fp32: forward {t1 - t0:.2f}s, backward {t2 - t1:.2f}s")
    assert mean.numel() == 0 and new_prev.numel() == 0
    if INTERPRET:
        # A few seconds with interpreter-sized tiles; GPU-sized tiles would take minutes.
        assert t2 - t0 < 60, (t1 - t0, t2 - t1)

    exact = reference(v.double(), x.double(), prev.double(), ref.double(), coefs.double(), 0,
                      False, False)
    torch.testing.assert_close(logp.double(), exact[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(ref_sq.double(), exact[1], rtol=1e-6, atol=0)
    # grad_v = -2 alpha cv (gl / D) d + 2 gq (v - ref), computed here in float64
    c = coefs.double()
    shp = (-1, 1, 1, 1, 1)
    D = v[0].numel()
    d = prev.double() - (c[:, 0].view(shp) * x.double() + c[:, 1].view(shp) * v.double())
    exp_grad = (-2 * c[:, 2] * c[:, 1] * gl.double() / D).view(shp) * d \
        + (2 * gq.double()).view(shp) * (v.double() - ref.double())
    err = max_err(grad_v, exp_grad)
    assert err <= 4 * ulp(torch.float32, exp_grad), err


def test_empty_and_single_element_dims():
    """C = 1 and S = 1 (Triton specialises integer arguments equal to 1), and zero elements."""
    for shape in [(2, 1, 1, 5, 3), (3, 4, 1, 1), (1, 1, 1, 1)]:
        for reduction in (0, 1, 2):
            check_forward(shape, torch.float64, reduction, "sample_ref", seed=12)
            check_backward(shape, torch.float64, reduction, "all", seed=13)
    v = torch.zeros(2, 0, 3, 4, device=DEVICE)
    coefs = make_coefs(2, torch.float32)
    logp, ref_sq, mean, prev = forward(v, v, v, v, coefs, 1, True, True)
    assert logp.shape == (2, 3, 4) and torch.all(logp == 0) and torch.all(ref_sq == 0)
    assert mean.shape == prev.shape == v.shape
    assert backward(v, v, v, v, coefs, 0, torch.ones(2, device=DEVICE), v,
                    torch.ones(2, device=DEVICE)).shape == v.shape


def test_bad_arguments():
    v, x, prev, _, ref, coefs = make_inputs((2, 3, 4, 5), torch.float32)
    with pytest.raises(RuntimeError, match="coefs must be"):
        forward(v, x, prev, None, coefs.double(), 0, False, False)
    with pytest.raises(RuntimeError, match=r"sample \(torch.float64\) must have model_output's "
                                           r"dtype \(torch.float32\)"):
        forward(v, x.double(), prev, None, coefs, 0, False, False)
    with pytest.raises(RuntimeError, match="prev_sample must be a tensor like sample"):
        forward(v, x, prev.transpose(2, 3).contiguous().transpose(2, 3), None, coefs, 0, False,
                False)
    with pytest.raises(RuntimeError, match="reduction must be"):
        forward(v, x, prev, None, coefs, 3, False, False)
    with pytest.raises(RuntimeError, match="grad_ref_sq given without ref_model_output"):
        backward(v, x, prev, None, coefs, 0, None, None, torch.ones(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="grad_logp must be"):
        backward(v, x, prev, ref, coefs, 1, torch.ones(2, device=DEVICE), None, None)


# ------------------------------------------------------------------------------------------------
# Batch-strided latents (each sample contiguous, any batch stride)
# ------------------------------------------------------------------------------------------------

# 4-D and 5-D latents, and B = 1 (whose batch stride the kernels never apply)
STRIDED_SHAPES = {"image": (2, 3, 5, 7), "video": (3, 2, 3, 4, 5), "b1": (1, 4, 2, 3, 5)}
STRIDED_DTYPES = [torch.float32, torch.bfloat16]
# (steps, j) of the trajectory each latent argument is sliced from, by argument position: a
# different batch stride and offset for each
TRAJECTORY_SLICES = [(2, 1), (3, 0), (4, 2), (2, 0), (5, 3)]


def trajectory_slice(t, steps, j):
    """t as the slice [:, j] of a NaN-filled [B, steps, ...] tensor, like Flow-GRPO's
    latents[:, j]: each sample contiguous, samples steps * t[0].numel() elements apart (a read
    of another step brings in NaN)."""
    big = torch.full((t.shape[0], steps, *t.shape[1:]), float("nan"), dtype=t.dtype,
                     device=t.device)
    big[:, j] = t
    return big[:, j]


def batch_strided_layouts(latents, rotate):
    """Batch-strided stand-ins for the latent arguments (None stays None), one list per layout:
    all trajectory slices, then the same with given argument number ``rotate`` (modulo their
    count; tests pass varying values, so that every position gets its turn across a
    parametrization) batch-expanded instead (t[:1].expand: batch stride 0, a new value)."""
    given = [i for i, t in enumerate(latents) if t is not None]
    for expanded in (None, given[rotate % len(given)]):
        layout = []
        for i, t in enumerate(latents):
            if t is None:
                layout.append(None)
            elif i == expanded:
                layout.append(t[:1].expand(t.shape))
            else:
                layout.append(trajectory_slice(t, *TRAJECTORY_SLICES[i]))
            if layout[-1] is not None and t.shape[0] > 1:
                assert not layout[-1].is_contiguous()
        yield layout


def contiguous(latents):
    return [None if t is None else t.contiguous() for t in latents]


def assert_same_bits(got, expect):
    """Each output contiguous and equal to the one from contiguous inputs (no NaN expected: a
    NaN means a read outside the slice)."""
    for g, e in zip(got, expect):
        assert g.is_contiguous() and g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g, e)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(STRIDED_SHAPES.values()), ids=list(STRIDED_SHAPES))
@pytest.mark.parametrize("dtype", STRIDED_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_forward_batch_strided(dtype, shape, reduction, mode):
    """Trajectory slices and batch-expanded latents are read in place: logp, ref_sq, mean and
    the sampled prev bit for bit those of their contiguous copies."""
    sampling, has_pn, has_ref, write_mean = MODES[mode]
    seed = sum(shape) + reduction
    v, x, prev, noise, ref, coefs = make_inputs(shape, dtype, seed)
    pn = (noise if sampling else prev) if has_pn else None
    for latents in batch_strided_layouts([v, x, pn, ref if has_ref else None], seed):
        expect = forward(*contiguous(latents), coefs, reduction, sampling, write_mean)
        assert_same_bits(forward(*latents, coefs, reduction, sampling, write_mean), expect)


@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(STRIDED_SHAPES.values()), ids=list(STRIDED_SHAPES))
@pytest.mark.parametrize("dtype", STRIDED_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_backward_batch_strided(dtype, shape, reduction, grads):
    """grad_v from batch-strided v, x, prev, ref and grad_mean: the bits of contiguous copies."""
    want_gl, want_gm, want_gq, has_prev = GRADS[grads]
    seed = sum(shape) + reduction
    v, x, prev, _, ref, coefs = make_inputs(shape, dtype, seed)
    acc = acc_of(dtype)
    g = torch.Generator().manual_seed(reduction)
    gl = torch.randn(flow_grpo._logp_shape(shape, reduction), generator=g).to(acc).to(DEVICE)
    gm = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    gq = torch.randn(shape[0], generator=g).to(acc).to(DEVICE)
    gl, gq = gl if want_gl else None, gq if want_gq else None
    latents = [v, x, prev if has_prev else None, ref if want_gq else None, gm if want_gm else None]
    for lat in batch_strided_layouts(latents, seed + len(grads)):
        expect = backward(*contiguous(lat[:4]), coefs, reduction, gl, *contiguous(lat[4:]), gq)
        assert_same_bits([backward(*lat[:4], coefs, reduction, gl, lat[4], gq)], [expect])


@pytest.mark.parametrize("write_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("has_ref", [True, False], ids=["ref", "no_ref"])
@pytest.mark.parametrize("shared_map", [False, True], ids=["map", "shared_map"])
@pytest.mark.parametrize("shape", list(STRIDED_SHAPES.values()), ids=list(STRIDED_SHAPES))
@pytest.mark.parametrize("dtype", STRIDED_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_elem_loss_batch_strided(dtype, shape, shared_map, has_ref, write_grad):
    """flow_grpo_elem_loss_triton on batch-strided latents: loss, metrics and grad_v the bits of
    contiguous copies."""
    seed = sum(shape) + 2 * shared_map + write_grad
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(shape, dtype, has_ref,
                                                                    shared_map, seed)
    rest = (coefs, kl_w, old, adv, amap, ELEM_CLIP, ELEM_ADV_MAX, 0.3 if has_ref else 0.0, False,
            write_grad)
    for latents in batch_strided_layouts([v, x, prev, ref], seed):
        expect = elem_loss(*contiguous(latents), *rest)
        assert_same_bits(elem_loss(*latents, *rest), expect)


class _RecordIdx64:
    """Stands in for a kernel: records each launch's IDX64, then launches."""

    def __init__(self, kernel):
        self.kernel, self.idx64 = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.idx64.append(kwargs["IDX64"])
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_int64_offsets_from_batch_stride(monkeypatch):
    """The int64-offset decision counts each input's reach (B - 1) * batch_stride + N: with the
    int32 limit lowered between B * N and a long trajectory slice's reach, contiguous inputs
    launch with int32 offsets, the slices with int64 ones, and the bits agree."""
    shape, steps = (3, 2, 3, 4), 50
    B, N = shape[0], math.prod(shape[1:])
    assert B * N < 1000 < (B - 1) * steps * N
    monkeypatch.setattr(fs, "_INT32_OFFSET_LIMIT", 1000)
    kernels = {}
    for name in ("_forward_kernel", "_backward_kernel", "_elem_loss_kernel"):
        kernels[name] = _RecordIdx64(getattr(fs, name))
        monkeypatch.setattr(fs, name, kernels[name])
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(shape, torch.float32, seed=50)
    gl = torch.randn(B, generator=torch.Generator().manual_seed(51)).to(DEVICE)
    ops = (lambda v, x, prev, ref: forward(v, x, prev, ref, coefs, 2, False, True),
           lambda v, x, prev, ref: [backward(v, x, prev, ref, coefs, 0, gl, None, None)],
           lambda v, x, prev, ref: elem_loss(v, x, prev, ref, coefs, kl_w, old, adv, amap,
                                             ELEM_CLIP, ELEM_ADV_MAX, 0.3, False, True))
    for op in ops:
        expect = op(v, x, prev, ref)
        assert_same_bits(op(*(trajectory_slice(t, steps, 7) for t in (v, x, prev, ref))), expect)
    for name, rec in kernels.items():
        assert rec.idx64 == [False, True], name


def test_non_contiguous_sample_rejected():
    """A latent argument whose samples are not contiguous (H and W transposed) is rejected with
    a message naming it, by each op."""
    shape = (2, 3, 4, 4)                      # square H, W: the transposed view keeps the shape
    v, x, prev, noise, ref, coefs = make_inputs(shape, torch.float32, seed=52)
    _, _, _, _, _, kl_w, old, adv, amap = elem_loss_inputs(shape, torch.float32, seed=52)
    gl = torch.ones(2, device=DEVICE)
    calls = {
        "flow_step_forward": (
            lambda kw: forward(**kw, coefs=coefs, reduction=0, sampling=False, write_mean=True),
            dict(v=v, x=x, prev_or_noise=prev, ref=ref),
            dict(v="model_output", x="sample", prev_or_noise="prev_sample",
                 ref="ref_model_output")),
        "flow_step_forward (sampling)": (
            lambda kw: forward(**kw, coefs=coefs, reduction=1, sampling=True, write_mean=False),
            dict(v=v, x=x, prev_or_noise=noise, ref=None), dict(prev_or_noise="noise")),
        "flow_step_backward": (
            lambda kw: backward(**kw, coefs=coefs, reduction=0, grad_logp=gl, grad_ref_sq=gl),
            dict(v=v, x=x, prev=prev, ref=ref, grad_mean=v * 0.5),
            dict(v="model_output", x="sample", prev="prev_sample", ref="ref_model_output",
                 grad_mean="grad_mean")),
        "flow_grpo_elem_loss": (
            lambda kw: elem_loss(**kw, coefs=coefs, kl_weight=kl_w, old_log_prob=old,
                                 advantages=adv, advantage_map=amap, clip_range=ELEM_CLIP,
                                 adv_clip_max=ELEM_ADV_MAX, beta=0.3, simple=False,
                                 write_grad=True),
            dict(model_output=v, sample=x, prev_sample=prev, ref_model_output=ref),
            dict(model_output="model_output", sample="sample", prev_sample="prev_sample",
                 ref_model_output="ref_model_output")),
    }
    for what, (call, latents, names) in calls.items():
        call(latents)                                       # the valid arguments pass
        for arg, name in names.items():
            bad = latents[arg].transpose(-1, -2)
            assert bad.shape == latents[arg].shape and fs.batch_stride(bad) is None
            op = what.split()[0]
            with pytest.raises(RuntimeError, match=rf"{op}: {name} must .*each sample.*"
                                                   r"\(a batch stride is allowed\)"):
                call({**latents, arg: bad})


# ------------------------------------------------------------------------------------------------
# Row-strided old_log_prob and advantage_map of the map losses
# ------------------------------------------------------------------------------------------------

map_surrogate = fs.flow_grpo_map_surrogate_triton


def row_strided_layouts(old, amap):
    """(old_log_prob, advantage_map) stand-ins read by rows: NaN-padded trajectory slices
    big[:, j] of [rows, K, n] tensors (a different K and j for each), and each in turn expanded
    from its first row (row stride 0; a [1, n] map stays [1, n]) with the other sliced."""
    yield trajectory_slice(old, 3, 1), trajectory_slice(amap, 4, 2)
    yield old[:1].expand(old.shape), trajectory_slice(amap, 2, 0)
    yield trajectory_slice(old, 5, 4), amap[:1].expand(amap.shape)


def map_surrogate_inputs(B, P, dtype, has_ref, shared_map, seed):
    """logp, ref_sq, kl_weight (None without a reference), old_log_prob (ratios on both sides of
    the clip bounds), advantages (inside and beyond the clamp) and a map >= 0 with zeros."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, P, generator=g, dtype=torch.float64) - 1
    old = logp - 0.2 * torch.randn(B, P, generator=g, dtype=torch.float64)
    adv = torch.tensor([2.0, -7.0, 0.5, -0.3] * B, dtype=torch.float64)[:B]
    ref_sq = torch.rand(B, generator=g, dtype=torch.float64)
    kl_w = torch.rand(B, generator=g, dtype=torch.float64)
    amap = torch.rand(1 if shared_map else B, P, generator=g, dtype=torch.float64) * 2
    amap[:, 2::5] = 0.0
    logp, ref_sq, kl_w, old, adv, amap = (t.to(dtype).to(DEVICE)
                                          for t in (logp, ref_sq, kl_w, old, adv, amap))
    return logp, ref_sq if has_ref else None, kl_w if has_ref else None, old, adv, amap


@pytest.mark.parametrize("B", [3, 1])
@pytest.mark.parametrize("has_ref", [True, False], ids=["ref", "no_ref"])
@pytest.mark.parametrize("shared_map", [False, True], ids=["map", "shared_map"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_map_surrogate_row_strided(monkeypatch, dtype, shared_map, has_ref, B):
    """flow_grpo_map_surrogate_triton on row-strided old_log_prob and advantage_map (slices of
    trajectory stores, batch-expanded rows): loss, metrics, d loss / d ref_sq and the gradient
    written over logp are the bits of contiguous copies. Tiles of 16 positions: several per
    row, masked tails."""
    monkeypatch.setitem(fs._MAP_TILE, "gpu", 16)
    monkeypatch.setitem(fs._MAP_TILE, "interpreter", 16)
    seed = 60 + 4 * B + 2 * shared_map + has_ref
    logp, ref_sq, kl_w, old, adv, amap = map_surrogate_inputs(B, 37, dtype, has_ref, shared_map,
                                                              seed)
    beta, simple = (0.3 if has_ref else 0.0), shared_map and not has_ref

    def run(old, amap):
        buf = logp.clone()
        out = map_surrogate(buf, ref_sq, kl_w, old, adv, amap, 0.1, 5.0, beta, simple)
        return [*out, buf]

    for o, m in row_strided_layouts(old, amap):
        if B > 1:
            assert not o.is_contiguous() and (shared_map or not m.is_contiguous())
        assert_same_bits(run(o, m), run(o.contiguous(), m.contiguous()))


@pytest.mark.parametrize("has_ref", [True, False], ids=["ref", "no_ref"])
@pytest.mark.parametrize("shared_map", [False, True], ids=["map", "shared_map"])
@pytest.mark.parametrize("shape", list(STRIDED_SHAPES.values()), ids=list(STRIDED_SHAPES))
@pytest.mark.parametrize("dtype", STRIDED_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_elem_loss_row_strided(dtype, shape, shared_map, has_ref):
    """flow_grpo_elem_loss_triton on row-strided old_log_prob and advantage_map, with contiguous
    and with batch-strided latents: loss, metrics and grad_v the bits of contiguous copies."""
    seed = sum(shape) + 2 * shared_map + has_ref
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(shape, dtype, has_ref,
                                                                    shared_map, seed)
    beta = 0.3 if has_ref else 0.0
    latents = [v, x, prev, ref]
    sliced = next(batch_strided_layouts(latents, seed))          # all trajectory slices

    def run(lat, old, amap):
        return elem_loss(*lat, coefs, kl_w, old, adv, amap, ELEM_CLIP, ELEM_ADV_MAX, beta,
                         False, True)

    for i, (o, m) in enumerate(row_strided_layouts(old, amap)):
        lat = sliced if i % 2 else latents
        assert_same_bits(run(lat, o, m), run(contiguous(lat), o.contiguous(), m.contiguous()))


def test_int64_offsets_from_row_stride(monkeypatch):
    """The int64-offset decision of both map losses counts the reach (B - 1) * row_stride + n of
    old_log_prob and advantage_map: with the int32 limit lowered between B * n and a long
    trajectory slice's reach, contiguous rows (and a shared map, row stride 0) launch with int32
    offsets, a slice of either with int64 ones, and the bits agree."""
    shape, steps = (3, 2, 3, 4), 50
    B, N = shape[0], math.prod(shape[1:])
    assert B * N < 1000 < (B - 1) * steps * N
    monkeypatch.setattr(fs, "_INT32_OFFSET_LIMIT", 1000)
    recs = {}
    for name in ("_map_surrogate_kernel", "_elem_loss_kernel"):
        recs[name] = _RecordIdx64(getattr(fs, name))
        monkeypatch.setattr(fs, name, recs[name])
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(shape, torch.float32, seed=61)
    shared = amap[:1].clone()
    logp = old + 0.01

    def surrogate(old, amap):
        buf = logp.clone()
        return [*map_surrogate(buf, ref.new_ones(B), kl_w, old, adv, amap, 0.1, 5.0, 0.3, False),
                buf]

    def elem(old, amap):
        return elem_loss(v, x, prev, ref, coefs, kl_w, old, adv, amap, ELEM_CLIP, ELEM_ADV_MAX,
                         0.3, False, True)

    far = functools.partial(trajectory_slice, steps=steps, j=7)
    for name, op in (("_map_surrogate_kernel", surrogate), ("_elem_loss_kernel", elem)):
        for m in (amap, shared):
            expect = op(old, m)
            assert_same_bits(op(far(old), m), expect)
            assert_same_bits(op(old, far(m)), expect)
        # per map: contiguous, old sliced, map sliced (a sliced [1, N] map still has stride 0)
        assert recs[name].idx64 == [False, True, True, False, True, False], name


def test_column_major_rows_rejected():
    """An old_log_prob or advantage_map whose rows are not contiguous (column-major) is
    rejected by both map losses with a message naming it; a row-strided one is accepted."""
    v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs((2, 3, 4, 5), torch.float32,
                                                                    seed=62)
    logp = old + 0.01
    calls = {
        "flow_grpo_map_surrogate": lambda old, amap: map_surrogate(
            logp.clone(), None, None, old, adv, amap, 0.1, 5.0, 0.0, False),
        "flow_grpo_elem_loss": lambda old, amap: elem_loss(
            v, x, prev, ref, coefs, kl_w, old, adv, amap, ELEM_CLIP, ELEM_ADV_MAX, 0.3, False,
            True),
    }
    for op, call in calls.items():
        call(trajectory_slice(old, 3, 2), trajectory_slice(amap, 2, 1))
        for name in ("old_log_prob", "advantage_map"):
            args = dict(old=old, amap=amap)
            key = "old" if name == "old_log_prob" else "amap"
            bad = args[key].t().contiguous().t()
            assert bad.shape == args[key].shape and fs.batch_stride(bad) is None
            with pytest.raises(RuntimeError,
                               match=rf"{op}: {name} must be a .*with each row contiguous"):
                call(**{**args, key: bad})


# ------------------------------------------------------------------------------------------------
# Mixed dtypes: a bfloat16 / float16 model output beside float32 latents (Flow-GRPO's training)
# ------------------------------------------------------------------------------------------------

# (model dtype M, latent dtype L): model_output and ref_model_output in M; sample, prev / noise
# and grad_mean in L
MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
MIXED_IDS = ["bf16-fp32", "fp16-fp32"]
# 4-D and 5-D, odd sizes (masked tails), and B = 1
MIXED_SHAPES = {"image_odd": (2, 3, 5, 7), "video_odd": (3, 2, 3, 5, 7), "b1": (1, 3, 2, 3, 5)}


def mixed_inputs(shape, model, seed):
    """make_inputs in float32 with v and ref rounded to the model dtype: (v_m, ref_m) in M, their
    exact float32 copies, and x, prev, noise, coefs in float32."""
    v, x, prev, noise, ref, coefs = make_inputs(shape, torch.float32, seed)
    v_m, ref_m = v.to(model), ref.to(model)
    return v_m, ref_m, v_m.float(), ref_m.float(), x, prev, noise, coefs


def assert_bits(got, expect, dtype):
    assert got.dtype == dtype and got.shape == expect.shape and got.is_contiguous()
    assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                       expect.view(-1).view(torch.uint8) if expect.numel() else expect)


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(MIXED_SHAPES.values()), ids=list(MIXED_SHAPES))
@pytest.mark.parametrize("model,latent", MIXED, ids=MIXED_IDS)
def test_forward_mixed_dtypes(model, latent, shape, reduction):
    """Every mode (stored prev, none, sampling with noise and without, write_mean, with and
    without the reference): logp, ref_sq, mean and the sampled prev (in the latent dtype) bit for
    bit those of the same call on model_output.float() / ref_model_output.float()."""
    v_m, ref_m, v32, ref32, x, prev, noise, coefs = mixed_inputs(shape, model, sum(shape) + reduction)
    for mode, (sampling, has_pn, has_ref, write_mean) in MODES.items():
        pn = (noise if sampling else prev) if has_pn else None
        got = forward(v_m, x, pn, ref_m if has_ref else None, coefs, reduction, sampling,
                      write_mean)
        expect = forward(v32, x, pn, ref32 if has_ref else None, coefs, reduction, sampling,
                         write_mean)
        for g, e in zip(got, expect):
            assert_bits(g, e, latent)                   # logp, ref_sq: float32 too (acc of L)
        assert got[2].shape == (shape if write_mean else (0,)), mode
        assert got[3].shape == (shape if sampling else (0,)), mode


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["mean", "channel_sum", "none"])
@pytest.mark.parametrize("shape", list(MIXED_SHAPES.values()), ids=list(MIXED_SHAPES))
@pytest.mark.parametrize("model,latent", MIXED, ids=MIXED_IDS)
def test_backward_mixed_dtypes(model, latent, shape, reduction):
    """Each combination of grad_logp, grad_mean (latent dtype) and grad_ref_sq (with the
    reference in the model dtype), with and without prev: grad_v, in the model dtype, is the
    float32 call's grad_v (on model_output.float()) rounded to the model dtype with .to()."""
    seed = sum(shape) + 3 * reduction
    v_m, ref_m, v32, ref32, x, prev, _, coefs = mixed_inputs(shape, model, seed)
    g = torch.Generator().manual_seed(seed + 7)
    gl = torch.randn(flow_grpo._logp_shape(shape, reduction), generator=g).to(DEVICE)
    gm = torch.randn(shape, generator=g).to(latent).to(DEVICE)
    gq = torch.randn(shape[0], generator=g).to(DEVICE)
    for grads, (want_gl, want_gm, want_gq, has_prev) in GRADS.items():
        args = (prev if has_prev else None, coefs, reduction, gl if want_gl else None,
                gm if want_gm else None, gq if want_gq else None)

        def call(v, ref):
            p, c, r, l, m, q = args
            return backward(v, x, p, ref if want_gq else None, c, r, l, m, q)

        got, expect32 = call(v_m, ref_m), call(v32, ref32)
        assert expect32.dtype == torch.float32
        assert_bits(got, expect32.to(model), model)
        if grads == "none":
            assert torch.all(got == 0)


@pytest.mark.parametrize("shape", list(MIXED_SHAPES.values()), ids=list(MIXED_SHAPES))
@pytest.mark.parametrize("model,latent", MIXED, ids=MIXED_IDS)
def test_elem_loss_mixed_dtypes(model, latent, shape):
    """flow_grpo_elem_loss_triton with and without the reference (in the model dtype), a
    per-sample and a shared map, write_grad on and off, clipped and simple: loss and metrics bit
    for bit those of the call on model_output.float(), grad_v that call's rounded to M."""
    variants = dict(ELEM_MODES, shared_no_ref=(False, 0.0, False, True, True),
                    shared_no_grad=(True, 0.3, False, True, False))
    for mode, (has_ref, beta, simple, shared, write_grad) in variants.items():
        v, x, prev, ref, coefs, kl_w, old, adv, amap = elem_loss_inputs(
            shape, latent, has_ref, shared, seed=sum(shape) + len(mode))
        v_m = v.to(model)
        ref_m = ref.to(model) if has_ref else None
        rest = (coefs, kl_w, old, adv, amap, ELEM_CLIP, ELEM_ADV_MAX, beta, simple, write_grad)
        loss, metrics, grad_v = elem_loss(v_m, x, prev, ref_m, *rest)
        e_loss, e_metrics, e_grad = elem_loss(v_m.float(), x, prev,
                                              None if ref_m is None else ref_m.float(), *rest)
        assert_bits(loss, e_loss, latent)
        assert_bits(metrics, e_metrics, latent)
        assert_bits(grad_v, e_grad.to(model), model)
        assert grad_v.shape == (shape if write_grad else (0,)), mode


@pytest.mark.parametrize("model,latent", MIXED[:1], ids=MIXED_IDS[:1])
def test_mixed_dtypes_batch_strided(model, latent):
    """Mixed dtypes read in place from trajectory slices (each latent of its own dtype at its own
    batch stride): the bits of contiguous copies, for each op."""
    shape = (3, 2, 3, 4, 5)
    v_m, ref_m, _, _, x, prev, noise, coefs = mixed_inputs(shape, model, 70)
    _, _, _, _, _, kl_w, old, adv, amap = elem_loss_inputs(shape, latent, seed=71)
    gl = torch.randn(shape[0], generator=torch.Generator().manual_seed(72)).to(DEVICE)
    gm = (0.5 * x).contiguous()
    ops = (lambda v, x, p, r, m: forward(v, x, p, r, coefs, 2, True, True),
           lambda v, x, p, r, m: forward(v, x, p, r, coefs, 0, False, False),
           lambda v, x, p, r, m: [backward(v, x, p, r, coefs, 0, gl, m, gl)],
           lambda v, x, p, r, m: elem_loss(v, x, p, r, coefs, kl_w, old, adv, amap, ELEM_CLIP,
                                           ELEM_ADV_MAX, 0.3, False, True))
    for i, op in enumerate(ops):
        latents = [v_m, x, noise if i == 0 else prev, ref_m, gm]
        expect = op(*latents)
        assert_same_bits(op(*(trajectory_slice(t, *TRAJECTORY_SLICES[k])
                              for k, t in enumerate(latents))), expect)


def test_mixed_dtypes_rejected():
    """Combinations outside the rule (one dtype, or bf16/fp16 model dtype with float32 latents)
    are rejected by each op with a message naming the tensor and the rule: a float32 model output
    with bfloat16 latents, float64 with float32 (either way), bfloat16 with float16; a reference
    not of the model dtype; prev / noise / grad_mean not of the latent dtype."""
    shape = (2, 3, 4, 5)
    v_m, ref_m, v32, ref32, x, prev, noise, coefs = mixed_inputs(shape, torch.bfloat16, 73)
    _, _, _, _, _, kl_w, old, adv, amap = elem_loss_inputs(shape, torch.float32, seed=73)
    gl = torch.ones(2, device=DEVICE)
    rule = r".*or model_output and ref_model_output \(the model dtype\) bfloat16 or float16 with "
    rule += r"float32 sample, prev_sample / noise and grad_mean"

    def fwd(v, x, p, r, m=None):
        return forward(v, x, p, r, coefs.to(acc_of(x.dtype)), 0, False, True)

    def fwd_sampling(v, x, p, r, m=None):
        return forward(v, x, p, r, coefs.to(acc_of(x.dtype)), 1, True, False)

    def bwd(v, x, p, r, m=None):
        c, g = coefs.to(acc_of(x.dtype)), gl.to(acc_of(x.dtype))
        return backward(v, x, p, r, c, 0, g, m, g)

    def elem(v, x, p, r, m=None):
        acc = acc_of(x.dtype)
        return elem_loss(v, x, p, r, coefs.to(acc), kl_w.to(acc), old.to(acc), adv.to(acc),
                         amap.to(acc), ELEM_CLIP, ELEM_ADV_MAX, 0.3, False, True)

    ops = {"flow_step_forward": fwd, "flow_step_forward (sampling)": fwd_sampling,
           "flow_step_backward": bwd, "flow_grpo_elem_loss": elem}
    for what, op in ops.items():
        name = what.split()[0]
        pname = "noise" if "sampling" in what else "prev_sample"
        # accepted: the mixed pair, and one dtype throughout
        op(v_m, x, prev, ref_m, 0.5 * x)
        op(v_m, x.to(v_m.dtype), prev.to(v_m.dtype), ref_m, (0.5 * x).to(v_m.dtype))
        pairs = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                 (torch.float64, torch.float32), (torch.float32, torch.float64),
                 (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                 (torch.bfloat16, torch.float64)]
        for model, latent in pairs:
            with pytest.raises(RuntimeError, match=rf"{name}: sample \({latent}\) must have "
                                                   rf"model_output's dtype \({model}\){rule}"):
                op(v32.to(model), x.to(latent), prev.to(latent), ref32.to(model),
                   x.to(latent))
        # the reference has the model dtype, prev / noise (and grad_mean) the latent dtype
        bad = [(dict(r=ref32), "ref_model_output", "model_output"),
               (dict(p=prev.to(torch.bfloat16)), pname, "sample"),
               (dict(p=prev.double()), pname, "sample")]
        if name == "flow_step_backward":
            bad.append((dict(m=(0.5 * x).to(torch.bfloat16)), "grad_mean", "sample"))
        for kw, arg, like in bad:
            kind = "model" if like == "model_output" else "latent"
            args = {**dict(v=v_m, x=x, p=prev, r=ref_m, m=0.5 * x), **kw}
            with pytest.raises(RuntimeError, match=rf"{name}: {arg} must be a tensor like {like} "
                                                   rf".* must have the {kind} dtype \({like}'s\)"
                                                   rf"{rule}"):
                op(**args)


# ------------------------------------------------------------------------------------------------
# Through the registered custom ops
# ------------------------------------------------------------------------------------------------

def test_registered_in_flow_grpo():
    assert "triton" in flow_grpo.IMPLEMENTED
    assert flow_grpo._forward_op("triton") is torch.ops.tbkernels.flow_step_forward_triton.default \
        or flow_grpo._forward_op("triton") is flow_grpo._flow_step_forward_triton


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_custom_op_autograd_through_sampled_prev(reduction):
    """Sampling: gradient through the returned prev_sample (mean + s*noise) and the log-prob."""
    shape = (2, 3, 2, 5, 7)
    v, x, _, noise, ref, coefs = make_inputs(shape, torch.float64, seed=14)
    g = torch.Generator().manual_seed(15)
    lshape = flow_grpo._logp_shape(shape, reduction)
    wl, wp, wm = (torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE)
                  for s in (lshape, shape, shape))
    grads = []
    for fn in (flow_grpo._forward_reference, torch.ops.tbkernels.flow_step_forward_triton):
        vv = v.clone().requires_grad_(True)
        logp, ref_sq, mean, prev = fn(vv, x, noise, ref, coefs, reduction, True, True)
        ((logp * wl).sum() + (prev * wp).sum() + (mean * wm).sum() + 0.3 * ref_sq.sum()).backward()
        grads.append(vv.grad)
    close(grads[1], grads[0], 1e-12)


@pytest.mark.parametrize("mode", list(MODES))
def test_opcheck(mode):
    """Schema, fake (shapes, dtypes, no aliasing between outputs), autograd registration."""
    sampling, has_pn, has_ref, write_mean = MODES[mode]
    shape = (2, 3, 4, 5)
    v, x, prev, noise, ref, coefs = make_inputs(shape, torch.float32, seed=18)
    pn = (noise if sampling else prev) if has_pn else None
    r = ref if has_ref else None
    for reduction in (0, 1, 2):
        torch.library.opcheck(torch.ops.tbkernels.flow_step_forward_triton,
                              (v, x, pn, r, coefs, reduction, sampling, write_mean))
        gl = torch.ones(flow_grpo._logp_shape(shape, reduction), device=DEVICE)
        torch.library.opcheck(torch.ops.tbkernels.flow_step_backward_triton,
                              (v, x, prev, r, coefs, reduction, gl, v * 0.5,
                               torch.ones(2, device=DEVICE) if has_ref else None))


def test_public_api_compiled_fullgraph():
    """flow_grpo_loss with backend='triton' under torch.compile(fullgraph=True), fwd + bwd."""
    torch._dynamo.reset()
    shape = (2, 4, 2, 5, 6)
    v, x, prev, _, ref, _ = make_inputs(shape, torch.float32, seed=16)
    s, sn = torch.tensor([0.9, 0.6], device=DEVICE), torch.tensor([0.8, 0.5], device=DEVICE)
    old = torch.full((2, 2, 5, 6), -3.0, device=DEVICE)
    adv = torch.tensor([1.0, -1.0], device=DEVICE)
    amap = torch.rand(2, 2, 5, 6, generator=torch.Generator().manual_seed(17)).to(DEVICE)

    def step(vv, backend):
        loss, _ = tbkernels.flow_grpo_loss(vv, x, prev, s, sn, old, adv, ref_model_output=ref,
                                           beta=0.01, advantage_map=amap, clip_range=0.3,
                                           backend=backend)
        return loss

    results = []
    for fn, backend in ((step, "reference"), (torch.compile(step, fullgraph=True), "triton")):
        vv = v.clone().requires_grad_(True)
        loss = fn(vv, backend)
        loss.backward()
        results.append((loss.detach(), vv.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
