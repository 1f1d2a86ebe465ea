#!/usr/bin/env bash
# Several testbed training runs side by side, one per GPU, each a plain `python -m vtprune.testbed.train`.
#
#   OUT=results BASE="--seed 0 --time-budget-s 470 ..." bash benchmarks/testbed_parallel_runs.sh \
#       "a:--text-layers 8" "b:--text-heads 8" ...
#
# Run NAME:OPTIONS number i (from 0) gets GPU i, $BASE then OPTIONS, writes /tmp/runs/NAME and logs to $OUT/NAME.log
# as it goes (so a run stopped by a time limit still leaves its log). When all are done, $OUT/runs.tar holds every
# run's eval.json, and the model of the best run comes back as $OUT/model-NAME.tar.part-* (12 MB pieces). The best
# run meets more of the issue's two quality bars (each POPE split >= 0.95, MCQ >= 0.85), then has the larger sum
# of margins over them (the smaller margin alone once picked a run with 92.7% MCQ over one with 97.0%).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/runs "$OUT"
# Each process gets its share of the cores for torch's CPU ops. Without it every process starts one thread per
# core; four runs side by side (2026-11-21, 4 x H200, 64 cores) took 80 ms a stage-1 step instead of 19 ms. With
# this share, and stage 1's labels on the GPU, four runs took 18.4-19.0 ms (the same day's later sweeps). torchrun
# sets OMP_NUM_THREADS=1 itself.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(($(nproc) / $#))}
gpu=0
for spec in "$@"; do
    name=${spec%%:*}
    # shellcheck disable=SC2086  # BASE and the options are word lists
    CUDA_VISIBLE_DEVICES=$gpu python3 -m vtprune.testbed.train --out "/tmp/runs/$name" $BASE ${spec#*:} \
        2>&1 | grep --line-buffered -v "Loading weights\|Writing model" >"$OUT/$name.log" &
    gpu=$((gpu + 1))
done
wait
best=$(python3 - <<'PY'
import json, pathlib, sys
margins = {}
for report in pathlib.Path("/tmp/runs").glob("*/eval.json"):
    held = json.loads(report.read_text())["heldout"]
    pope = min(v["accuracy"] for k, v in held["pope"].items() if k != "all")
    pope_margin, mcq_margin = pope - 0.95, held["mcq"]["all"]["accuracy"] - 0.85
    margins[report.parent.name] = ((pope_margin >= 0) + (mcq_margin >= 0), pope_margin + mcq_margin)
    print(f"{report.parent.name}: POPE min {pope:.4f} MCQ {held['mcq']['all']['accuracy']:.4f}", file=sys.stderr)
print(max(margins, key=margins.get) if margins else "")
PY
)
(cd /tmp/runs && tar cf "$OUT/runs.tar" ./*/eval.json)
if [ -n "$best" ]; then
    echo "best: $best"
    (cd "/tmp/runs/$best" && split -b 12M model.tar "$OUT/model-$best.tar.part-")
fi
