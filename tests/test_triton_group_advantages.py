"""Triton backend of group_advantages against the float64 reference.

The kernels run under the Triton interpreter (CI runs pytest with TRITON_INTERPRET=1 in the
environment; it has to be set before triton is imported, so this file does not set it) on CPU
tensors, or natively on CUDA tensors when a GPU is present.
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
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported ({exc!r})", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("TRITON_INTERPRET") != "1" and not HAS_CUDA:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton is "
                "imported", allow_module_level=True)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]

# The reference's index_reduce_ warns that it is a beta API.
pytestmark = pytest.mark.filterwarnings("ignore:index_reduce:UserWarning")


def _load_by_path(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


try:
    from tbkernels.kernels import group_advantages as ga
except Exception:  # package not installed / extension not built yet
    ga = _load_by_path("_tbkernels_triton_group_advantages",
                       ROOT / "kernels" / "group_advantages.py")

try:
    from tbkernels.ops import _group_advantages_reference as ref
except Exception:
    ref = _load_by_path("_tbkernels_group_advantages_reference",
                        ROOT / "python" / "tbkernels" / "ops" / "_group_advantages_reference.py")

triton_impl = ga.group_advantages_triton
reference = ref.group_advantages_reference

# Worst |adv - reference| per dtype, printed at the end of the module (visible with -s).
MAX_ERR: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if MAX_ERR:
        print("\nmax |adv - float64 reference|:",
              ", ".join(f"{k}: {v:.3g}" for k, v in sorted(MAX_ERR.items())))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def contiguous_ids(B: int, S: int) -> torch.Tensor:
    return torch.arange(B) // S


def variable_ids(B: int, G: int, gen: torch.Generator, empty: bool = True) -> torch.Tensor:
    """Unsorted dense ids in [0, G) with variable group sizes, size-1 groups and (optionally)
    one id that no sample uses."""
    assert B >= G
    ids = torch.arange(G)                                            # every group used once
    weights = torch.rand(G, generator=gen) ** 3                      # skewed sizes
    weights[: max(1, G // 8)] = 0.0                                  # these stay size 1
    if B > G:
        extra = torch.multinomial(weights + 1e-12, B - G, replacement=True, generator=gen)
        ids = torch.cat([ids, extra])
    if empty and G > 2:
        ids[ids == G - 1] = 0                                        # id G-1 becomes empty
    return ids[torch.randperm(B, generator=gen)]


def make_rewards(B, K, ids, G, gen, dtype=torch.float32, offset=0.0, scale=1.0):
    """Random rewards in which some (group, head) pairs have all-equal rewards."""
    r = torch.randn(B, K, generator=gen, dtype=torch.float64) * scale + offset
    const = torch.randn(G, K, generator=gen, dtype=torch.float64).mul_(scale).add_(offset)
    g = torch.arange(G)
    flat = torch.zeros(G, K, dtype=torch.bool)
    flat[g % 3 == 1, 0] = True                                       # flat in head 0 only
    flat[g % 5 == 2, :] = True                                       # flat in every head
    r = torch.where(flat[ids], const[ids], r)
    return r.to(dtype)


def flat_mask(r: torch.Tensor, ids: torch.Tensor, G: int) -> torch.Tensor:
    """[B, K]: the sample's group has all-equal rewards in that head (includes size-1 groups)."""
    r = r.double()
    K = r.shape[1]
    hi = torch.full((G, K), -torch.inf, dtype=torch.float64).index_reduce_(0, ids, r, "amax")
    lo = torch.full((G, K), torch.inf, dtype=torch.float64).index_reduce_(0, ids, r, "amin")
    return (hi == lo)[ids]


def eager_in_dtype(r, ids, G, std_mode, ddof, eps, clip):
    """The reference's math done by eager PyTorch entirely in r.dtype (no float32 upcast)."""
    B, K = r.shape
    dt = r.dtype
    count = torch.zeros(G, dtype=torch.int64).index_add_(0, ids, torch.ones_like(ids))
    cnt = count.to(dt).unsqueeze(1)
    mean = torch.zeros(G, K, dtype=dt).index_add_(0, ids, r) / cnt.clamp_min(1)
    dev = r - mean[ids]
    ss = torch.zeros(G, K, dtype=dt).index_add_(0, ids, dev * dev)
    dof = cnt - ddof
    std = torch.where(dof > 0, torch.sqrt(ss / dof.clamp_min(1)), torch.zeros_like(ss))
    hi = torch.full((G, K), -torch.inf, dtype=dt).index_reduce_(0, ids, r, "amax")
    lo = torch.full((G, K), torch.inf, dtype=dt).index_reduce_(0, ids, r, "amin")
    if std_mode == 0:
        adv = dev / (std[ids] + eps)
    elif std_mode == 1:
        gdev = r - r.mean(0, keepdim=True)
        gstd = torch.sqrt((gdev * gdev).sum(0, keepdim=True) / (B - ddof))
        adv = dev / (gstd + eps)
    else:
        adv = dev
    adv = torch.where((hi == lo)[ids], torch.zeros_like(adv), adv)
    return adv.clamp(-clip, clip) if clip > 0 else adv


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def run_both(r, ids, S, G, std_mode, ddof, eps, clip, pass_ids):
    """Triton on DEVICE vs the reference in float64 on the same (exactly upcast) rewards."""
    gi = ids.to(DEVICE) if pass_ids else None
    out = triton_impl(r.to(DEVICE), gi, S, G, std_mode, ddof, eps, clip, True)
    exp = reference(r.double(), ids if pass_ids else None, S, G, std_mode, ddof, eps, clip, True)
    return [t.cpu() for t in out], exp


def check(r, ids, S, G, std_mode, ddof, eps, clip, pass_ids, adv_tol=None, stat_tol=None):
    """Compare all four outputs. Default tolerances: mean/std within TOL of the rewards' scale,
    adv within TOL of its own scale; adv_tol / stat_tol override them (absolute)."""
    (adv, mean, std, count), (e_adv, e_mean, e_std, e_count) = run_both(
        r, ids, S, G, std_mode, ddof, eps, clip, pass_ids)
    B, K = r.shape
    stats = torch.float64 if r.dtype == torch.float64 else torch.float32
    assert adv.shape == (B, K) and adv.dtype == r.dtype
    assert mean.shape == std.shape == (G, K) and mean.dtype == std.dtype == stats
    assert count.shape == (G,) and count.dtype == torch.int64
    assert torch.equal(count, e_count)

    tol = TOL[stats]
    if stat_tol is None:
        stat_tol = tol * max(1.0, r.double().abs().max().item())
    err_mean = (mean.double() - e_mean).abs().max().item()
    err_std = (std.double() - e_std).abs().max().item()
    err_adv = (adv.double() - e_adv).abs().max().item()
    assert err_mean <= stat_tol, (err_mean, stat_tol)
    assert err_std <= stat_tol, (err_std, stat_tol)
    assert not torch.isnan(adv).any()
    adv_tol_given = adv_tol
    if adv_tol is None:
        adv_tol = tol * max(1.0, e_adv.abs().max().item())
    assert err_adv <= adv_tol, (err_adv, adv_tol)
    if clip > 0:
        assert adv.double().abs().max().item() <= torch.tensor(clip, dtype=r.dtype).item()
    # all-equal groups (size-1 groups included) give exactly 0
    flat = flat_mask(r, ids, G)
    assert (adv[flat] == 0).all()
    key = str(r.dtype) + ("" if adv_tol_given is None else " (custom tolerance)")
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err_adv)
    return adv, e_adv


MODES = [0, 1, 2]
# (ddof, eps, clip): eps = 0 is safe because all-equal groups never divide
OPTIONS = [(0, 0.0, 0.0), (1, 1e-6, 0.8)]

CONTIGUOUS = [  # (B, S, K)
    (1, 1, 1), (1, 1, 4), (7, 7, 1), (12, 3, 4), (30, 5, 3), (60, 1, 2), (96, 32, 4),
    (1001, 7, 1), (4100, 4100, 1),
    (34000, 17000, 4),          # group larger than an interpreter tile: row kernels
]


@pytest.mark.parametrize("std_mode", MODES)
@pytest.mark.parametrize("B,S,K", CONTIGUOUS)
def test_contiguous_groups(B, S, K, std_mode):
    gen = torch.Generator().manual_seed(1000 * B + 10 * S + K)
    ids = contiguous_ids(B, S)
    r = make_rewards(B, K, ids, B // S, gen)
    for ddof, eps, clip in OPTIONS:
        check(r, ids, S, B // S, std_mode, ddof, eps, clip, pass_ids=False)


ID_CASES = [  # (B, G, K)
    (1, 1, 1), (2, 2, 4), (9, 4, 1), (50, 13, 3), (333, 40, 4), (5000, 700, 2),
    (30000, 3, 1),              # few huge unsorted groups: per-element atomics everywhere
]


@pytest.mark.parametrize("std_mode", MODES)
@pytest.mark.parametrize("B,G,K", ID_CASES)
def test_group_index(B, G, K, std_mode):
    gen = torch.Generator().manual_seed(7 * B + G + K)
    ids = variable_ids(B, G, gen)
    r = make_rewards(B, K, ids, G, gen)
    for ddof, eps, clip in OPTIONS:
        check(r, ids, 1, G, std_mode, ddof, eps, clip, pass_ids=True)


def test_sorted_ids_and_contiguous_ids_match_contiguous_path():
    gen = torch.Generator().manual_seed(3)
    B, S, K = 4096, 64, 2
    ids = contiguous_ids(B, S)
    r = make_rewards(B, K, ids, B // S, gen)
    a = triton_impl(r.to(DEVICE), None, S, B // S, 0, 1, 1e-6, 0.0, True)
    b = triton_impl(r.to(DEVICE), ids.to(DEVICE), 1, B // S, 0, 1, 1e-6, 0.0, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink the tiles so that small inputs span many programs: groups straddle tiles, tiles
    hold more than two groups (per-element atomics), the fused kernel handles several groups
    per program and groups longer than 16 elements go through the row kernels."""
    small = dict(tile=128, fused_tile=64, fused_group_max=16, fused_min_tile=16, min_programs=4)
    for name in list(ga._CONFIGS):
        monkeypatch.setitem(ga._CONFIGS, name, small)


@pytest.mark.parametrize("std_mode", MODES)
@pytest.mark.parametrize("case", [
    ("contiguous", 400, 8, 1), ("contiguous", 333, 37, 3), ("contiguous", 512, 256, 4),
    ("contiguous", 300, 300, 1), ("ids", 377, 60, 2), ("ids", 640, 5, 1), ("sorted", 500, 4, 3),
])
def test_multi_tile_paths(small_tiles, case, std_mode):
    kind, B, n, K = case
    gen = torch.Generator().manual_seed(B + n + K)
    if kind == "contiguous":
        S, G = n, B // n
        ids = contiguous_ids(B, S)
    else:
        S, G = 1, n
        ids = variable_ids(B, G, gen, empty=False)
        if kind == "sorted":                 # large sorted groups: the "two groups per tile" path
            ids = ids.sort().values
    r = make_rewards(B, K, ids, G, gen)
    ddof, eps, clip = OPTIONS[std_mode % 2]
    check(r, ids, S, G, std_mode, ddof, eps, clip, pass_ids=kind != "contiguous")


def test_gpu_tile_configuration(monkeypatch):
    """The tile sizes chosen for a GPU (also run here under the interpreter when there is none)."""
    monkeypatch.setattr(ga, "_config", lambda t: ga._CONFIGS["gpu"])
    gen = torch.Generator().manual_seed(11)
    for B, S, K, std_mode in [(8192, 8, 1, 0), (6000, 12, 4, 1), (2 * 5000, 5000, 1, 0),
                              (2048, 1, 3, 2), (1 << 14, 1 << 13, 1, 1)]:
        ids = contiguous_ids(B, S)
        r = make_rewards(B, K, ids, B // S, gen)
        check(r, ids, S, B // S, std_mode, 1, 1e-6, 0.0, pass_ids=False)
    ids = variable_ids(5000, 300, gen)
    r = make_rewards(5000, 2, ids, 300, gen)
    check(r, ids, 1, 300, 1, 0, 0.0, 2.0, pass_ids=True)


def test_int64_offsets(monkeypatch):
    """The int64 offset variant (used from 2**31 elements on) on small inputs."""
    monkeypatch.setattr(ga, "_INT32_OFFSET_LIMIT", 0)
    gen = torch.Generator().manual_seed(4)
    ids = contiguous_ids(96, 8)
    r = make_rewards(96, 3, ids, 12, gen)
    check(r, ids, 8, 12, 1, 1, 1e-6, 0.8, pass_ids=False)
    idv = variable_ids(96, 10, gen)
    r = make_rewards(96, 3, idv, 10, gen)
    check(r, idv, 1, 10, 0, 0, 0.0, 0.0, pass_ids=True)


def test_large_offset_two_pass():
    """Rewards far from 0: a one-pass variance would cancel catastrophically in float32."""
    gen = torch.Generator().manual_seed(5)
    B, S = 8192, 512
    ids = contiguous_ids(B, S)
    r = make_rewards(B, 2, ids, B // S, gen, offset=1e4)
    # The reported float32 mean of values near 1e4 carries up to half an ulp (4.9e-4) of
    # rounding, hence stat_tol. With the corrected two-pass neither the std (~1) nor the
    # advantages inherit it: they are held to 1e-5 (the kernels that subtracted the rounded mean
    # needed 1e-2 here: errors of 2e-3 in std, 1e-3 in adv). A one-pass variance
    # (E[r^2] - E[r]^2 ~ 1e8 with ulp 8) would be off by O(1).
    check(r, ids, S, B // S, 0, 1, 1e-6, 0.0, pass_ids=False, adv_tol=1e-5, stat_tol=6e-4)
    idv = variable_ids(B, 20, gen)
    r = make_rewards(B, 1, idv, 20, gen, offset=1e4)
    check(r, idv, 1, 20, 0, 1, 1e-6, 0.0, pass_ids=True, adv_tol=1e-5, stat_tol=6e-4)


def test_float64_is_exact_to_rounding():
    gen = torch.Generator().manual_seed(9)
    ids = contiguous_ids(600, 6)
    r = make_rewards(600, 3, ids, 100, gen, dtype=torch.float64)
    for std_mode in MODES:
        check(r, ids, 6, 100, std_mode, 1, 1e-8, 0.2, pass_ids=False)   # 0.2: not a float32
    idv = variable_ids(600, 50, gen)
    r = make_rewards(600, 3, idv, 50, gen, dtype=torch.float64)
    for std_mode in MODES:
        check(r, idv, 1, 50, std_mode, 0, 1e-8, 0.2, pass_ids=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["contiguous", "ids"])
def test_half_precision_within_twice_eager(dtype, kind):
    """Error vs float64 at most 2x that of eager PyTorch doing the same math in the dtype."""
    gen = torch.Generator().manual_seed(21)
    B, K = 2048, 2
    if kind == "contiguous":
        S, G = 32, B // 32
        ids = contiguous_ids(B, S)
    else:
        S, G = 1, 80
        ids = variable_ids(B, G, gen)
    r = make_rewards(B, K, ids, G, gen, dtype=dtype, offset=0.5, scale=2.0)
    floor = torch.finfo(dtype).eps
    for std_mode in MODES:
        for ddof, eps, clip in OPTIONS:
            exp = reference(r.double(), ids if kind == "ids" else None, S, G, std_mode, ddof, eps,
                            clip, True)[0]
            eager = eager_in_dtype(r, ids, G, std_mode, ddof, eps, clip)
            err_eager = (eager.double() - exp).abs().max().item()
            # mean/std are float32 statistics, held to the float32 tolerance inside check()
            check(r, ids, S, G, std_mode, ddof, eps, clip, pass_ids=kind == "ids",
                  adv_tol=2 * err_eager + floor)
            MAX_ERR[f"eager {dtype}"] = max(MAX_ERR.get(f"eager {dtype}", 0.0), err_eager)


@pytest.mark.parametrize("case", ["contiguous", "one_group", "ids", "sorted_ids"])
def test_one_million_rewards(case):
    B = 1_000_000
    gen = torch.Generator().manual_seed(42)
    if case == "contiguous":
        S, G, std_mode = 16, B // 16, 1
        ids = contiguous_ids(B, S)
    elif case == "one_group":
        S, G, std_mode = B, 1, 0
        ids = torch.zeros(B, dtype=torch.int64)
    elif case == "ids":
        S, G, std_mode = 1, 60_000, 0
        ids = variable_ids(B, G, gen)
    else:
        S, G, std_mode = 1, 8, 2
        ids = variable_ids(B, G, gen, empty=False).sort().values
    r = make_rewards(B, 1, ids, G, gen)
    check(r, ids, S, G, std_mode, 1, 1e-6, 0.0, pass_ids=case in ("ids", "sorted_ids"))


# ------------------------------------------------------------------------------------------------
# Non-finite rewards
# ------------------------------------------------------------------------------------------------

def expected_message(r: torch.Tensor) -> str:
    with pytest.raises(ValueError) as info:
        reference(r.double(), None, 1, r.shape[0], 0, 1, 1e-6, 0.0, True)
    return str(info.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # numpy, on inf - inf in the interpreter
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("kind", ["contiguous", "rows", "ids"])
def test_nonfinite_names_first_index(K, kind, monkeypatch):
    if kind == "rows":     # contiguous groups through the row kernels, several tiles
        small = dict(tile=256, fused_tile=256, fused_group_max=16, fused_min_tile=16,
                     min_programs=1)
        for name in list(ga._CONFIGS):
            monkeypatch.setitem(ga._CONFIGS, name, small)
    gen = torch.Generator().manual_seed(K)
    B, S = 600, 30
    ids = contiguous_ids(B, S) if kind != "ids" else variable_ids(B, 17, gen)
    G = B // S if kind != "ids" else 17
    r = torch.randn(B, K, generator=gen)
    n = r.numel()
    for bad in ([(1900 % n, float("nan")), (517 % n, float("inf"))],     # first one in a later tile
                [(3, float("-inf"))],
                [(n - 1, float("nan"))]):
        x = r.clone()
        for index, value in bad:
            x.view(-1)[index] = value
        first = min(i for i, _ in bad)
        with pytest.raises(ValueError) as info:
            triton_impl(x.to(DEVICE), ids.to(DEVICE) if kind == "ids" else None, S, G, 0, 1,
                        1e-6, 0.0, True)
        message = str(info.value)
        assert f"flat index {first})" in message
        assert message == expected_message(x)
        # check_finite=False: no error (the values themselves are then unspecified)
        triton_impl(x.to(DEVICE), ids.to(DEVICE) if kind == "ids" else None, S, G, 0, 1,
                    1e-6, 0.0, False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_message_format():
    r = torch.zeros(5, 1)
    r[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rewards\[3\] is nan \(first non-finite element; "
                                         r"flat index 3\)"):
        triton_impl(r.to(DEVICE), None, 5, 1, 0, 1, 1e-6, 0.0, True)
    r = torch.zeros(4, 3, dtype=torch.float16)
    r[2, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"rewards\[2, 1\] is -inf .*flat index 7\)\. Filter"):
        triton_impl(r.to(DEVICE), None, 2, 2, 1, 0, 0.0, 0.0, True)


def test_noncontiguous_input():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(3, 40, generator=gen).t()                # [40, 3], not contiguous
    ids = contiguous_ids(40, 8)
    check(r, ids, 8, 5, 0, 1, 1e-6, 0.0, pass_ids=False)


# ------------------------------------------------------------------------------------------------
# Large offsets: the corrected two-pass (module docstring of kernels/group_advantages.py)
# ------------------------------------------------------------------------------------------------

def offset_rewards(B, K, gen, offset=1000.0, spread=1e-3):
    """float32 rewards offset + spread * randn. The float32 ulp of 1000 is 6e-5, a few percent of
    the spread: a group mean rounded to float32 and subtracted as it is shifts every advantage
    of the group by up to ~3% (the old kernels' error)."""
    return (offset + spread * torch.randn(B, K, generator=gen, dtype=torch.float64)).float()


def assert_unbiased(out, exp, ids, G, scale):
    """Advantages within 4 float32 ulps of the float64 ones, measured on scale + |adv| (scale: the
    advantages' natural unit, 1 when divided by a std, the spread in std_mode "none"); every
    group's advantages sum to ~0 (|mean| <= 1e-7 scale: output rounding, no common shift);
    mean within 2 float32 ulps of the offset; std to 1e-5 relative."""
    adv, mean, std = out[0].double(), out[1].double(), out[2].double()
    e_adv, e_mean, e_std = exp[0], exp[1], exp[2]
    eps32 = torch.finfo(torch.float32).eps
    err = (adv - e_adv).abs()
    bound = 4 * eps32 * (scale + e_adv.abs())
    assert (err <= bound).all(), ("adv", err.max().item(), (err / bound).max().item())
    K = adv.shape[1]
    sums = torch.zeros(G, K, dtype=torch.float64).index_add_(0, ids, adv)
    n = torch.bincount(ids, minlength=G).double().clamp_min(1).unsqueeze(1)
    assert (sums.abs() / n <= 1e-7 * scale).all(), ("group sum", (sums.abs() / n).max().item())
    assert ((mean - e_mean).abs() <= 2 * eps32 * e_mean.abs()).all(), (mean - e_mean).abs().max()
    rel = ((std - e_std).abs() / e_std.clamp_min(1e-30)).max().item()
    assert rel <= 1e-5, ("std", rel)


LARGE_OFFSET_CASES = [  # (name, tiles, B, S or None for ids, G, K)
    ("fused", "default", 24 * 40, 24, 40, 1),         # one program, whole groups in registers
    ("fused", "default", 24 * 40, 24, 40, 3),
    ("fused", "small", 8 * 50, 8, 50, 2),             # several programs, several groups each
    ("rows", "small", 1000, 100, 10, 2),              # groups longer than a tile: row kernels
    ("rows", "default", 2 * 17000, 17000, 2, 4),      # larger than an interpreter tile
    ("rows", "gpu", 2 * 5000, 5000, 2, 1),            # the GPU tile plan
    ("ids", "default", 600, None, 13, 2),             # unsorted ids: per-element atomics
    ("ids", "small", 640, None, 5, 1),                # ids over many tiles
]


@pytest.mark.parametrize("std_mode", MODES)
@pytest.mark.parametrize("case", LARGE_OFFSET_CASES, ids=lambda c: "-".join(map(str, c)))
def test_large_offset_groups_are_unbiased(case, std_mode, monkeypatch):
    """float32 rewards 1000 + 1e-3 * randn: float32 statistics, float64-quality advantages. The
    old kernels subtracted the float32-rounded mean (errors up to 0.08, group sums up to 2)."""
    name, tiles, B, S, G, K = case
    if tiles == "small":
        small = dict(tile=128, fused_tile=64, fused_group_max=16, fused_min_tile=16,
                     min_programs=4)
        for key in list(ga._CONFIGS):
            monkeypatch.setitem(ga._CONFIGS, key, small)
    elif tiles == "gpu":
        monkeypatch.setattr(ga, "_config", lambda t: ga._CONFIGS["gpu"])
    gen = torch.Generator().manual_seed(B + K + std_mode)
    if S is None:
        ids = variable_ids(B, G, gen, empty=False)
        S_arg = 1
    else:
        ids = contiguous_ids(B, S)
        S_arg = S
    r = offset_rewards(B, K, gen)
    scale = 1e-3 if std_mode == 2 else 1.0
    for ddof in (0, 1):
        out, exp = run_both(r, ids, S_arg, G, std_mode, ddof, 0.0, 0.0, pass_ids=S is None)
        assert_unbiased(out, exp, ids, G, scale)


def test_large_offset_flow_grpo_example():
    """The reported example: one group of 24, flow_grpo preset (ddof 0, eps 1e-4, clip 5)."""
    r = 1000 + 1e-3 * torch.randn(24, 1, generator=torch.Generator().manual_seed(0))
    adv = triton_impl(r.to(DEVICE), None, 24, 1, 0, 0, 1e-4, 5.0, True)[0].cpu()
    exact = reference(r.double(), None, 24, 1, 0, 0, 1e-4, 5.0, True)[0]
    assert abs(adv.double().sum().item()) < 1e-5            # was 0.217
    torch.testing.assert_close(adv.double(), exact, rtol=0, atol=5e-7)   # was off by 9e-3


def test_one_ulp_apart_with_eps_zero():
    """[1, 1 + 2**-23]: mean 1 + 2**-24 is not a float32, std 2**-24. Rounding the mean gave
    [0, 1.414]; the exact answer is [-1, 1], in every path."""
    r = torch.tensor([[1.0], [1.0000001]])
    for ids, S in ((None, 2), (torch.zeros(2, dtype=torch.int64), 1)):
        adv = triton_impl(r.to(DEVICE), None if ids is None else ids.to(DEVICE), S, 1, 0, 0, 0.0,
                          0.0, True)[0].cpu()
        assert adv[:, 0].tolist() == [-1.0, 1.0], (ids, adv)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # numpy, on NaN in the interpreter
@pytest.mark.parametrize("kind,tile", [("contiguous", None), ("rows", 4), ("rows", 128),
                                       ("ids", 4), ("ids", 128)])
@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_nan_group_is_never_flat(kind, tile, clip, monkeypatch):
    """check_finite=False: a group holding a NaN gets NaN advantages (the reference's amin/amax
    propagate NaN), even if its other rewards are all equal and even with a clamp; a NaN never
    leaks into other groups, and an all-inf group is still flat (advantage 0). Row tiles of 4
    elements hold one group each (register-reduced segments), of 128 all four groups
    (per-element atomics)."""
    if tile is not None:
        small = dict(tile=tile, fused_tile=64, fused_group_max=1, fused_min_tile=1,
                     min_programs=1)
        for key in list(ga._CONFIGS):
            monkeypatch.setitem(ga._CONFIGS, key, small)
    r = torch.tensor([[1.0, 0.0], [float("nan"), 0.0],           # group 0: NaN + a 1 in head 0
                      [1.0, 0.5], [2.0, 0.5],                     # group 1: ordinary / flat
                      [float("nan"), 3.0], [float("nan"), 4.0],   # group 2: all NaN in head 0
                      [float("inf"), 7.0], [float("inf"), 7.0]])  # group 3: flat (inf) / flat
    ids = contiguous_ids(8, 2)
    gi = ids.to(DEVICE) if kind == "ids" else None
    adv = triton_impl(r.to(DEVICE), gi, 1 if kind == "ids" else 2, 4, 0, 0, 1e-4, clip,
                      False)[0].cpu()
    exp = reference(r.double(), ids if kind == "ids" else None, 2, 4, 0, 0, 1e-4, clip, False)[0]
    assert torch.isnan(adv[0:2, 0]).all() and torch.isnan(adv[4:6, 0]).all(), adv
    torch.testing.assert_close(adv.double(), exp, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert adv[6:8].tolist() == [[0.0, 0.0], [0.0, 0.0]]
