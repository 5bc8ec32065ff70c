"""tbkernels.mps runtime on CPU: simulated workers whose runtime follows a profile, a crashing and
a hanging worker, MPS unavailability reported once with a fallback, and the daemon's start/stop
plumbing against a stand-in control binary. The tests that need the real nvidia-cuda-mps-control
and a GPU run only where both exist (issue 5's GPU acceptance) and are skipped here with why."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

import tbkernels.mps as mps
from tbkernels.mps import daemon as mps_daemon
from tbkernels.mps import runtime as mps_runtime

PROFILES = {  # seconds at full scale; runs use scale=0.25 -> tens to ~100 ms
    "cnn": {25: 0.60, 50: 0.36, 75: 0.30, 100: 0.28},
    "vit": {25: 0.90, 50: 0.50, 75: 0.38, 100: 0.33},
    "sharpness": {25: 0.12, 50: 0.10, 100: 0.10},
    "motion": {25: 0.08, 50: 0.07, 100: 0.07},
}
SCALE = 0.25

REAL_MPS, REAL_MPS_REASON = mps.mps_available()
needs_real_mps = pytest.mark.skipif(not REAL_MPS, reason=f"needs a GPU with MPS: {REAL_MPS_REASON}")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    # "Say so once" is per process; every test starts from a clean slate.
    mps_daemon._WARNED.clear()
    yield
    mps_daemon._WARNED.clear()


@pytest.fixture
def no_mps(monkeypatch):
    """Make MPS unavailable even on a GPU machine (the binary is not found)."""
    monkeypatch.setattr(mps_daemon, "BINARY", "nvidia-cuda-mps-control-absent-for-test")


def sim_workers(**kw):
    return {w: mps.simulated_worker(w, t, scale=SCALE, **kw) for w, t in PROFILES.items()}


# ------------------------------------------------------------------ simulated workers follow plan
def test_plan_run_matches_prediction(no_mps):
    plan = mps.plan(PROFILES)
    with pytest.warns(mps.MpsUnavailableWarning, match="MPS unavailable"):
        rep = mps.run_plan(plan, sim_workers(), backend="auto")
    assert rep.ok, rep
    assert rep.backend == "process" and "quotas are NOT enforced" in rep.backend_reason
    # Each worker ran at its planned quota (the child saw it in its environment) ...
    for name, q in plan.quotas().items():
        r = rep.results[name]
        assert r.value["quota"] == q and r.value["env_quota"] == mps_daemon.format_quota(q)
        assert r.value["mps_quota"] is None  # no MPS: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE not set
    # ... the groups ran concurrently and in sequence, and the measured makespan is the prediction
    # (process start-up is outside the timed region thanks to the start barrier).
    predicted = plan.predicted_makespan * SCALE
    assert predicted <= rep.makespan < predicted * 1.25 + 0.05, (rep.makespan, predicted)
    for (g, t_pred), t_meas in zip(zip(plan.groups, plan.group_times), rep.group_times):
        assert t_meas == pytest.approx(t_pred * SCALE, rel=0.25, abs=0.03)
    starts = {w: rep.results[w].t_start for w in plan.workers}
    g0, g1 = [w for w, _ in plan.groups[0]], [w for w, _ in plan.groups[1]]
    assert max(starts[w] for w in g0) - min(starts[w] for w in g0) < 0.05  # released together
    assert min(starts[w] for w in g1) >= max(rep.results[w].t_end for w in g0)  # after group 1


def test_serial_vs_concurrent_vs_plan_measured(no_mps):
    workers = sim_workers()
    serial = mps.run_plan(mps.plan(PROFILES, "serial"), workers, backend="process", prestart="all")
    planned = mps.run_plan(mps.plan(PROFILES), workers, backend="process", prestart="all")
    assert serial.ok and planned.ok
    assert len(serial.group_times) == 4
    assert serial.makespan == pytest.approx(mps.plan(PROFILES, "serial").predicted_makespan * SCALE,
                                            rel=0.25, abs=0.04)
    assert planned.makespan < serial.makespan


def test_thread_backend_runs_a_group_in_one_process():
    groups = [[(mps.simulated_worker(w, PROFILES[w], scale=SCALE), q) for w, q in
               (("cnn", 40), ("vit", 60))]]
    rep = mps.run_groups(groups, backend="threads")
    assert rep.ok, rep
    assert rep.results["cnn"].pid == rep.results["vit"].pid  # one process, two threads
    assert rep.results["cnn"].value["quota"] == 40.0 and rep.results["vit"].value["quota"] == 60.0
    assert rep.group_times[0] == pytest.approx(0.44 * SCALE, rel=0.25, abs=0.03)


# ---------------------------------------------------------- crash and hang do not block the others
def test_crashing_and_hanging_workers_do_not_block_the_others():
    w = sim_workers()
    group1 = [(w["cnn"], 40), (mps.crashing_worker("crash"), 10), (mps.hanging_worker("hang", timeout=1.0), 10),
              (mps.hard_crashing_worker("dies", code=7), 10), (mps.failing_setup_worker("badsetup"), 10)]
    group2 = [(w["vit"], 100)]
    t0 = time.monotonic()
    rep = mps.run_groups([group1, group2], backend="process", timeout=30)
    elapsed = time.monotonic() - t0
    res = rep.results
    assert res["cnn"].ok and res["vit"].ok  # the healthy workers, in both groups, finished
    assert res["crash"].status == "error" and res["crash"].phase == "run"
    assert isinstance(res["crash"].exception, RuntimeError) and "simulated reward worker failure" in res["crash"].error
    assert "Traceback" in res["crash"].traceback
    assert res["hang"].status == "timeout" and "killed" in res["hang"].error
    assert res["dies"].status == "crashed" and res["dies"].returncode == 7
    assert res["badsetup"].status == "error" and res["badsetup"].phase == "setup"
    assert isinstance(res["badsetup"].exception, ValueError)
    assert not rep.ok and set(rep.failures()) == {"crash", "hang", "dies", "badsetup"}
    # The hang cost its timeout (1 s) once, not the run's 30 s default.
    assert 1.0 <= rep.group_times[0] < 3.0
    assert elapsed < 10
    with pytest.raises(RuntimeError, match="hang: timeout"):
        rep.raise_on_failure()


def test_hang_and_crash_in_thread_backend():
    w = sim_workers()
    rep = mps.run_groups([[(w["cnn"], 50), (mps.crashing_worker("crash"), 10),
                           (mps.hanging_worker("hang", timeout=0.5), 10)]], backend="threads")
    assert rep.results["cnn"].ok
    assert rep.results["crash"].status == "error"
    assert rep.results["hang"].status == "timeout" and "abandoned" in rep.results["hang"].error


def test_setup_timeout_and_unpicklable_result(tmp_path):
    mod = tmp_path / "slow_workers.py"
    mod.write_text(textwrap.dedent("""
        import threading, time
        def slow_factory():
            time.sleep(60)
        def unpicklable():
            return threading.Lock()
    """))
    rep = mps.run_groups([[(mps.WorkerSpec("slow", f"{mod}:slow_factory", factory=True), 50),
                           (mps.WorkerSpec("lock", f"{mod}:unpicklable"), 50)]],
                         backend="process", setup_timeout=1.0)
    assert rep.results["slow"].status == "timeout" and rep.results["slow"].phase == "setup"
    assert rep.results["lock"].status == "error" and "cannot be pickled" in rep.results["lock"].error


def test_input_validation():
    w = sim_workers()
    with pytest.raises(ValueError, match="non-empty"):
        mps.run_groups([])
    with pytest.raises(ValueError, match="once across all groups"):
        mps.run_groups([[(w["cnn"], 50)], [(w["cnn"], 50)]], backend="process")
    with pytest.raises(ValueError, match=r"must be in \(0, 100\]"):
        mps.run_groups([[(w["cnn"], 150)]], backend="process")
    with pytest.raises(TypeError, match="WorkerSpec, quota"):
        mps.run_groups([[("cnn", 50)]], backend="process")
    with pytest.raises(ValueError, match="backend must be one of"):
        mps.run_groups([[(w["cnn"], 50)]], backend="cuda")
    with pytest.raises(ValueError, match="target must look like"):
        mps.WorkerSpec("x", "no_colon")
    with pytest.raises(ValueError, match="repeats"):
        mps.WorkerSpec("x", "m:f", repeats=0)
    with pytest.raises(ValueError, match="not a size"):
        mps.WorkerSpec("x", "m:f", mem_limit="lots")
    with pytest.raises(ValueError, match="no WorkerSpec"):
        mps.run_plan(mps.plan(PROFILES), {"cnn": w["cnn"]})
    for bad in (0, -5, float("nan"), True, "10"):
        for arg in ("timeout", "setup_timeout"):
            with pytest.raises(ValueError, match=f"{arg} must be positive seconds"):
                mps.run_groups([[(w["cnn"], 50)]], backend="process", **{arg: bad})


def test_builtin_worker_targets_survive_another_installation():
    """Profiles record the built-in reward and simulated workers by file path. Read by another
    installation (venv, node, a reinstall), that path is gone: the worker is rebuilt from this
    installation's copy of the same file. Other targets are kept as written."""
    from tbkernels.mps.workers import REWARDS_FILE, SIM_FILE
    old = os.path.join(os.sep, "old", "venv", "site-packages", "tbkernels", "mps")
    spec = mps.WorkerSpec.from_description("sim", {"target": os.path.join(old, "_sim.py") + ":hang"})
    assert spec.target == SIM_FILE + ":hang"
    spec = mps.WorkerSpec.from_description(
        "cnn", {"target": os.path.join(old, "rewards.py") + ":cnn_scorer", "factory": True})
    assert spec.target == REWARDS_FILE + ":cnn_scorer" and spec.factory
    mine = os.path.join(os.sep, "old", "mine.py") + ":score"
    assert mps.WorkerSpec.from_description("m", {"target": mine}).target == mine


def test_cli_reports_user_errors_in_one_line(tmp_path):
    """python -m tbkernels.mps: a missing file, a malformed profile, bad JSON arguments and
    --kwargs for a worker nobody named end in one "error:" line, not a traceback."""
    (tmp_path / "bad.json").write_text("{bad")
    cases = [(["show", str(tmp_path / "missing.json")], "FileNotFoundError"),
             (["plan", str(tmp_path / "bad.json")], "not valid JSON"),
             (["profile", "--rewards", "cnn", "--reward-kwargs", "{x", "-o", "o.json"],
              "--reward-kwargs: not valid JSON"),
             (["profile", "--worker", "a=os:getpid", "--kwargs", "b={}", "-o", "o.json"],
              "--kwargs for 'b', which no --worker names")]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "tbkernels.mps", *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, TBK_DEBUG=""))
        assert proc.returncode in (1, 2), (argv, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and message in proc.stderr, (argv, proc.stderr)


def test_cli_prints_warnings_as_one_plain_line():
    """The command line printed "<frozen runpy>:88: MpsUnavailableWarning: ..." for its user."""
    from tbkernels.mps import __main__ as cli
    text = cli._format_warning(mps.MpsUnavailableWarning("MPS unavailable: x"),
                               mps.MpsUnavailableWarning, "<frozen runpy>", 88)
    assert text == "warning: MPS unavailable: x\n"
    before = warnings.formatwarning
    assert cli.main(["status"]) == 0
    assert warnings.formatwarning is before        # main() from Python leaves the format alone


def test_a_worker_failing_everywhere_does_not_lose_the_others_profiles(no_mps, tmp_path):
    """One broken worker used to discard every timing of a long profiling run with a bare
    RuntimeError. Now ProfilingError names it and carries the measured workers' profiles; the
    command line writes those to <output>.partial.json and exits 1."""
    good = mps.simulated_worker("cnn", PROFILES["cnn"], scale=SCALE)
    with pytest.warns(mps.MpsUnavailableWarning):
        with pytest.raises(mps.ProfilingError, match=r"failed at every quota for \['crash'\]") as ei:
            mps.profile_workers([good, mps.crashing_worker("crash")], quotas=(50, 100),
                                repeats=1, warmup=0, progress=False)
    err = ei.value
    assert isinstance(err, RuntimeError) and err.missing == ["crash"]
    assert {(f["worker"], f["quota"]) for f in err.failures} == {("crash", 50.0), ("crash", 100.0)}
    assert list(err.partial) == ["cnn"] and set(err.partial["cnn"]) == {50.0, 100.0}
    assert err.partial["cnn"][50] == pytest.approx(PROFILES["cnn"][50] * SCALE, rel=0.2, abs=0.01)
    assert list(err.partial.workers) == ["cnn"] and len(err.partial.meta["failures"]) == 2
    # nothing measured at all: no partial set
    with pytest.raises(mps.ProfilingError) as ei:
        mps.profile_workers([mps.crashing_worker("crash")], quotas=(100,), repeats=1,
                            warmup=0, backend="process", progress=False)
    assert ei.value.partial is None
    # picklable (a process pool or a Ray task may return it)
    back = pickle.loads(pickle.dumps(err))
    assert (back.missing, back.failures, str(back)) == (err.missing, err.failures, str(err))
    assert dict(back.partial) == dict(err.partial)

    mps.save_profiles({"cnn": PROFILES["cnn"]}, tmp_path / "sim.json")
    proc = subprocess.run([sys.executable, "-m", "tbkernels.mps", "profile", "--simulate",
                           str(tmp_path / "sim.json"), "--scale", "0.05", "--worker",
                           "broken=os:no_such_function", "--quotas", "50,100", "--repeats", "1",
                           "--warmup", "0", "--backend", "process", "-o", "out.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "['broken']" in proc.stderr, proc.stderr
    assert "out.partial.json" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.json").exists()
    kept = mps.load_profiles(tmp_path / "out.partial.json")
    assert list(kept) == ["cnn"] and set(kept["cnn"]) == {50.0, 100.0}


# ------------------------------------------------------------ MPS unavailable: said once, fallback
def test_mps_unavailable_is_reported_once_and_falls_back(no_mps):
    ok, reason = mps.mps_available()
    assert not ok and "not found" in reason
    groups = [[(mps.simulated_worker("a", {50: 0.04, 100: 0.02}), 50)]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = mps.run_groups(groups, backend="auto")
        r2 = mps.run_groups(groups, backend="auto")
    said = [c for c in caught if issubclass(c.category, mps.MpsUnavailableWarning)]
    assert len(said) == 1, [str(c.message) for c in caught]
    assert "nvidia-cuda-mps-control-absent-for-test not found" in str(said[0].message)
    assert said[0].filename == __file__  # points at the caller, not at library internals
    # Not silent afterwards either: every report carries the reason.
    assert r1.backend == r2.backend == "process" and "MPS unavailable" in r2.backend_reason
    assert r1.ok and r2.ok


def test_explicit_mps_request_raises_instead_of_falling_back(no_mps):
    with pytest.raises(mps.MpsUnavailable, match="not found"):
        mps.run_groups([[(mps.simulated_worker("a", {100: 0.01}), 100)]], backend="mps")


def test_profile_workers_measures_simulated_profiles_and_records_fallback(no_mps, tmp_path):
    specs = [mps.simulated_worker("cnn", PROFILES["cnn"], scale=SCALE),
             mps.simulated_worker("motion", PROFILES["motion"], scale=SCALE)]
    with pytest.warns(mps.MpsUnavailableWarning):
        ps = mps.profile_workers(specs, quotas=(25, 100), repeats=2, warmup=0, progress=False)
    for w in ("cnn", "motion"):
        for q in (25, 100):
            assert ps[w][q] == pytest.approx(PROFILES[w][q] * SCALE, rel=0.2, abs=0.01)
        assert len(ps.samples[w][25.0]) == 2
    assert ps.meta["quota_enforced"] is False and "not found" in ps.meta["backend_reason"]
    assert ps.workers["cnn"]["target"].endswith("_sim.py:simulated")
    ps.save(tmp_path / "p.json")
    back = mps.load_profiles(tmp_path / "p.json")
    assert dict(back) == dict(ps)
    spec = mps.WorkerSpec.from_description("cnn", back.workers["cnn"])
    assert spec.target == specs[0].target and spec.kwargs["scale"] == SCALE
    with pytest.raises(ValueError, match="quota"):
        mps.profile_workers(specs, quotas=(0,), progress=False)


# ---------------------------------------------------- daemon plumbing against a stand-in binary
FAKE_CONTROL = r'''#!{python}
# Stand-in for nvidia-cuda-mps-control, for testing the start/stop plumbing without a GPU:
# "-d" leaves a background process and a pid file in $CUDA_MPS_PIPE_DIRECTORY; "quit" on stdin
# ends it; "get_server_list" answers only while it runs. FAKE_MPS_FAIL makes "-d" fail.
import os, subprocess, sys, signal
pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
log = os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log")
pidf = os.path.join(pipe, "nvidia-cuda-mps-control.pid")
marker = os.path.join(pipe, "control")
if sys.argv[1:] == ["-d"]:
    if os.environ.get("FAKE_MPS_FAIL"):
        sys.stderr.write("An instance of this daemon is already running / permission denied\n")
        sys.exit(1)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open(pidf, "w").write(str(p.pid))
    open(marker, "w").close()
    with open(log, "a") as f:
        f.write("started CUDA_VISIBLE_DEVICES=%s\n" % os.environ.get("CUDA_VISIBLE_DEVICES"))
    sys.exit(0)
cmd = sys.stdin.readline().strip()
if not os.path.exists(marker):
    print("Cannot find MPS control daemon process"); sys.exit(1)
if cmd == "get_server_list":
    sys.exit(0)
if cmd == "quit":
    os.kill(int(open(pidf).read()), signal.SIGTERM)
    os.remove(marker)
    with open(log, "a") as f:
        f.write("quit\n")
    sys.exit(0)
sys.exit(2)
'''


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = bindir / "nvidia-cuda-mps-control"
    path.write_text(FAKE_CONTROL.replace("{python}", sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return str(path)


def _dead(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.02)
    return False


def test_daemon_start_status_client_env_stop(fake_control, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    d = mps.MpsDaemon(device=1, binary=fake_control, check_gpu=False)
    with d:
        assert d.running and d.pid is not None
        pipe, logs = d.pipe_dir, d.log_dir
        assert os.path.isdir(pipe) and os.path.isdir(logs) and pipe != "/tmp/nvidia-mps"
        assert d.status()["running"]
        with open(os.path.join(logs, "control.log")) as f:
            assert "CUDA_VISIBLE_DEVICES=5" in f.read()  # device 1 of this process's visible list
        env = d.client_env(quota=37.5, mem_limit=2 * 2**30)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == pipe and env["CUDA_MPS_LOG_DIRECTORY"] == logs
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "37.5"
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
        assert "CUDA_VISIBLE_DEVICES" not in env  # MPS remaps: clients must not carry it
        assert d.client_env(quota=40, mem_limit="512M")["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=512M"
        pid = d.pid
    assert _dead(pid) and not d.running
    assert not os.path.exists(pipe) and not os.path.exists(logs)  # private dirs removed
    assert "quit" in d.last_log
    d.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        d.client_env(quota=50)


def test_daemon_start_failure_raises_with_the_daemons_message(fake_control, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    with pytest.raises(mps.MpsUnavailable, match="permission denied"):
        mps.MpsDaemon(binary=fake_control, check_gpu=False).start()


def test_no_permission_at_start_falls_back_once(fake_control, monkeypatch):
    # Binary present and a GPU reported, but the daemon refuses to start: the runtime falls back to
    # plain processes and the warning carries the daemon's own message.
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    fake_gpu = {"name": "Fake GPU", "driver": "0", "mig": False, "compute_mode": "Default"}
    monkeypatch.setattr(mps_daemon, "gpu_info", lambda device=0: fake_gpu)
    monkeypatch.setattr(mps_runtime, "gpu_info", lambda device=0: fake_gpu)
    monkeypatch.setattr(mps_runtime, "_green_supported", lambda: False)
    with pytest.warns(mps.MpsUnavailableWarning, match="permission denied"):
        rep = mps.run_groups([[(mps.simulated_worker("a", {100: 0.01}), 100)]], backend="auto")
    assert rep.ok and rep.backend == "process"


def test_mig_is_reported_as_unavailable(monkeypatch, fake_control):
    monkeypatch.setattr(mps_daemon, "gpu_info", lambda device=0: {"name": "H100", "mig": True})
    ok, reason = mps.mps_available()
    assert not ok and "MIG mode is enabled" in reason


def test_workers_get_the_mps_client_environment(fake_control, monkeypatch):
    fake_gpu = {"name": "Fake GPU", "driver": "0", "mig": False, "compute_mode": "Default"}
    monkeypatch.setattr(mps_daemon, "gpu_info", lambda device=0: fake_gpu)
    with mps.MpsDaemon(binary=fake_control) as d:
        rep = mps.run_plan(mps.plan(PROFILES), sim_workers(), daemon=d)
        pipe = d.pipe_dir
    assert rep.ok and rep.backend == "mps"
    for name, q in mps.plan(PROFILES).quotas().items():
        v = rep.results[name].value
        assert v["mps_quota"] == mps_daemon.format_quota(q) and v["mps_pipe"] == pipe


_SIGNAL_SCRIPT = r'''
import os, signal, sys, time
import tbkernels.mps as mps
# A shell that starts us in the background (CI runners do) leaves SIGINT ignored; an interactive
# Python has the KeyboardInterrupt handler, which is the case under test.
signal.signal(signal.SIGINT, signal.default_int_handler)
d = mps.MpsDaemon(binary=sys.argv[1], check_gpu=False)
mode = sys.argv[2]
if mode == "atexit":
    d.start()
    print(d.pid, d.pipe_dir, flush=True)
    sys.exit(0)          # no stop(): the atexit hook must quit the daemon
with d:
    print(d.pid, d.pipe_dir, flush=True)
    os.kill(os.getpid(), signal.SIGTERM if mode == "sigterm" else signal.SIGINT)
    time.sleep(30)
'''


@pytest.mark.parametrize("mode,rc", [("atexit", 0), ("sigterm", 128 + signal.SIGTERM), ("sigint", -signal.SIGINT)])
def test_daemon_is_stopped_at_exit_and_on_signals(fake_control, tmp_path, mode, rc):
    script = tmp_path / "s.py"
    script.write_text(_SIGNAL_SCRIPT)
    out = subprocess.run([sys.executable, str(script), fake_control, mode], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == rc, out.stderr
    pid, pipe = out.stdout.split()
    assert _dead(int(pid)), f"daemon {pid} still running after {mode}"
    assert not os.path.exists(pipe)


_RUN_SIGNAL_SCRIPT = r'''
import os, sys, tempfile
import tbkernels.mps as mps
tempfile.tempdir = sys.argv[1]           # the run directory is made here, where the test looks
worker = mps.WorkerSpec(name="sleeper", target=sys.argv[2] + ":work")
rep = mps.run_groups([[(worker, 100)]], backend="process", timeout=120)
print("run_groups returned", rep.results["sleeper"].status, flush=True)
'''

_SLEEPER = r'''
import os, sys, time
def work():
    with open(os.path.join(os.path.dirname(__file__), "worker.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
'''


def test_sigterm_during_run_groups_kills_workers_and_removes_the_run_directory(tmp_path):
    """Default SIGTERM (a scheduler's cancel, `timeout`) used to kill the interpreter without
    unwinding: the worker processes lived on (on a GPU: holding their contexts) and the run
    directory stayed in /tmp. Now it exits 143 through run_groups' cleanup."""
    runs = tmp_path / "tmp"
    runs.mkdir()
    (tmp_path / "sleeper.py").write_text(_SLEEPER)
    (tmp_path / "s.py").write_text(_RUN_SIGNAL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "s.py"), str(runs),
                             str(tmp_path / "sleeper.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pidfile = tmp_path / "worker.pid"
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        worker_pid = int(pidfile.read_text())
        assert len(list(runs.iterdir())) == 1            # the run directory, while it runs
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run_groups returned" not in out
    assert _dead(worker_pid), f"worker {worker_pid} outlived the SIGTERM'd run"
    assert list(runs.iterdir()) == [], list(runs.iterdir())


def test_sigterm_guard_leaves_a_program_handler_alone():
    """The guard only replaces the default action: a handler the program installed stays."""
    def mine(signum, frame):
        pass
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with mps_daemon.sigterm_unwinds():
            assert signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with mps_daemon.sigterm_unwinds():
            with mps_daemon.sigterm_unwinds():        # nested: restores what it found
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------- Ray actors
def test_ray_executor_runs_groups_as_actors(no_mps):
    ray = pytest.importorskip("ray", reason="ray is not installed; the ray executor is optional")
    if not hasattr(ray, "remote"):
        pytest.skip(f"'ray' here is not Ray but a directory on sys.path ({list(ray.__path__)}); "
                    f"the ray executor is optional")
    w = sim_workers()
    rep = mps.run_groups([[(w["cnn"], 40), (w["vit"], 60), (mps.crashing_worker("crash"), 10)],
                          [(w["motion"], 100), (mps.hanging_worker("hang", timeout=2.0), 10)]],
                         backend="process", executor="ray")
    assert rep.results["cnn"].ok and rep.results["vit"].ok and rep.results["motion"].ok
    assert rep.results["cnn"].value["quota"] == 40.0
    assert rep.results["crash"].status == "error" and rep.results["hang"].status == "timeout"


def test_ray_executor_missing_says_how_to_get_it(no_mps, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match="pip install ray"):
        mps.run_groups([[(mps.simulated_worker("a", {100: 0.01}), 100)]], backend="process",
                       executor="ray")


def test_ray_executor_refuses_a_stray_ray_directory(no_mps, monkeypatch):
    """Run from /tmp, Ray's own temp dir /tmp/ray imports as an empty namespace package named
    ray: the executor says Ray is missing instead of failing on a missing attribute."""
    import types
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    with pytest.raises(ImportError, match="pip install ray"):
        mps.run_groups([[(mps.simulated_worker("a", {100: 0.01}), 100)]], backend="process",
                       executor="ray")


# --------------------------------------------------------------- real MPS daemon (GPU machines)
@needs_real_mps
def test_real_daemon_starts_and_stops_with_private_dirs():
    with mps.MpsDaemon(device=0) as d:
        st = d.status()
        assert st["running"] and st["pipe_dir"] == d.pipe_dir != "/tmp/nvidia-mps"
        pipe = d.pipe_dir
    assert not d.running and not os.path.exists(pipe)


_MATMUL = r'''
import torch
def make(n=4096, iters=20):
    a = torch.randn(n, n, device="cuda"); b = torch.randn(n, n, device="cuda")
    def step():
        for _ in range(iters):
            c = a @ b
        torch.cuda.synchronize()
        return float(c[0, 0])
    return step
'''


@needs_real_mps
def test_real_quota_changes_measured_runtime(tmp_path):
    # Compute-bound matmuls at 20 % of the SMs must take clearly longer than at 100 %.
    f = tmp_path / "mm.py"
    f.write_text(_MATMUL)
    spec = mps.WorkerSpec("mm", f"{f}:make", factory=True)
    ps = mps.profile_workers([spec], quotas=(20, 100), repeats=3, warmup=1, backend="mps", progress=False)
    assert ps.meta["quota_enforced"] is True
    assert ps["mm"][20.0] > 1.5 * ps["mm"][100.0], dict(ps["mm"])
