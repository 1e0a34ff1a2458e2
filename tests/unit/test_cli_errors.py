"""Every command-line entry point, run as a real subprocess, on each way a user gets its input wrong:
`python -m videochat chat|serve|make-demo-checkpoint`, `python -m preprocessing`, and the client's
`videochat ask|chat|health|loadtest`. Each must exit with its documented code and print exactly one
`error: ...` line naming the problem (argparse's usage + error for bad flags), never a traceback.

Broken checkpoints are tmp_path copies of the tiny fixture. Tests run as root, so "unreadable" means a
directory where a file is expected (chmod 000 would not stop root). The torch-importing commands cost
~3 s each; the serve cases never start tritonserver (ports and checkpoint files are checked before it).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file   # numpy, not torch: keeps this process light

from support.paths import ROOT as REPO
from support.paths import TINY as FIXTURE

VIDEO = FIXTURE / "videos" / "example1.mp4"
# this worktree's packages, not whatever copy the venv has installed (the client is installed editable)
ENV = dict(os.environ)   # the project is installed (scripts/setup.sh): no path tricks
TIMEOUT_S = 120


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def assert_one_error(proc: subprocess.CompletedProcess, code: int, *needles: str, prefix: str = "error: ") -> str:
    """Exit `code`, stderr is one line `prefix...` containing every needle, no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_usage_error(proc: subprocess.CompletedProcess, prog: str, needle: str) -> None:
    """argparse's own error: exit 2, the usage line, then `<prog>: error: ...`."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage:") and lines[-1].startswith(f"{prog}: error:") and needle in lines[-1], \
        proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- checkpoints
def _truncate(ckpt: Path) -> None:   # an interrupted download
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _wrong_shape_and_missing_key(ckpt: Path) -> None:
    t = load_file(ckpt / "model.safetensors")
    t["vision_encoder.pos_embed"] = t["vision_encoder.pos_embed"][:, :-1].copy()
    del t["vision_encoder.blocks.2.attn.proj.bias"]
    save_file(t, ckpt / "model.safetensors")


def _invalid_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"model_config": {"vision_encoder": ')


def _no_llm_tokenizer(ckpt: Path) -> None:
    shutil.rmtree(ckpt / "llm_tokenizer")


def _weights_are_a_directory(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()


def broken_checkpoint(tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of the fixture's checkpoint files (not its videos and goldens), then `edit` applied."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(FIXTURE / "config.json", ckpt)
    shutil.copy(FIXTURE / "model.safetensors", ckpt)
    for sub in ("llm_tokenizer", "qformer_tokenizer"):
        shutil.copytree(FIXTURE / sub, ckpt / sub)
    edit(ckpt)
    return ckpt


CHECKPOINT_CASES = {   # edit -> what the one error line must say
    "truncated_safetensors": (_truncate, ["cannot read weight file", "model.safetensors",
                                          "Error while deserializing header"]),
    "wrong_shape_and_missing_key": (_wrong_shape_and_missing_key, [
        "checkpoint does not match the model", "missing keys (1): vision_encoder.blocks.2.attn.proj.bias",
        "vision_encoder.pos_embed: checkpoint [1, 2048, 64] vs model [1, 2049, 64]"]),
    "invalid_config_json": (_invalid_config_json, ["config.json is not valid JSON"]),
    "no_llm_tokenizer": (_no_llm_tokenizer, ["no tokenizer.model in", "llm_tokenizer"]),
    "weights_are_a_directory": (_weights_are_a_directory, ["model.safetensors: not a regular file"]),
}


# ---------------------------------------------------------------------------------------------- python -m videochat chat
def chat(checkpoint: Path, *args: str, video: Path = VIDEO) -> subprocess.CompletedProcess:
    return run("-m", "videochat", "chat", "--checkpoint", str(checkpoint), "--video", str(video), "--prompt", "q",
               "--device", "cpu", "--max-new-tokens", "2", *args)


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_chat_broken_checkpoint(tmp_path, case):
    edit, needles = CHECKPOINT_CASES[case]
    ckpt = broken_checkpoint(tmp_path, edit)
    proc = chat(ckpt)
    assert_one_error(proc, 2, f"cannot load checkpoint {ckpt}:", *needles)
    assert proc.stdout == ""


def test_chat_bad_paths(tmp_path):
    # all checked before torch is imported: these are fast
    assert_one_error(chat(tmp_path / "missing"), 2, f"cannot load checkpoint {tmp_path / 'missing'}: does not exist")
    assert_one_error(chat(FIXTURE / "config.json"), 2, "config.json: is not a directory")
    assert_one_error(chat(FIXTURE, video=tmp_path / "missing.mp4"), 2, "cannot read video", "No such file")
    assert_one_error(chat(FIXTURE, video=tmp_path), 2, f"cannot read video {tmp_path}: Is a directory")


def test_chat_bad_flag():
    assert_usage_error(chat(FIXTURE, "--max-new-tokens", "many"), "python -m videochat chat", "--max-new-tokens")
    assert_usage_error(chat(FIXTURE, "--seed", str(2 ** 64)), "python -m videochat chat", "--seed")


def test_unknown_command():
    proc = run("-m", "videochat", "tchat")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m videochat") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- serve
def serve(tmp_path: Path, *args: str, ports: tuple[int, int, int] | None = None) -> subprocess.CompletedProcess:
    http, grpc, metrics = ports or (free_port(), free_port(), free_port())
    return run("-m", "videochat", "serve", "--device", "cpu", "--work-dir", str(tmp_path / "work"),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--health-port", str(free_port()), *args)


def test_serve_port_in_use_fails_fast(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        start = time.monotonic()
        proc = serve(tmp_path, "--checkpoint", str(FIXTURE), ports=(free_port(), busy, free_port()))
        elapsed = time.monotonic() - start
    assert_one_error(proc, 2, f"port {busy} (--grpc-port) is already in use on 127.0.0.1")
    assert elapsed < 10, f"took {elapsed:.1f} s: the port must be checked before tritonserver starts"
    assert not (tmp_path / "work").exists()   # checked before anything was written


@pytest.mark.parametrize("case", ["truncated_safetensors", "invalid_config_json", "no_llm_tokenizer"])
def test_serve_broken_checkpoint_fails_before_tritonserver(tmp_path, case):
    edit, needles = CHECKPOINT_CASES[case]
    assert_one_error(serve(tmp_path, "--checkpoint", str(broken_checkpoint(tmp_path, edit))), 2, *needles[:2])


def test_serve_bad_paths_and_flags(tmp_path):
    assert_one_error(serve(tmp_path, "--checkpoint", str(tmp_path / "missing")), 2,
                     f"checkpoint {tmp_path / 'missing'} has no config.json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run("-m", "videochat", "serve", "--device", "cpu", "--work-dir", str(blocker), "--checkpoint",
               str(FIXTURE), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port()), "--health-port", str(free_port()))
    assert_one_error(proc, 2, f"cannot create --work-dir {blocker}: File exists")
    same = free_port()
    assert_one_error(serve(tmp_path, "--checkpoint", str(FIXTURE), ports=(same, same, free_port())), 2,
                     "must differ")
    assert_usage_error(serve(tmp_path, "--instances", "two"), "python -m videochat serve", "--instances")
    assert_usage_error(serve(tmp_path, "--grpc-port", "70000"), "python -m videochat serve", "1..65535")


# ---------------------------------------------------------------------------------------------- make-demo-checkpoint
def test_make_demo_checkpoint_into_a_file(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("")
    assert_one_error(run("-m", "videochat", "make-demo-checkpoint", str(target)), 2,
                     f"cannot write the demo checkpoint: {target}: File exists")


# ---------------------------------------------------------------------------------------------- python -m preprocessing
def test_preprocessing_cli(tmp_path):
    assert_one_error(run("-m", "preprocessing", str(tmp_path), "--out", str(tmp_path / "pv.npy")), 2,
                     f"cannot read {tmp_path}: Is a directory")
    out = tmp_path / "no" / "such" / "pv.npy"
    assert_one_error(run("-m", "preprocessing", str(VIDEO), "--out", str(out)), 2,
                     f"cannot write --out {out}: no such folder")
    # (its argparse errors are plain argparse; not run here: each `python -m preprocessing` imports torch)


# ---------------------------------------------------------------------------------------------- videochat (client)
CLIENT_ERROR = "videochat: error: "


def client(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return run("-m", "videochat_client.cli", *args, stdin=stdin)


@pytest.fixture(scope="module")
def down_url() -> str:
    return f"127.0.0.1:{free_port()}"   # nothing listens there


def test_client_bad_local_files(tmp_path, down_url):
    ask = ["ask", "--url", down_url, "--retries", "0"]
    assert_one_error(client(*ask, str(tmp_path / "missing.mp4"), "q"), 2, "INVALID_ARGUMENT", "missing.mp4",
                     "No such file", prefix=CLIENT_ERROR)
    assert_one_error(client(*ask, str(tmp_path), "q"), 2, "INVALID_ARGUMENT", "Is a directory", prefix=CLIENT_ERROR)
    bad = tmp_path / "conv.json"
    bad.write_text("{not json")
    assert_one_error(client(*ask, str(VIDEO), "q", "--resume", str(bad)), 2, "--resume", "not a saved conversation",
                     prefix=CLIENT_ERROR)
    assert_one_error(client(*ask, str(VIDEO), "q", "--save", str(tmp_path)), 2, "--save", "Is a directory",
                     prefix=CLIENT_ERROR)
    assert_one_error(client(*ask, str(VIDEO), "q", "--ssl", "--root-certificates", str(tmp_path / "ca.pem")), 2,
                     "--root-certificates", "No such file", prefix=CLIENT_ERROR)
    assert_one_error(client("loadtest", "--url", down_url, "--video", str(VIDEO), "--out", str(tmp_path),
                            "--requests", "1", "--quiet"), 2, "--out", "Is a directory", prefix=CLIENT_ERROR)


def test_client_server_unavailable(down_url):
    assert_one_error(client("ask", "--url", down_url, "--retries", "0", str(VIDEO), "q"), 3, "UNAVAILABLE",
                     prefix=CLIENT_ERROR)
    assert_one_error(client("chat", "--url", down_url, "--retries", "0", str(VIDEO), stdin="hi\n"), 3,
                     "UNAVAILABLE", prefix=CLIENT_ERROR)
    proc = client("health", "--url", down_url)   # documented: the state as JSON on stdout, exit 3
    assert proc.returncode == 3 and proc.stderr == "" and json.loads(proc.stdout)["ready"] is False


def test_client_bad_flags(down_url):
    assert_usage_error(client("ask", "--url", down_url, "--retries", "-1", str(VIDEO), "q"), "videochat ask",
                       "--retries")
    assert_usage_error(client("health", "--url", down_url, "--timeout", "0"), "videochat health", "--timeout")
