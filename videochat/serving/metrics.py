"""Custom Prometheus metrics of the python models (exported on Triton's metrics port next to nv_inference_*).

`METRICS` is the one declaration: names, kinds, units, labels, buckets and meanings. The families are built from
it, and docs/observability.md's table is `markdown_table()` (tests/unit/test_docs.py holds them together).
Conventions (Prometheus, vLLM's vocabulary): base units (seconds, bytes), counters end in `_total`, histograms
in their unit, and no label named `instance` or `job` (Prometheus adds those itself): a model instance is
`model_instance`.

`pb_utils` is passed in so this module imports without Triton. Every metric call is an IPC to the server, so
the hot path only bumps Python ints and appends to deques; `sync(...)` mirrors them at most every
`SYNC_INTERVAL_S`: counters incremented by the difference since the last sync, gauges set, and the requests
finished since then observed into the histograms (2.51's python backend supports HISTOGRAM families natively:
`_bucket{le=...}`, `_sum`, `_count`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

SYNC_INTERVAL_S = 0.1
LLM_MODEL, PREPROCESS_MODEL = "videochat_llm", "preprocessing"

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# seconds; vLLM-like ranges stretched for a CPU demo and an 8B model with video on a GPU
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
# video bytes received per request: 0 (a follow-up by media_key), then 64 KiB .. 1 GiB in powers of 4
UPLOAD_BYTES_BUCKETS = (0,) + tuple(64 * 1024 * 4 ** i for i in range(8))
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FINISH_REASONS = ("stop", "length", "cancelled")
FAILURE_CODES = ("INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")
LABELS = ("model", "model_instance")      # on every family


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                   # counter | gauge | histogram
    unit: str                   # what one unit of the value is
    help: str
    models: tuple[str, ...] = (LLM_MODEL,)
    label: str = ""             # one extra label ...
    values: tuple[str, ...] = ()  # ... and its values (each series exists from the start, at 0)
    buckets: tuple[float, ...] = ()


def _llm(name, kind, unit, text, **kw) -> MetricSpec:
    return MetricSpec(name, kind, unit, text, models=(LLM_MODEL,), **kw)


def _pre(name, kind, unit, text, **kw) -> MetricSpec:
    return MetricSpec(name, kind, unit, text, models=(PREPROCESS_MODEL,), **kw)


METRICS: tuple[MetricSpec, ...] = (
    # -- SLO metrics (vLLM's names) ---------------------------------------------------------------------------
    _llm("videochat_time_to_first_token_seconds", "histogram", "seconds",
         "Arrival at the ensemble (preprocessing) to the first generated token, successful requests",
         buckets=TTFT_BUCKETS),
    _llm("videochat_e2e_request_latency_seconds", "histogram", "seconds",
         "Arrival at the ensemble to the final response, successful requests", buckets=E2E_BUCKETS),
    _llm("videochat_request_queue_time_seconds", "histogram", "seconds",
         "Arrival at videochat_llm to admission into the running batch", buckets=QUEUE_BUCKETS),
    _llm("videochat_time_per_output_token_seconds", "histogram", "seconds",
         "(final - first token) / (tokens - 1) per successful request with 2+ tokens", buckets=TPOT_BUCKETS),
    _llm("videochat_vision_time_seconds", "histogram", "seconds",
         "One vision pass (ViT + QFormer) of the requests admitted together; cache hits skip it",
         buckets=STAGE_BUCKETS),
    _llm("videochat_prefill_time_seconds", "histogram", "seconds",
         "One prefill of the requests admitted together", buckets=STAGE_BUCKETS),
    _pre("videochat_preprocess_time_seconds", "histogram", "seconds",
         "Preprocessing of one request (decode + sample + HD tiles, or a media-cache hit)", buckets=STAGE_BUCKETS),
    _llm("videochat_num_requests_running", "gauge", "requests", "Requests in the running batch now"),
    _llm("videochat_num_requests_waiting", "gauge", "requests", "Requests waiting to join the running batch"),
    _llm("videochat_num_requests_running_peak", "gauge", "requests", "Largest running batch since start"),
    _llm("videochat_queue_limit", "gauge", "requests",
         "Requests that may wait beyond the free slots (--max-queue; 0 = unbounded)"),
    _llm("videochat_request_success_total", "counter", "requests",
         "Requests finished with a final response, by finish_reason", label="finish_reason", values=FINISH_REASONS),
    MetricSpec("videochat_request_failure_total", "counter", "requests",
               "Requests that ended with an error, by gRPC code (in the model where they failed)",
               models=(PREPROCESS_MODEL, LLM_MODEL), label="code", values=FAILURE_CODES),
    # -- causes of the failures ----------------------------------------------------------------------------
    MetricSpec("videochat_requests_rejected_total", "counter", "requests",
               "Requests rejected as INVALID_ARGUMENT", models=(PREPROCESS_MODEL, LLM_MODEL)),
    _llm("videochat_requests_overloaded_total", "counter", "requests",
         "Requests refused with UNAVAILABLE because the queue was full"),
    _llm("videochat_requests_deadline_exceeded_total", "counter", "requests",
         "Requests ended by their deadline (client timeout_ms or --request-timeout-s); stage queued: never "
         "started, running: stopped mid-generation", label="stage", values=("queued", "running")),
    _llm("videochat_requests_cancelled_total", "counter", "requests", "Requests cancelled by the client"),
    _llm("videochat_requests_failed_total", "counter", "requests", "Requests failed with INTERNAL"),
    # -- work done -----------------------------------------------------------------------------------------
    _llm("videochat_prompt_tokens_total", "counter", "tokens", "LLM prompt tokens, visual ones included"),
    _llm("videochat_generated_tokens_total", "counter", "tokens", "Tokens generated"),
    _llm("videochat_videos_encoded_total", "counter", "videos", "Videos run through the vision encoder"),
    _llm("videochat_images_encoded_total", "counter", "images", "Images run through the vision encoder"),
    _llm("videochat_clips_encoded_total", "counter", "clips", "Clips (HD tiles + global view) encoded"),
    _llm("videochat_batch_size", "histogram", "requests",
         "Requests per execute call (arrival group)", buckets=BATCH_BUCKETS),
    _llm("videochat_inflight_joins_total", "counter", "requests",
         "Requests that joined while other sequences were mid-generation"),
    _llm("videochat_decode_steps_total", "counter", "steps", "Decode steps of the running batch"),
    _llm("videochat_decode_step_sequences_total", "counter", "sequences",
         "Sum over decode steps of running sequences (/ steps = mean running batch)"),
    _llm("videochat_stream_responses_total", "counter", "responses", "Streamed responses sent"),
    _llm("videochat_scheduler_seconds_total", "counter", "seconds",
         "Scheduler thread time by phase: add (vision + prefill), step (decode), send (coalesce + send)",
         label="phase", values=("add", "step", "send")),
    # -- caches --------------------------------------------------------------------------------------------
    _llm("videochat_visual_cache_hits_total", "counter", "requests",
         "Visual tokens taken from the cache (ViT + QFormer skipped)"),
    _llm("videochat_visual_cache_misses_total", "counter", "requests", "Visual-token cache misses"),
    _pre("videochat_media_cache_hits_total", "counter", "requests",
         "Preprocessed media taken from the cache (decoding skipped)"),
    _pre("videochat_media_cache_misses_total", "counter", "requests", "Media cache misses"),
    _pre("videochat_media_cache_bytes", "gauge", "bytes", "Bytes held by the media cache"),
    # -- follow-ups by media_key (docs/serving.md, "Follow-ups without re-upload") ---------------------------
    _llm("videochat_media_reference_hits_total", "counter", "requests",
         "Follow-ups by media_key answered from the visual-token cache"),
    _llm("videochat_media_reference_misses_total", "counter", "requests",
         "Follow-ups by media_key refused NOT_FOUND (not cached here)"),
    _pre("videochat_request_video_bytes", "histogram", "bytes",
         "Video bytes received per request (0: a follow-up by media_key)", buckets=UPLOAD_BYTES_BUCKETS),
    _pre("videochat_media_reuploads_total", "counter", "requests",
         "Requests that sent the bytes with a media_key (a re-upload after a miss)"),
    # -- decode isolation ----------------------------------------------------------------------------------
    _pre("videochat_decode_worker_crashes_total", "counter", "inputs", "Decode worker died on an input"),
    _pre("videochat_decode_worker_timeouts_total", "counter", "inputs", "Decode worker killed at the time limit"),
    _pre("videochat_decode_worker_oom_total", "counter", "inputs", "Decode worker hit its memory limit"),
    _pre("videochat_decode_worker_restarts_total", "counter", "workers", "Decode workers replaced"),
)
SPECS: dict[str, MetricSpec] = {s.name: s for s in METRICS}

# Renamed all at once in this release (no aliases: the old `instance` label clashed with Prometheus' own).
RENAMED = {
    "videochat_active_sequences": "videochat_num_requests_running",
    "videochat_queued_requests": "videochat_num_requests_waiting",
    "videochat_active_sequences_peak": "videochat_num_requests_running_peak",
    "videochat_scheduler_add_us_total": 'videochat_scheduler_seconds_total{phase="add"}',
    "videochat_scheduler_step_us_total": 'videochat_scheduler_seconds_total{phase="step"}',
    "videochat_scheduler_send_us_total": 'videochat_scheduler_seconds_total{phase="send"}',
    'label instance="..."': 'label model_instance="..."',
}


def series_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names a family shows in a scrape."""
    if spec.kind == "histogram":
        return (f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count")
    return (spec.name,)


def markdown_table() -> str:
    """docs/observability.md's table (every family also carries the LABELS)."""
    rows = ["| metric | type | unit | extra label | exported by | meaning |", "|---|---|---|---|---|---|"]
    for s in METRICS:
        label = f"`{s.label}`: {', '.join(s.values)}" if s.label else ""
        where = ", ".join(f"`{m}`" for m in s.models)
        rows.append(f"| `{s.name}` | {s.kind} | {s.unit} | {label} | {where} | {s.help} |")
    return "\n".join(rows)


class Families:
    """The families of one model instance, built from METRICS for its `role` (LLM_MODEL or PREPROCESS_MODEL: a
    variant such as videochat_llm_unary exports videochat_llm's); `get(name)` is the one Metric of a family,
    `get(name, value)` the one of that value of its extra label."""

    def __init__(self, pb_utils: Any, *, role: str, model: str, model_instance: str) -> None:
        self.pb = pb_utils
        self.labels = {"model": model, "model_instance": model_instance}
        self.families = []   # a MetricFamily must outlive its Metrics, so keep them
        self.metrics: dict[tuple[str, str], Any] = {}
        for spec in METRICS:
            if role in spec.models:
                self._build(spec)

    def _build(self, spec: MetricSpec) -> None:
        family = self.pb.MetricFamily(name=spec.name, description=f"{spec.help} [{spec.unit}]",
                                      kind=getattr(self.pb.MetricFamily, spec.kind.upper()))
        self.families.append(family)
        kw = {"buckets": list(spec.buckets)} if spec.kind == "histogram" else {}
        for value in spec.values or ("",):
            labels = {**self.labels, **({spec.label: value} if spec.label else {})}
            self.metrics[(spec.name, value)] = family.Metric(labels=labels, **kw)

    def get(self, name: str, value: str = "") -> Any:
        return self.metrics[(name, value)]


class Mirror:
    """Cumulative plain counters -> Prometheus counters (increment by the delta) and gauges (set)."""

    def __init__(self) -> None:
        self._counters: list[tuple[Any, Callable[[], float], list[float]]] = []
        self._gauges: list[tuple[Any, Callable[[], float], list[float | None]]] = []
        self._drains: list[Callable[[], None]] = []
        self._last = 0.0
        self._lock = threading.Lock()   # execute() and the scheduler's thread both sync

    def counter(self, metric: Any, read: Callable[[], float]) -> None:
        self._counters.append((metric, read, [0]))

    def gauge(self, metric: Any, read: Callable[[], float]) -> None:
        self._gauges.append((metric, read, [None]))

    def drain(self, flush: Callable[[], None]) -> None:
        """Called at every sync (histogram observations queued since the last one)."""
        self._drains.append(flush)

    def sync(self, *, force: bool = False) -> None:
        with self._lock:
            self._sync(force)

    def _sync(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < SYNC_INTERVAL_S:
            return
        self._last = now
        for metric, read, last in self._counters:
            value = read()
            if value > last[0]:
                metric.increment(value - last[0])
            last[0] = value
        for metric, read, last in self._gauges:
            value = float(read())
            if value != last[0]:
                metric.set(value)
                last[0] = value
        for flush in self._drains:
            flush()


_STATUS = {"invalid_arg": "INVALID_ARGUMENT", "unavailable": "UNAVAILABLE", "deadline_exceeded": "DEADLINE_EXCEEDED",
           "internal": "INTERNAL"}


def failure_code(scheduler_code: str) -> str:
    """The scheduler's error code (scheduler.INVALID_ARG, ...) -> the gRPC status name clients see."""
    return _STATUS.get(scheduler_code, "INTERNAL")


class LLMMetrics:
    def __init__(self, pb_utils: Any, *, model: str, model_instance: str = "") -> None:
        self.f = f = Families(pb_utils, role=LLM_MODEL, model=model, model_instance=model_instance)
        self.get = f.get
        self.mirror = Mirror()

    def on_batch(self, stats: Mapping[str, int]) -> None:
        self.get("videochat_batch_size").observe(stats["requests"])
        self.get("videochat_videos_encoded_total").increment(stats["videos"])
        self.get("videochat_images_encoded_total").increment(stats["images"])
        self.get("videochat_clips_encoded_total").increment(stats["clips"])

    def on_final(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        self.get("videochat_prompt_tokens_total").increment(prompt_tokens)
        self.get("videochat_generated_tokens_total").increment(completion_tokens)

    def on_rejected(self) -> None:
        """A request the adapter refused before it reached the scheduler (its inputs did not parse)."""
        self.get("videochat_requests_rejected_total").increment(1)
        self.get("videochat_request_failure_total", "INVALID_ARGUMENT").increment(1)

    def observe_finished(self, done: Any) -> None:
        """One scheduler.Finished: the SLO histograms and the outcome counters."""
        if done.error_code is None:
            reason = done.finish_reason if done.finish_reason in FINISH_REASONS else "stop"
            self.get("videochat_request_success_total", reason).increment(1)
            if reason != "cancelled":
                if done.ttft_s is not None:
                    self.get("videochat_time_to_first_token_seconds").observe(done.ttft_s)
                self.get("videochat_e2e_request_latency_seconds").observe(done.e2e_s)
                if done.tpot_s is not None:
                    self.get("videochat_time_per_output_token_seconds").observe(done.tpot_s)
        else:
            self.get("videochat_request_failure_total", failure_code(done.error_code)).increment(1)
        if done.queue_s is not None:
            self.get("videochat_request_queue_time_seconds").observe(done.queue_s)

    def watch_scheduler(self, scheduler: Any) -> None:
        s, g = scheduler.stats, self.get
        self.mirror.gauge(g("videochat_num_requests_running"), lambda: scheduler.num_active)
        self.mirror.gauge(g("videochat_num_requests_waiting"), lambda: scheduler.num_queued)
        self.mirror.gauge(g("videochat_num_requests_running_peak"), lambda: s.peak_active)
        self.mirror.gauge(g("videochat_queue_limit"), lambda: scheduler.max_queue or 0)
        for name, read in (
                ("videochat_requests_overloaded_total", lambda: s.overloaded),
                ("videochat_inflight_joins_total", lambda: s.joins),
                ("videochat_decode_steps_total", lambda: s.steps),
                ("videochat_decode_step_sequences_total", lambda: s.step_sequences),
                ("videochat_requests_cancelled_total", lambda: s.cancelled),
                ("videochat_requests_rejected_total", lambda: s.rejected),
                ("videochat_requests_failed_total", lambda: s.failed),
                ("videochat_stream_responses_total", lambda: s.responses)):
            self.mirror.counter(g(name), read)
        self.mirror.counter(g("videochat_requests_deadline_exceeded_total", "queued"), lambda: s.expired_queued)
        self.mirror.counter(g("videochat_requests_deadline_exceeded_total", "running"), lambda: s.expired_running)
        for phase in ("add", "step", "send"):
            self.mirror.counter(g("videochat_scheduler_seconds_total", phase),
                                lambda phase=phase: getattr(s, f"{phase}_s"))

        def flush() -> None:
            while scheduler.finished:
                self.observe_finished(scheduler.finished.popleft())
            while scheduler.add_timings:
                vision_s, prefill_s = scheduler.add_timings.popleft()
                if vision_s > 0:   # 0: every request of the group was a visual-cache hit
                    g("videochat_vision_time_seconds").observe(vision_s)
                g("videochat_prefill_time_seconds").observe(prefill_s)
        self.mirror.drain(flush)

    def watch_references(self, references: Any) -> None:
        self.mirror.counter(self.get("videochat_media_reference_hits_total"), lambda: references.hits)
        self.mirror.counter(self.get("videochat_media_reference_misses_total"), lambda: references.misses)

    def watch_visual_cache(self, cache: Any) -> None:
        self.mirror.counter(self.get("videochat_visual_cache_hits_total"), lambda: cache.hits)
        self.mirror.counter(self.get("videochat_visual_cache_misses_total"), lambda: cache.misses)


class PreprocessMetrics:
    def __init__(self, pb_utils: Any, *, model: str, model_instance: str, cache: Any) -> None:
        self.f = f = Families(pb_utils, role=PREPROCESS_MODEL, model=model, model_instance=model_instance)
        self.get = f.get
        self.mirror = Mirror()
        self.mirror.counter(f.get("videochat_media_cache_hits_total"), lambda: cache.hits)
        self.mirror.counter(f.get("videochat_media_cache_misses_total"), lambda: cache.misses)
        self.mirror.gauge(f.get("videochat_media_cache_bytes"), lambda: cache.bytes)

    def on_request(self, seconds: float, error_code: str | None = None) -> None:
        """One request done (error_code: the gRPC status name it failed with)."""
        if error_code is None:
            self.get("videochat_preprocess_time_seconds").observe(seconds)
            return
        self.get("videochat_request_failure_total", error_code).increment(1)
        if error_code == "INVALID_ARGUMENT":
            self.get("videochat_requests_rejected_total").increment(1)

    def on_upload(self, nbytes: int, reupload: bool) -> None:
        self.get("videochat_request_video_bytes").observe(nbytes)
        if reupload:
            self.get("videochat_media_reuploads_total").increment(1)

    def watch_decode_pool(self, stats: Any) -> None:
        """Decode isolation (decode_worker.PoolStats): inputs that crashed, hung or exhausted a worker."""
        for name, attr in (("videochat_decode_worker_crashes_total", "crashes"),
                           ("videochat_decode_worker_timeouts_total", "timeouts"),
                           ("videochat_decode_worker_oom_total", "out_of_memory"),
                           ("videochat_decode_worker_restarts_total", "restarts")):
            self.mirror.counter(self.get(name), lambda attr=attr: getattr(stats, attr))
