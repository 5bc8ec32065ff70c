"""setup.py's decision to build the CUDA kernels: with torch's CUDA and nvcc found but no CUDA
headers where torch's guess of CUDA_HOME points (an nvcc wrapper in /usr/local/bin makes that
/usr/local), the build used to die in the first binding ("cuda_runtime_api.h: No such file");
it now builds the CPU kernels and says why, and TBK_BUILD_CUDA=1 fails up front with the reason."""
from __future__ import annotations

import pathlib
import types

import pytest

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"


def _setup_helpers(monkeypatch, cuda_home, torch_cuda="13.0"):
    """setup.py's helpers, with torch's CUDA version and CUDA_HOME stubbed."""
    import torch
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    src = SETUP.read_text().split("\ndef _extension():")[0]
    ns = {"__file__": str(SETUP), "__name__": "setup_helpers"}
    exec(compile(src, str(SETUP), "exec"), ns)
    return types.SimpleNamespace(**ns)


@pytest.fixture
def toolkit(tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return home


def test_no_headers_under_cuda_home_builds_cpu_only(monkeypatch, toolkit):
    for var in ("TBK_BUILD_CUDA", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
        monkeypatch.delenv(var, raising=False)
    h = _setup_helpers(monkeypatch, toolkit)
    build, reason = h._cuda_decision()
    assert not build and "cuda_runtime_api.h" in reason and str(toolkit) in reason
    monkeypatch.setenv("TBK_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="cuda_runtime_api.h"):
        h._cuda_decision()


@pytest.mark.parametrize("where", ["include", "targets", "cpath"])
def test_headers_found_builds_cuda(monkeypatch, toolkit, tmp_path, where):
    for var in ("TBK_BUILD_CUDA", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
        monkeypatch.delenv(var, raising=False)
    inc = {"include": toolkit / "include",
           "targets": toolkit / "targets" / "x86_64-linux" / "include",
           "cpath": tmp_path / "wheel_headers"}[where]
    inc.mkdir(parents=True)
    (inc / "cuda_runtime_api.h").write_text("")
    if where == "cpath":
        monkeypatch.setenv("CPATH", str(inc))
    h = _setup_helpers(monkeypatch, toolkit)
    assert h._cuda_decision()[0]
