#!/usr/bin/env bash
# The GPU campaign: every GPU check of twofold in one call of at most 8 minutes on one H200, in this order:
#   tests         pytest -m gpu (the GPU-only tests: bf16 Triton accuracy, int64 offsets, reproducibility, ...)
#   kernels       bench.kernels --anchors at S1, S3, S2: ours vs eager, torch native, Liger FLCE and GRPO, bare GEMMs
#   fused-nft     bench.fused, NFT loss fwd+bwd at S1, fused vs eager
#   fused-grpo    the same for GRPO
#   step          bench.step on the Qwen2.5-1.5B shape, bf16, sdpa, both heads, MFU
#   triton-suite  with the time left: the Triton accuracy suites (tests/test_triton_logprobs.py,
#                 test_fused_losses.py), compiled for the GPU instead of interpreted
# Each stage runs under its own time limit (cut to what the budget has left) and its JSON lands in the output
# folder as soon as it ends; bench.gpu_campaign folds it into campaign.json and judges the targets after every
# stage, so stopping the campaign at any point keeps what finished. A table is printed at the end.
#
#   bash bench/gpu_campaign.sh                        # on the GPU machine: writes into $OUT
#   bash bench/gpu_campaign.sh --out DIR              # elsewhere
#   bash bench/gpu_campaign.sh --dry-run --out DIR    # CPU, tiny shapes, about a minute of CPU: every command line
#   bash bench/gpu_campaign.sh --only kernels,step    # a rerun of some stages
#   bash bench/gpu_campaign.sh --budget 300           # seconds for the whole campaign (default 470; dry: 1800)
#
# Liger is not installed on the GPU machine: its wheel travels in .whl/ (bench/README.md says how) and is
# installed here into a temporary folder when present. Writes 6 files, flat (the device returns at most 8).
set -u -o pipefail

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=0 DIR=${OUT:-} BUDGET="" ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) DIR=${2:?--out needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --only) ONLY=${2:?--only needs stage names}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_campaign.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -n "$DIR" ] || { echo "gpu_campaign.sh: no output folder: set OUT or pass --out DIR" >&2; exit 2; }
STAGES="tests kernels fused-nft fused-grpo step triton-suite"
for s in ${ONLY//,/ }; do
    case " $STAGES " in *" $s "*) ;; *) echo "gpu_campaign.sh: unknown stage $s (stages: $STAGES)" >&2; exit 2 ;; esac
done
mkdir -p "$DIR" || exit 2
DIR=$(cd "$DIR" && pwd)
LOG="$DIR/campaign.log"
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ls .whl/*.whl >/dev/null 2>&1; then  # Liger and any other carried pure-Python wheel
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        2>&1 | tee -a "$LOG" && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTEST=("$PY" -m bench.gpu_campaign pytest -q -p no:cacheprovider)  # pytest that reports what ran if timed out

if [ "$DRY" = 1 ]; then  # the same command lines at tiny CPU shapes (Triton interpreted where a test runs it)
    export TRITON_INTERPRET=1
    SCALE=4 BUDGET=${BUDGET:-1800}  # a loaded CPU is slow to start Python: generous limits, same code path
    DEV=cpu
    BACKEND=torch  # the interpreted fused pass takes seconds per call; CI's tests cover it
    SUITE_PICK=(-k test_custom_op_opcheck)
    KERNEL_SHAPES=(--quick)
    # on CPU bench.fused measures memory in a fresh process per case, a path the GPU (in-process) never takes;
    # tests/test_bench.py covers those probes
    FUSED_SHAPE=(--dtype fp32 --n 256 --h 32 --v 1000 --warmup 0 --repeats 1 --no-memory)
    STEP_SHAPE=(--preset tiny-qwen2 --dtype float32 --batch-tokens 128 --budget 128 --min-len 16 --max-len 64
                --steps 1 --warmup 0)
else
    SCALE=1 BUDGET=${BUDGET:-470}
    DEV=cuda
    BACKEND=triton
    SUITE_PICK=()
    KERNEL_SHAPES=(--shapes S1 S3 S2)  # the targets' shapes first: a cut run keeps them
    FUSED_SHAPE=(--dtype bf16 --n 8192 --h 4096 --v 128256 --warmup 2 --repeats 10)
    STEP_SHAPE=(--preset qwen2.5-1.5b-shape --dtype bfloat16 --steps 3 --warmup 1)
fi

START=$(date +%s)
RESERVE=10  # seconds kept back for the summary
selected() { [ -z "$ONLY" ] || case ",$ONLY," in *",$1,"*) true ;; *) false ;; esac; }
record() { "$PY" -m bench.gpu_campaign record "$DIR" "$@" 2>&1 | tee -a "$LOG"; }

# run_stage NAME LIMIT_S [--junit] -- COMMAND...: run COMMAND under min(LIMIT_S, budget left), then record it.
run_stage() {
    local name=$1 limit=$(($2 * SCALE)) junit=()
    shift 2
    if [ "$1" = --junit ]; then junit=(--junit "$WORK/$name.xml"); shift; fi
    shift  # --
    selected "$name" || return 0
    local left=$((START + BUDGET - RESERVE - $(date +%s)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "=== $name: not run, ${left}s of the budget left" | tee -a "$LOG"
        record "$name" --command "$*"
        return 0
    fi
    case $name in kernels|fused-nft|fused-grpo|step) rm -f "$DIR/$name.json" ;; esac  # no stale result
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    record "$name" --rc "$rc" --seconds $(($(date +%s) - t0)) --limit "$limit" "${junit[@]}" --command "$*"
}

"$PY" -m bench.gpu_campaign env "$DIR" $([ "$DRY" = 1 ] && echo --dry-run) 2>&1 | tee -a "$LOG"
[ "$DRY" = 1 ] || nvidia-smi 2>&1 | tee -a "$LOG"

# The GPU test of bench.step is left to the step stage, which runs the same benchmark with more steps.
run_stage tests 100 --junit -- "${PYTEST[@]}" -m gpu tests/ --junitxml="$WORK/tests.xml" \
    --deselect tests/test_engine_bench_step.py::test_step_benchmark_reports_mfu_on_gpu
run_stage kernels 140 -- "$PY" -m bench.kernels --device "$DEV" --anchors "${KERNEL_SHAPES[@]}" \
    --out "$DIR/kernels.json"
for objective in nft grpo; do
    run_stage "fused-$objective" 35 -- "$PY" -m bench.fused --device "$DEV" "${FUSED_SHAPE[@]}" --backend "$BACKEND" \
        --objective "$objective" --out "$DIR/fused-$objective.json"
done
run_stage step 110 -- "$PY" -m bench.step --device "$DEV" "${STEP_SHAPE[@]}" --attn sdpa --heads fused,eager \
    --out "$DIR/step.json"
# Last, on what the budget has left (about 40 s): the benchmarks come first.
run_stage triton-suite 60 --junit -- "${PYTEST[@]}" -m "not gpu" tests/test_triton_logprobs.py \
    tests/test_fused_losses.py --junitxml="$WORK/triton-suite.xml" "${SUITE_PICK[@]}"

"$PY" -m bench.gpu_campaign summary "$DIR" 2>&1 | tee -a "$LOG"
echo "campaign took $(($(date +%s) - START)) s; results in $DIR/campaign.json"
