#!/usr/bin/env bash
# On a GPU machine: profile models and replay trace slices on the real executor, in the order given.
# Everything lands under $OUT; simulate and compare afterwards on any machine (see BENCHMARKS.md).
# Usage: bash benchmarks/gpu_fidelity.sh TASK...   with TASK one of
#   profile:MODEL:SECONDS[:SERVING_SECONDS]   replay:MODEL:NAME:SECONDS[:TIME_SCALE]
#   (NAME: azure-conv, mooncake-conv, azure-code; TIME_SCALE replaces the slice's default, for a larger model)
#   (SERVING_SECONDS of the profile's SECONDS go to its serving phase: see simulator/profile.py)
# ENGINE_FLAGS (e.g. --no-mixed-cuda-graphs) go to every profile and replay, PROFILE_FLAGS (e.g. --repeats 2) to profiles.
set -u
OUT=${OUT:-out}
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p "$OUT/profiles" "$OUT/runs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
KEY=$(python3 -c "import torch; from simulator.gpu_specs import gpu_key; print(gpu_key(torch.cuda.get_device_name(0)))")

for task in "$@"; do
    IFS=: read -r kind model a b c <<<"$task"
    echo "=== $task ($(date +%T))"
    if [ "$kind" = profile ]; then
        timeout $((a + 120)) python3 -m twinfer profile --model "$model" --max-seconds "$a" \
            --serving-seconds "${b:-0}" ${ENGINE_FLAGS:-} ${PROFILE_FLAGS:-} --out "$OUT/profiles/${KEY}_${model}_tp1_bfloat16.parquet" 2>&1 | tail -8
    else
        case $a in
            azure-conv) trace=gpu_data/azure_conv_rows3000_5500.csv; shape=(--time-scale 0.2) ;;
            azure-code) trace=gpu_data/azure_code_head1200.csv; shape=(--time-scale 0.12) ;;
            mooncake-conv) trace=gpu_data/mooncake_conv_head400.jsonl; shape=(--time-scale 2) ;;
        esac
        [ -n "${c:-}" ] && shape=(--time-scale "$c")
        # A slice replayed again (the real engine's own spread) lands beside the first: NAME-repeat, -repeat2, ...
        run="$OUT/runs/real-${KEY}-${model}-${a}"
        n=1
        while [ -e "$run" ]; do run="$OUT/runs/real-${KEY}-${model}-${a}-repeat$([ $n -gt 1 ] && echo $n)"; n=$((n + 1)); done
        timeout $((b + 150)) python3 -m twinfer replay "$trace" "${shape[@]}" --duration "$b" --executor gpu \
            --model "$model" --load-format dummy --dtype bfloat16 --no-progress ${ENGINE_FLAGS:-} \
            --out "$run" 2>&1 | grep -v "^\(Mean\|Median\)" | tail -14
    fi
done
echo "=== done ($(date +%T))"
