"""`serve --log-format json`'s line conversion (videochat/launch/logs.py): Triton's text lines and the python
models' tagged ones become records with level, source and request_id; the launcher's prints too. The real
server's JSON log is tests/e2e/test_observability.py."""
from __future__ import annotations

import io
import json

from videochat.launch.logs import JsonLines, triton_record
from videochat.serving.logs import tagged


def test_a_tagged_model_line_becomes_a_record_with_its_request_id():
    line = f'W1120 10:20:30.123456 4242 model.py:55] "{tagged("req 7]", "invalid_arg: bad video: x")}"\n'
    r = triton_record(line)
    assert (r["level"], r["source"], r["file"], r["pid"]) == ("warning", "tritonserver", "model.py:55", 4242)
    assert r["request_id"] == "req_7_" and r["msg"] == "invalid_arg: bad video: x"   # no space or ] in the id
    plain = triton_record("I1120 10:20:30.1 1 server.cc:1] Started GRPCInferenceService at 0.0.0.0:8001")
    assert plain["level"] == "info" and "request_id" not in plain
    odd = triton_record("not triton's format")
    assert odd["msg"] == "not triton's format" and odd["level"] == "info"


def test_json_lines_turns_each_printed_line_into_one_record():
    out = io.StringIO()
    stream = JsonLines(out)
    print("ready: model 'videochat' on grpc 127.0.0.1:8001", file=stream)
    stream.write("error: half a ")
    stream.write("line\n")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["msg"] for r in records] == ["ready: model 'videochat' on grpc 127.0.0.1:8001", "error: half a line"]
    assert [r["level"] for r in records] == ["info", "error"] and {r["source"] for r in records} == {"serve"}
