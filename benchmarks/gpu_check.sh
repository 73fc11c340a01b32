#!/usr/bin/env bash
# The prepared GPU check of issue 19: runs in under 8 minutes on one GPU and writes benchmarks/results/gpu.md.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with CUDA
#   bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/gpu.md   # dry run of every step on the CPU
#
# Steps, each under its own time limit (together at most 440 s plus a 30 s CUDA probe; a step that fails or runs out of time is recorded in gpu.md and
# the next one runs):
#   1. the test suite's CUDA-marked tests (pytest -m cuda)                                    120 s
#   2. calibration overhead against a plain sdpa forward (SmolLM2, bfloat16)                   70 s
#   3. layer-sequential against in-memory calibrate on a Llama-3.2-1B-shaped model           140 s
#   4. export speed, prefill and decode (SmolLM2 and the 1B shape)                            110 s
# Environment: PYTHON (default: python), SCALE_ROOT for scratch checkpoints (default /tmp/gpu-check; the
# 1B-shaped checkpoint is 2.3 GB, deleted at the end).
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=""
OUT=benchmarks/results/gpu.md
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK="--quick"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --device DEV, --quick, --out FILE)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python}"
ROOT="${SCALE_ROOT:-/tmp/gpu-check}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 \
    TRANSFORMERS_VERBOSITY=error
START=$(date +%s)

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no $PY on PATH; set PYTHON to the interpreter that has prune-heads' dependencies" >&2
    exit 2
fi
INFO=$(timeout 30 "$PY" -c 'import torch; ok = torch.cuda.is_available()
print(ok, torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if ok else "-")' 2>&1 | tail -1)
read -r HAS_CUDA TORCH_V CUDA_V GPU_NAME <<<"$INFO"
if [ "${HAS_CUDA:-}" != "True" ] && [ "${DEVICE#cuda}" != "$DEVICE" ]; then
    echo "gpu_check.sh: CUDA is not available here (torch says: $INFO); nothing to check." >&2
    echo "Run it on a machine with a GPU, or dry-run the steps with: bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/gpu.md" >&2
    exit 3
fi

mkdir -p "$(dirname "$OUT")" "$ROOT"
{
    echo "## GPU check (issue 19)"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh --device $DEVICE${QUICK:+ $QUICK}\` on $(date -u '+%Y-%m-%d %H:%M UTC'); device: ${GPU_NAME:-?} (torch ${TORCH_V:-?}, CUDA ${CUDA_V:-?}), $(nproc --all) CPU cores.${QUICK:+ **Quick dry run: tiny models, not a measurement.**}"
    echo
} >"$OUT"

FAILED=0
step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, record what happened
    local name="$1" limit="$2"
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "**$name: stopped at its time limit (${limit} s).**" >>"$OUT"; echo >>"$OUT"; FAILED=1
    elif [ $rc -ne 0 ]; then
        echo "**$name: failed (exit $rc) after ${took} s; see the log above it.**" >>"$OUT"; echo >>"$OUT"; FAILED=1
    fi
    echo "== $name: exit $rc in ${took}s" >&2
    return 0
}

pytest_cuda() {
    local log rc
    log=$(mktemp)
    timeout --kill-after=10 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests >"$log" 2>&1
    rc=$?
    tail -5 "$log" >&2
    {
        echo "### CUDA-marked tests"
        echo
        if [ $rc -eq 5 ]; then
            echo "No test is marked \`cuda\` yet (pytest collected none)."
        elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            echo "**Stopped at the time limit (120 s):** $(grep -E '(passed|failed|error)' "$log" | tail -1)"
        else
            echo "\`pytest -q -m cuda tests\`: exit $rc — $(grep -E '(passed|failed|error)' "$log" | tail -1)"
        fi
        echo
    } >>"$OUT"
    rm -f "$log"
    if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then FAILED=1; fi
}

if [ -n "$QUICK" ]; then
    echo "### CUDA-marked tests" >>"$OUT"; echo >>"$OUT"; echo "Skipped in the quick dry run." >>"$OUT"; echo >>"$OUT"
else
    pytest_cuda
fi
step "calibration overhead" 70 "$PY" benchmarks/bench_scale.py --part gpu-overhead --device "$DEVICE" $QUICK \
    --repeats 5 --root "$ROOT" --out "$OUT"
step "layer-sequential vs in-memory" 140 "$PY" benchmarks/bench_scale.py --part gpu-engines --device "$DEVICE" \
    $QUICK --repeats 3 --root "$ROOT" --out "$OUT"
step "export speed" 110 "$PY" benchmarks/bench_scale.py --part gpu-speed --device "$DEVICE" $QUICK --repeats 5 \
    --root "$ROOT" --out "$OUT"

rm -rf "$ROOT/llama-3.2-1b" "$ROOT/tiny" "$ROOT/gpu-plan.json"  # the scratch this script wrote, nothing else
rmdir "$ROOT" 2>/dev/null
echo "Total: $(( $(date +%s) - START )) s." >>"$OUT"
echo "wrote $OUT in $(( $(date +%s) - START )) s" >&2
exit $FAILED
