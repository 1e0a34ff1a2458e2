"""A real tritonserver for the e2e tests, started with the launcher's own code, and a handle that talks to it
through the real client library (videochat_client): streaming through `VideoChatClient`, unary through
tritonclient with the client's request builder and response parser, metrics with the client's scraper."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from support.paths import TINY
from videochat_client import Answer, Chunk, GenerationOptions, MediaOptions, VideoChatClient
from videochat_client.errors import to_error
from videochat_client.metrics import scrape
from videochat_client.protocol import AnswerBuilder, build_inputs, load_media, parse_chunk

_MEDIA = {f.name for f in dataclass_fields(MediaOptions)}
_GEN = {f.name for f in dataclass_fields(GenerationOptions)}


def wait_for(check, timeout_s: float = 10.0, what: str = ""):
    """Poll `check()` until it returns something truthy (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answer_of(chunks: list[Chunk]) -> Answer:
    builder = AnswerBuilder()
    for chunk in chunks:
        builder.add(chunk)
    return builder.finish()


def token_responses(chunks: list[Chunk]) -> int:
    """Responses that carried tokens (the empty final one does not)."""
    return sum(bool(c.token_ids) for c in chunks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_parts(*, video: Any, prompt: str, history=(), **options) -> dict:
    """Flat keyword fields (as the tests write requests) -> build_inputs' arguments."""
    unknown = set(options) - _MEDIA - _GEN
    assert not unknown, f"unknown request fields {unknown}"
    return dict(video=load_media(video), prompt=prompt, history=history,
                media=MediaOptions(**{k: v for k, v in options.items() if k in _MEDIA}),
                gen=GenerationOptions(**{k: v for k, v in options.items() if k in _GEN}))


class TritonHandle:
    def __init__(self, server: Any, grpc_url: str, metrics_url: str | None = None) -> None:
        self.server = server
        self.url = grpc_url
        self.metrics_url = metrics_url

    def client(self):
        """Raw tritonclient, for calls straight to an internal model."""
        import tritonclient.grpc as grpcclient
        return grpcclient.InferenceServerClient(self.url)

    def videochat(self, model: str = "videochat") -> VideoChatClient:
        return VideoChatClient(self.url, model_name=model, max_retries=0, timeout=120)

    def stream_chunks(self, model: str = "videochat", **fields) -> list[Chunk]:
        parts = request_parts(**fields)
        with self.videochat(model) as client:
            return list(client.generate(**parts))

    def stream(self, model: str = "videochat", **fields) -> Answer:
        """The whole streamed answer; raises the client's exceptions (InvalidArgument, ...)."""
        return answer_of(self.stream_chunks(model, **fields))

    def infer(self, model: str = "videochat_unary", timeout_s: float = 120, **fields) -> Answer:
        """Unary ModelInfer (the non-decoupled variant), errors mapped by the client's `to_error`."""
        from tritonclient.utils import InferenceServerException

        try:
            result = self.client().infer(model, build_inputs(**request_parts(**fields)), client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise to_error(exc) from exc
        builder = AnswerBuilder(prompt=fields["prompt"])
        builder.add(parse_chunk(result))
        return builder.finish()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric over the series matching `labels`."""
        return scrape(self.metrics_url).get(name, **labels)


@contextmanager
def running_server(work: Path, **options) -> Iterator[TritonHandle]:
    """tritonserver on free loopback ports with the tiny fixture checkpoint (RepoOptions overrides in
    `options`), stopped on exit."""
    from videochat.launch.render import RepoOptions, render_repository
    from videochat.launch.tritonserver import Endpoints, TritonServer, find_triton

    repo = render_repository(RepoOptions(checkpoint=TINY, device="cpu", **options), work / "model_repository")
    endpoints = Endpoints("127.0.0.1", free_port(), free_port(), free_port())
    server = TritonServer(find_triton(work), repo, endpoints, log_path=work / "tritonserver.log", exit_timeout_s=10)
    server.start()
    try:
        server.wait_ready(timeout_s=240)
        yield TritonHandle(server, endpoints.grpc_url, f"http://{endpoints.host}:{endpoints.metrics_port}/metrics")
    finally:
        server.stop()


@dataclass
class ServeProcess:
    """A running `python -m videochat serve`: its process, stdout lines so far, and its ports."""
    proc: subprocess.Popen
    lines: list[str]
    http_port: int
    grpc_port: int
    metrics_port: int
    health_port: int          # the launcher's GET /ready and /live
    output: str = ""          # the rest of stdout, after it exited

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def is_ready_line(line: str) -> bool:
    """serve's "ready:" line, as text or as a `--log-format json` record."""
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("msg", "")).startswith("ready:")
        except ValueError:
            return False
    return line.startswith("ready:")


@contextmanager
def serve_process(python: str, args: list[str], *, cwd: Path, ready_timeout_s: float = 300) -> Iterator[ServeProcess]:
    """Start `python -m videochat serve ARGS` on free ports, wait for its "ready:" line, SIGTERM it on exit.
    After the block, `.proc.returncode` and `.output` tell how it stopped."""
    ports = [free_port() for _ in range(4)]
    cmd = [python, "-m", "videochat", "serve", "--device", "cpu", "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--health-port", str(ports[3]), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    serving = ServeProcess(proc, [], *ports)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            serving.lines.append(line)
            if is_ready_line(line):
                break
        assert serving.lines and is_ready_line(serving.lines[-1]), "".join(serving.lines[-40:])
        yield serving
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            serving.output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            raise


def llm_inputs(prompt: str, max_new_tokens: int, media_info: bytes = b'{"media_type": "image"}') -> list:
    """Inputs straight to videochat_llm (all required): what preprocessing emits for example1 as an image."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from videochat.serving.requests import (MEDIA_INFO, PIXEL_VALUES, chat_fields_to_arrays, getter_from_mapping,
                                            parse_chat_fields)

    pixels = np.load(TINY / "media_A5_image_example1_nopad_full_fp16.npy")[None]
    chat = chat_fields_to_arrays(parse_chat_fields(getter_from_mapping(
        {"PROMPT": np.array([[prompt.encode()]], dtype=object),
         "MAX_NEW_TOKENS": np.array([[max_new_tokens]], np.int32)}), max_new_tokens_limit=1024), prefix="")
    arrays = {PIXEL_VALUES: pixels, MEDIA_INFO: np.array([[media_info]], dtype=object), **chat}
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object
                                    else np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs
