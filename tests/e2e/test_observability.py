"""Observability against real servers: the metric names, types, units and labels of docs/observability.md in a
live scrape (histograms with `_bucket{le}`, `_sum`, `_count` that a histogram_quantile reads), the Grafana
dashboard queries only metrics the server exports, and `serve --log-format json` writes a failed request's
error as a JSON line carrying the request id the caller's exception holds."""
from __future__ import annotations

import json
import math
import sys
import time
import urllib.request

import pytest

from support.paths import ROOT, TINY
from support.promql import buckets_of, histogram_quantile, metric_names
from support.server import TritonHandle, serve_process, wait_for
from videochat.serving.metrics import LABELS, LLM_MODEL, METRICS, PREPROCESS_MODEL, RENAMED, SPECS, series_names
from videochat_client.errors import InvalidArgument
from videochat_client.metrics import parse_prometheus

DASHBOARD = ROOT / "deploy" / "grafana" / "videochat.json"
IMAGE = dict(video=(TINY / "videos" / "example1.mp4").read_bytes(), image=True, prompt="What is this?",
             max_new_tokens=4)


def raw_scrape(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_prometheus(r.read().decode())


def samples(scrape):
    return [(name, labels, value) for (name, labels), value in scrape.samples.items()]


def served_once(triton) -> tuple[float, float]:
    """One good streamed request and one bad one; returns (client latency s, e2e count before)."""
    before = raw_scrape(triton.metrics_url).get("videochat_e2e_request_latency_seconds_count", model=LLM_MODEL)
    t0 = time.perf_counter()
    triton.stream(**IMAGE)
    latency = time.perf_counter() - t0
    with pytest.raises(InvalidArgument):
        triton.stream(video=b"not a video at all", prompt="x", max_new_tokens=2)
    return latency, before


def test_live_scrape_has_every_declared_metric_with_its_type_and_labels(triton):
    latency, count0 = served_once(triton)
    s = wait_for(lambda: (x := raw_scrape(triton.metrics_url)).get(
        "videochat_e2e_request_latency_seconds_count", model=LLM_MODEL) > count0 and x, what="the histograms")
    for spec in METRICS:
        assert s.types.get(spec.name) == spec.kind, spec.name
        for model in spec.models:
            for series in series_names(spec):
                found = [ls for (n, ls) in s.samples if n == series and ("model", model) in ls]
                assert found, f"{series} for {model}"
                assert all(set(LABELS) <= {k for k, _ in ls} for ls in found), series
                if spec.label:
                    assert {dict(ls).get(spec.label) for ls in found} >= set(spec.values), series
    for (name, labels) in s.samples:
        if name.startswith("videochat_"):
            assert not {"instance", "job", "exported_instance"} & {k for k, _ in labels}, name
    assert not {n for (n, _) in s.samples} & set(RENAMED), "a renamed metric is still exported"

    # histograms in seconds, readable by histogram_quantile; the server's times fit in the client's
    ttft = buckets_of(samples(s), "videochat_time_to_first_token_seconds", model=LLM_MODEL)
    assert math.inf in ttft and ttft[math.inf] == s.get("videochat_time_to_first_token_seconds_count",
                                                         model=LLM_MODEL)
    p50 = histogram_quantile(0.5, ttft)
    assert 0 < p50 <= max(le for le in ttft if math.isfinite(le))
    e2e_sum = s.get("videochat_e2e_request_latency_seconds_sum", model=LLM_MODEL)
    assert s.get("videochat_time_to_first_token_seconds_sum", model=LLM_MODEL) <= e2e_sum
    assert s.get("videochat_request_success_total", model=LLM_MODEL) >= 1
    assert s.get("videochat_request_failure_total", model=PREPROCESS_MODEL, code="INVALID_ARGUMENT") >= 1
    assert s.get("videochat_preprocess_time_seconds_count", model=PREPROCESS_MODEL) >= 1
    print(f"client latency {latency * 1e3:.1f} ms; server TTFT p50 (buckets) {p50 * 1e3:.1f} ms")
    assert SPECS["videochat_num_requests_running"].unit == "requests"


def test_dashboard_queries_only_metrics_the_server_exports(triton):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    wanted = set().union(*(metric_names(e) for e in exprs))
    assert {"videochat_time_to_first_token_seconds_bucket", "videochat_request_failure_total"} <= wanted
    exported = {n for (n, _) in raw_scrape(triton.metrics_url).samples}
    assert wanted - exported == set(), "the dashboard queries metrics the server does not export"


def test_json_log_line_of_an_error_carries_the_callers_request_id(tmp_path):
    args = ["--checkpoint", str(TINY), "--work-dir", str(tmp_path), "--preprocess-instances", "1",
            "--log-format", "json", "--exit-timeout-secs", "10"]
    with serve_process(sys.executable, args, cwd=ROOT) as serving:
        with pytest.raises(InvalidArgument) as caught:
            TritonHandle(None, serving.grpc_url).stream(video=b"not a video at all", prompt="x", max_new_tokens=2)
    request_id = caught.value.request_id
    assert request_id
    lines = [line for line in "".join(serving.lines).splitlines() + serving.output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]          # every line is one JSON object
    assert all({"ts", "level", "source", "msg"} <= set(r) for r in records)
    mine = [r for r in records if r.get("request_id") == request_id]
    assert mine, f"no log line with request_id {request_id}"
    assert any(r["level"] in ("warning", "error") and "bad video" in r["msg"] for r in mine), mine
    assert any(r["source"] == "serve" and r["msg"].startswith("ready:") for r in records)
