"""Memory-lean DPO (issue 4): per_sample_mse on every backend against the float64 reference, the
DPO/KTO losses against independent re-implementations of the Salesforce Diffusion-DPO, Flow-GRPO
Flow-DPO, TeleBoost and Diffusion-KTO code, and dpo_backward's three memory modes against the
standard DPO gradient (with references, regularisers, accumulation, autocast + GradScaler,
checkpointing, DDP), its errors and its all-or-nothing gradient update."""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import math
import mmap
import pathlib
import queue as queue_module
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import tbkernels
from tbkernels import DPOInputError, NonFiniteLossError
from tbkernels.ops import dpo as dpo_mod
from tbkernels.ops._dpo_reference import dpo_reference, kto_reference, per_sample_mse_reference

from conftest import DEVICE, backend_params, value_and_grad

BACKENDS = backend_params(("reference", "cpu", "cuda", "triton"))
ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"video_odd": (3, 5, 3, 7, 9), "image_odd": (2, 3, 11, 13), "b1": (1, 4, 2, 5, 6),
          "multi_chunk": (2, 4, 3, 37, 53), "flat": (5, 7)}


def _available(backend):
    st = tbkernels.backends(DEVICE)[backend]
    if not st.available:
        pytest.skip(st.reason)


def rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel(a, b):
    return err(a, b) / max(b.double().abs().max().item(), 1e-30)


# ---------------------------------------------------------------------------------------------
# per_sample_mse

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_mse_float64_matches_reference(backend, shape):
    _available(backend)
    p, t, w = rand(shape, seed=1), rand(shape, seed=2), rand(shape[0], seed=3)
    pp = p.clone().requires_grad_(True)
    out = tbkernels.per_sample_mse(pp, t, backend=backend)
    assert out.shape == (shape[0],) and out.dtype == torch.float64
    (out * w).sum().backward()
    exact = ((p - t) ** 2).reshape(shape[0], -1).mean(1)
    assert err(out, exact) <= 1e-13 * exact.abs().max().item()
    grad = 2 * w.view(-1, *([1] * (len(shape) - 1))) * (p - t) / (p[0].numel())
    assert err(pp.grad, grad) <= 1e-13 * grad.abs().max().item()


def _eager_in_dtype(p, t):
    """Eager PyTorch doing the whole computation in the input dtype (no float32 upcast)."""
    d = p - t
    return (d * d).reshape(p.shape[0], -1).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(3, 5, 3, 7, 9), (1, 16, 3, 12, 20), (2, 4, 3, 37, 53)],
                         ids=["odd", "b1_wan_small", "multi_chunk"])
def test_mse_low_precision_numerics(backend, dtype, shape):
    """Error vs float64 at most 2x that of eager PyTorch in that dtype, plus one output ulp;
    values and gradients."""
    _available(backend)
    p, t = rand(shape, dtype, seed=4), rand(shape, dtype, seed=5)
    w = rand(shape[0], torch.float32, seed=6)
    pp = p.clone().requires_grad_(True)
    out = tbkernels.per_sample_mse(pp, t, backend=backend)
    assert out.dtype == torch.float32
    (out * w).sum().backward()
    exact = _eager_in_dtype(p.double(), t.double())
    pe = p.clone().requires_grad_(True)
    eager = _eager_in_dtype(pe, t)
    (eager * w.to(dtype)).sum().backward()
    ulp = torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert err(out, exact) <= 2 * err(eager, exact) + ulp
    # float32 accumulation: far better than the rule for half types
    assert rel(out, exact) <= 1e-5
    g_exact = 2 * w.double().view(-1, *([1] * (len(shape) - 1))) * (p.double() - t.double()) \
        / p[0].numel()
    ulp_g = torch.finfo(dtype).eps * g_exact.abs().max().item()
    assert pp.grad.dtype == dtype
    assert err(pp.grad, g_exact) <= 2 * err(pe.grad, g_exact) + ulp_g


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_mixed_dtypes_and_non_contiguous(backend):
    """A bf16 model output against a float32 target (no downcast of the target), and
    non-contiguous views of both."""
    _available(backend)
    base = rand((2, 9, 3, 5, 16), torch.float32, seed=7)
    p = base.transpose(1, 4)[:, ::2].to(torch.bfloat16)            # [2, 8, 3, 5, 9], strided
    t = rand((2, 9, 3, 5, 8), torch.float32, seed=8).permute(0, 4, 2, 3, 1)  # [2, 8, 3, 5, 9]
    assert not p.is_contiguous() and not t.is_contiguous()
    pp = p.detach().requires_grad_(True)
    out = tbkernels.per_sample_mse(pp, t, backend=backend)
    out.sum().backward()
    exact = ((p.double() - t.double()) ** 2).reshape(2, -1).mean(1)
    assert rel(out, exact) <= 1e-5
    g_exact = 2 * (p.double() - t.double()) / p[0].numel()
    assert err(pp.grad, g_exact) <= torch.finfo(torch.bfloat16).eps * g_exact.abs().max().item()
    # float64 target with a float32 pred: float64 accumulation
    out64 = tbkernels.per_sample_mse(p.float(), t.double(), backend=backend)
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_edge_sizes(backend):
    _available(backend)
    for shape in [(1, 1), (4,), (3, 1, 1, 1)]:
        p, t = rand(shape, torch.float32, 9), rand(shape, torch.float32, 10)
        exact = ((p.double() - t.double()) ** 2).reshape(shape[0], -1).mean(1)
        assert rel(tbkernels.per_sample_mse(p, t, backend=backend), exact) <= 1e-6
    empty = torch.zeros(0, 3, 4, device=DEVICE)
    assert tbkernels.per_sample_mse(empty, empty, backend=backend).shape == (0,)
    nothing = torch.zeros(2, 0, 4, device=DEVICE)
    assert torch.isnan(tbkernels.per_sample_mse(nothing, nothing, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_outputs_fully_written(backend):
    """Poisoned memory: NaN-filled blocks of the outputs' sizes are freed right before each call,
    so the allocator hands them to the op; an element the kernel does not write shows as NaN."""
    _available(backend)
    for shape in [(3, 5, 7, 11), (1, 4, 2, 5, 6), (2, 4, 3, 37, 53)]:
        for dtype in (torch.float32, torch.bfloat16):
            p = rand(shape, dtype, 16).requires_grad_(True)
            t = rand(shape, dtype, 17)
            junk = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE),
                    torch.full((shape[0],), float("nan"), device=DEVICE)]
            del junk
            out = tbkernels.per_sample_mse(p, t, backend=backend)
            junk = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
            del junk
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_inference_target_and_double_backward(backend):
    """A target made under torch.inference_mode() (noise, or a frozen model's prediction) is
    accepted as PyTorch's own ops accept it, with the same gradient as an ordinary copy; a
    backward with create_graph=True is refused by the kernel backends (no second derivative)
    and works on the reference backend."""
    _available(backend)
    p = rand((3, 4, 5), seed=21)
    with torch.inference_mode():
        t = rand((3, 4, 5), seed=22) * 1.0
    assert t.is_inference()
    grads = []
    for target in (t, t.clone()):
        pp = p.clone().requires_grad_(True)
        tbkernels.per_sample_mse(pp, target, backend=backend).sum().backward()
        grads.append(pp.grad)
    assert torch.equal(grads[0], grads[1])
    pp = p.clone().requires_grad_(True)
    out = tbkernels.per_sample_mse(pp, t.clone(), backend=backend).sum()
    if backend == "reference":
        (g,) = torch.autograd.grad(out, pp, create_graph=True)
        assert g.requires_grad
    else:
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(out, pp, create_graph=True)


def test_mse_errors():
    p = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="target has shape"):
        tbkernels.per_sample_mse(p, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="batch dimension"):
        tbkernels.per_sample_mse(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match="float32"):
        tbkernels.per_sample_mse(p.long(), p.long())
    with pytest.raises(ValueError, match="target requires grad"):
        tbkernels.per_sample_mse(p, p.clone().requires_grad_(True))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run"):
            tbkernels.per_sample_mse(p, p, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        tbkernels.per_sample_mse(p, p, backend="numpy")


def test_mse_reference_gradcheck_and_opcheck():
    p = rand((2, 3, 4), seed=11).requires_grad_(True)
    t = rand((2, 3, 4), seed=12)
    assert torch.autograd.gradcheck(lambda x: per_sample_mse_reference(x, t), (p,))
    if dpo_mod._HAS_COMPILED:
        args = (rand((3, 4, 5), torch.float32, 13), rand((3, 4, 5), torch.bfloat16, 14))
        torch.library.opcheck(torch.ops.tbkernels.per_sample_mse, args)
        torch.library.opcheck(torch.ops.tbkernels.per_sample_mse_backward,
                              (rand(3, torch.float32, 15),) + args)


def test_mse_auto_backend_is_compiled_on_cpu():
    if DEVICE.type != "cpu" or not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("C++ CPU backend not built")
    assert dpo_mod._pick(torch.device("cpu"), None) == "cpu"


# ---------------------------------------------------------------------------------------------
# Losses against independent implementations of the public code

def _float(t):
    return t.float()


def salesforce_diffusion_dpo(model_pred, ref_pred, target, beta_dpo, up=_float):
    """SalesforceAIResearch/DiffusionDPO train.py, as written there: the batch is
    [chosen; rejected] (chunk(2)), per-sample mean over C, H, W of the epsilon error. ``up`` is
    the code's ``.float()`` (identity for the float64 convention check)."""
    model_losses = (up(model_pred) - up(target)).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (up(ref_pred) - up(target)).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, implicit_acc, inside_term


def flow_grpo_flow_dpo(model_pred, ref_pred, x0, noise, beta, up=_float):
    """yifan123/flow_grpo scripts/train_sd3_dpo.py: velocity target noise - x0, chosen and
    rejected stacked, same sigma and noise within a pair, constant beta, the 0.5."""
    target = noise - x0
    losses = ((up(model_pred) - up(target)) ** 2).mean(dim=list(range(1, target.ndim)))
    with torch.no_grad():
        ref_losses = ((up(ref_pred) - up(target)) ** 2).mean(
            dim=list(range(1, target.ndim)))
    model_losses_w, model_losses_l = losses.chunk(2)
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    model_diff = model_losses_w - ref_losses_w
    ref_diff = model_losses_l - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean()


def _ours_vs_code(code_fn, ours_fn, dtype, backend, seed):
    """(loss, grad wrt the model prediction) of the public code's function and of tbkernels."""
    inputs = code_fn.make(dtype, seed)
    mp = inputs["model_pred"].clone().requires_grad_(True)
    exp_loss = code_fn(dict(inputs, model_pred=mp), dtype)
    exp_grad, = torch.autograd.grad(exp_loss, mp)
    mp2 = inputs["model_pred"].clone().requires_grad_(True)
    loss, metrics = ours_fn(dict(inputs, model_pred=mp2), backend)
    loss.backward()
    return (exp_loss.detach(), exp_grad), (loss.detach(), mp2.grad), metrics


def _rounding_floor(ours_fn, inputs64, backend):
    """Relative change of the loss and of its gradient when each per-sample error moves by one
    float32 ulp (first order, float64): float32 outputs of any MSE cannot do better, and at
    beta = 5000 the DPO margin amplifies that rounding ~1000x."""
    B2 = inputs64["model_pred"].shape[0]
    captured = {}
    real_mse = tbkernels.per_sample_mse

    def spy(pred, target, backend=None):
        out = real_mse(pred, target, backend=backend)
        if pred.requires_grad:
            captured["L"] = out
        return out

    tbkernels.per_sample_mse = spy
    try:
        mp = inputs64["model_pred"].clone().requires_grad_(True)
        loss, _ = ours_fn(dict(inputs64, model_pred=mp), backend)
    finally:
        tbkernels.per_sample_mse = real_mse
    L = captured["L"]
    w, = torch.autograd.grad(loss, L, create_graph=True)
    hess = torch.stack([torch.autograd.grad(w[i], L, retain_graph=True)[0] for i in range(B2)])
    ulp = L.detach().abs() * torch.finfo(torch.float32).eps
    loss_floor = (w.detach().abs() * ulp).sum() / loss.detach().abs()
    # grad wrt pred = 2 w_b (pred - target) / D: its error is dominated by that of the weights
    grad_floor = (hess.abs() @ ulp).max() / w.detach().abs().max()
    return loss_floor.item(), grad_floor.item()


def _check_code_match(code_fn, ours_fn, backend):
    """float64: the conventions agree to rounding. float32: tbkernels' error against the float64
    truth is at most 2x that of the public code run in float32, plus twice the effect of one
    float32 ulp in each per-sample error (the unavoidable rounding of float32 MSE outputs)."""
    (e_loss, e_grad), (loss, grad), _ = _ours_vs_code(code_fn, ours_fn, torch.float64, backend, 0)
    assert rel(loss, e_loss) <= 1e-12 and rel(grad, e_grad) <= 1e-12
    floors = _rounding_floor(ours_fn, code_fn.make(torch.float64, 0), backend)
    (c_loss, c_grad), (loss, grad), _ = _ours_vs_code(code_fn, ours_fn, torch.float32, backend, 0)
    for ours, code, exact, floor in ((loss, c_loss, e_loss, floors[0]),
                                     (grad, c_grad, e_grad, floors[1])):
        assert rel(ours, exact) <= 2 * rel(code, exact) + 2 * floor + 1e-6, \
            (rel(ours, exact), rel(code, exact), floor)


def _up(dtype):
    return (lambda t: t) if dtype == torch.float64 else _float


def salesforce_case(inputs, dtype):
    return salesforce_diffusion_dpo(inputs["model_pred"], inputs["ref_pred"], inputs["target"],
                                    5000.0, _up(dtype))[0]


def _salesforce_inputs(dtype, seed, B=3, shape=(4, 9, 11)):
    model_pred = rand((2 * B,) + shape, dtype, 20 + seed)
    return dict(model_pred=model_pred,
                ref_pred=model_pred + 0.05 * rand((2 * B,) + shape, dtype, 21 + seed),
                target=rand((2 * B,) + shape, dtype, 22 + seed))


salesforce_case.make = _salesforce_inputs


def salesforce_ours(inputs, backend):
    B = inputs["model_pred"].shape[0] // 2
    errs = tbkernels.per_sample_mse(inputs["model_pred"], inputs["target"], backend=backend)
    with torch.no_grad():
        ref = tbkernels.per_sample_mse(inputs["ref_pred"], inputs["target"], backend=backend)
    return tbkernels.diffusion_dpo_loss(errs[:B], errs[B:], ref[:B], ref[B:], beta=5000.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_dpo_matches_salesforce(backend):
    _available(backend)
    _check_code_match(salesforce_case, salesforce_ours, backend)
    # metrics: margins are Salesforce's inside_term, accuracies its implicit_acc
    inputs = _salesforce_inputs(torch.float64, 0)
    _, acc, inside = salesforce_diffusion_dpo(inputs["model_pred"], inputs["ref_pred"],
                                              inputs["target"], 5000.0, _up(torch.float64))
    _, metrics = salesforce_ours(inputs, backend)
    assert rel(metrics["rewards/margins"], inside.mean()) <= 1e-10
    assert metrics["rewards/accuracies"].item() == pytest.approx(acc.item())


def flow_grpo_case(inputs, dtype):
    return flow_grpo_flow_dpo(inputs["model_pred"], inputs["ref_pred"], inputs["x0"],
                              inputs["noise"], beta=100.0, up=_up(dtype))


def _flow_inputs(dtype, seed, B=2, shape=(16, 3, 6, 10)):
    model_pred = rand((2 * B,) + shape, dtype, 32 + seed)
    return dict(model_pred=model_pred, x0=rand((2 * B,) + shape, dtype, 30 + seed),
                noise=rand((B,) + shape, dtype, 31 + seed).repeat(2, 1, 1, 1, 1),  # per pair
                ref_pred=model_pred + 0.1 * rand((2 * B,) + shape, dtype, 33 + seed))


flow_grpo_case.make = _flow_inputs


def flow_grpo_ours(inputs, backend):
    B = inputs["model_pred"].shape[0] // 2
    target = inputs["noise"] - inputs["x0"]
    errs = tbkernels.per_sample_mse(inputs["model_pred"], target, backend=backend)
    ref = tbkernels.per_sample_mse(inputs["ref_pred"], target, backend=backend)
    return tbkernels.flow_dpo_loss(errs[:B], errs[B:], ref[:B], ref[B:], beta=100.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_dpo_matches_flow_grpo(backend):
    _available(backend)
    _check_code_match(flow_grpo_case, flow_grpo_ours, backend)


def test_flow_dpo_paper_schedule():
    """beta_t = beta (1 - t)^2 per sample: Diffusion-DPO with constant omega in velocity space."""
    Lw, Ll, rw, rl = (rand(5, seed=s).abs() for s in (40, 41, 42, 43))
    t = torch.rand(5, generator=torch.Generator().manual_seed(44), dtype=torch.float64)
    loss, _ = tbkernels.flow_dpo_loss(Lw, Ll, rw, rl, beta=7.0, timesteps=t,
                                      beta_schedule="paper")
    bt = 7.0 * (1 - t) ** 2
    exp = -F.logsigmoid(-(bt / 2) * ((Lw - rw) - (Ll - rl))).mean()
    assert err(loss, exp) <= 1e-14
    custom, _ = tbkernels.flow_dpo_loss(Lw, Ll, rw, rl, beta=7.0, timesteps=t,
                                        beta_schedule=lambda s: (1 - s) ** 2)
    assert err(custom, exp) <= 1e-14


def test_teleboost_preset_matches_dpo_loss_py():
    """Tele-AI/TeleBoost dpo_loss.py forward_step: reference-free, no 0.5, adv clamped to +-20
    inside the detached coefficient; two separately scaled backward terms."""
    beta = 0.05
    L = rand(6, seed=50).abs() * 10
    Lc = L[:3].clone().requires_grad_(True)
    Lr = L[3:].clone().requires_grad_(True)
    with torch.no_grad():
        Lr[0] += 60.0                                          # |adv| > 20: the clamp matters
    adv = (Lr - Lc).clamp(-20, 20)
    coeff = (beta * torch.sigmoid(-beta * adv) / adv.numel()).detach()
    ((-coeff * Lr).sum() + (coeff * Lc).sum()).backward()
    logged = -F.logsigmoid(beta * adv).mean()
    c2, r2 = Lc.detach().clone().requires_grad_(True), Lr.detach().clone().requires_grad_(True)
    loss, _ = tbkernels.flow_dpo_loss(c2, r2, beta=beta, preset="teleboost")
    loss.backward()
    assert err(loss, logged) <= 1e-14
    assert err(c2.grad, Lc.grad) <= 1e-16 and err(r2.grad, Lr.grad) <= 1e-16


def diffusion_kto_code(L, L_ref, y, beta, lam_d=1.0, lam_u=1.0):
    """jacklishufan/diffusion-kto train_kto_sd_v1.5.py ('none' offset, sigmoid halo), one rank."""
    g = (-L) - (-L_ref)
    z0 = torch.clamp(g.mean(), min=0).detach()
    sgn = 2 * y - 1
    h = torch.sigmoid(sgn * beta * (g - z0))
    w = torch.where(y == 1, torch.full_like(L, lam_d), torch.full_like(L, lam_u))
    return (w * (1 - h)).mean()


def test_kto_matches_diffusion_kto():
    L = (rand(7, seed=60).abs() * 0.1).requires_grad_(True)
    L_ref = rand(7, seed=61).abs() * 0.1
    y = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    exp = diffusion_kto_code(L, L_ref, y, beta=20.0, lam_d=1.0, lam_u=1.5)
    exp_grad, = torch.autograd.grad(exp, L)
    Ld = L.detach().requires_grad_(True)
    d, u = y.bool(), ~y.bool()
    loss, metrics = tbkernels.diffusion_kto_loss(Ld[d], Ld[u], L_ref[d], L_ref[u], beta=20.0,
                                                 lambda_undesirable=1.5)
    loss.backward()
    assert err(loss, exp) <= 1e-14
    # the permutation (desirable first) does not change the per-sample gradient
    assert err(Ld.grad, exp_grad) <= 1e-15
    ref_loss, ref_metrics = kto_reference(Ld[d].detach(), Ld[u].detach(), L_ref[d], L_ref[u],
                                          beta=20.0, lambda_undesirable=1.5)
    assert err(loss, ref_loss) <= 1e-14
    for k, v in ref_metrics.items():
        assert err(metrics[k], v) <= 1e-14, k


def test_metrics_trl_names_ties_and_regularisers():
    chosen = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    rejected = torch.tensor([2.0, 2.0, 1.0, 5.0], dtype=torch.float64)
    real = torch.tensor([0.5, 1.5], dtype=torch.float64)
    loss, m = tbkernels.diffusion_dpo_loss(chosen, rejected, beta=2.0, nll_chosen_weight=0.2,
                                           real=real, nll_real_weight=0.1)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert name in m and m[name].dim() == 0 and not m[name].requires_grad
    # rewards = (beta/2) * (-L); chosen better in pairs 0 and 3, tie in pair 1
    assert m["rewards/accuracies"].item() == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["rewards/chosen"].item() == pytest.approx(-chosen.mean().item())
    assert m["logps/rejected"].item() == pytest.approx(-rejected.mean().item())
    assert m["rewards/margins"].item() == pytest.approx(
        (m["rewards/chosen"] - m["rewards/rejected"]).item())
    dpo = -F.logsigmoid(-(chosen - rejected)).mean()
    assert loss.item() == pytest.approx((dpo + 0.2 * chosen.mean() + 0.1 * real.mean()).item())
    assert m["loss/dpo"].item() == pytest.approx(dpo.item())
    ref_loss, ref_m = dpo_reference(chosen, rejected, beta=2.0, nll_chosen_weight=0.2, real=real,
                                    nll_real_weight=0.1)
    assert loss.item() == pytest.approx(ref_loss.item())
    for k, v in ref_m.items():
        assert m[k].item() == pytest.approx(v.item()), k


def test_loss_gradcheck():
    c, r = (rand(4, seed=s).abs().requires_grad_(True) for s in (70, 71))
    rc, rr, real = rand(4, seed=72).abs(), rand(4, seed=73).abs(), rand(3, seed=74).abs()
    t = torch.tensor([0.1, 0.5, 0.7, 0.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: tbkernels.flow_dpo_loss(a, b, rc, rr, beta=3.0, timesteps=t,
                                             beta_schedule="paper", nll_chosen_weight=0.2,
                                             real=real, nll_real_weight=0.1)[0], (c, r))
    assert torch.autograd.gradcheck(
        lambda a, b: tbkernels.diffusion_kto_loss(a, b, rc, rr, beta=3.0)[0], (c, r))


def test_loss_errors():
    a, b = torch.rand(4), torch.rand(4)
    with pytest.raises(DPOInputError, match="rejected has shape"):
        tbkernels.flow_dpo_loss(a, torch.rand(5))
    with pytest.raises(DPOInputError, match="ref_chosen has shape"):
        tbkernels.diffusion_dpo_loss(a, b, torch.rand(3), torch.rand(4))
    for refs in ((torch.rand(4), None), (None, torch.rand(4))):
        with pytest.raises(DPOInputError, match="give both ref_chosen and ref_rejected"):
            tbkernels.diffusion_dpo_loss(a, b, *refs)
        with pytest.raises(DPOInputError, match="give both ref_desirable and ref_undesirable"):
            tbkernels.diffusion_kto_loss(a, b, *refs)
    for beta in (0.0, -1.0, float("nan"), float("inf"), torch.tensor(float("inf")),
                 torch.tensor(float("nan")), torch.tensor(-2.0)):
        with pytest.raises(DPOInputError, match="beta"):
            tbkernels.flow_dpo_loss(a, b, beta=beta)
    with pytest.raises(DPOInputError, match=r"empty \(B = 0\)"):
        tbkernels.flow_dpo_loss(torch.rand(0), torch.rand(0))
    with pytest.raises(DPOInputError, match="both empty"):
        tbkernels.diffusion_kto_loss(torch.rand(0), torch.rand(0))
    t = torch.rand(4)
    with pytest.raises(DPOInputError, match=r"timesteps must be a \[B\] = \[4\] tensor"):
        tbkernels.flow_dpo_loss(a, b, timesteps=t.view(-1, 1), beta_schedule=lambda s: (1 - s) ** 2)
    with pytest.raises(DPOInputError, match="must return a"):
        tbkernels.flow_dpo_loss(a, b, timesteps=t, beta_schedule=lambda s: s.view(-1, 1))
    with pytest.raises(DPOInputError, match="finite and >= 0"):
        tbkernels.flow_dpo_loss(a, b, timesteps=t, beta_schedule=lambda s: s - 2)
    with pytest.raises(DPOInputError, match=r"shape \[B\]"):
        tbkernels.flow_dpo_loss(a.view(2, 2), b.view(2, 2))
    with pytest.raises(DPOInputError, match="needs timesteps"):
        tbkernels.flow_dpo_loss(a, b, beta_schedule="paper")
    with pytest.raises(DPOInputError, match=r"in \[0, 1\]"):
        tbkernels.flow_dpo_loss(a, b, timesteps=torch.full((4,), 500.0), beta_schedule="paper")
    with pytest.raises(NonFiniteLossError, match=r"chosen\[2\] = nan"):
        tbkernels.flow_dpo_loss(torch.tensor([1.0, 2.0, float("nan"), 3.0]), b)
    with pytest.raises(NonFiniteLossError):
        tbkernels.diffusion_kto_loss(torch.tensor([float("inf")]), b)
    with pytest.raises(DPOInputError, match="nll_real_weight needs real"):
        tbkernels.flow_dpo_loss(a, b, nll_real_weight=0.1)
    loss, _ = tbkernels.flow_dpo_loss(torch.tensor([float("nan")] * 4), b, check_finite=False)
    assert torch.isnan(loss)


def _tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 8)).to(dtype)


def _branches(model, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    xw, xl, tw, tl = (torch.randn(4, 3, 8, generator=g).to(dtype) for _ in range(4))
    return (lambda: ((model(xw) - tw) ** 2).mean((1, 2)),
            lambda: ((model(xl) - tl) ** 2).mean((1, 2)))


@pytest.mark.parametrize("mode", ["decoupled", "recompute"])
def test_parameter_gradient_hooks_are_warned_about(mode):
    """The two-backward modes run a parameter's hooks once per branch, with partial gradients:
    an optimizer stepped from register_post_accumulate_grad_hook took the first branch's share
    as a step (found by audit). They say so; standard mode, and no hooks, stay quiet."""
    model = _tiny_model()
    cf, rf = _branches(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tbkernels.dpo_backward(cf, rf, beta=100.0, mode=mode, model=model)
        tbkernels.dpo_backward(cf, rf, beta=100.0, mode=mode)        # leaves from the graph
    calls = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    for kw in (dict(model=model), {}):
        with pytest.warns(RuntimeWarning, match="gradient hooks .* once per branch"):
            tbkernels.dpo_backward(cf, rf, beta=100.0, mode=mode, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calls.clear()
        tbkernels.dpo_backward(cf, rf, beta=100.0, mode="standard", model=model)
    assert calls == [1]


@pytest.mark.parametrize("mode", ["decoupled", "recompute"])
def test_dpo_backward_under_torch_compile_matches_standard(mode):
    """The whole call compiled (backend="eager": Dynamo's tracing without Inductor's codegen)
    gives standard's gradients; the hook check stays out of the trace."""
    torch._dynamo.reset()
    model = _tiny_model(3)
    cf, rf = _branches(model, seed=4)
    torch.compile(lambda: tbkernels.dpo_backward(cf, rf, beta=100.0, mode=mode, model=model),
                  backend="eager")()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    tbkernels.dpo_backward(cf, rf, beta=100.0, mode="standard", model=model)
    assert max_rel(got, [p.grad for p in model.parameters()]) <= 1e-5


def test_float16_errors_with_a_grad_scaler_match_standard():
    """float16 per-sample errors and GradScaler's default scale (65536 > float16's 65504): the
    two-backward modes built their surrogate in float16 and seeded the backward with inf (NaN
    gradients, skipped steps) where standard mode, computing its loss in float32, was finite."""
    grads = {}
    for mode in ("standard", "decoupled", "recompute"):
        model = _tiny_model(dtype=torch.float16)
        cf, rf = _branches(model, torch.float16)
        scaler = torch.amp.GradScaler("cpu")
        tbkernels.dpo_backward(cf, rf, beta=1.0, mode=mode, model=model, scaler=scaler)
        grads[mode] = [p.grad.float() for p in model.parameters()]
        assert all(torch.isfinite(g).all() for g in grads[mode]), mode
    for mode in ("decoupled", "recompute"):
        assert max_rel(grads[mode], grads["standard"]) < 2e-2, mode


def test_atomic_restores_sparse_gradients():
    """nn.Embedding(sparse=True): the restore copied into a sparse gradient's detach(), a new
    tensor, so a failed call left the rejected branch's gradient in .grad."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleList([emb, lin])
    idx_w, idx_l = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[2, 8, 3], [0, 5, 9]])
    tw, tl = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    emb(idx_w).sum().backward()
    before = emb.weight.grad.to_dense().clone()
    lin_before = lin.weight.grad
    calls = [0]

    def chosen():
        calls[0] += 1
        if calls[0] == 2:                       # fails when recomputed, after rejected's backward
            raise KeyError("boom")
        return tbkernels.per_sample_mse(lin(emb(idx_w)), tw)
    with pytest.raises(KeyError):
        tbkernels.dpo_backward(chosen, lambda: tbkernels.per_sample_mse(lin(emb(idx_l)), tl),
                               beta=100.0, mode="recompute", model=model)
    assert torch.equal(emb.weight.grad.to_dense(), before)
    assert lin.weight.grad is lin_before is None


def test_scale_as_numpy_or_tensor_and_reserved_loss_options():
    """scale took only Python numbers ("must be a finite number > 0, got 0.25" for
    numpy.float32(0.25)); a loss option dpo_backward sets itself (real=, ref_desirable=) failed
    inside the loss, after both forwards, with a bare TypeError."""
    np = pytest.importorskip("numpy")
    a, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    expected = None
    for scale in (0.25, np.float32(0.25), torch.tensor(0.25)):
        w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        tbkernels.dpo_backward(lambda: a + w, lambda: b + w, beta=5.0, scale=scale)
        expected = w.grad if expected is None else expected
        assert torch.equal(w.grad, expected)
    calls = []

    def chosen():
        calls.append(1)
        return a.clone().requires_grad_(True)
    for loss, option, hint in (("flow_dpo", "real", "real_fn="),
                               ("kto", "ref_desirable", "ref_chosen="),
                               ("diffusion_dpo", "rejected", "rejected_fn=")):
        with pytest.raises(DPOInputError, match=f"{option}= is set by dpo_backward.*{hint}"):
            tbkernels.dpo_backward(chosen, chosen, beta=5.0, loss=loss, **{option: a})
    assert calls == []                         # refused before any forward


def test_numpy_beta_and_one_sided_kto():
    """beta as a NumPy scalar equals the same Python float; KTO is unpaired, so a batch with
    only desirable samples is valid."""
    np = pytest.importorskip("numpy")
    a, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    for beta in (np.float32(5.0), np.int64(5), np.float64(5.0)):
        got, _ = tbkernels.flow_dpo_loss(a, b, beta=beta)
        assert got.item() == tbkernels.flow_dpo_loss(a, b, beta=float(beta))[0].item()
    empty = torch.rand(0, dtype=torch.float64)
    loss, m = tbkernels.diffusion_kto_loss(a, empty, beta=2.0)
    assert torch.isfinite(loss)
    # the present side's metrics are numbers, the empty side's (and the pairwise ones) NaN
    assert torch.isfinite(m["rewards/chosen"]) and torch.isfinite(m["logps/chosen"])
    for key in ("rewards/rejected", "logps/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.isnan(m[key]), key
    loss, m = tbkernels.diffusion_kto_loss(empty, b, beta=2.0)
    assert torch.isfinite(loss) and torch.isfinite(m["rewards/rejected"])
    assert torch.isnan(m["rewards/chosen"])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_fullgraph(backend):
    """per_sample_mse + Flow-DPO under torch.compile(fullgraph=True), forward and backward."""
    _available(backend)
    torch._dynamo.reset()
    shape = (2, 4, 2, 5, 6)
    target = rand(shape, torch.float32, 80)
    ref = torch.tensor([0.9, 1.1], device=DEVICE)
    t = torch.tensor([0.3, 0.8], device=DEVICE)

    def step(pred):
        e = tbkernels.per_sample_mse(pred, target, backend=backend)
        loss, m = tbkernels.flow_dpo_loss(e[:1], e[1:], ref[:1], ref[1:], beta=50.0,
                                          timesteps=t[:1], beta_schedule="paper",
                                          nll_chosen_weight=0.2)
        return loss, m["rewards/accuracies"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        pred = rand(shape, torch.float32, 81).requires_grad_(True)
        loss, acc = fn(pred)
        loss.backward()
        results.append((loss.detach(), acc, pred.grad))
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss,kw", [
    ("diffusion_dpo", {}), ("flow_dpo", {}),
    ("flow_dpo", {"beta_schedule": "paper", "timesteps": True}), ("kto", {})])
def test_compile_fullgraph_when_beta_changes(loss, kw):
    """beta changing between calls (a schedule): Dynamo recompiles with beta as a symbolic float,
    and _check_beta's math.isfinite(beta) failed the fullgraph trace ("torch.* op returned
    non-Tensor"; found 2026-11-22). Comparisons trace; each value matches eager, and a bad beta
    is still refused."""
    torch._dynamo.reset()
    fn = {"diffusion_dpo": tbkernels.diffusion_dpo_loss, "flow_dpo": tbkernels.flow_dpo_loss,
          "kto": tbkernels.diffusion_kto_loss}[loss]
    c, r, rc, rr = (rand((4,), torch.float32, seed) for seed in (90, 91, 92, 93))
    if kw.get("timesteps"):
        kw = dict(kw, timesteps=rand((4,), torch.float32, 94).clamp(0, 1))

    def step(chosen, beta):
        return fn(chosen, r, rc, rr, beta=beta, **kw)[0]
    compiled = torch.compile(step, fullgraph=True)
    for beta in (100.0, 50.0, 20.0):
        torch.testing.assert_close(value_and_grad(compiled, c, beta), value_and_grad(step, c, beta))
    with pytest.raises(Exception, match="beta"):
        compiled(c, -1.0)


def test_checks_are_not_compiled_as_frames_of_their_own():
    """When Dynamo runs a frame eagerly (after giving up on it without fullgraph=True) it compiles
    each function that frame calls as a frame of its own, where is_compiling() is true: a value
    check skipped itself there. Marked helpers (ops/_compile.py) run eagerly in that case: a
    tensor beta <= 0 given straight to the compiled check is refused."""
    torch._dynamo.reset()
    with pytest.raises(DPOInputError, match="finite number > 0"):
        torch.compile(dpo_mod._check_beta)(torch.tensor(-1.0))
    with pytest.raises(DPOInputError, match="timesteps must be flow-matching noise levels"):
        torch.compile(dpo_mod._beta_weight)("paper", torch.tensor([2.0, 0.5]), 2)


# ---------------------------------------------------------------------------------------------
# dpo_backward

class TinyNet(torch.nn.Module):
    """A small denoiser: per-position MLP over a [B, C, T, H, W] latent (so each sample's
    activations are separate), with optional dropout and activation checkpointing."""

    def __init__(self, c=4, hidden=24, dropout=0.0, checkpoint=False):
        super().__init__()
        self.l1 = torch.nn.Linear(c, hidden)
        self.l2 = torch.nn.Linear(hidden, hidden)
        self.l3 = torch.nn.Linear(hidden, c)
        self.drop = torch.nn.Dropout(dropout)
        self.checkpoint = checkpoint

    def _body(self, h):
        return self.l2(self.drop(F.gelu(self.l1(h))))

    def forward(self, x):
        h = x.movedim(1, -1)
        if self.checkpoint and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(self._body, h, use_reentrant=False)
        else:
            h = self._body(h)
        return self.l3(F.gelu(h)).movedim(-1, 1)


def make_data(B=3, shape=(4, 2, 3, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    return dict(xw=r(B, *shape), xl=r(B, *shape), tw=r(B, *shape), tl=r(B, *shape),
                xr=r(2, *shape), tr=r(2, *shape),
                ref_w=(torch.rand(B, generator=g) + 1.5).to(DEVICE),
                ref_l=(torch.rand(B, generator=g) + 1.5).to(DEVICE),
                t=torch.rand(B, generator=g).to(DEVICE))


def branch(model, x, t):
    return lambda: tbkernels.per_sample_mse(model(x), t)


def grads(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def max_rel(ga, gb):
    return max(rel(a, b) for a, b in zip(ga, gb))


def manual_standard(model, d, loss, beta, refs, nll_chosen, real_w, options):
    """The plain DPO step users write: both errors, the loss, one backward."""
    model.zero_grad(set_to_none=True)
    Lw = tbkernels.per_sample_mse(model(d["xw"]), d["tw"])
    Ll = tbkernels.per_sample_mse(model(d["xl"]), d["tl"])
    real = tbkernels.per_sample_mse(model(d["xr"]), d["tr"]) if real_w else None
    rc, rr = (d["ref_w"], d["ref_l"]) if refs else (None, None)
    if loss == "kto":
        value, _ = tbkernels.diffusion_kto_loss(Lw, Ll[:2], rc, None if rr is None else rr[:2],
                                                beta=beta, nll_chosen_weight=nll_chosen,
                                                real=real, nll_real_weight=real_w)
    elif loss == "diffusion_dpo":
        value, _ = tbkernels.diffusion_dpo_loss(Lw, Ll, rc, rr, beta=beta,
                                                nll_chosen_weight=nll_chosen, real=real,
                                                nll_real_weight=real_w)
    else:
        value, _ = tbkernels.flow_dpo_loss(Lw, Ll, rc, rr, beta=beta, nll_chosen_weight=nll_chosen,
                                           real=real, nll_real_weight=real_w,
                                           preset="teleboost" if loss == "teleboost" else
                                           "flow_grpo", **options)
    value.backward()
    return value.detach(), grads(model)


LOSS_CASES = {
    "diffusion_dpo": ("diffusion_dpo", 50.0, {}),
    "flow_dpo": ("flow_dpo", 20.0, {}),
    "flow_dpo_paper": ("flow_dpo", 20.0, {"beta_schedule": "paper"}),
    "teleboost": ("teleboost", 2.0, {}),
    "kto": ("kto", 5.0, {}),
}


@pytest.mark.parametrize("mode", ["standard", "decoupled", "recompute"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
@pytest.mark.parametrize("refs", [False, True], ids=["ref_free", "ref"])
@pytest.mark.parametrize("regs", [False, True], ids=["plain", "nll_regs"])
def test_modes_give_standard_gradients(mode, case, refs, regs):
    loss, beta, options = LOSS_CASES[case]
    if loss == "teleboost" and refs:
        pytest.skip("TeleBoost's form is reference-free")
    torch.manual_seed(0)
    model = TinyNet().to(DEVICE)
    d = make_data()
    if "beta_schedule" in options:
        options = dict(options, timesteps=d["t"])
    nll_chosen, real_w = (0.2, 0.1) if regs else (0.0, 0.0)
    exp_loss, exp_grads = manual_standard(model, d, loss, beta, refs, nll_chosen, real_w, options)
    model.zero_grad(set_to_none=True)
    rejected = branch(model, d["xl"][:2] if loss == "kto" else d["xl"],
                      d["tl"][:2] if loss == "kto" else d["tl"])
    value, metrics = tbkernels.dpo_backward(
        branch(model, d["xw"], d["tw"]), rejected, beta=beta, loss=loss, mode=mode,
        ref_chosen=d["ref_w"] if refs else None,
        ref_rejected=(d["ref_l"][:2] if loss == "kto" else d["ref_l"]) if refs else None,
        real_fn=branch(model, d["xr"], d["tr"]) if regs else None, nll_real_weight=real_w,
        nll_chosen_weight=nll_chosen, **options)
    assert rel(value, exp_loss) <= 1e-6
    assert max_rel(grads(model), exp_grads) <= 1e-5
    assert "rewards/accuracies" in metrics and "logps/chosen" in metrics
    if regs:
        assert "nll/real" in metrics and "nll/chosen" in metrics


@pytest.mark.parametrize("mode", ["standard", "decoupled", "recompute"])
def test_real_fn_without_weight_only_logs(mode):
    """real_fn with nll_real_weight = 0 only logs nll/real: it runs once, without grad (no
    backward of zeros), and the loss and gradients are those of the call without it."""
    torch.manual_seed(3)
    model = TinyNet().to(DEVICE)
    d = make_data(seed=3)
    calls = []

    def real():
        calls.append(torch.is_grad_enabled())
        return branch(model, d["xr"], d["tr"])()

    value0, _ = tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                       branch(model, d["xl"], d["tl"]), beta=10.0, mode=mode)
    g0 = grads(model)
    model.zero_grad(set_to_none=True)
    value, metrics = tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                            branch(model, d["xl"], d["tl"]), beta=10.0,
                                            mode=mode, real_fn=real)
    assert calls == [False]
    assert torch.equal(value, value0) and max_rel(grads(model), g0) == 0
    exp = branch(model, d["xr"], d["tr"])().detach().mean()
    assert torch.allclose(metrics["nll/real"], exp.to(metrics["nll/real"].dtype))


def test_gradient_accumulation_and_scale():
    torch.manual_seed(1)
    model = TinyNet().to(DEVICE)
    d1, d2 = make_data(seed=1), make_data(seed=2)
    per_step = []
    for d in (d1, d2):
        model.zero_grad(set_to_none=True)
        tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]), branch(model, d["xl"], d["tl"]),
                               beta=10.0, mode="standard")
        per_step.append(grads(model))
    for mode in ("decoupled", "recompute"):
        model.zero_grad(set_to_none=True)
        for d in (d1, d2):
            tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                   branch(model, d["xl"], d["tl"]), beta=10.0, mode=mode,
                                   scale=0.5, model=model)
        exp = [0.5 * (a + b) for a, b in zip(*per_step)]
        assert max_rel(grads(model), exp) <= 1e-5


def test_autocast_and_grad_scaler():
    """bf16 autocast: every mode within the DESIGN.md rule of the float64 standard gradient
    (error at most 2x that of standard DPO computed under the same autocast); GradScaler's
    power-of-two scale multiplies the gradients exactly."""
    torch.manual_seed(2)
    model = TinyNet(hidden=32).to(DEVICE)
    d = make_data(B=4, shape=(4, 3, 6, 6))
    model64 = TinyNet(hidden=32).to(DEVICE).double()
    model64.load_state_dict(model.state_dict())
    d64 = {k: v.double() for k, v in d.items()}
    exact = manual_standard(model64, d64, "flow_dpo", 20.0, True, 0.0, 0.0, {})[1]

    def run(mode, scaler=None):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                   branch(model, d["xl"], d["tl"]), beta=20.0, mode=mode,
                                   ref_chosen=d["ref_w"], ref_rejected=d["ref_l"], scaler=scaler)
        return grads(model)

    eager = run("standard")
    e_eager = max(err(a, b) / b.abs().max().item() for a, b in zip(eager, exact))
    for mode in ("decoupled", "recompute"):
        g = run(mode)
        e_mode = max(err(a, b) / b.abs().max().item() for a, b in zip(g, exact))
        assert e_mode <= 2 * e_eager + 2 * torch.finfo(torch.bfloat16).eps, (mode, e_mode, e_eager)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
        scaled = run(mode, scaler)
        assert max_rel([s / 1024.0 for s in scaled], g) <= 1e-6


@pytest.mark.parametrize("mode", ["decoupled", "recompute"])
def test_activation_checkpointing_and_dropout_replay(mode):
    torch.manual_seed(3)
    plain = TinyNet(dropout=0.3).to(DEVICE)
    ckpt = TinyNet(dropout=0.3, checkpoint=True).to(DEVICE)
    ckpt.load_state_dict(plain.state_dict())
    d = make_data(seed=3)
    out = []
    for model, m in ((plain, "standard"), (ckpt, mode)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)                     # same dropout masks in both runs
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # recompute must replay chosen_fn's RNG
            tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                   branch(model, d["xl"], d["tl"]), beta=20.0, mode=m)
        out.append(grads(model))
    assert max_rel(out[1], out[0]) <= 1e-5


class LiveSaved:
    """Bytes of autograd-saved tensors alive at any moment (saved_tensors_hooks), and the peak."""

    def __init__(self):
        self.cur = self.peak = 0

    def hooks(self):
        live = self

        class Held:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                live.cur += self.n
                live.peak = max(live.peak, live.cur)

            def __del__(self):
                live.cur -= self.n

        return torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t)


def test_recompute_keeps_one_branch_alive():
    """The memory claim measured exactly (no allocator noise): peak bytes of saved activations.
    standard and decoupled keep both branches (decoupled never more than standard); recompute
    about half."""
    torch.manual_seed(4)
    model = TinyNet(hidden=64).to(DEVICE)
    d = make_data(B=2, shape=(4, 4, 8, 8))
    peaks = {}
    for mode in ("standard", "decoupled", "recompute"):
        model.zero_grad(set_to_none=True)
        live = LiveSaved()
        with live.hooks():
            tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                   branch(model, d["xl"], d["tl"]), beta=20.0, mode=mode)
        assert live.cur == 0
        peaks[mode] = live.peak
    assert peaks["decoupled"] <= peaks["standard"]
    assert peaks["recompute"] <= 0.55 * peaks["standard"], peaks


def test_dpo_backward_errors_leave_grads_untouched():
    torch.manual_seed(5)
    model = TinyNet().to(DEVICE)
    d = make_data()
    cw, cl = branch(model, d["xw"], d["tw"]), branch(model, d["xl"], d["tl"])
    with pytest.raises(DPOInputError, match="rejected_fn\\(\\) \\[2\\]|returned shape"):
        tbkernels.dpo_backward(cw, branch(model, d["xl"][:2], d["tl"][:2]), beta=1.0)
    with pytest.raises(DPOInputError, match="beta"):
        tbkernels.dpo_backward(cw, cl, beta=0.0)
    with pytest.raises(DPOInputError, match="beta"):
        tbkernels.dpo_backward(cw, cl, beta=-3.0, mode="recompute")
    with pytest.raises(DPOInputError, match="mode must be"):
        tbkernels.dpo_backward(cw, cl, beta=1.0, mode="fast")
    with pytest.raises(DPOInputError, match="do not require grad"):
        tbkernels.dpo_backward(lambda: cw().detach(), cl, beta=1.0)
    with pytest.raises(DPOInputError, match="loss must be"):
        tbkernels.dpo_backward(cw, cl, beta=1.0, loss="ipo")
    nan_fn = lambda: cl() * float("nan")  # noqa: E731
    for mode in ("standard", "decoupled", "recompute"):
        model.zero_grad(set_to_none=True)
        with pytest.raises(NonFiniteLossError):
            tbkernels.dpo_backward(cw, nan_fn, beta=1.0, mode=mode)
        assert all(p.grad is None for p in model.parameters()), mode


def _fail_on_call(fn, n):
    calls = {"n": 0}

    def wrapped():
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated failure")
        return fn()
    return wrapped


@pytest.mark.parametrize("given", ["model", "params", "graph"])
@pytest.mark.parametrize("failure", ["second_backward", "recompute_forward", "real_nan"])
def test_failed_backward_restores_grads(failure, given):
    """A failure after a branch's gradients were accumulated leaves .grad exactly as before:
    existing gradients (accumulation) unchanged, None stays None."""
    torch.manual_seed(6)
    model = TinyNet().to(DEVICE)
    d = make_data()
    # a previous micro-batch's gradients on some parameters, none on the others
    model.zero_grad(set_to_none=True)
    tbkernels.per_sample_mse(model(d["xr"]), d["tr"]).sum().backward()
    model.l3.weight.grad = None
    before = grads(model)
    kw = {"model": dict(model=model), "params": dict(params=model.parameters()),
          "graph": {}}[given]
    cw, cl = branch(model, d["xw"], d["tw"]), branch(model, d["xl"], d["tl"])
    if failure == "second_backward":
        def rejected():
            out = cl()
            out.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("simulated failure")))
            return out
        call = dict(chosen_fn=cw, rejected_fn=rejected, mode="decoupled")
    elif failure == "recompute_forward":
        call = dict(chosen_fn=_fail_on_call(cw, 2), rejected_fn=cl, mode="recompute")
    else:
        call = dict(chosen_fn=cw, rejected_fn=cl, mode="decoupled",
                    real_fn=lambda: branch(model, d["xr"], d["tr"])() * float("nan"),
                    nll_real_weight=0.1)
    with pytest.raises((RuntimeError, NonFiniteLossError)):
        tbkernels.dpo_backward(beta=5.0, **call, **kw)
    after = grads(model)
    for a, b in zip(after, before):
        assert (a is None and b is None) or torch.equal(a, b)
    # and the same call without the failure does change them
    tbkernels.dpo_backward(cw, cl, beta=5.0, mode="decoupled", **kw)
    assert model.l3.weight.grad is not None


def test_recompute_warns_on_nondeterministic_chosen_fn():
    model = TinyNet().to(DEVICE)
    d = make_data()
    noisy = lambda: tbkernels.per_sample_mse(  # noqa: E731
        model(d["xw"] + torch.randn(d["xw"].shape, generator=gen)), d["tw"])
    gen = torch.Generator().manual_seed(0)       # not the global RNG: not replayed
    with pytest.warns(RuntimeWarning, match="different values"):
        tbkernels.dpo_backward(noisy, branch(model, d["xl"], d["tl"]), beta=5.0,
                               mode="recompute")


@pytest.mark.parametrize("accumulate", [False, True])
def test_recompute_refuses_non_finite_recomputed_errors(accumulate):
    """chosen_fn finite on its first call and NaN when recomputed (an overflow that happens only
    the second time): the backward through it put NaN in every gradient, with only the drift
    warning as a signal (found by audit). Now NonFiniteLossError, and the gradients (here one
    micro-batch already accumulated) come back exactly as before the call."""
    model = TinyNet().to(DEVICE)
    d = make_data()
    if accumulate:
        tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]), branch(model, d["xl"], d["tl"]),
                               beta=5.0, mode="standard")
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    calls = []

    def chosen():
        calls.append(1)
        e = tbkernels.per_sample_mse(model(d["xw"]), d["tw"])
        return e * math.nan if len(calls) == 2 else e
    with pytest.raises(NonFiniteLossError, match=r"recomputed\) returned a non-finite error"):
        tbkernels.dpo_backward(chosen, branch(model, d["xl"], d["tl"]), beta=5.0,
                               mode="recompute", model=model)
    assert len(calls) == 2
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n


# --- DDP (gloo, CPU) ------------------------------------------------------------------------

# every memory mode, and decoupled with a real-data branch (its sync path differs)
DIST_MODES = ("standard", "decoupled", "recompute", "decoupled+real")


def _ddp_work(rank):
    out = {}
    for mode in DIST_MODES:
        torch.manual_seed(0)
        model = TinyNet()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        d = make_data(seed=10 + rank)
        real = mode.endswith("+real")
        for step in range(2):                       # two steps: the reducer re-arms
            model.zero_grad(set_to_none=True)
            tbkernels.dpo_backward(
                lambda: tbkernels.per_sample_mse(ddp(d["xw"]), d["tw"]),
                lambda: tbkernels.per_sample_mse(ddp(d["xl"]), d["tl"]), beta=10.0,
                mode=mode.split("+")[0], model=ddp, ref_chosen=d["ref_w"],
                ref_rejected=d["ref_l"],
                real_fn=((lambda: tbkernels.per_sample_mse(ddp(d["xr"]), d["tr"]))
                         if real else None),
                nll_real_weight=0.1 if real else 0.0)
        # numpy arrays pickle by value (tensors would travel as fds of an exiting process)
        out[mode] = [p.grad.double().numpy().copy() for p in model.parameters()]
    return out


def _run_two_ranks(worker, tmp_path, while_waiting=None, timeout=180):
    """Spawn 2 gloo ranks running ``worker(rank, world, init_file, queue, stack_file)``, call
    ``while_waiting()`` meanwhile, and return ``(its result, {rank: result})``. A rank that dies
    or hangs fails the test with its exit code and every thread's stack."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stack_files = [tmp_path / f"rank{r}.stacks" for r in range(2)]
    procs = [ctx.Process(target=worker,
                         args=(r, 2, str(tmp_path / "init"), queue, str(stack_files[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    local = while_waiting() if while_waiting else None
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs):
        try:
            rank, res = queue.get(timeout=1.0)
            got[rank] = res
            continue
        except queue_module.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in got]
        if dead or time.monotonic() > deadline:
            time.sleep(1.0)                             # a result may still be in flight
            while not queue.empty():
                rank, res = queue.get()
                got[rank] = res
            missing = [r for r in range(len(procs)) if r not in got]
            if not missing:
                break
            for p in procs:
                if p.exitcode is None:
                    p.terminate()
            report = "\n".join(
                f"rank {r}: exit code {procs[r].exitcode}; stacks:\n"
                + (stack_files[r].read_text() if stack_files[r].exists() else "(none)")
                for r in missing)
            pytest.fail(f"ranks {missing} sent no result:\n{report}")
    for p in procs:
        p.join(timeout=60)
    for rank, res in got.items():
        assert not isinstance(res, str), f"rank {rank} failed:\n{res}"
    assert all(p.exitcode == 0 for p in procs)
    return local, got


def _start_rank(rank, world, init_file, stack_file):
    import datetime
    import faulthandler

    import torch.distributed as dist
    if stack_file:
        # a rank that hangs writes every thread's stack here and exits, so the test can say where
        stacks = open(stack_file, "w")
        faulthandler.dump_traceback_later(120, exit=True, file=stacks)
        faulthandler.enable(file=stacks)                # and a rank that crashes, where it did
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _rank_main(work, rank, world, init_file, queue, stack_file=None):
    """A spawned rank: join the gloo group, run ``work(rank)``, send its result (or traceback)."""
    import traceback
    try:
        _start_rank(rank, world, init_file, stack_file)
        result, code = (rank, work(rank)), 0
    except BaseException:
        result, code = (rank, traceback.format_exc()), 1
    _finish_rank(queue, result, code)


def _finish_rank(queue, result, code):
    # Flush the result to the pipe, then leave at once: every collective has completed on both
    # ranks by now, and interpreter teardown (DDP reducer and gloo destructors, atexit hooks) was
    # seen to hang a rank now and then on a loaded 2-core machine, with its result still unsent.
    import os
    queue.put(result)
    queue.close()
    queue.join_thread()
    os._exit(code)


def _per_rank_standard_average(modes, steps=1):
    """The single-process truth: the mean over ranks of each rank's standard-mode gradient."""
    expected = {}
    for mode in modes:
        per_rank = []
        for rank in range(2):
            torch.manual_seed(0)
            model = TinyNet()
            d = make_data(seed=10 + rank)
            real = mode.endswith("+real")
            for _ in range(steps):
                tbkernels.dpo_backward(branch(model, d["xw"], d["tw"]),
                                       branch(model, d["xl"], d["tl"]), beta=10.0,
                                       mode="standard", ref_chosen=d["ref_w"],
                                       ref_rejected=d["ref_l"],
                                       real_fn=branch(model, d["xr"], d["tr"]) if real else None,
                                       nll_real_weight=0.1 if real else 0.0)
            per_rank.append(grads(model))
        expected[mode] = [(a + b) / 2 for a, b in zip(*per_rank)]
    return expected


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_two_processes(tmp_path):
    """2 gloo ranks, different data: every mode leaves the average of the per-rank standard
    gradients on both ranks (exactly one all-reduce per step, none lost, none doubled)."""
    expected, got = _run_two_ranks(functools.partial(_rank_main, _ddp_work), tmp_path,
                                   lambda: _per_rank_standard_average(DIST_MODES))
    for mode in DIST_MODES:
        for rank in (0, 1):
            g = [torch.from_numpy(a) for a in got[rank][mode]]
            assert max_rel(g, expected[mode]) <= 1e-5, (mode, rank)


def _failing_branch(model, x, t):
    """A branch whose forward succeeds and whose backward raises: the failure comes after the
    other branch's gradients were already written (and, under FSDP, reduce-scattered)."""
    def run():
        out = tbkernels.per_sample_mse(model(x), t)
        out.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("simulated failure")))
        return out
    return run


def _raises(step) -> bool:
    try:
        step()
    except RuntimeError:
        return True
    return False


# --- FSDP2 (fully_shard, gloo, CPU) ---------------------------------------------------------


def _fsdp_work(rank):
    from torch.distributed.fsdp import fully_shard
    out = {}
    for mode in DIST_MODES:
        torch.manual_seed(0)
        model = TinyNet()
        for layer in (model.l1, model.l2, model.l3):
            fully_shard(layer)
        fully_shard(model)
        d = make_data(seed=10 + rank)
        real = mode.endswith("+real")

        def step(rejected=None):
            tbkernels.dpo_backward(
                lambda: tbkernels.per_sample_mse(model(d["xw"]), d["tw"]),
                rejected or (lambda: tbkernels.per_sample_mse(model(d["xl"]), d["tl"])),
                beta=10.0, mode=mode.split("+")[0], model=model, ref_chosen=d["ref_w"],
                ref_rejected=d["ref_l"],
                real_fn=((lambda: tbkernels.per_sample_mse(model(d["xr"]), d["tr"]))
                         if real else None),
                nll_real_weight=0.1 if real else 0.0)

        full = lambda: [p.grad.full_tensor().double().numpy().copy()  # noqa: E731
                        for p in model.parameters()]
        step()
        step()                                      # accumulates into the sharded .grad
        after_two = full()

        raised = _raises(lambda: step(_failing_branch(model, d["xl"], d["tl"])))
        # sharded DTensor gradients: one reduce-scatter per branch backward; a failure
        # after the first branch was reduced must leave them as they were
        out[mode] = dict(two_steps=after_two, raised=raised,
                         after_failure=full(), sharded=[
                             type(p).__name__ for p in model.parameters()])
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_fsdp2_two_processes(tmp_path):
    """FSDP2 (fully_shard per layer, 2 gloo ranks, different data): every mode leaves the average
    of the per-rank standard gradients in the sharded .grad, accumulation over two steps adds, and
    a failure in the second branch's backward -- after the first branch's gradients were
    reduce-scattered into .grad -- restores them exactly (atomic copies them up front: FSDP
    writes sharded gradients where a leaf hook cannot see it)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    expected, got = _run_two_ranks(functools.partial(_rank_main, _fsdp_work), tmp_path,
                                   lambda: _per_rank_standard_average(DIST_MODES, steps=2))
    for mode in DIST_MODES:
        for rank in (0, 1):
            res = got[rank][mode]
            assert set(res["sharded"]) == {"DTensor"}, res["sharded"]
            g = [torch.from_numpy(a) for a in res["two_steps"]]
            assert max_rel(g, expected[mode]) <= 1e-5, (mode, rank)
            assert res["raised"], (mode, rank)
            for a, b in zip(res["after_failure"], res["two_steps"]):
                assert (a == b).all(), (mode, rank, "gradients changed by a failed step")


# --- FSDP1 (FullyShardedDataParallel, gloo, CPU) ----------------------------------------------

# (sharding strategy, use_orig_params): flat-parameter shards, original-parameter views, and the
# (deprecated) strategy that frees nothing
FSDP1_VARIANTS = (("FULL_SHARD", False), ("FULL_SHARD", True), ("NO_SHARD", False))


def _fsdp1_full_grads(model, use_orig_params):
    """Every rank's view of the whole averaged gradient, in TinyNet's parameter order."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    if use_orig_params:
        with FSDP.summon_full_params(model, with_grads=True):
            return [p.grad.double().numpy().copy() for p in model.parameters()]
    (flat,) = list(model.parameters())                # one FlatParameter: rank's padded shard
    shards = [torch.empty_like(flat.grad) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, flat.grad.detach().contiguous())
    whole = torch.cat(shards)
    out, at = [], 0
    for p in TinyNet().parameters():                  # FSDP1 flattens in parameter order
        out.append(whole[at:at + p.numel()].view_as(p).double().numpy().copy())
        at += p.numel()
    return out


def _fsdp1_work(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    out = {}
    for strategy, orig in FSDP1_VARIANTS:
        for mode in DIST_MODES:
            torch.manual_seed(0)
            model = FSDP(TinyNet(), device_id=torch.device("cpu"), use_orig_params=orig,
                         sharding_strategy=ShardingStrategy[strategy])
            d = make_data(seed=10 + rank)
            real = mode.endswith("+real")
            calls = []

            def step(rejected=None, pass_model=True):
                def chosen():
                    calls.append("chosen")
                    return tbkernels.per_sample_mse(model(d["xw"]), d["tw"])
                tbkernels.dpo_backward(
                    chosen,
                    rejected or (lambda: tbkernels.per_sample_mse(model(d["xl"]), d["tl"])),
                    beta=10.0, mode=mode.split("+")[0], model=model if pass_model else None,
                    ref_chosen=d["ref_w"], ref_rejected=d["ref_l"],
                    real_fn=((lambda: tbkernels.per_sample_mse(model(d["xr"]), d["tr"]))
                             if real else None),
                    nll_real_weight=0.1 if real else 0.0)

            local = lambda: [None if p.grad is None else p.grad.double().numpy().copy()  # noqa: E731
                             for p in model.parameters()]
            res = {}
            if mode.startswith("decoupled"):
                for pass_model in (True, False):      # found from the module, or the graph
                    try:
                        step(pass_model=pass_model)
                        res[f"refused{int(pass_model)}"] = ""
                    except tbkernels.DPOInputError as exc:
                        res[f"refused{int(pass_model)}"] = str(exc)
                res["chosen_calls"] = len(calls)      # 0 with model=: refused before a forward
                res["grads_untouched"] = all(g is None for g in local())
                out[(strategy, orig, mode)] = res
                continue
            step()
            step()                                    # accumulates into the sharded gradient
            res["two_steps"] = _fsdp1_full_grads(model, orig)
            before = local()

            res["raised"] = _raises(lambda: step(_failing_branch(model, d["xl"], d["tl"])))
            after = local()
            res["restored"] = len(before) == len(after) and all(
                (a is None and b is None) or (a is not None and b is not None and (a == b).all())
                for a, b in zip(before, after))
            out[(strategy, orig, mode)] = res
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_fsdp1_two_processes(tmp_path):
    """FSDP1 (FullyShardedDataParallel around the model, 2 gloo ranks, different data), with
    flat-parameter shards, with original-parameter views, and unsharded: standard and recompute
    leave the average of the per-rank standard gradients after two accumulated steps, and a
    failure in the rejected branch's backward restores the local gradients exactly. Decoupled is
    refused with DPOInputError -- before any forward when the model is passed, after the forwards
    (from the graph) when it is not -- instead of crashing in its second backward on parameters
    FSDP1 has freed (sharded strategies) or returning wrong gradients (NO_SHARD)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel)")
    expected, got = _run_two_ranks(functools.partial(_rank_main, _fsdp1_work), tmp_path,
                                   lambda: _per_rank_standard_average(DIST_MODES, steps=2),
                                   timeout=300)
    for strategy, orig in FSDP1_VARIANTS:
        for mode in DIST_MODES:
            for rank in (0, 1):
                res = got[rank][(strategy, orig, mode)]
                where = (strategy, orig, mode, rank)
                if mode.startswith("decoupled"):
                    assert "cannot run under FSDP1" in res["refused1"], where
                    assert "cannot run under FSDP1" in res["refused0"], where
                    assert res["chosen_calls"] == 1, where     # only the graph-found refusal ran
                    assert res["grads_untouched"], where
                    continue
                g = [torch.from_numpy(a) for a in res["two_steps"]]
                assert max_rel(g, expected[mode]) <= 1e-5, where
                assert res["raised"] and res["restored"], where


# ---------------------------------------------------------------------------------------------
# memory tools and the benchmark script

@contextlib.contextmanager
def _no_garbage_collection():
    """The CPU peak is measured over the entry RSS: garbage from earlier tests (reference cycles
    holding large tensors) freed by a collection inside the block lowers RSS while the block
    runs and hides part of its peak -- the one flake this test has had. Collect first, then keep
    the collector off while the block runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _touched_fresh_pages(nbytes):
    """nbytes of new anonymous memory with every page written, so RSS grows by nbytes whatever
    the allocator keeps: torch.ones can be served from a free chunk that glibc's heap kept
    resident after earlier tests, and RSS then does not move (test_peak_memory_cpu failed so
    when run after test_flow_grpo.py, at 12fcdff as after). Close it to give the pages back."""
    pages = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        pages[offset] = 1
    return pages


def test_peak_memory_cpu():
    with _no_garbage_collection(), tbkernels.memory.peak_memory("cpu") as mem:
        _touched_fresh_pages(64 * 2**20).close()
    assert mem.rss_reset in (True, False)
    assert mem.peak_extra >= 60 * 2**20, str(mem)
    assert "peak RSS" in str(mem) and mem.as_dict()["peak_extra"] == mem.peak_extra
    with pytest.raises(ValueError, match="measures CUDA devices and the CPU"):
        with tbkernels.memory.peak_memory("meta"):
            pass


def test_nested_peak_memory_cpu_keeps_the_outer_peak():
    """The kernel keeps one peak RSS per process and each CPU block resets it: an inner block
    must not erase the peak its enclosing block saw before it (it did: 48 MiB reported for a
    block that had touched 300 MiB). Also: peak_tensor_memory's live_at_exit is final at exit."""
    with _no_garbage_collection(), tbkernels.memory.peak_memory("cpu") as outer:
        _touched_fresh_pages(128 * 2**20).close()       # touched, then freed
        with tbkernels.memory.peak_memory("cpu") as inner:
            _touched_fresh_pages(16 * 2**20).close()
    assert outer.peak_extra >= 120 * 2**20, (str(outer), str(inner))
    assert inner.peak_extra < 100 * 2**20, str(inner)
    with tbkernels.memory.peak_tensor_memory() as tm:
        a = torch.ones(1000)
    live = tm.live_at_exit
    del a
    assert live == 4000 and tm.live_at_exit == live


def test_peak_tensor_memory_counts_forward_and_backward():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    with tbkernels.memory.peak_tensor_memory() as tm:
        h = torch.tanh(x @ w)                      # two [64, 256] float32 results (64 KiB each)
        view = h.view(-1)                          # a view: no new storage
        (view * view).sum().backward()             # w.grad (256 KiB) and backward temporaries
    assert tm.peak_bytes >= 256 * 256 * 4 + 2 * 64 * 256 * 4
    assert tm.live_at_exit >= 256 * 256 * 4        # w.grad is still alive
    del h, view
    assert tm.allocations > 3


def test_peak_tensor_memory_ignores_views_and_in_place_ops_on_older_tensors():
    """A view (or an in-place update) of a tensor made before the block is not new memory:
    ``weight.t()`` inside every nn.Linear once counted as a weight-sized allocation."""
    w = torch.randn(512, 512)
    with tbkernels.memory.peak_tensor_memory() as tm:
        wt = w.t()
        w.mul_(2.0)
        flat = w.view(-1)
        y = wt[:8].clone()                          # the only new storage: 8 x 512 float32
    assert tm.peak_bytes == 8 * 512 * 4, tm
    assert tm.allocations == 1
    del wt, flat, y
    lin = torch.nn.Linear(256, 256)
    with tbkernels.memory.peak_tensor_memory() as tm:
        lin(torch.ones(4, 256)).sum().backward()
    # weight.grad and bias.grad, the [4,256] output and its gradient; not a second weight
    assert tm.live_at_exit == (256 * 256 + 256) * 4, tm
    assert tm.peak_bytes < 2 * 256 * 256 * 4, tm


def test_decoupled_saves_a_parameter_gradient_when_accumulating():
    """The second micro-batch of gradient accumulation (``.grad`` already filled): standard DPO's
    one backward keeps the first-processed branch's gradient of every shared parameter in
    autograd's input buffers until the other branch reaches it; the decoupled and recompute
    backwards add each branch into ``.grad`` in place. Exact tensor accounting: standard holds
    about one parameter-gradient copy (P bytes) more."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    P = sum(p.numel() * p.element_size() for p in model.parameters())
    xw, xl = torch.randn(4, 256), torch.randn(4, 256)

    def fn(x):
        return lambda: ((model(x) - x) ** 2).mean(dim=1)

    peaks, grads = {}, {}
    for mode in ("standard", "decoupled", "recompute"):
        model.zero_grad(set_to_none=True)
        tbkernels.dpo_backward(fn(xw), fn(xl), beta=2.0, mode=mode, atomic=False)
        with tbkernels.memory.peak_tensor_memory() as tm:
            tbkernels.dpo_backward(fn(xw), fn(xl), beta=2.0, mode=mode, atomic=False)
        peaks[mode] = tm.peak_bytes
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for mode in ("decoupled", "recompute"):
        for g, g_std in zip(grads[mode], grads["standard"]):
            torch.testing.assert_close(g, g_std, rtol=1e-5, atol=1e-7)
        assert peaks["standard"] - peaks[mode] >= 0.9 * P, (peaks, P)


def test_atomic_copies_gradients_lazily_when_accumulating():
    """atomic=True must copy existing gradients to undo a failed step, but it takes each copy
    just before that parameter's first accumulation (a tensor hook), while activations are being
    freed: where activations dominate, the accumulating standard or decoupled step's peak is that
    of atomic=False, not one full gradient copy above it. The hooks are gone after the call."""
    torch.manual_seed(12)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh())
                                  for _ in range(6)])
    P = sum(p.numel() * p.element_size() for p in model.parameters())
    xw, xl = torch.randn(1024, 256), torch.randn(1024, 256)

    def fn(x):
        return lambda: ((model(x) - x) ** 2).mean(dim=1)

    for mode in ("standard", "decoupled", "recompute"):
        peaks = {}
        for atomic in (False, True):
            model.zero_grad(set_to_none=True)
            tbkernels.dpo_backward(fn(xw), fn(xl), beta=2.0, mode=mode, atomic=atomic)
            with tbkernels.memory.peak_tensor_memory() as tm:
                tbkernels.dpo_backward(fn(xw), fn(xl), beta=2.0, mode=mode, atomic=atomic,
                                       model=model)
            peaks[atomic] = tm.peak_bytes
            assert all(not p._backward_hooks for p in model.parameters())
        if mode == "recompute":
            # its copies, taken in the first branch's backward, live through the second branch's
            # forward: there atomic costs the one gradient copy it needs, and no more
            assert peaks[True] <= peaks[False] + 1.1 * P, (mode, peaks, P)
        else:
            assert peaks[True] <= peaks[False] + 0.25 * P, (mode, peaks, P)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_peak_memory_cuda():
    with tbkernels.memory.peak_memory("cuda") as mem:
        x = torch.ones(16 * 2**20, device="cuda")
        del x
    assert mem.peak_extra >= 64 * 2**20 and mem.peak_reserved >= mem.peak_allocated


def _load_bench():
    spec = importlib.util.spec_from_file_location("_tbk_dpo_memory",
                                                  ROOT / "benchmarks" / "dpo_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("use_diffusers", [False, True], ids=["TinyDiT", "diffusers_wan"])
def test_benchmark_model_modes_agree(use_diffusers):
    """The benchmark's DPO step (video DiT, LoRA, checkpointing) gives the same gradients in every
    mode, so its memory numbers compare like with like."""
    bench = _load_bench()
    if use_diffusers and not bench.diffusers_available():
        pytest.skip("diffusers not installed")
    results = {}
    for mode in ("standard", "decoupled", "recompute"):
        for ft, ckpt in (("full", False), ("lora", True)):
            spec = dict(config="wan-tiny", device="cpu", diffusers=use_diffusers, layers=2,
                        latent=bench.LATENTS["tiny"], ft=ft, ckpt=ckpt, lora_rank=4)
            _, model, _, _, batch, _ = bench.setup(spec)
            if ft == "lora":                     # B = 0 at init: make the adapters matter
                for m in model.modules():
                    if isinstance(m, bench.LoRALinear):
                        torch.nn.init.normal_(m.lora_b.weight, std=0.02)
            loss = bench.dpo_step(model, batch, mode)
            results[(mode, ft)] = (loss, [p.grad.clone() for p in model.parameters()
                                          if p.requires_grad])
    for (mode, ft), (loss, g) in results.items():
        ref_loss, ref_g = results[("standard", ft)]
        assert rel(loss, ref_loss) <= 1e-6
        assert max_rel(g, ref_g) <= 1e-4, (mode, ft)


def test_peak_tensor_memory_on_meta_equals_cpu():
    """On the meta device nothing is allocated, but the count is the one a real device gives:
    the same computation counted on CPU and on meta tensors gives the same peak, byte for byte."""
    def work(device):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(256, 256, generator=g).to(device).requires_grad_()
        x = torch.randn(64, 256, generator=g).to(device)
        with tbkernels.memory.peak_tensor_memory() as tm:
            h = torch.tanh(x @ w)
            y = torch.nn.functional.gelu(h @ w.t()).view(-1)
            (y * y).sum().backward()
            del h, y
        return tm
    cpu, meta = work("cpu"), work("meta")
    assert cpu.peak_bytes > 256 * 256 * 4
    assert (meta.peak_bytes, meta.allocations, meta.live_at_exit) == (
        cpu.peak_bytes, cpu.allocations, cpu.live_at_exit)


@pytest.mark.parametrize("use_diffusers", [False, True], ids=["TinyDiT", "diffusers_wan"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
def test_benchmark_meta_model_equals_cpu_count(use_diffusers, ckpt):
    """dpo_memory.py --meta's liveness model, float32 (autocast emulation off), counts exactly
    what the same DPO step creates on the CPU, in every mode: the meta run of the Wan2.1-1.3B
    sizes is the CPU count at a size no CPU can run. (CPU SDPA takes the flash kernel the
    meta model calls explicitly; tbkernels.per_sample_mse takes its compiled op on both.)"""
    bench = _load_bench()
    if use_diffusers and not bench.diffusers_available():
        pytest.skip("diffusers not installed")
    for mode in ("standard", "decoupled", "recompute"):
        spec = dict(config="wan-tiny", diffusers=use_diffusers, layers=2, mode=mode,
                    latent=bench.LATENTS["tiny"], ft="full", ckpt=ckpt, lora_rank=4)
        meta = bench.child_meta([dict(spec, device="meta", meta_autocast=False)])[0]
        _, model, _, _, batch, _ = bench.setup(dict(spec, device="cpu"))
        model.zero_grad(set_to_none=True)
        with tbkernels.memory.peak_tensor_memory() as tm:
            bench.dpo_step(model, batch, mode, zero_grad=False)
        assert meta["peak_tensor_bytes"] == tm.peak_bytes, (mode, meta, tm)
        params = sum(p.numel() * 4 for p in model.parameters())
        assert meta["start_bytes"] >= params


def test_benchmark_meta_emulates_bf16_autocast():
    """With the emulation on, the linear layers see bfloat16 inputs (as under CUDA autocast), so
    where activations dominate the step takes less memory than in float32, and more than half of
    it (norms, residuals and gradients stay float32; bf16 weight copies are added)."""
    bench = _load_bench()
    spec = dict(config="wan-small", diffusers=False, layers=4, mode="standard", device="meta",
                latent=bench.LATENTS["small"], ft="full", ckpt=False, lora_rank=4)
    fp32 = bench.child_meta([dict(spec, meta_autocast=False)])[0]["peak_tensor_bytes"]
    bf16 = bench.child_meta([dict(spec)])[0]["peak_tensor_bytes"]
    assert 0.5 * fp32 < bf16 < fp32


def test_peak_tensor_memory_counts_wrapper_subclasses_by_their_inner_tensors():
    """FSDP2's parameters and gradients are DTensors, wrapper subclasses that own no storage:
    their inner tensors are what is counted (before this, the count crashed on them)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    x = two_tensor.TwoTensor(torch.randn(64, 64), torch.randn(64, 64))
    with tbkernels.memory.peak_tensor_memory() as tm:
        y = x * 2                                   # two new 16 KiB inner tensors
        z = y + 1                                   # two more
        del y
    assert (tm.peak_bytes, tm.live_at_exit, tm.allocations) == (4 * 16384, 2 * 16384, 4)
    del z


def test_atomic_warns_when_reentrant_checkpoints_hide_parameters():
    """Reentrant activation checkpointing records one graph node per block, so the block's
    parameters are invisible to the graph walk that finds what atomic=True protects: the call
    warns (pass model=/params=) instead of silently leaving them unprotected; with model= it
    does not warn, and a failure in the second branch restores their .grad."""
    import warnings

    import torch.utils.checkpoint as ckpt
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(2)])
    x = torch.randn(3, 6)

    def errors(inp, fail=False):
        h = inp
        for block in blocks:
            h = ckpt.checkpoint(block, h, use_reentrant=True)
        if fail:
            raise RuntimeError("reward model crashed")
        return (h ** 2).mean(1)

    with pytest.warns(UserWarning, match="reentrant activation checkpoints"):
        tbkernels.dpo_backward(lambda: errors(x.clone().requires_grad_(True)),
                               lambda: errors((x * 0.5).requires_grad_(True)), beta=1.0, mode="recompute")
    before = [p.grad.clone() for p in blocks.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="reward model crashed"):
            tbkernels.dpo_backward(lambda: errors(x.clone().requires_grad_(True)),
                                   lambda: errors((x * 0.5).requires_grad_(True), fail=True), beta=1.0,
                                   mode="recompute", model=blocks)
    assert not [w for w in caught if "reentrant activation" in str(w.message)]
    for p, g in zip(blocks.parameters(), before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("mode", ["decoupled", "recompute"])
def test_branches_sharing_a_graph_get_a_named_error(mode):
    """A trainable value computed once outside both fns is freed by the first branch's
    backward in the two-backward modes: the call says so (DPOInputError) rather than PyTorch's
    "backward through the graph a second time", and leaves .grad as it was; standard works."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    h = lin(x)
    tbkernels.dpo_backward(lambda: (h ** 2).mean(1), lambda: (0.5 * h).pow(2).mean(1), beta=1.0,
                           mode="standard")
    before = [p.grad.clone() for p in lin.parameters()]
    h = lin(x)
    with pytest.raises(DPOInputError, match="share part of their autograd graph"):
        tbkernels.dpo_backward(lambda: (h ** 2).mean(1), lambda: (0.5 * h).pow(2).mean(1),
                               beta=1.0, mode=mode)
    for p, g in zip(lin.parameters(), before):
        assert torch.equal(p.grad, g)
