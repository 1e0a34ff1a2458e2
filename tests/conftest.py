"""Shared fixtures. `triton` starts ONE real tritonserver for the whole session (only if a test asks for it),
with the same launcher code as `python -m videochat serve`: the tiny fixture checkpoint, CPU, free ports.

It serves the decoupled pair (`videochat` -> `videochat_llm`, streaming) and the unary pair
(`videochat_unary` -> `videochat_llm_unary`, `decoupled: false`) sharing one preprocessing model, so the
streaming-vs-unary test needs no second server.
"""
from __future__ import annotations

import json
import queue
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TINY = DATA / "tiny-videochat"
VIDEOS = DATA / "videos"

# public input name -> numpy dtype (docs/interfaces.md)
ENSEMBLE_INPUTS = {
    "video": np.object_, "prompt": np.object_, "history": np.object_, "msg": np.object_,
    "instruction": np.object_, "image": np.bool_, "num_segments": np.int32, "hd_num": np.int32,
    "padding": np.bool_, "max_new_tokens": np.int32, "do_sample": np.bool_, "temperature": np.float32,
    "top_p": np.float32, "top_k": np.int32, "repetition_penalty": np.float32, "seed": np.int64,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensemble_inputs(**fields):
    """Keyword fields -> tritonclient InferInputs of shape [1, 1] (bytes/str for BYTES, history as a list)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, value in fields.items():
        if value is None:
            continue
        dtype = ENSEMBLE_INPUTS[name]
        if name == "history" and not isinstance(value, (str, bytes)):
            value = json.dumps([list(t) for t in value])
        if isinstance(value, str):
            value = value.encode("utf-8")
        arr = np.array([[value]], dtype=dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype) if dtype is not np.object_
                                    else "BYTES")
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def llm_inputs(prompt: str, max_new_tokens: int, media_info: bytes = b'{"media_type": "image"}') -> list:
    """Inputs straight to videochat_llm (all required): what preprocessing emits for example1 as an image."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from videochat.serving.requests import chat_fields_to_arrays, getter_from_mapping, parse_chat_fields

    pixels = np.load(TINY / "media_A5_image_example1_nopad_full_fp16.npy")[None]
    chat = chat_fields_to_arrays(parse_chat_fields(getter_from_mapping(
        {"PROMPT": np.array([[prompt.encode()]], dtype=object),
         "MAX_NEW_TOKENS": np.array([[max_new_tokens]], np.int32)}), max_new_tokens_limit=1024), prefix="")
    arrays = {"PIXEL_VALUES": pixels, "MEDIA_INFO": np.array([[media_info]], dtype=object), **chat}
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object
                                    else np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    responses: int = 1


class TritonHandle:
    def __init__(self, server, grpc_url: str):
        self.server = server
        self.url = grpc_url

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric on the server's metrics port over the series matching `labels`."""
        import re
        import urllib.request

        ep = self.server.endpoints
        with urllib.request.urlopen(f"http://{ep.host}:{ep.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
            series = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(series.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def client(self):
        import tritonclient.grpc as grpcclient
        return grpcclient.InferenceServerClient(self.url)

    def infer(self, model: str = "videochat_unary", timeout_s: float = 120, **fields) -> Answer:
        """Unary ModelInfer (the non-decoupled variant)."""
        result = self.client().infer(model, ensemble_inputs(**fields), client_timeout=timeout_s)
        return Answer(text=result.as_numpy("text")[0, 0].decode(), token_ids=result.as_numpy("token_ids")[0].tolist(),
                      prompt_tokens=int(result.as_numpy("prompt_tokens")[0, 0]),
                      completion_tokens=int(result.as_numpy("completion_tokens")[0, 0]),
                      finish_reason=result.as_numpy("finish_reason")[0, 0].decode())

    def stream(self, model: str = "videochat", timeout_s: float = 120, **fields) -> Answer:
        """stream_infer on the decoupled ensemble; concatenates the responses. Raises the stream's error."""
        client = self.client()
        q: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        try:
            client.async_stream_infer(model, ensemble_inputs(**fields), enable_empty_final_response=True)
            texts, ids, n, last = [], [], 0, None
            while True:
                result, error = q.get(timeout=timeout_s)
                if error is not None:
                    raise error
                final = result.get_response().parameters["triton_final_response"].bool_param
                if result.as_numpy("text") is not None:
                    n += 1
                    texts.append(result.as_numpy("text")[0, 0].decode())
                    ids.extend(result.as_numpy("token_ids")[0].tolist())
                    last = result
                if final:
                    break
        finally:
            client.stop_stream()
        return Answer(text="".join(texts), token_ids=ids, prompt_tokens=int(last.as_numpy("prompt_tokens")[0, 0]),
                      completion_tokens=int(last.as_numpy("completion_tokens")[0, 0]),
                      finish_reason=last.as_numpy("finish_reason")[0, 0].decode(), responses=n)


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    from videochat.launch.render import RepoOptions, render_repository
    from videochat.launch.tritonserver import Endpoints, TritonServer, find_triton

    work = tmp_path_factory.mktemp("triton")
    # stream_interval_ms 0: one response per token (tests check token-by-token delivery); the coalescing policy
    # itself is unit-tested in test_scheduler.py
    opts = RepoOptions(checkpoint=TINY, device="cpu", max_batch_size=8, max_queue_delay_us=20000,
                       preprocess_instances=1, extra_unary_variant=True, stream_interval_ms=0)
    repo = render_repository(opts, work / "model_repository")
    endpoints = Endpoints("127.0.0.1", free_port(), free_port(), free_port())
    server = TritonServer(find_triton(work), repo, endpoints, log_path=work / "tritonserver.log", exit_timeout_s=10)
    server.start()
    try:
        server.wait_ready(timeout_s=240)
        yield TritonHandle(server, endpoints.grpc_url)
    finally:
        server.stop()
