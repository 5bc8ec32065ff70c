"""One long-format CSV for every benchmark of the repo (DESIGN.md, "Performance method").

Each row is one number: ``op, backend, shape, dtype, metric, value, device, commit`` plus
``timestamp`` (UTC start of the pytest session) and ``command`` (how it was produced). Long format
keeps the file appendable across ops, machines and commits without schema changes; plots and
tables pivot it.

Speed claims are ratios taken inside one session (``speedup_vs_<baseline>``,
``ratio_vs_empty_launch``), never across files: two runs on a shared machine differ by more than
most of the effects measured here.

Where rows go: the scripts (``bench_flow_grpo.py``, ``dpo_memory*.py``) append to ``csv_path()``,
the committed ``results/results.csv`` or ``$TBK_RESULTS_CSV``; a timed ``pytest benchmarks``
session appends to ``session_csv_path()``, the git-ignored ``results/local.csv`` unless a file is
named (``--results-csv PATH`` or ``$TBK_RESULTS_CSV``). Rows from elsewhere (a GPU machine's
``results.csv``, ``local.csv``) join the committed file with

    python benchmarks/results.py merge SRC.csv [DST.csv]      # DST: results/results.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

COLUMNS = ("op", "backend", "shape", "dtype", "metric", "value", "device", "commit",
           "timestamp", "command")
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CSV = BENCH_DIR / "results" / "results.csv"   # committed
LOCAL_CSV = BENCH_DIR / "results" / "local.csv"       # git-ignored: pytest sessions by default
TBKERNELS_PREFIX = "tbkernels"
EMPTY_LAUNCH_OP = "empty_launch"
# Benchmarks run where a trainer would: on the GPU when there is one.
BENCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def csv_path() -> Path:
    """Where the benchmark scripts append: ``$TBK_RESULTS_CSV``, else the committed file."""
    return Path(os.environ.get("TBK_RESULTS_CSV") or DEFAULT_CSV)


def session_csv_path(explicit: str | os.PathLike | None = None) -> Path:
    """Where a timed ``pytest benchmarks`` session appends: the file named by ``--results-csv``
    (``explicit``) or ``$TBK_RESULTS_CSV``, else the git-ignored ``results/local.csv``, so that a
    plain run never adds rows to the committed file by accident."""
    return Path(explicit or os.environ.get("TBK_RESULTS_CSV") or LOCAL_CSV)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The hardware a row was measured on: GPU name, or CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "meta":
        return "meta (tensor-liveness model, no hardware)"
    # torch's thread count, not the core count: it is what the kernels actually ran on.
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"


def _git(*args: str) -> str:
    root = str(BENCH_DIR.parent)
    # safe.directory: a checkout copied onto a GPU box is often owned by another uid, and git then
    # refuses to read it. --no-optional-locks: never take index.lock while others use the tree.
    cmd = ["git", "-c", f"safe.directory={root}", "--no-optional-locks", "-C", root, *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20).stdout


def git_commit() -> str:
    """``$TBK_COMMIT`` verbatim when set (a copy of the checkout without .git, e.g. on a lent GPU
    machine: set it to the short sha where the copy was made); else short HEAD, with ``-dirty``
    when tracked files differ from it; ``unknown`` without git. Results (benchmarks/results/) do
    not count: rows appended by one run do not make the next run's code dirty."""
    if os.environ.get("TBK_COMMIT"):
        return os.environ["TBK_COMMIT"]
    try:
        head = _git("rev-parse", "--short", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)benchmarks/results").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


class CpuMeter:
    """How much CPU other processes took while we ran, from /proc/stat and os.times().

    On a small shared machine a neighbour's busy core stalls every multi-threaded parallel region
    (a worker waits a scheduler tick): medians then measure the neighbour. This number says
    whether that happened. None where /proc/stat does not exist.
    """

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: steal is a neighbour VM's time.
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:4])
        return busy, own, time.monotonic()

    def others_pct(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1)) * 100


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Recorder:
    """Collects rows during a session; derived ratios and the CSV write happen at its end.

    ``enabled`` is False under ``--benchmark-disable`` (a smoke run: bodies run once, untimed),
    and then every ``add`` is dropped, so a smoke run never pollutes the results file.
    """
    enabled: bool
    device: str
    commit: str
    command: str
    timestamp: str = field(default_factory=utc_now)
    rows: list[dict] = field(default_factory=list)

    def add(self, op: str, backend: str, shape: str, dtype: str, metric: str, value) -> None:
        if not self.enabled:
            return
        self.rows.append(dict(op=op, backend=backend, shape=shape, dtype=dtype, metric=metric,
                              value=_fmt(value), device=self.device, commit=self.commit,
                              timestamp=self.timestamp, command=self.command))

    def add_timing(self, op: str, backend: str, shape: str, dtype: str, stats,
                   bytes_moved: int | None = None) -> None:
        """pytest-benchmark's stats (seconds) as microsecond rows, and effective bandwidth."""
        if stats is None:          # benchmark disabled: nothing was timed
            return
        for metric, seconds in (("median_us", stats.median), ("mean_us", stats.mean),
                                ("min_us", stats.min), ("stddev_us", stats.stddev)):
            self.add(op, backend, shape, dtype, metric, seconds * 1e6)
        self.add(op, backend, shape, dtype, "rounds", stats.rounds)
        if bytes_moved:
            self.add(op, backend, shape, dtype, "effective_gb_per_s",
                     bytes_moved / stats.median / 1e9)

    def finish(self, path: Path | None = None) -> Path | None:
        """Append the session's rows plus its derived ratios; return the path, None if no rows."""
        if not (self.enabled and self.rows):
            return None
        rows = self.rows + speedup_rows(self.rows) + launch_ratio_rows(self.rows)
        path = path or csv_path()
        append_rows(path, rows)
        return path


def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.6g}"


def _key(row: dict) -> tuple:
    return row["op"], row["shape"], row["dtype"], row["device"]


def _derived(template: dict, backend: str, metric: str, value: float) -> dict:
    return dict(template, backend=backend, metric=metric, value=_fmt(value))


def speedup_rows(rows: list[dict]) -> list[dict]:
    """``speedup_vs_<baseline>`` = baseline median / tbkernels median, same op/shape/dtype/device.

    Every non-tbkernels backend timed in this session at that shape is a baseline.
    """
    medians: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["metric"] == "median_us":
            medians.setdefault(_key(row), {})[row["backend"]] = row
    out = []
    for by_backend in medians.values():
        ours = {b: r for b, r in by_backend.items() if b.startswith(TBKERNELS_PREFIX)}
        baselines = {b: r for b, r in by_backend.items() if not b.startswith(TBKERNELS_PREFIX)}
        for name, row in sorted(ours.items()):
            for base_name, base in sorted(baselines.items()):
                ratio = float(base["value"]) / float(row["value"])
                out.append(_derived(row, name, f"speedup_vs_{base_name}", ratio))
    return out


def launch_ratio_rows(rows: list[dict]) -> list[dict]:
    """``ratio_vs_empty_launch`` = GPU latency / latency of the cheapest empty kernel launch.

    The cheapest of the measured empty launches is the floor: nothing that launches a kernel can
    beat it, so the ratio says how far a call is from launch-bound.
    """
    latency = [r for r in rows if r["metric"] == "latency_us"]
    out = []
    for device in {r["device"] for r in latency}:
        floors = [float(r["value"]) for r in latency
                  if r["device"] == device and r["op"] == EMPTY_LAUNCH_OP]
        if not floors:
            continue
        floor = min(floors)
        for row in latency:
            if row["device"] == device and row["op"] != EMPTY_LAUNCH_OP:
                out.append(_derived(row, row["backend"], "ratio_vs_empty_launch",
                                    float(row["value"]) / floor))
    return out


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append to ``path``, writing the header first if the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != COLUMNS:
            # Appending under a different header would silently misalign every column.
            raise RuntimeError(f"{path} has header {header}, expected {list(COLUMNS)}; move it "
                               "aside or set TBK_RESULTS_CSV to another file")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge(src: Path, dst: Path = DEFAULT_CSV) -> tuple[int, int]:
    """Append ``src``'s rows to ``dst`` (created with the header if missing); both must have the
    project's header. Rows ``dst`` already held (all ten columns equal: the same file merged
    twice) are skipped; repeats inside ``src`` are kept, as a session may write a row twice.
    Returns (rows appended, rows skipped)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{src}: source and destination are the same file")
    with open(src, newline="") as f:
        header = next(csv.reader(f), None)
    if tuple(header or ()) != COLUMNS:
        raise ValueError(f"{src} has header {header}, expected {list(COLUMNS)}")
    rows = read_rows(src)
    if any(None in row or None in row.values() for row in rows):
        raise ValueError(f"{src}: some rows do not have {len(COLUMNS)} columns")
    have = set()
    if dst.exists() and dst.stat().st_size > 0:
        with open(dst, newline="") as f:
            reader = csv.reader(f)
            dst_header = next(reader, None)
            if tuple(dst_header or ()) != COLUMNS:
                raise ValueError(f"{dst} has header {dst_header}, expected {list(COLUMNS)}")
            have = {tuple(r) for r in reader}
    new = [row for row in rows if tuple(row[c] for c in COLUMNS) not in have]
    if new:
        append_rows(dst, new)
    return len(new), len(rows) - len(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The results CSV's tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="append SRC's rows to DST after checking both headers "
                       "(rows already in DST are skipped)")
    m.add_argument("src", type=Path, help="a results CSV: a GPU call's results.csv, local.csv")
    m.add_argument("dst", type=Path, nargs="?", default=DEFAULT_CSV,
                   help=f"default: {DEFAULT_CSV.relative_to(BENCH_DIR.parent)}")
    args = ap.parse_args(argv)
    try:
        added, skipped = merge(args.src, args.dst)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"merge: {e}", file=sys.stderr)
        return 1
    print(f"appended {added} rows from {args.src} to {args.dst}"
          + (f" ({skipped} already there, skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
