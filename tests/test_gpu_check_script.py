"""benchmarks/gpu_check.sh, the one command a GPU session runs, checked where it can be without a
GPU: argument handling, step selection, that a failed step is reported and fails the run without
stopping the steps after it, per-step time limits, the packing of its outputs into the at most 8
files the device tool returns, the automatic build on a bare machine, and TBK_COMMIT. The GPU and
the steps' programs are faked by a stand-in `python` (PYTHON=...). Also the results.py pieces
the GPU workflow relies on: TBK_COMMIT, where pytest sessions write, `results.py merge`, and
bench_mps.py's rows in the shared format."""
from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
needs_timeout = pytest.mark.skipif(shutil.which("timeout") is None, reason="no coreutils timeout")

# A stand-in for python3: logs its arguments, and plays each step's program without a GPU.
#   import check  passes once FAKE_BUILT exists (the fake build creates it)
#   pip install   "builds" (pip -v indents the backend's lines, as the real one does)
#   tests         writes the junit file and fails
#   bench_mps     writes a profile into --out-dir, then hangs (the timed-out step)
#   plot_results  writes three PNGs into --out-dir
#   benchmarks    append a row to $TBK_RESULTS_CSV
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_LOG"
out_dir() { while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && { echo "$2"; return; }; shift; done; }
case "$*" in
  *"import tbkernels._C"*)
    [ -e "$FAKE_BUILT" ] && exit 0
    echo "ModuleNotFoundError: No module named 'tbkernels._C'" >&2; exit 1 ;;
  *"-m pip install"*)
    touch "$FAKE_BUILT"
    echo "  tbkernels: building C++ CPU kernels and CUDA kernels ON (fake)"
    echo "Successfully installed tbkernels-0.0"; exit 0 ;;
  *"-m pytest"*" tests "*)
    for a in "$@"; do case $a in --junitxml=*) echo '<testsuites/>' > "${a#--junitxml=}";; esac; done
    echo "1 failed, 1 passed"; exit 1 ;;
  *bench_mps.py*)
    d=$(out_dir "$@"); mkdir -p "$d"; echo '{}' > "$d/profiles.json"
    echo "profiling..."; exec sleep 60 ;;
  *plot_results.py*)
    d=$(out_dir "$@"); for i in 1 2 3; do echo png > "$d/op$i.png"; done; exit 0 ;;
  *bench_flow_grpo.py*|*dpo_memory.py*|*"-m pytest benchmarks"*)
    [ -s "$TBK_RESULTS_CSV" ] ||
      echo "op,backend,shape,dtype,metric,value,device,commit,timestamp,command" > "$TBK_RESULTS_CSV"
    echo "fake,b,s,float32,median_us,1,GPU,c,t,cmd" >> "$TBK_RESULTS_CSV"
    echo "benchmark output"; exit 0 ;;
  *) exit 0 ;;
esac
"""


def run(*args, timeout=120, env=None, script=SCRIPT):
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture
def fake(tmp_path):
    """Environment for gpu_check.sh with the stand-in python; `calls()` lists its invocations."""
    py = tmp_path / "fakepy"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TBK_", "FAKE_")) and k != "PYTHON"}
    env.update(PYTHON=str(py), FAKE_LOG=str(tmp_path / "calls.log"),
               FAKE_BUILT=str(tmp_path / "built"))

    class Fake:
        pass
    f = Fake()
    f.env, f.built = env, tmp_path / "built"
    f.calls = lambda: ((tmp_path / "calls.log").read_text().splitlines()
                       if (tmp_path / "calls.log").exists() else [])
    return f


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def results():
    return _load("tbk_bench_results_under_test", ROOT / "benchmarks" / "results.py")


@needs_bash
def test_usage_and_unknown_steps_exit_2(tmp_path):
    proc = run()
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run(tmp_path / "out", "build", "bogus")
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr
    env = dict(os.environ, TBK_STEP_TIMEOUT="soon")
    proc = run(tmp_path / "out", "plot", env=env)
    assert proc.returncode == 2 and "TBK_STEP_TIMEOUT must be" in proc.stderr
    # a leading zero reads as octal in bash arithmetic: 09 skipped every step and said "all
    # steps passed"
    for var in ("TBK_TIMEOUT_PLOT", "TBK_CALL_BUDGET"):
        proc = run(tmp_path / "out", "plot", env=dict(os.environ, **{var: "09"}))
        assert proc.returncode == 2 and f"{var} must be" in proc.stderr, (var, proc.stderr)


@needs_bash
def test_a_signal_during_the_final_packing_still_leaves_the_tarball(tmp_path, fake):
    """TERM while tar was packing the outputs ran the handler, whose own pack returned at once
    (already marked packed): the run ended with artifacts/ and artifacts.tar.gz.part, which the
    device would not return. Now the packing finishes first."""
    real_tar = shutil.which("tar")
    if real_tar is None:
        pytest.skip("no tar")
    shim = tmp_path / "shim"
    shim.mkdir()
    marker = tmp_path / "packing"
    (shim / "tar").write_text(f"""#!/usr/bin/env bash
case " $* " in *" -czf "*) touch {marker}; sleep 3 ;; esac
exec {real_tar} "$@"
""")
    (shim / "tar").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("op\n")          # the fake plot writes PNGs to pack
    env = dict(fake.env, PATH=f"{shim}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "plot"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the packing never started"
        proc.terminate()
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["artifacts.tar.gz", "gpu_check.log",
                                                     "results.csv"]
    assert "stopped by SIGTERM" in (out / "gpu_check.log").read_text()


@needs_bash
def test_files_already_in_outdir_are_never_packed_away(tmp_path):
    """Run into an existing folder, the packing moved everything in it (a .git included) into
    the tarball and deleted it. Only what this run created is packed now."""
    out = tmp_path / "existing"
    (out / "project" / ".git").mkdir(parents=True)
    (out / "important.txt").write_text("precious")
    run(out, "plot")
    assert (out / "important.txt").read_text() == "precious"
    assert (out / "project" / ".git").is_dir()
    assert (out / "gpu_check.log").exists()


@needs_bash
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


@needs_bash
@needs_timeout
def test_outputs_packed_into_at_most_8_files_with_failed_and_timed_out_steps(tmp_path, fake):
    out = tmp_path / "out"
    steps = ["build", "backends", "tests", "benchmarks", "flow_grpo", "flow_grpo_map",
             "flow_grpo_inputs", "mps", "dpo_memory", "plot"]
    env = dict(fake.env, TBK_STEP_TIMEOUT="2")
    t0 = time.monotonic()
    proc = run(out, *steps, env=env)
    took = time.monotonic() - t0
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 1, log
    # the hanging step was stopped at its limit, reported, and the steps after it still ran
    assert took < 30, log
    assert "--- FAILED (timed out after 2 s): MPS reward-worker benchmark" in log
    assert "FAILED: MPS reward-worker benchmark (timed out after 2 s)" in log
    assert "--- FAILED (exit 1): test suite on the GPU" in log
    assert "--- ok: DPO peak-memory benchmark" in log and "--- ok: plot" in log
    # pip -v indents the backend's lines: the build step's summary shows them
    assert "tbkernels: building C++ CPU kernels and CUDA kernels ON (fake)" in log
    # what comes back: at most 8 plain files, no folders
    entries = sorted(p.name for p in out.iterdir())
    assert entries == ["artifacts.tar.gz", "gpu_check.log", "results.csv", "tests.xml"], entries
    assert all(p.is_file() for p in out.iterdir())
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        names = set(tar.getnames())
    for f in ("build.log", "tests.log", "benchmarks.log", "flow_grpo.log", "flow_grpo_map.log",
              "flow_grpo_inputs.log", "mps.log", "dpo_memory.log", "op1.png", "op3.png",
              "mps/profiles.json"):   # written by the step that then timed out
        assert f"artifacts/{f}" in names, sorted(names)
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 6     # header + a row per benchmark command
    # a second call into the same OUTDIR (a local run) keeps the first one's artifacts
    proc = run(out, "plot", env=env)
    assert sorted(p.name for p in out.iterdir()) == entries
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        assert "artifacts/build.log" in tar.getnames()


@needs_bash
def test_call_budget_stops_starting_steps(tmp_path, fake):
    out = tmp_path / "out"
    proc = run(out, "plot", env=dict(fake.env, TBK_CALL_BUDGET="5"))
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 1
    assert "FAILED: plot (not started: the call's budget of 5 s is spent)" in log


@needs_bash
def test_bare_machine_builds_before_the_first_step_that_needs_the_package(tmp_path, fake):
    out = tmp_path / "out"
    proc = run(out, "backends", "benchmarks", env=fake.env)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log
    assert "building it first" in log and "No module named 'tbkernels._C'" in log
    assert "--- ok: build tbkernels with CUDA (automatic" in log
    builds = [c for c in fake.calls() if "-m pip install --no-build-isolation" in c]
    assert len(builds) == 1                       # once, not before every step
    assert log.index("=== build tbkernels with CUDA") < log.index("=== backend table")
    # once it imports, the next call does not build again
    run(out, "backends", env=fake.env)
    assert len([c for c in fake.calls() if "-m pip install --no-build-isolation" in c]) == 1


@needs_bash
def test_tbk_commit_is_printed_where_there_is_no_git(tmp_path, fake):
    # the device's copy of the repo has no .git: a copy of the script alone stands for it
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu_check.sh")
    env = dict(fake.env, TBK_COMMIT="feedbee", GIT_CEILING_DIRECTORIES=str(tmp_path))
    out = tmp_path / "out"
    run(out, "environment", env=env, script=repo / "benchmarks" / "gpu_check.sh")
    log = (out / "gpu_check.log").read_text()
    assert "commit feedbee (from TBK_COMMIT; no git history here)" in log, log


def test_git_commit_honours_tbk_commit(results, monkeypatch):
    monkeypatch.setenv("TBK_COMMIT", "feedbee")
    assert results.git_commit() == "feedbee"
    monkeypatch.delenv("TBK_COMMIT")
    assert results.git_commit() != "feedbee"


def test_pytest_sessions_write_to_local_csv_unless_a_file_is_named(results, monkeypatch):
    monkeypatch.delenv("TBK_RESULTS_CSV", raising=False)
    assert results.session_csv_path() == results.LOCAL_CSV != results.DEFAULT_CSV
    assert results.LOCAL_CSV.name == "local.csv"
    monkeypatch.setenv("TBK_RESULTS_CSV", "/x/env.csv")
    assert results.session_csv_path() == pathlib.Path("/x/env.csv")
    assert results.session_csv_path("/x/opt.csv") == pathlib.Path("/x/opt.csv")
    # local.csv is git-ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q",
                               "benchmarks/results/local.csv"])
        assert proc.returncode == 0


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                    reason="pytest-benchmark not installed")
def test_timed_pytest_session_reports_local_csv():
    env = {k: v for k, v in os.environ.items() if k != "TBK_RESULTS_CSV"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert f"rows go to {ROOT / 'benchmarks' / 'results' / 'local.csv'}" in proc.stdout, proc.stdout


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_results_merge_cli(results, tmp_path, capsys):
    cols = list(results.COLUMNS)
    row = ["op", "b", "s", "float32", "median_us", "1.5", "H100", "abc1234", "t", "cmd"]
    src, dst = tmp_path / "gpu.csv", tmp_path / "results.csv"
    # a session may write the same row twice (bench_flow_grpo's speedups): both are kept
    _write(src, cols, [row, row[:5] + ["2.5"] + row[6:], row])
    _write(dst, cols, [["old"] * 10])
    # the command line itself, once
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results.py"), "merge",
                           str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "appended 3 rows" in proc.stdout and "skipped" not in proc.stdout
    with open(dst, newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == cols and got[1] == ["old"] * 10 and got[2] == row and len(got) == 5
    assert got[4] == row
    assert results.main(["merge", str(src), str(dst)]) == 0   # the same file twice: nothing added
    assert "appended 0 rows" in capsys.readouterr().out
    assert len(dst.read_text().splitlines()) == 5
    # a source in another format (bench_mps's old 8 columns) is refused, dst untouched
    bad = tmp_path / "bad.csv"
    _write(bad, cols[:8], [row[:8]])
    before = dst.read_text()
    assert results.main(["merge", str(bad), str(dst)]) == 1
    assert "expected" in capsys.readouterr().err
    assert dst.read_text() == before
    # a new destination gets the header
    assert results.main(["merge", str(src), str(tmp_path / "new.csv")]) == 0
    assert (tmp_path / "new.csv").read_text().splitlines()[0] == ",".join(cols)


def test_bench_mps_rows_use_the_shared_format(results, tmp_path, monkeypatch):
    bench_mps = _load("tbk_bench_mps_under_test", ROOT / "benchmarks" / "bench_mps.py")
    monkeypatch.setenv("TBK_COMMIT", "feedbee")

    class P:
        def __init__(self, t):
            self.predicted_makespan = t
    plans = {"serial": P(0.4), "concurrent": P(0.3), "greedy": P(0.2)}
    measured = {"serial": 0.4, "concurrent": 0.32, "fallback_plan": 0.25}
    shared = tmp_path / "results.csv"
    # bench_mps first, then another benchmark appending to the same file (gpu_check.sh's order
    # in a call "mps plot" followed by "benchmarks"): the header must be the standard one
    n = bench_mps.write_rows(shared, plans, measured, "W=4;B=2", None,
                             "python benchmarks/bench_mps.py --quick")
    assert n == 3 + 2 * 3
    results.append_rows(shared, [dict(zip(results.COLUMNS, ["op"] * 10))])
    with open(shared, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == results.COLUMNS
    rows = [r for r in results.read_rows(shared) if r["op"] == "mps_reward_stage"]
    assert len(rows) == n
    assert {r["commit"] for r in rows} == {"feedbee"}
    assert all(r["timestamp"] and r["command"] == "python benchmarks/bench_mps.py --quick"
               for r in rows)
    assert len({r["timestamp"] for r in rows}) == 1
    assert all(r["device"].endswith("(1 thread per worker)") for r in rows)
    got = {(r["backend"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("greedy", "predicted_makespan_s")] == 0.2
    assert got[("fallback_plan", "makespan_s")] == 0.25
    assert got[("fallback_plan", "speedup_vs_serial")] == pytest.approx(1.6)
    # after another benchmark wrote the file, bench_mps appends to it (on a GPU: its name)
    bench_mps.write_rows(shared, plans, measured, "W=4;B=2", "NVIDIA H100 80GB HBM3", "cmd")
    assert sum(r["device"] == "NVIDIA H100 80GB HBM3" for r in results.read_rows(shared)) == n
