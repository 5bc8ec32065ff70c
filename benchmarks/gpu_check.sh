#!/usr/bin/env bash
# Everything tbkernels needs checked on a GPU, in one go, on a bare H100/H200 machine:
#   build with CUDA -> backend table -> whole test suite on the GPU -> benchmark suite -> plot.
#
#   benchmarks/gpu_check.sh OUTDIR                 # every step, in order
#   benchmarks/gpu_check.sh OUTDIR STEP [STEP ...]  # only these (names below), in the order given
#
# Steps: environment tools build backends tests benchmarks flow_grpo flow_grpo_map
# flow_grpo_inputs mps dpo_memory plot.
# Everything takes longer than one 10-minute device command; split it over calls on one warm
# machine (the build stays installed between them), e.g.
#   gpu_check.sh $OUT environment tools build backends tests
#   gpu_check.sh $OUT environment benchmarks flow_grpo mps
#   gpu_check.sh $OUT environment flow_grpo_map dpo_memory plot
#   gpu_check.sh $OUT environment flow_grpo_inputs plot
#
# Assumes a CUDA torch and nvcc are installed; pytest, pytest-benchmark and triton are installed
# only if missing (from PIP_FIND_LINKS wheels or the network; neither is required to exist).
# Writes into OUTDIR: gpu_check.log (everything), build.log, tests.log + tests.xml (junit),
# benchmarks.log, results.csv, and a plot. A failed step does not stop the later ones; the
# script exits 1 at the end if any step failed, and lists which.
#
# It never changes the GPU's settings (clocks, persistence, compute mode, MIG): it only reads
# them with nvidia-smi -L. Commit OUTDIR/results.csv into benchmarks/results/ afterwards.
set -u

ALL_STEPS=(environment tools build backends tests benchmarks flow_grpo flow_grpo_map
  flow_grpo_inputs mps dpo_memory plot)
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [STEP ...]   (steps: ${ALL_STEPS[*]})" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
shift
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  case " ${ALL_STEPS[*]} " in
    *" $s "*) ;;
    *) echo "unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The suite must exercise compiled Triton on the GPU, not the CPU interpreter CI uses, and
# every backend must be chosen by the tests themselves.
unset TRITON_INTERPRET TBK_BACKEND

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

FAILED=()
step() {  # step NAME CMD...: run, report, remember a failure, carry on
  local name=$1
  shift
  printf '\n=== %s (t=%ss)\n' "$name" "$SECONDS"
  "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then
    echo "--- ok: $name"
  else
    echo "--- FAILED (exit $rc): $name"
    FAILED+=("$name (exit $rc)")
  fi
}

environment() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  git -c safe.directory="$PWD" log -1 --oneline 2>/dev/null || echo "(no git history here)"
  nvidia-smi -L || return 1
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA',
torch.version.cuda); assert torch.cuda.is_available(), 'torch sees no CUDA device'"
}

ensure_module() {  # ensure_module IMPORT_NAME PIP_SPEC: install only if missing; never fatal
  $PY -c "import $1" 2>/dev/null && return 0
  echo "$1 missing: pip install $2"
  $PY -m pip install -q "$2" || echo "WARNING: could not install $2 (offline?); steps needing it will fail"
  return 0
}

tools() {
  ensure_module pytest "pytest>=8"
  ensure_module pytest_benchmark "pytest-benchmark>=5"
  # CUDA torch wheels normally bring their own triton; a fresh one could mismatch that torch.
  ensure_module triton triton
  $PY -c "import pytest, pytest_benchmark; print('pytest', pytest.__version__,
'| pytest-benchmark', pytest_benchmark.__version__)" || return 1
  $PY -c "import triton; print('triton', triton.__version__)" || echo "no triton: its backend will be skipped"
}

build() {
  # --no-build-isolation: compile against this torch instead of fetching another one.
  TBK_BUILD_CUDA=1 $PY -m pip install --no-build-isolation -v . >"$OUT/build.log" 2>&1
  local rc=$?
  grep -E "^tbkernels:|^Successfully installed" "$OUT/build.log"
  [ $rc -eq 0 ] || tail -40 "$OUT/build.log"
  return $rc
}

backends() {
  # From /tmp, so the installed package is what runs, not anything in the checkout.
  (cd /tmp && $PY -m tbkernels) || return 1
  (cd /tmp && $PY -c "import tbkernels; s = tbkernels.backends('cuda')['cuda']; print('cuda backend:', s);
assert s.available, 'the CUDA backend did not build or load'")
}

tests() {
  $PY -m pytest -q -rs tests --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
  local rc=$?
  tail -25 "$OUT/tests.log"
  return $rc
}

benchmarks() {
  TBK_RESULTS_CSV="$OUT/results.csv" $PY -m pytest benchmarks --benchmark-only -q -rs \
    >"$OUT/benchmarks.log" 2>&1
  local rc=$?
  tail -60 "$OUT/benchmarks.log"
  return $rc
}

flow_grpo_bench() {
  TBK_RESULTS_CSV="$OUT/results.csv" $PY benchmarks/bench_flow_grpo.py --gpu \
    >"$OUT/flow_grpo.log" 2>&1
  local rc=$?
  tail -40 "$OUT/flow_grpo.log"
  return $rc
}

flow_grpo_map_bench() {
  # The same with a ViPO advantage map, per position and per element (no bandwidth rows).
  TBK_RESULTS_CSV="$OUT/results.csv" $PY benchmarks/bench_flow_grpo.py --gpu --map both \
    >"$OUT/flow_grpo_map.log" 2>&1
  local rc=$?
  tail -40 "$OUT/flow_grpo_map.log"
  return $rc
}

flow_grpo_inputs_bench() {
  # Flow-GRPO's own inputs: a bf16 model_output and reference beside float32 sample/prev_sample
  # that are [:, j] slices of stored trajectories; without a map and with a per-position map.
  # Rows: ops flow_grpo_loss_trajectory / _map_position_trajectory, dtype bfloat16/float32.
  TBK_RESULTS_CSV="$OUT/results.csv" $PY benchmarks/bench_flow_grpo.py --gpu --mixed \
    --trajectory >"$OUT/flow_grpo_inputs.log" 2>&1 &&
  TBK_RESULTS_CSV="$OUT/results.csv" $PY benchmarks/bench_flow_grpo.py --gpu --mixed \
    --trajectory --map position >>"$OUT/flow_grpo_inputs.log" 2>&1
  local rc=$?
  tail -40 "$OUT/flow_grpo_inputs.log"
  return $rc
}

mps_bench() {
  # Starts a private MPS daemon (own pipe/log directories) and stops it before returning.
  $PY benchmarks/bench_mps.py --csv "$OUT/results.csv" --out-dir "$OUT/mps" \
    >"$OUT/mps.log" 2>&1
  local rc=$?
  tail -40 "$OUT/mps.log"
  return $rc
}

dpo_memory_bench() {
  # 480p x 2 s, first micro-batch only (the accumulating rows double the processes); the meta
  # model (dpo_memory.py --meta) predicts standard/decoupled without checkpointing need ~122 GiB
  # (full) and ~90 GiB (LoRA): expect "oom" rows for those on an 80 GB card.
  # The meta model ran diffusers' WanTransformer3DModel; the GPU image has no diffusers (carry
  # its wheel: benchmarks/README.md), and without it the script's TinyDiT stands in.
  $PY -c "import diffusers" 2>/dev/null ||
    echo "WARNING: diffusers not installed: the DPO benchmark runs TinyDiT, not WanTransformer3DModel"
  TBK_RESULTS_CSV="$OUT/results.csv" $PY benchmarks/dpo_memory.py --gpu --latent 480p_2s \
    --no-accum >"$OUT/dpo_memory.log" 2>&1
  local rc=$?
  tail -40 "$OUT/dpo_memory.log"
  return $rc
}

plot() {
  [ -s "$OUT/results.csv" ] || { echo "no results.csv to plot"; return 1; }
  $PY benchmarks/plot_results.py "$OUT/results.csv" --out-dir "$OUT"
}

declare -A STEP_FN=([environment]=environment [tools]=tools [build]=build [backends]=backends
  [tests]=tests [benchmarks]=benchmarks [flow_grpo]=flow_grpo_bench
  [flow_grpo_map]=flow_grpo_map_bench [flow_grpo_inputs]=flow_grpo_inputs_bench [mps]=mps_bench
  [dpo_memory]=dpo_memory_bench [plot]=plot)
declare -A STEP_NAME=([environment]="environment" [tools]="test tools"
  [build]="build tbkernels with CUDA" [backends]="backend table" [tests]="test suite on the GPU"
  [benchmarks]="benchmark suite" [flow_grpo]="flow-GRPO loss benchmark"
  [flow_grpo_map]="flow-GRPO loss benchmark with ViPO maps"
  [flow_grpo_inputs]="flow-GRPO loss benchmark on Flow-GRPO's inputs (mixed dtypes, trajectory slices)"
  [mps]="MPS reward-worker benchmark" [dpo_memory]="DPO peak-memory benchmark" [plot]="plot")
for s in "${STEPS[@]}"; do
  step "${STEP_NAME[$s]}" "${STEP_FN[$s]}"
done

printf '\n=== summary (t=%ss): outputs in %s\n' "$SECONDS" "$OUT"
ls -l "$OUT"
finish() {  # let tee flush the log before the caller reads it
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  finish 1
fi
echo "all steps passed"
finish 0
