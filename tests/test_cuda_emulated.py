"""The CUDA kernels, run on the CPU under a SIMT emulator, against the C++ CPU kernels.

The CUDA sources (csrc/cuda/*_kernels.cu) are torch-free, so they can be compiled as plain C++
with tests/cuda_emu/: every CUDA thread is a fiber, a block's fibers run cooperatively, and
``__syncthreads`` / warp shuffles / ballots are real barriers between them (a barrier that not
every thread of a block or warp reaches aborts as a deadlock). ``<<<grid, block>>>`` launches
are rewritten into emulator calls by tests/cuda_emu/transform.py. Host memory stands in for device
memory. What this checks without a GPU: indexing, the launch plan (grid sizes, number of
launches, workspace layout, tails), block and warp reductions and their synchronisation,
dtype loads/stores and rounding, and that no 128-bit access is misaligned (it traps, as on a
GPU). What it cannot: timing, memory coalescing, races between blocks that a real GPU would
interleave, anything about the torch binding (*_cuda.cpp, type-checked in CI). Each result is
compared with the C++ CPU kernel on the same inputs, which the other tests hold to the float64
reference; the flow-step kernels' results on batch-strided inputs (trajectory slices, expanded
tensors) with their results on contiguous copies, bit for bit.
"""
import ctypes
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tbkernels
from tbkernels.ops._group_advantages_reference import group_advantages_reference

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
KERNELS = ("group_advantages", "flow_step", "per_sample_mse")
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses ucontext"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the emulator"),
    pytest.mark.skipif(not tbkernels.backends("cpu")["cpu"].available,
                       reason="the C++ CPU kernels (the comparison) are not built"),
]
P = ctypes.c_void_p
I64 = ctypes.c_int64


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    sources = [ROOT / "csrc" / "cuda" / f"{k}_kernels.cu" for k in KERNELS]
    sources += [ROOT / "csrc" / "cuda" / f"{k}_kernels.h" for k in KERNELS]
    sources += sorted(EMU.rglob("*.h")) + [EMU / "emu.cpp", EMU / "capi.cpp", EMU / "transform.py"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out = tmp_path_factory.mktemp("cuda_emu")
    units = []
    for k in KERNELS:
        unit = out / f"{k}_emu.cpp"
        subprocess.run([sys.executable, str(EMU / "transform.py"),
                        str(ROOT / "csrc" / "cuda" / f"{k}_kernels.cu"), str(unit)], check=True)
        units.append(str(unit))
    lib = out / f"libtbk_emu_{digest}.so"
    # A misaligned typed access (a 128-bit fragment off a 16-byte boundary) traps, as it faults
    # on a GPU, where x86 would quietly load it: a kernel that picks its 128-bit path for an
    # unaligned input cannot pass unseen (the process ends with SIGILL, and faulthandler names
    # the test).
    cmd = ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-fsanitize=alignment",
           "-fsanitize-undefined-trap-on-error", f"-I{EMU / 'inc'}",
           f"-I{ROOT / 'csrc' / 'cuda'}", "-include", "emu.h", str(EMU / "emu.cpp"),
           str(EMU / "capi.cpp"), *units, "-o", str(lib)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return ctypes.CDLL(str(lib))


def ptr(t):
    return None if t is None else P(t.data_ptr())


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_elementwise(got, exp, dtype):
    """Per-element results: the same math in the same order, so equal up to one rounding of the
    output dtype (the C++ compiler may still keep an intermediate in a wider register)."""
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), exp.double(), rtol=eps, atol=eps * 1e-3,
                               equal_nan=True)


def assert_reduction(got, exp, n_terms, dtype):
    """Sums over n_terms elements in a different order: float32 accumulation error bound."""
    tol = 1e-12 if dtype == torch.float64 else 4e-7 * max(1.0, n_terms ** 0.5)
    torch.testing.assert_close(got.double(), exp.double(), rtol=tol, atol=tol, equal_nan=True)


# ------------------------------------------------------------------------------- group advantages
GA_CASES = [  # (B, K, group size or None for ids, G, std_mode, ddof, eps, clip)
    (64, 1, 8, 8, 0, 1, 1e-4, 0.0),
    (96, 2, 24, 4, 0, 0, 1e-6, 5.0),
    (1000, 1, 1000, 1, 1, 0, 1e-4, 0.0),
    (777, 3, None, 50, 0, 1, 1e-4, 0.0),
    (4096, 1, 16, 256, 2, 0, 0.0, 3.0),
    (5000, 1, None, 7, 1, 1, 1e-8, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GA_CASES)
def test_group_advantages_cuda_kernel(emu, dtype, case):
    B, K, S, G, mode, ddof, eps, clip = case
    g = torch.Generator().manual_seed(B + K)
    rewards = torch.randn(B, K, generator=g).to(dtype)
    if S is not None:
        rewards[:S] = 0.5                                   # a flat group: exactly zero
        ids = None
    else:
        ids = torch.randint(0, G, (B,), generator=g)
        ids[:G] = torch.arange(G)                           # every group present
    sdt = acc_dtype(dtype)
    adv = torch.full_like(rewards, float("nan"))
    mean = torch.full((G, K), float("nan"), dtype=sdt)
    std = torch.full((G, K), float("nan"), dtype=sdt)
    count = torch.full((G,), -7, dtype=torch.int64)
    first_bad = torch.tensor([2**63 - 1], dtype=torch.int64)
    launches = ctypes.c_int(0)
    rc = emu.emu_group_advantages(
        ptr(rewards), DTYPE_CODE[dtype], I64(B), I64(K), ptr(ids), I64(S or 0), I64(G), mode,
        ddof, ctypes.c_double(eps), ctypes.c_double(clip), ptr(adv), ptr(mean), ptr(std),
        ptr(count), ptr(first_bad), ctypes.byref(launches))
    assert rc == 0
    exp = torch.ops.tbkernels.group_advantages(rewards, ids, S or 0, G, mode, ddof, eps, clip, False)
    assert torch.equal(count, exp[3])
    assert int(first_bad) == 2**63 - 1                     # all finite: untouched
    assert_reduction(mean, exp[1], B // G, dtype)
    assert_reduction(std, exp[2], B // G, dtype)
    # advantages: (r - mean) / (std + eps) with mean/std from differently ordered sums
    tol = 1e-10 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps + 1e-5
    torch.testing.assert_close(adv.double(), exp[0].double(), rtol=tol, atol=tol)
    if S is not None:
        assert torch.all(adv[:S] == 0)
    if S is not None and K == 1 and B <= 65536 and mode == 0:
        assert launches.value == 1                      # the single-launch path


def test_group_advantages_cuda_kernel_reports_first_nonfinite(emu):
    rewards = torch.randn(256, 1)
    rewards[77, 0] = float("nan")
    rewards[200, 0] = float("inf")
    outs = [torch.empty(256, 1), torch.empty(16, 1), torch.empty(16, 1),
            torch.empty(16, dtype=torch.int64)]
    first_bad = torch.tensor([2**63 - 1], dtype=torch.int64)   # the caller's INT64_MAX
    rc = emu.emu_group_advantages(ptr(rewards), 0, I64(256), I64(1), None, I64(16), I64(16), 0, 1,
                                  ctypes.c_double(1e-4), ctypes.c_double(0.0), *map(ptr, outs),
                                  ptr(first_bad), ctypes.byref(ctypes.c_int(0)))
    assert rc == 0 and int(first_bad) == 77


def run_emu_group_advantages(emu, rewards, ids, S, G, mode, ddof, eps, clip, first_bad=None):
    """The CUDA group_advantages kernels under the emulator: (adv, mean, std, count, launches)."""
    B, K = rewards.shape
    sdt = acc_dtype(rewards.dtype)
    adv = torch.full_like(rewards, 7.0)
    mean = torch.full((G, K), 7.0, dtype=sdt)
    std = torch.full((G, K), 7.0, dtype=sdt)
    count = torch.full((G,), -7, dtype=torch.int64)
    launches = ctypes.c_int(0)
    rc = emu.emu_group_advantages(
        ptr(rewards), DTYPE_CODE[rewards.dtype], I64(B), I64(K), ptr(ids), I64(S or 0), I64(G),
        mode, ddof, ctypes.c_double(eps), ctypes.c_double(clip), ptr(adv), ptr(mean), ptr(std),
        ptr(count), ptr(first_bad), ctypes.byref(launches))
    assert rc == 0
    return adv, mean, std, count, launches.value


def offset_rewards(B, K, dtype, gen):
    """Rewards near 1000 whose spread is a few ulps of the input dtype (float32: 1e-3, 16 ulps),
    so that the accumulator's rounding of the group mean is a visible part of the spread."""
    if dtype == torch.float32:
        r = 1000 + 1e-3 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    else:
        ulp = 1000 * torch.finfo(dtype).eps / 2          # fp16: 0.5, bf16: 4 (exponent of 1000: 9)
        r = 1000 + ulp * torch.randint(-2, 3, (B, K), generator=gen).double()
    return r.to(dtype)


def ulp_of(x, dtype):
    """Spacing of `dtype` values at |x| (float64 tensor)."""
    _, e = torch.frexp(x.abs().clamp_min(torch.finfo(dtype).tiny))   # |x| in [2^(e-1), 2^e)
    return torch.ldexp(torch.full_like(x, torch.finfo(dtype).eps), e - 1)


GA_OFFSET_CASES = [  # (B, K, group size or None for ids, G, std_mode): one per launch path
    (24 * 40, 1, 24, 40, 0),          # team of 8 lanes, rewards cached in registers
    (24 * 40, 2, 24, 40, 1),          # ... with the global std computed in the block
    (500 * 4, 1, 500, 4, 0),          # team of 32 lanes re-reading memory (S > 4 * 32)
    (2048 * 2, 2, 2048, 2, 1),        # one block per group (+ global in the block)
    (24 * 3000, 1, 24, 3000, 1),      # team + global std from row-range partials (3 launches)
    (36000 * 2, 1, 36000, 2, 0),      # chunked: chunk partials -> combine -> advantages
    (36000 * 2, 1, 36000, 2, 1),      # ... with the global std merged from the same chunks
    (777, 2, None, 7, 0),             # group_index: atomics
    (777, 1, None, 7, 1),             # group_index + global partials
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GA_OFFSET_CASES, ids=lambda c: "-".join(map(str, c)))
def test_group_advantages_cuda_kernel_large_offset(emu, dtype, case):
    """Rewards whose offset is large relative to their spread, against the float64 reference:
    a rounded group mean subtracted as it is would shift the whole group. float32 rewards
    accumulate in double (their advantages within 4 float32 ulps, groups summing to ~0);
    16-bit rewards accumulate in float with the corrected two-pass, so their advantages are
    the correctly rounded float64 values up to float32-level error (the plain two-pass in float
    was up to a quarter of a half-precision ulp off, which made many of them 1 ulp wrong)."""
    B, K, S, G, mode = case
    gen = torch.Generator().manual_seed(B + K + mode)
    rewards = offset_rewards(B, K, dtype, gen)
    ids = None
    if S is None:
        ids = torch.randint(0, G, (B,), generator=gen)
        ids[:G] = torch.arange(G)
    for ddof in (0, 1):
        adv, mean, std, count, _ = run_emu_group_advantages(emu, rewards, ids, S, G, mode, ddof,
                                                            0.0, 0.0)
        e_adv, e_mean, e_std, e_count = group_advantages_reference(
            rewards.double(), ids, S or 0, G, mode, ddof, 0.0, 0.0, False)
        assert torch.equal(count, e_count)
        eps32 = torch.finfo(torch.float32).eps
        err = (adv.double() - e_adv).abs()
        bound = 4 * eps32 * (1 + e_adv.abs())
        if dtype != torch.float32:
            bound = bound + ulp_of(e_adv, dtype) / 2
        assert (err <= bound).all(), (ddof, err.max().item(), (err / bound).max().item())
        if dtype == torch.float32:
            gi = ids if ids is not None else torch.arange(B) // S
            sums = torch.zeros(G, K, dtype=torch.float64).index_add_(0, gi, adv.double())
            n = torch.bincount(gi, minlength=G).double().unsqueeze(1)
            assert (sums.abs() <= 1e-7 * n).all(), (sums.abs() / n).max().item()
        assert ((mean.double() - e_mean).abs() <= 2 * eps32 * e_mean.abs()).all()
        assert ((std.double() - e_std).abs() <= 1e-5 * e_std).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["team", "block", "chunked", "indexed"])
def test_group_advantages_cuda_kernel_nan_group_is_never_flat(emu, dtype, path):
    """first_bad = nullptr (check_finite=False): a group holding a NaN gets NaN advantages (the
    reference's amin/amax propagate NaN) even when its other rewards are equal, and even
    clamped; a NaN stays in its group; an all-inf group is flat (0)."""
    S = {"team": 4, "block": 2048, "chunked": 9000, "indexed": 4}[path]
    B, K, G = 4 * S, 2, 4
    gen = torch.Generator().manual_seed(S)
    rewards = torch.randn(B, K, generator=gen, dtype=torch.float64)
    rewards[:S, 0] = 1.0
    rewards[S - 1, 0] = float("nan")             # group 0: equal rewards and one NaN
    rewards[2 * S:3 * S, 0] = float("nan")       # group 2: all NaN
    rewards[3 * S:, :] = float("inf")            # group 3: flat at inf
    rewards = rewards.to(dtype)
    ids = torch.arange(B) // S if path == "indexed" else None
    for clip in (0.0, 5.0):
        adv, _, _, _, launches = run_emu_group_advantages(
            emu, rewards, ids, None if path == "indexed" else S, G, 0, 0, 1e-4, clip)
        exp = group_advantages_reference(rewards.double(), ids, S, G, 0, 0, 1e-4, clip, False)[0]
        assert torch.isnan(adv[:S, 0]).all() and torch.isnan(adv[2 * S:3 * S, 0]).all()
        assert torch.equal(adv[3 * S:], torch.zeros_like(adv[3 * S:]))
        tol = 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(adv.double(), exp, rtol=tol, atol=tol, equal_nan=True)
        assert launches == {"team": 1, "block": 1, "chunked": 3, "indexed": 4}[path]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_advantages_cuda_kernel_one_ulp_apart(emu, dtype):
    """[1, 1 + ulp], eps = 0, population std: the mean is not representable in the dtype, the
    std is half an ulp; exactly [-1, 1] (in the team, block and indexed paths)."""
    one_up = 1 + torch.finfo(dtype).eps
    for reps in (1, 2048):                       # 2 rows; 2 x 2048 rows (block path)
        rewards = torch.tensor([[1.0], [one_up]], dtype=torch.float64).repeat_interleave(
            reps, 0).to(dtype)
        n = rewards.shape[0]
        for ids, size in ((None, n), (torch.zeros(n, dtype=torch.int64), None)):
            adv = run_emu_group_advantages(emu, rewards, ids, size, 1, 0, 0, 0.0, 0.0)[0]
            assert adv[:, 0].tolist() == [-1.0] * reps + [1.0] * reps, (reps, ids is None)


# -------------------------------------------------------------------------------------- flow step
FLOW_SHAPES = [(2, 4, 1000), (1, 3, 37), (3, 16, 2 * 1024 + 17)]


def flow_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    v, x, noise, ref = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    prev = (x.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 0.4
    coefs, _ = tbkernels.ops._flow_grpo_coefs.step_coefficients(sigma, sigma - 0.05, "flow_grpo",
                                                               0.7)
    return v, x, prev, noise, ref, coefs.to(acc_dtype(dtype)).contiguous()


def logp_shape(shape, reduction):
    B, C, S = shape
    return [(B,), (B, S), (B, C, S)][reduction]


def i64_array(values):
    """A C int64_t array for ctypes (None: a null pointer)."""
    return None if values is None else (I64 * len(values))(*values)


def model_code(dtype, v):
    """The emulator's model-dtype argument: v's dtype code, or -1 (same as the latents) when it
    is the latent dtype (or v is absent)."""
    return -1 if v is None or v.dtype == dtype else DTYPE_CODE[v.dtype]


def run_emu_forward(emu, dtype, shape, v, x, pn, ref, coefs, reduction, sampling, write_mean,
                    bstrides=None, model=None):
    """The emulated forward, dtype the latents' (model_output's: model_code, or `model` when
    given), bstrides those of (v, x, pn, ref) (None: contiguous):
    (rc, launches, logp, ref_sq, mean or None, prev_out or None)."""
    acc = acc_dtype(dtype)
    logp = torch.full(logp_shape(shape, reduction), float("nan"), dtype=acc)
    ref_sq = torch.full((shape[0],), float("nan"), dtype=acc)
    mean = torch.full(shape, float("nan")).to(dtype) if write_mean else None
    prev_out = torch.full(shape, float("nan")).to(dtype) if sampling else None
    launches = ctypes.c_int(0)
    rc = emu.emu_flow_step_forward(DTYPE_CODE[dtype], model_code(dtype, v) if model is None
                                   else model, *map(I64, shape), ptr(v), ptr(x), ptr(pn),
                                   ptr(ref), ptr(coefs), reduction, int(sampling), ptr(logp),
                                   ptr(ref_sq), ptr(mean), ptr(prev_out), ctypes.byref(launches),
                                   i64_array(bstrides))
    return rc, launches.value, logp, ref_sq, mean, prev_out


def run_emu_backward(emu, dtype, shape, v, x, prev, ref, coefs, reduction, grad_logp, grad_mean,
                     grad_ref_sq, bstrides=None, model=None):
    """The emulated backward, dtype the latents' (model_output's and grad_v's: v's, see
    run_emu_forward), bstrides those of (v, x, prev, ref, grad_mean) (None: contiguous):
    (rc, grad_v)."""
    grad_v = torch.full(shape, float("nan")).to(v.dtype)
    rc = emu.emu_flow_step_backward(DTYPE_CODE[dtype], model_code(dtype, v) if model is None
                                    else model, *map(I64, shape), ptr(v), ptr(x),
                                    ptr(prev), ptr(ref), ptr(coefs), reduction, ptr(grad_logp),
                                    ptr(grad_mean), ptr(grad_ref_sq), ptr(grad_v),
                                    i64_array(bstrides))
    return rc, grad_v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FLOW_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("variant", ["stored_prev", "stored_prev_ref", "sampling_mean", "no_prev"])
def test_flow_step_forward_cuda_kernel(emu, dtype, shape, reduction, variant):
    v, x, prev, noise, ref, coefs = flow_inputs(shape, dtype)
    sampling = variant == "sampling_mean"
    write_mean = variant == "sampling_mean"
    pn = noise if sampling else (None if variant == "no_prev" else prev)
    ref_in = ref if variant == "stored_prev_ref" else None
    rc, launches, logp, ref_sq, mean, prev_out = run_emu_forward(
        emu, dtype, shape, v, x, pn, ref_in, coefs, reduction, sampling, write_mean)
    assert rc == 0 and launches >= 1
    e_logp, e_ref_sq, e_mean, e_prev = torch.ops.tbkernels.flow_step_forward(
        v, x, pn, ref_in, coefs, reduction, sampling, write_mean)
    if sampling:
        assert_elementwise(prev_out, e_prev, dtype)
        assert_elementwise(mean, e_mean, dtype)
    n = shape[1] * shape[2]
    if reduction == 2:
        assert_elementwise(logp, e_logp, dtype)
    else:
        # logp = alpha * sum(d^2) + k * gamma: the two parts nearly cancel for a sampled prev, so
        # the rounding error is relative to the parts' size, not to the result's
        k = 1 if reduction == 0 else shape[1]
        parts = (coefs[:, 3].double().abs() * k).view(-1, *[1] * (e_logp.dim() - 1))
        parts = parts + e_logp.double().abs()
        tol = 1e-12 if dtype == torch.float64 else 4e-7 * max(1.0, (n if k == 1 else k) ** 0.5)
        assert torch.all((logp.double() - e_logp.double()).abs() <= tol * parts), \
            (logp.double() - e_logp.double()).abs().max()
    if ref_in is None:
        assert torch.all(ref_sq == 0)
    else:
        assert_reduction(ref_sq, e_ref_sq, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FLOW_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("terms", ["logp", "logp_ref", "mean", "all", "logp_no_prev"])
def test_flow_step_backward_cuda_kernel(emu, dtype, shape, reduction, terms):
    v, x, prev, noise, ref, coefs = flow_inputs(shape, dtype, seed=1)
    g = torch.Generator().manual_seed(9)
    acc = acc_dtype(dtype)
    grad_logp = (torch.randn(logp_shape(shape, reduction), generator=g).to(acc)
                 if terms in ("logp", "logp_ref", "all", "logp_no_prev") else None)
    grad_mean = torch.randn(shape, generator=g).to(dtype) if terms in ("mean", "all") else None
    grad_ref_sq = (torch.randn(shape[0], generator=g).to(acc)
                   if terms in ("logp_ref", "all") else None)
    ref_in = ref if grad_ref_sq is not None else None
    prev_in = None if terms == "logp_no_prev" else prev
    rc, grad_v = run_emu_backward(emu, dtype, shape, v, x, prev_in, ref_in, coefs, reduction,
                                  grad_logp, grad_mean, grad_ref_sq)
    assert rc == 0
    exp = torch.ops.tbkernels.flow_step_backward(v, x, prev_in, ref_in, coefs, reduction,
                                                 grad_logp, grad_mean, grad_ref_sq)
    assert not torch.isnan(grad_v).any(), "grad_v not fully written"
    # a sum of up to three separately rounded terms: a few roundings of the accumulation type
    eps = torch.finfo(dtype).eps
    scale = exp.double().abs().max().item() + 1e-30
    torch.testing.assert_close(grad_v.double(), exp.double(), rtol=2 * eps,
                               atol=8 * torch.finfo(acc).eps * scale)


# ------------------------------------------------------------------ flow_grpo_loss's [B] epilogue
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 31, 33, 1000])
@pytest.mark.parametrize("with_ref,beta,simple", [(True, 0.05, False), (True, 0.0, False),
                                                  (False, 0.0, False), (True, 0.05, True)])
def test_flow_grpo_surrogate_cuda_kernel(emu, dtype, B, with_ref, beta, simple):
    """One warp strides over the samples (B = 31, 33: a partial and a second pass) and combines
    the lanes with shuffles; per-sample gradient factors come from the formula the CPU kernel
    shares, so they match it elementwise; loss and metrics are sums in another order."""
    g = torch.Generator().manual_seed(B + 3)
    logp = (torch.randn(B, generator=g, dtype=torch.float64) - 1).to(dtype)
    old = (logp.double() - 0.3 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    old[::3] = logp[::3]                                   # ratio 1: inside the clip range
    adv = (4 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    ref_sq = torch.rand(B, generator=g, dtype=torch.float64).to(dtype) if with_ref else None
    kl_w = (1e-3 * torch.rand(B, generator=g, dtype=torch.float64)).to(dtype) if with_ref else None
    loss = torch.full((), float("nan"), dtype=dtype)
    metrics = torch.full((4,), float("nan"), dtype=dtype)
    factors = torch.full((2, B), float("nan"), dtype=dtype)
    rc = emu.emu_flow_grpo_surrogate(DTYPE_CODE[dtype], I64(B), ptr(logp), ptr(ref_sq), ptr(kl_w),
                                     ptr(old), ptr(adv), ctypes.c_double(0.1),
                                     ctypes.c_double(5.0), ctypes.c_double(beta), int(simple),
                                     ptr(loss), ptr(metrics), ptr(factors))
    assert rc == 0
    e_loss, e_metrics, e_factors = torch.ops.tbkernels.flow_grpo_surrogate(
        logp, ref_sq, kl_w, old, adv, 0.1, 5.0, beta, simple)
    assert not torch.isnan(factors).any(), "factors not fully written"
    assert_elementwise(factors, e_factors, dtype)
    assert_reduction(loss, e_loss, B, dtype)               # B = 0: NaN in both
    assert_reduction(metrics, e_metrics, B, dtype)


def test_flow_grpo_surrogate_cuda_kernel_rejects_bad_arguments(emu):
    x = torch.zeros(4)
    out = [torch.zeros(()), torch.zeros(4), torch.zeros(2, 4)]
    def call(ref_sq, kl_w, clip, acc=DTYPE_CODE[torch.float32]):
        return emu.emu_flow_grpo_surrogate(acc, I64(4), ptr(x), ptr(ref_sq), ptr(kl_w), ptr(x),
                                           ptr(x), ctypes.c_double(clip), ctypes.c_double(5.0),
                                           ctypes.c_double(0.0), 0, *map(ptr, out))
    assert call(None, None, 0.1) == 0
    assert call(x, None, 0.1) != 0                          # ref_sq without kl_weight
    assert call(None, None, 0.0) != 0                       # clip_range must be > 0
    assert call(None, None, 0.1, DTYPE_CODE[torch.bfloat16]) != 0   # not an accumulation type


# ------------------------------------------------------------ flow_grpo_loss's ViPO-map surrogate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,P", [(0, 5), (4, 0), (1, 1), (3, 41), (2, 70001)])
@pytest.mark.parametrize("shared_map", [False, True])
@pytest.mark.parametrize("with_ref,beta,simple", [(True, 0.05, False), (False, 0.0, False),
                                                  (True, 0.05, True)])
def test_flow_grpo_map_surrogate_cuda_kernels(emu, dtype, B, P, shared_map, with_ref, beta,
                                              simple):
    """The main pass (blocks over chunks of a sample's positions; 70001 positions: 69 blocks per
    sample, a ragged last one) writes the gradient over logp by the formula the CPU kernel
    shares, so it matches elementwise; loss and metrics are block sums combined by the finalize
    block, in another order than the CPU's. No positions or no samples: finalize only, NaN
    loss."""
    g = torch.Generator().manual_seed(B * 1000 + P)
    logp = (torch.randn(B, P, generator=g, dtype=torch.float64) - 1).to(dtype)
    old = (logp.double() - 0.3 * torch.randn(B, P, generator=g, dtype=torch.float64)).to(dtype)
    old[:, ::3] = logp[:, ::3]                             # ratio 1: inside the clip range
    adv = (4 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    amap = torch.rand(1 if shared_map else B, P, generator=g, dtype=torch.float64).to(dtype)
    ref_sq = torch.rand(B, generator=g, dtype=torch.float64).to(dtype) if with_ref else None
    kl_w = (1e-3 * torch.rand(B, generator=g, dtype=torch.float64)).to(dtype) if with_ref else None
    loss = torch.full((), float("nan"), dtype=dtype)
    metrics = torch.full((4,), float("nan"), dtype=dtype)
    dref = torch.full((B,), float("nan"), dtype=dtype)
    buf = logp.clone()
    launches = ctypes.c_int(0)
    rc = emu.emu_flow_grpo_map_surrogate(
        DTYPE_CODE[dtype], I64(B), I64(P), ptr(buf), ptr(ref_sq), ptr(kl_w), ptr(old), ptr(adv),
        ptr(amap), int(shared_map), ctypes.c_double(0.1), ctypes.c_double(5.0),
        ctypes.c_double(beta), int(simple), ptr(loss), ptr(metrics), ptr(dref),
        ctypes.byref(launches), None)
    assert rc == 0
    assert launches.value == (2 if B * P else 1)
    e_buf = logp.clone()
    e_loss, e_metrics, e_dref = torch.ops.tbkernels.flow_grpo_map_surrogate(
        e_buf, ref_sq, kl_w, old, adv, amap, 0.1, 5.0, beta, simple)
    assert_elementwise(buf, e_buf, dtype)
    assert not torch.isnan(dref).any(), "grad_ref_sq not fully written"
    assert_elementwise(dref, e_dref, dtype)
    assert_reduction(loss, e_loss, B * P, dtype)           # no terms: NaN in both
    assert_reduction(metrics[[0, 1, 3]], e_metrics[[0, 1, 3]], B * P, dtype)
    assert_reduction(metrics[2], e_metrics[2], B, dtype)   # the KL: a mean over the batch
    if B * P > 100 and not simple:
        assert 0 < metrics[1].item() < 1


def test_flow_grpo_map_surrogate_cuda_kernel_rejects_bad_arguments(emu):
    x, buf = torch.zeros(4, 3), torch.zeros(4, 3)
    b = torch.zeros(4)
    out = [torch.zeros(()), torch.zeros(4), torch.zeros(4)]
    launches = ctypes.c_int(0)

    def call(ref_sq, kl_w, clip, acc=DTYPE_CODE[torch.float32], amap=x):
        return emu.emu_flow_grpo_map_surrogate(
            acc, I64(4), I64(3), ptr(buf), ptr(ref_sq), ptr(kl_w), ptr(x), ptr(b),
            ptr(amap), 0, ctypes.c_double(clip), ctypes.c_double(5.0), ctypes.c_double(0.0), 0,
            *map(ptr, out), ctypes.byref(launches), None)
    assert call(None, None, 0.1) == 0
    assert call(b, None, 0.1) != 0                          # ref_sq without kl_weight
    assert call(None, None, 0.0) != 0                       # clip_range must be > 0
    assert call(None, None, 0.1, amap=None) != 0            # no map
    assert call(None, None, 0.1, DTYPE_CODE[torch.bfloat16]) != 0   # not an accumulation type


# ------------------------------------------------- flow_grpo_loss with a per-element map, fused
def _has_cpu_kernel(op):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"tbkernels::{op}", "CPU")
    except RuntimeError:                                   # no such schema
        return False


needs_cpu_elem_loss = pytest.mark.skipif(
    not _has_cpu_kernel("flow_grpo_elem_loss"),
    reason="the installed package has no C++ CPU flow_grpo_elem_loss (the comparison) yet")

# (B, C, S): no samples, no elements, one element; N = 111 (no whole vectors: strided fragments);
# N = 4000 (128-bit fragments, several blocks per sample, the last one ragged); N = 21003 (odd:
# strided fragments over many blocks, ragged tail)
ELEM_SHAPES = [(0, 4, 5), (3, 0, 7), (1, 1, 1), (2, 3, 37), (2, 4, 1000), (2, 3, 7001)]
ELEM_VARIANTS = {  # with_ref, beta, simple, shared_map, write_grad
    "kl": (True, 0.05, False, False, True),
    "kl_simple_shared": (True, 0.05, True, True, True),
    "kl_metric_only": (True, 0.0, False, True, True),   # beta 0: no KL term in the gradient
    "no_ref": (False, 0.0, False, False, True),
    "no_grad": (True, 0.05, False, True, False),
    "no_ref_simple_no_grad": (False, 0.0, True, False, False),
}
ELEM_CLIP = 0.1


def elem_loss_inputs(shape, dtype, with_ref, shared_map, seed=0, layout=None):
    """flow_grpo_elem_loss's inputs with old_log_prob near the step's log-prob (ratios on both
    sides of the clip range, every third exactly 1) and a KL weight that makes the gradient's KL
    term comparable to its policy term (so that either one missing shows). layout: the latents
    laid out by lay_out first (the log-prob is that of the laid-out values)."""
    B, C, S = shape
    N = C * S
    v, x, prev, _, ref, coefs = flow_inputs(shape, dtype, seed)
    if layout is not None:
        v, x, prev, ref = (lay_out(t, layout[name])
                           for name, t in zip(("v", "x", "prev", "ref"), (v, x, prev, ref)))
    acc = acc_dtype(dtype)
    g = torch.Generator().manual_seed(seed + 17)
    logp = elem_logp(v, x, prev, coefs)
    old = (logp.double() - 0.3 * torch.randn(B, N, generator=g, dtype=torch.float64)).to(acc)
    old[:, ::3] = logp[:, ::3]
    adv = (4 * torch.randn(B, generator=g, dtype=torch.float64)).to(acc)
    amap = torch.rand(1 if shared_map else B, N, generator=g, dtype=torch.float64).to(acc)
    kl_w = ((0.5 + torch.rand(B, generator=g, dtype=torch.float64)) / max(N, 1)).to(acc)
    return v, x, prev, ref if with_ref else None, coefs, kl_w if with_ref else None, old, adv, amap


def elem_logp(v, x, prev, coefs):
    """The step's per-element log-prob [B, N] in the accumulation type, rounded as the kernels
    round it (separate products and sums)."""
    acc = coefs.dtype
    B, N = v.shape[0], v.shape[1:].numel()
    vv, xx, pp = (t.to(acc).reshape(B, N) for t in (v, x, prev))
    cx, cv, alpha, gamma = (coefs[:, i:i + 1] for i in range(4))
    d = pp - (cx * xx + cv * vv)
    return alpha * (d * d) + gamma


def run_emu_elem_loss(emu, dtype, shape, v, x, prev, ref, coefs, kl_w, old, adv, amap, beta,
                      simple, write_grad, clip=ELEM_CLIP, adv_max=5.0, bstrides=None,
                      row_strides=None, model=None, row_dtypes=None):
    """The emulated kernels, dtype the latents' (model_output's and grad_v's: v's, see
    run_emu_forward), bstrides those of (v, x, prev, ref) and row_strides those of (old, amap)
    (None: contiguous), row_dtypes the dtype codes of (old, amap) (None: theirs, -1 for the
    accumulation type): (rc, loss, metrics, grad_v or None, launches, workspace bytes)."""
    strides = None
    if bstrides is not None or row_strides is not None:
        strides = list(bstrides or [-1] * 4) + list(row_strides or [-1, -1])
    acc = acc_dtype(dtype)
    if row_dtypes is None:
        row_dtypes = [-1 if t is None or t.dtype == acc else DTYPE_CODE[t.dtype]
                      for t in (old, amap)]
    loss = torch.full((), float("nan"), dtype=acc)
    metrics = torch.full((4,), float("nan"), dtype=acc)
    grad_v = torch.full(v.shape, float("nan")).to(v.dtype) if write_grad else None
    launches, ws = ctypes.c_int(0), ctypes.c_int64(0)
    rc = emu.emu_flow_grpo_elem_loss(
        DTYPE_CODE[dtype], model_code(dtype, v) if model is None else model, *map(I64, shape),
        ptr(v), ptr(x), ptr(prev), ptr(ref), ptr(coefs),
        ptr(kl_w), ptr(old), ptr(adv), ptr(amap), int(amap.shape[0] == 1), *row_dtypes,
        ctypes.c_double(clip), ctypes.c_double(adv_max), ctypes.c_double(beta), int(simple),
        ptr(loss), ptr(metrics), ptr(grad_v), ctypes.byref(launches), ctypes.byref(ws),
        i64_array(strides))
    return rc, loss, metrics, grad_v, launches.value, ws.value


def flat_blocks(B, N, dtype):
    """plan_flat's blocks per sample (flow_step_kernels.cu), for the launch and workspace checks."""
    def cdiv(a, b):
        return -(-a // b)
    if B == 0 or N == 0:
        return 0
    step = 256 * (128 // torch.finfo(dtype).bits)            # 256 threads x one 16-byte word
    steps = min(max(cdiv(cdiv(B * N, 4096), step), 1), 16)
    chunk = min(steps * step, cdiv(N, step) * step)
    return cdiv(N, chunk)


def assert_elem_grad(got, exp, dtype, kl_part, near_clip):
    """grad_v against the CPU kernel's: within one rounding of the latent dtype, apart from the
    ratio. The CPU computes it with its own vectorised exp (within 2 ulp, csrc/cpu/vec_exp.h),
    the CUDA kernel with expf, so in float32 the policy part of the gradient may differ by a few
    ulp of float (float64: the same libm exp, no difference); that part is at most |grad| +
    |KL part|. Where the ratio lies at a clip bound (near_clip) the two may pick different
    branches: left out."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fi = torch.finfo(dtype)
    got, exp = got.double().flatten(), exp.double().flatten()
    keep = ~near_clip.flatten()
    tol = fi.eps * exp.abs() + fi.tiny * fi.eps               # one ulp, subnormals included
    if acc == torch.float32:
        tol = tol + 8 * torch.finfo(acc).eps * (exp.abs() + kl_part.double().abs().flatten())
    err = (got - exp).abs()
    bad = keep & ~(err <= tol)                                # NaN counts as bad
    assert not bad.any(), (f"{int(bad.sum())} elements off, worst "
                           f"{(err / tol)[bad].max().item():.3g}x the tolerance")


@needs_cpu_elem_loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEM_SHAPES)
@pytest.mark.parametrize("variant", list(ELEM_VARIANTS))
def test_flow_grpo_elem_loss_cuda_kernels(emu, dtype, shape, variant):
    """The main pass (blocks over chunks of a sample's elements, as the backward) computes per
    element the step's log-prob, its policy term and d loss / d v by the formula the CPU kernel
    shares; the finalize block combines the blocks' partial sums (each sample's ref_sq from its
    own blocks) in another order than the CPU's. No elements or no samples: finalize only, NaN
    loss."""
    with_ref, beta, simple, shared_map, write_grad = ELEM_VARIANTS[variant]
    B, C, S = shape
    N = C * S
    inputs = elem_loss_inputs(shape, dtype, with_ref, shared_map, seed=B * 100 + N)
    v, x, prev, ref, coefs, kl_w, old, adv, amap = inputs
    rc, loss, metrics, grad_v, launches, ws = run_emu_elem_loss(emu, dtype, shape, *inputs, beta,
                                                                simple, write_grad)
    assert rc == 0
    nblk = flat_blocks(B, N, dtype)
    assert launches == (2 if nblk else 1)
    assert ws == 5 * 8 * B * nblk                          # [5, B*nblk] double partials
    e_loss, e_metrics, e_grad = torch.ops.tbkernels.flow_grpo_elem_loss(
        *inputs, ELEM_CLIP, 5.0, beta, simple, write_grad)
    acc = acc_dtype(dtype)
    assert_reduction(loss, e_loss, B * N, acc)             # no terms: NaN in both
    assert_reduction(metrics[[0, 1, 3]], e_metrics[[0, 1, 3]], B * N, acc)
    assert_reduction(metrics[2], e_metrics[2], N, acc)     # the KL: sums over each sample
    if not with_ref:
        assert metrics[2].item() == 0 or B == 0
    if B * N > 1000 and not simple:
        assert 0 < metrics[1].item() < 1                   # ratios on both sides of the bounds
    if not write_grad:
        assert e_grad.numel() == 0
        return
    assert not torch.isnan(grad_v).any(), "grad_v not fully written"
    logp = elem_logp(v, x, prev, coefs)
    ratio = torch.exp(logp.double() - old.double())
    near_clip = torch.zeros_like(ratio, dtype=torch.bool)
    if not simple:
        for bound in (1 - ELEM_CLIP, 1 + ELEM_CLIP):
            near_clip |= (ratio - bound).abs() <= 1e-5 * bound
    kl_part = torch.zeros(B, N, dtype=acc)
    if with_ref and beta != 0:
        gq2 = 2 * (beta * kl_w.double() / B)
        kl_part = gq2[:, None] * (v.double() - ref.double()).reshape(B, N)
    assert_elem_grad(grad_v, e_grad, dtype, kl_part, near_clip)


def misaligned(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return buf.view(t.shape).copy_(t)


@needs_cpu_elem_loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", [0, 6])                  # model_output, old_log_prob
def test_flow_grpo_elem_loss_cuda_kernels_unaligned(emu, dtype, which):
    """Rows of whole vectors (N = 4000) but one input off a 16-byte boundary: the strided
    fragments instead of the 128-bit ones, over the same blocks. Elementwise results are those of
    the aligned run bit for bit; the sums are the same terms in another order."""
    shape, beta = (2, 4, 1000), 0.05
    inputs = list(elem_loss_inputs(shape, dtype, True, False, seed=5))
    _, loss, metrics, grad_v, _, _ = run_emu_elem_loss(emu, dtype, shape, *inputs, beta, False,
                                                       True)
    inputs[which] = misaligned(inputs[which])
    assert inputs[which].data_ptr() % 16 != 0
    rc, u_loss, u_metrics, u_grad, launches, ws = run_emu_elem_loss(emu, dtype, shape, *inputs,
                                                                    beta, False, True)
    assert rc == 0 and launches == 2 and ws == 5 * 8 * 2 * flat_blocks(2, 4000, dtype)
    assert torch.equal(u_grad, grad_v)
    assert_reduction(u_loss, loss, 8000, acc_dtype(dtype))
    assert_reduction(u_metrics, metrics, 8000, acc_dtype(dtype))


def test_flow_grpo_elem_loss_cuda_kernel_rejects_bad_arguments(emu):
    shape = (2, 3, 4)
    lat = [torch.zeros(shape) for _ in range(4)]           # v, x, prev, ref
    coefs, per_b, per_e = torch.zeros(2, 5), torch.zeros(2), torch.zeros(2, 12)
    out = [torch.zeros(()), torch.zeros(4), torch.zeros(shape)]
    launches, ws = ctypes.c_int(0), ctypes.c_int64(0)

    def call(dims=shape, dtype=DTYPE_CODE[torch.float32], prev=lat[2], ref=lat[3], kl_w=per_b,
             old=per_e, amap=per_e, clip=0.1, adv_max=5.0, loss=out[0]):
        return emu.emu_flow_grpo_elem_loss(
            dtype, -1, *map(I64, dims), ptr(lat[0]), ptr(lat[1]), ptr(prev), ptr(ref), ptr(coefs),
            ptr(kl_w), ptr(old), ptr(per_b), ptr(amap), 0, -1, -1, ctypes.c_double(clip),
            ctypes.c_double(adv_max), ctypes.c_double(0.05), 0, ptr(loss), ptr(out[1]),
            ptr(out[2]), ctypes.byref(launches), ctypes.byref(ws), None)
    assert call() == 0 and launches.value == 2
    assert call(ref=None, kl_w=None) == 0
    # no elements: the latents and [B, N] arrays may have no storage, the reference included
    assert call(dims=(2, 0, 4), prev=None, ref=None, old=None, amap=None) == 0
    assert launches.value == 1
    assert call(kl_w=None) != 0                             # ref without kl_weight
    assert call(ref=None) != 0                              # kl_weight without ref (elements)
    assert call(clip=0.0) != 0                              # clip_range must be > 0
    assert call(adv_max=0.0) != 0                           # adv_clip_max must be > 0
    assert call(prev=None) != 0                             # prev_sample is required
    assert call(old=None) != 0
    assert call(amap=None) != 0
    assert call(loss=None) != 0
    assert call(dtype=7) != 0 and launches.value == -1      # no such dtype
    assert call(dims=(2, -1, 4)) != 0 and launches.value == -1 and ws.value == 0
    assert call(dims=(2, 2**62, 4)) != 0 and launches.value == -1   # C*S overflows int64


# ----------------------------------------------------------- batch-strided latent inputs, in place
# Each latent input of the flow-step kernels has its own batch stride (sample b at
# ptr + b * bstride, every sample contiguous): Flow-GRPO's trajectory slices latents[:, j] and
# batch-expanded tensors are read without a copy. The results must be those of contiguous copies
# bit for bit: the launch plan depends on the sizes only, and so does the choice of 128-bit or
# strided fragments as long as every stride keeps each sample 16-byte aligned (when it does not,
# see test_flow_step_cuda_kernels_unaligned_batch_stride).

# (B, C, S): whole vectors per row and per channel (the 128-bit fragments; every slice's stride a
# multiple of VEC); N = 111 (strided fragments, odd batch strides, slices off 16-byte
# boundaries); one sample.
STRIDED_SHAPES = [(2, 4, 64), (3, 3, 37), (1, 4, 64)]
# Per latent input: (j, K), the slice big[:, j] of a [B, K, C, S] tensor (batch stride K*N), or
# None, the first sample expanded over the batch (batch stride 0).
STRIDED_LAYOUTS = {
    "slices": {"v": (1, 3), "x": (0, 2), "prev": (3, 4), "ref": (2, 5), "grad_mean": (1, 2)},
    "expanded": {"v": (0, 2), "x": None, "prev": (1, 3), "ref": None, "grad_mean": None},
}
# Passed as the batch stride of an absent input: never read, so it must not matter (odd: it
# would turn the 128-bit fragments off if it were looked at).
ABSENT_BSTRIDE = 3
STRIDED_DTYPES = [torch.float32, torch.bfloat16]


def lay_out(t, spec):
    """t's values laid out as spec says (STRIDED_LAYOUTS); the slice's neighbours are noise, which
    a wrong stride would read. None stays None."""
    if t is None:
        return None
    if spec is None:
        return t[:1].expand(t.shape)
    j, K = spec
    g = torch.Generator().manual_seed(10 * K + j)
    big = torch.randn(t.shape[0], K, *t.shape[1:], generator=g).to(t.dtype)
    big[:, j] = t
    return big[:, j]


def batch_strides(*inputs):
    """The bstrides argument for these latent inputs (None: absent)."""
    return [ABSENT_BSTRIDE if t is None else t.stride(0) for t in inputs]


def contiguous(*inputs):
    return [None if t is None else t.contiguous() for t in inputs]


def bits(t):
    """t's raw bits: equality of these is bitwise (NaN == NaN, -0.0 != 0.0)."""
    return None if t is None else t.contiguous().view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(got, exp):
    """Two runs' outputs (tensors, or None for an output not asked for) equal bit for bit."""
    assert len(got) == len(exp)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert (g is None) == (e is None), i
        assert g is None or torch.equal(bits(g), bits(e)), f"output {i} differs"


STRIDED_FWD_VARIANTS = {  # sampling (prev_or_noise is noise), with_ref, write_mean
    "stored_prev": (False, False, False),
    "stored_prev_ref_mean": (False, True, True),
    "sampling": (True, False, False),
    "sampling_ref_mean": (True, True, True),
}


@pytest.mark.parametrize("dtype", STRIDED_DTYPES)
@pytest.mark.parametrize("shape", STRIDED_SHAPES)
@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("variant", list(STRIDED_FWD_VARIANTS))
def test_flow_step_forward_cuda_kernel_batch_strided(emu, dtype, shape, layout, reduction,
                                                     variant):
    sampling, with_ref, write_mean = STRIDED_FWD_VARIANTS[variant]
    v, x, prev, noise, ref, coefs = flow_inputs(shape, dtype, seed=2)
    spec = STRIDED_LAYOUTS[layout]
    inputs = [lay_out(v, spec["v"]), lay_out(x, spec["x"]),
              lay_out(noise if sampling else prev, spec["prev"]),
              lay_out(ref, spec["ref"]) if with_ref else None]
    got = run_emu_forward(emu, dtype, shape, *inputs, coefs, reduction, sampling, write_mean,
                          bstrides=batch_strides(*inputs))
    exp = run_emu_forward(emu, dtype, shape, *contiguous(*inputs), coefs, reduction, sampling,
                          write_mean)
    assert got[0] == 0 and exp[0] == 0 and got[1] == exp[1]
    assert not torch.isnan(got[2]).any(), "logp not fully written"
    assert_bitwise(got[2:], exp[2:])


STRIDED_BWD_TERMS = {  # grad_logp, prev_sample, grad_mean, reference with grad_ref_sq
    "logp": (True, True, False, False),
    "logp_no_prev": (True, False, False, False),
    "mean": (False, False, True, False),
    "all": (True, True, True, True),
}


@pytest.mark.parametrize("dtype", STRIDED_DTYPES)
@pytest.mark.parametrize("shape", STRIDED_SHAPES)
@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("terms", list(STRIDED_BWD_TERMS))
def test_flow_step_backward_cuda_kernel_batch_strided(emu, dtype, shape, layout, reduction,
                                                      terms):
    has_gl, has_prev, has_gm, has_gq = STRIDED_BWD_TERMS[terms]
    v, x, prev, _, ref, coefs = flow_inputs(shape, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    acc = acc_dtype(dtype)
    grad_logp = torch.randn(logp_shape(shape, reduction), generator=g).to(acc) if has_gl else None
    grad_mean = torch.randn(shape, generator=g).to(dtype) if has_gm else None
    grad_ref_sq = torch.randn(shape[0], generator=g).to(acc) if has_gq else None
    spec = STRIDED_LAYOUTS[layout]
    inputs = [lay_out(v, spec["v"]), lay_out(x, spec["x"]),
              lay_out(prev, spec["prev"]) if has_prev else None,
              lay_out(ref, spec["ref"]) if has_gq else None]
    gm = lay_out(grad_mean, spec["grad_mean"])
    rc, got = run_emu_backward(emu, dtype, shape, *inputs, coefs, reduction, grad_logp, gm,
                               grad_ref_sq, bstrides=batch_strides(*inputs, gm))
    assert rc == 0
    e_rc, exp = run_emu_backward(emu, dtype, shape, *contiguous(*inputs), coefs, reduction,
                                 grad_logp, *contiguous(gm), grad_ref_sq)
    assert e_rc == 0
    assert not torch.isnan(got).any(), "grad_v not fully written"
    assert_bitwise([got], [exp])


STRIDED_ELEM_VARIANTS = {k: ELEM_VARIANTS[k] for k in ("kl", "kl_simple_shared", "no_ref",
                                                       "no_grad")}


@needs_cpu_elem_loss
@pytest.mark.parametrize("dtype", STRIDED_DTYPES)
@pytest.mark.parametrize("shape", STRIDED_SHAPES)
@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
@pytest.mark.parametrize("variant", list(STRIDED_ELEM_VARIANTS))
def test_flow_grpo_elem_loss_cuda_kernels_batch_strided(emu, dtype, shape, layout, variant):
    with_ref, beta, simple, shared_map, write_grad = STRIDED_ELEM_VARIANTS[variant]
    inputs = list(elem_loss_inputs(shape, dtype, with_ref, shared_map, seed=6,
                                   layout=STRIDED_LAYOUTS[layout]))
    got = run_emu_elem_loss(emu, dtype, shape, *inputs, beta, simple, write_grad,
                            bstrides=batch_strides(*inputs[:4]))
    inputs[:4] = contiguous(*inputs[:4])
    exp = run_emu_elem_loss(emu, dtype, shape, *inputs, beta, simple, write_grad)
    assert got[0] == 0 and exp[0] == 0 and got[4:] == exp[4:]     # launches, workspace
    if shape[0] * shape[1] * shape[2] > 100 and not simple:
        assert 0 < got[2][1].item() < 1                    # ratios on both sides of the bounds
    assert_bitwise(got[1:4], exp[1:4])


def padded(t, pad=1):
    """t's values with `pad` elements of noise after each sample: batch stride N + pad, which for
    pad = 1 and N a multiple of VEC leaves sample 1 off a 16-byte boundary."""
    B, N = t.shape[0], t[0].numel()
    big = torch.randn(B, N + pad, generator=torch.Generator().manual_seed(N + pad)).to(t.dtype)
    big[:, :N] = t.reshape(B, N)
    return big[:, :N].view(t.shape)


@pytest.mark.parametrize("dtype", STRIDED_DTYPES)
@pytest.mark.parametrize("op", ["forward", "backward", "elem_loss"])
def test_flow_step_cuda_kernels_unaligned_batch_stride(emu, dtype, op):
    """Rows of whole vectors and every pointer 16-byte aligned, but model_output's batch stride
    N + 1 leaves sample 1 unaligned: the strided fragments (the 128-bit ones would read sample 1
    off its boundary, which ends the emulator: see the emu fixture). The results equal, bit for
    bit, those of contiguous copies forced onto the strided fragments by a misaligned input, and
    the elementwise outputs those of the 128-bit run too (the sums of that run add the same terms
    in another order)."""
    shape = (2, 4, 64)
    inputs = list(elem_loss_inputs(shape, dtype, True, False, seed=7))
    v, x, prev, ref, coefs = inputs[:5]
    grads = torch.randn(2, shape[0], generator=torch.Generator().manual_seed(8))
    grad_logp, grad_ref_sq = grads.to(acc_dtype(dtype))

    def run(v_in, x_in, bstrides=None):
        """The op's outputs, its sums first."""
        if op == "forward":
            rc, _, *out = run_emu_forward(emu, dtype, shape, v_in, x_in, prev, ref, coefs, 0,
                                          False, True, bstrides)
        elif op == "backward":                                # no grad_mean
            bs = None if bstrides is None else bstrides + [ABSENT_BSTRIDE]
            rc, *out = run_emu_backward(emu, dtype, shape, v_in, x_in, prev, ref, coefs, 0,
                                        grad_logp, None, grad_ref_sq, bs)
        else:
            rc, *out = run_emu_elem_loss(emu, dtype, shape, v_in, x_in, *inputs[2:], 0.05, False,
                                         True, bstrides=bstrides)[:4]
        assert rc == 0
        return out

    vp = padded(v)
    assert vp.data_ptr() % 16 == 0 and vp.stride(0) == 257
    got = run(vp, x, batch_strides(vp, x, prev, ref))
    scalar = run(v, misaligned(x))
    vector = run(v, x)
    assert_bitwise(got, scalar)
    n_sums = {"forward": 2, "backward": 0, "elem_loss": 2}[op]  # logp, ref_sq / loss, metrics
    assert_bitwise(got[n_sums:], vector[n_sums:])


def test_flow_step_cuda_kernels_reject_bad_batch_strides(emu):
    """A batch stride is -1 (contiguous) or >= 0, and its last sample within int64 offsets;
    anything else is cudaErrorInvalidValue up front (the forward and the loss plan nothing)."""
    shape = (2, 3, 4)                                      # N = 12: strides 0..12 stay in bounds
    inputs = elem_loss_inputs(shape, torch.float32, True, False)
    v, x, prev, ref, coefs = inputs[:5]
    huge = 2**63 - 1

    def fwd(bs):
        rc, launches, *_ = run_emu_forward(emu, torch.float32, shape, v, x, prev, ref, coefs, 0,
                                           False, True, bs)
        return rc, launches

    assert fwd([-1, 0, 12, 5]) == (0, 2)
    assert fwd([-2, -1, -1, -1]) == (1, -1)
    assert fwd([-1, -1, -1, huge]) == (1, -1)

    def bwd(bs):
        return run_emu_backward(emu, torch.float32, shape, v, x, prev, ref, coefs, 0,
                                torch.ones(2), x, torch.ones(2), bs)[0]

    assert bwd([-1, 0, 12, 5, 0]) == 0
    assert bwd([-1, -1, -1, -1, -2]) == 1                   # grad_mean's
    assert bwd([-1, huge, -1, -1, -1]) == 1

    def elem(bs):
        rc, _, _, _, launches, ws = run_emu_elem_loss(emu, torch.float32, shape, *inputs, 0.05,
                                                      False, True, bstrides=bs)
        return rc, launches, ws

    assert elem([-1, 0, 12, 5])[:2] == (0, 2)
    assert elem([-1, -1, -5, -1]) == (1, -1, 0)
    assert elem([-1, -1, -1, huge]) == (1, -1, 0)


# ------------------------------------------- row-strided old_log_prob / advantage_map, in place
# The map losses read old_log_prob and advantage_map row by row (row b at ptr + b * row_stride,
# each row contiguous): the per-step slices old_log_prob[:, j] / map[:, j] of [B, steps, n]
# tensors stored for a whole trajectory, and expanded rows (stride 0), are read without a copy.
# Results must be those of contiguous copies bit for bit (same launch plan; the elem loss keeps
# its 128-bit fragments while each row stays 16-byte aligned, see
# test_flow_grpo_elem_loss_cuda_kernels_row_stride_alignment for rows that do not).

# Per [rows, n] input: (j, K), the slice big[:, j] of a [rows, K, n] tensor (row stride K*n), or
# None, the first row expanded over the batch (row stride 0). "latents": the elem loss's latents
# laid out by that STRIDED_LAYOUTS entry (None: contiguous).
ROW_LAYOUTS = {
    "slices": {"old": (1, 3), "map": (2, 4), "latents": None},
    "slices_other": {"old": (0, 2), "map": (4, 5), "latents": "slices"},
    "expanded": {"old": None, "map": None, "latents": "expanded"},
}


def lay_out_rows(t, spec):
    """t [rows, n] laid out as spec says (ROW_LAYOUTS); the slice's neighbours in the big tensor
    are NaN (even j) or noise (odd j), which a wrong row stride or offset would read."""
    if spec is None:
        return t[:1].expand(t.shape)
    j, K = spec
    g = torch.Generator().manual_seed(100 * K + j + t.shape[1])
    big = torch.randn(t.shape[0], K, t.shape[1], generator=g, dtype=torch.float64).to(t.dtype)
    big[:, ::2] = float("nan")
    big[:, j] = t
    return big[:, j]


def binding_row_strides(old, amap):
    """The row strides flow_step_cuda.cpp passes: old_log_prob's batch stride (n for one row),
    the map's row stride (0 for a single row, then ignored with map_shared)."""
    n = old.shape[1]
    return [old.stride(0) if old.shape[0] > 1 else n,
            0 if amap.shape[0] == 1 else amap.stride(0)]


def run_emu_map_surrogate(emu, dtype, logp, ref_sq, kl_w, old, adv, amap, beta, simple,
                          row_strides=None):
    """The emulated map surrogate on a copy of logp, row_strides those of (old, amap) (None:
    contiguous): (rc, launches, logp as overwritten, loss, metrics, grad_ref_sq)."""
    B, P = logp.shape
    buf = logp.clone()
    loss = torch.full((), float("nan"), dtype=dtype)
    metrics = torch.full((4,), float("nan"), dtype=dtype)
    dref = torch.full((B,), float("nan"), dtype=dtype)
    launches = ctypes.c_int(0)
    rc = emu.emu_flow_grpo_map_surrogate(
        DTYPE_CODE[dtype], I64(B), I64(P), ptr(buf), ptr(ref_sq), ptr(kl_w), ptr(old), ptr(adv),
        ptr(amap), int(amap.shape[0] == 1), ctypes.c_double(0.1), ctypes.c_double(5.0),
        ctypes.c_double(beta), int(simple), ptr(loss), ptr(metrics), ptr(dref),
        ctypes.byref(launches), i64_array(row_strides))
    return rc, launches.value, buf, loss, metrics, dref


def map_surrogate_inputs(B, P, dtype, with_ref, shared_map, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(B, P, generator=g, dtype=torch.float64) - 1).to(dtype)
    old = (logp.double() - 0.3 * torch.randn(B, P, generator=g, dtype=torch.float64)).to(dtype)
    old[:, ::3] = logp[:, ::3]
    adv = (4 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    amap = torch.rand(1 if shared_map else B, P, generator=g, dtype=torch.float64).to(dtype)
    ref_sq = torch.rand(B, generator=g, dtype=torch.float64).to(dtype) if with_ref else None
    kl_w = (1e-3 * torch.rand(B, generator=g, dtype=torch.float64)).to(dtype) if with_ref else None
    return logp, ref_sq, kl_w, old, adv, amap


# (B, P): odd rows (odd row strides), 3 blocks per sample (the last ragged), one sample
MAP_ROW_SHAPES = [(3, 41), (2, 2500), (1, 41)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,P", MAP_ROW_SHAPES)
@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
@pytest.mark.parametrize("shared_map", [False, True])
@pytest.mark.parametrize("with_ref,beta,simple", [(True, 0.05, False), (False, 0.0, True)])
def test_flow_grpo_map_surrogate_cuda_kernels_row_strided(emu, dtype, B, P, layout, shared_map,
                                                          with_ref, beta, simple):
    """old_log_prob and the map (per sample, or a shared row sliced out of a bigger tensor) read
    in place: logp overwritten, loss, metrics and grad_ref_sq as from contiguous copies, bit for
    bit. The kernel reads them with scalar loads, so no stride needs any alignment."""
    logp, ref_sq, kl_w, old, adv, amap = map_surrogate_inputs(B, P, dtype, with_ref, shared_map,
                                                              seed=B * 7 + P)
    spec = ROW_LAYOUTS[layout]
    old_in, map_in = lay_out_rows(old, spec["old"]), lay_out_rows(amap, spec["map"])
    if spec["old"] is not None and B > 1:
        assert old_in.stride(0) == spec["old"][1] * P and not old_in.is_contiguous()
    got = run_emu_map_surrogate(emu, dtype, logp, ref_sq, kl_w, old_in, adv, map_in, beta, simple,
                                binding_row_strides(old_in, map_in))
    exp = run_emu_map_surrogate(emu, dtype, logp, ref_sq, kl_w, old_in.contiguous(), adv,
                                map_in.contiguous(), beta, simple)
    assert got[0] == 0 and exp[0] == 0 and got[1] == exp[1] == 2
    assert not torch.isnan(got[2]).any() and not torch.isnan(got[3]), "NaN read from a neighbour"
    if layout != "expanded" and B * P > 100 and not simple:
        assert 0 < got[4][1].item() < 1                    # ratios on both sides of the bounds
    assert_bitwise(got[2:], exp[2:])                       # logp overwritten identically too


@pytest.mark.parametrize("dtype", STRIDED_DTYPES)
@pytest.mark.parametrize("shape", STRIDED_SHAPES)
@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
@pytest.mark.parametrize("variant", list(STRIDED_ELEM_VARIANTS))
def test_flow_grpo_elem_loss_cuda_kernels_row_strided(emu, dtype, shape, layout, variant):
    """old_log_prob and the map read in place (with the latents contiguous, sliced or expanded):
    the results of contiguous copies bit for bit. N = 256 keeps every row stride a multiple of
    VEC floats (the 128-bit fragments, and neighbours of NaN that a misplaced 128-bit word would
    pull in); N = 111 gives odd row strides (strided fragments); B = 1 one row."""
    with_ref, beta, simple, shared_map, write_grad = STRIDED_ELEM_VARIANTS[variant]
    spec = ROW_LAYOUTS[layout]
    lat = None if spec["latents"] is None else STRIDED_LAYOUTS[spec["latents"]]
    inputs = list(elem_loss_inputs(shape, dtype, with_ref, shared_map, seed=8, layout=lat))
    inputs[6] = lay_out_rows(inputs[6], spec["old"])
    inputs[8] = lay_out_rows(inputs[8], spec["map"])
    got = run_emu_elem_loss(emu, dtype, shape, *inputs, beta, simple, write_grad,
                            bstrides=batch_strides(*inputs[:4]),
                            row_strides=binding_row_strides(inputs[6], inputs[8]))
    inputs[:4] = contiguous(*inputs[:4])
    inputs[6], inputs[8] = inputs[6].contiguous(), inputs[8].contiguous()
    exp = run_emu_elem_loss(emu, dtype, shape, *inputs, beta, simple, write_grad)
    assert_same_launch(got, exp)
    if layout != "expanded" and shape[0] * shape[1] * shape[2] > 100 and not simple:
        assert 0 < got[2][1].item() < 1                    # ratios on both sides of the bounds


def elem_loss_runner(emu, dtype, shape):
    """run(inputs, row_strides=None) -> [loss, metrics, grad_v] of one training launch of the
    elem loss (beta 0.05, reference, gradient), asserting it succeeded."""
    def run(ins, row_strides=None):
        rc, *out = run_emu_elem_loss(emu, dtype, shape, *ins, 0.05, False, True,
                                     row_strides=row_strides)[:4]
        assert rc == 0
        return out
    return run


def assert_vector_or_strided(run, got, inputs, vector, keeps_vector):
    """A launch with one row input laid out differently (`got`) against launches on `inputs`:
    when its rows keep every word aligned it took the vector fragments, the results of the
    vector run (`vector`) bit for bit; otherwise the strided ones, the results of `inputs` forced
    onto them by a misaligned latent bit for bit, and grad_v that of the vector run too (the sums
    add the same terms in another order)."""
    if keeps_vector:
        assert_bitwise(got, vector)
        return
    scalar = list(inputs)
    scalar[1] = misaligned(inputs[1])
    assert_bitwise(got, run(scalar))
    assert_bitwise(got[2:], vector[2:])


def assert_same_launch(got, exp):
    """Two successful elem-loss launches with the same plan (launches, workspace) and bitwise
    equal loss, metrics and grad_v; no NaN read from memory beside a strided input."""
    assert got[0] == 0 and exp[0] == 0 and got[4:] == exp[4:]
    assert not torch.isnan(got[1]), "NaN read from a neighbour"
    assert_bitwise(got[1:4], exp[1:4])


@pytest.mark.parametrize("dtype", STRIDED_DTYPES)
@pytest.mark.parametrize("which", [6, 8])                  # old_log_prob, advantage_map
@pytest.mark.parametrize("pad", [1, 4])
def test_flow_grpo_elem_loss_cuda_kernels_row_stride_alignment(emu, dtype, which, pad):
    """Rows of whole vectors (N = 256) and every pointer 16-byte aligned, one input's rows
    N + pad floats apart. pad = 4 keeps row 1 on a 16-byte boundary: the 128-bit fragments, the
    results of the contiguous run bit for bit. pad = 1 leaves it off (a 128-bit load there ends
    the emulator: see the emu fixture): the strided fragments, the results of contiguous copies
    forced onto them by a misaligned latent bit for bit, and grad_v that of the 128-bit run too
    (the sums of that run add the same terms in another order)."""
    shape = (2, 4, 64)
    inputs = list(elem_loss_inputs(shape, dtype, True, False, seed=9))
    run = elem_loss_runner(emu, dtype, shape)
    strided = list(inputs)
    strided[which] = padded(inputs[which], pad)
    assert strided[which].data_ptr() % 16 == 0 and strided[which].stride(0) == 256 + pad
    got = run(strided, binding_row_strides(strided[6], strided[8]))
    assert_vector_or_strided(run, got, inputs, run(inputs), keeps_vector=pad % 4 == 0)


def test_map_losses_cuda_kernels_reject_bad_row_strides(emu):
    """A row stride is -1 (contiguous) or >= 0 (0: one row read by every sample), its last row
    within int64 offsets; anything else is cudaErrorInvalidValue with no launch plan (num_launches
    -1, elem loss workspace 0). With map_shared the map's row stride is ignored."""
    huge = 2**63 - 1
    shape = (2, 3, 4)                                      # N = 12

    def elem(rs, shared=False):
        inputs = elem_loss_inputs(shape, torch.float32, True, shared)
        rc, _, _, _, launches, ws = run_emu_elem_loss(emu, torch.float32, shape, *inputs, 0.05,
                                                      False, True, row_strides=rs)
        return rc, launches, ws

    assert elem([0, 0])[:2] == (0, 2) and elem([24, 13])[:2] == (0, 2)
    assert elem([-2, -1]) == (1, -1, 0)
    assert elem([-1, -5]) == (1, -1, 0)
    assert elem([huge, -1]) == (1, -1, 0)
    assert elem([-1, huge]) == (1, -1, 0)
    assert elem([-1, -7], shared=True)[:2] == (0, 2)       # ignored
    assert elem([-1, huge], shared=True)[:2] == (0, 2)
    assert elem([-3, 0], shared=True) == (1, -1, 0)

    def surrogate(rs, shared=False):
        logp, ref_sq, kl_w, old, adv, amap = map_surrogate_inputs(2, 5, torch.float32, True,
                                                                  shared, seed=1)
        return run_emu_map_surrogate(emu, torch.float32, logp, ref_sq, kl_w, old, adv, amap,
                                     0.05, False, rs)[:2]

    assert surrogate([0, 5]) == (0, 2) and surrogate([7, 0]) == (0, 2)
    assert surrogate([-2, -1]) == (1, -1)
    assert surrogate([-1, -9]) == (1, -1)
    assert surrogate([huge, -1]) == (1, -1)
    assert surrogate([-1, huge]) == (1, -1)
    assert surrogate([-1, -9], shared=True) == (0, 2)      # ignored
    assert surrogate([-4, 0], shared=True) == (1, -1)


# ------------------------------- mixed dtypes: a bf16 / fp16 model output beside float32 latents
# Flow-GRPO keeps its trajectory latents in float32 while the transformer's velocity is bfloat16.
# The flow-step kernels take model_output and ref_model_output (and write grad_v) in the model
# dtype and everything else in the latent dtype, converting every value to float on load: the
# results must equal, bit for bit, those of the all-float32 run on model_output and
# ref_model_output converted to float32 first (same launch plan, fragments and summation order),
# but for grad_v, which is that run's rounded to the model dtype (round to nearest even).

MIXED_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
MIXED_IDS = ["bf16_fp32", "fp16_fp32"]
# (B, C, S): whole 128-bit latent fragments per row and per channel (the model-typed fragments
# then one 8-byte word each); N = 111 (strided fragments, ragged tails).
MIXED_SHAPES = [(2, 4, 64), (2, 3, 37)]
MIXED_FWD_VARIANTS = {  # sampling, with_ref, write_mean, with prev_or_noise
    "stored_prev": (False, False, False, True),
    "stored_prev_ref_mean": (False, True, True, True),
    "no_prev_ref": (False, True, False, False),
    "sampling": (True, False, False, True),
    "sampling_ref_mean": (True, True, True, True),
}


def as_model(model, *ts):
    """The model-typed inputs (None stays None) and, for the comparison run, their float32
    values."""
    mixed = [None if t is None else t.to(model) for t in ts]
    return mixed, [None if t is None else t.float() for t in mixed]


def rounded_to(model, outs, which):
    """outs with the outputs at indices `which` (grad_v) rounded to the model dtype."""
    return [o.to(model) if i in which and o is not None else o for i, o in enumerate(outs)]


@pytest.mark.parametrize("model,latent", MIXED_PAIRS, ids=MIXED_IDS)
@pytest.mark.parametrize("shape", MIXED_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("variant", list(MIXED_FWD_VARIANTS))
def test_flow_step_forward_cuda_kernel_mixed_dtypes(emu, model, latent, shape, reduction, variant):
    sampling, with_ref, write_mean, with_pn = MIXED_FWD_VARIANTS[variant]
    v, x, prev, noise, ref, coefs = flow_inputs(shape, latent, seed=11)
    pn = (noise if sampling else prev) if with_pn else None
    (vm, rm), (v32, r32) = as_model(model, v, ref if with_ref else None)
    got = run_emu_forward(emu, latent, shape, vm, x, pn, rm, coefs, reduction, sampling,
                          write_mean)
    exp = run_emu_forward(emu, latent, shape, v32, x, pn, r32, coefs, reduction, sampling,
                          write_mean)
    assert got[0] == 0 and exp[0] == 0 and got[1] == exp[1]
    assert not torch.isnan(got[2]).any(), "logp not fully written"
    assert all(t is None or t.dtype == latent for t in got[4:])   # mean, prev: latents
    assert_bitwise(got[2:], exp[2:])


@pytest.mark.parametrize("model,latent", MIXED_PAIRS, ids=MIXED_IDS)
@pytest.mark.parametrize("shape", MIXED_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("terms", list(STRIDED_BWD_TERMS))
def test_flow_step_backward_cuda_kernel_mixed_dtypes(emu, model, latent, shape, reduction, terms):
    has_gl, has_prev, has_gm, has_gq = STRIDED_BWD_TERMS[terms]
    v, x, prev, _, ref, coefs = flow_inputs(shape, latent, seed=12)
    g = torch.Generator().manual_seed(13)
    grad_logp = torch.randn(logp_shape(shape, reduction), generator=g) if has_gl else None
    grad_mean = torch.randn(shape, generator=g) if has_gm else None
    grad_ref_sq = torch.randn(shape[0], generator=g) if has_gq else None
    prev_in = prev if has_prev else None
    (vm, rm), (v32, r32) = as_model(model, v, ref if has_gq else None)
    rc, got = run_emu_backward(emu, latent, shape, vm, x, prev_in, rm, coefs, reduction,
                               grad_logp, grad_mean, grad_ref_sq)
    e_rc, exp = run_emu_backward(emu, latent, shape, v32, x, prev_in, r32, coefs, reduction,
                                 grad_logp, grad_mean, grad_ref_sq)
    assert rc == 0 and e_rc == 0 and got.dtype == model
    assert not torch.isnan(got).any(), "grad_v not fully written"
    assert_bitwise([got], [exp.to(model)])


@pytest.mark.parametrize("model,latent", MIXED_PAIRS, ids=MIXED_IDS)
@pytest.mark.parametrize("shape", MIXED_SHAPES)
@pytest.mark.parametrize("variant", list(ELEM_VARIANTS))
def test_flow_grpo_elem_loss_cuda_kernels_mixed_dtypes(emu, model, latent, shape, variant):
    with_ref, beta, simple, shared_map, write_grad = ELEM_VARIANTS[variant]
    inputs = list(elem_loss_inputs(shape, latent, with_ref, shared_map, seed=14))
    (vm, rm), (v32, r32) = as_model(model, inputs[0], inputs[3])
    got = run_emu_elem_loss(emu, latent, shape, vm, *inputs[1:3], rm, *inputs[4:], beta, simple,
                            write_grad)
    exp = run_emu_elem_loss(emu, latent, shape, v32, *inputs[1:3], r32, *inputs[4:], beta,
                            simple, write_grad)
    assert got[0] == 0 and exp[0] == 0 and got[4:] == exp[4:]     # launches, workspace
    assert got[3] is None or got[3].dtype == model
    if not simple:
        assert 0 < got[2][1].item() < 1                    # ratios on both sides of the bounds
    assert_bitwise(got[1:4], rounded_to(model, exp[1:4], {2}))


@pytest.mark.parametrize("model,latent", MIXED_PAIRS, ids=MIXED_IDS)
@pytest.mark.parametrize("op", ["forward", "backward", "elem_loss"])
@pytest.mark.parametrize("pad", [1, 4])
def test_flow_step_cuda_kernels_mixed_dtypes_batch_strided(emu, model, latent, op, pad):
    """The 2-byte model output is read in 8-byte words beside the float32 latents' 16-byte ones:
    model_output's batch stride N + 4 keeps every sample 8-byte aligned (but sample 1 off a
    16-byte boundary), so the vector fragments stay and the results equal those of a contiguous
    model_output bit for bit; N + 1 leaves sample 1 off an 8-byte boundary: the strided fragments
    (an 8-byte load there would trap the emulator), whose results are those of the contiguous
    inputs forced onto them by a misaligned sample."""
    shape = (2, 4, 64)
    inputs = list(elem_loss_inputs(shape, latent, True, False, seed=15))
    (vm, rm), _ = as_model(model, inputs[0], inputs[3])
    x, prev, coefs = inputs[1], inputs[2], inputs[4]
    grads = torch.randn(2, shape[0], generator=torch.Generator().manual_seed(16))
    grad_logp, grad_ref_sq = grads

    def run(v_in, x_in, bstrides=None):
        if op == "forward":
            rc, _, *out = run_emu_forward(emu, latent, shape, v_in, x_in, prev, rm, coefs, 0,
                                          False, True, bstrides)
        elif op == "backward":
            bs = None if bstrides is None else bstrides + [ABSENT_BSTRIDE]
            rc, *out = run_emu_backward(emu, latent, shape, v_in, x_in, prev, rm, coefs, 0,
                                        grad_logp, None, grad_ref_sq, bs)
        else:
            rc, *out = run_emu_elem_loss(emu, latent, shape, v_in, x_in, prev, rm, *inputs[4:],
                                         0.05, False, True, bstrides=bstrides)[:4]
        assert rc == 0
        return out

    vp = padded(vm, pad)
    assert vp.data_ptr() % 16 == 0 and vp.stride(0) == 256 + pad
    got = run(vp, x, batch_strides(vp, x, prev, rm))
    assert_bitwise(got, run(vm, x) if pad == 4 else run(vm, misaligned(x)))


def test_flow_step_cuda_kernels_reject_unsupported_dtype_pairs(emu):
    """Allowed: one dtype for all, or a bf16 / fp16 model output beside float32 latents (model
    dtype -1: the latent dtype). Any other pair is cudaErrorInvalidValue up front: no launch plan
    (forward and elem loss num_launches -1, elem loss workspace 0)."""
    shape = (2, 3, 4)
    inputs = elem_loss_inputs(shape, torch.float32, True, False)
    v, x, prev, ref, coefs = inputs[:5]
    f32, f64, f16, bf16 = (DTYPE_CODE[t] for t in (torch.float32, torch.float64, torch.float16,
                                                   torch.bfloat16))

    def fwd(latent, model):
        return tuple(run_emu_forward(emu, latent, shape, v, x, prev, ref, coefs, 0, False, True,
                                     model=model)[:2])

    def bwd(latent, model):
        return run_emu_backward(emu, latent, shape, v, x, prev, ref, coefs, 0, torch.ones(2), x,
                                torch.ones(2), model=model)[0]

    def elem(latent, model):
        rc, _, _, _, launches, ws = run_emu_elem_loss(emu, latent, shape, *inputs, 0.05, False,
                                                      True, model=model)
        return rc, launches, ws

    assert fwd(torch.float32, f32) == (0, 2)               # the same dtype, named explicitly
    assert bwd(torch.float32, f32) == 0
    assert elem(torch.float32, f32)[:2] == (0, 2)
    bad = [(torch.bfloat16, f32), (torch.float16, f32),    # a wider model output
           (torch.float64, bf16), (torch.float64, f32),    # beside float64 latents
           (torch.bfloat16, f16), (torch.float16, bf16),   # two different 2-byte types
           (torch.float32, f64), (torch.float32, 7)]       # float64 model, no such dtype
    for latent, model in bad:
        assert fwd(latent, model) == (1, -1), (latent, model)
        assert bwd(latent, model) == 1, (latent, model)
        assert elem(latent, model) == (1, -1, 0), (latent, model)


# ------------------------- the elem loss's old_log_prob / map stored as bf16 / fp16 (float accum.)
# With float accumulation, old_log_prob and advantage_map may each be bfloat16 or float16: the
# kernel widens them as it loads them (exactly), so its results must equal, bit for bit, those of
# the same launch on float32 copies of the same values (same plan, fragments and sums), whatever
# the latents (float32, bfloat16, a bf16 model output beside float32) and row layout.

ROW_DTYPES = [torch.bfloat16, torch.float16]
ROW_IDS = ["bf16", "fp16"]
REDUCED_ROWS = {"old": (6,), "map": (8,), "both": (6, 8)}     # which inputs are reduced
# (latent dtype, model dtype): their 2-byte row fragments are 8-byte words beside float32
# latents, 16-byte ones beside bfloat16 latents
ROW_LATENTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
               "bf16_model_fp32": (torch.float32, torch.bfloat16)}
REDUCED_ELEM_VARIANTS = {k: ELEM_VARIANTS[k] for k in ("kl", "kl_simple_shared", "no_grad")}


def reduced_rows(inputs, rows, row_dtype):
    """inputs with the old_log_prob / map entries in `rows` rounded to row_dtype, and the same with
    those reduced values as float32 (the comparison)."""
    red, f32 = list(inputs), list(inputs)
    for i in rows:
        red[i] = inputs[i].to(row_dtype)
        f32[i] = red[i].float()
    return red, f32


def row_latents(shape, latents, with_ref, shared_map, seed):
    """elem_loss_inputs for a ROW_LATENTS entry (the model-typed inputs converted)."""
    latent, model = ROW_LATENTS[latents]
    inputs = list(elem_loss_inputs(shape, latent, with_ref, shared_map, seed=seed))
    if model is not None:
        (inputs[0], inputs[3]), _ = as_model(model, inputs[0], inputs[3])
    return latent, inputs


@needs_cpu_elem_loss
@pytest.mark.parametrize("row_dtype", ROW_DTYPES, ids=ROW_IDS)
@pytest.mark.parametrize("rows", list(REDUCED_ROWS))
@pytest.mark.parametrize("latents", list(ROW_LATENTS))
@pytest.mark.parametrize("shape", MIXED_SHAPES)
@pytest.mark.parametrize("variant", list(REDUCED_ELEM_VARIANTS))
def test_flow_grpo_elem_loss_cuda_kernels_reduced_rows(emu, row_dtype, rows, latents, shape,
                                                       variant):
    """A bf16 / fp16 old_log_prob and/or map (per sample, or shared by the batch): the results
    of float32 copies bit for bit (N = 256: vector fragments, N = 111: strided ones), and the CPU
    op's on the same reduced inputs up to summation order."""
    with_ref, beta, simple, shared_map, write_grad = REDUCED_ELEM_VARIANTS[variant]
    latent, inputs = row_latents(shape, latents, with_ref, shared_map, seed=17)
    red, f32 = reduced_rows(inputs, REDUCED_ROWS[rows], row_dtype)
    got = run_emu_elem_loss(emu, latent, shape, *red, beta, simple, write_grad)
    exp = run_emu_elem_loss(emu, latent, shape, *f32, beta, simple, write_grad)
    assert got[0] == 0 and exp[0] == 0 and got[4:] == exp[4:]     # launches, workspace
    if not simple:
        assert 0 < got[2][1].item() < 1                    # ratios on both sides of the bounds
    assert_bitwise(got[1:4], exp[1:4])
    e_loss, e_metrics, _ = torch.ops.tbkernels.flow_grpo_elem_loss(
        *red, ELEM_CLIP, 5.0, beta, simple, write_grad)
    n = shape[0] * shape[1] * shape[2]
    assert_reduction(got[1], e_loss, n, torch.float32)
    assert_reduction(got[2][[0, 1, 3]], e_metrics[[0, 1, 3]], n, torch.float32)


@pytest.mark.parametrize("row_dtype", ROW_DTYPES, ids=ROW_IDS)
@pytest.mark.parametrize("latents", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", STRIDED_SHAPES)
@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
@pytest.mark.parametrize("shared_map", [False, True])
def test_flow_grpo_elem_loss_cuda_kernels_reduced_rows_strided(emu, row_dtype, latents, shape,
                                                               layout, shared_map):
    """Reduced old_log_prob and map read in place from trajectory slices (neighbours NaN or
    noise) or expanded rows, beside contiguous / sliced / expanded latents: the results of
    contiguous float32 copies bit for bit."""
    latent, _ = ROW_LATENTS[latents]
    spec = ROW_LAYOUTS[layout]
    lat = None if spec["latents"] is None else STRIDED_LAYOUTS[spec["latents"]]
    inputs = list(elem_loss_inputs(shape, latent, True, shared_map, seed=18, layout=lat))
    red, _ = reduced_rows(inputs, (6, 8), row_dtype)
    red[6] = lay_out_rows(red[6], spec["old"])
    red[8] = lay_out_rows(red[8], spec["map"])
    assert red[6].dtype == red[8].dtype == row_dtype
    got = run_emu_elem_loss(emu, latent, shape, *red, 0.05, False, True,
                            bstrides=batch_strides(*red[:4]),
                            row_strides=binding_row_strides(red[6], red[8]))
    f32 = contiguous(*red)
    f32[6], f32[8] = f32[6].float(), f32[8].float()
    exp = run_emu_elem_loss(emu, latent, shape, *f32, 0.05, False, True)
    assert_same_launch(got, exp)


@pytest.mark.parametrize("row_dtype", ROW_DTYPES, ids=ROW_IDS)
@pytest.mark.parametrize("latents", ["fp32", "bf16"])
@pytest.mark.parametrize("which", [6, 8])                  # old_log_prob, advantage_map
@pytest.mark.parametrize("pad", [0, 1, 2, 4, 8])
def test_flow_grpo_elem_loss_cuda_kernels_reduced_row_alignment(emu, row_dtype, latents, which,
                                                                pad):
    """A 2-byte row's fragment is one 8-byte word beside float32 latents (VEC 4), one 16-byte
    word beside bfloat16 ones (VEC 8). N = 256 and every pointer 16-byte aligned, one reduced
    input's rows N + pad elements apart (pad 0: its data starting one element off instead). Rows
    that keep every word aligned (pad 4 beside float32, pad 8 either way) keep the vector
    fragments: the results of the contiguous float32 run bit for bit. The others (a vector load
    there ends the emulator: see the emu fixture) take the strided fragments: the results of
    float32 copies forced onto them by a misaligned latent bit for bit, and grad_v that of the
    vector run too."""
    shape = (2, 4, 64)
    latent, _ = ROW_LATENTS[latents]
    inputs = list(elem_loss_inputs(shape, latent, True, False, seed=19))
    red, f32 = reduced_rows(inputs, (6, 8), row_dtype)
    run = elem_loss_runner(emu, latent, shape)
    if pad == 0:
        red[which] = misaligned(red[which])
        assert red[which].data_ptr() % 4 != 0
    else:
        red[which] = padded(red[which], pad)
        assert red[which].data_ptr() % 16 == 0 and red[which].stride(0) == 256 + pad
    got = run(red, binding_row_strides(red[6], red[8]))
    word = 2 * (128 // torch.finfo(latent).bits)           # VEC 2-byte values
    assert_vector_or_strided(run, got, f32, run(f32),
                             keeps_vector=bool(pad) and (2 * pad) % word == 0)


def test_flow_grpo_elem_loss_cuda_kernel_row_dtypes(emu):
    """old_log_prob's / the map's dtype: -1 or the accumulation type named (float32, float64 for
    float64 latents), and bfloat16 / float16 with float accumulation (float32, bfloat16 or
    float16 latents). Anything else is cudaErrorInvalidValue with no launch plan."""
    shape = (2, 3, 4)
    f32, f64, f16, bf16 = (DTYPE_CODE[t] for t in (torch.float32, torch.float64, torch.float16,
                                                   torch.bfloat16))

    def elem(latent, codes):
        inputs = elem_loss_inputs(shape, latent, True, False)
        rc, _, _, _, launches, ws = run_emu_elem_loss(emu, latent, shape, *inputs, 0.05, False,
                                                      True, row_dtypes=codes)
        return rc, launches, ws

    for latent in (torch.float32, torch.bfloat16, torch.float16):
        for codes in ([-1, -1], [f32, f32], [bf16, f16], [f16, -1], [f32, bf16]):
            assert elem(latent, codes)[:2] == (0, 2), (latent, codes)
        for codes in ([f64, -1], [-1, f64], [7, -1], [-1, -2]):
            assert elem(latent, codes) == (1, -1, 0), (latent, codes)
    assert elem(torch.float64, [f64, -1])[:2] == (0, 2)
    for codes in ([f32, -1], [-1, f32], [bf16, -1], [-1, f16]):     # double keeps double only
        assert elem(torch.float64, codes) == (1, -1, 0), codes


# --------------------------------------------------------------------------------- per-sample MSE
@pytest.mark.parametrize("pred_dtype,target_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)])
@pytest.mark.parametrize("B,D", [(1, 1), (3, 1000), (2, 70001), (5, 33)])
def test_per_sample_mse_cuda_kernels(emu, pred_dtype, target_dtype, B, D):
    g = torch.Generator().manual_seed(B * D)
    pred = torch.randn(B, D, generator=g).to(pred_dtype)
    target = torch.randn(B, D, generator=g).to(target_dtype)
    acc = torch.float64 if torch.float64 in (pred_dtype, target_dtype) else torch.float32
    out = torch.full((B,), float("nan"), dtype=acc)
    launches = ctypes.c_int(0)
    rc = emu.emu_per_sample_mse_forward(DTYPE_CODE[pred_dtype], DTYPE_CODE[target_dtype], I64(B),
                                        I64(D), ptr(pred), ptr(target), ptr(out),
                                        ctypes.byref(launches))
    assert rc == 0 and launches.value >= 1
    exp = torch.ops.tbkernels.per_sample_mse(pred, target)
    assert_reduction(out, exp, D, torch.float64 if acc == torch.float64 else torch.float32)

    grad_out = torch.randn(B, generator=g).to(acc)
    grad = torch.full((B, D), float("nan")).to(pred_dtype)
    rc = emu.emu_per_sample_mse_backward(DTYPE_CODE[pred_dtype], DTYPE_CODE[target_dtype], I64(B),
                                         I64(D), ptr(grad_out), ptr(pred), ptr(target), ptr(grad))
    assert rc == 0
    assert_elementwise(grad, torch.ops.tbkernels.per_sample_mse_backward(grad_out, pred, target),
                       pred_dtype)
