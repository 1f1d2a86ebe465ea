#!/usr/bin/env bash
# The GPU run behind benchmarks/results/nvidia-h200-2026-12-03-compiled/ (the speed issue, second run):
# compiled decoding in fixed shapes for the methods, with profiles of what misses a target, and every method's
# prefill overhead at batch 16. `STEPS="decode-static-a ..." bash benchmarks/gpu_compiled_run.sh OUTDIR` runs
# the listed steps (all by default; each under 10 minutes on an H200), each under its own time limit.
set -u
OUT_DIR=${1:?usage: gpu_compiled_run.sh OUTDIR}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the bench command without the CLI's other imports (the GPU image lacks `datasets`)
bench="python3 -c 'import typer; from vtprune.bench.commands import bench_command; typer.run(bench_command)'"
LLAVA="--arch llava-1.5-7b --random-weights --dtype bfloat16 --device cuda --no-progress"
DECODE="--keep 64 --batch 1 --new-tokens 32 --repeats 5 --generate-repeats 3 --no-oracle-generate"
STEPS=${STEPS:-decode-static-a decode-static-b overhead-all overhead-rerun decode-static-b16 decode-fitted-b1 decode-fitted-b16 tokencarve-svd overhead-final}
# step NAME SECONDS COMMAND...: run when NAME is listed in $STEPS
step() {
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return;; esac
  echo "== $name ($(date +%T))"; timeout "$limit" bash -c "$*" > "$OUT_DIR/$name.log" 2>&1; echo "   rc=$?"
}
# 1. compiled decode at batch 1 (static cache; every subject compiles its decode step first, untimed), in two
# groups of methods; --profile: profiles of the prefills and of the decode steps that miss a target
step decode-static-a 300 "$bench" $LLAVA --methods none,visionzip,fastv,pdrop $DECODE --cache static --profile \
  --time-budget 200 --output "$OUT_DIR/decode-static-a"
step decode-static-b 280 "$bench" $LLAVA --methods none,divprune,vispruner,sparsevlm,dart $DECODE --cache static \
  --time-budget 250 --output "$OUT_DIR/decode-static-b"
# 2. every method's prefill and overhead over its oracle at batch 16, with profiles of the misses
step overhead-all 560 "$bench" $LLAVA --methods all --keep 192,128,64 --batch 16 --new-tokens 2 --repeats 5 \
  --generate-repeats 1 --no-oracle-generate --profile --time-budget 470 --output "$OUT_DIR/overhead-all"
# 3. after the SCOPE fix (CUDA-graphed greedy loop), and CDPruner without its CLIP text tower (not on the
# offline GPU image), same settings as step 2
step overhead-rerun 200 "$bench" $LLAVA --methods none,scope,cdpruner --keep 192,128,64 --batch 16 --new-tokens 2 \
  --repeats 5 --generate-repeats 1 --no-oracle-generate --param cdpruner.relevance=none --time-budget 150 \
  --output "$OUT_DIR/overhead-rerun"
# 4. compiled decode at batch 16, where the KV cache the pruned tokens no longer fill is a real share of each step
step decode-static-b16 260 "$bench" $LLAVA --methods none,visionzip,fastv --keep 64 --batch 16 --new-tokens 32 \
  --repeats 3 --generate-repeats 3 --no-oracle-generate --cache static --time-budget 220 \
  --output "$OUT_DIR/decode-static-b16"
# 5. after sizing each static cache layer for what its layer group keeps: compiled decode again, batch 1 and 16
step decode-fitted-b1 200 "$bench" $LLAVA --methods none,visionzip,fastv,pdrop $DECODE --cache static \
  --time-budget 170 --output "$OUT_DIR/decode-fitted-b1"
step decode-fitted-b16 240 "$bench" $LLAVA --methods none,visionzip,fastv --keep 64 --batch 16 --new-tokens 32 \
  --repeats 3 --generate-repeats 3 --no-oracle-generate --cache static --time-budget 200 \
  --output "$OUT_DIR/decode-fitted-b16"
# 6. the last fixes (FlowCut and SparseVLM host syncs, DART's loop as a CUDA graph, HiPrune's one transfer) and
# the methods within a few % of the target, with profiles of every miss; TokenCarve's SVD routes
step tokencarve-svd 60 python3 benchmarks/tokencarve_svd_gpu.py --massive 100 --output "$OUT_DIR/tokencarve-svd.json"
step overhead-final 150 "$bench" $LLAVA --methods none,flowcut,sparsevlm,dart,hiprune,holov --keep 192,128,64 \
  --batch 16 --new-tokens 2 --repeats 5 --generate-repeats 1 --no-oracle-generate --profile --time-budget 100 \
  --output "$OUT_DIR/overhead-final"
echo "== done ($(date +%T))"
