"""Group-and-quota planning for co-running reward workers (TeleBoost seed 000, §6.1.2, Eq. 7-9).

Model (the report's, with percentages instead of fractions): partition the workers W into groups
p_1..p_G that run one after another; the workers of a group run concurrently, worker w limited to
q_w percent of the GPU's threads. Then

    T_g = max_{w in p_g} C_w(q_w)                   (Eq. 7)
    T_reward = sum_g T_g                            (Eq. 8)   -- minimised
    sum_{w in p_g} q_w <= 100  for every group g    (Eq. 9)

Our reading where the report is vague (it only says "a lightweight greedy search guided by
per-worker scaling profiles ... jointly determines worker grouping and quota split"):

* Quotas live on a grid: multiples of ``quota_step`` percent, plus every profiled quota, plus
  100, restricted per worker to [smallest profiled quota, 100] (no downward extrapolation).
* For a fixed group the quota split is solved exactly, not searched: for a deadline T each worker
  needs the smallest grid quota with C_w(q) <= T; T is feasible when those minima sum to <= 100,
  feasibility is monotone in T, and the optimum T* is one of the finitely many C_w(q) values, so a
  binary search over them finds it. Quota left over is then handed out (never making a worker
  slower) so workers get slack against profiling noise; it does not change the predicted makespan.
* Greedy = agglomerative merging from the serial plan (every worker alone): repeatedly merge the
  two groups whose merge lowers Eq. 8 the most, until no merge helps; then a local search that
  moves one worker to another group (or out alone) or swaps two workers while that lowers Eq. 8.
  Every accepted step lowers the makespan, so greedy is never worse than serial (checked anyway).
* Exact = dynamic programming over subsets (best(S) = min over the group g containing S's lowest
  worker of T*(g) + best(S \\ g)), i.e. all set partitions with the exact per-group split on the
  same grid; groups whose minimum quotas already exceed 100 % are pruned. O(3^W), fine to W ~ 12.

Baselines: ``serial`` (each worker alone at 100 %) and ``concurrent`` (all workers at once with no
quota, which violates Eq. 9, so it needs its own model -- see :func:`concurrent_makespan`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .profiles import INTERP_MODES, RuntimeCurve, _write_json, validate_profiles

PLAN_FORMAT = "tbkernels.mps.plan"
FORMAT_VERSION = 1
METHODS = ("greedy", "exact", "serial", "concurrent")
CONCURRENT_MODELS = ("timeslice", "share")
_EPS = 1e-12  # relative: a merge/move must gain more than float noise to count as an improvement


# ------------------------------------------------------------------------------------------ Plan
@dataclass
class Plan:
    """Sequential groups of concurrently running ``(worker, quota_percent)`` and the makespan
    predicted by Eq. 8 (for ``concurrent``, by the contention model named in ``notes``)."""

    method: str
    groups: list[list[tuple[str, float]]]
    predicted_makespan: float
    group_times: list[float]
    quota_step: float | None = None
    interp: str = "inv"
    notes: list[str] = field(default_factory=list)

    @property
    def workers(self) -> list[str]:
        return [w for g in self.groups for w, _ in g]

    def quotas(self) -> dict[str, float]:
        return {w: q for g in self.groups for w, q in g}

    def speedup_over(self, other: "Plan") -> float:
        return other.predicted_makespan / self.predicted_makespan

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": FORMAT_VERSION, "method": self.method,
                "predicted_makespan": self.predicted_makespan, "group_times": self.group_times,
                "groups": [[[w, q] for w, q in g] for g in self.groups],
                "quota_step": self.quota_step, "interp": self.interp, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a plan document (format {data.get('format') if isinstance(data, Mapping) else None!r}, "
                             f"expected {PLAN_FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"plan document version {data.get('version')!r} is not supported")
        groups = [[(str(w), float(q)) for w, q in g] for g in data["groups"]]
        return cls(method=data["method"], groups=groups,
                   predicted_makespan=float(data["predicted_makespan"]),
                   group_times=[float(t) for t in data["group_times"]],
                   quota_step=data.get("quota_step"), interp=data.get("interp", "inv"),
                   notes=list(data.get("notes", [])))

    def save(self, path) -> None:
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __str__(self) -> str:
        lines = [f"{self.method} plan: predicted makespan {self.predicted_makespan:.4g} s "
                 f"in {len(self.groups)} group(s)"]
        for i, (g, t) in enumerate(zip(self.groups, self.group_times)):
            members = ", ".join(f"{w}@{_fmt_q(q)}%" for w, q in g)
            total = sum(q for _, q in g)
            lines.append(f"  group {i + 1}: {t:.4g} s  [{members}]  (sum q = {_fmt_q(total)}%)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt_q(q: float) -> str:
    return f"{q:g}" if abs(q - round(q)) > 1e-9 else str(int(round(q)))


# ------------------------------------------------------------------------------------- the model
class _Model:
    """Profiles on the quota grid, with cached exact per-group quota splits."""

    def __init__(self, profiles, quota_step: float, interp: str):
        if interp not in INTERP_MODES:
            raise ValueError(f"interp must be one of {INTERP_MODES}, got {interp!r}")
        if isinstance(quota_step, bool) or not isinstance(quota_step, (int, float)) or \
                not math.isfinite(quota_step) or not 0 < quota_step <= 100:
            raise ValueError(f"quota_step must be a number in (0, 100] (percent), got {quota_step!r}")
        clean = validate_profiles(profiles)
        self.names = list(clean)
        self.curves = [RuntimeCurve(clean[w], interp=interp, name=w) for w in self.names]
        self.quota_step = float(quota_step)
        self.interp = interp
        # Per worker: grid quotas ascending, runtimes there, and the running minimum of runtimes
        # (non-increasing), used to find the smallest quota meeting a deadline even when a measured
        # profile is not monotone (noise): the smallest q with C(q) <= T is the first index where
        # the running minimum drops to <= T.
        self.grid, self.times, self.envelope = [], [], []
        n_steps = int(math.floor(100.0 / self.quota_step + 1e-9))
        for c in self.curves:
            qs = {round(k * self.quota_step, 9) for k in range(1, n_steps + 1)}
            qs |= set(c.quotas) | {100.0}
            qs = sorted(q for q in qs if c.min_quota - 1e-9 <= q <= 100.0)
            ts = [c(q) for q in qs]
            env, m = [], math.inf
            for t in ts:
                m = min(m, t)
                env.append(m)
            self.grid.append(qs)
            self.times.append(ts)
            self.envelope.append(env)
        self._cache: dict[int, tuple[float, tuple[float, ...]]] = {}

    @property
    def n(self) -> int:
        return len(self.names)

    def serial_time(self, i: int) -> float:
        return self.curves[i](100.0)

    def _min_index(self, i: int, deadline: float) -> int | None:
        env = self.envelope[i]
        # env is non-increasing: find the first position with env <= deadline.
        lo, hi = 0, len(env)
        while lo < hi:
            mid = (lo + hi) // 2
            if env[mid] <= deadline:
                hi = mid
            else:
                lo = mid + 1
        return lo if lo < len(env) else None

    def _need(self, members: Sequence[int], deadline: float):
        idx, total = [], 0.0
        for i in members:
            j = self._min_index(i, deadline)
            if j is None:
                return None, math.inf
            idx.append(j)
            total += self.grid[i][j]
        return idx, total

    def group(self, mask: int) -> tuple[float, tuple[float, ...]]:
        """(T*, quotas) for the group ``mask`` (bit i = worker i); T* = inf when infeasible."""
        hit = self._cache.get(mask)
        if hit is not None:
            return hit
        members = [i for i in range(self.n) if mask >> i & 1]
        if sum(self.grid[i][0] for i in members) > 100.0 + 1e-9:
            res = (math.inf, ())  # pruned: even the smallest quotas do not fit (Eq. 9)
        else:
            cands = sorted({t for i in members for t in self.times[i]})
            lo, hi = 0, len(cands) - 1  # cands[hi] is always feasible: every worker at its minimum
            while lo < hi:
                mid = (lo + hi) // 2
                if self._need(members, cands[mid])[1] <= 100.0 + 1e-9:
                    hi = mid
                else:
                    lo = mid + 1
            t_star = cands[lo]
            idx, _ = self._need(members, t_star)
            idx = self._spread_slack(members, idx)
            res = (t_star, tuple(self.grid[i][j] for i, j in zip(members, idx)))
        self._cache[mask] = res
        return res

    def _spread_slack(self, members, idx):
        # Hand unused quota to the currently slowest worker, one grid step at a time, but only to a
        # quota where its profiled runtime is no worse: more SMs than the plan needs costs nothing
        # under Eq. 7 and absorbs profiling error at run time.
        idx = list(idx)
        used = sum(self.grid[i][j] for i, j in zip(members, idx))
        while True:
            order = sorted(range(len(members)), key=lambda k: -self.times[members[k]][idx[k]])
            for k in order:
                i, j = members[k], idx[k]
                up = next((j2 for j2 in range(j + 1, len(self.grid[i]))
                           if self.times[i][j2] <= self.times[i][j]), None)
                if up is not None and used - self.grid[i][j] + self.grid[i][up] <= 100.0 + 1e-9:
                    used += self.grid[i][up] - self.grid[i][j]
                    idx[k] = up
                    break
            else:
                return idx

    def cost(self, groups: Sequence[int]) -> float:
        return sum(self.group(m)[0] for m in groups)

    def to_plan(self, method: str, masks: Sequence[int], notes=()) -> Plan:
        rows = []
        for m in masks:
            t, qs = self.group(m)
            members = [self.names[i] for i in range(self.n) if m >> i & 1]
            rows.append((t, list(zip(members, qs))))
        # Order does not change Eq. 8; longest group first keeps printed plans stable and puts the
        # group most likely to overrun where its overrun is noticed earliest.
        rows.sort(key=lambda r: (-r[0], [w for w, _ in r[1]]))
        return Plan(method=method, groups=[g for _, g in rows],
                    predicted_makespan=sum(t for t, _ in rows), group_times=[t for t, _ in rows],
                    quota_step=self.quota_step, interp=self.interp, notes=list(notes))


# ------------------------------------------------------------------------------------ algorithms
def _greedy_masks(model: _Model, refine: bool, max_rounds: int) -> list[int]:
    """Best of two greedy constructions, each followed by the local search (if ``refine``)."""
    best = None
    for build in (_merge_start, _insertion_start):
        groups = build(model)
        if refine:
            groups = _local_search(model, groups, max_rounds)
        if best is None or model.cost(groups) < model.cost(best) * (1 - _EPS):
            best = groups
    return best


def _insertion_start(model: _Model) -> list[int]:
    # Longest-first insertion (as in LPT scheduling): take workers by decreasing serial runtime and
    # put each where it raises Eq. 8 least -- an existing group or a new one of its own. Long
    # workers then anchor the groups and short ones fill their spare quota.
    order = sorted(range(model.n), key=lambda i: -model.serial_time(i))
    groups: list[int] = []
    for i in order:
        bit = 1 << i
        best_inc, best_k = model.group(bit)[0], None
        for k, g in enumerate(groups):
            inc = model.group(g | bit)[0] - model.group(g)[0]
            if inc < best_inc:
                best_inc, best_k = inc, k
        if best_k is None:
            groups.append(bit)
        else:
            groups[best_k] |= bit
    return groups


def _merge_start(model: _Model) -> list[int]:
    groups = [1 << i for i in range(model.n)]  # the serial plan
    # Agglomerative phase: merge the pair with the largest reduction of Eq. 8.
    while len(groups) > 1:
        best, best_pair = 0.0, None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                gain = (model.group(groups[a])[0] + model.group(groups[b])[0]
                        - model.group(groups[a] | groups[b])[0])
                if gain > best:
                    best, best_pair = gain, (a, b)
        if best_pair is None or best <= _EPS * model.cost(groups):
            break
        a, b = best_pair
        groups[a] |= groups[b]
        del groups[b]
    return groups


def _local_search(model: _Model, groups: list[int], max_rounds: int) -> list[int]:
    # Best-improvement local search over: moving one worker to another group or out alone,
    # swapping two workers between groups, and merging two groups. The construction phase cannot
    # undo its early choices; these moves repair the cases where an early merge grabbed a worker
    # that fits better elsewhere. Each accepted move lowers Eq. 8, so it terminates.
    for _ in range(max_rounds):
        cur = model.cost(groups)
        best_delta, best_groups = -_EPS * cur, None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = (model.group(groups[a] | groups[b])[0] - model.group(groups[a])[0]
                     - model.group(groups[b])[0])
                if d < best_delta:
                    best_delta = d
                    best_groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [groups[a] | groups[b]]
        for a, ga in enumerate(groups):
            for i in range(model.n):
                bit = 1 << i
                if not ga & bit:
                    continue
                rest_a = ga & ~bit
                base = model.group(ga)[0]
                t_rest_a = model.group(rest_a)[0] if rest_a else 0.0
                # move i out alone
                if rest_a:
                    d = t_rest_a + model.group(bit)[0] - base
                    if d < best_delta:
                        best_delta = d
                        best_groups = [g for k, g in enumerate(groups) if k != a] + [rest_a, bit]
                for b, gb in enumerate(groups):
                    if b == a:
                        continue
                    tb = model.group(gb)[0]
                    d = t_rest_a + model.group(gb | bit)[0] - base - tb
                    if d < best_delta:
                        best_delta = d
                        new = [g for k, g in enumerate(groups) if k not in (a, b)] + [gb | bit]
                        best_groups = new + ([rest_a] if rest_a else [])
                    if b < a:
                        continue
                    for j in range(model.n):  # swap i (in a) with j (in b)
                        bj = 1 << j
                        if not gb & bj:
                            continue
                        na, nb = rest_a | bj, (gb & ~bj) | bit
                        d = model.group(na)[0] + model.group(nb)[0] - base - tb
                        if d < best_delta:
                            best_delta = d
                            best_groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [na, nb]
        if best_groups is None:
            break
        groups = best_groups
    return groups


def _exact_masks(model: _Model) -> list[int]:
    n = model.n
    full = (1 << n) - 1
    best = [math.inf] * (full + 1)
    choice = [0] * (full + 1)
    best[0] = 0.0
    for mask in range(1, full + 1):
        low = mask & -mask
        rest = mask ^ low
        # Enumerate the groups g ⊆ mask that contain mask's lowest worker: g = low | sub, sub ⊆ rest.
        sub = rest
        b, c = math.inf, 0
        while True:
            g = low | sub
            t = model.group(g)[0]
            if t < b:  # pruning: a group alone already at least as slow as the best cannot win
                v = t + best[mask ^ g]
                if v < b:
                    b, c = v, g
            if sub == 0:
                break
            sub = (sub - 1) & rest
        best[mask], choice[mask] = b, c
    masks, m = [], full
    while m:
        masks.append(choice[m])
        m ^= choice[m]
    return masks


def concurrent_makespan(model: _Model, how: str = "timeslice") -> tuple[float, list[str]]:
    """Predicted makespan of running all workers at once with no quotas (violates Eq. 9).

    ``timeslice`` (default; what "concurrent without MPS" is): separate CUDA processes without MPS
    get the GPU in time slices, so their kernels never overlap and the prediction is the serial sum
    sum_w C_w(100). Only CPU-side gaps (data preparation, Python, launch latency) overlap, which
    profiles cannot see, so the measured value is at most this.

    ``share`` (MPS with no quotas, optimistic): processor sharing -- while n workers are running each
    progresses at rate 1/C_w(100/n); when one finishes the others' share grows. Where 100/n is
    below a worker's smallest profiled quota q_min we extrapolate C(s) = C(q_min) * q_min / s
    (perfect scaling, an upper bound for a worker of the form a + b/q) and say so in the notes.
    Real unpartitioned sharing is not fair (one client's large kernels take all SMs), which is
    exactly what quotas prevent, so this is a lower bound for that configuration.
    """
    if how not in CONCURRENT_MODELS:
        raise ValueError(f"concurrent model must be one of {CONCURRENT_MODELS}, got {how!r}")
    if how == "timeslice":
        return sum(model.serial_time(i) for i in range(model.n)), [
            "model 'timeslice': without MPS the processes' kernels time-slice the GPU, so the "
            "prediction is the serial sum; only CPU-side gaps can overlap (not in the profiles)"]
    notes = ["model 'share': MPS without quotas as fair processor sharing at 100/n % each "
             "(optimistic: real contention is not fair)"]
    remaining = {i: 1.0 for i in range(model.n)}
    now, extrapolated = 0.0, set()

    def rate(i, share):
        c = model.curves[i]
        if share < c.min_quota - 1e-9:
            extrapolated.add(model.names[i])
            return 1.0 / (c(c.min_quota) * c.min_quota / share)
        return 1.0 / c(share)

    while remaining:
        share = 100.0 / len(remaining)
        rates = {i: rate(i, share) for i in remaining}
        dt = min(remaining[i] / rates[i] for i in remaining)
        now += dt
        for i in list(remaining):
            remaining[i] -= rates[i] * dt
            if remaining[i] <= 1e-12:
                del remaining[i]
    if extrapolated:
        notes.append(f"equal share below the smallest profiled quota for {sorted(extrapolated)}: "
                     "runtime extrapolated as C(q_min) * q_min / share")
    return now, notes


# ------------------------------------------------------------------------------------ public API
def plan(profiles, method: str = "greedy", *, quota_step: float = 5.0, interp: str = "inv",
         refine: bool = True, max_rounds: int = 1000, max_exact_workers: int = 12,
         concurrent_model: str = "timeslice") -> Plan:
    """Plan sequential groups of concurrently running workers and their MPS quotas.

    Parameters
    ----------
    profiles : mapping ``{worker: {quota_percent: seconds}}`` or a :class:`ProfileSet`
        Runtime of one call of each worker at each profiled quota (percent in (0, 100]).
    method : ``"greedy"`` | ``"exact"`` | ``"serial"`` | ``"concurrent"``
        ``greedy``: the report's lightweight search (merging + local moves, module docstring).
        ``exact``: optimum of Eq. 8 under Eq. 9 on the same quota grid (W <= ``max_exact_workers``).
        ``serial``: every worker alone at 100 %. ``concurrent``: all together at 100 % (baseline;
        its makespan comes from ``concurrent_model``, see :func:`concurrent_makespan`).
    quota_step : float
        Grid spacing in percent; the grid also holds every profiled quota and 100.
    interp : ``"inv"`` | ``"linear"``
        Interpolation between profiled quotas: linear in 1/q (default) or in q.
    refine : bool
        Greedy only: run the move/swap local search after merging.

    Returns
    -------
    Plan
        ``groups`` (each a list of ``(worker, quota_percent)``), ``predicted_makespan`` (seconds),
        ``group_times``, ``method`` and ``notes``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model = _Model(profiles, quota_step, interp)
    if method == "serial":
        # Built directly rather than through the group solver: serial means 100 % each, and on a
        # noisy (non-monotone) profile C(100) is what that costs, not the profile's minimum.
        rows = sorted(((model.serial_time(i), w) for i, w in enumerate(model.names)),
                      key=lambda r: (-r[0], r[1]))
        return Plan(method="serial", groups=[[(w, 100.0)] for _, w in rows],
                    predicted_makespan=sum(t for t, _ in rows), group_times=[t for t, _ in rows],
                    quota_step=model.quota_step, interp=interp)
    if method == "concurrent":
        t, notes = concurrent_makespan(model, concurrent_model)
        return Plan(method="concurrent", groups=[[(w, 100.0) for w in model.names]],
                    predicted_makespan=t, group_times=[t], quota_step=model.quota_step,
                    interp=interp, notes=notes + ["all workers at 100 %: Eq. 9 does not hold; this "
                                                  "is a baseline, not a valid MPS plan"])
    if method == "exact":
        if model.n > max_exact_workers:
            raise ValueError(f"method='exact' enumerates O(3^W) groupings; W={model.n} exceeds "
                             f"max_exact_workers={max_exact_workers} (raise it knowingly, or use greedy)")
        return model.to_plan("exact", _exact_masks(model))
    masks = _greedy_masks(model, refine, max_rounds)
    serial_cost = sum(model.serial_time(i) for i in range(model.n))
    if model.cost(masks) > serial_cost * (1 + 1e-12):
        # Cannot happen (greedy starts from serial and only accepts improvements); kept as a guard
        # so a future change to the search cannot silently make plans worse than doing nothing.
        masks = [1 << i for i in range(model.n)]
        return model.to_plan("greedy", masks, notes=["greedy was worse than serial; fell back to serial"])
    return model.to_plan("greedy", masks)


def compare(profiles, *, quota_step: float = 5.0, interp: str = "inv",
            max_exact_workers: int = 12) -> dict[str, Plan]:
    """All plans side by side: greedy, exact (when W allows), serial, and both concurrent models
    (``concurrent`` = time-sliced, no MPS; ``concurrent_share`` = MPS without quotas)."""
    clean = validate_profiles(profiles)
    out = {"greedy": plan(clean, "greedy", quota_step=quota_step, interp=interp)}
    if len(clean) <= max_exact_workers:
        out["exact"] = plan(clean, "exact", quota_step=quota_step, interp=interp,
                            max_exact_workers=max_exact_workers)
    out["serial"] = plan(clean, "serial", quota_step=quota_step, interp=interp)
    out["concurrent"] = plan(clean, "concurrent", quota_step=quota_step, interp=interp)
    share = plan(clean, "concurrent", quota_step=quota_step, interp=interp, concurrent_model="share")
    share.method = "concurrent_share"
    out["concurrent_share"] = share
    return out


def predict_makespan(plan_or_groups, profiles, interp: str = "inv") -> float:
    """Eq. 8 for a given grouping (a :class:`Plan` or a list of groups of ``(worker, quota)``),
    e.g. a hand-edited plan. Checks Eq. 9 and that every worker appears exactly once."""
    groups = plan_or_groups.groups if isinstance(plan_or_groups, Plan) else plan_or_groups
    clean = validate_profiles(profiles)
    curves = {w: RuntimeCurve(t, interp=interp, name=w) for w, t in clean.items()}
    seen: set[str] = set()
    total = 0.0
    for gi, g in enumerate(groups):
        if not g:
            raise ValueError(f"group {gi} is empty")
        qsum = sum(q for _, q in g)
        if qsum > 100.0 + 1e-9:
            raise ValueError(f"group {gi} has quotas summing to {qsum:g} % > 100 % (Eq. 9)")
        times = []
        for w, q in g:
            if w not in curves:
                raise ValueError(f"group {gi}: worker {w!r} has no profile")
            if w in seen:
                raise ValueError(f"worker {w!r} appears in more than one group")
            seen.add(w)
            times.append(curves[w](q))
        total += max(times)
    missing = set(curves) - seen
    if missing:
        raise ValueError(f"workers {sorted(missing)} are profiled but not in any group")
    return total
