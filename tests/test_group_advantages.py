"""group_advantages: every backend against the float64 reference, presets against independent
implementations of Flow-GRPO's and DanceGRPO's formulas, edge cases, errors, torch.compile."""
import math

import numpy as np
import pytest
import torch

import tbkernels
from tbkernels.ops._group_advantages_reference import group_advantages_reference

from conftest import DEVICE, backend_params

BACKENDS = backend_params()
HALF = [torch.float16, torch.bfloat16]


def make_rewards(batch, heads, dtype=torch.float32, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    # An offset far from 0 makes a one-pass sum-of-squares variance visibly wrong.
    r = torch.randn(batch, heads, generator=g, dtype=torch.float64) * 0.7 + offset
    return r.to(dtype).to(DEVICE)


def random_ids(batch, num_groups, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_groups, (batch,), generator=g)
    return (ids * 7919 - 12345).to(DEVICE)           # sparse, negative, unsorted ids


def eager_in_dtype(r, gi, num_groups, std_mode, ddof, eps, clip):
    """The same math as eager PyTorch written by a user, entirely in r's dtype (numerics rule)."""
    batch, heads = r.shape
    cnt = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(
        0, gi, torch.ones(batch, dtype=r.dtype, device=r.device)).unsqueeze(1)
    mean = torch.zeros(num_groups, heads, dtype=r.dtype, device=r.device).index_add_(0, gi, r) / cnt
    dev = r - mean[gi]
    var = torch.zeros_like(mean).index_add_(0, gi, dev * dev) / (cnt - ddof).clamp_min(1)
    if std_mode == "group":
        adv = dev / (var.sqrt()[gi] + eps)
    elif std_mode == "global":
        adv = dev / (r.std(0, correction=ddof, keepdim=True) + eps)
    else:
        adv = dev
    # The documented rule, so eager's 0/0 on flat groups does not count as its error.
    rows = gi.unsqueeze(1).expand(batch, heads)
    hi = torch.full_like(mean, -math.inf).scatter_reduce(0, rows, r, "amax")
    lo = torch.full_like(mean, math.inf).scatter_reduce(0, rows, r, "amin")
    adv = torch.where((hi == lo)[gi], torch.zeros_like(adv), adv)
    return adv.clamp(-clip, clip) if clip else adv


def dense_index(group_size, group_ids, batch):
    if group_ids is None:
        return torch.arange(batch, device=DEVICE) // group_size, batch // group_size
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max()) + 1


def check_against_reference(rewards, backend, group_size=None, group_ids=None, std="group",
                            ddof=0, eps=1e-4, clip=None):
    """Kernel error vs float64 <= 2x eager-in-dtype error, plus one output ulp for the rounding
    to the output dtype that no implementation can avoid."""
    out, stats = tbkernels.group_advantages(rewards, group_size, group_ids, std=std, ddof=ddof,
                                            eps=eps, clip=clip, backend=backend, return_stats=True)
    exact, stats64 = tbkernels.group_advantages(rewards.double(), group_size, group_ids, std=std,
                                                ddof=ddof, eps=eps, clip=clip,
                                                backend="reference", return_stats=True)
    assert out.shape == rewards.shape and out.dtype == rewards.dtype
    assert out.device == rewards.device
    assert torch.isfinite(out).all()
    r2 = rewards.reshape(rewards.shape[0], -1)
    gi, num_groups = dense_index(group_size, group_ids, rewards.shape[0])
    eager = eager_in_dtype(r2, gi, num_groups, std, ddof, eps, clip).reshape(rewards.shape)
    ulp = torch.finfo(rewards.dtype).eps * max(1.0, exact.abs().max().item())
    err = (out.double() - exact).abs().max().item()
    if rewards.dtype == torch.float64:
        # Eager float64 *is* the reference's computation (error 0), so the 2x rule degenerates;
        # a float64 kernel must then agree to a few ulps.
        assert err <= 1e-12 * max(1.0, exact.abs().max().item()), (backend, err)
    else:
        err_eager = (eager.double() - exact).abs().max().item()
        assert err <= 2 * err_eager + ulp, (backend, err, err_eager, ulp)
    # Statistics: float32 (float64 for float64 input) and close to the float64 statistics.
    sdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert stats["mean"].dtype == sdt and stats["std"].dtype == sdt
    assert torch.equal(stats["count"].cpu(), stats64["count"].cpu())
    for key in ("mean", "std"):
        scale = max(1.0, stats64[key].abs().max().item())
        assert (stats[key].double() - stats64[key]).abs().max().item() <= 1e-5 * scale, key
    return out, exact


# ---------------------------------------------------------------------------------------------
# Backends agree with the float64 reference.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,group_size", [(1, 1), (7, 7), (39, 3), (1152, 24), (4096, 8),
                                              (30_000, 1), (4099 * 13, 13)])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_contiguous_groups_match_reference(backend, batch, group_size, heads, std):
    rewards = make_rewards(batch, heads, seed=batch + heads)
    if heads == 1:
        rewards = rewards[:, 0]
    check_against_reference(rewards, backend, group_size=group_size, std=std,
                            ddof=batch % 2, clip=None if std == "none" else 2.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,num_groups", [(1, 1), (5, 3), (1000, 17), (4097, 512),
                                              (20_011, 2000)])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_id_groups_match_reference(backend, batch, num_groups, heads, std):
    rewards = make_rewards(batch, heads, seed=batch * heads)
    check_against_reference(rewards, backend, group_ids=random_ids(batch, num_groups), std=std,
                            ddof=(batch + 1) % 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [1, 4])
def test_million_rewards(backend, heads):
    batch = 1_000_000
    rewards = make_rewards(batch, heads, seed=11)
    check_against_reference(rewards, backend, group_size=16, ddof=1)
    check_against_reference(rewards, backend, group_size=batch, std="global")   # one group
    check_against_reference(rewards, backend, group_ids=random_ids(batch, 40_000), std="group")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_dtypes(backend, dtype):
    rewards = make_rewards(3000, 2, dtype=dtype, seed=5, offset=0.5)
    check_against_reference(rewards, backend, group_size=12, ddof=1)
    check_against_reference(rewards, backend, group_ids=random_ids(3000, 101), std="global")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = make_rewards(2048, 6, seed=3)
    rewards = base[:, ::2]                      # [2048, 3], stride 6
    assert not rewards.is_contiguous()
    out, _ = check_against_reference(rewards, backend, group_size=16)
    col = base[:, 1]                            # [2048], stride 6
    out1, _ = check_against_reference(col, backend, group_size=16)
    assert out.is_contiguous() and out1.is_contiguous()


# ---------------------------------------------------------------------------------------------
# Degenerate groups: advantage exactly 0, never NaN or inf.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-4])
def test_flat_and_singleton_groups_are_zero(backend, eps):
    rewards = make_rewards(48, 2, seed=2)
    rewards[8:16] = 0.1                          # flat group in both heads (0.1 is inexact)
    rewards[16:24, 1] = 1.0                      # flat in head 1 only
    for ddof in (0, 1):
        out = tbkernels.group_advantages(rewards, 8, eps=eps, ddof=ddof, backend=backend)
        assert torch.isfinite(out).all()
        assert torch.equal(out[8:16], torch.zeros_like(out[8:16]))
        assert torch.equal(out[16:24, 1], torch.zeros_like(out[16:24, 1]))
        assert (out[16:24, 0] != 0).all() and (out[:8] != 0).all()
        single = tbkernels.group_advantages(rewards, 1, eps=eps, ddof=ddof, backend=backend)
        assert torch.equal(single, torch.zeros_like(single))
        ids = torch.tensor([5] * 47 + [9], device=DEVICE)       # a size-1 group among others
        mixed = tbkernels.group_advantages(rewards[:, 0], group_ids=ids, eps=eps, ddof=ddof,
                                           backend=backend)
        assert mixed[47].item() == 0.0 and torch.isfinite(mixed).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_rewards(backend):
    # Verifier-style 0/1 rewards: many groups are all-0 or all-1.
    g = torch.Generator().manual_seed(4)
    rewards = (torch.rand(96, generator=g) < 0.15).float().to(DEVICE)
    out, stats = tbkernels.group_advantages(rewards, 4, ddof=1, eps=0.0, backend=backend,
                                            return_stats=True)
    flat = rewards.view(24, 4).amin(1) == rewards.view(24, 4).amax(1)
    assert flat.any() and (~flat).any()
    assert torch.equal(out.view(24, 4)[flat], torch.zeros_like(out.view(24, 4)[flat]))
    assert math.isclose(stats["frac_reward_zero_std"].item(), flat.double().mean().item())


# ---------------------------------------------------------------------------------------------
# Presets reproduce the public systems' formulas (independent implementations, float64).

def flow_grpo_per_prompt(prompts, rewards, global_std=False):
    """Flow-GRPO's PerPromptStatTracker.update(type='grpo') then the loss's clamp(-5, 5)."""
    prompts = np.array(prompts)
    rewards = np.asarray(rewards, dtype=np.float64)
    adv = np.empty_like(rewards)
    for p in np.unique(prompts):
        r = rewards[prompts == p]
        std = np.std(rewards) + 1e-4 if global_std else np.std(r) + 1e-4
        adv[prompts == p] = (r - np.mean(r)) / std
    return np.clip(adv, -5.0, 5.0)


def dance_grpo_use_group(rewards, group_size):
    """DanceGRPO --use_group: torch.std (unbiased) + 1e-8 per contiguous group, then clamp(-5, 5)."""
    adv = torch.zeros_like(rewards)
    for i in range(len(rewards) // group_size):
        g = rewards[i * group_size:(i + 1) * group_size]
        adv[i * group_size:(i + 1) * group_size] = (g - g.mean()) / (g.std() + 1e-8)
    return torch.clamp(adv, -5.0, 5.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("global_std", [False, True])
def test_flow_grpo_preset(backend, global_std):
    rng = np.random.default_rng(7)
    prompts = [f"a cat number {i}" for i in rng.integers(0, 48, size=24 * 48)]
    rewards = rng.normal(0.6, 0.2, size=len(prompts))
    rewards[np.array(prompts) == prompts[0]] = 0.25          # one zero-variance prompt
    rewards[5] = 40.0                                        # an outlier that the clamp bites
    expected = flow_grpo_per_prompt(prompts, rewards, global_std)
    got = tbkernels.group_advantages(torch.tensor(rewards, device=DEVICE), group_ids=prompts,
                                     preset="flow_grpo", std="global" if global_std else None,
                                     backend=backend)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-9, atol=1e-9)
    if global_std:
        assert np.abs(expected).max() == 5.0      # the clamp was exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_dance_grpo_preset(backend):
    g = torch.Generator().manual_seed(8)
    rewards = torch.rand(12 * 16, generator=g, dtype=torch.float64)
    rewards[12:24] = 0.5
    expected = dance_grpo_use_group(rewards, 12)
    got = tbkernels.group_advantages(rewards.to(DEVICE), 12, preset="dance_grpo", backend=backend)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-7)


def test_preset_options_can_be_overridden():
    rewards = make_rewards(64, 1, seed=9)[:, 0] * 40
    clipped = tbkernels.group_advantages(rewards, 8, preset="flow_grpo")
    unclipped = tbkernels.group_advantages(rewards, 8, preset="flow_grpo", clip=math.inf)
    assert clipped.abs().max() <= 5.0 and unclipped.abs().max() > 5.0 or \
        torch.equal(clipped, unclipped)
    a = tbkernels.group_advantages(rewards, 8, preset="dance_grpo", ddof=0, eps=1e-4, clip=math.inf)
    b = tbkernels.group_advantages(rewards, 8)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# return_stats and TRL's diagnostics.

@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_and_trl_diagnostics(backend):
    rewards = make_rewards(40, 3, seed=10)
    rewards[0:8, 2] = 1.0
    out, stats = tbkernels.group_advantages(rewards, 8, ddof=1, backend=backend, return_stats=True)
    view = rewards.view(5, 8, 3).double()
    torch.testing.assert_close(stats["mean"].double(), view.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["std"].double(), view.std(1), rtol=1e-6, atol=1e-6)
    assert stats["count"].tolist() == [8] * 5
    assert stats["group_ids"].tolist() == list(range(5))
    # TRL GRPOTrainer: reward = mean reward, reward_std = mean of the (repeated) group std,
    # frac_reward_zero_std = mean of isclose(std, 0) over samples.
    torch.testing.assert_close(stats["reward"].double(), rewards.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["reward_std"].double(), view.std(1).mean(0), rtol=1e-6, atol=1e-6)
    assert stats["frac_reward_zero_std"].tolist() == pytest.approx([0.0, 0.0, 0.2])

    ids = torch.tensor([30, 10, 30, 20, 10, 30], device=DEVICE)
    r1 = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 5.0], device=DEVICE)
    out, stats = tbkernels.group_advantages(r1, group_ids=ids, std="none", backend=backend,
                                            return_stats=True)
    assert stats["group_ids"].tolist() == [10, 20, 30]
    assert stats["count"].tolist() == [2, 1, 3]
    torch.testing.assert_close(stats["mean"].cpu(), torch.tensor([4.0, 4.0, 3.0]))
    torch.testing.assert_close(out.cpu(), torch.tensor([-2.0, -2.0, 0.0, 0.0, 2.0, 2.0]))
    assert stats["reward"].shape == () and math.isclose(stats["reward"].item(), 3.5, rel_tol=1e-6)
    # Per-sample weighting: the size-1 group (std 0) is 1 of 6 samples.
    assert math.isclose(stats["frac_reward_zero_std"].item(), 1 / 6, rel_tol=1e-6)


def test_prompt_strings_as_ids_keep_first_appearance_order():
    prompts = ["dog", "cat", "dog", "cat", "owl"]
    r = torch.tensor([1.0, 5.0, 3.0, 7.0, 2.0])
    out, stats = tbkernels.group_advantages(r, group_ids=prompts, std="none", return_stats=True)
    assert stats["group_ids"] == ["dog", "cat", "owl"]
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_names_first_index(backend, bad):
    rewards = make_rewards(64, 1, seed=12)[:, 0].clone()
    rewards[37] = bad
    rewards[50] = math.nan
    with pytest.raises(ValueError, match=r"rewards\[37\] is (nan|inf|-inf) .*flat index 37"):
        tbkernels.group_advantages(rewards, 8, backend=backend)
    heads = make_rewards(16, 4, seed=13).clone()
    heads[5, 2] = bad
    with pytest.raises(ValueError, match=r"rewards\[5, 2\].*flat index 22"):
        tbkernels.group_advantages(heads, group_ids=torch.arange(16, device=DEVICE) % 3,
                                   backend=backend)


def test_check_finite_can_be_disabled():
    rewards = torch.tensor([1.0, math.nan, 2.0, 3.0])
    out = tbkernels.group_advantages(rewards, 2, check_finite=False)
    assert out[2:].tolist() == pytest.approx([-1.0, 1.0], abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_nan_group_is_not_flat(backend):
    """check_finite=False: a group holding a NaN gets NaN advantages on every backend, as the
    reference's amin/amax give; it must not pass for an all-equal group (advantage 0), which
    would hide a failed reward evaluation."""
    rewards = torch.tensor([1.0, math.nan, 1.0, 2.0, 3.0, 3.0], device=DEVICE)
    out = tbkernels.group_advantages(rewards, 2, check_finite=False, backend=backend)
    assert torch.isnan(out[:2]).all(), out
    assert out[2:4].tolist() == pytest.approx([-1.0, 1.0], abs=1e-3)
    assert out[4:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_ddof_and_numpy_group_ids(backend):
    """ddof=1.0 is ddof=1 (it passed validation, then failed the compiled ops' int schema), and
    NumPy arrays of group ids work: integers as an id tensor, strings as prompts."""
    np = pytest.importorskip("numpy")
    rewards = make_rewards(12, 1, seed=41)[:, 0]
    exp = tbkernels.group_advantages(rewards, 4, ddof=1, backend="reference")
    assert torch.equal(tbkernels.group_advantages(rewards, 4, ddof=1.0, backend=backend),
                       tbkernels.group_advantages(rewards, 4, ddof=1, backend=backend))
    torch.testing.assert_close(tbkernels.group_advantages(rewards, 4, ddof=1.0, backend=backend),
                               exp)
    prompts = ["a", "b", "c"] * 4
    by_list = tbkernels.group_advantages(rewards, group_ids=prompts, backend=backend)
    assert torch.equal(tbkernels.group_advantages(rewards, group_ids=np.array(prompts),
                                                  backend=backend), by_list)
    assert torch.equal(tbkernels.group_advantages(rewards, group_ids=np.array([0, 1, 2] * 4),
                                                  backend=backend), by_list)
    with pytest.raises(TypeError, match="NumPy array of float64"):
        tbkernels.group_advantages(rewards, group_ids=np.zeros(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_ids_given_as_a_list_of_tensors(backend):
    """list(ids_tensor) -- a list of 0-d tensors, which hash by identity -- made every sample its
    own group and every advantage exactly 0, silently. 0-d tensors now count as their values;
    a list of larger tensors (prompt token ids) is refused with what to pass instead."""
    rewards = make_rewards(12, 1, seed=43)[:, 0]
    ids = torch.tensor([0, 1, 2] * 4)
    exp = tbkernels.group_advantages(rewards, group_ids=ids, backend=backend)
    assert exp.abs().sum() > 0
    got = tbkernels.group_advantages(rewards, group_ids=list(ids), backend=backend)
    assert torch.equal(got, exp)
    tokens = [torch.tensor([5, 7, k % 3]) for k in range(12)]
    with pytest.raises(TypeError, match=r"group_ids\[0\] is a Tensor of shape \[3\].*tolist"):
        tbkernels.group_advantages(rewards, group_ids=tokens, backend=backend)
    by_tuple = tbkernels.group_advantages(rewards, group_ids=[tuple(t.tolist()) for t in tokens],
                                          backend=backend)
    assert torch.equal(by_tuple, exp)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "exactly one of group_size"),
    (dict(group_size=8, group_ids=torch.zeros(24, dtype=torch.long)), ValueError, "exactly one"),
    (dict(group_size=5), ValueError, r"B = 24 .* group_size = 5"),
    (dict(group_size=0), ValueError, "positive int"),
    (dict(group_size=2.0), ValueError, "positive int"),
    (dict(group_ids=torch.zeros(23, dtype=torch.long)), ValueError, r"shape \[B\] = \[24\]"),
    (dict(group_ids=torch.zeros(24)), TypeError, "integers"),
    (dict(group_ids=["p"] * 23), ValueError, "23 ids for B = 24"),
    (dict(group_ids="prompt"), TypeError, "sequence"),
    (dict(group_size=8, std="batch"), ValueError, "std must be one of"),
    (dict(group_size=8, ddof=2), ValueError, "ddof must be 0"),
    (dict(group_size=8, eps=-1.0), ValueError, "eps must be"),
    (dict(group_size=8, clip=0.0), ValueError, "clip must be > 0"),
    (dict(group_size=8, preset="grpo"), ValueError, "preset must be one of"),
    (dict(group_size=8, backend="metal"), ValueError, "backend must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tbkernels.group_advantages(torch.randn(24), **kwargs)


@pytest.mark.parametrize("rewards,error,match", [
    (torch.arange(8), TypeError, "must be floating"),
    ([1.0, 2.0], TypeError, "must be a torch.Tensor"),
    (torch.randn(2, 4, 3), ValueError, r"\[B\] or \[B, K\]"),
    (torch.randn(0), ValueError, "empty"),
    (torch.randn(8, 0), ValueError, "empty"),
])
def test_bad_rewards(rewards, error, match):
    with pytest.raises(error, match=match):
        tbkernels.group_advantages(rewards, 1)


def test_advantages_carry_no_gradient():
    rewards = torch.randn(16, requires_grad=True)
    out = tbkernels.group_advantages(rewards, 4)
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------
# Backend selection.

def test_backends_report_every_backend_with_a_reason():
    table = tbkernels.backends()
    assert tuple(table) == tbkernels.BACKENDS
    assert table["reference"].available
    for status in table.values():
        assert status.reason
    if not torch.cuda.is_available():
        assert not table["cuda"].available


def test_auto_choice_is_compiled_kernel_for_the_device(monkeypatch):
    import importlib
    mod = importlib.import_module("tbkernels.ops.group_advantages")
    chosen = []
    real = mod._run_backend
    monkeypatch.setattr(mod, "_run_backend", lambda name, *a: chosen.append(name) or real(name, *a))
    tbkernels.group_advantages(torch.randn(16, device=DEVICE), 4)
    expected = "cuda" if DEVICE.type == "cuda" else "cpu"
    if tbkernels.backends(DEVICE)[expected].available:
        assert chosen == [expected]
    monkeypatch.setenv("TBK_BACKEND", "reference")
    tbkernels.group_advantages(torch.randn(16, device=DEVICE), 4)
    assert chosen[-1] == "reference"


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA device")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        tbkernels.group_advantages(torch.randn(16), 4, backend="cuda")
    monkeypatch.setenv("TBK_BACKEND", "warp")
    with pytest.raises(ValueError, match="from TBK_BACKEND"):
        tbkernels.group_advantages(torch.randn(16), 4)


# ---------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("backend", [None, "reference"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def loss_weights(rewards):
        adv = tbkernels.group_advantages(rewards, 8, preset="flow_grpo", backend=backend)
        return adv * 2.0 + 1.0

    compiled = torch.compile(loss_weights, fullgraph=True)
    rewards = make_rewards(64, 1, seed=14)[:, 0]
    torch.testing.assert_close(compiled(rewards), loss_weights(rewards))
    rewards2 = make_rewards(64, 1, seed=15)[:, 0]
    torch.testing.assert_close(compiled(rewards2), loss_weights(rewards2))


@pytest.mark.parametrize("option,values", [("eps", (1e-4, 1e-3, 1e-2)), ("clip", (5.0, 2.0, 1.0))])
def test_torch_compile_fullgraph_when_options_change(option, values):
    """eps or clip changing between calls: Dynamo recompiles with the float symbolic, and the
    option check's math.isfinite / math.isinf failed the fullgraph trace ("torch.* op returned
    non-Tensor"; found 2026-11-22). Comparisons trace; each value matches eager."""
    torch._dynamo.reset()

    def fn(rewards, value):
        return tbkernels.group_advantages(rewards, 8, preset="flow_grpo", **{option: value})
    compiled = torch.compile(fn, fullgraph=True)
    rewards = make_rewards(64, 1, seed=16)[:, 0]
    for value in values:
        torch.testing.assert_close(compiled(rewards, value), fn(rewards, value))


def test_torch_compile_fullgraph_with_stats_and_heads():
    torch._dynamo.reset()

    def fn(rewards):
        adv, stats = tbkernels.group_advantages(rewards, 4, std="global", ddof=1, return_stats=True)
        return adv.sum(1), stats["reward_std"], stats["frac_reward_zero_std"]

    rewards = make_rewards(32, 3, seed=16)
    got = torch.compile(fn, fullgraph=True)(rewards)
    for g, e in zip(got, fn(rewards)):
        torch.testing.assert_close(g, e)


def test_op_is_registered_with_torch_library():
    if not tbkernels.backends("cpu")["cpu"].available:
        pytest.skip("compiled extension not built")
    rewards = torch.randn(12, 1)
    torch.library.opcheck(torch.ops.tbkernels.group_advantages.default,
                          (rewards, None, 4, 3, 0, 1, 1e-4, -1.0, True))
    torch.library.opcheck(torch.ops.tbkernels.group_advantages.default,
                          (rewards, torch.tensor([0, 1, 2, 0] * 3), 0, 3, 1, 0, 1e-4, 5.0, True))


def test_torch_compile_fullgraph_with_group_ids():
    # The number of groups is data-dependent (torch.unique); the op's schema takes it as SymInt.
    torch._dynamo.reset()

    def fn(rewards, ids):
        return tbkernels.group_advantages(rewards, group_ids=ids, preset="dance_grpo") * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    for seed, groups in ((17, 5), (18, 9)):
        rewards = make_rewards(64, 1, seed=seed)[:, 0]
        ids = random_ids(64, groups, seed=seed)
        torch.testing.assert_close(compiled(rewards, ids), fn(rewards, ids))


# ---------------------------------------------------------------------------------------------
# Large offsets: float32 accumulation must not subtract a rounded group mean.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by_ids", [False, True])
def test_large_offset_float32_groups_are_unbiased(backend, by_ids):
    """float32 rewards 1000 + 1e-3 * randn: the float32 ulp of 1000 (6e-5) is a few percent of
    the spread, so a backend that subtracts its float32-rounded group mean shifts all of a
    group's advantages together (Triton did: errors up to 0.09, group sums up to 2). The kernels
    use the corrected two-pass: advantages within 4 float32 ulps of the float64 ones (on
    1 + |adv|), and every group's advantages sum to ~0."""
    batch, groups = 24 * 16, 16
    g = torch.Generator().manual_seed(0)
    rewards = (1000 + 1e-3 * torch.randn(batch, generator=g, dtype=torch.float64)).float()
    rewards = rewards.to(DEVICE)
    group_size, group_ids = (None, random_ids(batch, groups)) if by_ids else (24, None)
    out = tbkernels.group_advantages(rewards, group_size, group_ids, preset="flow_grpo",
                                     backend=backend)
    exact = tbkernels.group_advantages(rewards.double(), group_size, group_ids,
                                       preset="flow_grpo", backend="reference")
    err = (out.double() - exact).abs().cpu()
    bound = 4 * torch.finfo(torch.float32).eps * (1 + exact.abs().cpu())
    assert (err <= bound).all(), (backend, err.max().item())
    gi, num_groups = dense_index(group_size, group_ids, batch)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=DEVICE).index_add_(
        0, gi, out.double())
    sizes = torch.bincount(gi, minlength=num_groups).double()
    assert (sums.abs() <= 1e-7 * sizes).all(), (backend, sums.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ulp_apart_with_eps_zero(backend):
    """[1, 1 + 2**-23]: the mean 1 + 2**-24 is not a float32 and the std is 2**-24; subtracting a
    rounded mean gave [0, 1.414] (Triton). Exactly [-1, 1] on every backend."""
    rewards = torch.tensor([1.0, 1.0000001], device=DEVICE)
    for kwargs in (dict(group_size=2), dict(group_ids=torch.tensor([3, 3], device=DEVICE))):
        out = tbkernels.group_advantages(rewards, std="group", ddof=0, eps=0.0, backend=backend,
                                         **kwargs)
        assert out.tolist() == [-1.0, 1.0], (backend, kwargs, out)
