#!/usr/bin/env bash
# On a one-GPU machine, about 6 minutes: the CUDA tests, nano-vLLM's throughput workload and one replay of this
# tree and of an older commit in the same call (issue 16: the house moved no figure), plus issue 15's re-measure of
# the fused elementwise operators and benchmarks/sustained_gemm.py. Prepare the older tree and the trace here:
#   git archive de98695 | tar x -C gpu_old      (an ignored folder; carry gpu_old and gpu_data)
#   bash benchmarks/gpu_before_after.sh
set -u
root=$PWD
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
echo "=== fused operator rows ($(date +%T))"
PYTHONPATH=. timeout 120 python3 -m twinfer profile --operators --tables rms_norm,rotary,silu_and_mul,sampler \
    --out "$OUT/fused_operators.parquet" 2>&1 | tail -12 | tee "$OUT/fused.log"
echo "=== sustained GEMM ($(date +%T))"
timeout 60 python3 benchmarks/sustained_gemm.py --seconds 3 --out "$OUT/sustained_gemm.json" 2>&1 | tail -40
echo "=== CUDA tests ($(date +%T))"
PYTHONPATH=. timeout 200 python3 -m pytest -q tests/test_kernels.py tests/test_fused_kernels.py tests/test_models.py \
    tests/test_llm.py tests/test_fusion_routing.py 2>&1 | tail -4 | tee "$OUT/cuda_tests.txt"
for side in old new; do
    dir=.; [ $side = old ] && dir=gpu_old
    echo "=== throughput $side ($(date +%T))"
    (cd $dir && PYTHONPATH=. timeout 120 python3 benchmarks/throughput.py --no-transformers --out "$OUT/throughput-$side.json" 2>&1 | grep -v Warn | tail -3)
done
for side in old new; do
    echo "=== replay $side ($(date +%T))"
    if [ $side = old ]; then cmd="python3 -m engine.cli"; dir=gpu_old; else cmd="python3 -m twinfer"; dir=.; fi
    (cd $dir && PYTHONPATH=. timeout 150 $cmd replay "$root/gpu_data/azure_conv_rows3000_5500.csv" --time-scale 0.5 --duration 40 \
        --executor gpu --model qwen3-8b --load-format dummy --dtype bfloat16 --no-progress --out "$OUT/replay-$side" 2>&1 \
        | grep -E "^(Successful|Benchmark duration|Output token throughput|Mean (TTFT|TPOT)|Median|P99 TTFT|run written|Traceback|.*Error)")
done
cd "$OUT" && tar czf replays.tgz replay-old replay-new && rm -rf replay-old replay-new
echo "=== done ($(date +%T))"
