"""``shoal bench plot``: PNG figures from sweep results (JSON lines of ``bench sweep``).

Four figures, each readable alone (titles, units, legends):

- ``throughput_latency.png``: mean TPOT and mean TTFT against output throughput, one
  curve per layout (load rising along each curve).
- ``pareto.png``: output tokens/s per user (1000 / mean TPOT) against output
  tokens/s per device, every run a point, the Pareto front drawn through the best.
- ``latency_vs_load.png``: TTFT and TPOT percentiles against request rate (or
  max concurrency for ``inf``-rate runs).
- ``scaling.png``: best output throughput per device count and the scaling
  efficiency ``best(N) / (N * best(N_min) / N_min)``.

matplotlib is optional (``pip install 'shoal[bench]'``); it is imported here only.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from shoal.bench.results import read_results

FIGURES = ("throughput_latency.png", "pareto.png", "latency_vs_load.png", "scaling.png")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("bench plot needs matplotlib: pip install 'shoal[bench]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_of(row: dict) -> tuple[float, str]:
    """(x value, axis name): the request rate, or the concurrency for all-at-once runs."""
    rate = row.get("request_rate")
    if isinstance(rate, (int, float)) and not math.isinf(rate):
        return float(rate), "request rate (req/s)"
    return float(row.get("max_concurrency") or row.get("num_prompts") or 0), \
        "max concurrency (requests in flight)"


def by_layout(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("completed"):
            groups[row.get("layout") or row.get("label") or "run"].append(row)
    for runs in groups.values():
        runs.sort(key=lambda r: load_of(r)[0])
    return dict(sorted(groups.items()))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both axes (higher is better on both), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def scaling_table(rows: list[dict]) -> list[dict[str, float]]:
    """Best output throughput per device count and its efficiency against the smallest."""
    best: dict[int, float] = {}
    for row in rows:
        n = int(row.get("num_devices") or 1)
        best[n] = max(best.get(n, 0.0), float(row.get("output_throughput") or 0.0))
    if not best:
        return []
    n0 = min(best)
    per_device0 = best[n0] / n0
    return [{"num_devices": n, "output_throughput": t,
             "efficiency": t / (n * per_device0) if per_device0 else 0.0}
            for n, t in sorted(best.items())]


def _tpot_user_rate(row: dict) -> float:
    tpot = row.get("mean_tpot_ms") or 0.0
    return 1000.0 / tpot if tpot else 0.0


def plot_all(rows: list[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Draw the four figures into ``out_dir``; returns their paths."""
    plt = _pyplot()
    groups = by_layout(rows)
    if not groups:
        raise ValueError("no completed runs to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f" — {title}" if title else ""
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in groups.items():
        x = [r["output_throughput"] for r in runs]
        axes[0].plot(x, [r["mean_tpot_ms"] for r in runs], "o-", label=name)
        axes[1].plot(x, [r["mean_ttft_ms"] for r in runs], "o-", label=name)
    for ax, what in zip(axes, ("mean TPOT (ms)", "mean TTFT (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(title="layout")
    fig.suptitle(f"Throughput vs latency per layout (load rises along each curve){suffix}")
    paths.append(_save(fig, out / FIGURES[0], plt))

    fig, ax = plt.subplots(figsize=(7, 5))
    points = []
    for name, runs in groups.items():
        xs = [r["output_throughput"] / max(1, int(r.get("num_devices") or 1)) for r in runs]
        ys = [_tpot_user_rate(r) for r in runs]
        ax.scatter(xs, ys, label=name, s=30)
        points += zip(xs, ys)
    front = pareto_front(points)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("output tokens/s per device")
    ax.set_ylabel("output tokens/s per user (1000 / mean TPOT)")
    ax.set_title(f"Pareto front: per-user speed vs per-device throughput{suffix}")
    ax.grid(alpha=0.3)
    ax.legend(title="layout")
    paths.append(_save(fig, out / FIGURES[1], plt))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xlabel = "load"
    for name, runs in groups.items():
        loads = [load_of(r)[0] for r in runs]
        xlabel = load_of(runs[0])[1]
        for ax, metric in zip(axes, ("ttft", "tpot")):
            line, = ax.plot(loads, [r[f"median_{metric}_ms"] for r in runs], "o-",
                            label=f"{name} p50")
            p99 = [r.get(f"p99_{metric}_ms") for r in runs]
            if all(v is not None for v in p99):
                ax.plot(loads, p99, "s--", color=line.get_color(), label=f"{name} p99")
    for ax, metric in zip(axes, ("TTFT", "TPOT")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (ms)")
        ax.set_title(f"{metric} percentiles vs load")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency percentiles vs load{suffix}")
    paths.append(_save(fig, out / FIGURES[2], plt))

    table = scaling_table([r for runs in groups.values() for r in runs])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = [t["num_devices"] for t in table]
    ax.bar([str(v) for v in n], [t["output_throughput"] for t in table], color="tab:blue",
           alpha=0.6, label="best output tokens/s")
    ax.set_xlabel("devices (tp x pp x dp)")
    ax.set_ylabel("best output throughput (tokens/s)")
    ax2 = ax.twinx()
    ax2.plot([str(v) for v in n], [100 * t["efficiency"] for t in table], "o-",
             color="tab:red", label="scaling efficiency")
    ax2.set_ylabel("scaling efficiency (%)")
    ax2.set_ylim(0, max(110, max(100 * t["efficiency"] for t in table) * 1.1))
    ax.set_title(f"Scaling efficiency vs device count{suffix}")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower right")
    paths.append(_save(fig, out / FIGURES[3], plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="sweep JSONL files or result JSON files")
    p.add_argument("-o", "--output-dir", default="plots")
    p.add_argument("--title", default="", help="appended to every figure's title")


def run_plot_cli(args: argparse.Namespace) -> dict:
    """Plot the result files; the summary line the CLI prints."""
    rows = [row for path in args.results for row in read_results(path)]
    paths = plot_all(rows, args.output_dir, args.title)
    return {"plots": [str(p) for p in paths], "runs": len(rows)}
