#!/usr/bin/env bash
# The GPU run behind benchmarks/results/nvidia-h200-2026-12-02-speed/ (the speed issue):
# `bash benchmarks/gpu_speed_run.sh OUTDIR` on one GPU (under 10 minutes on an H200).
# Steps run in priority order, each under its own time limit; every step's files land in OUTDIR.
set -u
OUT_DIR=${1:?usage: gpu_speed_run.sh OUTDIR}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the bench commands without the CLI's other imports (the GPU image lacks `datasets`)
bench="python3 -c 'import typer; from vtprune.bench.commands import bench_command; typer.run(bench_command)'"
bench_eval="python3 -c 'import typer; from vtprune.bench.commands import bench_eval_command; typer.run(bench_eval_command)'"
LLAVA="--arch llava-1.5-7b --random-weights --dtype bfloat16 --device cuda --no-progress"
# step NAME SECONDS COMMAND...: skipped when NAME is listed in $SKIP
step() {
  local name=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return;; esac
  echo "== $name ($(date +%T))"; timeout "$limit" bash -c "$*" > "$OUT_DIR/$name.log" 2>&1; echo "   rc=$?"
}

# 1. decode at batch 1: HF's dynamic cache vs the static cache (compiled decode), unpruned and pruned
# (static: every subject compiles its decode step first, untimed)
for cache in dynamic static; do
  limit=$([ $cache = static ] && echo 180 || echo 100)
  step "decode-$cache" $limit "$bench" $LLAVA --methods none,visionzip,fastv --keep 64 --batch 1 --new-tokens 32 \
    --cache $cache --repeats 5 --generate-repeats 3 --no-oracle-generate --time-budget $((limit - 25)) \
    --output "$OUT_DIR/decode-$cache"
done
# 2. prefill overhead over the oracle at batch 16, the methods that missed 1.05x
step overhead 120 "$bench" $LLAVA --methods none,sparsevlm,pdrop,cdpruner,divprune,vispruner,tokencarve \
  --keep 192,128,64 --batch 16 --new-tokens 2 --repeats 5 --generate-repeats 1 --no-oracle-generate \
  --param cdpruner.relevance=none --time-budget 100 --output "$OUT_DIR/overhead"
# 3. the greedy selectors alone: torch vs fused kernels
if [ -f benchmarks/greedy_kernels_gpu.py ]; then
  step greedy 50 python3 benchmarks/greedy_kernels_gpu.py --output "$OUT_DIR/greedy.json"
fi
# 4. eval throughput: lmms-eval-style batch-1 loop (unpruned) vs vtprune eval batched with pruning
step eval-throughput 120 "$bench_eval" \
  --arch llava-1.5-7b --random-weights --methods none,visionzip,vispruner,divprune --keep 64 --batch 32 \
  --samples 128 --new-tokens 8 --device cuda --dtype bfloat16 --no-progress --output "$OUT_DIR/eval-throughput"
# 5. Qwen2.5-VL-7B, batch 8, the LLM-stage methods (issue 17's table)
step qwen-batch8-llm 110 "$bench" --arch qwen2.5-vl-7b --random-weights --dtype bfloat16 --device cuda --no-progress \
  --methods none,fastv,pdrop,sparsevlm,dart --keep 256,128,64 --batch 8 --new-tokens 8 --repeats 3 \
  --generate-repeats 2 --time-budget 95 --output "$OUT_DIR/qwen-batch8-llm"
echo "== done ($(date +%T))"
