#!/usr/bin/env bash
# Everything tbkernels needs checked on a GPU, on a bare H100/H200 machine lent through the device
# tool: build with CUDA -> backend table -> whole test suite on the GPU -> benchmarks -> plot.
#
#   TBK_COMMIT=<short sha> bash benchmarks/gpu_check.sh OUTDIR                 # every step
#   TBK_COMMIT=<short sha> bash benchmarks/gpu_check.sh OUTDIR STEP [STEP ...]  # only these, in order
#
# Steps: environment tools build backends tests benchmarks flow_grpo flow_grpo_map
# flow_grpo_inputs mps dpo_memory plot.
#
# Every call is self-contained: the device's machine goes back 30 s after a call, so the next call
# usually starts on a fresh, bare one. A step that needs the installed package (backends, tests,
# benchmarks, flow_grpo*, mps, dpo_memory) first checks that tbkernels imports with a working CUDA
# backend and, if not, runs the build step itself (and says so). All steps together take longer
# than one 10-minute device command; split them over calls (benchmarks/README.md, "On a GPU"):
#   gpu_check.sh $OUT environment tools build backends tests
#   gpu_check.sh $OUT environment benchmarks flow_grpo plot
#   gpu_check.sh $OUT environment flow_grpo_map
#   gpu_check.sh $OUT environment dpo_memory
#   gpu_check.sh $OUT environment flow_grpo_inputs mps plot
#
# Time limits: each step runs under `timeout`, with a per-step default (STEP_LIMIT below),
# TBK_STEP_TIMEOUT=SECONDS for every step, or TBK_TIMEOUT_<STEP>=SECONDS for one (e.g.
# TBK_TIMEOUT_TESTS=300). The call as a whole stops starting steps and cuts the running one short
# at TBK_CALL_BUDGET seconds (default 540), leaving time to pack the outputs before the device's
# 10-minute kill. A step cut short is reported as FAILED "timed out after N s"; what it wrote so
# far is kept.
#
# Outputs: the device returns at most 8 files from OUTDIR, so OUTDIR ends with at most four:
#   results.csv       benchmark rows (when a benchmark step ran), the project's 10-column format
#   gpu_check.log     everything printed (appended to when OUTDIR is reused)
#   tests.xml         junit of the test suite (when the tests step ran)
#   artifacts.tar.gz  everything else: build.log, tests.log, benchmarks.log, flow_grpo*.log,
#                     mps.log, mps/ (profiles.json, plan.json), dpo_memory.log, plot PNGs
# Steps write those extras into OUTDIR/artifacts/, which is packed and removed on exit (also after
# a failure or a TERM/INT/HUP); anything else left at OUTDIR's top level goes into the tarball too.
#
# TBK_COMMIT: the device's copy of the repo has no .git; set TBK_COMMIT to the short sha of the
# checkout (computed locally when writing the command) and every row is tagged with it.
# Assumes a CUDA torch and nvcc are installed; pytest, pytest-benchmark and triton are installed
# only if missing (from PIP_FIND_LINKS wheels or the network; neither is required to exist). A
# failed step does not stop the later ones; the script exits 1 at the end if any step failed, and
# lists which. It never changes the GPU's settings (clocks, persistence, compute mode, MIG): it
# only reads them with nvidia-smi -L. Bring the rows home with
#   python benchmarks/results.py merge OUTDIR/results.csv
# shellcheck disable=SC2317  # the step functions are called through STEP_FN
set -u

ALL_STEPS=(environment tools build backends tests benchmarks flow_grpo flow_grpo_map
  flow_grpo_inputs mps dpo_memory plot)
# Steps that need tbkernels installed with a working CUDA backend: built first when it is not.
NEEDS_PACKAGE=" backends tests benchmarks flow_grpo flow_grpo_map flow_grpo_inputs mps dpo_memory "
# Default time limit of each step, seconds.
declare -A STEP_LIMIT=([environment]=120 [tools]=180 [build]=420 [backends]=120 [tests]=420
  [benchmarks]=360 [flow_grpo]=360 [flow_grpo_map]=420 [flow_grpo_inputs]=360 [mps]=360
  [dpo_memory]=480 [plot]=120)
KILL_AFTER=10   # a command that ignores timeout's TERM is killed this many seconds later
MIN_STEP_S=10   # a step is not started with less than this left of the call's budget

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [STEP ...]   (steps: ${ALL_STEPS[*]})" >&2
  exit 2
fi
# no leading zero: bash arithmetic would read 09 as (invalid) octal and 010 as 8
is_seconds() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
for v in TBK_STEP_TIMEOUT TBK_CALL_BUDGET; do
  if [ -n "${!v:-}" ] && ! is_seconds "${!v}"; then
    echo "$v must be a whole number of seconds > 0, not '${!v}'" >&2
    exit 2
  fi
done
CALL_BUDGET=${TBK_CALL_BUDGET:-540}
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
  v="TBK_TIMEOUT_${s^^}"
  if [ -n "${!v:-}" ] && ! is_seconds "${!v}"; then
    echo "$v must be a whole number of seconds > 0, not '${!v}'" >&2
    exit 2
  fi
done
cd "$(dirname "$0")/.." || exit 2
# PYTHON may carry options (python3 -X dev): split into words once.
read -ra PY <<<"${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The suite must exercise compiled Triton on the GPU, not the CPU interpreter CI uses, and
# every backend must be chosen by the tests themselves.
unset TRITON_INTERPRET TBK_BACKEND

# Extra outputs go here and are packed into artifacts.tar.gz on exit. A tarball left by an earlier
# call into the same OUTDIR (a local run; the device's $OUT is empty each call) is unpacked first,
# so the new one holds both.
ART="$OUT/artifacts"
# What OUTDIR already held (a local run into an existing folder): never moved into the tarball.
declare -A KEEP=()
for f in "$OUT"/* "$OUT"/.[!.]*; do
  { [ -e "$f" ] || [ -L "$f" ]; } && KEEP["${f##*/}"]=1
done
if [ -f "$OUT/artifacts.tar.gz" ]; then
  tar -xzf "$OUT/artifacts.tar.gz" -C "$OUT" && rm -f "$OUT/artifacts.tar.gz"
fi
mkdir -p "$ART" || exit 2

# tee ignores TERM/INT/HUP, so that a signal to the whole process group leaves it writing the log
# until this script has packed its outputs and closed its end.
exec > >(trap '' TERM INT HUP; exec tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

TIMEOUT_BIN=$(command -v timeout || true)
[ -n "$TIMEOUT_BIN" ] || echo "WARNING: no \`timeout\` (coreutils) on PATH: steps run without time limits"

FAILED=()
PKG_OK=0          # tbkernels imported with a working CUDA backend in this call
AUTO_BUILD_TRIED=0
STEP_DEADLINE=0 STEP_TIMED_OUT=0 CHILD=""

step_limit() {  # step_limit STEP: its time limit in seconds, from the environment or the default
  local v="TBK_TIMEOUT_${1^^}"
  echo "${!v:-${TBK_STEP_TIMEOUT:-${STEP_LIMIT[$1]}}}"
}

tmo() {  # tmo [-C DIR] [-o FILE | -a FILE] CMD...: run CMD under what is left of the step's limit
  # -C: in DIR; -o / -a: stdout and stderr to FILE (truncated / appended). Redirect here, never
  # on the call: a signal handled while a function's redirection is in force would print there.
  local dir=. log="" mode=""
  while :; do
    case "$1" in
      -C) dir=$2; shift 2 ;;
      -o | -a) mode=$1 log=$2; shift 2 ;;
      *) break ;;
    esac
  done
  local left=$((STEP_DEADLINE - SECONDS))
  if [ "$left" -le 0 ]; then
    STEP_TIMED_OUT=1
    return 124
  fi
  local limit=()
  [ -n "$TIMEOUT_BIN" ] && limit=("$TIMEOUT_BIN" -k "$KILL_AFTER" "$left")
  # In the background and waited for, so that a signal to this script is handled at once.
  (
    cd "$dir" || exit 1
    if [ "$mode" = -o ]; then exec >"$log" 2>&1; elif [ "$mode" = -a ]; then exec >>"$log" 2>&1; fi
    exec "${limit[@]}" "$@"
  ) &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  if [ -n "$TIMEOUT_BIN" ] && { [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$SECONDS" -ge "$STEP_DEADLINE" ]; }; }; then
    STEP_TIMED_OUT=1
  fi
  return "$rc"
}

run_step() {  # run_step STEP [TITLE]: run it under its time limit, report, remember a failure
  local key=$1 title=${2:-${STEP_NAME[$1]}}
  local limit left
  limit=$(step_limit "$key")
  left=$((CALL_BUDGET - SECONDS))
  printf '\n=== %s (t=%ss)\n' "$title" "$SECONDS"
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    echo "--- FAILED (not started: the call's budget of ${CALL_BUDGET} s is spent): $title"
    FAILED+=("$title (not started: the call's budget of ${CALL_BUDGET} s is spent)")
    return 1
  fi
  if [ "$limit" -gt "$left" ]; then
    echo "(time limit ${limit} s cut to the ${left} s left of the call's budget of ${CALL_BUDGET} s)"
    limit=$left
  fi
  STEP_DEADLINE=$((SECONDS + limit)) STEP_TIMED_OUT=0
  "${STEP_FN[$key]}"
  local rc=$?
  if [ "$STEP_TIMED_OUT" -eq 1 ]; then
    echo "--- FAILED (timed out after ${limit} s): $title"
    FAILED+=("$title (timed out after ${limit} s)")
  elif [ "$rc" -eq 0 ]; then
    echo "--- ok: $title"
  else
    echo "--- FAILED (exit $rc): $title"
    FAILED+=("$title (exit $rc)")
  fi
  return "$rc"
}

ensure_package() {  # before a step that needs it: build tbkernels if it does not import with CUDA
  [ "$PKG_OK" -eq 1 ] && return 0
  local msg
  # From /tmp, so the installed package is what is checked, not anything in the checkout.
  if msg=$(cd /tmp && ${TIMEOUT_BIN:+"$TIMEOUT_BIN" -k 5 120} "${PY[@]}" -c "import tbkernels._C, tbkernels; \
assert tbkernels.backends('cuda')['cuda'].available" 2>&1); then
    PKG_OK=1
    return 0
  fi
  [ "$AUTO_BUILD_TRIED" -eq 1 ] && return 1   # built (or tried) once in this call already
  AUTO_BUILD_TRIED=1
  printf '\n(tbkernels is not installed with a working CUDA backend here (%s): building it first)\n' \
    "$(printf '%s\n' "$msg" | tail -1)"
  run_step build "build tbkernels with CUDA (automatic: needed by the next step)"
}

environment() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  if ! git -c safe.directory="$PWD" log -1 --oneline 2>/dev/null; then
    if [ -n "${TBK_COMMIT:-}" ]; then
      echo "commit $TBK_COMMIT (from TBK_COMMIT; no git history here)"
    else
      echo "(no git history here and no TBK_COMMIT: rows will read commit 'unknown')"
    fi
  elif [ -n "${TBK_COMMIT:-}" ]; then
    echo "TBK_COMMIT=$TBK_COMMIT: rows are tagged with it"
  fi
  tmo nvidia-smi -L || return 1
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"
  tmo "${PY[@]}" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA',
torch.version.cuda); assert torch.cuda.is_available(), 'torch sees no CUDA device'"
}

ensure_module() {  # ensure_module IMPORT_NAME PIP_SPEC: install only if missing; never fatal
  "${PY[@]}" -c "import $1" 2>/dev/null && return 0
  echo "$1 missing: pip install $2"
  tmo "${PY[@]}" -m pip install -q "$2" || echo "WARNING: could not install $2 (offline?); steps needing it will fail"
  return 0
}

tools() {
  ensure_module pytest "pytest>=8"
  ensure_module pytest_benchmark "pytest-benchmark>=5"
  # CUDA torch wheels normally bring their own triton; a fresh one could mismatch that torch.
  ensure_module triton triton
  "${PY[@]}" -c "import pytest, pytest_benchmark; print('pytest', pytest.__version__,
'| pytest-benchmark', pytest_benchmark.__version__)" || return 1
  "${PY[@]}" -c "import triton; print('triton', triton.__version__)" || echo "no triton: its backend will be skipped"
}

build() {
  # --no-build-isolation: compile against this torch instead of fetching another one.
  tmo -o "$ART/build.log" env TBK_BUILD_CUDA=1 "${PY[@]}" -m pip install --no-build-isolation -v .
  local rc=$?
  PKG_OK=0 AUTO_BUILD_TRIED=1   # check again before the next step that needs it; build once
  # pip -v indents the backend's output.
  grep -E "^\s*tbkernels:|^Successfully installed" "$ART/build.log"
  [ "$rc" -eq 0 ] || tail -40 "$ART/build.log"
  return "$rc"
}

backends() {
  # From /tmp, so the installed package is what runs, not anything in the checkout.
  tmo -C /tmp "${PY[@]}" -m tbkernels || return 1
  tmo -C /tmp "${PY[@]}" -c "import tbkernels; s = tbkernels.backends('cuda')['cuda']; print('cuda backend:', s);
assert s.available, 'the CUDA backend did not build or load'"
}

tests() {
  tmo -o "$ART/tests.log" "${PY[@]}" -m pytest -q -rs tests --junitxml="$OUT/tests.xml"
  local rc=$?
  tail -25 "$ART/tests.log"
  return "$rc"
}

benchmarks() {
  tmo -o "$ART/benchmarks.log" env TBK_RESULTS_CSV="$OUT/results.csv" \
    "${PY[@]}" -m pytest benchmarks --benchmark-only -q -rs
  local rc=$?
  tail -60 "$ART/benchmarks.log"
  return "$rc"
}

flow_grpo_bench() {
  tmo -o "$ART/flow_grpo.log" env TBK_RESULTS_CSV="$OUT/results.csv" \
    "${PY[@]}" benchmarks/bench_flow_grpo.py --gpu
  local rc=$?
  tail -40 "$ART/flow_grpo.log"
  return "$rc"
}

flow_grpo_map_bench() {
  # The same with a ViPO advantage map, per position and per element (no bandwidth rows).
  tmo -o "$ART/flow_grpo_map.log" env TBK_RESULTS_CSV="$OUT/results.csv" \
    "${PY[@]}" benchmarks/bench_flow_grpo.py --gpu --map both
  local rc=$?
  tail -40 "$ART/flow_grpo_map.log"
  return "$rc"
}

flow_grpo_inputs_bench() {
  # Flow-GRPO's own inputs: a bf16 model_output and reference beside float32 sample/prev_sample
  # that are [:, j] slices of stored trajectories; without a map and with a per-position map.
  # Rows: ops flow_grpo_loss_trajectory / _map_position_trajectory, dtype bfloat16/float32.
  tmo -o "$ART/flow_grpo_inputs.log" env TBK_RESULTS_CSV="$OUT/results.csv" \
    "${PY[@]}" benchmarks/bench_flow_grpo.py --gpu --mixed --trajectory &&
  tmo -a "$ART/flow_grpo_inputs.log" env TBK_RESULTS_CSV="$OUT/results.csv" \
    "${PY[@]}" benchmarks/bench_flow_grpo.py --gpu --mixed --trajectory --map position
  local rc=$?
  tail -40 "$ART/flow_grpo_inputs.log"
  return "$rc"
}

mps_bench() {
  # Starts a private MPS daemon (own pipe/log directories) and stops it before returning.
  tmo -o "$ART/mps.log" "${PY[@]}" benchmarks/bench_mps.py --csv "$OUT/results.csv" \
    --out-dir "$ART/mps"
  local rc=$?
  tail -40 "$ART/mps.log"
  return "$rc"
}

dpo_memory_bench() {
  # 480p x 2 s, first micro-batch only (the accumulating rows double the processes); the meta
  # model (dpo_memory.py --meta) predicts standard/decoupled without checkpointing need ~122 GiB
  # (full) and ~90 GiB (LoRA): expect "oom" rows for those on an 80 GB card.
  # The meta model ran diffusers' WanTransformer3DModel; the GPU image has no diffusers (carry
  # its wheel: benchmarks/README.md), and without it the script's TinyDiT stands in.
  "${PY[@]}" -c "import diffusers" 2>/dev/null ||
    echo "WARNING: diffusers not installed: the DPO benchmark runs TinyDiT, not WanTransformer3DModel"
  tmo -o "$ART/dpo_memory.log" env TBK_RESULTS_CSV="$OUT/results.csv" \
    "${PY[@]}" benchmarks/dpo_memory.py --gpu --latent 480p_2s --no-accum
  local rc=$?
  tail -40 "$ART/dpo_memory.log"
  return "$rc"
}

plot() {
  [ -s "$OUT/results.csv" ] || { echo "no results.csv to plot"; return 1; }
  tmo "${PY[@]}" benchmarks/plot_results.py "$OUT/results.csv" --out-dir "$ART"
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

PACKED=0 PACKING=0
pack() {  # leave at most results.csv, gpu_check.log, tests.xml and artifacts.tar.gz in OUTDIR
  [ "$PACKED" -eq 1 ] && return 0
  PACKING=1
  local f
  for f in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    [ -n "${KEEP[${f##*/}]:-}" ] && continue      # the user's, there before this run
    case "${f##*/}" in
      results.csv | gpu_check.log | tests.xml | artifacts.tar.gz | artifacts) ;;
      *) mv -f "$f" "$ART/" ;;
    esac
  done
  if [ -z "$(ls -A "$ART")" ]; then
    rmdir "$ART"
  elif tar -czf "$OUT/artifacts.tar.gz.part" -C "$OUT" artifacts &&
      mv -f "$OUT/artifacts.tar.gz.part" "$OUT/artifacts.tar.gz"; then
    rm -rf "$ART"
  else
    # Still at most a handful of top-level entries, but the device would drop files past 8.
    rm -f "$OUT/artifacts.tar.gz.part"
    echo "WARNING: could not pack $ART into artifacts.tar.gz"
  fi
  if [ -f "$OUT/artifacts.tar.gz" ] && [ "$(stat -c %s "$OUT/artifacts.tar.gz")" -gt $((16 << 20)) ]; then
    echo "WARNING: artifacts.tar.gz is over 16 MiB: the device tool will not return it"
  fi
  PACKED=1 PACKING=0
}

finish() {  # pack, then let tee flush the log before the caller reads it
  printf '\n=== summary (t=%ss): outputs in %s\n' "$SECONDS" "$OUT"
  pack
  ls -l "$OUT"
  [ -f "$OUT/artifacts.tar.gz" ] && tar -tzf "$OUT/artifacts.tar.gz" | sed 's/^/  /'
  local rc=0
  if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    rc=1
  else
    echo "all steps passed"
  fi
  exec 1>&- 2>&-
  # tee ends when nothing holds the pipe open; a stray process left by a step could, so give it
  # 10 s (it ignores TERM: see above).
  local _
  for _ in $(seq 100); do
    kill -0 "$TEE_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$TEE_PID" 2>/dev/null
  wait "$TEE_PID" 2>/dev/null
  exit "$rc"
}

on_signal() {
  if [ "$PACKING" -eq 1 ]; then
    # arrived while the outputs are being packed (bash runs a trap between commands): let the
    # packing finish where it stands; finish/exit follow it
    FAILED+=("stopped by SIG$1")
    return
  fi
  trap '' TERM INT HUP
  printf '\n=== stopped by SIG%s (t=%ss)\n' "$1" "$SECONDS"
  # timeout passes the TERM on to the step's processes and kills them KILL_AFTER s later.
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  FAILED+=("stopped by SIG$1")
  finish
}
trap pack EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

for s in "${STEPS[@]}"; do
  case "$NEEDS_PACKAGE" in
    *" $s "*) ensure_package ;;
  esac
  run_step "$s"
done
finish
