"""kernels/_launch.py: when the Triton backend may launch, and the clear error when it may not.

Triton 3.6's interpreter cannot run the kernels with numpy >= 2.4 (found running this suite under
triton 3.6.0, the GPU image's version: every interpreted launch with a runtime loop bound failed
deep inside the interpreter). The wrappers and the backend table now say so up front. The
versions are monkeypatched here, so this runs with whatever triton and numpy are installed.
"""
from __future__ import annotations

import numpy
import pytest
import torch

triton = pytest.importorskip("triton")

import tbkernels  # noqa: E402
from tbkernels.kernels import _launch  # noqa: E402


@pytest.fixture
def versions(monkeypatch):
    def set_versions(triton_version, numpy_version):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        _launch.interpreter_incompatibility.cache_clear()
    yield set_versions
    _launch.interpreter_incompatibility.cache_clear()


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.6", True), ("3.5.1", "2.5.0", True), ("3.6.0", "2.3.5", False),
    ("3.7.1", "2.4.6", False), ("3.7.0+git1234", "2.4.0", False), ("4.0.0", "3.0.0", False),
    ("3.6.0", "2.4.0rc1", True)])
def test_interpreter_incompatibility(versions, triton_version, numpy_version, broken):
    versions(triton_version, numpy_version)
    problem = _launch.interpreter_incompatibility()
    assert bool(problem) == broken
    if broken:
        assert triton_version in problem and numpy_version in problem and "numpy < 2.4" in problem


def test_wrappers_and_backend_table_report_it(versions, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 3)
    versions("3.6.0", "2.4.6")
    with pytest.raises(RuntimeError, match=r"per_sample_mse \(triton\): triton 3.6.0's interpreter"):
        _launch.require_launchable(x, "per_sample_mse")
    status = tbkernels.backends("cpu")["triton"]
    assert not status.available and "numpy 2.4.6" in status.reason
    versions("3.7.1", "2.4.6")
    _launch.require_launchable(x, "per_sample_mse")          # no error
    assert tbkernels.backends("cpu")["triton"].available


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _launch.require_launchable(torch.zeros(2), "flow_step")
    with _launch.assume_gpu(132):                             # the compile check's recording
        _launch.require_launchable(torch.zeros(2), "flow_step")
