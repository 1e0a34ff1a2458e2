"""End to end through the `videochat` ensemble (real tritonserver, gRPC streaming): every golden case/turn of the
tiny fixture gives the golden text and ids, and the same answers as the offline CLI (`python -m videochat chat
--json`). Multi-turn conversations go through the `history` input, chaining the served answers."""
from __future__ import annotations

import json
import pytest

from support.paths import TINY

GOLDEN = json.loads((TINY / "golden.json").read_text())
MAX_NEW = GOLDEN["generation_config"]["max_new_tokens"]


def case_fields(case: dict) -> dict:
    pre = case["preprocess"]
    return dict(video=(TINY / case["video"]).read_bytes(), image=case["media_type"] == "image",
                num_segments=pre["num_segments"], hd_num=pre["hd_num"], padding=pre["padding"],
                msg=case["msg"], instruction=case["instruction"], max_new_tokens=MAX_NEW)


def cli_answers(case: dict, capsys) -> list[dict]:
    """The offline CLI's `main` in this process (a subprocess per case would pay torch's import 5 times)."""
    from videochat.tools.chat import main

    pre = case["preprocess"]
    cmd = ["--json", "--device", "cpu", "--checkpoint", str(TINY),
           "--video", str(TINY / case["video"]), "--num-segments", str(pre["num_segments"]),
           "--hd-num", str(pre["hd_num"]), "--max-new-tokens", str(MAX_NEW), "--msg", case["msg"]]
    cmd += ["--padding"] if pre["padding"] else []
    cmd += ["--image"] if case["media_type"] == "image" else []
    cmd += ["--instruction", case["instruction"]] if case["instruction"] else []
    for turn in case["turns"]:
        cmd += ["--prompt", turn["user_prompt"]]
    capsys.readouterr()
    assert main(cmd) == 0
    return json.loads(capsys.readouterr().out)["turns"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["id"] for c in GOLDEN["cases"]])
def test_served_answers_equal_golden_and_cli(triton, case, capsys):
    history = []
    served = []
    for turn in case["turns"]:
        answer = triton.stream(prompt=turn["user_prompt"], history=history, **case_fields(case))
        assert answer.text == turn["response"], turn["user_prompt"]
        assert list(answer.token_ids) == turn["generated_ids"]
        assert answer.usage.prompt_tokens == turn["prompt_len"]
        assert answer.usage.completion_tokens == turn["num_generated"]
        assert answer.finish_reason == ("stop" if turn["stopped_on_eos"] else "length")
        served.append(answer)
        history.append((turn["user_prompt"], answer.text))
    offline = cli_answers(case, capsys)
    assert [a.text for a in served] == [t["text"] for t in offline]
    assert [list(a.token_ids) for a in served] == [t["token_ids"] for t in offline]
