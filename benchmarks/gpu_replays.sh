#!/usr/bin/env bash
# On a GPU machine: replay trace slices on the real engine (dummy weights), one run folder per task, all
# packed into $OUT/runs-TAG.tgz (the device returns few files). Usage:
#   bash benchmarks/gpu_replays.sh TAG TASK...     TASK = MODEL:CASE:SECONDS
# CASE: azure-conv (gpu_data/azure_conv_rows3000_5500.csv at the model's time scale) or sharegpt (Vidur's
# ShareGPT length table, gpu_data/sharegpt_8k.csv, Poisson arrivals at the model's rate); the loads per model
# are in benchmarks/composed_validation.py, which simulates and scores the same cases afterwards.
set -u
OUT=${OUT:-out}
tag=$1; shift
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p "runs-$tag"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "runs-$tag/gpu.txt"
for task in "$@"; do
    IFS=: read -r model case seconds <<<"$task"
    load=$(python3 benchmarks/composed_validation.py --print-load "$model" "$case") || exit 1
    run="runs-$tag/real-$model-$case"
    echo "=== $task: $load ($(date +%T))"
    # shellcheck disable=SC2086
    timeout $((seconds + 200)) python3 -m twinfer replay $load --duration "$seconds" --executor gpu \
        --model "$model" --load-format dummy --dtype bfloat16 --no-progress --out "$run" 2>&1 \
        | grep -E "^(Successful|Benchmark duration|Output token throughput|Mean (TTFT|TPOT)|run written|Traceback|.*Error)" 
done
tar czf "$OUT/runs-$tag.tgz" "runs-$tag"
echo "=== done ($(date +%T))"
