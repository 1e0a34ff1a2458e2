"""GPU microbenchmark of the FULL-SIZE architecture with random bf16 weights (no checkpoint file needed): the
modules of `VideoChatModel` are built from the default `VideoChatConfig` on the meta device, cast to bf16 there,
then materialised on the GPU (`to_empty`) and filled with random values. Measures:

* vision: `encode_media` (ViT + vision_layernorm + QFormer + project_up) per video of 3 clips x 8 frames, at 1
  video and at a batch of 8 videos (ms per video);
* prefill: one `MistralForCausalLM` forward over a prompt of --prompt-len embeddings (3 x 96 visual tokens + text,
  the size of a default video turn), batch 1;
* decode: tokens/s of a greedy loop (one forward of [B, 1] + argmax per step, KV cache) at batch 1, 8, 32, 64,
  next to the memory-bandwidth roofline: every step reads all LLM weights plus the KV cache, so
  tokens/s <= B * bandwidth / (weight bytes + KV bytes), and <= peak FLOP/s / (2 * params) per token.

    .venv/bin/python bench/gpu_bench.py [--bandwidth 3.35e12] [--peak-tflops 989] [--batches 1,8,32,64]
    .venv/bin/python bench/gpu_bench.py --tiny      # the same code on CPU with the demo checkpoint's tiny config

Without CUDA (and without --tiny) it prints {"skipped": "no CUDA"} and exits 0. Writes bench/results/gpu.json
(--tiny: gpu_tiny_cpu.json). Plain eager PyTorch + transformers, as the server runs it: no CUDA graphs, no
torch.compile, so batch-1 decode is expected to sit well under the roofline (kernel-launch bound).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _server import RESULTS, demo_checkpoint, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, fp32, the demo checkpoint's tiny config (smoke test)")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="memory bandwidth, bytes/s (H100 SXM 3.35e12)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak, TFLOP/s (H100 SXM 989)")
    p.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=350, help="prefill length (a default video turn is ~350)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 64, --tiny 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --tiny 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_random_model(config, device, dtype, seed: int):
    """VideoChatModel with random weights: meta build -> dtype (still meta) -> to_empty(device) -> fill."""
    import torch
    from videochat.model.videochat_model import VideoChatModel

    with torch.device("meta"):
        model = VideoChatModel(config)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:                       # norm / layer-scale weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        pos = model.qformer.embeddings.position_ids
        pos.copy_(torch.arange(pos.shape[-1], device=device)[None])
    model._init_non_persistent_buffers(device)      # Mistral rotary inv_freq
    model.eval().requires_grad_(False)
    model.device, model.dtype = device, dtype
    return model


def timed(fn, *, repeats: int, sync) -> list[float]:
    fn()                                            # warm-up (allocator, kernels, lazy init)
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from videochat.model import llm as llm_api
    from videochat.model.config import VideoChatConfig

    if not args.tiny and not torch.cuda.is_available():
        result = {"benchmark": "gpu", "skipped": "no CUDA", "torch": torch.__version__}
        existing = RESULTS / "gpu.json"
        if not existing.is_file() or "skipped" in json.loads(existing.read_text()):
            write_json("gpu.json", result)           # never overwrite a real GPU result with a skip
        print(json.dumps(result))
        return 0
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    steps = args.decode_steps or (8 if args.tiny else 64)
    repeats = args.repeats or (2 if args.tiny else 5)
    config = VideoChatConfig.from_json(demo_checkpoint()) if args.tiny else VideoChatConfig()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [int(b) for b in args.batches.split(",")]

    t0 = time.perf_counter()
    model = build_random_model(config, device, dtype, args.seed)
    sync()
    build_s = time.perf_counter() - t0
    llm = model.llm
    llm_params = sum(p.numel() for p in llm.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    c = config.llm
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    kv_bytes_per_pos = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    print(f"built {total_params / 1e9:.3f} B params ({llm_params / 1e9:.3f} B LLM, {weight_bytes / 1e9:.2f} GB) "
          f"on {device} in {build_s:.1f} s", file=sys.stderr, flush=True)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    v = config.vision
    results: dict = {}
    with torch.inference_mode():
        # -- vision: one video = 3 clips x 8 frames (padding off: 2 tiles + the global view)
        video = torch.randn(3, 8, v.in_chans, v.img_size, v.img_size, generator=gen, device=device, dtype=dtype)
        vis = {}
        for n in (1, 8):
            ms = timed(lambda: model.encode_media([video] * n, ["video"] * n, [None] * n), repeats=repeats, sync=sync)
            vis[f"videos_{n}"] = {"ms_per_video_median": statistics.median(ms) / n, "ms_per_call": ms}
        results["vision_encode_media"] = vis

        # -- prefill: batch 1, prompt_len embeddings
        emb = torch.randn(1, args.prompt_len, c.hidden_size, generator=gen, device=device, dtype=dtype) * 0.02
        ones = torch.ones(1, args.prompt_len, dtype=torch.long, device=device)
        positions = torch.arange(args.prompt_len, device=device)[None]
        ms = timed(lambda: llm_api.forward_last_logits(llm, emb, ones, positions, llm_api.new_cache(llm)),
                   repeats=repeats, sync=sync)
        results["prefill"] = {"prompt_len": args.prompt_len, "batch": 1, "ms_median": statistics.median(ms),
                              "ms": ms}

        # -- decode: greedy loop over a prefilled KV cache
        decode = []
        for b in batches:
            embs = emb.expand(b, -1, -1).contiguous()

            def run():   # the engine's calls (videochat.model.llm), unpadded
                cache = llm_api.new_cache(llm)
                mask = torch.ones(b, args.prompt_len, dtype=torch.long, device=device)
                pos = torch.arange(args.prompt_len, device=device)[None].expand(b, -1)
                nxt = llm_api.forward_last_logits(llm, embs, mask, pos, cache).argmax(-1)
                pos = pos[:, -1:]
                sync()
                t = time.perf_counter()
                for _ in range(steps):
                    mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                    pos = pos + 1
                    logits = llm_api.forward_last_logits(llm, llm_api.embed(llm, nxt)[:, None], mask, pos, cache)
                    nxt = logits.argmax(-1)
                sync()
                return time.perf_counter() - t

            run()                                           # warm-up
            secs = [run() for _ in range(repeats)]
            tok_s = [b * steps / s for s in secs]
            ctx = args.prompt_len + steps / 2                 # mean context length over the timed steps
            mem_bound = b * args.bandwidth / (weight_bytes + b * ctx * kv_bytes_per_pos)
            compute_bound = args.peak_tflops * 1e12 / (2 * llm_params)
            roof = min(mem_bound, compute_bound)
            med = statistics.median(tok_s)
            decode.append({"batch": b, "tokens_per_s_median": med, "tokens_per_s": tok_s,
                           "ms_per_step_median": b * 1e3 / med, "roofline_tokens_per_s": roof,
                           "fraction_of_roofline": med / roof})
            print(f"  decode batch {b}: {med:.1f} tok/s (roofline {roof:.1f})", file=sys.stderr, flush=True)
        results["decode"] = decode

    payload = {
        "benchmark": "gpu (full-size architecture, random weights)" if not args.tiny else
                     "gpu_bench --tiny (demo config on CPU, smoke test; numbers mean nothing for the GPU)",
        "command": "python bench/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "params_total": total_params, "params_llm": llm_params, "llm_weight_bytes": weight_bytes,
        "kv_bytes_per_position": kv_bytes_per_pos, "bandwidth_bytes_per_s": args.bandwidth,
        "peak_tflops": args.peak_tflops, "roofline_batch1_tokens_per_s": args.bandwidth / weight_bytes,
        "decode_steps": steps, "repeats": repeats, "build_s": build_s, **results,
    }
    path = write_json("gpu_tiny_cpu.json" if args.tiny else "gpu.json", payload)
    vis1 = results["vision_encode_media"]["videos_1"]["ms_per_video_median"]
    vis8 = results["vision_encode_media"]["videos_8"]["ms_per_video_median"]
    print(f"{payload['device']} {payload['dtype']}: vision {vis1:.1f} ms/video (batch 8: {vis8:.1f} ms/video), "
          f"prefill {args.prompt_len} tokens {results['prefill']['ms_median']:.1f} ms")
    for d in decode:
        print(f"  decode batch {d['batch']:>3}: {d['tokens_per_s_median']:9.1f} tok/s, roofline "
              f"{d['roofline_tokens_per_s']:9.1f} ({100 * d['fraction_of_roofline']:.0f}%)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
