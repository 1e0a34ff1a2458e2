"""Model settings: parsed once from the Triton model config in `initialize`, rejected loudly if wrong.

`config.pbtxt` is the one place for every knob: shapes, batching, instance kind (-> device) and
`model_transaction_policy.decoupled` (-> streaming) come from the config itself; the few model-specific values
are string `parameters`. No environment variables change model behaviour.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from videochat_client.schema import LIMITS

DEFAULT_MAX_NEW_TOKENS_LIMIT = LIMITS.max_new_tokens
DEFAULT_MAX_VIDEO_BYTES = LIMITS.max_video_bytes
DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCHING_MODES = ("inflight", "static")   # join the running batch between decode steps, or only an idle one
DEFAULT_STREAM_INTERVAL_MS = 20
DEFAULT_MEDIA_CACHE_MB = 512
DEFAULT_VISUAL_CACHE_MB = 256
# Requests that may wait per running-batch slot before new ones are refused with UNAVAILABLE: a queued request
# then waits about this many answers' time, instead of ever longer while a flood keeps coming.
DEFAULT_QUEUE_PER_ACTIVE = 4
DEFAULT_REQUEST_TIMEOUT_S = 0.0     # off: clients send their own budget (timeout_ms); see docs/operations.md
# Decode isolation (videochat/serving/decode_worker.py): user bytes are decoded in a worker process that may
# take this long and allocate this much above its idle size; generous, they stop a bomb, not a big video.
DEFAULT_DECODE_ISOLATION = True
DEFAULT_DECODE_TIMEOUT_S = 120.0
DEFAULT_DECODE_MEMORY_MB = 4096
MB = 1024 * 1024
# Parameters the python backend itself reads; allowed in any config.
_BACKEND_PARAMETERS = {"EXECUTION_ENV_PATH"}


class SettingsError(ValueError):
    """A wrong model config; raised from initialize so the model fails to load with this message."""


def config_parameters(model_config: Mapping[str, Any], *, known: set[str]) -> dict[str, str]:
    params = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
    unknown = set(params) - known - _BACKEND_PARAMETERS
    if unknown:
        raise SettingsError(f"unknown parameters {sorted(unknown)}; known: {sorted(known)}")
    return params


def _positive_int(params: Mapping[str, str], key: str, default: int) -> int:
    raw = params.get(key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"parameter {key} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SettingsError(f"parameter {key} must be >= 1, got {value}")
    return value


def _non_negative_float(params: Mapping[str, str], key: str, default: float) -> float:
    raw = params.get(key, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"parameter {key} must be a number, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"parameter {key} must be a finite number >= 0, got {value}")
    return value


def _bool(params: Mapping[str, str], key: str, default: bool) -> bool:
    raw = params.get(key, str(default).lower())
    if raw not in ("true", "false"):
        raise SettingsError(f"parameter {key} must be true or false, got {raw!r}")
    return raw == "true"


def _positive_float(params: Mapping[str, str], key: str, default: float) -> float:
    value = _non_negative_float(params, key, default)
    if not value > 0:
        raise SettingsError(f"parameter {key} must be > 0, got {value}")
    return value


def _non_negative_int(params: Mapping[str, str], key: str, default: int) -> int:
    raw = params.get(key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"parameter {key} must be an integer, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"parameter {key} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class PreprocessSettings:
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    media_cache_bytes: int = 0          # LRU of preprocessed outputs keyed by media_key; 0 = off
    decode_isolation: bool = DEFAULT_DECODE_ISOLATION     # decode in a worker process (crash/hang/OOM-proof)
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S    # wall clock of one decode in the worker
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY_MB      # worker's memory growth allowed for one decode

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> "PreprocessSettings":
        params = config_parameters(json.loads(args["model_config"]),
                                   known={"max_video_bytes", "max_new_tokens_limit", "media_cache_mb",
                                          "decode_isolation", "decode_timeout_s", "decode_memory_mb"})
        return cls(max_video_bytes=_positive_int(params, "max_video_bytes", DEFAULT_MAX_VIDEO_BYTES),
                   max_new_tokens_limit=_positive_int(params, "max_new_tokens_limit",
                                                      DEFAULT_MAX_NEW_TOKENS_LIMIT),
                   media_cache_bytes=_non_negative_int(params, "media_cache_mb", 0) * MB,
                   decode_isolation=_bool(params, "decode_isolation", DEFAULT_DECODE_ISOLATION),
                   decode_timeout_s=_positive_float(params, "decode_timeout_s", DEFAULT_DECODE_TIMEOUT_S),
                   decode_memory_mb=_positive_int(params, "decode_memory_mb", DEFAULT_DECODE_MEMORY_MB))


@dataclass(frozen=True)
class LLMSettings:
    checkpoint: str
    device: str                 # "cpu" or "cuda:<id>", from the instance group
    dtype: str                  # one of DTYPES; "auto" = the model's default (fp32 on CPU, bf16 on GPU)
    decoupled: bool             # model_transaction_policy.decoupled: stream tokens or one final response
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    batching: str = "inflight"          # BATCHING_MODES
    max_active: int = 1                 # sequences in the running batch (in-flight); default max_batch_size
    max_queue: int = DEFAULT_QUEUE_PER_ACTIVE   # waiting beyond the free slots, then UNAVAILABLE; config 0 =
    #                                             DEFAULT_QUEUE_PER_ACTIVE x max_active
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S   # server-side deadline per request; 0 = none
    stream_interval_ms: int = DEFAULT_STREAM_INTERVAL_MS   # coalesce streamed deltas (0 = every token)
    visual_cache_bytes: int = 0         # engine's VisualCache budget; 0 = off
    decode_threads: int = 1             # CPU in-flight: intra-op threads of a decode step; 0 = torch's default

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> "LLMSettings":
        config = json.loads(args["model_config"])
        params = config_parameters(config, known={"checkpoint_path", "dtype", "max_new_tokens_limit", "batching",
                                                  "max_active", "stream_interval_ms", "visual_cache_mb",
                                                  "decode_threads", "max_queue", "request_timeout_s"})
        checkpoint = params.get("checkpoint_path", "")
        if not checkpoint or not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise SettingsError(f"parameter checkpoint_path must be a checkpoint directory with config.json, "
                                f"got {checkpoint!r}")
        dtype = params.get("dtype", "auto")
        if dtype not in DTYPES:
            raise SettingsError(f"parameter dtype must be one of {DTYPES}, got {dtype!r}")
        kind = args.get("model_instance_kind", "CPU")
        if kind not in ("CPU", "GPU"):
            raise SettingsError(f"instance kind must be KIND_CPU or KIND_GPU, got {kind}")
        device = f"cuda:{int(args.get('model_instance_device_id', 0))}" if kind == "GPU" else "cpu"
        decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
        batching = params.get("batching", "inflight")
        if batching not in BATCHING_MODES:
            raise SettingsError(f"parameter batching must be one of {BATCHING_MODES}, got {batching!r}")
        max_active = _non_negative_int(params, "max_active", 0) or max(1, int(config.get("max_batch_size", 1)))
        max_queue = _non_negative_int(params, "max_queue", 0) or DEFAULT_QUEUE_PER_ACTIVE * max_active
        return cls(checkpoint=checkpoint, device=device, dtype=dtype, decoupled=decoupled,
                   max_new_tokens_limit=_positive_int(params, "max_new_tokens_limit",
                                                      DEFAULT_MAX_NEW_TOKENS_LIMIT),
                   batching=batching, max_active=max_active, max_queue=max_queue,
                   request_timeout_s=_non_negative_float(params, "request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S),
                   stream_interval_ms=_non_negative_int(params, "stream_interval_ms", DEFAULT_STREAM_INTERVAL_MS),
                   visual_cache_bytes=_non_negative_int(params, "visual_cache_mb", 0) * MB,
                   decode_threads=_non_negative_int(params, "decode_threads", 1))
