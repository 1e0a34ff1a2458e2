"""Server-side view for the load tool: scrape Triton's Prometheus endpoint (:8002/metrics) before and after a
load level and summarise the difference per model.

Triton's counters are cumulative (triton_facts §4): nv_inference_request_success/failure, nv_inference_count
(inferences, i.e. batch items), nv_inference_exec_count (executions) -> average batch = count / exec_count,
nv_inference_{request,queue,compute_input,compute_infer,compute_output}_duration_us (sums over requests).
Custom `videochat_*` families (whatever the server exports) are reported too: counters and histograms as
differences, gauges as the value after the level."""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

Key = Tuple[str, FrozenSet[Tuple[str, str]]]
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_DURATIONS = ("request", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Scrape:
    samples: Dict[Key, float] = field(default_factory=dict)
    types: Dict[str, str] = field(default_factory=dict)   # family name -> counter | gauge | histogram | summary

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


def parse_prometheus(text: str) -> Scrape:
    s = Scrape()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                s.types[parts[2]] = parts[3]
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = frozenset(_LABEL.findall(m.group(3) or ""))
        s.samples[(m.group(1), labels)] = value
    return s


def scrape(url: str, *, timeout: float = 5.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as resp:   # noqa: S310 - operator-given URL
        return parse_prometheus(resp.read().decode("utf-8", errors="replace"))


def try_scrape(url: Optional[str], *, timeout: float = 5.0) -> Tuple[Optional[Scrape], Optional[str]]:
    if not url:
        return None, None
    try:
        return scrape(url, timeout=timeout), None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def _models(s: Scrape) -> set:
    return {dict(ls).get("model") for (n, ls) in s.samples if n == "nv_inference_count"} - {None}


def _family_of(name: str, types: Dict[str, str]) -> Tuple[str, str]:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) in ("histogram", "summary"):
            return name[: -len(suffix)], types[name[: -len(suffix)]]
    return name, types.get(name, "untyped")


def server_view(before: Scrape, after: Scrape) -> Dict[str, object]:
    """Per-model Triton statistics over the interval, plus `videochat_*` custom metrics."""
    models = {}
    for model in sorted(_models(after)):
        d = lambda name, **lb: after.get(name, model=model, **lb) - before.get(name, model=model, **lb)  # noqa: E731
        success = d("nv_inference_request_success")
        count, execs = d("nv_inference_count"), d("nv_inference_exec_count")
        entry: Dict[str, object] = {
            "request_success": success,
            "request_failure": d("nv_inference_request_failure"),
            "inference_count": count,
            "exec_count": execs,
            "avg_batch_size": count / execs if execs else None,
        }
        for stage in _DURATIONS:
            total_us = d(f"nv_inference_{stage}_duration_us")
            entry[f"avg_{stage}_ms"] = total_us / success / 1e3 if success else None
        models[model] = entry

    custom: Dict[str, object] = {}
    for (name, labels), value in sorted(after.samples.items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))):
        if not name.startswith("videochat_"):
            continue
        family, kind = _family_of(name, after.types)
        if name.endswith("_bucket"):
            continue   # keep reports short: histogram sum/count (-> mean) only
        label_txt = ",".join(f"{k}={v}" for k, v in sorted(labels))
        key = f"{name}{{{label_txt}}}" if label_txt else name
        delta = value - before.samples.get((name, labels), 0.0)
        custom[key] = value if kind == "gauge" else delta
    # means of histograms: sum/count over the interval
    for key in [k for k in custom if k.split("{")[0].endswith("_sum")]:
        count_key = key.replace("_sum", "_count", 1)
        if count_key in custom and custom[count_key]:
            custom[key.replace("_sum", "_mean", 1)] = custom[key] / custom[count_key]
    return {"models": models, "custom": custom}
