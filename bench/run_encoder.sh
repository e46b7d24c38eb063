#!/usr/bin/env bash
# Runs bench/encoder (streaming speech encoder: log-mel -> block-causal Whisper
# tiny.en -> projector) over the grid of issue 4 and prints Markdown tables for
# bench/RESULTS.md: streams 1/8/32 x chunk 160/320/640 ms x fp32/bf16, in
# throughput mode (all audio available, one batched call per chunk step) and in
# realtime mode (audio arrives in 20 ms packets at wall-clock pace; "sustained" =
# the encoder keeps up), then a profile of where a batched call's time goes.
#
# Environment (set here, documented because they change the numbers a lot):
#   OMP_WAIT_POLICY=PASSIVE  LibTorch's OpenMP workers otherwise spin-wait; on a
#                            shared 2-core machine a 2-thread run was measured up
#                            to 30x slower whenever another process used a core.
#   OPENBLAS_CORETYPE=SkylakeX  Debian's OpenBLAS 0.3.21 misdetects Sapphire Rapids
#                            VMs as Prescott (about 10x slower sgemm); SkylakeX
#                            (AVX-512) measured 1.4x faster than Haswell for the
#                            batched fp32 encoder (8 streams), equal for 1 stream.
#                            bf16 goes through oneDNN (AMX) and ignores it.
# The machine load (1-minute load average, which includes the benchmark's own
# threads) and the cores the process actually got are recorded for every row.
#
# Needs a build with the bench_encoder target (cmake --build BUILD --target
# bench_encoder), the cached whisper-tiny.en ($UNDERTONE_HOME) and the RAVDESS
# clips (/work/shared/data/ravdess-train or --ravdess).
# Usage: bench/run_encoder.sh [--streams "1 8 32"] [--chunk-ms "160 320 640"]
#          [--dtype "fp32 bf16"] [--threads 2] [--seconds 30] [--no-realtime] [--no-profile]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${UNDERTONE_BUILD_DIR:-$root/build}"
bin="$build/bin/bench_encoder"
[ -x "$bin" ] || bin="$build/bench/bench_encoder"
[ -x "$bin" ] || { echo "bench_encoder not built in $build (set UNDERTONE_BUILD_DIR)" >&2; exit 2; }
streams="1 8 32"; chunks="160 320 640"; dtypes="fp32 bf16"; threads=2; seconds=30
modes="throughput realtime"; profile=1; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --streams) streams="$2"; shift 2 ;;
    --chunk-ms) chunks="$2"; shift 2 ;;
    --dtype) dtypes="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --no-realtime) modes="throughput"; shift ;;
    --no-profile) profile=0; shift ;;
    --ravdess) extra+=(--ravdess "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
export OMP_WAIT_POLICY=PASSIVE OPENBLAS_CORETYPE=SkylakeX
out=$(mktemp)
echo "uptime before: $(uptime)" >&2
# shellcheck disable=SC2086
"$bin" --threads "$threads" --seconds "$seconds" --streams $streams --chunk-ms $chunks --dtype $dtypes \
  --mode $modes "${extra[@]}" | tee -a "$out" >&2
if [ "$profile" = 1 ]; then
  # shellcheck disable=SC2086
  "$bin" --threads "$threads" --profile --streams 1 8 32 --chunk-ms 320 --dtype $dtypes --context 0 1472 \
    "${extra[@]}" | tee -a "$out" >&2
fi
echo "uptime after: $(uptime)" >&2
python3 - "$out" <<'PY'
import json, sys, datetime, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
cpu = subprocess.run("lscpu | sed -n 's/^Model name: *//p'", shell=True, capture_output=True, text=True).stdout.strip()
ncpu = subprocess.run("nproc", shell=True, capture_output=True, text=True).stdout.strip()
thr = rows[0]["threads"] if rows else "?"
print(f"{datetime.date.today()} · {cpu} · {ncpu} cores · {thr} threads · OMP_WAIT_POLICY=PASSIVE · OPENBLAS_CORETYPE=SkylakeX · "
      "whisper-tiny.en + untrained projector (3072->1024->576)\n")
tp = [r for r in rows if r["mode"] == "throughput"]
if tp:
    print("Throughput (all audio available; one decode_streams call per chunk step for all streams; "
          f"{tp[0]['audio_s_per_stream']:.0f} s of RAVDESS speech per stream):\n")
    print("| dtype | chunk ms | streams | RTF per stream | RTF aggregate | call ms p50 | call ms p95 | call ms first 5 s / last 5 s | cores used | load1 start/end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in tp:
        print(f"| {r['dtype']} | {r['chunk_ms']} | {r['streams']} | {r['rtf_per_stream']:.4f} | {r['rtf_aggregate']:.4f} | "
              f"{r['chunk_latency_ms_p50']:.1f} | {r['chunk_latency_ms_p95']:.1f} | {r['call_ms_first_5s']:.1f} / {r['call_ms_last_5s']:.1f} | "
              f"{r['cpu_cores_used']:.2f} | {r['load1_start']:.2f} / {r['load1_end']:.2f} |")
    print()
rt = [r for r in rows if r["mode"] == "realtime"]
if rt:
    print(f"Real time (20 ms packets at wall-clock pace, streams staggered over one chunk; latency = chunk due -> its tokens out):\n")
    print("| dtype | chunk ms | streams | sustained | latency ms p50 | p95 | max | last-quarter p95 | busy | mean batch | aborted at s | load1 start/end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rt:
        ab = f"{r['aborted_at_s']:.1f}" if r["aborted_at_s"] else "-"
        print(f"| {r['dtype']} | {r['chunk_ms']} | {r['streams']} | {'yes' if r['sustained'] else 'NO'} | "
              f"{r['chunk_latency_ms_p50']:.1f} | {r['chunk_latency_ms_p95']:.1f} | {r['chunk_latency_ms_max']:.1f} | "
              f"{r['last_quarter_p95_ms']:.1f} | {r['busy']:.2f} | {r['mean_batch']:.1f} | {ab} | "
              f"{r['load1_start']:.2f} / {r['load1_end']:.2f} |")
    print()
pf = [r for r in rows if r["mode"] == "profile"]
if pf:
    print("Profile of one batched forward_chunk call, 320 ms chunk (ms; phases timed inside the call, means of 7; "
          "projector and mel timed separately with the same shapes; what-if = the attention as per-stream LibTorch ops, "
          "the previous implementation):\n")
    print("| dtype | streams | cache frames | fused attention | forward_chunk | conv stem | LayerNorm | qkv+out proj | attention | MLP | other | projector | mel | what-if: attention as LibTorch ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in pf:
        print(f"| {r['dtype']} | {r['streams']} | {r['context_frames']} | {'yes' if r['fused_attention'] else 'no'} | "
              f"{r['forward_chunk_mean_ms']:.1f} | {r['conv_stem_ms']:.1f} | {r['layernorm_ms']:.1f} | {r['qkv_out_proj_ms']:.1f} | "
              f"{r['attention_ms']:.1f} | {r['mlp_ms']:.1f} | {r['other_ms']:.1f} | {r['projector_ms']:.1f} | "
              f"{r['mel_ms']:.2f} | {r['attention_libtorch_ms']:.1f} |")
PY
rm -f "$out"
