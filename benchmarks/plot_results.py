"""Bar charts of median time per backend and shape, one PNG per (op, device), from results.csv.

    python benchmarks/plot_results.py [CSV] [--out-dir DIR] [--markdown]

The CSV accumulates runs; each chart shows the latest session (by timestamp) for that op and
device, so numbers taken in different runs never share a chart. Without matplotlib (it is not a
dependency of anything here) the same numbers are printed as a table and the script exits 0.
``--markdown`` prints that session's medians and speedups as Markdown tables (for README.md).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import DEFAULT_CSV, read_rows  # noqa: E402

METRIC = "median_us"


def latest_session(rows: list[dict], metric: str = METRIC) -> dict[tuple, dict]:
    """{(op, device): {"timestamp", "commit", "command", "values": {(shape, backend): value}}}.

    Only the latest session that recorded ``METRIC`` for that op and device counts.
    """
    latest: dict[tuple, str] = {}
    for r in rows:
        if r["metric"] == METRIC:
            key = (r["op"], r["device"])
            latest[key] = max(latest.get(key, ""), r["timestamp"])
    charts: dict[tuple, dict] = defaultdict(lambda: {"values": {}})
    for r in rows:
        key = (r["op"], r["device"])
        if r["metric"] == metric and key in latest and r["timestamp"] == latest[key]:
            chart = charts[key]
            chart.update(timestamp=r["timestamp"], commit=r["commit"], command=r["command"])
            chart["values"][(r["shape"], r["backend"])] = float(r["value"])
    return dict(charts)


def markdown(rows: list[dict]) -> str:
    out = []
    for (op, device), chart in latest_session(rows).items():
        out.append(f"**{op}** on {device}, commit `{chart['commit']}`, {chart['timestamp']}, "
                   f"`{chart['command']}`\n")
        out.append(_markdown_table(chart["values"], "median µs", "{:.1f}", shape_cols=True))
        for shape, values in _speedups(rows, op, device, chart["timestamp"]):
            out.append(f"\nSpeedup (baseline median / tbkernels median) at {shape}:\n")
            out.append(_markdown_table(values, "speedup of ↓ over →", "{:.3g}×"))
        out.append("")
    return "\n".join(out)


def _speedups(rows, op, device, timestamp):
    """[(shape, {(baseline, tbkernels backend): speedup})] of one session, shapes by size."""
    by_shape: dict[str, dict] = defaultdict(dict)
    for r in rows:
        if ((r["op"], r["device"], r["timestamp"]) == (op, device, timestamp)
                and r["metric"].startswith("speedup_vs_")):
            baseline = r["metric"][len("speedup_vs_"):]
            by_shape[r["shape"]][(baseline, r["backend"])] = float(r["value"])
    return sorted(by_shape.items(), key=lambda kv: _shape_size(kv[0]))


def _markdown_table(values: dict, corner: str, fmt: str, shape_cols: bool = False) -> str:
    """values: {(column, row): number}."""
    cols = _ordered(values, 0)
    if shape_cols:
        cols = sorted(cols, key=_shape_size)
    lines = [f"| {corner} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in _ordered(values, 1):
        cells = [fmt.format(values[(c, row)]) if (c, row) in values else "–" for c in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ordered(values: dict, index: int) -> list[str]:
    seen: dict[str, None] = {}
    for key in values:
        seen.setdefault(key[index], None)
    return list(seen)


def _shape_size(shape: str) -> int:
    m = re.search(r"\d+", shape)
    return int(m.group()) if m else 0


def text_table(op: str, device: str, chart: dict) -> str:
    values = chart["values"]
    shapes = sorted(_ordered(values, 0), key=_shape_size)
    backends = _ordered(values, 1)
    width = max(len(b) for b in backends)
    lines = [f"{op} on {device} ({chart['timestamp']}, {chart['commit']}): {METRIC}",
             " " * width + "".join(f"{s:>18}" for s in shapes)]
    for b in backends:
        cells = [f"{values[(s, b)]:>18.1f}" if (s, b) in values else f"{'-':>18}" for s in shapes]
        lines.append(f"{b:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def bar_chart(op: str, device: str, chart: dict, out_dir: Path, plt) -> Path:
    values = chart["values"]
    shapes = sorted(_ordered(values, 0), key=_shape_size)
    backends = _ordered(values, 1)
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(shapes) * max(1, len(backends) / 4)), 5))
    for i, backend in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j, s in enumerate(shapes)
              if (s, backend) in values]
        ys = [values[(s, backend)] for s in shapes if (s, backend) in values]
        ax.bar(xs, ys, width, label=backend)
    ax.set_xticks(range(len(shapes)), shapes)
    # Times span from microseconds (kernels) to a second (Python loops at large B).
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (µs, log scale)")
    ax.set_title(f"{op} — {device}\n{chart['timestamp']}  commit {chart['commit']}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{_slug(op)}__{_slug(device)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", default=str(DEFAULT_CSV))
    parser.add_argument("--out-dir", help="where PNGs go (default: next to the CSV)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the latest session's tables as Markdown instead of plotting")
    args = parser.parse_args(argv)
    path = Path(args.csv)
    if not path.exists():
        print(f"no results file at {path}; run `pytest benchmarks --benchmark-only` first")
        return 1
    rows = read_rows(path)
    charts = latest_session(rows)
    if not charts:
        print(f"{path} holds no {METRIC} rows")
        return 1
    if args.markdown:
        print(markdown(rows))
        return 0
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNGs written (pip install matplotlib for charts). "
              "The same numbers as text:\n")
        for (op, device), chart in charts.items():
            print(text_table(op, device, chart) + "\n")
        return 0
    out_dir = Path(args.out_dir) if args.out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for (op, device), chart in charts.items():
        print(f"wrote {bar_chart(op, device, chart, out_dir, plt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
