"""`videochat loadtest`'s numbers on a known set of timings: the pNN of every latency block (--percentiles),
goodput against SLOs (--goodput), the per-request JSONL export, and `loadtest compare --plot` writing a PNG."""
from __future__ import annotations

import json

import pytest

from videochat_client import cli
from videochat_client.loadtest import Record, summarize
from videochat_client.loadtest.export import requests_path, write_requests
from videochat_client.loadtest.server_info import fleet_scrape, metrics_urls
from videochat_client.loadtest.stats import goodput, parse_goodput, parse_percentiles
from videochat_client.metrics import parse_prometheus


def timings() -> list[Record]:
    """100 successful requests: latency i*10 ms, TTFT i ms (i = 1..100), one per 0.1 s; and 4 failures."""
    ok = [Record(start=0.1 * (i - 1), end=0.1 * (i - 1) + i / 100, turn=0, latency_ms=10.0 * i, ttft_ms=float(i),
                 itl_ms=1.0, output_tokens=8) for i in range(1, 101)]
    failed = [Record(start=1.0, end=1.5, turn=0, error="UNAVAILABLE", error_message="overloaded") for _ in range(4)]
    return ok + failed


def test_every_latency_block_has_the_requested_percentiles_next_to_the_old_keys():
    level = summarize(timings(), percentiles=parse_percentiles("50,90,95,99"))
    lat, ttft = level["latency_ms"], level["time_to_first_token_ms"]
    # numpy's linear interpolation: rank p/100 * (n - 1) over 1..100
    assert (lat["p50"], lat["p90"], lat["p95"], lat["p99"]) == pytest.approx((505.0, 901.0, 950.5, 990.1))
    assert (ttft["p50"], ttft["p95"]) == pytest.approx((50.5, 95.05))
    assert {"mean", "min", "max", "std"} <= set(lat) and lat["mean"] == pytest.approx(505.0)
    for block in ("latency_ms", "time_to_first_token_ms", "inter_token_latency_ms", "output_tokens_per_request"):
        assert {"p50", "p90", "p95", "p99"} <= set(level[block]), block
    odd = summarize(timings(), percentiles=parse_percentiles("99.9,75"))["latency_ms"]
    assert {"p50", "p75", "p90", "p99", "p99.9"} <= set(odd)              # p50/p90/p99 always stay
    assert odd["p99.9"] == pytest.approx(999.01)
    for bad in ("", "0", "101", "x"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)


def test_goodput_counts_requests_that_met_every_slo():
    records = timings()
    slos = parse_goodput(["ttft_ms=40", "latency_ms=600"])   # TTFT <= 40 (i <= 40) and latency <= 600 (i <= 60)
    level = summarize(records, slos=slos)
    wall = max(r.end for r in records) - min(r.start for r in records)
    assert level["goodput"]["good_requests"] == 40
    assert level["goodput"]["fraction"] == pytest.approx(40 / 104)          # failures count as misses
    assert level["goodput"]["requests_per_second"] == pytest.approx(40 / wall)
    assert level["goodput"]["slos"] == {"ttft_ms": 40.0, "latency_ms": 600.0}
    # a request without TTFT (not streamed) cannot meet a TTFT SLO
    assert goodput([Record(start=0, end=1, turn=0, latency_ms=1.0)], {"ttft_ms": 1e9}, 1.0)["good_requests"] == 0
    for bad in (["ttft=5"], ["ttft_ms"], ["latency_ms=-1"], ["itl_ms=abc"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_per_request_export_is_jsonl_next_to_out(tmp_path):
    out = str(tmp_path / "run.json")
    path = requests_path(out)
    assert path == str(tmp_path / "run.requests.jsonl")
    records = timings()
    records[0].replica, records[0].request_id = "10.0.0.1:8001", "abc"
    assert write_requests(path, [({"concurrency": 4}, records)]) == 104
    rows = [json.loads(line) for line in open(path)]
    first = rows[0]
    assert first["level"] == {"concurrency": 4} and first["status"] == "OK" and first["replica"] == "10.0.0.1:8001"
    assert first["start_s"] == 0.0 and first["ttft_s"] == pytest.approx(0.001) and first["output_tokens"] == 8
    assert first["request_id"] == "abc"
    assert sum(r["status"] == "UNAVAILABLE" for r in rows) == 4


def test_several_replicas_metrics_urls_and_fleet_sum():
    assert metrics_urls(["a:8001", "b:9001"], []) == ["http://a:8002/metrics", "http://b:8002/metrics"]
    assert metrics_urls(["a:8001", "b:9001"], ["a:1", "b:2"]) == ["http://a:1/metrics", "http://b:2/metrics"]
    with pytest.raises(ValueError):
        metrics_urls(["a:1", "b:1", "c:1"], ["x:1", "y:1"])
    one = parse_prometheus('# TYPE x counter\nx{model="m"} 2\n')
    two = parse_prometheus('# TYPE x counter\nx{model="m"} 3\n')
    assert fleet_scrape([one, two]).get("x", model="m") == 5
    assert fleet_scrape([one, None]) is None


def report(rps: float) -> dict:
    levels = [{"concurrency": c, "mode": "closed", "requests_per_second": rps * c, "output_tokens_per_second": 1.0,
               "latency_ms": {"p50": 10.0 * c, "p99": 20.0 * c}, "time_to_first_token_ms": {"p50": 1.0 * c},
               "failed_requests": 0} for c in (1, 4, 16)]
    return {"tool": "videochat loadtest", "config": {}, "levels": levels}


def test_compare_writes_a_png_overlaying_the_runs(tmp_path, capsys):
    paths = []
    for name, rps in (("a", 1.0), ("b", 2.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps(report(rps)))
        paths.append(str(tmp_path / f"{name}.json"))
    png = tmp_path / "cmp.png"
    assert cli.main(["loadtest", "compare", *paths, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["run"], r["level"]) for r in lines[:3]] == [("a", 1.0), ("a", 4.0), ("a", 16.0)]
    assert lines[-1] == {"plot": str(png)}
    (tmp_path / "bad.json").write_text("[]")
    assert cli.main(["loadtest", "compare", str(tmp_path / "bad.json")]) == cli.EXIT_INVALID
