"""`python -m videochat serve` as a user runs it: no checkpoint (the demo one is created), CPU, unary mode
(`--decoupled-mode false`); it answers one plain gRPC ModelInfer and stops cleanly on SIGTERM (exit 0, no
tritonserver or stub left behind)."""
from __future__ import annotations

import sys
from pathlib import Path

from support.paths import ROOT, TINY
from support.server import TritonHandle, serve_process


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_serve_demo_checkpoint_unary_and_sigterm(tmp_path):
    args = ["--work-dir", str(tmp_path), "--preprocess-instances", "1", "--decoupled-mode", "false",
            "--exit-timeout-secs", "10"]
    with serve_process(sys.executable, args, cwd=ROOT) as serving:
        assert (tmp_path / "demo-checkpoint" / "config.json").is_file()
        answer = TritonHandle(None, serving.grpc_url).infer(
            model="videochat", video=(TINY / "videos" / "example1.mp4").read_bytes(), prompt="What is this?",
            max_new_tokens=5)
        assert 1 <= answer.usage.completion_tokens <= 5 and answer.finish_reason in ("stop", "length")
    assert serving.proc.returncode == 0, "".join(serving.lines[-20:]) + serving.output[-3000:]
    assert "tritonserver exited with code 0" in serving.output
    assert processes_mentioning(str(tmp_path)) == []
