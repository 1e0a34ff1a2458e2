"""`videochat loadtest compare a.json b.json ... [--plot out.png]`: runs side by side. Prints one JSON line
per run and level (throughput, latency and TTFT percentiles, goodput) and, with --plot, overlays the runs:
latency p50 and p99, TTFT p50, requests/s, each against the level (concurrency or rate)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

from ..errors import InvalidArgument


def load_report(path: str) -> Dict[str, object]:
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read loadtest report {path!r}: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("levels"), list):
        raise InvalidArgument(f"{path!r} is not a videochat loadtest report (no 'levels')")
    return report


def level_of(lv: Dict[str, object]) -> float:
    return float(lv["concurrency"] if "concurrency" in lv else lv["rate"])


def rows(name: str, report: Dict[str, object]) -> List[Dict[str, object]]:
    out = []
    for lv in report["levels"]:
        lat, ttft = lv.get("latency_ms") or {}, lv.get("time_to_first_token_ms") or {}
        out.append({"run": name, "mode": lv.get("mode"), "level": level_of(lv),
                    "requests_per_second": lv.get("requests_per_second"),
                    "output_tokens_per_second": lv.get("output_tokens_per_second"),
                    "latency_ms_p50": lat.get("p50"), "latency_ms_p99": lat.get("p99"),
                    "ttft_ms_p50": ttft.get("p50"), "ttft_ms_p99": ttft.get("p99"),
                    "goodput_fraction": (lv.get("goodput") or {}).get("fraction"),
                    "failed_requests": lv.get("failed_requests")})
    return out


def plot_compare(runs: Sequence[tuple], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'videochat-client[plot]' (or pip install matplotlib)")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, report) in enumerate(runs):
        levels = report["levels"]
        xs = [level_of(lv) for lv in levels]
        color = f"C{i % 10}"
        lat = [lv.get("latency_ms") or {} for lv in levels]
        ax1.plot(xs, [s.get("p50", float("nan")) for s in lat], "o-", color=color, label=f"{name} p50")
        ax1.plot(xs, [s.get("p99", float("nan")) for s in lat], "^:", color=color, label=f"{name} p99")
        ttft = [lv.get("time_to_first_token_ms") or {} for lv in levels]
        ax2.plot(xs, [s.get("p50", float("nan")) for s in ttft], "o-", color=color, label=f"{name} p50")
        ax3.plot(xs, [lv.get("requests_per_second", float("nan")) for lv in levels], "o-", color=color, label=name)
    kind = "concurrency" if runs and runs[0][1]["levels"] and "concurrency" in runs[0][1]["levels"][0] else "rate"
    for ax, title, unit in ((ax1, "latency", "ms"), (ax2, "time to first token", "ms"), (ax3, "throughput", "req/s")):
        ax.set_title(title)
        ax.set_xlabel(kind)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("videochat loadtest compare")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_compare(args) -> int:
    runs = [(os.path.splitext(os.path.basename(p))[0], load_report(p)) for p in args.reports]
    for name, report in runs:
        for row in rows(name, report):
            print(json.dumps(row))
    if args.plot:
        try:
            plot_compare(runs, args.plot)
        except RuntimeError as e:
            print(f"videochat: error: {e}", file=sys.stderr)
            return 1
        print(json.dumps({"plot": args.plot}))
    return 0


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videochat loadtest compare",
                                description="compare loadtest reports; --plot overlays them in one PNG")
    p.add_argument("reports", nargs="+", help="report JSON files written by videochat loadtest --out")
    p.add_argument("--plot", help="PNG with latency, TTFT and throughput of every run against the level")
    p.set_defaults(func=cmd_compare)
    return p
