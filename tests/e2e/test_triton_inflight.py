"""In-flight batching and the content caches through the real server (conftest's session `triton`):
requests that arrive while another is mid-generation join its running batch (the scheduler's join counter and
peak-active gauge on the metrics port) and every answer equals its alone answer; a repeated video is a hit of
both caches (preprocessing's media cache, the engine's visual cache) with the identical answer; cancelling a
stream straight to videochat_llm frees its slot."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from support.paths import TINY, VIDEOS
from support.server import answer_of, llm_inputs, token_responses, wait_for

LLM = {"model": "videochat_llm"}
LONG = dict(video=(TINY / "videos" / "example1.mp4").read_bytes(), image=True, prompt="Tell a long story.",
            max_new_tokens=1000)     # greedy on the tiny model: no EOS for 1000 tokens
SHORT = [dict(video=(VIDEOS / name).read_bytes(), prompt=prompt, max_new_tokens=n)
         for name, prompt, n in [("example1.mp4", "Describe the video.", 12),
                                 ("idx_solid_h264_320x240_300f.mp4", "What color is it?", 9),
                                 ("animated.gif", "What happens next?", 7),
                                 ("odd_size_vp9_333x197.webm", "Is anyone there?", 10)]]


def test_requests_join_the_running_batch_and_match_alone(triton):
    joins0 = triton.metric("videochat_inflight_joins_total", **LLM)
    with ThreadPoolExecutor(1 + len(SHORT)) as pool:
        long_future = pool.submit(triton.stream_chunks, **LONG)
        wait_for(lambda: triton.metric("videochat_num_requests_running", **LLM) >= 1, what="the long request to start")
        short_futures = [pool.submit(triton.stream, **r) for r in SHORT]
        together = [f.result() for f in short_futures]
        long_chunks = long_future.result()
        long_answer = answer_of(long_chunks)
    joins = triton.metric("videochat_inflight_joins_total", **LLM) - joins0
    peak = triton.metric("videochat_num_requests_running_peak", **LLM)
    print(f"joins during the run: {joins}, peak active sequences: {peak}")
    assert joins >= 1 and peak >= 2
    assert long_answer.usage.completion_tokens == 1000 and long_answer.finish_reason == "length"
    assert token_responses(long_chunks) == 1000          # stream_interval_ms 0: token by token
    for req, answer in zip(SHORT, together):
        alone = triton.stream(**req)
        assert (answer.text, answer.token_ids, answer.usage.prompt_tokens) == \
            (alone.text, alone.token_ids, alone.usage.prompt_tokens), req["prompt"]
    alone = triton.stream(**LONG)
    assert (long_answer.text, long_answer.token_ids) == (alone.text, alone.token_ids)


def test_repeated_video_hits_both_caches_with_the_same_answer(triton):
    # an option no other test uses, so the first call is a miss of both caches
    req = dict(video=(VIDEOS / "vfr_h264_320x240_180f.mp4").read_bytes(), num_segments=3,
               prompt="Describe the video.", max_new_tokens=8)
    names = ["videochat_media_cache_hits_total", "videochat_media_cache_misses_total",
             "videochat_visual_cache_hits_total", "videochat_visual_cache_misses_total"]

    def counts():
        return [triton.metric(n) for n in names]

    c0 = counts()
    first = triton.stream(**req)
    c1 = wait_for(lambda: (c := counts())[3] > c0[3] and c, what="the visual-cache miss")
    assert [b - a for a, b in zip(c0, c1)] == [0, 1, 0, 1]
    second = triton.stream(**{**req, "history": [("Describe the video.", first.text)], "prompt": "And then?"})
    third = triton.stream(**req)
    c2 = wait_for(lambda: (c := counts())[2] >= c1[2] + 2 and c, what="the visual-cache hits")
    assert [b - a for a, b in zip(c1, c2)] == [2, 0, 2, 0]
    assert (third.text, third.token_ids) == (first.text, first.token_ids)
    assert second.usage.completion_tokens >= 1
    unary = triton.infer(model="videochat_unary", **req)      # static path: no visual cache
    assert (unary.text, unary.token_ids) == (first.text, first.token_ids)


def test_cancelled_stream_frees_its_slot(triton):
    cancelled0 = triton.metric("videochat_requests_cancelled_total", **LLM)
    client = triton.client()
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("videochat_llm", llm_inputs("Tell a long story.", 1000))
    result, error = responses.get(timeout=60)
    assert error is None and result.as_numpy("TEXT") is not None      # generation is running
    stopper = threading.Thread(target=client.stop_stream, kwargs={"cancel_requests": True})
    stopper.start()
    stopper.join(30)
    wait_for(lambda: triton.metric("videochat_requests_cancelled_total", **LLM) == cancelled0 + 1,
             what="the cancel to reach the scheduler")
    wait_for(lambda: triton.metric("videochat_num_requests_running", **LLM) == 0, what="the slot to be freed")
    after = triton.stream(**SHORT[0])                                  # the server keeps serving
    assert after.usage.completion_tokens >= 1
