"""Every CUDA source compiles with plain nvcc for sm_90, without torch.

Project rule: .cu files hold device code and torch-free host launchers (the torch bindings are
*_cuda.cpp), so they build on a machine with nvcc and no GPU, and this test catches a broken
kernel before anyone reaches a GPU. Skipped where nvcc is not on PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH; CUDA sources not compiled")


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {ROOT / 'csrc'}"


@pytest.mark.parametrize("source", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_compiles_for_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90",
           "-I", str(ROOT / "csrc"), "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (exit {proc.returncode})\n"
        f"$ {' '.join(cmd)}\n{proc.stderr}{proc.stdout}")


def _cuobjdump_available():
    try:
        from tbkernels.kernels import compile_check
        return os.path.exists(compile_check._nvidia_tool("cuobjdump"))
    except Exception:
        return False


@pytest.mark.skipif(not _cuobjdump_available(),
                    reason="no cuobjdump (it comes with Triton's NVIDIA backend)")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_kernels_do_not_spill(source, arch, tmp_path):
    """Every kernel instantiation, as setup.py compiles it (-O3), keeps its working set in
    registers: no local arrays, and nothing on the stack beyond the one register a call to the
    IEEE division slow path saves (kernels/compile_check.py, CALL_STACK_BYTES)."""
    from tbkernels.kernels.compile_check import CALL_STACK_BYTES, cubin_resources, spills
    cubin = tmp_path / f"{source.stem}.sm_{arch}.cubin"
    cmd = [NVCC, "-std=c++17", "-O3", "-lineinfo", "-cubin", f"-arch=sm_{arch}",
           "-I", str(ROOT / "csrc"), str(source), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = cubin_resources(str(cubin))
    assert len(kernels) >= 4, sorted(kernels)
    bad = {name: rec for name, rec in kernels.items() if spills(rec)}
    assert not bad, f"spilling kernels (allowance {CALL_STACK_BYTES} B with calls): {bad}"
    assert all(rec["registers"] <= 255 for rec in kernels.values())
