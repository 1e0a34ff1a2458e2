"""The probe's built-in image and its failure result, `videochat health --probe` without a server, the launcher's
readiness endpoint, and what a draining replica answers being retryable. No tritonserver here."""
from __future__ import annotations

import json
import socket
import struct
import urllib.error
import urllib.request
import zlib

import pytest
from support.paths import TINY
from tritonclient.utils import InferenceServerException

from videochat.errors import run_cli
from videochat.launch import launcher
from videochat.launch.readiness import ReadinessServer
from videochat_client import VideoChatClient, cli
from videochat_client.errors import Unavailable, is_retryable, to_error
from videochat_client.probe import PROBE_IMAGE, png_bytes, probe



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_image_is_a_valid_png_that_preprocessing_accepts():
    assert PROBE_IMAGE.startswith(b"\x89PNG\r\n\x1a\n") and len(PROBE_IMAGE) < 1024
    width, height = struct.unpack(">II", PROBE_IMAGE[16:24])
    assert (width, height) == (16, 16)
    length = struct.unpack(">I", PROBE_IMAGE[33:37])[0]           # IDAT follows IHDR
    rows = zlib.decompress(PROBE_IMAGE[41:41 + length])
    assert len(rows) == height * (1 + 3 * width)
    assert png_bytes(4, 2) != png_bytes(2, 4)

    from preprocessing import preprocess
    result = preprocess(PROBE_IMAGE, image=True, num_segments=1, hd_num=1)
    assert tuple(result.pixel_values.shape[-3:]) == (3, 224, 224) and result.pixel_values.shape[2] == 1


def test_probe_of_an_unreachable_server_fails_with_unavailable():
    with VideoChatClient(f"127.0.0.1:{free_port()}", timeout=5) as client:
        result = probe(client, count=3, timeout=2)
        with pytest.raises(ValueError):
            probe(client, count=0)
    assert not result.ok and result.code == "UNAVAILABLE" and len(result.latency_ms) == 1   # stops at the first
    assert result.to_dict()["ok"] is False and not result.timed_out


def test_cli_health_probe_without_a_server_exits_3_with_json(capsys):
    url = f"127.0.0.1:{free_port()}"
    assert cli.main(["health", "--probe", "--url", url, "--timeout", "3"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["ready"] is False and out["probe"]["ok"] is False and out["probe"]["code"] == "UNAVAILABLE"
    assert cli.main(["health", "--probe", "--probe-count", "-1", "--url", url]) == 2


@pytest.mark.parametrize("message, status", [
    # in-stream (no status): a draining ensemble that still finishes streams (measured on 2.51)
    ("in ensemble 'videochat', [request id: 35e4] Server is stopping, scheduler for model has stopped accepting "
     "new inference requests", None),
    # once the model is unloaded during the drain
    ("Request for unknown model: 'videochat' has no available versions", None),
    ("Request for unknown model: 'videochat' has no available versions", "StatusCode.NOT_FOUND"),
    ("Server exiting", "StatusCode.UNAVAILABLE"),
])
def test_what_a_draining_replica_answers_is_retryable(message, status):
    err = to_error(InferenceServerException(message, status=status))
    assert isinstance(err, Unavailable) and is_retryable(err), err


def test_a_dead_stub_is_not_retryable():
    err = to_error(InferenceServerException("in ensemble 'videochat', Stub process 'preprocessing_0_0' is not healthy."))
    assert err.code == "INTERNAL" and not is_retryable(err)


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_readiness_server_answers_200_503_404():
    state = {"ready": False, "live": True, "phase": "starting"}
    server = ReadinessServer("127.0.0.1", 0, lambda: dict(state)).start()
    try:
        assert _get(server.port, "/ready") == (503, state)
        assert _get(server.port, "/live")[0] == 200
        state.update(ready=True, phase="serving")
        assert _get(server.port, "/ready") == (200, state)
        assert _get(server.port, "/ready?verbose=1")[0] == 200
        state.update(ready=False, live=False, phase="failed")
        assert _get(server.port, "/live")[0] == 503
        assert _get(server.port, "/metrics")[0] == 404
    finally:
        server.close()


def _serve(tmp_path, *args: str) -> int:
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    return run_cli(launcher.main, ["--checkpoint", str(TINY), "--device", "cpu", "--work-dir", str(tmp_path / "work"),
                                   *ports, *args])


def test_serve_refuses_a_busy_or_repeated_health_port_before_starting_tritonserver(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _serve(tmp_path, "--health-port", str(port)) == 2
    assert f"port {port} (--health-port) is already in use" in capsys.readouterr().err
    assert _serve(tmp_path, "--health-port", "8001", "--grpc-port", "8001") == 2
    assert "must differ" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()   # refused before anything was written
