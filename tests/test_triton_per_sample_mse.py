"""Triton backend of per_sample_mse (kernels/per_sample_mse.py) against float64 and against eager
PyTorch in the input dtype, at interpreter-sized, GPU-sized and tiny tiles.

Runs under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported, i.e. in the
pytest command's environment) on CPU tensors, or natively on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover
    pytest.skip(f"triton cannot be imported ({exc!r})", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("TRITON_INTERPRET") != "1" and not HAS_CUDA:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton is "
                "imported", allow_module_level=True)

import tbkernels  # noqa: E402
from tbkernels.ops import dpo  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]

try:
    from tbkernels.kernels import per_sample_mse as km
except Exception:  # package installed without the kernels subpackage
    spec = importlib.util.spec_from_file_location("_tbk_triton_psm",
                                                  ROOT / "kernels" / "per_sample_mse.py")
    km = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = km
    spec.loader.exec_module(km)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0


def check(shape, pdt, tdt, seed=0):
    p, t = rand(shape, pdt, seed), rand(shape, tdt, seed + 1)
    B = shape[0]
    acc = torch.float64 if torch.float64 in (pdt, tdt) else torch.float32
    out = km.per_sample_mse_forward_triton(p, t)
    assert out.shape == (B,) and out.dtype == acc
    d = p.double() - t.double()
    exact = (d * d).reshape(B, -1).mean(1)
    g = rand(B, acc, seed + 2)
    grad = km.per_sample_mse_backward_triton(g, p, t)
    assert grad.shape == p.shape and grad.dtype == pdt
    g_exact = 2 * g.double().view(-1, *([1] * (len(shape) - 1))) * d / p[0].numel()
    if acc == torch.float64:
        assert err(out, exact) <= 1e-13 * exact.abs().max().item()
        # the gradient is rounded once to pred's dtype
        tol = 1e-13 if pdt == torch.float64 else torch.finfo(pdt).eps
        assert err(grad, g_exact) <= tol * g_exact.abs().max().item()
        return
    # float32 accumulation; half-type inputs: the DESIGN.md rule against eager-in-dtype
    assert err(out, exact) <= 2e-6 * exact.abs().max().item()
    if pdt == tdt:
        pe = p.clone().requires_grad_(True)
        de = pe - t
        eager = (de * de).reshape(B, -1).mean(1)
        (eager * g.to(pdt)).sum().backward()
        ulp = torch.finfo(pdt).eps * g_exact.abs().max().item()
        assert err(grad, g_exact) <= 2 * err(pe.grad, g_exact) + ulp
        assert err(out, exact) <= 2 * err(eager, exact) + torch.finfo(torch.float32).eps \
            * exact.abs().max().item()
    else:
        assert err(grad, g_exact) <= torch.finfo(pdt).eps * g_exact.abs().max().item()


@pytest.mark.parametrize("shape", [(3, 5, 3, 7, 9), (2, 3, 11, 13), (1, 4, 2, 5, 6), (4, 7)],
                         ids=["video_odd", "image_odd", "b1", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_matches_float64(shape, dtype):
    check(shape, dtype, dtype, seed=sum(shape))


MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
         (torch.float32, torch.float64), (torch.bfloat16, torch.float64)]


@pytest.mark.parametrize("pdt,tdt", MIXED, ids=["bf16-f32", "f16-f32", "f32-f64", "bf16-f64"])
def test_mixed_dtypes(pdt, tdt):
    check((2, 3, 5, 7), pdt, tdt, seed=3)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks: many programs per sample, masked tails, ITERS > 1 and a finalize loop over
    more partials than its block."""
    monkeypatch.setitem(km._CONFIGS, "interpreter", dict(block=16, max_iters=2,
                                                         programs_per_sm=0))
    monkeypatch.setitem(km._CONFIGS, "gpu", dict(block=16, max_iters=2, programs_per_sm=0))
    monkeypatch.setattr(km, "_FINALIZE_BLOCK", 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_multi_block(small_blocks, dtype):
    for shape in [(3, 5, 3, 7, 9), (2, 17), (1, 3, 33)]:
        check(shape, dtype, dtype, seed=7)


def test_gpu_configuration(monkeypatch):
    """The GPU tile plan (2048-element blocks, chunk shortened to fill 132 SMs), also run under
    the interpreter."""
    monkeypatch.setattr(km._launch, "_assumed_sm_count", 132)
    for shape in [(1, 16, 3, 30, 40), (2, 3, 11, 13)]:
        check(shape, torch.float32, torch.float32, seed=9)
        check(shape, torch.float64, torch.float64, seed=10)
        # pred the wider dtype: the backward's smaller block (one 16-byte pred vector per thread)
        check(shape, torch.float32, torch.bfloat16, seed=19)
        check(shape, torch.float64, torch.float16, seed=20)


def test_int64_offsets(monkeypatch):
    monkeypatch.setattr(km, "_INT32_OFFSET_LIMIT", 0)
    check((2, 3, 11, 13), torch.float64, torch.float64, seed=11)


def test_empty_and_degenerate():
    z = torch.zeros(0, 3, device=DEVICE)
    assert km.per_sample_mse_forward_triton(z, z).shape == (0,)
    n = torch.zeros(2, 0, device=DEVICE)
    assert torch.isnan(km.per_sample_mse_forward_triton(n, n)).all()
    assert km.per_sample_mse_backward_triton(torch.ones(2, device=DEVICE), n, n).shape == n.shape
    check((3, 1), torch.float32, torch.float32, seed=12)


def test_bad_arguments():
    p = rand((2, 3, 4), torch.float32, 13)
    with pytest.raises(RuntimeError, match="pred's shape"):
        km.per_sample_mse_forward_triton(p, p[:, :2])
    with pytest.raises(RuntimeError, match="contiguous"):
        km.per_sample_mse_forward_triton(p.transpose(1, 2), p.transpose(1, 2))
    with pytest.raises(RuntimeError, match="grad_out must be"):
        km.per_sample_mse_backward_triton(torch.ones(2, dtype=torch.float64, device=DEVICE), p, p)


def test_opcheck_and_autograd():
    args = (rand((3, 4, 5), torch.float32, 14), rand((3, 4, 5), torch.bfloat16, 15))
    torch.library.opcheck(torch.ops.tbkernels.per_sample_mse_triton, args)
    torch.library.opcheck(torch.ops.tbkernels.per_sample_mse_backward_triton,
                          (rand(3, torch.float32, 16),) + args)
    p = rand((2, 3, 4), torch.float64, 17).requires_grad_(True)
    t = rand((2, 3, 4), torch.float64, 18)
    assert torch.autograd.gradcheck(lambda x: dpo._per_sample_mse_triton(x, t), (p,))


def test_public_api_compiled_fullgraph():
    torch._dynamo.reset()
    target = rand((2, 4, 2, 5, 6), torch.float32, 19)

    def step(pred, backend):
        e = tbkernels.per_sample_mse(pred, target, backend=backend)
        return tbkernels.flow_dpo_loss(e[:1], e[1:], beta=50.0)[0]

    results = []
    for fn, backend in ((step, "reference"), (torch.compile(step, fullgraph=True), "triton")):
        pred = rand((2, 4, 2, 5, 6), torch.float32, 20).requires_grad_(True)
        loss = fn(pred, backend)
        loss.backward()
        results.append((loss.detach(), pred.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
