"""Follow-ups without re-upload, without a server: preprocessing of a reference (no decoding), the media keys
(HMAC under the instance's secret), their lookup in the visual-token cache (hit, miss, eviction), the engine
answering from given visual tokens exactly as from the pixels, and the client's attempt plan and error
mapping (docs/serving.md and docs/client.md, "Follow-ups without re-upload")."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from support.paths import TINY
from videochat_client import schema
from videochat_client.errors import InvalidArgument, MediaNotCached, Unavailable, classify_message, to_error
from videochat_client.protocol import build_inputs, media_attempts
from videochat.serving.llm import MEDIA_KEY_PREFIX, MediaReferences, StreamCoalescer, build_chat_request
from videochat.serving.preprocess import EMPTY_PIXELS_SHAPE, preprocess_request
from videochat.serving.requests import MediaNotCached as ServerMiss
from videochat.serving.requests import RequestError, chat_fields_to_arrays, getter_from_mapping, not_cached
from videochat.serving.settings import PreprocessSettings

IMAGE = (TINY / "videos" / "example1.mp4").read_bytes()


def b(s: str | bytes) -> np.ndarray:
    return np.array([[s.encode() if isinstance(s, str) else s]], dtype=object)


def _never_decode(*_args):
    raise AssertionError("a reference must not be decoded")


def test_a_reference_is_not_decoded_and_counts_no_bytes():
    seen = []
    out = preprocess_request(getter_from_mapping({"MEDIA_REFERENCE": b("mk1:abc"), "PROMPT": b("hi")}),
                             PreprocessSettings(), decode=_never_decode, on_upload=lambda n, re: seen.append((n, re)))
    assert out["PIXEL_VALUES"].shape == EMPTY_PIXELS_SHAPE and out["PIXEL_VALUES"].dtype == np.float16
    info = json.loads(out["MEDIA_INFO"][0, 0])
    assert info == {"media_reference": "mk1:abc", "media_type": "video"}
    assert seen == [(0, False)]


def test_bytes_with_a_key_are_a_counted_reupload_and_neither_is_refused():
    seen = []
    out = preprocess_request(getter_from_mapping({"VIDEO": b(IMAGE), "MEDIA_REFERENCE": b("mk1:stale"), "PROMPT": b("hi"),
                                                  "IMAGE": np.array([[True]])}),
                             PreprocessSettings(), on_upload=lambda n, re: seen.append((n, re)))
    assert out["PIXEL_VALUES"].shape[1] >= 1 and "media_key" in json.loads(out["MEDIA_INFO"][0, 0])
    assert seen == [(len(IMAGE), True)]
    with pytest.raises(RequestError, match="no video"):
        preprocess_request(getter_from_mapping({"PROMPT": b("hi")}), PreprocessSettings())
    with pytest.raises(RequestError, match="longer than"):
        preprocess_request(getter_from_mapping({"PROMPT": b("hi"), "MEDIA_REFERENCE": b("k" * 300)}), PreprocessSettings())


class _Cache:
    """The VisualCache's interface over a dict (max_bytes, get, __contains__, put), no torch sizes needed."""

    def __init__(self, max_bytes: int = 1 << 20):
        self.max_bytes, self.entries = max_bytes, {}

    def get(self, key):
        return self.entries.get(key)

    def __contains__(self, key):
        return key in self.entries


def test_media_keys_are_hmacs_of_the_content_under_the_instance_secret():
    a, again, other = MediaReferences(_Cache(), b"s" * 32), MediaReferences(_Cache(), b"s" * 32), MediaReferences(_Cache())
    content = "sha256:00ff:image=0:num_segments=8:hd_num=6:padding=0:resolution=224"
    key = a.key_for(content)
    assert key.startswith(MEDIA_KEY_PREFIX) and len(key) == len(MEDIA_KEY_PREFIX) + 64
    assert key == again.key_for(content) and key != a.key_for(content + "x")
    assert other.key_for(content) != key           # another instance (another random secret): another key
    assert "00ff" not in key                         # the content hash does not show


def _llm_inputs(info: dict, pixels: np.ndarray, prompt: str = "hi", instruction: str = "") -> dict:
    from videochat.serving.requests import parse_chat_fields
    fields = parse_chat_fields(getter_from_mapping({"PROMPT": b(prompt), "INSTRUCTION": b(instruction)}),
                               max_new_tokens_limit=16)
    arrays = {k[len("REQ_"):]: v for k, v in chat_fields_to_arrays(fields).items()}
    return {**arrays, "PIXEL_VALUES": pixels, "MEDIA_INFO": b(json.dumps(info))}


def test_reference_hit_miss_and_the_returned_key():
    from videochat.runtime.visual_cache import VisualCache, VisualKey
    cache = VisualCache(1 << 20)
    refs = MediaReferences(cache)
    pixels = np.zeros((1, 1, 1, 3, 224, 224), np.float16)
    upload = build_chat_request(getter_from_mapping(_llm_inputs({"media_type": "image", "media_key": "sha256:x"},
                                                                pixels)), max_new_tokens_limit=16, references=refs)
    key = upload.chat_request.media_key
    assert key == refs.key_for("sha256:x") and upload.media_key() == ""   # not cached yet: no key to give out
    tokens = torch.ones(96, 8)
    cache.put(VisualKey(key, "image", None), tokens)
    assert upload.media_key() == key
    ref_inputs = _llm_inputs({"media_type": "image", "media_reference": key}, np.zeros(EMPTY_PIXELS_SHAPE, np.float16))
    hit = build_chat_request(getter_from_mapping(ref_inputs), max_new_tokens_limit=16, references=refs)
    assert hit.reference and hit.clips == 0 and hit.chat_request.media is None
    assert torch.equal(hit.chat_request.visual_tokens, tokens) and hit.media_key() == key
    for info in ({"media_type": "image", "media_reference": "mk1:" + "0" * 64},   # forged / never issued
                 {"media_type": "video", "media_reference": key}):                # other options: other pixels
        with pytest.raises(ServerMiss):
            build_chat_request(getter_from_mapping({**ref_inputs, "MEDIA_INFO": b(json.dumps(info))}),
                               max_new_tokens_limit=16, references=refs)
    with pytest.raises(ServerMiss):   # another instruction conditions the QFormer: not the cached tokens
        build_chat_request(getter_from_mapping(_llm_inputs({"media_type": "image", "media_reference": key},
                                                           np.zeros(EMPTY_PIXELS_SHAPE, np.float16),
                                                           instruction="Watch closely.")),
                           max_new_tokens_limit=16, references=refs)
    assert (refs.hits, refs.misses) == (1, 3)
    off = MediaReferences(None)
    with pytest.raises(ServerMiss, match="cache is off"):
        build_chat_request(getter_from_mapping(ref_inputs), max_new_tokens_limit=16, references=off)


def test_eviction_under_a_small_budget_makes_the_oldest_key_miss():
    from videochat.runtime.visual_cache import VisualCache, VisualKey
    cache = VisualCache(2 * 96 * 8 * 4)            # room for two [96, 8] fp32 entries
    refs = MediaReferences(cache)
    keys = [refs.key_for(f"sha256:{i}") for i in range(3)]
    for key in keys:
        cache.put(VisualKey(key, "video", None), torch.zeros(96, 8))
    with pytest.raises(ServerMiss):
        refs.resolve(keys[0], "video", None)
    assert refs.resolve(keys[2], "video", None).shape == (96, 8)


def test_the_coalescer_reads_the_key_once_at_the_first_send():
    from videochat.runtime.types import TokenEvent
    calls = []
    c = StreamCoalescer(0.0, media_key=lambda: calls.append(1) or "mk1:k")
    first, _ = c.push(TokenEvent(token_id=1, text="a", finished=False, prompt_tokens=3))
    last, final = c.push(TokenEvent(token_id=2, text="b", finished=True, finish_reason="stop"))
    assert final and first["MEDIA_KEY"][0, 0] == last["MEDIA_KEY"][0, 0] == b"mk1:k" and calls == [1]


def test_engine_answers_from_given_tokens_as_from_the_pixels():
    """The same greedy answer whether the engine encodes the pixels or takes the cached visual tokens."""
    from videochat.model.videochat_model import VideoChatModel
    from videochat.runtime.engine import GenerationEngine
    from videochat.runtime.types import ChatRequest, GenerationParams
    from videochat.runtime.visual_cache import VisualCache, VisualKey

    model = VideoChatModel.from_checkpoint(TINY, device="cpu")
    media = torch.rand(2, 4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    params = GenerationParams(max_new_tokens=6)
    cache = VisualCache(64 << 20)

    def run(request):
        engine = GenerationEngine(model, visual_cache=cache)
        engine.add([request])
        ids = []
        while engine.num_active:
            ids += [e.token_id for _, e in engine.step()]
        return ids

    first = ChatRequest(media=media, prompt="What happens?", params=params, media_key="mk1:k")
    by_pixels = run(first)
    tokens = cache.get(VisualKey.of(first))
    assert tokens is not None
    follow = ChatRequest(media=None, visual_tokens=tokens, prompt="What happens?", params=params, media_key="mk1:k")
    assert run(follow) == by_pixels
    assert follow.clips(tokens.shape[0] // 2) == 2
    with pytest.raises(ValueError):
        ChatRequest(media=media, visual_tokens=tokens, prompt="x")
    with pytest.raises(ValueError):
        ChatRequest(media=None, prompt="x")


# -- client ---------------------------------------------------------------------------------------------
def test_attempt_plan_key_first_then_bytes_once():
    assert media_attempts(b"v", "k") == [(None, "k"), (b"v", "k")]
    assert media_attempts(b"v", None) == [(b"v", None)]
    assert media_attempts(None, "k") == [(None, "k")]
    with pytest.raises(InvalidArgument):
        media_attempts(None, None)
    names = [i.name() for i in build_inputs(video=None, media_key="k", prompt="q")]
    assert "video" not in names and "media_reference" in names


def test_the_miss_error_maps_to_media_not_cached_in_and_out_of_streams():
    message = not_cached(ServerMiss("media_key is not cached on this replica"))
    assert message.startswith(schema.ERROR_PREFIXES[schema.MEDIA_NOT_CACHED])
    assert classify_message("in ensemble 'videochat', " + message) == "NOT_FOUND"
    from tritonclient.utils import InferenceServerException
    err = to_error(InferenceServerException("in ensemble 'videochat', " + message))   # in a stream: no status
    assert isinstance(err, MediaNotCached) and err.code == "NOT_FOUND"
    draining = to_error(InferenceServerException("Request for unknown model: 'videochat' has no available versions",
                                                 status="StatusCode.NOT_FOUND"))
    assert isinstance(draining, Unavailable)   # Triton's own NOT_FOUND stays a retryable draining replica


def test_a_conversation_sends_the_key_after_the_first_turn_and_bytes_after_a_miss():
    """The conversation's state machine against a stand-in client that records what each turn was given."""
    from videochat_client.conversation import Conversation
    from videochat_client.types import Answer, Timings, Usage

    class Recorder:
        def __init__(self, keys):
            self.calls, self.keys = [], list(keys)

        def generate(self, **kw):
            self.calls.append((kw["media_key"], kw["video"] is not None))
            kw["sent"].video_bytes_sent += 0 if kw["media_key"] else len(kw["video"])
            return iter(())

    rec = Recorder([])
    conv = Conversation(rec, video=b"video-bytes")
    answer = Answer(text="a", token_ids=(), usage=Usage(1, 1, 2), timings=Timings(1.0, 1.0), finish_reason="stop",
                    prompt="q", media_key="mk1:one")
    kw = conv._request("q", {}, timeout=None)
    assert kw["media_key"] is None and conv._on_done(kw)(answer).video_bytes_sent == 0
    assert conv.media_key == "mk1:one"
    kw = conv._request("q2", {}, timeout=None)
    assert kw["media_key"] == "mk1:one" and kw["video"] == b"video-bytes"   # bytes kept for a miss
    kw["sent"].reuploaded, kw["sent"].video_bytes_sent = True, 11
    done = conv._on_done(kw)(replace(answer, media_key=""))
    assert done.reuploaded and conv.reuploads == 1 and conv.media_key is None and conv.video_bytes_sent == 11
    off = Conversation(rec, video=b"v", media_reference=False)
    off._on_done(off._request("q", {}, timeout=None))(answer)
    assert off.media_key is None and off._request("q", {}, timeout=None)["media_key"] is None
    saved = json.loads(conv.to_json())
    assert "media_key" in saved and Conversation.from_json(
        {**saved, "media_key": "mk1:x"}, rec, video=b"v").media_key == "mk1:x"
