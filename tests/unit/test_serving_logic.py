"""The Triton adapters' logic without Triton: request parsing and defaults, settings validation, and config
rendering."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from support.paths import TINY
from videochat_client import schema
from videochat.launch.render import RepoOptions, render_repository
from videochat.serving.requests import (CHAT_FIELDS, RequestError, chat_fields_to_arrays, getter_from_mapping,
                                        parse_chat_fields, parse_media_options)
from videochat.serving.settings import LLMSettings, SettingsError


def b(s: str) -> np.ndarray:
    return np.array([[s.encode()]], dtype=object)


def test_chat_fields_defaults_and_roundtrip():
    fields = parse_chat_fields(getter_from_mapping({"PROMPT": b("hi")}), max_new_tokens_limit=64)
    assert (fields.max_new_tokens, fields.do_sample, fields.seed, fields.instruction, fields.history) == \
        (64, False, None, None, ())      # omitted max_new_tokens: 200, capped by the server's limit
    arrays = chat_fields_to_arrays(parse_chat_fields(getter_from_mapping(
        {"PROMPT": b("hi"), "HISTORY": b('[["q", "a"]]'), "SEED": np.array([[7]]), "MAX_NEW_TOKENS": np.array([[5]])}),
        max_new_tokens_limit=64))
    assert set(arrays) == {"REQ_" + f.name.upper() for f in CHAT_FIELDS}
    again = parse_chat_fields(getter_from_mapping(arrays), prefix="REQ_", max_new_tokens_limit=64)
    assert again.history == (("q", "a"),) and again.seed == 7 and again.max_new_tokens == 5


@pytest.mark.parametrize("bad", [{"MAX_NEW_TOKENS": np.array([[0]])}, {"MAX_NEW_TOKENS": np.array([[65]])},
                                 {"TEMPERATURE": np.array([[-1.0]])}, {"TOP_P": np.array([[1.5]])},
                                 {"HISTORY": b("[1, 2]")}, {"PROMPT": b("  ")}, {"PROMPT": None}])
def test_bad_chat_fields_raise_request_error(bad):
    tensors = {"PROMPT": b("hi"), **bad}
    with pytest.raises(RequestError):
        parse_chat_fields(getter_from_mapping({k: v for k, v in tensors.items() if v is not None}),
                          max_new_tokens_limit=64)


def test_media_options():
    assert parse_media_options(getter_from_mapping({})).num_segments == 8
    with pytest.raises(RequestError):
        parse_media_options(getter_from_mapping({"NUM_SEGMENTS": np.array([[0]], np.int32)}))


def test_settings_reject_bad_config():
    args = {"model_config": json.dumps({"parameters": {"checkpoint_path": {"string_value": str(TINY)},
                                                       "dtype": {"string_value": "int8"}}}),
            "model_instance_kind": "CPU"}
    with pytest.raises(SettingsError, match="dtype"):
        LLMSettings.from_args(args)
    ok = json.loads(args["model_config"])
    ok["parameters"]["dtype"]["string_value"] = "auto"
    ok["model_transaction_policy"] = {"decoupled": True}
    s = LLMSettings.from_args({**args, "model_config": json.dumps(ok), "model_instance_kind": "GPU",
                               "model_instance_device_id": "1"})
    assert (s.device, s.decoupled) == ("cuda:1", True)


def test_render_gpu_unary_no_batching(tmp_path):
    repo = render_repository(RepoOptions(checkpoint=TINY, device="cuda", decoupled=False, max_batch_size=1),
                             tmp_path / "repo")
    llm = (repo / "videochat_llm" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in llm and "decoupled: false" in llm and "dynamic_batching {" not in llm
    # Self-contained: no links into a checkout, so the directory can be copied to a volume or image as is.
    assert not [p for p in repo.rglob("*") if p.is_symlink()]
    repo = render_repository(RepoOptions(checkpoint=TINY), tmp_path / "repo")
    llm = (repo / "videochat_llm" / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in llm and "decoupled: true" in llm and "max_queue_delay_microseconds" in llm
    assert "preferred_batch_size" not in llm


def test_rendered_configs_match_the_wire_schema(tmp_path):
    """config.pbtxt is rendered from videochat_client.schema: every public tensor with its type, dims and
    optional flag, every chat field passed between the steps, and every output mapped back."""
    repo = render_repository(RepoOptions(checkpoint=TINY), tmp_path / "repo")
    pre, llm, ens = ((repo / m / "config.pbtxt").read_text() for m in ("preprocessing", "videochat_llm", "videochat"))
    declared = re.findall(r'\{ name: "([a-z_]+)" data_type: (\w+) dims: \[ ([-\d, ]+) \]( optional: true)? \}', ens)
    assert declared == [(f.name, f.pbtxt_type, ", ".join(map(str, f.dims)), " optional: true" if f.optional else "")
                        for f in schema.INPUTS + schema.OUTPUTS]
    for f in CHAT_FIELDS:
        name = f.name.upper()
        assert f'name: "REQ_{name}"' in pre and f'name: "{name}"' in llm
        assert f'input_map {{ key: "{name}" value: "REQ_{name}" }}' in ens
    for f in schema.OUTPUTS:
        assert f'output_map {{ key: "{f.internal}" value: "{f.name}" }}' in ens and f'name: "{f.internal}"' in llm


def test_render_inflight_and_cache_parameters(tmp_path):
    repo = render_repository(RepoOptions(checkpoint=TINY, max_batch_size=16, stream_interval_ms=0,
                                         media_cache_mb=0, visual_cache_mb=64), tmp_path / "repo")
    llm = (repo / "videochat_llm" / "config.pbtxt").read_text()
    pre = (repo / "preprocessing" / "config.pbtxt").read_text()
    for key, value in [("batching", "inflight"), ("max_active", "16"), ("stream_interval_ms", "0"),
                       ("visual_cache_mb", "64")]:
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in llm
    assert 'key: "media_cache_mb" value: { string_value: "0" }' in pre
    assert "dynamic_batching {" in llm and "max_batch_size: 16" in llm
    with pytest.raises(ValueError, match="batching"):
        RepoOptions(checkpoint=TINY, batching="continuous")


def test_llm_settings_inflight_defaults():
    config = {"parameters": {"checkpoint_path": {"string_value": str(TINY)}}, "max_batch_size": 12,
              "model_transaction_policy": {"decoupled": True}}
    s = LLMSettings.from_args({"model_config": json.dumps(config), "model_instance_kind": "CPU"})
    assert (s.batching, s.max_active, s.stream_interval_ms, s.visual_cache_bytes) == ("inflight", 12, 20, 0)
    config["parameters"]["batching"] = {"string_value": "static"}
    config["parameters"]["stream_interval_ms"] = {"string_value": "-1"}
    with pytest.raises(SettingsError, match="stream_interval_ms"):
        LLMSettings.from_args({"model_config": json.dumps(config), "model_instance_kind": "CPU"})
    del config["parameters"]["stream_interval_ms"]
    assert LLMSettings.from_args({"model_config": json.dumps(config), "model_instance_kind": "CPU"}).batching == "static"


def test_media_key_and_cache():
    from videochat.serving.preprocess import MediaCache, media_key
    from videochat.serving.requests import MediaOptions

    assert media_key(b"abc", MediaOptions()) == media_key(b"abc", MediaOptions())
    keys = {media_key(b"abc", MediaOptions()), media_key(b"abd", MediaOptions()),
            media_key(b"abc", MediaOptions(image=True)), media_key(b"abc", MediaOptions(num_segments=4)),
            media_key(b"abc", MediaOptions(padding=True)), media_key(b"abc", MediaOptions(hd_num=2))}
    assert len(keys) == 6
    cache = MediaCache(max_bytes=250)
    for k in "abc":
        cache.put(k, np.zeros(100, np.uint8), b"")
    assert cache.get("a") is None and cache.get("b") is not None and cache.bytes == 200
    cache.put("d", np.zeros(100, np.uint8), b"")        # evicts c (b was used more recently)
    assert cache.get("c") is None and cache.get("b") is not None
    assert (cache.hits, cache.misses) == (2, 2)
    cache.put("huge", np.zeros(1000, np.uint8), b"")    # larger than the budget: not stored
    assert cache.get("huge") is None and len(cache) == 2


def test_preprocess_request_uses_the_cache_and_reports_media_key():
    from videochat.serving.preprocess import MediaCache, preprocess_request
    from videochat.serving.settings import PreprocessSettings

    tensors = {"VIDEO": np.array([[(TINY / "videos" / "example1.mp4").read_bytes()]], dtype=object),
               "PROMPT": b("hi"), "IMAGE": np.array([[True]])}
    cache = MediaCache(64 << 20)
    first = preprocess_request(getter_from_mapping(tensors), PreprocessSettings(), cache)
    second = preprocess_request(getter_from_mapping({**tensors, "PROMPT": b("again")}), PreprocessSettings(), cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(first["PIXEL_VALUES"], second["PIXEL_VALUES"])
    info = json.loads(second["MEDIA_INFO"][0, 0])
    assert info["media_key"].startswith("sha256:") and info["media_type"] == "image"
    assert second["REQ_PROMPT"][0, 0] == b"again"
