"""The C++ CPU kernels use threads, and their results do not depend on how many.

Until the extension was compiled with -fopenmp, ``at::parallel_for`` (a header-inline
``#pragma omp parallel`` in torch's OpenMP builds) ran every kernel on one thread without a word.
These tests pin both halves of the contract: the build is threaded, and each kernel's partial sums
are combined in a fixed order, so 1 thread and N threads give bit-identical results.
"""
import contextlib

import pytest
import torch

import tbkernels

CPU_OK = tbkernels.backends("cpu")["cpu"].available
pytestmark = pytest.mark.skipif(not CPU_OK, reason="the C++ extension is not built")


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_extension_is_built_with_openmp():
    import tbkernels._C as ext
    assert ext.built_with_openmp(), "C++ kernels built without -fopenmp run on one thread"
    assert "1 thread" not in tbkernels.backends("cpu")["cpu"].reason or torch.get_num_threads() == 1


def _run_both(fn):
    with threads(1):
        one = fn()
    with threads(4):                      # more threads than this machine's cores is fine
        many = fn()
    return one, many


def _assert_identical(one, many):
    for a, b in zip(one, many):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(3, 16, 5, 60, 104), (1, 4, 7, 33, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_grpo_loss_thread_invariant(shape, dtype):
    g = torch.Generator().manual_seed(0)
    v, x, ref = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    B = shape[0]
    sigma = torch.rand(B, generator=g) * 0.5 + 0.4
    sigma_next = sigma - 0.05
    prev, _, _, _ = tbkernels.sde_step_with_logprob(v, sigma, sigma_next, x, backend="reference",
                                                    generator=g)
    old = torch.randn(B, generator=g) * 1e-3
    adv = torch.randn(B, generator=g)
    amap = torch.rand((B,) + shape[2:], generator=g)
    old_map = torch.randn((B,) + shape[2:], generator=g) * 1e-3     # per-position (ViPO)
    amap_elem = torch.rand(shape, generator=g)                      # per element
    old_elem = torch.randn(shape, generator=g) * 1e-3

    def run():
        out = []
        for old_lp, kwargs in ((old, dict()), (old_map, dict(advantage_map=amap)),
                               (old_elem, dict(advantage_map=amap_elem))):
            vv = v.clone().requires_grad_(True)
            loss, metrics = tbkernels.flow_grpo_loss(
                vv, x, prev, sigma, sigma_next, old_lp, adv, ref_model_output=ref, beta=0.01,
                backend="cpu", **kwargs)
            loss.backward()
            # the map surrogates sum per task and combine the tasks in order, as the step does
            out += [vv.grad, loss.detach()] + list(metrics.values())
        for red in ("mean", "channel_sum", "none"):
            out.append(tbkernels.sde_step_with_logprob(v, sigma, sigma_next, x, prev,
                                                       logprob_reduction=red, backend="cpu")[1])
        return out

    one, many = _run_both(run)
    _assert_identical(one, many)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_mse_thread_invariant(dtype):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 16, 9, 30, 52, generator=g).to(dtype)
    target = torch.randn(2, 16, 9, 30, 52, generator=g)

    def run():
        p = pred.clone().requires_grad_(True)
        out = tbkernels.per_sample_mse(p, target, backend="cpu")
        (out * torch.tensor([1.0, -2.0])).sum().backward()
        return [out.detach(), p.grad]

    _assert_identical(*_run_both(run))


def test_group_advantages_thread_invariant():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(1 << 20, 2, generator=g)

    def run():
        return [tbkernels.group_advantages(rewards, 16, backend="cpu"),
                tbkernels.group_advantages(rewards, group_ids=torch.randint(0, 999, (1 << 20,),
                                                                            generator=g),
                                           backend="cpu")]

    with threads(1):
        g.manual_seed(3)
        one = run()
    with threads(4):
        g.manual_seed(3)
        many = run()
    _assert_identical(one, many)
