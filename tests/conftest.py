"""Shared test helpers: the device to test on and the backends that can run there."""
import os

import pytest
import torch

import tbkernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params(implemented=tbkernels.BACKENDS):
    """pytest params for each backend; unavailable ones are skipped with the reason why."""
    status = tbkernels.backends(DEVICE)
    params = []
    for name in implemented:
        marks = [] if status[name].available else [
            pytest.mark.skip(reason=f"{name} backend unavailable on {DEVICE.type}: {status[name].reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params



def value_and_grad(fn, x, *args):
    """(fn(x', *args), x'.grad) for a fresh leaf copy x' of x: a compiled function and its eager
    original compared on the same inputs."""
    xx = x.clone().requires_grad_(True)
    value = fn(xx, *args)
    value.backward()
    return value.detach(), xx.grad

def pytest_report_header(config):
    lines = [f"tbkernels {tbkernels.__version__}, device {DEVICE}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    for name, st in tbkernels.backends(DEVICE).items():
        lines.append(f"  backend {name}: {st}")
    return lines


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # A TBK_BACKEND in the caller's shell would silently change what every test exercises.
    monkeypatch.delenv("TBK_BACKEND", raising=False)
