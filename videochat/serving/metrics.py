"""Custom Prometheus metrics of the python models (exported on Triton's metrics port next to nv_inference_*).

`pb_utils` is passed in so this module imports without Triton. Counters that live in plain objects (cache
hit/miss counts, scheduler stats) are mirrored with `sync(...)`: the metric is incremented by the difference since
the last sync, so the hot path only bumps Python ints and the IPC to the server happens at most every
`SYNC_INTERVAL_S`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping

BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
# video bytes received per request: 0 (a follow-up by media_key), then 64 KiB .. 1 GiB in powers of 4
UPLOAD_BYTES_BUCKETS = [0] + [64 * 1024 * 4 ** i for i in range(8)]
SYNC_INTERVAL_S = 0.1


class _Family:
    def __init__(self, pb_utils: Any, labels: Mapping[str, str]) -> None:
        self.pb = pb_utils
        self.labels = dict(labels)
        self.families = []   # a MetricFamily must outlive its Metrics, so keep them

    def metric(self, name: str, description: str, kind: str, **kwargs) -> Any:
        family = self.pb.MetricFamily(name=name, description=description,
                                      kind=getattr(self.pb.MetricFamily, kind))
        self.families.append(family)
        return family.Metric(labels=self.labels, **kwargs)

    def labelled(self, name: str, description: str, kind: str, label: str, values: tuple[str, ...]) -> dict:
        """One family, one metric per value of an extra label."""
        family = self.pb.MetricFamily(name=name, description=description,
                                      kind=getattr(self.pb.MetricFamily, kind))
        self.families.append(family)
        return {v: family.Metric(labels={**self.labels, label: v}) for v in values}


class Mirror:
    """Cumulative plain counters -> Prometheus counters (increment by the delta) and gauges (set)."""

    def __init__(self) -> None:
        self._counters: list[tuple[Any, Callable[[], int], list[int]]] = []
        self._gauges: list[tuple[Any, Callable[[], float], list[float | None]]] = []
        self._last = 0.0
        self._lock = threading.Lock()   # execute() and the scheduler's thread both sync

    def counter(self, metric: Any, read: Callable[[], int]) -> None:
        self._counters.append((metric, read, [0]))

    def gauge(self, metric: Any, read: Callable[[], float]) -> None:
        self._gauges.append((metric, read, [None]))

    def sync(self, *, force: bool = False) -> None:
        with self._lock:
            self._sync(force)

    def _sync(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < SYNC_INTERVAL_S:
            return
        self._last = now
        for metric, read, last in self._counters:
            value = int(read())
            if value > last[0]:
                metric.increment(value - last[0])
            last[0] = value
        for metric, read, last in self._gauges:
            value = float(read())
            if value != last[0]:
                metric.set(value)
                last[0] = value


class LLMMetrics:
    def __init__(self, pb_utils: Any, *, model: str, instance: str = "") -> None:
        f = _Family(pb_utils, {"model": model})
        self._f = f
        g = _Family(pb_utils, {"model": model, "instance": instance})   # per-instance values (gauges, caches)
        self._g = g
        self.videos = f.metric("videochat_videos_encoded_total", "Videos run through the vision encoder", "COUNTER")
        self.images = f.metric("videochat_images_encoded_total", "Images run through the vision encoder", "COUNTER")
        self.clips = f.metric("videochat_clips_encoded_total", "Clips (HD tiles + global view) encoded", "COUNTER")
        self.prompt_tokens = f.metric("videochat_prompt_tokens_total", "LLM prompt tokens, visual ones included",
                                      "COUNTER")
        self.generated_tokens = f.metric("videochat_generated_tokens_total", "Tokens generated", "COUNTER")
        self.rejected = f.metric("videochat_requests_rejected_total", "Requests rejected as INVALID_ARGUMENT",
                                 "COUNTER")
        self.batch_size = f.metric("videochat_batch_size",
                                   "Requests per batch call (static: generate_stream; in-flight: engine.add)",
                                   "HISTOGRAM", buckets=BATCH_BUCKETS)
        # in-flight batching (scheduler) and the engine's visual-token cache
        self.active = g.metric("videochat_active_sequences", "Sequences in the running batch now", "GAUGE")
        self.peak_active = g.metric("videochat_active_sequences_peak", "Largest running batch since start",
                                    "GAUGE")
        self.queued = g.metric("videochat_queued_requests", "Requests waiting to join the running batch", "GAUGE")
        self.queue_limit = g.metric("videochat_queue_limit",
                                    "Requests that may wait beyond the free slots (--max-queue)", "GAUGE")
        self.overloaded = g.metric("videochat_requests_overloaded_total",
                                   "Requests refused with UNAVAILABLE because the queue was full", "COUNTER")
        # stage "queued": never started; "running": stopped mid-generation, its slot freed
        self.deadline_exceeded = g.labelled("videochat_requests_deadline_exceeded_total",
                                            "Requests ended by their deadline (client timeout_ms or "
                                            "--request-timeout-s)", "COUNTER", "stage", ("queued", "running"))
        self.joins = g.metric("videochat_inflight_joins_total",
                              "Requests that joined while other sequences were mid-generation", "COUNTER")
        self.steps = g.metric("videochat_decode_steps_total", "Decode steps of the running batch", "COUNTER")
        self.step_sequences = g.metric("videochat_decode_step_sequences_total",
                                       "Sum over decode steps of active sequences (/ steps = mean batch)", "COUNTER")
        self.cancelled = g.metric("videochat_requests_cancelled_total", "Requests cancelled by the client",
                                  "COUNTER")
        self.failed = g.metric("videochat_requests_failed_total", "Requests failed with INTERNAL", "COUNTER")
        self.add_us = g.metric("videochat_scheduler_add_us_total", "Time in engine.add (vision + prefill)", "COUNTER")
        self.step_us = g.metric("videochat_scheduler_step_us_total", "Time in engine.step (decode)", "COUNTER")
        self.send_us = g.metric("videochat_scheduler_send_us_total", "Time coalescing + sending responses",
                                "COUNTER")
        self.responses = g.metric("videochat_stream_responses_total", "Streamed responses sent", "COUNTER")
        self.visual_hits = g.metric("videochat_visual_cache_hits_total",
                                    "Visual tokens taken from the cache (ViT + QFormer skipped)", "COUNTER")
        self.visual_misses = g.metric("videochat_visual_cache_misses_total", "Visual-token cache misses",
                                      "COUNTER")
        # follow-ups by media_key (docs/serving.md, "Follow-ups without re-upload"); no instance label: a sum
        self.reference_hits = f.metric("videochat_media_reference_hits_total",
                                       "Follow-ups by media_key answered from the visual-token cache", "COUNTER")
        self.reference_misses = f.metric("videochat_media_reference_misses_total",
                                         "Follow-ups by media_key refused NOT_FOUND (not cached here)", "COUNTER")
        self.mirror = Mirror()

    def on_batch(self, stats: Mapping[str, int]) -> None:
        self.batch_size.observe(stats["requests"])
        self.videos.increment(stats["videos"])
        self.images.increment(stats["images"])
        self.clips.increment(stats["clips"])

    def on_final(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.increment(prompt_tokens)
        self.generated_tokens.increment(completion_tokens)

    def watch_scheduler(self, scheduler: Any) -> None:
        s = scheduler.stats
        self.mirror.gauge(self.active, lambda: scheduler.num_active)
        self.mirror.gauge(self.queued, lambda: scheduler.num_queued)
        self.mirror.gauge(self.peak_active, lambda: s.peak_active)
        self.mirror.gauge(self.queue_limit, lambda: scheduler.max_queue or 0)
        self.mirror.counter(self.overloaded, lambda: s.overloaded)
        self.mirror.counter(self.deadline_exceeded["queued"], lambda: s.expired_queued)
        self.mirror.counter(self.deadline_exceeded["running"], lambda: s.expired_running)
        self.mirror.counter(self.joins, lambda: s.joins)
        self.mirror.counter(self.steps, lambda: s.steps)
        self.mirror.counter(self.step_sequences, lambda: s.step_sequences)
        self.mirror.counter(self.cancelled, lambda: s.cancelled)
        self.mirror.counter(self.rejected, lambda: s.rejected)
        self.mirror.counter(self.failed, lambda: s.failed)
        self.mirror.counter(self.add_us, lambda: int(s.add_s * 1e6))
        self.mirror.counter(self.step_us, lambda: int(s.step_s * 1e6))
        self.mirror.counter(self.send_us, lambda: int(s.send_s * 1e6))
        self.mirror.counter(self.responses, lambda: s.responses)

    def watch_references(self, references: Any) -> None:
        self.mirror.counter(self.reference_hits, lambda: references.hits)
        self.mirror.counter(self.reference_misses, lambda: references.misses)

    def watch_visual_cache(self, cache: Any) -> None:
        self.mirror.counter(self.visual_hits, lambda: cache.hits)
        self.mirror.counter(self.visual_misses, lambda: cache.misses)


class PreprocessMetrics:
    def __init__(self, pb_utils: Any, *, model: str, instance: str, cache: Any) -> None:
        f = _Family(pb_utils, {"model": model, "instance": instance})   # one cache per instance (process)
        self._f = f
        self.mirror = Mirror()
        self.mirror.counter(f.metric("videochat_media_cache_hits_total",
                                     "Preprocessed media taken from the cache (decoding skipped)", "COUNTER"),
                            lambda: cache.hits)
        self.mirror.counter(f.metric("videochat_media_cache_misses_total", "Media cache misses", "COUNTER"),
                            lambda: cache.misses)
        self.mirror.gauge(f.metric("videochat_media_cache_bytes", "Bytes held by the media cache", "GAUGE"),
                          lambda: cache.bytes)
        totals = _Family(pb_utils, {"model": model})   # summed over instances
        self.video_bytes = totals.metric("videochat_request_video_bytes",
                                         "Video bytes received per request (0: a follow-up by media_key)",
                                         "HISTOGRAM", buckets=UPLOAD_BYTES_BUCKETS)
        self.reuploads = totals.metric("videochat_media_reuploads_total",
                                       "Requests that sent the bytes with a media_key (a re-upload after a miss)",
                                       "COUNTER")
        self._totals = totals

    def on_upload(self, nbytes: int, reupload: bool) -> None:
        self.video_bytes.observe(nbytes)
        if reupload:
            self.reuploads.increment(1)

    def watch_decode_pool(self, stats: Any) -> None:
        """Decode isolation (decode_worker.PoolStats): inputs that crashed, hung or exhausted a worker."""
        for name, attr, what in (
                ("videochat_decode_worker_crashes_total", "crashes", "Decode worker died on an input"),
                ("videochat_decode_worker_timeouts_total", "timeouts", "Decode worker killed at the time limit"),
                ("videochat_decode_worker_oom_total", "out_of_memory", "Decode worker hit its memory limit"),
                ("videochat_decode_worker_restarts_total", "restarts", "Decode workers replaced")):
            self.mirror.counter(self._f.metric(name, what, "COUNTER"), lambda attr=attr: getattr(stats, attr))
