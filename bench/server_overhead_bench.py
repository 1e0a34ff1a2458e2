"""Server overhead: one request through the Triton ensemble (`python -m videochat serve`, defaults, CPU) against
the same work in-process (`preprocess` on the bytes -> fp16 pixels, as the preprocessing step emits ->
`VideoChatModel.generate` on the same checkpoint), concurrency 1, interleaved, medians over N runs.

    .venv/bin/python bench/server_overhead_bench.py [--checkpoint DIR] [--runs 9] [--max-new-tokens 64] [--image]

The client is `videochat_client.VideoChatClient` (stream_infer against the decoupled ensemble, the default
serving mode). The breakdown comes from Triton's statistics API per model (preprocessing compute, videochat_llm
queue and compute) and the client's clock; in-process it is preprocess vs generate.
The server runs with its content caches OFF by default (`--media-cache-mb 0 --visual-cache-mb 0`): every run
re-sends the same file, and a cache hit would skip decoding and the ViT that the in-process side pays, so the
ratio would no longer be overhead. `--caches` keeps them on (what a repeated video costs, e.g. a 2nd turn).
Writes bench/results/server_overhead.json and prints a summary.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _server import VIDEOS, demo_checkpoint, serve, spread, stats_delta, write_json

from videochat_client import VideoChatClient


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the serve command's demo checkpoint")
    p.add_argument("--video", type=Path, default=VIDEOS / "faststart_h264_640x360_6s.mp4")
    p.add_argument("--image", action="store_true", help="treat --video as an image (image=true)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `python -m videochat serve` argument")
    p.add_argument("--caches", action="store_true", help="keep the server's media/visual caches on")
    p.add_argument("--out", default="server_overhead.json")
    return p.parse_args(argv)


PROMPT = "Describe the video in detail."


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from preprocessing import preprocess
    from videochat.runtime.generation import generate
    from videochat.runtime.types import ChatRequest, GenerationParams
    from videochat.model.videochat_model import VideoChatModel

    checkpoint = (args.checkpoint or demo_checkpoint()).resolve()
    data = args.video.read_bytes()
    media_type = "image" if args.image else "video"
    model = VideoChatModel.from_checkpoint(checkpoint, device="cpu")

    def in_process() -> dict:
        t0 = time.perf_counter()
        pixels = preprocess(data, image=args.image).pixel_values[0].to(torch.float16)   # what PIXEL_VALUES carries
        t1 = time.perf_counter()
        req = ChatRequest(media=pixels, media_type=media_type, prompt=PROMPT,
                          params=GenerationParams(max_new_tokens=args.max_new_tokens))
        result = generate(model, [req])[0]
        t2 = time.perf_counter()
        return {"total_ms": (t2 - t0) * 1e3, "preprocess_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3,
                "completion_tokens": result.completion_tokens, "token_ids": list(result.token_ids)}

    serve_args = ["--checkpoint", str(checkpoint), "--device", "cpu",
                  *([] if args.caches else ["--media-cache-mb", "0", "--visual-cache-mb", "0"]), *args.serve_arg]
    runs = {"server": [], "in_process": []}
    with tempfile.TemporaryDirectory(prefix="videochat-bench-") as tmp, \
            serve(serve_args, Path(tmp) / "server") as served, VideoChatClient(served.grpc_url) as client:

        def through_server() -> dict:
            before = served.snapshot()
            conv = client.conversation(data, image=args.image)
            t0 = time.perf_counter()
            answer = conv.ask(PROMPT, max_new_tokens=args.max_new_tokens)
            total = (time.perf_counter() - t0) * 1e3
            time.sleep(0.3)   # decoupled requests are counted when released
            triton = stats_delta(before, served.snapshot())
            pre, llm, ens = triton["preprocessing"], triton["videochat_llm"], triton["videochat"]
            return {"total_ms": total, "time_to_first_token_ms": answer.timings.time_to_first_token_ms,
                    "completion_tokens": answer.usage.completion_tokens, "token_ids": list(answer.token_ids),
                    "preprocessing_compute_ms": pre["avg_compute_infer_ms"],
                    "preprocessing_request_ms": pre["avg_request_ms"],
                    "llm_queue_ms": llm["avg_queue_ms"], "llm_compute_input_ms": llm["avg_compute_input_ms"],
                    "llm_compute_ms": llm["avg_compute_infer_ms"], "llm_request_ms": llm["avg_request_ms"],
                    "ensemble_request_ms": ens["avg_request_ms"]}

        through_server(), in_process()          # warm-up, off the clock
        for i in range(args.runs):
            for name, fn in ((("server", through_server), ("in_process", in_process)) if i % 2 == 0 else
                             (("in_process", in_process), ("server", through_server))):
                runs[name].append(fn())
            print(f"  run {i + 1}: server {runs['server'][-1]['total_ms']:.0f} ms, in-process "
                  f"{runs['in_process'][-1]['total_ms']:.0f} ms", file=sys.stderr, flush=True)
        command_serve = served.command

    same_tokens = all(s["token_ids"] == p["token_ids"] for s, p in zip(runs["server"], runs["in_process"]))
    med = lambda key, name: statistics.median(r[key] for r in runs[name] if r.get(key) is not None)  # noqa: E731
    server_ms, local_ms = med("total_ms", "server"), med("total_ms", "in_process")
    ratios = [s["total_ms"] / p["total_ms"] for s, p in zip(runs["server"], runs["in_process"])]
    breakdown = {
        "server": {k: med(k, "server") for k in ("total_ms", "time_to_first_token_ms", "ensemble_request_ms",
                                                 "preprocessing_request_ms", "preprocessing_compute_ms",
                                                 "llm_queue_ms", "llm_compute_input_ms", "llm_compute_ms",
                                                 "llm_request_ms")},
        "in_process": {k: med(k, "in_process") for k in ("total_ms", "preprocess_ms", "generate_ms")},
    }
    b = breakdown["server"]
    breakdown["server"]["outside_ensemble_ms"] = b["total_ms"] - b["ensemble_request_ms"]   # gRPC, client, I/O
    breakdown["server"]["ensemble_hops_ms"] = b["ensemble_request_ms"] - b["preprocessing_request_ms"] - \
        b["llm_request_ms"]
    for rows in runs.values():
        for r in rows:
            r.pop("token_ids")
    payload = {
        "benchmark": "server overhead (one request, concurrency 1)",
        "command": "python bench/server_overhead_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "serve_command": command_serve, "checkpoint": str(checkpoint), "video": str(args.video),
        "media_type": media_type, "max_new_tokens": args.max_new_tokens, "runs_per_side": args.runs,
        "server_caches": args.caches,
        "target_ratio_max": 1.2, "same_tokens": same_tokens,
        "latency_ms": {"server": spread([r["total_ms"] for r in runs["server"]]),
                       "in_process": spread([r["total_ms"] for r in runs["in_process"]])},
        "ratio_of_medians": server_ms / local_ms, "ratio_per_run": spread(ratios),
        "breakdown_median_ms": breakdown, "runs": runs,
    }
    path = write_json(args.out, payload)
    r = payload["ratio_per_run"]
    print(f"one request ({media_type}, {args.max_new_tokens} tokens): server {server_ms:.0f} ms vs in-process "
          f"{local_ms:.0f} ms -> {server_ms / local_ms:.2f}x (per-run {r['min']:.2f}-{r['max']:.2f}; target <= 1.2x: "
          f"{'met' if server_ms / local_ms <= 1.2 else 'missed'}); same tokens: {same_tokens}")
    print("  server: " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown["server"].items() if v is not None))
    print("  in-process: " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown["in_process"].items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
