"""Follow-ups without re-upload through a real tritonserver (docs/serving.md and docs/client.md, "Follow-ups
without re-upload"): the golden conversations answer the same by media_key as with the bytes, while turns
2..N send no video bytes; a key this replica never issued is refused NOT_FOUND "media not cached: " (one try,
no loop) and, with the bytes at hand, recovered by one counted re-upload; a small visual-token cache evicts and
the evicted key is recovered the same way, as is a key from another replica; `--no-media-reference` and
`media_reference=False` send the bytes every turn; the CLI's `video_bytes_sent` and the load tool's counts."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from support.paths import TINY
from support.server import running_server, wait_for
from videochat_client import AsyncVideoChatClient, Conversation, VideoChatClient
from videochat_client.errors import MediaNotCached
from videochat_client.schema import ERROR_PREFIXES, MEDIA_NOT_CACHED

GOLDEN = json.loads((TINY / "golden.json").read_text())
MAX_NEW = GOLDEN["generation_config"]["max_new_tokens"]
VIDEO = TINY / "videos" / "example1.mp4"
PREFIX = ERROR_PREFIXES[MEDIA_NOT_CACHED]


def case_options(case: dict) -> dict:
    pre = case["preprocess"]
    return dict(image=case["media_type"] == "image", num_segments=pre["num_segments"], hd_num=pre["hd_num"],
                padding=pre["padding"], msg=case["msg"], instruction=case["instruction"])


def converse(url: str, case: dict, *, media_reference: bool):
    with VideoChatClient(url, max_retries=0, timeout=120) as client:
        conv = client.conversation(TINY / case["video"], media_reference=media_reference, **case_options(case))
        answers = [conv.ask(t["user_prompt"], max_new_tokens=MAX_NEW) for t in case["turns"]]
        return answers, conv


def forged_key() -> str:
    return "mk1:" + uuid.uuid4().hex * 2


def metric(triton, name: str) -> float:
    return triton.metric(name)


def grows_to(triton, name: str, value: float) -> None:
    """The counter reaches `value` (the models mirror their counters to Triton a moment after the event)."""
    wait_for(lambda: metric(triton, name) >= value, timeout_s=10, what=f"{name} >= {value}")
    assert metric(triton, name) == value


@pytest.mark.parametrize("case", [c for c in GOLDEN["cases"] if len(c["turns"]) > 1], ids=lambda c: c["id"])
def test_followups_by_reference_answer_as_with_bytes(triton, case):
    hits = metric(triton, "videochat_media_reference_hits_total")
    by_ref, conv = converse(triton.url, case, media_reference=True)
    by_bytes, plain = converse(triton.url, case, media_reference=False)
    size = (TINY / case["video"]).stat().st_size
    for ref, raw, turn in zip(by_ref, by_bytes, case["turns"]):
        assert (ref.text, ref.token_ids, ref.usage) == (raw.text, raw.token_ids, raw.usage)
        assert ref.text == turn["response"]
    assert [a.video_bytes_sent for a in by_ref] == [size] + [0] * (len(by_ref) - 1)
    assert [a.video_bytes_sent for a in by_bytes] == [size] * len(by_bytes)
    assert conv.reuploads == 0 and conv.video_bytes_sent == size and plain.media_key is None
    assert by_ref[0].media_key.startswith("mk1:") and len({a.media_key for a in by_ref}) == 1
    wait_for(lambda: metric(triton, "videochat_media_reference_hits_total") - hits >= len(by_ref) - 1, timeout_s=10,
             what="the reference hits")


def test_a_key_never_issued_is_refused_once_and_recovered_with_the_bytes(triton):
    misses = metric(triton, "videochat_media_reference_misses_total")
    reuploads = metric(triton, "videochat_media_reuploads_total")
    with VideoChatClient(triton.url, max_retries=2, timeout=60) as client:
        with pytest.raises(MediaNotCached) as info:   # only a key: the documented error, after one try
            list(client.generate(media_key=forged_key(), prompt="What is it?"))
        assert info.value.code == "NOT_FOUND" and PREFIX in info.value.message
        grows_to(triton, "videochat_media_reference_misses_total", misses + 1)
        conv = client.conversation(VIDEO)
        conv.media_key = forged_key()                 # a stale or forged key, the bytes at hand
        answer = conv.ask("What is it?", max_new_tokens=4)
    assert answer.reuploaded and conv.reuploads == 1 and answer.video_bytes_sent == VIDEO.stat().st_size
    assert answer.media_key.startswith("mk1:") and conv.media_key == answer.media_key
    grows_to(triton, "videochat_media_reference_misses_total", misses + 2)
    grows_to(triton, "videochat_media_reuploads_total", reuploads + 1)


def test_unary_ensemble_answers_the_miss_with_grpc_not_found(triton):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    from videochat_client.protocol import build_inputs

    with pytest.raises(InferenceServerException) as info:
        grpcclient.InferenceServerClient(triton.url).infer(
            "videochat_unary", build_inputs(video=None, media_key=forged_key(), prompt="q"), client_timeout=60)
    assert info.value.status() == str(grpc.StatusCode.NOT_FOUND) and PREFIX in info.value.message()
    with pytest.raises(InferenceServerException) as info:   # neither bytes nor key: the caller's error
        grpcclient.InferenceServerClient(triton.url).infer(
            "videochat_unary", build_inputs(video=None, media_key="", prompt="q"), client_timeout=60)
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and "no video" in info.value.message()


def test_cli_reports_video_bytes_sent_and_no_media_reference_sends_them_every_turn(triton):
    size = VIDEO.stat().st_size

    def ask(*flags: str) -> list[int]:
        out = subprocess.run([sys.executable, "-m", "videochat_client.cli", "ask", "--url", triton.url, "--json",
                              "--max-new-tokens", "3", *flags, str(VIDEO), "Describe it.", "And then?", "Why?"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        return [t["video_bytes_sent"] for t in json.loads(out.stdout)["turns"]]

    assert ask() == [size, 0, 0]
    assert ask("--no-media-reference") == [size, size, size]


def test_async_conversation_and_the_load_tool_send_bytes_once(triton):
    from videochat_client.loadtest import LoadConfig, run_loadtest

    async def two_turns():
        async with AsyncVideoChatClient(triton.url, max_retries=0, timeout=60) as client:
            conv = client.conversation(VIDEO, image=True)
            return [await conv.ask(q, max_new_tokens=3) for q in ("What is it?", "Colours?")]

    first, second = asyncio.run(two_turns())
    assert (first.video_bytes_sent, second.video_bytes_sent) == (VIDEO.stat().st_size, 0)

    def level(media_reference: bool) -> dict:
        cfg = LoadConfig(url=triton.url, videos=[str(VIDEO)], concurrency=[1], requests=3, turns=3,
                         max_new_tokens=2, metrics_url=triton.metrics_url, media_reference=media_reference)
        return asyncio.run(run_loadtest(cfg, progress_stream=None))["levels"][0]

    ref, raw = level(True), level(False)
    assert ref["failed_requests"] == raw["failed_requests"] == 0
    assert (ref["video_bytes_sent"], ref["reuploads"]) == (VIDEO.stat().st_size, 0)
    assert raw["video_bytes_sent"] == 3 * VIDEO.stat().st_size


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A second replica whose visual-token cache holds only a few videos (1 MiB)."""
    with running_server(tmp_path_factory.mktemp("small_cache"), max_batch_size=4, preprocess_instances=1,
                        visual_cache_mb=1, media_cache_mb=0) as handle:
        yield handle


def test_eviction_and_another_replica_are_recovered_transparently(triton, small_cache):
    from videochat.model.config import VideoChatConfig

    hidden = VideoChatConfig.from_json(TINY / "config.json").llm.hidden_size
    with VideoChatClient(small_cache.url, max_retries=0, timeout=120) as client:
        conv = client.conversation(VIDEO)
        first = conv.ask("Describe it.", max_new_tokens=3)
        entry = first.usage.prompt_tokens // 96 * 96 * hidden * 4   # fp32 visual tokens of this video
        fills = (1 << 20) // max(entry, 1) + 2
        for k in range(fills):          # other options, other pixels: distinct entries push the first one out
            client.conversation(VIDEO, num_segments=1 + k % 7, hd_num=1 + k // 7).ask("Hi.", max_new_tokens=1)
        reuploads = small_cache.metric("videochat_media_reuploads_total")
        again = conv.ask("And then?", max_new_tokens=3)
        assert again.reuploaded and conv.reuploads == 1 and again.video_bytes_sent == VIDEO.stat().st_size
        grows_to(small_cache, "videochat_media_reuploads_total", reuploads + 1)
        assert small_cache.metric("videochat_media_reference_misses_total") >= 1
        third = conv.ask("Why?", max_new_tokens=3)   # cached again: by reference
        assert third.video_bytes_sent == 0 and not third.reuploaded
    # the same conversation (saved with its key) continued on another replica: its key misses there
    with VideoChatClient(triton.url, max_retries=0, timeout=120) as client:
        moved = Conversation.from_json(conv.to_json(), client)
        assert moved.media_key == conv.media_key
        answer = moved.ask("Anything else?", max_new_tokens=3)
        assert answer.reuploaded and moved.reuploads == 1 and moved.media_key != conv.media_key
