"""16 concurrent requests (different videos, prompts, lengths) through the ensemble all get the answer they get
alone, and Triton's statistics show videochat_llm executions with batch size > 1 (dynamic, ragged batching)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from support.paths import TINY, VIDEOS

FILES = ["example1.mp4", "idx_solid_h264_320x240_300f.mp4", "faststart_h264_640x360_6s.mp4",
         "odd_size_vp9_333x197.webm", "vfr_h264_320x240_180f.mp4", "idx_three_frames_h264_320x240.mp4",
         "animated.gif", "idx_solid_mjpeg_320x240_150f.mov"]
PROMPTS = ["Describe the video.", "What happens next?", "What color is it?", "Is anyone there?"]


def requests() -> list[dict]:
    out = []
    for i in range(16):
        path = TINY / "videos" / FILES[0] if i == 0 else VIDEOS / FILES[i % len(FILES)]
        out.append(dict(video=path.read_bytes(), prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=4 + i % 7,
                        padding=i % 3 == 0, num_segments=4 + 4 * (i % 2), image=i == 15))
    return out


def batch_sizes(client, model: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("batch_stats", [])
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}


def test_concurrent_requests_batch_and_match_solo_answers(triton):
    reqs = requests()
    # Alone first: this also fills the media cache, so in the concurrent run preprocessing (one instance here)
    # answers from it at once and the requests reach videochat_llm together instead of one decode apart.
    alone = [triton.stream(**req) for req in reqs]
    client = triton.client()
    before = batch_sizes(client, "videochat_llm")
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda r: triton.stream(**r), reqs))
    after = batch_sizes(client, "videochat_llm")
    new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    print("videochat_llm executions by batch size during the concurrent run:", new)
    assert any(size > 1 and count > 0 for size, count in new.items()), new
    for req, answer, solo in zip(reqs, together, alone):
        assert (answer.text, answer.token_ids) == (solo.text, solo.token_ids), req["prompt"]
        assert answer.usage.completion_tokens == len(answer.token_ids) <= req["max_new_tokens"]
