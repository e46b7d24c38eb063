#!/usr/bin/env bash
# Runs bench/llm (undertone, fp32 and bf16, each with llm.cpu_decode off and
# auto: ATen only vs the CPU decode kernels) and bench/llm_reference.py
# (llama.cpp via llama-cpp-python, same GGUF, same threads) in one script run and
# prints a Markdown table for bench/RESULTS.md. Needs a build (scripts/build)
# and `pip install llama-cpp-python` (see tests/golden/requirements.txt; on CPUs
# whose AMX the VM does not expose, build it with -DGGML_AMX_TILE=OFF etc.).
# Usage: bench/run_llm.sh [--batch "1 4 16 64"] [--threads 2] [--cpu-decode "off auto"]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${UNDERTONE_BUILD_DIR:-$root/build}"
batches="1 4 16 64"; threads=2; prompt=64; decode=32; repeats=3; modes="off auto"
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) batches="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --prompt-tokens) prompt="$2"; shift 2 ;;
    --decode-tokens) decode="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --cpu-decode) modes="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
# Same runtime settings as the undertone binary applies (models/runtime.hpp), for both engines.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  if grep -qw avx512f /proc/cpuinfo; then export OPENBLAS_CORETYPE=SkylakeX
  elif grep -qw avx2 /proc/cpuinfo; then export OPENBLAS_CORETYPE=Haswell; fi
fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
out=$(mktemp)
common=(--prompt-tokens "$prompt" --decode-tokens "$decode" --threads "$threads" --repeats "$repeats")
python3 "$root/bench/llm_reference.py" --batch $batches "${common[@]}" >> "$out"
for dt in fp32 bf16; do
  for mode in $modes; do
    # One process per dtype and mode so that peak RSS is per configuration.
    "$build/bin/bench_llm" --dtype "$dt" --cpu-decode "$mode" --batch $batches "${common[@]}" >> "$out"
  done
done
python3 - "$out" <<'PY'
import json, sys, platform, datetime, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = {r["batch"]: r for r in rows if r["engine"] == "llama.cpp"}
cpu = subprocess.run("lscpu | sed -n 's/^Model name: *//p'", shell=True, capture_output=True, text=True).stdout.strip()
print(f"{datetime.date.today()} · {cpu} · {rows[0]['threads']} threads · prompt {rows[0]['prompt_tokens']} / decode {rows[0]['decode_tokens']} tokens\n")
print("| engine | dtype | cpu_decode | batch | prefill tok/s | decode tok/s (aggregate) | ms/step | decode vs llama.cpp | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|")
rows.sort(key=lambda r: (r["batch"], r["engine"] != "llama.cpp", r["dtype"], r.get("cpu_decode", "")))
for r in rows:
    ratio = r["decode_tok_s"] / ref[r["batch"]]["decode_tok_s"] if r["batch"] in ref else float("nan")
    print(f"| {r['engine']} | {r['dtype']} | {r.get('cpu_decode', '-')} | {r['batch']} | {r['prefill_tok_s']} | "
          f"{r['decode_tok_s']} | {r['decode_ms_per_step']} | {ratio:.2f}x | {r.get('peak_rss_mb', '')} |")
PY
rm -f "$out"
