"""tbkernels.mps planner: greedy vs exact (issue 5 acceptance), the exact solver against brute
force, interpolation, baselines, JSON round trips and input validation. CPU only, seconds."""
import itertools
import json
import math
import random

import pytest

import tbkernels.mps as mps
from tbkernels.mps.planner import _Model

PROFILES = {
    "cnn": {25: 0.60, 50: 0.36, 75: 0.30, 100: 0.28},
    "vit": {25: 0.90, 50: 0.50, 75: 0.38, 100: 0.33},
    "sharpness": {25: 0.12, 50: 0.10, 100: 0.10},
    "motion": {25: 0.08, 50: 0.07, 100: 0.07},
}


def random_profiles(rng, n_workers):
    """Profiles with runtimes non-increasing in q, from two families: Amdahl with saturation
    (a + b/min(q, s), what real GPU workers look like) and arbitrary non-increasing sequences;
    mixed profiled grids and scales so workers differ by up to ~100x."""
    grids = [[10, 20, 30, 40, 50, 60, 70, 80, 90, 100], [25, 50, 75, 100], [10, 25, 50, 100],
             [20, 40, 60, 80, 100]]
    scale = rng.choice([1.0, 1.0, 5.0])
    out = {}
    for w in range(n_workers):
        qs = rng.choice(grids)
        if rng.random() < 0.5:
            a = rng.uniform(0.0, 1.0) * scale * rng.choice([0.1, 1, 3])
            b = rng.uniform(1, 100) * scale * rng.choice([0.1, 1, 3])
            s = rng.uniform(10, 100)
            ts = [a + b / min(q, s) for q in qs]
        else:
            base = rng.uniform(0.05, 5) * scale
            ts, cur = [], base * rng.uniform(1, 8)
            for _ in qs:
                ts.append(cur)
                cur = max(base, cur * rng.uniform(0.4, 1.0))
        out[f"w{w}"] = dict(zip(qs, ts))
    return out


def check_plan(p, profiles):
    """Every worker exactly once, Eq. 9 in every group, and the reported makespan is Eq. 8."""
    names = [w for g in p.groups for w, _ in g]
    assert sorted(names) == sorted(profiles)
    for g in p.groups:
        assert sum(q for _, q in g) <= 100 + 1e-9
        assert all(0 < q <= 100 for _, q in g)
    assert p.predicted_makespan == pytest.approx(sum(p.group_times), rel=1e-12)
    assert p.predicted_makespan == pytest.approx(mps.predict_makespan(p, profiles, p.interp), rel=1e-9)


# ------------------------------------------------------------------ acceptance: greedy vs exact
@pytest.mark.parametrize("seed,sizes,cases", [(20250101, range(2, 7), 400), (20250102, (7, 8), 100)],
                         ids=["W2-6", "W7-8"])
def test_greedy_within_5_percent_of_exact_and_never_worse_than_serial(seed, sizes, cases):
    rng = random.Random(seed)
    ratios = []
    for _ in range(cases):
        profiles = random_profiles(rng, rng.choice(list(sizes)))
        g = mps.plan(profiles, "greedy")
        e = mps.plan(profiles, "exact")
        s = mps.plan(profiles, "serial")
        check_plan(g, profiles)
        check_plan(e, profiles)
        assert e.predicted_makespan <= g.predicted_makespan * (1 + 1e-9), "exact must be optimal"
        assert g.predicted_makespan <= s.predicted_makespan * (1 + 1e-12), "greedy worse than serial"
        ratios.append(g.predicted_makespan / e.predicted_makespan)
    within = sum(r <= 1.05 for r in ratios) / len(ratios)
    print(f"W in {list(sizes)}: {cases} cases, greedy within 5% of exact in {within:.1%}, "
          f"optimal in {sum(r <= 1 + 1e-9 for r in ratios) / len(ratios):.1%}, worst ratio {max(ratios):.4f}")
    assert within >= 0.95


def test_greedy_never_worse_than_serial_on_noisy_non_monotone_profiles():
    rng = random.Random(5)
    for _ in range(200):
        profiles = {f"w{i}": {q: rng.uniform(0.1, 2.0) for q in (20, 40, 60, 80, 100)}
                    for i in range(rng.randint(1, 6))}
        g = mps.plan(profiles, "greedy")
        check_plan(g, profiles)
        assert g.predicted_makespan <= mps.plan(profiles, "serial").predicted_makespan * (1 + 1e-12)


# ----------------------------------------------------------------- exact solver vs brute force
def _brute_force(profiles, step):
    """Literal enumeration: every set partition x every grid quota tuple per group (Eq. 7-9)."""
    model = _Model(profiles, step, "inv")
    names = model.names

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            for k in range(len(p)):
                yield p[:k] + [[first] + p[k]] + p[k + 1:]
            yield [[first]] + p

    def best_group(group):
        idx = [names.index(w) for w in group]
        best = math.inf
        for combo in itertools.product(*[range(len(model.grid[i])) for i in idx]):
            if sum(model.grid[i][j] for i, j in zip(idx, combo)) <= 100 + 1e-9:
                best = min(best, max(model.times[i][j] for i, j in zip(idx, combo)))
        return best

    return min(sum(best_group(g) for g in p) for p in partitions(names))


@pytest.mark.parametrize("seed", range(12))
def test_exact_equals_brute_force_enumeration(seed):
    rng = random.Random(seed)
    profiles = random_profiles(rng, rng.randint(2, 4))
    e = mps.plan(profiles, "exact", quota_step=25)
    assert e.predicted_makespan == pytest.approx(_brute_force(profiles, 25), rel=1e-12)


def test_known_plan():
    g = mps.plan(PROFILES, "greedy")
    e = mps.plan(PROFILES, "exact")
    assert g.predicted_makespan == pytest.approx(0.54)
    assert e.predicted_makespan == pytest.approx(0.54)
    groups = sorted(sorted(w for w, _ in grp) for grp in g.groups)
    assert groups == [["cnn", "vit"], ["motion", "sharpness"]]
    assert dict(g.groups[0]) == {"cnn": 40.0, "vit": 60.0}  # C_cnn(40) = 0.44 = C_vit(60)
    assert g.method == "greedy" and g.speedup_over(mps.plan(PROFILES, "serial")) == pytest.approx(0.78 / 0.54)


def test_small_and_degenerate_inputs():
    one = mps.plan({"only": {50: 2.0, 100: 1.0}})
    assert one.groups == [[("only", 100.0)]] and one.predicted_makespan == 1.0
    # Nobody can run below 60 %: no two workers fit together, so the plan is the serial one.
    wide = {f"w{i}": {60: 1.0 + i, 100: 0.5 + i} for i in range(4)}
    g = mps.plan(wide)
    assert all(len(grp) == 1 for grp in g.groups)
    assert g.predicted_makespan == pytest.approx(mps.plan(wide, "serial").predicted_makespan)
    # Flat profiles (e.g. profiled without MPS): everything fits in one group at its smallest quota.
    flat = {f"w{i}": {25: 1.0, 100: 1.0} for i in range(4)}
    g = mps.plan(flat)
    assert len(g.groups) == 1 and g.predicted_makespan == 1.0


def test_slack_is_handed_out_without_changing_the_makespan():
    # One worker needs 50 % to meet the deadline of the other, which saturates at 25 %: the 25 %
    # left over goes to somebody, the predicted makespan stays the group's optimum.
    p = mps.plan({"a": {25: 4.0, 50: 2.0, 100: 1.0}, "b": {25: 2.0, 100: 2.0}}, "exact")
    assert p.predicted_makespan == 2.0
    assert sum(q for _, q in p.groups[0]) == 100


def test_non_monotone_profile_uses_the_quota_that_is_fastest():
    # A noisy profile where 50 % measured faster than 75 %: the planner may use 50 % for it.
    p = mps.plan({"noisy": {25: 3.0, 50: 1.0, 75: 1.5, 100: 1.2}, "other": {50: 1.0, 100: 0.9}}, "exact")
    assert p.predicted_makespan == pytest.approx(1.0)
    assert dict(p.groups[0]) == {"noisy": 50.0, "other": 50.0}


# ----------------------------------------------------------------------------------- baselines
def test_serial_and_concurrent_baselines():
    s = mps.plan(PROFILES, "serial")
    assert s.predicted_makespan == pytest.approx(0.28 + 0.33 + 0.10 + 0.07)
    assert all(grp == [(grp[0][0], 100.0)] for grp in s.groups)
    c = mps.plan(PROFILES, "concurrent")  # time-sliced without MPS: no kernel overlap
    assert c.predicted_makespan == pytest.approx(s.predicted_makespan)
    assert len(c.groups) == 1 and all(q == 100.0 for _, q in c.groups[0])
    assert any("timeslice" in n for n in c.notes)


def test_concurrent_share_model_is_processor_sharing():
    # Two identical perfectly scaling workers C(q) = 100/q: at 50 % each both take 2 s, same
    # total work as running one after the other at 100 %.
    prof = {"a": {10: 10.0, 50: 2.0, 100: 1.0}, "b": {10: 10.0, 50: 2.0, 100: 1.0}}
    c = mps.plan(prof, "concurrent", concurrent_model="share")
    assert c.predicted_makespan == pytest.approx(2.0)
    # Unequal: a needs 1 s of full GPU, b 3 s. Together at 50 %: a done at 2 s, b has 1/3 done...
    prof = {"a": {10: 10.0, 50: 2.0, 100: 1.0}, "b": {10: 30.0, 50: 6.0, 100: 3.0}}
    c = mps.plan(prof, "concurrent", concurrent_model="share")
    assert c.predicted_makespan == pytest.approx(2.0 + 3.0 * (1 - 2.0 / 6.0))
    # Below the smallest profiled quota the share model extrapolates and says so.
    c = mps.plan({f"w{i}": {50: 2.0, 100: 1.0} for i in range(4)}, "concurrent", concurrent_model="share")
    assert any("extrapolated" in n for n in c.notes)
    plans = mps.compare(PROFILES)
    assert set(plans) == {"greedy", "exact", "serial", "concurrent", "concurrent_share"}


# ------------------------------------------------------------------------------- interpolation
def test_interpolation_inverse_and_linear():
    # A worker of the form a + b/q is reproduced exactly between two profiled points by "inv".
    a, b = 0.2, 30.0
    table = {20: a + b / 20, 100: a + b / 100}
    curve = mps.RuntimeCurve(table)
    for q in (20, 33, 50, 77.5, 100):
        assert curve(q) == pytest.approx(a + b / q, rel=1e-12)
    lin = mps.RuntimeCurve(table, interp="linear")
    assert lin(60) == pytest.approx((table[20] + table[100]) / 2)
    assert lin(60) > curve(60)  # linear-in-q overestimates a convex 1/q curve
    assert mps.interpolate(table, 20) == table[20]  # exact at profiled points


def test_interpolation_bounds():
    curve = mps.RuntimeCurve({30: 2.0, 80: 1.0})
    assert curve(80) == 1.0 and curve(95) == 1.0 and curve(100) == 1.0  # flat above the largest
    with pytest.raises(ValueError, match="below the smallest profiled quota"):
        curve(25)
    with pytest.raises(ValueError, match="outside"):
        curve(0)
    with pytest.raises(ValueError, match="outside"):
        curve(101)
    with pytest.raises(ValueError, match="interp"):
        mps.RuntimeCurve({30: 2.0}, interp="cubic")
    # The planner never assigns a quota below a worker's smallest profiled one.
    p = mps.plan({"a": {30: 2.0, 100: 1.0}, "b": {10: 5.0, 100: 1.0}}, "exact")
    assert dict(p.quotas())["a"] >= 30


# -------------------------------------------------------------------------------- JSON round trip
def test_profiles_json_round_trip(tmp_path):
    ps = mps.ProfileSet(PROFILES, meta={"device": {"name": "test-gpu", "kind": "cuda"},
                                        "versions": {"torch": "x"}},
                        samples={"cnn": {25: [0.6, 0.61]}},
                        workers={"cnn": {"target": "m:f", "kwargs": {"batch": 2}, "factory": True}})
    path = tmp_path / "profiles.json"
    ps.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "tbkernels.mps.profiles" and raw["version"] == 1
    back = mps.load_profiles(path)
    assert dict(back) == {w: {float(q): t for q, t in tab.items()} for w, tab in PROFILES.items()}
    assert back.meta["device"]["name"] == "test-gpu"
    assert back.samples["cnn"][25.0] == [0.6, 0.61]
    assert back.workers["cnn"]["target"] == "m:f"
    assert mps.plan(back).predicted_makespan == pytest.approx(mps.plan(PROFILES).predicted_makespan)
    # A hand-written bare mapping with string keys also loads.
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"a": {"50": 1.0, "100": 0.5}}))
    assert dict(mps.load_profiles(bare)) == {"a": {50.0: 1.0, 100.0: 0.5}}
    # save_profiles records the environment.
    mps.save_profiles(PROFILES, tmp_path / "p2.json")
    meta = mps.load_profiles(tmp_path / "p2.json").meta
    assert "torch" in meta["versions"] and "device" in meta


def test_profiles_json_keeps_every_quota_exactly(tmp_path):
    """Quota keys are written as the shortest text that reads back as the same float: six
    significant digits (the old "%g") merged 33.33331 and 33.33332 into one point, silently,
    and turned 100/3 into 33.3333. Whole quotas stay "25", not "25.0"."""
    ps = mps.ProfileSet({"x": {33.33331: 1.0, 33.33332: 0.9, 100: 0.4},
                         "a": {100 / 3: 1.0, 200 / 3: 0.6, 25: 0.8, 100: 0.5}},
                        samples={"a": {100 / 3: [1.0, 1.01]}})
    ps.save(tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    assert "25" in raw["workers"]["a"]["runtimes"]
    back = mps.load_profiles(tmp_path / "p.json")
    assert dict(back) == {"x": {33.33331: 1.0, 33.33332: 0.9, 100.0: 0.4},
                          "a": {100 / 3: 1.0, 200 / 3: 0.6, 25.0: 0.8, 100.0: 0.5}}
    assert back.samples["a"] == {100 / 3: [1.0, 1.01]}


def test_plan_json_round_trip(tmp_path):
    p = mps.plan(PROFILES, "exact")
    p.save(tmp_path / "plan.json")
    back = mps.Plan.load(tmp_path / "plan.json")
    assert back == p
    with pytest.raises(ValueError, match="not a plan document"):
        mps.Plan.from_dict({"format": "something else"})


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("profiles,exc,match", [
    ({}, ValueError, "empty"),
    ({"a": {}}, ValueError, r"profiles\['a'\] is empty"),
    ([("a", {50: 1.0})], TypeError, "must be a mapping"),
    ({"a": [1.0]}, TypeError, r"profiles\['a'\] must be a mapping"),
    ({3: {50: 1.0}}, TypeError, "worker name"),
    ({"": {50: 1.0}}, ValueError, "must not be empty"),
    ({"a": {0: 1.0}}, ValueError, r"outside \(0, 100\]"),
    ({"a": {-5: 1.0}}, ValueError, r"outside \(0, 100\]"),
    ({"a": {101: 1.0}}, ValueError, r"outside \(0, 100\]"),
    ({"a": {float("nan"): 1.0}}, ValueError, r"outside \(0, 100\]"),
    ({"a": {"half": 1.0}}, TypeError, "not a number"),
    ({"a": {True: 1.0}}, TypeError, "bool"),
    ({"a": {None: 1.0}}, TypeError, "expected a number"),
    ({"a": {50: 0.0}}, ValueError, "positive"),
    ({"a": {50: -1.0}}, ValueError, "positive"),
    ({"a": {50: float("inf")}}, ValueError, "positive, finite"),
    ({"a": {50: float("nan")}}, ValueError, "positive, finite"),
    ({"a": {50: "fast"}}, TypeError, "runtime 'fast'"),
    ({"a": {50: None}}, TypeError, "runtime None"),
    ({"a": {50: 1.0, "50": 2.0}}, ValueError, "appears twice"),
])
def test_validation_errors(profiles, exc, match):
    with pytest.raises(exc, match=match):
        mps.validate_profiles(profiles)
    with pytest.raises(exc, match=match):
        mps.plan(profiles)


def test_plan_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        mps.plan(PROFILES, "random")
    with pytest.raises(ValueError, match="quota_step"):
        mps.plan(PROFILES, quota_step=0)
    with pytest.raises(ValueError, match="concurrent model"):
        mps.plan(PROFILES, "concurrent", concurrent_model="magic")
    with pytest.raises(ValueError, match="max_exact_workers"):
        mps.plan({f"w{i}": {100: 1.0} for i in range(5)}, "exact", max_exact_workers=4)
    with pytest.raises(ValueError, match=r"summing to 120 % > 100 % \(Eq. 9\)"):
        mps.predict_makespan([[("cnn", 60), ("vit", 60)], [("sharpness", 100)], [("motion", 100)]], PROFILES)
    with pytest.raises(ValueError, match="not in any group"):
        mps.predict_makespan([[("cnn", 100)]], PROFILES)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        mps.load_profiles(bad)
    bad.write_text(json.dumps({"format": "tbkernels.mps.profiles", "version": 99, "workers": {}}))
    with pytest.raises(ValueError, match="version 99"):
        mps.load_profiles(bad)
