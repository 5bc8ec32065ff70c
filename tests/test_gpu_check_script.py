"""benchmarks/gpu_check.sh, the one command a GPU session runs, checked where it can be without a
GPU: argument handling, step selection, and that a failed step is reported and fails the run
without stopping the steps after it."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def run(*args, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_usage_and_unknown_steps_exit_2(tmp_path):
    proc = run()
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run(tmp_path / "out", "build", "bogus")
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr


def test_chosen_steps_run_in_order_and_failures_are_listed(tmp_path):
    out = tmp_path / "out"
    # with no results.csv the plot step fails; the step after it still runs
    proc = run(out, "plot", "plot")
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 1
    assert log.count("=== plot") == 2 and "--- FAILED (exit 1): plot" in log
    assert "FAILED: plot (exit 1)" in log
    assert "=== build" not in log and "=== test suite" not in log   # only the chosen steps
    # the log is appended to by a later call, so a session split over calls keeps one log
    run(out, "plot")
    assert (out / "gpu_check.log").read_text().count("=== plot") == 3
