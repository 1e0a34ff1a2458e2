"""The tests' PromQL helpers (tests/support/promql.py): metric names out of dashboard expressions and
histogram_quantile as Prometheus computes it."""
from __future__ import annotations

import math

import pytest

from support.promql import histogram_quantile, metric_names



def test_metric_names_skip_functions_labels_ranges_and_variables():
    expr = ('histogram_quantile(0.9, sum by (le, instance) (rate(videochat_ttft_seconds_bucket{instance=~"$replica",'
            'model="x"}[$__rate_interval]))) / sum(rate(nv_inference_count[5m])) or on (job) vector(0)')
    assert metric_names(expr) == {"videochat_ttft_seconds_bucket", "nv_inference_count"}
    assert metric_names("label_values(videochat_num_requests_running, instance)") == {"videochat_num_requests_running"}


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.3)      # rank 20: halfway in (0.1, 0.5]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(1.0, buckets) == pytest.approx(1.0)
    assert math.isnan(histogram_quantile(0.5, {math.inf: 0.0}))
