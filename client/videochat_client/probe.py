"""A health probe that means it: a real inference through the public ensemble.

Triton 2.51 keeps a model READY after its python stub died (every request then fails with `Stub process ... is
not healthy`), so `/v2/health/ready` says nothing about whether the replica can answer. A probe sends a tiny
built-in image (`PROBE_IMAGE`, 16x16 PNG) with `max_new_tokens=1` through `videochat`: it passes preprocessing
and the VideoChat model exactly like a user request.

Reaching every instance: Triton hands a request to whichever instance of a model is idle; with sequential requests
on an idle server the instances take turns (measured on 2.51 with 2 preprocessing instances, one killed: probes
alternated ok / `preprocessing_0_0 is not healthy`). One *check* therefore sends `count` probes one after the
other, by default as many as the most replicated model behind the ensemble has instances (`instance_count`).
Under load the turn order is not guaranteed; the `serve` launcher also watches the stub processes themselves.

The image is the same every time, so after the first probe preprocessing's media cache and the visual-token
cache answer for it: a check costs one 1-token prefill + decode per probe, not a decode + ViT. A freshly
(re)loaded model has empty caches, so the first probe after a recovery takes the whole path.
"""
from __future__ import annotations

import struct
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from .errors import VideoChatError
from .protocol import GenerationOptions, MediaOptions
from .schema import MODEL_NAME

PROBE_PROMPT = "ok"
PROBE_REQUEST_PREFIX = "probe-"   # request ids of probes, to tell them apart in server logs and traces
PROBE_MEDIA = MediaOptions(image=True, num_segments=1, hd_num=1)
PROBE_GEN = GenerationOptions(max_new_tokens=1)


def png_bytes(width: int = 16, height: int = 16) -> bytes:
    """A valid RGB PNG with a gradient (not a flat image), written with zlib only: the client needs no PIL."""
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in ((x * 16) % 256, (y * 16) % 256, 128))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PROBE_IMAGE = png_bytes()


@dataclass(frozen=True)
class ProbeResult:
    """One check: `count` probes in a row; it stops at the first failure."""

    ok: bool
    latency_ms: Tuple[float, ...]        # of each probe sent, the failed one included
    count: int                           # probes asked for
    error: Optional[str] = None          # "<CODE>: <message>" of the failure
    code: Optional[str] = None           # gRPC status name of the failure

    @property
    def timed_out(self) -> bool:
        return self.code == "DEADLINE_EXCEEDED"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency_ms"] = [round(x, 1) for x in self.latency_ms]
        return d


def probe(client, *, count: int = 1, timeout: float = 10.0) -> ProbeResult:
    """Send `count` probes through the ensemble, one after the other, with no retries (a probe must see the
    failure a user would). `client` is a `VideoChatClient`."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    latencies = []
    for i in range(count):
        t0 = time.perf_counter()
        try:
            chunks = list(client.generate(video=PROBE_IMAGE, prompt=PROBE_PROMPT, media=PROBE_MEDIA, gen=PROBE_GEN,
                                          timeout=timeout, max_retries=0,
                                          request_id=f"{PROBE_REQUEST_PREFIX}{time.time_ns():x}-{i}"))
            if not chunks or not chunks[-1].final:
                raise VideoChatError("probe stream ended without a final response", code="UNKNOWN")
        except VideoChatError as err:
            latencies.append((time.perf_counter() - t0) * 1e3)
            return ProbeResult(False, tuple(latencies), count, error=str(err), code=err.code)
        latencies.append((time.perf_counter() - t0) * 1e3)
    return ProbeResult(True, tuple(latencies), count)


def instance_counts(client, *, model_name: str = MODEL_NAME, timeout: float = 10.0) -> dict:
    """{model: instances} of the models behind the ensemble, from Triton's model configuration API.

    `client` is a tritonclient.grpc.InferenceServerClient. KIND_GPU groups count once per listed GPU (Triton
    fills `gpus` when it loads the model)."""
    config = client.get_model_config(model_name, as_json=True, client_timeout=timeout)["config"]
    steps = [s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])] or [model_name]
    counts = {}
    for step in steps:
        groups = client.get_model_config(step, as_json=True, client_timeout=timeout)["config"].get("instance_group", [])
        counts[step] = sum(int(g.get("count", 1)) * max(1, len(g.get("gpus", []))) for g in groups) or 1
    return counts
