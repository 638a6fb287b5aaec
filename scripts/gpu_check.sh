#!/usr/bin/env bash
# The GPU checks, prepared to run in few calls on a lent GPU machine (10 minutes a call at most):
#
#   bash scripts/gpu_check.sh tests kernels s16    # GPU tests, kernel benchmark, S/16 training (~8 min)
#   bash scripts/gpu_check.sh b16 s16-unfused       # B/16 training; S/16 without the fused add + LayerNorm
#
# Each part has its own time limit and a failed part does not stop the others. The results go to
# benchmarks/results/ (commit them) and, with the log, to $OUT when it is set (the device tool's
# folder that comes back). It needs torch, triton, timm and scikit-learn, no install of this package
# and no `datasets` (the loader is timed on the bundled digits).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-}"
log="${out:-/tmp}/gpu_check.log"
status=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log, and carry on whatever happens
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit}s)" | tee -a "$log"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
python -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" 2>&1 | tee -a "$log"

bench=(python scripts/bench_train.py --dtype bf16 --compile --rounds 6 --steps 8 --warmup 3 --profile 15)
for what in "${@:-tests kernels s16 b16 s16-unfused}"; do
    for one in $what; do
        case "$one" in
            tests) part tests 150 python -m pytest -q -m gpu -p no:cacheprovider tests ;;
            kernels) part kernels 120 python scripts/bench_kernels.py ;;
            s16) part s16 300 "${bench[@]}" --model S/16 --batch-size 128 ;;
            b16) part b16 300 "${bench[@]}" --model B/16 --batch-size 128 ;;
            s16-unfused)  # the fused residual add + LayerNorm's effect: ours again, that kernel on PyTorch
                part s16-unfused 240 env MPP_KERNELS_OFF=add_layer_norm "${bench[@]}" --model S/16 --batch-size 128 \
                    --impls ours --output benchmarks/results/train-gpu-s-16-224px-bf16-compile-unfused-add-norm.json ;;
            *) echo "unknown part '$one': use tests, kernels, s16, b16 or s16-unfused" | tee -a "$log"; status=2 ;;
        esac
    done
done

if [ -n "$out" ]; then
    cp benchmarks/results/kernels-*.json benchmarks/results/train-*-bf16-compile*.json "$out"/ 2>/dev/null
fi
exit "$status"
