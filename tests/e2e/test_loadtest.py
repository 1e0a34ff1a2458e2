"""`videochat loadtest` against the real server (conftest's `triton`): a short closed-loop sweep with a bad
video among the inputs (its errors are counted by gRPC code), a short open-loop level, an unreachable url, and
the report's documented fields: `levels[*].{concurrency|rate, requests_per_second, output_tokens_per_second,
latency_ms.{p50,p90,p99}, errors}`, the CSV next to --out, the PNG, and the server-side Prometheus view."""
from __future__ import annotations

import csv
import json

from support.paths import TINY, VIDEOS
from support.server import free_port
from videochat_client import cli


def test_closed_loop_sweep_report(triton, tmp_path, capsys):
    out = tmp_path / "report.json"
    metrics = f"127.0.0.1:{triton.server.endpoints.metrics_port}"
    rc = cli.main(["loadtest", "--url", triton.url, "--metrics-url", metrics,
                   "--video", str(TINY / "videos" / "example1.mp4"), str(VIDEOS / "random_bytes_64k.mp4"),
                   "--concurrency", "1,2", "--requests", "4", "--turns", "2", "--max-new-tokens", "4",
                   "--stream", "--out", str(out), "--plot", str(tmp_path / "report.png")])
    assert rc == 0
    paths = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["requests"] == 4
        # sessions alternate videos: the bad one fails its first turn, the good one runs 2 turns
        assert lv["errors"] == {"INVALID_ARGUMENT": lv["failed_requests"]} and lv["failed_requests"] >= 1
        assert "bad video" in lv["error_examples"]["INVALID_ARGUMENT"]
        assert lv["successful_requests"] >= 1
        assert lv["requests_per_second"] > 0 and lv["output_tokens_per_second"] > 0
        assert lv["latency_ms"]["p50"] <= lv["latency_ms"]["p90"] <= lv["latency_ms"]["p99"]
        assert lv["time_to_first_token_ms"]["p50"] <= lv["latency_ms"]["p99"]
        assert lv["inter_token_latency_ms"]["p50"] >= 0
        llm = lv["server"]["models"]["videochat_llm"]
        assert llm["inference_count"] >= lv["successful_requests"] and llm["avg_batch_size"] >= 1
        assert lv["server"]["custom"], "the server's videochat_* metrics are reported"
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["concurrency"] for r in rows] == ["1", "2"] and rows[0]["errors"].startswith("INVALID_ARGUMENT=")
    assert float(rows[0]["latency_ms_p99"]) > 0
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_open_loop_and_unreachable_url(triton, tmp_path, capsys):
    out = tmp_path / "open.json"
    assert cli.main(["loadtest", "--url", triton.url, "--no-metrics", "--video", str(TINY / "videos" / "example1.mp4"),
                     "--rate", "4", "--requests", "2", "--max-new-tokens", "2", "--out", str(out), "--quiet"]) == 0
    lv = json.loads(out.read_text())["levels"][0]
    assert lv["rate"] == 4.0 and lv["mode"] == "open" and lv["successful_requests"] == 2 and lv["errors"] == {}

    out = tmp_path / "down.json"
    assert cli.main(["loadtest", "--url", f"127.0.0.1:{free_port()}", "--video", str(VIDEOS / "zero_bytes.mp4"),
                     "--concurrency", "2", "--requests", "3", "--out", str(out), "--quiet"]) == 0
    lv = json.loads(out.read_text())["levels"][0]
    assert lv["errors"] == {"UNAVAILABLE": 3} and lv["requests_per_second"] == 0 and lv["latency_ms"] is None
    assert "error" in lv["server"]   # metrics endpoint unreachable too: said, not fatal
    capsys.readouterr()


def test_loadtest_rejects_out_of_range_options(tmp_path, capsys):
    base = ["loadtest", "--url", "127.0.0.1:1", "--video", str(VIDEOS / "zero_bytes.mp4"), "--out",
            str(tmp_path / "r.json")]
    assert cli.main(base + ["--concurrency", "0"]) == 2
    assert cli.main(base + ["--requests", "1000000"]) == 2
    assert cli.main(base + ["--requests", "2", "--duration", "1"]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_slo_report_export_server_config_and_two_replicas(triton, tmp_path, capsys):
    """--percentiles, --goodput, the per-request JSONL, the model configuration and two --url "replicas" (the
    same server twice, each with its metrics URL): sessions alternate between them, `servers` has both."""
    out = tmp_path / "slo.json"
    metrics = f"127.0.0.1:{triton.server.endpoints.metrics_port}"
    assert cli.main(["loadtest", "--url", triton.url, "--url", triton.url.replace("127.0.0.1", "localhost"),
                     "--metrics-url", metrics, "--metrics-url", metrics, "--video", str(TINY / "videos" / "example1.mp4"),
                     "--image", "--concurrency", "2", "--requests", "6", "--max-new-tokens", "3", "--stream",
                     "--percentiles", "50,95,99.9", "--goodput", "ttft_ms=600000", "latency_ms=600000",
                     "--header", "x-tenant=test", "--out", str(out)]) == 0
    paths = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    (lv,) = report["levels"]
    for block in ("latency_ms", "time_to_first_token_ms", "inter_token_latency_ms"):
        assert {"p50", "p90", "p95", "p99", "p99.9"} <= set(lv[block]), block
    assert lv["goodput"]["good_requests"] == lv["successful_requests"] == 6 and lv["goodput"]["fraction"] == 1.0
    assert list(lv["servers"]) == [f"http://{metrics}/metrics"]     # one key: both "replicas" are this server
    assert report["config"]["header_names"] == ["x-tenant"] and len(report["config"]["urls"]) == 2
    config = report["server_config"][triton.url]
    assert config["videochat"]["platform"] == "ensemble" and "videochat_llm" in config
    rows = [json.loads(line) for line in open(paths["requests"])]
    assert paths["requests"] == str(tmp_path / "slo.requests.jsonl") and len(rows) == 6
    assert {r["replica"] for r in rows} == set(report["config"]["urls"])     # round robin over both
    assert all(r["status"] == "OK" and r["request_id"] and r["ttft_s"] <= r["end_s"] for r in rows)
