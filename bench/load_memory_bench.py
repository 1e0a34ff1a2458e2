"""Peak host memory of the strict loader vs the bytes of the loaded weights (target: < 1.2x).

Writes a synthetic checkpoint in the official layout (keys, shapes and stored dtypes of the real
InternVideo2-Chat-8B-HD: LLM base bf16, LoRA A/B and the rest float32, sharded with an index like the HF repo;
zeros, streamed to disk one tensor at a time), then loads it in a fresh process with
`checkpoint.load_checkpoint` (meta-device build, one tensor at a time, LoRA merged) and records the peak RSS
(`ru_maxrss`) against the loaded weight bytes. Deletes the checkpoint afterwards (unless --keep).

The full checkpoint is 19.4 GB on disk and 16.9 GB loaded in bf16; on a small shared machine use
`--llm-layers N` (default 8 of 32; the ViT and QFormer stay full size): the loader's overhead (process
baseline + one tensor in flight) does not grow with the layer count, so the full-size ratio is extrapolated
as (W_full + overhead) / W_full. Not part of the test suite.

    .venv/bin/python bench/load_memory_bench.py [--llm-layers 32] [--out-dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from videochat.model.checkpoint import official_layout, official_stored_dtype  # noqa: E402
from videochat.model.config import LLMConfig, VideoChatConfig  # noqa: E402

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
SHARD_BYTES = 5 * 1024 ** 3


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_config(llm_layers: int) -> VideoChatConfig:
    return VideoChatConfig(llm=replace(LLMConfig(), num_hidden_layers=llm_layers))


def layout_for(config: VideoChatConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from videochat.model.videochat_model import VideoChatModel
    with torch.device("meta"):
        skeleton = VideoChatModel(config)
    return {k: (s, official_stored_dtype(k)) for k, s in official_layout(skeleton, config).items()}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def write_checkpoint(out_dir: str, config: VideoChatConfig) -> int:
    """Stream a zero-filled sharded safetensors checkpoint (+ index + config.json); returns the bytes written."""
    os.makedirs(out_dir, exist_ok=True)
    layout = layout_for(config)
    shards, current, size = [], [], 0
    for key in sorted(layout):
        nb = _nbytes(*layout[key])
        if current and size + nb > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nb
    shards.append(current)
    zeros = bytearray(max(_nbytes(*v) for v in layout.values()))
    view = memoryview(zeros)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            shape, dtype = layout[key]
            nb = _nbytes(shape, dtype)
            header[key] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
            offset += nb
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for key in keys:
                f.write(view[: _nbytes(*layout[key])])
        total += offset
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    return total


def child(ckpt_dir: str, dtype_name: str) -> dict:
    """Runs in a fresh process: build on meta, load, report peak RSS."""
    from videochat.model.checkpoint import load_checkpoint
    from videochat.model.videochat_model import VideoChatModel

    dtype = getattr(torch, dtype_name)
    config = VideoChatConfig.from_json(ckpt_dir)
    with torch.device("meta"):
        model = VideoChatModel(config)
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    load_checkpoint(model, ckpt_dir, config, dtype=dtype, device="cpu")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "weight_bytes": weight_bytes,
            "load_seconds": round(seconds, 2)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-layers", type=int, default=8, help="Mistral layers written/loaded (real model: 32)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, ".cache", "load_bench_ckpt"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "load_memory.json"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dtype)))
        return 0

    config = bench_config(args.llm_layers)
    need = sum(_nbytes(*v) for v in layout_for(config).values())
    os.makedirs(os.path.dirname(os.path.abspath(args.out_dir)), exist_ok=True)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.out_dir))).free
    if free < need * 1.1:
        print(f"not enough disk: need {need / 1e9:.1f} GB, free {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    try:
        t0 = time.perf_counter()
        written = write_checkpoint(args.out_dir, config)
        write_s = time.perf_counter() - t0
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args.out_dir, "--dtype", args.dtype],
                             check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.out_dir, ignore_errors=True)

    full_weight_bytes = sum(_nbytes(s, torch.int64 if d == torch.int64 else getattr(torch, args.dtype))
                            for k, (s, d) in layout_for(VideoChatConfig()).items()
                            if not k.startswith("project_down") and ".lora_" not in k)
    overhead = res["peak_rss_bytes"] - res["weight_bytes"]
    result = {
        "what": "peak RSS of videochat.model.checkpoint.load_checkpoint (CPU, fresh process) vs loaded weight bytes",
        "llm_layers": args.llm_layers, "dtype": args.dtype, "checkpoint_bytes_on_disk": written,
        "write_seconds": round(write_s, 1), **res,
        "peak_over_weights": round(res["peak_rss_bytes"] / res["weight_bytes"], 4),
        "peak_minus_baseline_over_weights": round((res["peak_rss_bytes"] - res["baseline_rss_bytes"]) / res["weight_bytes"], 4),
        "full_size_weight_bytes": full_weight_bytes,
        "full_size_peak_over_weights_extrapolated": round((full_weight_bytes + overhead) / full_weight_bytes, 4),
        "target": "< 1.2",
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
