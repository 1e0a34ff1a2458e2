"""Just enough PromQL for the tests: the metric names an expression reads (for the dashboard check) and
`histogram_quantile` over one scrape's buckets, computed the way Prometheus does (linear interpolation inside
the bucket that holds the rank)."""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (inside {...} or by/without (...)), durations ([5m]) or Grafana variables ($__rate_interval)."""
    text = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", expr)  # Grafana: (metric, label)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)             # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)                         # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                        # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)                       # Grafana variables
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group(0).lower() in KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """`buckets`: upper bound (le, +Inf included) -> cumulative count."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return math.nan
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower          # Prometheus returns the highest finite bound
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return math.nan


def buckets_of(samples: Iterable[tuple[str, frozenset, float]], name: str, **labels: str) -> dict[float, float]:
    """Sum the `name_bucket` series matching `labels`, by `le`."""
    out: dict[float, float] = {}
    want = set(labels.items())
    for n, ls, value in samples:
        if n == f"{name}_bucket" and want <= ls:
            le = float(dict(ls)["le"].replace("+Inf", "inf"))
            out[le] = out.get(le, 0.0) + value
    return out
