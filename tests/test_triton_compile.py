"""The Triton kernels compile for sm_80 and sm_90, without a GPU, as the GPU would launch them.

The interpreter tests check what the kernels compute but never run Triton's compiler. Here
``kernels/compile_check.py`` records every launch the three wrappers make under the GPU tile plan
(132 SMs) over a matrix of dtypes, shapes and options, compiles each distinct specialization to a
cubin with Triton's bundled ptxas, and these tests assert on the result: everything compiles,
nothing spills, every kernel is covered, and the per-element accesses of Wan-shaped latents are
128-bit vectors (the bandwidth premise of the flow-step and MSE kernels).

The compile runs in a subprocess because it needs TRITON_INTERPRET unset, and the suite sets it.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVIDIA_BIN = None
try:
    import triton.backends.nvidia as _nv
    NVIDIA_BIN = pathlib.Path(_nv.__file__).parent / "bin"
except Exception:  # pragma: no cover - a Triton build without the NVIDIA backend
    pass
if NVIDIA_BIN is None or not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists():
    pytest.skip("this Triton has no bundled NVIDIA ptxas/cuobjdump", allow_module_level=True)

ARCHS = (80, 90)
# (module, kernel) pairs the wrappers launch; a matrix that stops reaching one of them fails.
EXPECTED_KERNELS = {
    ("flow_step", "_forward_kernel"), ("flow_step", "_finalize_kernel"),
    ("flow_step", "_backward_kernel"), ("flow_step", "_surrogate_kernel"),
    ("flow_step", "_map_surrogate_kernel"), ("flow_step", "_map_finalize_kernel"),
    ("flow_step", "_elem_loss_kernel"), ("flow_step", "_elem_finalize_kernel"),
    ("group_advantages", "_global_moments_kernel"),
    ("group_advantages", "_contiguous_fused_kernel"), ("group_advantages", "_rows_stats_kernel"),
    ("group_advantages", "_rows_sqdev_kernel"), ("group_advantages", "_finalize_kernel"),
    ("group_advantages", "_rows_adv_kernel"),
    ("per_sample_mse", "_forward_kernel"), ("per_sample_mse", "_finalize_kernel"),
    ("per_sample_mse", "_backward_kernel"),
}


def _compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tbkernels.kernels.compile_check", "--quick",
         "--arch", *map(str, ARCHS), "--json", str(out)],
        env=_compiler_env(), capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"compile_check wrote no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["returncode"], data["log"] = proc.returncode, proc.stdout + proc.stderr
    return data


def _short(r):
    return r["module"].rsplit(".", 1)[-1], r["kernel"]


def test_every_specialization_compiles_without_spills(report):
    failed = [f"sm_{r['arch']} {r['label']}: {r['error']}" for r in report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed[:20])
    assert report["returncode"] == 0, report["log"][-4000:]


def test_every_kernel_is_compiled_for_every_target(report):
    got = {(_short(r), r["arch"]) for r in report["results"] if r["ok"]}
    missing = {(k, a) for k in EXPECTED_KERNELS for a in ARCHS} - got
    assert not missing, f"not compiled: {sorted(missing)}"


def _mse_pred_wider(r):
    """A per_sample_mse case whose pred dtype is wider than its target's ("... fp32/bf16")."""
    if _short(r)[0] != "per_sample_mse":
        return False
    pred, target = r["case"].split()[-1].split("/")
    return int(pred[-2:]) > int(target[-2:])


def test_wan_latent_accesses_are_128_bit_vectors(report):
    """Rows of a Wan latent (S = 21*60*104, divisible by 16) let Triton prove 16-byte alignment:
    every masked per-element load/store is then a v4 (or v2.b64) access. The only narrow masked
    access allowed is the one-thread float64 partial-sum store of the reducing kernels, and, in
    the MSE backward with pred the wider dtype, the target's 8-byte load (one 16-byte vector of
    pred per thread leaves 4 target elements; still coalesced across the warp)."""
    checked = mixed = 0
    for r in report["results"]:
        module, kernel = _short(r)
        if ("wan480p" not in r["case"] or module not in ("flow_step", "per_sample_mse")
                or kernel not in ("_forward_kernel", "_backward_kernel")):
            continue
        checked += 1
        assert r["ld_global_v4"] > 0, r["label"]
        allowed = {"st.global.b64"}
        if kernel == "_backward_kernel" and _mse_pred_wider(r):
            allowed.add("ld.global.v2.b32")
            mixed += 1
            assert r["st_global_v4"] == r["st_global"] > 0, r["label"]
        assert set(r["narrow_masked"]) <= allowed, (r["label"], r["narrow_masked"])
    assert checked >= 40 and mixed == len(ARCHS)


def test_elem_loss_accesses_are_128_bit_vectors(report):
    """The fused per-element loss streams three or four latents and two float32 [B, N] rows and
    writes grad_v: at a Wan latent's N (divisible by 16) every per-element load and the gradient
    store are v4 accesses; the only narrow masked access is the tile's float64 partial-sum
    stores (one thread). With the rows stored as bf16/fp16 ("rows=" cases) each row is one v4
    load per thread instead of two, so the floor is 6 (bf16 latents) instead of 7."""
    checked = 0
    for r in report["results"]:
        if _short(r) != ("flow_step", "_elem_loss_kernel") or "elem480p" not in r["case"]:
            continue
        checked += 1
        floor = 6 if "rows=" in r["case"] else 7
        assert r["ld_global_v4"] >= floor, (r["label"], r["ld_global_v4"])
        if "grad=True" in r["case"]:
            assert r["st_global_v4"] > 0, r["label"]
        assert set(r["narrow_masked"]) <= {"st.global.b64"}, (r["label"], r["narrow_masked"])
    assert checked >= 4 * len(ARCHS)


def test_elementwise_backward_kernels_use_no_shared_memory(report):
    """Shared memory in an elementwise kernel is a register-layout conversion (a round trip and a
    barrier per program). The flow-step and MSE backwards need none, for every dtype pair: the MSE
    backward tile is chosen so that pred's 16-byte stores and the loads share one layout."""
    checked = 0
    for r in report["results"]:
        module, kernel = _short(r)
        if module in ("flow_step", "per_sample_mse") and kernel == "_backward_kernel":
            checked += 1
            assert r["shared"] == 0, (r["label"], r["case"], r["shared"])
    assert checked >= 8


def test_a_kernel_that_cannot_compile_is_reported():
    """The checker reports compile errors instead of swallowing them: a non-power-of-two tile
    (tl.arange needs a power of two) must come back as a failure, in-process."""
    code = r"""
import json, torch
from tbkernels.kernels import compile_check as cc, per_sample_mse as km
launches = cc.record([90], True, 132)
launch = next(l for l in launches if l.kernel == "_backward_kernel" and l.module.endswith("per_sample_mse"))
names = list(launch.signature)
launch.constexprs = [(p, 3 if names[p[0]] == "BLOCK" else v) for p, v in launch.constexprs]
good = next(l for l in launches if l.kernel == "_finalize_kernel" and l.module.endswith("per_sample_mse"))
print(json.dumps([cc.compile_one(launch), cc.compile_one(good)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bad, good = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not bad["ok"] and "power of 2" in bad["error"].lower().replace("two", "2"), bad
    assert good["ok"] and good["registers"] > 0 and good["stack"] == 0, good
    assert cc_problems(bad) and not cc_problems(good)


def cc_problems(result):
    from tbkernels.kernels import compile_check as cc
    return cc.problems([result])


def test_problems_flags_spills():
    from tbkernels.kernels import compile_check as cc
    base = dict(module="m", kernel="k", arch=90, label="k", case="c", ok=True, error=None,
                registers=40, stack=0, local=0, sass_spill_stores=0, sass_calls=0)
    assert cc.problems([base]) == []
    assert cc.problems([dict(base, stack=8)])                           # spill, no call
    assert cc.problems([dict(base, local=16)])                          # local array
    assert cc.problems([dict(base, stack=8, sass_calls=3)]) == []       # a call's saved register
    assert cc.problems([dict(base, stack=cc.CALL_STACK_BYTES + 8, sass_calls=3)])


def test_the_launch_plan_is_the_gpu_plan():
    """The recorder sees the tiles the wrappers choose for a 132-SM GPU, not the interpreter's:
    Wan 480p, B = 2 -> forward tile shrinks to 256 positions, backward tile 2048."""
    code = r"""
import json
from tbkernels.kernels import compile_check as cc
out = {}
for l in cc.record([90], True, 132):
    if l.module.endswith("flow_step") and "wan480p fp32" in l.case:
        names = list(l.signature)
        for p, v in l.constexprs:
            if names[p[0]] in ("BLOCK_S", "BLOCK"):
                out.setdefault(l.kernel, set()).add(v)
print(json.dumps({k: sorted(v) for k, v in out.items()}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    blocks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert blocks == {"_forward_kernel": [256], "_backward_kernel": [2048]}
