"""The tables of docs/performance.md, from the JSON files in bench/results/ (missing files are skipped).

    python bench/_report.py                              # print the markdown block
    python bench/_report.py --write docs/performance.md  # replace the text between the file's perf markers

tests/unit/test_docs.py fails when docs/performance.md's block differs from `render()`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


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
    out += production_rows()
    out += upgrade_rows()
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


def production_rows() -> list[tuple[str, str, str, str]]:
    """Soak, failover and follow-up figures (docs/operations.md, docs/deployment.md, docs/client.md)."""
    out = []
    k = load("soak.json")
    if k:
        worst = max(p.get("growth_mb", 0.0) for p in k["per_process"].values())
        tri = k["per_process"]["tritonserver"]
        out.append((f"soak: {k['config']['minutes']:.0f} min at concurrency {k['config']['concurrency']}, good and "
                    f"bad inputs mixed, RSS of every process after a {k['config']['warmup_minutes']:.0f}-min warm-up",
                    f"**{'PASS' if k['passed'] else 'FAIL'}**: {k['requests']:,} requests, "
                    f"{sum(k['unexpected_errors'].values())} unexpected errors, largest growth {worst:+.1f} MB "
                    f"(tritonserver {tri['start_mb']:.0f} -> {tri['end_mb']:.0f} MB)",
                    f"growth <= {k['config']['max_growth_mb']:.0f} MB, 0 errors", f"`{k['command']}`"))
    f = load("failover.json")
    if f:
        out.append((f"failover: {f['replicas']} replicas behind haproxy, one SIGKILLed and one drained under "
                    f"multi-turn load",
                    f"**{f['lost']} lost**, {f['mismatched']} mismatched of {f['conversations']} conversations "
                    f"({f['requests']} requests, {f['retried']} retried, worst added latency "
                    f"{f['worst_added_latency_ms'] / 1000:.1f} s)", "0 lost", "`python bench/failover_bench.py`"))
    u = load("followup.json")
    if u:
        for clip in u["clips"]:
            ref, re_ = clip["modes"]["reference"], clip["modes"]["reupload"]
            out.append((f"follow-ups by media_key vs re-upload, {u['turns']}-"
                        f"turn conversations, {clip['bytes'] / 1e6:.1f} MB clip",
                        f"**{ref['bytes_per_conversation'] / 1e6:.1f} vs {re_['bytes_per_conversation'] / 1e6:.1f} MB** "
                        f"uploaded; follow-up latency {ref['followup_latency_ms']['median']:.0f} vs "
                        f"{re_['followup_latency_ms']['median']:.0f} ms (median)", "video sent once",
                        "`python bench/followup_bench.py`"))
    return out


def upgrade_rows() -> list[tuple[str, str, str, str]]:
    """transformers 4.57 vs 5.x: the same benchmarks in both checkouts, interleaved (transformers_upgrade.json)."""
    t = load("transformers_upgrade.json")
    if not t:
        return []
    old, new = t["trees"]["old"], t["trees"]["new"]
    label = f"transformers {old['transformers']} -> {new['transformers']} (commits {old['commit']} -> {new['commit']})"
    out = []
    for name, bench in t["benches"].items():
        runs = {tag: [r["summary"] for r in bench["runs"] if r["tree"] == tag] for tag in ("old", "new")}
        if not runs["old"] or not runs["new"]:
            continue
        if name.startswith("batching"):
            for workload in runs["new"][0]:
                o, n = runs["old"][0][workload], runs["new"][0][workload]
                out.append((f"{label}: {name}, {workload}",
                            f"batching gain **{o['gain_median']:.2f}x -> {n['gain_median']:.2f}x**; req/s batching "
                            f"{o['rps_batching_median']:.2f} -> {n['rps_batching_median']:.2f}, unbatched "
                            f"{o['rps_no_batching_median']:.2f} -> {n['rps_no_batching_median']:.2f}",
                            "req/s not lower", f"`{bench['command']}`"))
        else:
            o, n = runs["old"][0], runs["new"][0]
            out.append((f"{label}: {name}",
                        f"overhead **{o['overhead_ratio_of_medians']:.2f}x -> {n['overhead_ratio_of_medians']:.2f}x**; "
                        f"in-process {o['in_process_ms_median']:.0f} -> {n['in_process_ms_median']:.0f} ms, served "
                        f"{o['server_ms_median']:.0f} -> {n['server_ms_median']:.0f} ms",
                        "latency not higher", f"`{bench['command']}`"))
    return out


def table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(x.replace("|", "\\|") for x in row) + " |" for row in body]
    return "\n".join(lines)


def preprocessing_table() -> str | None:
    """Per video: seconds per call (median) of the card's load_video and of preprocess, speed-ups, max diff."""
    p = load("preprocessing.json")
    if not p:
        return None
    body = [(row["video"], f"{row['reference_median_s']:.3f}", f"{row['ours_median_s']:.3f}",
             f"{row['speedup_median']:.2f}x", f"{row['speedup_min']:.2f}x", f"{row['max_abs_diff']:.1e}")
            for row in p["rows"]]
    return (f"Preprocessing, seconds per call (median of the interleaved repeats), `{p['command']}`:\n\n"
            + table(("video", "reference `load_video`", "`preprocess`", "speed-up (median)",
                     "speed-up (fastest runs)", "max abs diff"), body))


def render() -> str:
    """The markdown block docs/performance.md holds between its perf markers."""
    parts = [table(("measure", "result", "target", "command"), rows()), preprocessing_table()]
    return "\n\n".join(part for part in parts if part)


def replace_block(text: str, block: str) -> str:
    """`text` with everything between BEGIN and END replaced by `block` (markers kept, on their own lines)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[:start] + f"{BEGIN}\n{block}\n{END}" + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", type=Path, metavar="FILE",
                    help=f"replace the text between {BEGIN} and {END} in FILE instead of printing")
    args = ap.parse_args(argv)
    block = render()
    if args.write is None:
        print(block)
        return 0
    try:
        text = args.write.read_text()
        args.write.write_text(replace_block(text, block))
    except (OSError, ValueError) as e:
        print(f"error: {args.write}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
