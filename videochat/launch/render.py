"""Render model_repository/ (templates + model.py files) into a runnable repository for one deployment.

model_repository/ is never edited in place: each model's `config.pbtxt.template` is filled from `RepoOptions`
and written, with the model's version directory, under the output directory.
"""
from __future__ import annotations

import importlib
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from videochat_client import schema

from videochat.serving.requests import MEDIA_INFO, PIXEL_DIMS, PIXEL_VALUES, REQ_PREFIX
from videochat.serving.settings import (BATCHING_MODES, DEFAULT_DECODE_ISOLATION, DEFAULT_DECODE_MEMORY_MB,
                                       DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_NEW_TOKENS_LIMIT,
                                       DEFAULT_MAX_VIDEO_BYTES, DEFAULT_MEDIA_CACHE_MB, DEFAULT_QUEUE_PER_ACTIVE,
                                       DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_STREAM_INTERVAL_MS,
                                       DEFAULT_VISUAL_CACHE_MB, DTYPES)

# model_repository/ is installed as this package's data (pyproject.toml), so `serve` works from any directory.
SOURCE_REPOSITORY = Path(importlib.import_module("videochat.launch.model_repository").__path__[0])
ENSEMBLE, LLM, PREPROCESSING = "videochat", "videochat_llm", "preprocessing"
UNARY_SUFFIX = "_unary"


@dataclass(frozen=True)
class RepoOptions:
    checkpoint: Path
    device: str = "cpu"                     # "cpu" -> KIND_CPU, "cuda" -> KIND_GPU (one instance group per GPU)
    max_batch_size: int = 8                 # 1 turns dynamic batching off
    max_queue_delay_us: int = 5000          # small: at low load a request waits at most this long for mates
    instances: int = 1                      # videochat_llm instances (per GPU with KIND_GPU)
    preprocess_instances: int = 2           # CPU decode workers
    decoupled: bool = True                  # stream tokens (stream_infer) or unary ModelInfer only
    dtype: str = "auto"
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    batching: str = "inflight"              # "inflight" (joins between steps) or "static" (joins an idle batch)
    max_active: int = 0                     # running-batch limit of in-flight batching; 0 = max_batch_size
    max_queue: int = 0                      # per llm instance: requests waiting beyond the free slots before
    #                                         new ones get UNAVAILABLE; 0 = DEFAULT_QUEUE_PER_ACTIVE x max_active
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S   # server-side deadline of a request; 0 = none
    stream_interval_ms: int = DEFAULT_STREAM_INTERVAL_MS   # coalesce streamed tokens; 0 = every token
    media_cache_mb: int = DEFAULT_MEDIA_CACHE_MB            # preprocessing output cache per instance; 0 = off
    visual_cache_mb: int = DEFAULT_VISUAL_CACHE_MB          # visual-token cache per llm instance; 0 = off
    decode_threads: int = 1                 # CPU in-flight: intra-op threads of a decode step; 0 = torch default
    decode_isolation: bool = DEFAULT_DECODE_ISOLATION       # preprocessing decodes in a worker process
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S      # ... which may take this long per input
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY_MB        # ... and grow by this much
    # Test/CPU convenience: also serve `videochat_unary` (-> `videochat_llm_unary`, decoupled false) next to
    # the decoupled pair, sharing preprocessing. Costs a second copy of the model, so not for GPUs.
    extra_unary_variant: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_batch_size", "instances", "preprocess_instances", "max_new_tokens_limit",
                     "max_video_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        for name in ("max_active", "max_queue", "stream_interval_ms", "media_cache_mb", "visual_cache_mb",
                     "decode_threads", "request_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.decode_timeout_s > 0:
            raise ValueError(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        if self.decode_memory_mb < 1:
            raise ValueError(f"decode_memory_mb must be >= 1, got {self.decode_memory_mb}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"checkpoint {self.checkpoint} has no config.json")

    @property
    def active_limit(self) -> int:
        return self.max_active or self.max_batch_size

    @property
    def queue_limit(self) -> int:
        return self.max_queue or DEFAULT_QUEUE_PER_ACTIVE * self.active_limit


def render_repository(opts: RepoOptions, out_dir: Path, *, source: Path = SOURCE_REPOSITORY) -> Path:
    """Write the rendered repository to `out_dir` (replaced if it exists) and return it."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    common = {"max_batch_size": opts.max_batch_size, "max_new_tokens_limit": opts.max_new_tokens_limit}
    _render_model(source / PREPROCESSING, out_dir / PREPROCESSING, {
        **common, "preprocess_instances": opts.preprocess_instances, "max_video_bytes": opts.max_video_bytes,
        "media_cache_mb": opts.media_cache_mb, "decode_isolation": str(opts.decode_isolation).lower(),
        "decode_timeout_s": opts.decode_timeout_s, "decode_memory_mb": opts.decode_memory_mb,
        **preprocessing_blocks()})
    variants = [("", opts.decoupled)] + ([(UNARY_SUFFIX, False)] if opts.extra_unary_variant else [])
    for suffix, decoupled in variants:
        _render_model(source / LLM, out_dir / (LLM + suffix), {
            **common, "name": LLM + suffix, "decoupled": str(decoupled).lower(),
            "dynamic_batching": (f"dynamic_batching {{ max_queue_delay_microseconds: {opts.max_queue_delay_us} }}"
                                 if opts.max_batch_size > 1 else "# max_batch_size 1: no dynamic batching"),
            "instances": opts.instances, "instance_kind": "KIND_GPU" if opts.device == "cuda" else "KIND_CPU",
            "checkpoint_path": str(Path(opts.checkpoint).resolve()), "dtype": opts.dtype,
            "batching": opts.batching, "max_active": opts.active_limit, "max_queue": opts.queue_limit,
            "request_timeout_s": opts.request_timeout_s,
            "stream_interval_ms": opts.stream_interval_ms, "visual_cache_mb": opts.visual_cache_mb,
            "decode_threads": opts.decode_threads, **llm_blocks()})
        _render_model(source / ENSEMBLE, out_dir / (ENSEMBLE + suffix), {
            **common, "name": ENSEMBLE + suffix, **ensemble_blocks(LLM + suffix)})
    return out_dir


# -- tensor blocks, all from videochat_client.schema ---------------------------------------------------------
def _tensor(name: str, pbtxt_type: str, dims: tuple[int, ...], extra: str = "") -> str:
    return f'  {{ name: "{name}" data_type: {pbtxt_type} dims: [ {", ".join(map(str, dims))} ]{extra} }}'


def _block(kind: str, lines: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(lines) + "\n]"


def _optional(f: schema.Field) -> str:
    return " optional: true" if f.optional else ""


_PIXELS = (PIXEL_VALUES, "TYPE_FP16", PIXEL_DIMS)
_INFO = (MEDIA_INFO, "TYPE_STRING", (1,))


def ensemble_blocks(llm_name: str) -> dict[str, str]:
    inputs = [_tensor(f.name, f.pbtxt_type, f.dims, _optional(f)) for f in schema.INPUTS]
    outputs = [_tensor(f.name, f.pbtxt_type, f.dims) for f in schema.OUTPUTS]
    pre_in = [f'      input_map {{ key: "{f.internal}" value: "{f.name}" }}' for f in schema.INPUTS]
    between = [PIXEL_VALUES, MEDIA_INFO] + [REQ_PREFIX + f.internal for f in schema.CHAT_INPUTS]
    pre_out = [f'      output_map {{ key: "{n}" value: "{n}" }}' for n in between]
    llm_in = [f'      input_map {{ key: "{n}" value: "{n}" }}' for n in (PIXEL_VALUES, MEDIA_INFO)]
    llm_in += [f'      input_map {{ key: "{f.internal}" value: "{REQ_PREFIX + f.internal}" }}' for f in schema.CHAT_INPUTS]
    llm_out = [f'      output_map {{ key: "{f.internal}" value: "{f.name}" }}' for f in schema.OUTPUTS]

    def step(model: str, maps: list[str]) -> str:
        return "    {\n" + f'      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    scheduling = ("ensemble_scheduling {\n  step [\n" + step(PREPROCESSING, pre_in + pre_out) + ",\n"
                  + step(llm_name, llm_in + llm_out) + "\n  ]\n}")
    return {"inputs": _block("input", inputs), "outputs": _block("output", outputs),
            "ensemble_scheduling": scheduling}


def preprocessing_blocks() -> dict[str, str]:
    inputs = [_tensor(f.internal, f.pbtxt_type, f.dims, _optional(f)) for f in schema.INPUTS]
    outputs = [_tensor(*_PIXELS), _tensor(*_INFO)]
    outputs += [_tensor(REQ_PREFIX + f.internal, f.pbtxt_type, f.dims) for f in schema.CHAT_INPUTS]
    return {"inputs": _block("input", inputs), "outputs": _block("output", outputs)}


def llm_blocks() -> dict[str, str]:
    # ragged: requests with different clip/frame counts batch together (each keeps its own shape)
    inputs = [_tensor(*_PIXELS, " allow_ragged_batch: true"), _tensor(*_INFO)]
    inputs += [_tensor(f.internal, f.pbtxt_type, f.dims) for f in schema.CHAT_INPUTS]   # all required
    outputs = [_tensor(f.internal, f.pbtxt_type, f.dims) for f in schema.OUTPUTS]
    return {"inputs": _block("input", inputs), "outputs": _block("output", outputs)}


def _render_model(src: Path, dst: Path, values: dict) -> None:
    template = string.Template((src / "config.pbtxt.template").read_text())
    text = template.substitute({k: str(v) for k, v in values.items()})  # KeyError on a missing placeholder
    dst.mkdir(parents=True)
    (dst / "config.pbtxt").write_text(text)
    # Only the adapter: it imports the installed `videochat` package, so the rendered repository holds no links
    # into a checkout and can be copied to a volume or image as is.
    shutil.copytree(src / "1", dst / "1", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
