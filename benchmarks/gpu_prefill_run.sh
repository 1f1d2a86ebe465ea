#!/usr/bin/env bash
# The GPU run that measures what the 2026-12-03 (second) session built without a GPU: the compiled prefill
# (`--compile-prefill`) at batch 1 against the compiled unpruned model, and the batch-16 overhead of the methods
# whose selection changed (FlowCut's vit stage, SCOPE's fused loop, HiPrune's attention, VisPruner's rounds),
# plus the kernel-level scripts and the CUDA-only tests. `STEPS="tests kernels ..." bash
# benchmarks/gpu_prefill_run.sh OUTDIR` runs the listed steps (all by default), each under its own time limit
# and under 10 minutes on an H200. DEADLINE=SECONDS caps the steps together: each step's limit shrinks to what is
# left of it, and a step with under 30 s left is skipped (a device call is limited to 10 minutes).
set -u
OUT_DIR=${1:?usage: gpu_prefill_run.sh OUTDIR}
mkdir -p "$OUT_DIR"
export VTPRUNE_TRITON=strict
PREFILL_B1="--keep 64 --batch 1 --new-tokens 2 --repeats 10 --generate-repeats 1 --no-oracle-generate --compile-prefill"
STEPS=${STEPS:-tests kernels prefill-compiled-b1 prefill-graphs-b1 overhead-b16 tokencarve-b16}
source benchmarks/gpu_steps.sh
# 1. the tests that only run on CUDA (CUDA graphs, Triton kernels, bf16 received attention)
step tests 300 python3 -m pytest -q tests/test_cuda_graphs.py tests/test_greedy_kernels.py tests/test_select_overhead.py \
  tests/test_flowcut_vit_layers.py tests/test_prefill_syncs.py "tests/test_selection.py::test_tokencarve_information_accuracy_against_float64_svd"
# 2. kernel-level timings: TokenCarve's SVD routes (float64 Gram + eigh among them), HiPrune/VisPruner pieces,
# SCOPE torch loop vs fused kernel, FlowCut's tower (bitwise vs the previous code, and its time)
step kernels 420 "python3 benchmarks/tokencarve_svd_gpu.py --output $OUT_DIR/tokencarve-svd.json; python3 \
  benchmarks/select_overhead_gpu.py --eager --output $OUT_DIR/select-overhead.json; python3 \
  benchmarks/scope_kernel_gpu.py --sweep-tiles --output $OUT_DIR/scope-kernel.json; python3 \
  benchmarks/flowcut_vit_gpu.py --output $OUT_DIR/flowcut-vit.json"
# 3. batch-1 prefill with the vision tower and decoder stack compiled, every subject alike (a vision-stage
# method's stack is one graph; FastV's stays eager), with profiles of the misses
step prefill-compiled-b1 560 "$bench" $LLAVA --methods none,visionzip,divprune,fastv $PREFILL_B1 --compile-mode default --profile \
  --time-budget 300 --output "$OUT_DIR/prefill-compiled-b1"
# 4. the same with CUDA graphs (torch.compile mode reduce-overhead), with profiles of the misses
step prefill-graphs-b1 400 "$bench" $LLAVA --methods none,visionzip,divprune $PREFILL_B1 --compile-mode reduce-overhead \
  --profile --time-budget 300 --output "$OUT_DIR/prefill-graphs-b1"
# 5. batch-16 overhead over the oracle of the methods whose selection changed, with profiles of the misses
step overhead-b16 560 "$bench" $LLAVA --methods none,flowcut,scope,hiprune,vispruner,vispruner_nosink,tokencarve \
  --keep 192,128,64 --batch 16 --new-tokens 2 --repeats 5 --generate-repeats 1 --no-oracle-generate --profile \
  --time-budget 420 --output "$OUT_DIR/overhead-b16"
# 6. TokenCarve at batch 16 (its SVD route)
step tokencarve-b16 200 "$bench" $LLAVA --methods none,tokencarve --keep 64 --batch 16 --new-tokens 2 --repeats 5 \
  --generate-repeats 1 --no-oracle-generate --time-budget 150 --output "$OUT_DIR/tokencarve-b16"
echo "== done ($(date +%T))"
