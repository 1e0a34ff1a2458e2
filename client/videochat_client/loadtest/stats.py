"""Statistics of a load level: latency blocks with configurable percentiles (`--percentiles`) and goodput
against SLOs (`--goodput ttft_ms=500 latency_ms=10000`: the share of requests that met every given SLO, and
the rate of those, as in vLLM bench / genai-perf).

Percentiles are numpy's linear interpolation between closest ranks (the "type 7" quantile), like both tools."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
ALWAYS = (50.0, 90.0, 99.0)           # the keys reports had before --percentiles: always present
# SLO name -> the Record attribute it bounds (milliseconds)
SLO_FIELDS = {"ttft_ms": "ttft_ms", "latency_ms": "latency_ms", "itl_ms": "itl_ms"}


def percentile_key(p: float) -> str:
    """50 -> "p50", 99.9 -> "p99.9"."""
    return f"p{p:g}"


def parse_percentiles(text: str) -> List[float]:
    """"50,90,95,99" -> [50.0, 90.0, 95.0, 99.0]; each in (0, 100], no duplicates."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--percentiles wants comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("--percentiles: empty list")
    bad = [v for v in values if not (0 < v <= 100) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"--percentiles must be in (0, 100], got {bad[0]:g}")
    return sorted(set(values))


def parse_goodput(items: Iterable[str]) -> Dict[str, float]:
    """["ttft_ms=500", "latency_ms=10000"] -> {"ttft_ms": 500.0, "latency_ms": 10000.0}."""
    slos: Dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SLO_FIELDS:
            raise ValueError(f"--goodput wants NAME=MS with NAME one of {', '.join(SLO_FIELDS)}, got {item!r}")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key}: expected milliseconds, got {value!r}") from None
        if not bound > 0 or not math.isfinite(bound):
            raise ValueError(f"--goodput {key} must be > 0, got {value}")
        slos[key] = bound
    return slos


def latency_stats(values: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES
                  ) -> Optional[Dict[str, float]]:
    """mean/min/max/std and pNN for p50, p90, p99 and every requested percentile; None without values."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    out = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    for p in sorted(set(ALWAYS) | set(percentiles)):
        out[percentile_key(p)] = float(np.percentile(a, p))
    out["std"] = float(a.std())
    return out


def meets(record, slos: Mapping[str, float]) -> bool:
    """A successful request whose every SLO'd value is known and within its bound."""
    if record.error is not None:
        return False
    for name, bound in slos.items():
        value = getattr(record, SLO_FIELDS[name])
        if value is None or value > bound:
            return False
    return True


def goodput(records: Sequence, slos: Mapping[str, float], wall_s: float) -> Dict[str, object]:
    """Share of all requests (failures count as misses) that met every SLO, and their rate over the level."""
    good = sum(meets(r, slos) for r in records)
    return {"slos": dict(slos), "good_requests": good,
            "fraction": good / len(records) if records else 0.0,
            "requests_per_second": good / wall_s if wall_s > 0 else 0.0}
