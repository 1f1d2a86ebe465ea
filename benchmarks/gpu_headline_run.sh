#!/usr/bin/env bash
# The run the README's headline table should be re-made from (issue 19, item 4): every figure in one results
# folder, one GPU, the unpruned model, the oracles and the unmodified short prompt in each step's run. Three
# device calls of under 10 minutes on an H200 (on 2026-12-03: 224 + 420 + 292 s of commands, plus each start):
#
#   DEADLINE=560 STEPS=overhead-all bash benchmarks/gpu_headline_run.sh /tmp/r/headline
#   DEADLINE=560 STEPS=prefill-b1 bash benchmarks/gpu_headline_run.sh /tmp/r/headline
#   DEADLINE=560 STEPS="decode-b1 eval-throughput" bash benchmarks/gpu_headline_run.sh /tmp/r/headline
#
# (each call then folds /tmp/r/headline into one .tgz under $OUT: a call returns at most 8 files). Its run of
# 2026-12-03 is benchmarks/results/nvidia-h200-2026-12-03-headline/ (the README headline is made from it).
set -u
OUT_DIR=${1:?usage: gpu_headline_run.sh OUTDIR}
mkdir -p "$OUT_DIR"
STEPS=${STEPS:-overhead-all prefill-b1 decode-b1 eval-throughput}
source benchmarks/gpu_steps.sh
# 1. batch 16, every method at 192 / 128 / 64 tokens against its oracle, profiles of the misses
step overhead-all 560 "$bench" $LLAVA --methods all --keep 192,128,64 --batch 16 --new-tokens 2 --repeats 5 \
  --generate-repeats 1 --no-oracle-generate --param cdpruner.relevance=none --profile --time-budget 470 \
  --output "$OUT_DIR/overhead-all"
# 2. batch 1, 64 tokens, the prefill compiled as CUDA graphs for every subject (the vision-stage methods compile
# their tower and stack; FastV keeps its stack eager), profiles of the misses
step prefill-b1 560 "$bench" $LLAVA --methods none,visionzip,divprune,vispruner,scope,hiprune,fastv --keep 64 \
  --batch 1 --new-tokens 2 --repeats 10 --generate-repeats 1 --no-oracle-generate --compile-prefill --profile \
  --time-budget 470 --output "$OUT_DIR/prefill-b1"
# 3. batch-1 decode with the static cache (transformers compiles the step), against the bandwidth floor
step decode-b1 240 "$bench" $LLAVA --methods none,visionzip,fastv,pdrop --keep 64 --batch 1 --new-tokens 32 \
  --repeats 5 --generate-repeats 3 --no-oracle-generate --cache static --profile --time-budget 200 \
  --output "$OUT_DIR/decode-b1"
# 4. eval throughput: an lmms-eval-style batch-1 loop (unpruned) vs `vtprune eval` batched with pruning
step eval-throughput 240 "$bench_eval" --arch llava-1.5-7b --random-weights --methods none,visionzip,divprune \
  --keep 64 --batch 32 --samples 128 --new-tokens 8 --device cuda --dtype bfloat16 --no-progress \
  --output "$OUT_DIR/eval-throughput"
echo "== done ($(date +%T))"
