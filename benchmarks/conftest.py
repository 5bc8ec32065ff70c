"""Benchmark session plumbing: one Recorder per pytest session, written to the CSV at its end.

Rows are written only when pytest-benchmark actually times (not under ``--benchmark-disable``,
``--benchmark-skip`` or xdist, where it disables itself), so CI's smoke run leaves the results
file untouched. They go to ``--results-csv PATH``, else ``$TBK_RESULTS_CSV``, else the git-ignored
``benchmarks/results/local.csv``: never to the committed ``results/results.csv`` unless it is named
(``python benchmarks/results.py merge`` moves rows there afterwards).
"""
import os

import pytest
import torch

import tbkernels
from .results import (BENCH_DEVICE, CpuMeter, Recorder, device_name, git_commit,
                      session_csv_path)

_RECORDER = pytest.StashKey[Recorder]()
_CPU_METER = pytest.StashKey[CpuMeter]()

# Pin torch's CPU threads, e.g. to 1 on a machine whose other cores are busy. The device column
# records the count either way.
if os.environ.get("TBK_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["TBK_BENCH_THREADS"]))


def pytest_addoption(parser):
    parser.addoption("--results-csv", metavar="PATH", default=None,
                     help="append timed benchmark rows to PATH (default: $TBK_RESULTS_CSV, else "
                          "the git-ignored benchmarks/results/local.csv)")


def _csv(config):
    return session_csv_path(config.getoption("--results-csv", default=None))


def _timing_enabled(config) -> bool:
    session = getattr(config, "_benchmarksession", None)
    return session is not None and not session.disabled and not session.skip


# Environment that changes what is measured, so the command column can reproduce a row.
_MEASUREMENT_ENV = ("TBK_BENCH_THREADS", "TRITON_INTERPRET", "OMP_NUM_THREADS")


def _command(config) -> str:
    env = [f"{k}={os.environ[k]}" for k in _MEASUREMENT_ENV if os.environ.get(k)]
    return " ".join([*env, "pytest", *config.invocation_params.args])


def _recorder(config) -> Recorder:
    """Made on first use, after every plugin's pytest_configure: pytest-benchmark's included."""
    if _RECORDER not in config.stash:
        enabled = _timing_enabled(config)
        config.stash[_RECORDER] = Recorder(
            enabled=enabled, device=device_name(BENCH_DEVICE),
            commit=git_commit() if enabled else "unknown", command=_command(config))
    return config.stash[_RECORDER]


def pytest_report_header(config):
    rec = _recorder(config)
    where = f"rows go to {_csv(config)}" if rec.enabled else "timing disabled: no rows are written"
    lines = [f"benchmarks on {BENCH_DEVICE} ({rec.device}), commit {rec.commit}; {where}"]
    for name, status in tbkernels.backends(BENCH_DEVICE).items():
        lines.append(f"  backend {name}: {status}")
    return lines


def pytest_sessionstart(session):
    session.config.stash[_CPU_METER] = CpuMeter()


def pytest_sessionfinish(session):
    config = session.config
    rec = _recorder(config)
    others = config.stash[_CPU_METER].others_pct() if _CPU_METER in config.stash else None
    if others is not None and rec.rows:
        rec.add("session", "-", "-", "-", "other_processes_cpu_pct", others)
    path = rec.finish(_csv(config))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if others is not None and path is not None:
        reporter.write_line(f"other processes used {others:.0f}% of this machine's CPU during "
                            "the run" + ("; multi-threaded timings may include their stalls"
                                         if others > 10 else ""))
    if path is not None:
        reporter.write_line(f"benchmark results appended to {path}")


@pytest.fixture(scope="session")
def recorder(request) -> Recorder:
    return _recorder(request.config)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # A TBK_BACKEND in the caller's shell would silently change what a "cuda" row measured.
    monkeypatch.delenv("TBK_BACKEND", raising=False)
