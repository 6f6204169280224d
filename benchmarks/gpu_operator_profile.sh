#!/usr/bin/env bash
# On a one-GPU machine: the operator profile (simulator/operator_profile.py) in one call, about 7 minutes, results
# under $OUT: h200_operators.parquet (well under the device's 16 MiB a file) and operator_profile.log, whose last
# lines are the table of rows and seconds per operator table.
#   bash benchmarks/gpu_operator_profile.sh
# The profile writes its file after every table, so even a run stopped by the timeout leaves what it measured.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
# NVLink multicast stays off on the shared machines (the all-reduce table runs only where several GPUs are lent).
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
timeout 560 python3 -m twinfer profile --operators --out "$OUT/h200_operators.parquet" --max-seconds 420 2>&1 \
    | tee "$OUT/operator_profile.log"
