"""Print the README "Performance" table (markdown) from the JSON files in bench/results/; missing files are
skipped. `python bench/_report.py`"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def rows() -> list[tuple[str, str, str, str]]:
    out = []
    for bname in ("batching.json", "batching_multiturn.json"):
        b = load(bname)
        if not b:
            continue
        for name, w in b["workloads"].items():
            r, rps = w["ratio"], w["requests_per_second"]
            on, off = rps["batching"], rps["no_batching"]
            wl = w["workload"]
            turns = wl.get("turns", 1)
            sessions = (f"{turns}-turn sessions, own media per session" if wl.get("distinct_media_per_session")
                        else "one media file for all")
            what = (f"batching gain, {name} ({Path(wl['file']).name}, {wl['max_new_tokens']} new tokens, greedy, "
                    f"concurrency {wl['concurrency']}, {sessions}, CPU, demo checkpoint)")
            res = (f"**{r['median']:.2f}x** (min-max {r['min']:.2f}-{r['max']:.2f}, {r['n']} rounds): "
                   f"{on['median']:.2f} vs {off['median']:.2f} req/s")
            if "inflight_over_static" in w:
                res += (f"; in-flight vs the old static batching at the same batch size: "
                        f"**{w['inflight_over_static']['median']:.2f}x** ({rps['static']['median']:.2f} req/s)")
            out.append((what, res, ">= 4x", f"`{b['command'].strip()}`"))
    for fname in ("server_overhead.json", "server_overhead_image.json"):
        o = load(fname)
        if o:
            r, lat = o["ratio_per_run"], o["latency_ms"]
            what = (f"server overhead, one {o['media_type']} request, {o['max_new_tokens']} new tokens "
                    f"(ensemble vs in-process, concurrency 1, CPU"
                    f"{', server caches on' if o.get('server_caches') else ''})")
            res = (f"**{o['ratio_of_medians']:.2f}x** ({lat['server']['median']:.0f} vs "
                   f"{lat['in_process']['median']:.0f} ms; per-run {r['min']:.2f}-{r['max']:.2f}, n={r['n']})")
            out.append((what, res, "<= 1.2x", f"`{o['command'].strip()}`"))
    p = load("preprocessing.json")
    if p:
        for row in p["rows"]:
            out.append((f"preprocessing vs the card's load_video, {row['video']}",
                        f"**{row['speedup_median']:.2f}x** ({row['reference_median_s']:.2f} -> "
                        f"{row['ours_median_s']:.2f} s), max abs diff {row['max_abs_diff']:.0e}", "faster, identical",
                        f"`{p['command']}`"))
    m = load("load_memory.json")
    if m:
        out.append((f"checkpoint load peak RSS / weight bytes ({m['llm_layers']} of 32 LLM layers, {m['dtype']})",
                    f"**{m['peak_over_weights']:.2f}x** measured, {m['full_size_peak_over_weights_extrapolated']:.2f}x "
                    f"extrapolated to full size", m.get("target", "< 1.2"),
                    f"`python bench/load_memory_bench.py --llm-layers {m['llm_layers']}`"))
    g = load("gpu.json")
    if g and "skipped" not in g:
        for d in g["decode"]:
            out.append((f"decode, batch {d['batch']}, {g['device']} {g['dtype']} (random weights)",
                        f"**{d['tokens_per_s_median']:.0f} tok/s** ({100 * d['fraction_of_roofline']:.0f}% of "
                        f"roofline {d['roofline_tokens_per_s']:.0f})", "roofline", f"`{g['command'].strip()}`"))
    elif g:
        out.append(("GPU (full size, bf16)", "not measured: no GPU was available", "-",
                    "`python bench/gpu_bench.py`"))
    return out


def main() -> int:
    print("| measure | result | target | command |")
    print("|---|---|---|---|")
    for r in rows():
        print("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
