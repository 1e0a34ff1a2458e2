"""`python -m videochat chat` through a subprocess on the golden cases: A1's three chained turns and A3
(padding + instruction) reproduce the official tokens and text; --json shape; a rejected video exits 2 with
a one-line error; streaming text mode prints the answers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import ROOT

REPO = ROOT
FIXTURE = REPO / "tests" / "data" / "tiny-videochat"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
CASES = {case["id"]: case for case in GOLDEN["cases"]}
MAX_NEW_TOKENS = GOLDEN["generation_config"]["max_new_tokens"]
TIMEOUT_S = 120


def run_chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "videochat", "chat", "--checkpoint", str(FIXTURE),
                           "--device", "cpu", *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)


def case_args(case: dict) -> list[str]:
    pre = case["preprocess"]
    args = ["--video", str(FIXTURE / case["video"]), "--num-segments", str(pre["num_segments"]),
            "--hd-num", str(pre["hd_num"]), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    args += ["--padding"] if pre["padding"] else []
    args += ["--image"] if case["media_type"] == "image" else []
    args += ["--msg", case["msg"]] if case["msg"] else []
    args += ["--instruction", case["instruction"]] if case["instruction"] else []
    for turn in case["turns"]:
        args += ["--prompt", turn["user_prompt"]]
    return args


@pytest.mark.parametrize("case_id", ["A1_example1_nopad", "A3_example1_pad_instruction"])
def test_json_turns_match_golden(case_id):
    case = CASES[case_id]
    proc = run_chat(*case_args(case), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out) == ["turns"]
    assert [list(t) for t in out["turns"]] == [["prompt", "text", "token_ids"]] * len(case["turns"])
    assert [t["prompt"] for t in out["turns"]] == [t["user_prompt"] for t in case["turns"]]
    assert [t["token_ids"] for t in out["turns"]] == [t["generated_ids"] for t in case["turns"]]
    assert [t["text"] for t in out["turns"]] == [t["response"] for t in case["turns"]]


def test_streaming_text_mode():
    case = CASES["A1_example1_nopad"]
    proc = run_chat("--video", str(FIXTURE / case["video"]), "--max-new-tokens", str(MAX_NEW_TOKENS),
                    "--prompt", case["turns"][0]["user_prompt"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"USER: {case['turns'][0]['user_prompt']}\nASSISTANT: {case['turns'][0]['response']}\n"


def test_rejected_video_exits_2(tmp_path):
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    proc = run_chat("--video", str(bad), "--prompt", "q")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_video_and_bad_params_exit_2(tmp_path):
    assert run_chat("--video", str(tmp_path / "missing.mp4"), "--prompt", "q").returncode == 2
    proc = run_chat("--video", str(FIXTURE / "videos" / "example1.mp4"), "--prompt", "q", "--max-new-tokens", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    proc = subprocess.run([sys.executable, "-m", "videochat", "chat", "--checkpoint", str(tmp_path), "--video",
                           str(FIXTURE / "videos" / "example1.mp4"), "--prompt", "q"],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
