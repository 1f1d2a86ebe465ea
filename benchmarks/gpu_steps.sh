# Sourced by the GPU run scripts (gpu_prefill_run.sh, gpu_headline_run.sh): the environment, the bench commands
# without the CLI's other imports (the GPU image lacks `datasets`), and `step NAME SECONDS COMMAND...`, which
# runs COMMAND into $OUT_DIR/NAME.log when NAME is listed in $STEPS, under SECONDS or what is left of $DEADLINE
# (seconds for all steps together: a device call is limited to 10 minutes), skipping it with under 30 s left.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
bench="python3 -c 'import typer; from vtprune.bench.commands import bench_command; typer.run(bench_command)'"
bench_eval="python3 -c 'import typer; from vtprune.bench.commands import bench_eval_command; typer.run(bench_eval_command)'"
LLAVA="--arch llava-1.5-7b --random-weights --dtype bfloat16 --device cuda --no-progress"
DEADLINE=${DEADLINE:-100000}
step() {
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return;; esac
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== $name skipped: ${left} s left of DEADLINE"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name ($(date +%T))"; timeout "$limit" bash -c "$*" > "$OUT_DIR/$name.log" 2>&1; echo "   rc=$?"
}
