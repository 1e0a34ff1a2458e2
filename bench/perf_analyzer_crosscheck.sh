#!/usr/bin/env bash
# Cross-check `videochat loadtest` against Triton's perf_analyzer on the same server, model and input.
#
# perf_analyzer route (docs/loadtest.md, "Cross-check with perf_analyzer"): the perf-analyzer wheels need
# glibc 2.38, but the tritonclient==2.51.0 wheel (manylinux1) carries bin/perf_analyzer v2.51.0; it needs
# libb64.so.0d and libcudart.so.12, which nvidia-pytriton's bundled libs provide (symlinked, nothing else
# downloaded).
#
# usage: bench/perf_analyzer_crosscheck.sh [--url HOST:PORT --metrics-port P]   (default: start a tiny server)
# env:   REQUESTS (8)  MAX_NEW_TOKENS (4)  CONCURRENCY (1)  VIDEO (tests/data/tiny-videochat/videos/example1.mp4)
# out:   bench/results/perf_analyzer_crosscheck.json
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
REQUESTS=${REQUESTS:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-4}
CONCURRENCY=${CONCURRENCY:-1}
VIDEO=${VIDEO:-$ROOT/tests/data/tiny-videochat/videos/example1.mp4}
PROMPT="Describe the action step by step."
WORK=${WORK:-/tmp/videochat_pa_crosscheck}
URL=""
while [ $# -gt 0 ]; do
  case $1 in
    --url) URL=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
mkdir -p "$WORK/lib"

# 1. perf_analyzer from the tritonclient 2.51.0 wheel (pip only; cached in $WORK).
PA=$WORK/perf_analyzer
if [ ! -x "$PA" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheel" "tritonclient==2.51.0"
  "$PY" - "$WORK" <<'PYEOF'
import glob, os, sys, zipfile
work = sys.argv[1]
whl = glob.glob(os.path.join(work, "wheel", "tritonclient-2.51.0-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/bin/perf_analyzer"))
    with open(os.path.join(work, "perf_analyzer"), "wb") as f:
        f.write(z.read(name))
os.chmod(os.path.join(work, "perf_analyzer"), 0o755)
PYEOF
fi
LIBS=$("$PY" -c "import nvidia_pytriton, os; print(os.path.join(os.path.dirname(os.path.dirname(nvidia_pytriton.__file__ or '')), 'nvidia_pytriton.libs'))" 2>/dev/null || true)
[ -d "$LIBS" ] || LIBS=$("$PY" -c "import site; print(site.getsitepackages()[0])")/nvidia_pytriton.libs
ln -sf "$(ls "$LIBS"/libb64-*.so.0d | head -1)" "$WORK/lib/libb64.so.0d"
ln -sf "$(ls "$LIBS"/libcudart-*.so.12* | head -1)" "$WORK/lib/libcudart.so.12"
export LD_LIBRARY_PATH=$WORK/lib:$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# 2. A server (the tiny fixture on CPU) unless --url was given.
SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null; true; }
trap cleanup EXIT
if [ -z "$URL" ]; then
  read -r HTTP GRPC METRICS < <("$PY" -c "
import socket
ps=[]
for _ in range(3):
    s=socket.socket(); s.bind(('127.0.0.1',0)); ps.append(s)
print(*[s.getsockname()[1] for s in ps])")
  "$PY" -m videochat serve --checkpoint tests/data/tiny-videochat --http-port "$HTTP" --grpc-port "$GRPC" \
      --metrics-port "$METRICS" --work-dir "$WORK/serve" > "$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 120); do curl -sf "127.0.0.1:$HTTP/v2/health/ready" >/dev/null && break; sleep 1; done
  URL=127.0.0.1:$GRPC
fi

# 3. The same request for both tools: video bytes (base64 for perf_analyzer), prompt, max_new_tokens.
"$PY" - "$VIDEO" "$PROMPT" "$MAX_NEW_TOKENS" "$WORK/input.json" <<'PYEOF'
import base64, json, struct, sys
video, prompt, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
raw = open(video, "rb").read()
# perf_analyzer takes "b64" as the serialized tensor: for BYTES, each element is <uint32 length><bytes>.
data = {"data": [{"video": {"b64": base64.b64encode(struct.pack("<I", len(raw)) + raw).decode()},
                  "prompt": [prompt], "max_new_tokens": [n]}]}
json.dump(data, open(out, "w"))
PYEOF

# 4. perf_analyzer (streaming: the model is decoupled), counted windows, then our loadtest.
"$PA" -m videochat -u "$URL" -i grpc --streaming --input-data "$WORK/input.json" \
  --concurrency-range "$CONCURRENCY:$CONCURRENCY" --measurement-mode count_windows \
  --measurement-request-count "$REQUESTS" --stability-percentage 100 --max-trials 6 \
  -f "$WORK/pa.csv" > "$WORK/pa.log" 2>&1 || { cat "$WORK/pa.log" >&2; exit 1; }
"$ROOT/.venv/bin/videochat" loadtest --url "$URL" --no-metrics --video "$VIDEO" --prompt "$PROMPT" \
  --concurrency "$CONCURRENCY" --requests "$((REQUESTS * 4))" --max-new-tokens "$MAX_NEW_TOKENS" --warmup 2 --quiet --stream \
  --out "$WORK/loadtest.json" > /dev/null

# 5. Both numbers side by side.
"$PY" - "$WORK" "$ROOT/bench/results/perf_analyzer_crosscheck.json" "$URL" "$REQUESTS" "$MAX_NEW_TOKENS" "$CONCURRENCY" <<'PYEOF'
import csv, json, os, platform, sys, time
work, out, url, n, mnt, conc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
row = next(csv.DictReader(open(os.path.join(work, "pa.csv"))))
lt = json.load(open(os.path.join(work, "loadtest.json")))["levels"][0]
pa = {"requests_per_second": float(row["Inferences/Second"]),
      "responses_per_second": float(row["Response Throughput"]) if row.get("Response Throughput") else None,
      "latency_ms_p50": float(row["p50 latency"]) / 1e3, "latency_ms_p90": float(row["p90 latency"]) / 1e3,
      "latency_ms_p99": float(row["p99 latency"]) / 1e3, "raw_csv_row": row}
ours = {"requests_per_second": lt["requests_per_second"], "requests": lt["requests"], "latency_ms_avg": lt["latency_ms"]["mean"],
        "latency_ms_p50": lt["latency_ms"]["p50"], "latency_ms_p90": lt["latency_ms"]["p90"],
        "latency_ms_p99": lt["latency_ms"]["p99"], "time_to_first_token_ms": lt["time_to_first_token_ms"],
        "errors": lt["errors"]}
result = {"what": "videochat loadtest vs perf_analyzer 2.51.0 (--streaming), same server/model/input",
          "note": ("perf_analyzer 2.51 measures a decoupled model's latency to the FIRST response "
                   "('Detected decoupled model, using the first response for measuring latency'), so its latency "
                   "compares with our time_to_first_token_ms; throughputs compare directly"),
          "date_unix": time.time(), "host": platform.node(), "cpu_count": os.cpu_count(), "url": url,
          "model": "videochat", "concurrency": conc, "requests": n, "max_new_tokens": mnt,
          "perf_analyzer": pa, "videochat_loadtest": ours,
          "ratio_rps_ours_over_pa": ours["requests_per_second"] / pa["requests_per_second"],
          "ratio_ttft_p50_ours_over_pa_latency_p50": ours["time_to_first_token_ms"]["p50"] / pa["latency_ms_p50"]}
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(result, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k != "perf_analyzer"} | {"perf_analyzer": {k: v for k, v in pa.items() if k != "raw_csv_row"}}, indent=1))
PYEOF
