"""The SLO timings the scheduler records for each request (queue time, TTFT, end-to-end, time per output token)
on a hand-driven clock, the failed job's log line with its request id, and the metric families built from the
one declaration (`videochat.serving.metrics.METRICS`) with Prometheus' conventions. The live scrape of the real
server is tests/e2e/test_observability.py."""
from __future__ import annotations

import re

import pytest

from support.fakes import ListSink
from .test_scheduler import FakeEngine
from videochat.serving import metrics as m
from videochat.serving.llm import arrival_on
from videochat.serving.scheduler import Job, Scheduler



class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_scheduler_records_queue_ttft_e2e_and_tpot_on_its_clock():
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=4, clock=clock)
    clock.t = 1.0
    s.submit([Job(chat_request={"n": 3}, sink=ListSink(), request_id="r-1", arrived_at=0.5)])
    for t in (3.0, 4.0, 6.0):     # admitted + first token at 3, second at 4, the third (final) at 6
        clock.t = t
        s.run_once()
    (done,) = s.finished
    assert done.request_id == "r-1" and done.finish_reason == "length" and done.error_code is None
    assert done.queue_s == pytest.approx(2.0)           # submit 1 -> admission 3
    assert done.ttft_s == pytest.approx(2.5)            # ensemble arrival 0.5 -> first token 3
    assert done.e2e_s == pytest.approx(5.5)
    assert done.tpot_s == pytest.approx(1.5)            # (6 - 3) / (3 - 1)
    assert done.completion_tokens == 3


def test_failed_job_is_recorded_and_logged_with_its_request_id():
    clock, logged = Clock(), []
    s = Scheduler(FakeEngine, max_active=1, clock=clock, log_request_error=lambda rid, msg: logged.append((rid, msg)))
    s.submit([Job(chat_request={"n": 1, "bad": True}, sink=ListSink(), request_id="bad-42")])
    s.run_once()
    (done,) = s.finished
    assert done.error_code == "invalid_arg" and done.queue_s is None and done.ttft_s is None
    assert logged and logged[0][0] == "bad-42" and "prompt too long" in logged[0][1]


def test_arrival_moves_to_the_monotonic_clock():
    assert arrival_on(100.0, 1_000.0, now_unix=1_002.5) == pytest.approx(97.5)
    assert arrival_on(100.0, 1_005.0, now_unix=1_002.5) == 100.0     # a stamp from the future: now
    assert arrival_on(100.0, None, now_unix=1.0) is None


class RecordingPb:
    """The pb_utils metric API's shape (MetricFamily/Metric), recording what the families were built with."""

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
        made: list = []

        def __init__(self, name, description, kind):
            self.name, self.kind = name, kind
            RecordingPb.MetricFamily.made.append(self)
            self.metrics = []

        def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
            metric = RecordingPb.Metric(self, labels, buckets)
            self.metrics.append(metric)
            return metric

    class Metric:
        def __init__(self, family, labels, buckets):
            self.family, self.labels, self.buckets = family, labels, buckets
            self.value, self.observed = 0.0, []

        def increment(self, v):
            self.value += v

        def set(self, v):
            self.value = v

        def observe(self, v):
            self.observed.append(v)


def test_families_follow_prometheus_conventions():
    for spec in m.METRICS:
        assert spec.name.startswith("videochat_") and spec.kind in ("counter", "gauge", "histogram")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert not re.search(r"_(us|ms|microseconds|milliseconds)(_|$)", spec.name), spec.name
        if spec.unit == "seconds" and spec.kind != "counter":
            assert spec.name.endswith("_seconds"), spec.name
        assert spec.label not in ("instance", "job", "le") and bool(spec.buckets) == (spec.kind == "histogram")
        assert list(spec.buckets) == sorted(spec.buckets)
    for name in ("videochat_time_to_first_token_seconds", "videochat_e2e_request_latency_seconds",
                 "videochat_request_queue_time_seconds", "videochat_time_per_output_token_seconds"):
        assert m.SPECS[name].kind == "histogram"
    assert m.SPECS["videochat_num_requests_running"].kind == m.SPECS["videochat_num_requests_waiting"].kind == "gauge"
    assert m.SPECS["videochat_request_success_total"].label == "finish_reason"


def test_llm_metrics_observe_a_finished_request_into_the_histograms():
    RecordingPb.MetricFamily.made = []
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=2, clock=clock)
    lm = m.LLMMetrics(RecordingPb, model="videochat_llm", model_instance="videochat_llm_0")
    lm.watch_scheduler(s)
    labels = {tuple(sorted(x.labels)) for f in RecordingPb.MetricFamily.made for x in f.metrics}
    assert all({"model", "model_instance"} <= set(ls) and "instance" not in ls for ls in labels)
    s.submit([Job(chat_request={"n": 2}, sink=ListSink(), arrived_at=0.0)])
    for t in (1.0, 2.0):
        clock.t = t
        s.run_once()
    lm.mirror.sync(force=True)
    assert lm.get("videochat_time_to_first_token_seconds").observed == [pytest.approx(1.0)]
    assert lm.get("videochat_e2e_request_latency_seconds").observed == [pytest.approx(2.0)]
    assert lm.get("videochat_time_per_output_token_seconds").observed == [pytest.approx(1.0)]
    assert lm.get("videochat_request_queue_time_seconds").observed == [pytest.approx(1.0)]
    assert lm.get("videochat_request_success_total", "length").value == 1
    assert not s.finished                                   # drained
