#!/usr/bin/env bash
# On the GPU machine, with the wheel from benchmarks/build_flash_attn.sh in .flash/wheel/: the flash-attn backend's
# tests against the real package, then its speed beside the Triton kernels (benchmarks/attention_kernels.py --flash).
#   bash benchmarks/flash_attn_check.sh        (from the repo root; carry .flash/wheel; about 2 minutes)
# Writes $OUT/flash_tests.txt and $OUT/attention_kernels.txt.
set -u -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
source benchmarks/flash_attn_wheel.sh
install_flash_attn_wheel || exit 2
echo "=== flash-attn backend tests ($(date +%T))"
timeout 240 python3 -m pytest -q -rs tests/test_kernels.py -k flash 2>&1 | tail -15 | tee "$OUT/flash_tests.txt"
echo "=== attention kernels, flash-attn beside Triton ($(date +%T))"
timeout 300 python3 benchmarks/attention_kernels.py --flash 2>&1 | grep -v Warn | tee "$OUT/attention_kernels.txt"
echo "=== done ($(date +%T))"
