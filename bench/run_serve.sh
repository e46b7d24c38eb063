#!/usr/bin/env bash
# bench/serve: the server under 1, 4 and 16 concurrent real-time sessions
# streaming real speech (RAVDESS clips of the validation speakers), default
# models, one `undertone serve` process per configuration:
#   (a) client end_turn -> first answer token (client clock), p50/p95
#   (b) server endpointing (vad.end_silence_ms): last voiced sample -> first
#       answer token (server clock), p50/p95
#   (c) answer tokens/s per session (server decode time)
#   (d) peak RSS of the server (VmHWM)
# Usage: bench/run_serve.sh [SESSIONS...]   (default: 1 4 16)
#        SERVE_SET="llm.dtype=bf16 ..." bench/run_serve.sh 16   (extra --set for the server)
#        SEND_ARGS="--stagger-ms 220" bench/run_serve.sh 16     (extra flags for `undertone send`;
#          --stagger-ms spreads the session starts so that turns do not all end in the same instant)
#        WORKERS=1 bench/run_serve.sh 1   (LLM in N `undertone worker` processes on loopback,
#                                          server.remote_workers = N; RSS = server + workers)
#        REPEATS=3 bench/run_serve.sh 16  (each row N times, one server per run; a row per run)
#        CLIPS=6 bench/run_serve.sh 16    (6 clips per session instead of 3)
# Columns: flush = server: end of turn -> last speech rows out of the encoder, and
# prefill = answer requested -> first token sampled (p95 of each, client mode);
# steal % = CPU time the hypervisor gave to other guests during the run (from
# /proc/stat; above a few % the machine is contended and latencies are not
# comparable with quiet runs).
# Results: printed as a markdown table; copy into bench/RESULTS.md with date,
# machine and load.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
u="${UNDERTONE_BIN:-$root/build/bin/undertone}"
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$(grep -q avx512f /proc/cpuinfo && echo SkylakeX || echo Haswell)}"
export OMP_WAIT_POLICY=PASSIVE
ravdess="${RAVDESS:-$root/../shared/data/ravdess-train}"
sessions=("$@")
[ ${#sessions[@]} -gt 0 ] || sessions=(1 4 16)
# Clips of the validation actors (15, 16), about 3.5 s each, one turn each:
# neutral/happy/sad, and with CLIPS=6 also angry/calm/fearful (twice the turns
# per run, so the p95 rests on more than the 3rd-worst of 48 turns at 16 sessions).
clips=("$ravdess/03-01-01-01-01-01-15.flac" "$ravdess/03-01-03-02-01-01-16.flac" "$ravdess/03-01-04-02-02-01-15.flac")
if [ "${CLIPS:-3}" -ge 6 ]; then
  clips+=("$ravdess/03-01-05-02-01-01-16.flac" "$ravdess/03-01-02-01-02-01-16.flac" "$ravdess/03-01-06-01-01-02-15.flac")
fi
for c in "${clips[@]}"; do [ -f "$c" ] || { echo "missing $c (set RAVDESS=)"; exit 1; }; done
port=5599
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# steal % of all CPU time between two /proc/stat samples
cpu_sample() { awk '/^cpu / {t=0; for (i=2;i<=NF;i++) t+=$i; print t, $9}' /proc/stat; }
steal_pct() { echo "$1 $2" | awk '{dt=$3-$1; printf "%.0f", (dt > 0 ? 100*($4-$2)/dt : 0)}'; }
echo "| sessions | mode | (a)/(b) p50 ms | p95 ms | flush p95 ms | prefill p95 ms | tokens/s p50 | peak RSS MiB | turns | steal % |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for n in "${sessions[@]}"; do
  for _rep in $(seq 1 "${REPEATS:-1}"); do
  for mode in client server; do
    extra=()
    for kv in ${SERVE_SET:-}; do extra+=(--set "$kv"); done
    wpids=()
    if [ "${WORKERS:-0}" -gt 0 ]; then
      extra+=(--set "server.remote_workers=$WORKERS" --set "server.worker_bind=tcp://127.0.0.1:$((port + 1))")
      for w in $(seq 1 "$WORKERS"); do
        "$u" --log-level warn "${extra[@]}" worker --name "bench-$w" > "$tmp/worker-$w.log" 2>&1 &
        wpids+=($!)
      done
    fi
    "$u" --log-level warn --set store.enabled=false --set sampling.max_tokens=32 "${extra[@]}" \
      --set server.max_sessions=64 serve --bind "tcp://127.0.0.1:$port" > "$tmp/serve.log" 2>&1 &
    spid=$!
    for _ in $(seq 1 120); do grep -q "ready on" "$tmp/serve.log" && break; sleep 0.5; done
    c0=$(cpu_sample)
    "$u" --log-level warn send "${clips[@]}" --server "tcp://127.0.0.1:$port" --sessions "$n" --speed 1 \
      --end-turn "$mode" ${SEND_ARGS:-} > "$tmp/send.log" 2>&1 || true
    steal=$(steal_pct "$c0" "$(cpu_sample)")
    rss=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' /proc/$spid/status)
    for w in "${wpids[@]}"; do rss=$((rss + $(awk '/VmHWM/ {printf "%.0f", $2/1024}' /proc/$w/status))); done
    kill -INT $spid; wait $spid || true
    for w in "${wpids[@]}"; do kill -INT "$w"; wait "$w" || true; done
    if [ "$mode" = client ]; then
      line=$(grep "^summary: [0-9]* session" "$tmp/send.log" || true)
      p50=$(echo "$line" | sed -n 's/.*first token p50 \([0-9]*\) ms.*/\1/p')
      p95=$(echo "$line" | sed -n 's/.*first token p50 [0-9]* ms, p95 \([0-9]*\) ms.*/\1/p')
    else
      line=$(grep "^summary: last voiced" "$tmp/send.log" || true)
      p50=$(echo "$line" | sed -n 's/.*p50 \([0-9]*\) ms.*/\1/p')
      p95=$(echo "$line" | sed -n 's/.*p95 \([0-9]*\) ms.*/\1/p')
      line=$(grep "^summary: [0-9]* session" "$tmp/send.log" || true)
    fi
    split=$(grep "^summary: server side" "$tmp/send.log" || true)
    fl95=$(echo "$split" | sed -n 's/.*encoder flush p50 [-0-9]* ms, p95 \([-0-9]*\) ms.*/\1/p')
    pf95=$(echo "$split" | sed -n 's/.*first token) p50 [-0-9]* ms, p95 \([-0-9]*\) ms.*/\1/p')
    tps=$(echo "$line" | sed -n 's/.*tokens\/s p50 \([0-9.]*\).*/\1/p')
    turns=$(echo "$line" | sed -n 's/.* \([0-9]*\) turn(s).*/\1/p')
    label=$([ "$mode" = client ] && echo "(a) client end_turn" || echo "(b) server VAD")
    echo "| $n | $label | ${p50:-?} | ${p95:-?} | ${fl95:-?} | ${pf95:-?} | ${tps:-?} | $rss | ${turns:-?} | $steal |"
    [ -n "$p50" ] || { echo "send output:"; tail -5 "$tmp/send.log"; }
  done
  done
done
