"""Results of `videochat loadtest`: the per-request `Record`, the per-level statistics (`summarize`) and the
outputs (JSON, CSV rows, PNG plot)."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .stats import DEFAULT_PERCENTILES, goodput, latency_stats


@dataclass
class Record:
    start: float                       # seconds since the level started
    end: float
    turn: int
    error: Optional[str] = None        # gRPC status name
    error_message: str = ""
    latency_ms: Optional[float] = None
    ttft_ms: Optional[float] = None
    itl_ms: Optional[float] = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    replica: Optional[str] = None      # the URL it was sent to (a replica, or the balancer in front of them)
    request_id: str = ""               # the id the server logs it under
    finish_reason: str = ""
    video_bytes_sent: int = 0          # 0 for a follow-up answered by media_key
    reuploaded: bool = False           # its media_key missed and it went again with the bytes


def summarize(records: Sequence[Record], *, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              slos: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    ok = [r for r in records if r.error is None]
    errors: Dict[str, int] = {}
    examples: Dict[str, str] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
            examples.setdefault(r.error, r.error_message[:300])
    if records:
        wall = max(r.end for r in records) - min(r.start for r in records)
    else:
        wall = 0.0
    out_tokens = sum(r.output_tokens for r in ok)

    def _stats(values):
        return latency_stats(values, percentiles)

    out = {
        "requests": len(records),
        "successful_requests": len(ok),
        "failed_requests": len(records) - len(ok),
        "duration_s": wall,
        "requests_per_second": len(ok) / wall if wall > 0 else 0.0,
        "output_tokens_per_second": out_tokens / wall if wall > 0 else 0.0,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "latency_ms": _stats([r.latency_ms for r in ok if r.latency_ms is not None]),
        "time_to_first_token_ms": _stats([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "inter_token_latency_ms": _stats([r.itl_ms for r in ok if r.itl_ms is not None]),
        "output_tokens_per_request": _stats([r.output_tokens for r in ok]),
        "video_bytes_sent": sum(r.video_bytes_sent for r in ok),
        "reuploads": sum(r.reuploaded for r in ok),
        "errors": errors,
        "error_examples": examples,
    }
    if slos:
        out["goodput"] = goodput(records, slos, wall)
    return out


# -- outputs ----------------------------------------------------------------------------------------------
CSV_FIELDS = ("mode", "concurrency", "rate", "requests", "successful_requests", "failed_requests", "duration_s",
              "requests_per_second", "output_tokens_per_second", "latency_ms_p50", "latency_ms_p90",
              "latency_ms_p99", "latency_ms_mean", "time_to_first_token_ms_p50", "time_to_first_token_ms_p99",
              "inter_token_latency_ms_p50", "inter_token_latency_ms_p99", "errors")


def csv_rows(report: Dict[str, object]) -> List[Dict[str, object]]:
    rows = []
    for lv in report["levels"]:
        row = {k: lv.get(k, "") for k in CSV_FIELDS}
        for metric in ("latency_ms", "time_to_first_token_ms", "inter_token_latency_ms"):
            st = lv.get(metric) or {}
            for q in ("p50", "p90", "p99", "mean"):
                key = f"{metric}_{q}"
                if key in CSV_FIELDS:
                    row[key] = "" if st.get(q) is None else round(st[q], 3)
        row["errors"] = ";".join(f"{k}={v}" for k, v in sorted(lv["errors"].items()))
        rows.append(row)
    return rows


def write_outputs(report: Dict[str, object], out: str, *, plot: Optional[str] = None) -> Dict[str, str]:
    paths = {"json": out}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    csv_path = os.path.splitext(out)[0] + ".csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(report))
    paths["csv"] = csv_path
    if plot:
        plot_report(report, plot)
        paths["plot"] = plot
    return paths


def plot_report(report: Dict[str, object], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'videochat-client[plot]' (or pip install matplotlib)")
    levels = report["levels"]
    kind = "concurrency" if levels and "concurrency" in levels[0] else "rate"
    xs = [lv[kind] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax1.plot(xs, [(lv["latency_ms"] or {}).get(q, float("nan")) for lv in levels], style, label=f"latency {q}")
    if any(lv.get("time_to_first_token_ms") for lv in levels):
        ax1.plot(xs, [(lv["time_to_first_token_ms"] or {}).get("p50", float("nan")) for lv in levels], "x-",
                 label="TTFT p50")
    ax1.set_xlabel(kind if kind == "concurrency" else "offered rate (req/s)")
    ax1.set_ylabel("ms")
    ax1.set_title("latency")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [lv["requests_per_second"] for lv in levels], "o-", color="C0", label="requests/s")
    ax2.set_xlabel(ax1.get_xlabel())
    ax2.set_ylabel("requests/s", color="C0")
    ax3 = ax2.twinx()
    ax3.plot(xs, [lv["output_tokens_per_second"] for lv in levels], "s--", color="C1", label="output tokens/s")
    ax3.set_ylabel("output tokens/s", color="C1")
    ax2.set_title("throughput")
    if kind == "concurrency" and xs and max(xs) / min(xs) >= 8:
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"videochat loadtest  {report['config']['url']}  turns={report['config']['turns']} "
                 f"max_new_tokens={report['config']['max_new_tokens']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
