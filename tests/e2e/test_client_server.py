"""videochat_client and the `videochat` CLI against the REAL server (conftest's session `triton` fixture: tiny
fixture checkpoint, decoupled `videochat` + unary `videochat_unary`).

Checks: multi-turn conversations give the golden answers of tests/data/tiny-videochat (which the offline
`python -m videochat chat` reproduces, see test_triton_golden.py); streaming == unary; the asyncio client ==
the sync one, also with concurrent calls on one channel; a bad video is InvalidArgument with the server's
message and no retry; a per-call deadline is DeadlineExceeded; history continues through JSON on another
client; CLI `ask --json`, `health` and exit codes 0/2/3."""
from __future__ import annotations

import asyncio
import json

import pytest

from support.paths import TINY, VIDEOS
from support.server import free_port
from videochat_client import (AsyncVideoChatClient, Conversation, DeadlineExceeded, InvalidArgument, RetryPolicy,
                              VideoChatClient)
from videochat_client import cli

GOLDEN = json.loads((TINY / "golden.json").read_text())
CASES = {c["id"]: c for c in GOLDEN["cases"]}
MAX_NEW = GOLDEN["generation_config"]["max_new_tokens"]


def media_kwargs(case: dict) -> dict:
    pre = case["preprocess"]
    return dict(image=case["media_type"] == "image", num_segments=pre["num_segments"], hd_num=pre["hd_num"],
                padding=pre["padding"], msg=case["msg"], instruction=case["instruction"])


def assert_golden(answer, turn):
    assert answer.text == turn["response"], turn["user_prompt"]
    assert list(answer.token_ids) == turn["generated_ids"]
    assert answer.usage.prompt_tokens == turn["prompt_len"]
    assert answer.usage.completion_tokens == turn["num_generated"]
    assert answer.usage.total_tokens == turn["prompt_len"] + turn["num_generated"]
    assert answer.finish_reason == ("stop" if turn["stopped_on_eos"] else "length")
    assert answer.timings.latency_ms > 0 and answer.timings.time_to_first_token_ms <= answer.timings.latency_ms


@pytest.fixture(scope="module")
def client(triton):
    with VideoChatClient(triton.url, timeout=120) as c:
        yield c


@pytest.mark.parametrize("case_id", list(CASES))
def test_conversation_gives_golden_answers(client, case_id):
    case = CASES[case_id]
    conv = client.conversation(TINY / case["video"], **media_kwargs(case))
    for turn in case["turns"]:
        assert_golden(conv.ask(turn["user_prompt"], max_new_tokens=MAX_NEW), turn)
    assert conv.history == tuple(tuple(t) for t in case["turns"][-1]["chat_history_after"])


def test_streaming_equals_unary(triton, client):
    case = CASES["A1_example1_nopad"]
    conv = client.conversation(TINY / case["video"], **media_kwargs(case))
    stream = conv.ask_stream(case["turns"][0]["user_prompt"], max_new_tokens=MAX_NEW)
    pieces = list(stream)
    assert len(pieces) > 1, "the decoupled model streams several responses"
    assert "".join(pieces) == stream.answer.text
    assert_golden(stream.answer, case["turns"][0])
    assert conv.history == ((case["turns"][0]["user_prompt"], stream.answer.text),)   # recorded when exhausted
    with VideoChatClient(triton.url, model_name="videochat_unary") as unary:
        u = unary.conversation(TINY / case["video"], **media_kwargs(case)).ask(case["turns"][0]["user_prompt"],
                                                                                max_new_tokens=MAX_NEW)
    assert (u.text, u.token_ids, u.usage) == (stream.answer.text, stream.answer.token_ids, stream.answer.usage)


def test_async_client_concurrent_conversations(triton):
    a4, a5 = CASES["A4_portrait_nopad"], CASES["A5_image_example1_nopad"]

    async def run():
        async with AsyncVideoChatClient(triton.url, timeout=120) as ac:
            async def talk(case):
                conv = ac.conversation(TINY / case["video"], **media_kwargs(case))
                answers = []
                for turn in case["turns"]:
                    stream = conv.ask_stream(turn["user_prompt"], max_new_tokens=MAX_NEW)
                    text = "".join([p async for p in stream])
                    assert text == stream.answer.text
                    answers.append(stream.answer)
                return answers
            return await asyncio.gather(talk(a4), talk(a5), ac.health())

    r4, r5, health = asyncio.run(run())
    for answers, case in ((r4, a4), (r5, a5)):
        for answer, turn in zip(answers, case["turns"]):
            assert_golden(answer, turn)
    assert health == {"live": True, "ready": True, "model_ready": True}


def test_bad_video_is_invalid_argument_with_server_message(triton):
    with VideoChatClient(triton.url, retry_policy=RetryPolicy(max_retries=3, initial_backoff=0.01)) as c:
        sleeps = []
        c._sleep = sleeps.append
        conv = c.conversation(VIDEOS / "random_bytes_64k.mp4")
        with pytest.raises(InvalidArgument) as ei:
            conv.ask("What is this?", max_new_tokens=4)
    err = ei.value
    assert err.code == "INVALID_ARGUMENT" and "video" in err.message and err.request_id
    assert sleeps == [] and conv.history == ()   # never retried; a failed turn is not history


def test_async_bad_video_is_invalid_argument(triton):
    async def run():
        async with AsyncVideoChatClient(triton.url) as ac:
            await ac.conversation(VIDEOS / "zero_bytes.mp4").ask("hi", max_new_tokens=4)
    with pytest.raises(InvalidArgument):
        asyncio.run(run())


def test_deadline_exceeded(client):
    case = CASES["A1_example1_nopad"]
    conv = client.conversation(TINY / case["video"])
    with pytest.raises(DeadlineExceeded):
        conv.ask("hi", max_new_tokens=MAX_NEW, timeout=0.05)


def test_history_continues_through_json_on_another_client(triton, client, tmp_path):
    case = CASES["A3_example1_pad_instruction"]
    t1, t2 = case["turns"]
    conv = client.conversation(TINY / case["video"], **media_kwargs(case))
    assert_golden(conv.ask(t1["user_prompt"], max_new_tokens=MAX_NEW), t1)
    saved = tmp_path / "conv.json"
    saved.write_text(conv.to_json())
    with VideoChatClient(triton.url) as elsewhere:
        resumed = Conversation.from_json(saved.read_text(), elsewhere)
        assert resumed.history == conv.history and resumed.media == conv.media
        assert_golden(resumed.ask(t2["user_prompt"], max_new_tokens=MAX_NEW), t2)
    assert resumed.history == tuple(tuple(t) for t in t2["chat_history_after"])


def test_cli_ask_json_health_and_exit_codes(triton, capsys, tmp_path):
    case = CASES["A1_example1_nopad"]
    video = str(TINY / case["video"])
    save = tmp_path / "c.json"
    assert cli.main(["ask", "--url", triton.url, video, case["turns"][0]["user_prompt"],
                     case["turns"][1]["user_prompt"], "--max-new-tokens", str(MAX_NEW), "--json",
                     "--save", str(save)]) == 0
    turns = json.loads(capsys.readouterr().out)["turns"]
    assert [t["text"] for t in turns] == [t["response"] for t in case["turns"][:2]]
    assert all(t["latency_ms"] > 0 and t["usage"]["total_tokens"] > 0 for t in turns)
    # continue the saved conversation with --stream (plain text)
    assert cli.main(["ask", "--url", triton.url, video, case["turns"][2]["user_prompt"], "--stream",
                     "--max-new-tokens", str(MAX_NEW), "--resume", str(save)]) == 0
    assert capsys.readouterr().out.strip() == case["turns"][2]["response"]

    assert cli.main(["ask", "--url", triton.url, str(VIDEOS / "random_bytes_64k.mp4"), "q"]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "video" in err
    assert cli.main(["ask", "--url", f"127.0.0.1:{free_port()}", "--retries", "1", video, "q"]) == 3
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main(["health", "--url", triton.url]) == 0
    assert json.loads(capsys.readouterr().out)["model_ready"] is True


def test_cli_chat_reads_stdin(triton, capsys, monkeypatch):
    import io
    case = CASES["A4_portrait_nopad"]
    questions = "\n".join(t["user_prompt"] for t in case["turns"]) + "\nexit\nnot asked\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(questions))
    assert cli.main(["chat", "--url", triton.url, str(TINY / case["video"]), "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out.splitlines() == [t["response"] for t in case["turns"]]
