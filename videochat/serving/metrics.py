"""Custom Prometheus metrics of videochat_llm (exported on Triton's metrics port next to nv_inference_*).

`pb_utils` is passed in so this module imports without Triton.
"""
from __future__ import annotations

from typing import Any, Mapping

BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class LLMMetrics:
    def __init__(self, pb_utils: Any, *, model: str) -> None:
        labels = {"model": model}
        self._families = []   # a MetricFamily must outlive its Metrics, so keep them

        def counter(name: str, description: str) -> Any:
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            self._families.append(family)
            return family.Metric(labels=labels)

        self.videos = counter("videochat_videos_encoded_total", "Videos run through the vision encoder")
        self.images = counter("videochat_images_encoded_total", "Images run through the vision encoder")
        self.clips = counter("videochat_clips_encoded_total", "Clips (HD tiles + global view) encoded")
        self.prompt_tokens = counter("videochat_prompt_tokens_total", "LLM prompt tokens, visual ones included")
        self.generated_tokens = counter("videochat_generated_tokens_total", "Tokens generated")
        self.rejected = counter("videochat_requests_rejected_total", "Requests rejected as INVALID_ARGUMENT")
        hist = pb_utils.MetricFamily(name="videochat_batch_size", description="Requests per generate_stream call",
                                     kind=pb_utils.MetricFamily.HISTOGRAM)
        self._families.append(hist)
        self.batch_size = hist.Metric(labels=labels, buckets=BATCH_BUCKETS)

    def on_batch(self, stats: Mapping[str, int]) -> None:
        self.batch_size.observe(stats["requests"])
        self.videos.increment(stats["videos"])
        self.images.increment(stats["images"])
        self.clips.increment(stats["clips"])

    def on_final(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.increment(prompt_tokens)
        self.generated_tokens.increment(completion_tokens)
