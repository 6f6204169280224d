#!/usr/bin/env bash
# On a one-GPU machine: the real executor's checks and figures in one call (results under $OUT, a table last).
# CUDA tests (mixed-step CUDA graphs included), the step breakdown with and without mixed-step CUDA graphs, and
# nano-vLLM's throughput workload with transformers and the roofline in the same call, then without mixed graphs.
#   bash benchmarks/gpu_engine_check.sh            (about 8 minutes on an H100)
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -x tests/test_kernels.py tests/test_fused_kernels.py tests/test_models.py 2>&1 \
    | tail -4 | tee "$OUT/cuda_tests.txt"
for mode in "" --no-mixed-cuda-graphs; do
    timeout 200 python3 benchmarks/step_breakdown.py $mode --out "$OUT/breakdown${mode:+-eager-mixed}.json" 2>&1 \
        | grep -v Warn | tail -8
done
timeout 400 python3 benchmarks/throughput.py --out "$OUT/throughput.json" 2>&1 | grep -v Warn | tail -5
timeout 150 python3 benchmarks/throughput.py --no-transformers --no-mixed-cuda-graphs \
    --out "$OUT/throughput-eager-mixed.json" 2>&1 | grep -v Warn | tail -4
