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


# Triton launches on the current device, not on the tensors' (triton.runtime.jit), so every
# wrapper makes its tensors' device current first (_launch.on_tensor_device).

def test_launch_device_is_the_first_tensors_cuda_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _launch.launch_device((3, torch.zeros(2), None)) is None       # CPU: none
    assert _launch.launch_device((torch.zeros(2, device="meta"),)) is None
    assert _launch.launch_device(("no tensors", 1.0)) is None


def test_every_triton_wrapper_runs_on_its_tensors_device(monkeypatch):
    """Each public wrapper enters torch.cuda.device(<its tensors' device>) around its launches
    (recorded here with the device monkeypatched to cuda:1, the kernels interpreted), and the
    result is unchanged. Every `def *_triton(` in kernels/ carries the decorator."""
    import pathlib
    import re
    from tbkernels.kernels import per_sample_mse as mse_kernels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(_launch, "launch_device", lambda args: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    pred, target = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    got = mse_kernels.per_sample_mse_forward_triton(pred, target)
    assert entered == [torch.device("cuda", 1), "exit"]
    torch.testing.assert_close(got, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    root = pathlib.Path(_launch.__file__).parent
    for path in sorted(root.glob("*.py")):
        src = path.read_text()
        for name in re.findall(r"\ndef ([a-z]\w*_triton)\(", src):
            assert f"\n@_launch.on_tensor_device\ndef {name}(" in src, (path.name, name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_triton_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: the result equals the reference."""
    torch.cuda.set_device(0)
    pred = torch.randn(4, 16, 3, 8, 8, device="cuda:1")
    target = torch.randn_like(pred)
    got = tbkernels.per_sample_mse(pred, target, backend="triton")
    assert got.device == pred.device
    torch.testing.assert_close(got, ((pred - target) ** 2).mean(dim=(1, 2, 3, 4)))
