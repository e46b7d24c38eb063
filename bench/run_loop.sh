#!/usr/bin/env bash
# bench/loop: the closed loop of issue 7 on the default models. RAVDESS train clips are
# replayed (labelled, --annotate) into a server -> its session store -> export ->
# one fine-tune round (gate on the held-out speakers) -> published in the registry
# -> the running server swaps -> new turns carry the new version.
# Usage: MANIFEST=data/ravdess.jsonl bench/run_loop.sh OUT_DIR
# Then compare: undertone eval -m MANIFEST --projector OUT_DIR/ft/round-*/projector.safetensors
#   --baseline-projector shipped=<model_home>/models/undertone-projector/projector.safetensors ...
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
u="${UNDERTONE_BIN:-$root/build/bin/undertone}"
manifest="${MANIFEST:-$root/../runs/data/ravdess.jsonl}"  # `undertone data ravdess` output
d="${1:-loop-out}"; mkdir -p "$d"; d="$(cd "$d" && pwd)"
rm -rf $d/store $d/reg $d/ft $d/replay $d/sessions.jsonl
$u --log-level warn --set store.dir=$d/store --set sampling.max_tokens=16 --set server.max_frames_per_second=100000 --set encoder.registry=$d/reg serve --bind tcp://127.0.0.1:5611 --control-bind tcp://127.0.0.1:5612 > $d/serve.log 2>&1 &
spid=$!
for _ in $(seq 1 120); do grep -q "ready on" $d/serve.log && break; sleep 0.5; done
# 96 labelled train clips (4 classes), 4 turns per session, as fast as possible
python3 -c "
import json
rows=[json.loads(l) for l in open('$manifest')]
tr=[r for r in rows if r['split']=='train' and r['emotion'] in ('neutral','happy','sad','angry')]
tr=tr[::max(1,len(tr)//96)][:96]
open('$d/corpus.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in tr))"
t0=$(date +%s)
$u replay $d/corpus.jsonl --server tcp://127.0.0.1:5611 --annotate --speed 0 --parallel 2 --turns-per-session 4 --out $d/replay | tail -3
echo "replay: $(( $(date +%s) - t0 )) s"
$u sessions export --store $d/store -o $d/sessions.jsonl | tail -2
t0=$(date +%s)
$u finetune --sessions $d/sessions.jsonl --replay $manifest --val $manifest \
  --steps 100 --threads 2 --nice 0 --out $d/ft --registry $d/reg --server tcp://127.0.0.1:5612 --once --progress lines 2>&1 | tail -14
echo "finetune: $(( $(date +%s) - t0 )) s"
$u --set encoder.registry=$d/reg model status --server tcp://127.0.0.1:5612 2>&1 | grep -E "version|current" | head -6 || true
$u replay $d/corpus.jsonl --server tcp://127.0.0.1:5611 --speed 0 --parallel 2 --turns-per-session 4 --limit 2 --out $d/replay2 | tail -2
grep -o "\"encoder_version\":\"[^\"]*\"" $d/replay2/turns.jsonl | sort | uniq -c
kill -INT $spid; wait $spid || true
