"""Build and install tbkernels.

    pip install --no-build-isolation .          # torch must already be installed

Always builds ``tbkernels._C`` with the C++ CPU kernels. CUDA kernels are added when the installed
torch has CUDA and nvcc is found. ``TBK_BUILD_CUDA=1`` forces them on (and fails if that is
impossible), ``TBK_BUILD_CUDA=0`` forces them off. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default here: 8.0 and 9.0, i.e. A100 and H100/H200). The build prints which it did.

``--no-build-isolation`` matters: an isolated build would fetch an unpinned torch (a multi-GB CUDA
build) instead of compiling against the torch you run with.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only hit by a wrong install command
    sys.exit("tbkernels: torch is not importable. Install torch first, then "
             "`pip install --no-build-isolation .` so the build uses that torch.")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_headers_found(cuda_home):
    """cuda_runtime_api.h in CUDA_HOME's include directories or on the compilers' CPATH."""
    dirs = [os.path.join(cuda_home, "include")] + glob.glob(
        os.path.join(cuda_home, "targets", "*", "include"))
    for var in ("CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
        dirs += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
    return any(os.path.exists(os.path.join(d, "cuda_runtime_api.h")) for d in dirs)


def _cuda_decision():
    """(build_cuda, reason) from the environment switch, torch and nvcc."""
    switch = os.environ.get("TBK_BUILD_CUDA", "").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return False, "TBK_BUILD_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} has no CUDA")
    if cpp_extension.CUDA_HOME is None or not (
            shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME or "",
                                                                "bin", "nvcc"))):
        problems.append("nvcc not found (set CUDA_HOME)")
    elif not _cuda_headers_found(cpp_extension.CUDA_HOME):
        # torch guesses CUDA_HOME as the directory above nvcc's: a wrapper script such as
        # /usr/local/bin/nvcc makes that /usr/local, where no CUDA headers are, and the build
        # then died in the first binding with "cuda_runtime_api.h: No such file"
        problems.append(f"CUDA headers (cuda_runtime_api.h) not found under CUDA_HOME="
                        f"{cpp_extension.CUDA_HOME} or on CPATH (set CUDA_HOME to the toolkit)")
    if switch in ("1", "on", "true", "yes"):
        if problems:
            sys.exit("tbkernels: TBK_BUILD_CUDA=1 but CUDA kernels cannot be built: "
                     + "; ".join(problems))
        return True, "TBK_BUILD_CUDA=1"
    if problems:
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME}"


def _extension():
    cpu_sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")]
                       + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is a header-inline `#pragma omp parallel` in torch's OpenMP
    # builds, so without it the kernels silently run on one thread (they did until this flag;
    # `tbkernels._C.built_with_openmp()` reports it). Linking with -fopenmp names libgomp.so.1,
    # the soname torch's own wheel loads, so one OpenMP runtime (torch's) serves both.
    # -fno-trapping-math: lets GCC turn the selections of branch-free loops (the map surrogate's
    # clamp / maximum, csrc/flow_grpo_surrogate.h) into vector blends; without it GCC keeps them
    # as branches, since a comparison might raise an FP exception. Results are unchanged (no
    # reassociation, no contraction: that would be -ffast-math).
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    build_cuda, reason = _cuda_decision()
    if not build_cuda:
        print(f"tbkernels: building C++ CPU kernels only; CUDA kernels OFF ({reason})")
        return cpp_extension.CppExtension("tbkernels._C", cpu_sources,
                                          extra_compile_args={"cxx": cxx_flags},
                                          extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_cuda.cpp")))
    print(f"tbkernels: building C++ CPU kernels and CUDA kernels ON ({reason}); "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return cpp_extension.CUDAExtension(
        "tbkernels._C", cpu_sources + cuda_sources,
        define_macros=[("TBK_WITH_CUDA", None)],
        extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo"]})


setup(
    name="tbkernels",
    version="0.1.0",
    description="Fused kernels and memory tools for RL post-training (GRPO/DPO) of video "
                "diffusion and flow-matching models",
    python_requires=">=3.10",
    packages=["tbkernels", "tbkernels.ops", "tbkernels.mps", "tbkernels.kernels"],
    package_dir={"tbkernels": "python/tbkernels", "tbkernels.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=["numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    zip_safe=False,
)
