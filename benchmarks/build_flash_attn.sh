#!/usr/bin/env bash
# On the GPU machine (nvcc, torch, 16 cores; nothing downloadable): build flash-attn 2.8.3.post2 forward-only,
# head_dim 128, fp16/bf16, sm90 only, into a wheel that later calls carry instead of rebuilding.
#   bash benchmarks/build_flash_attn.sh        (from the repo root; carry .flash, which holds the source archive
#                                               saved by `FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip download --no-deps
#                                               --no-binary :all: --no-build-isolation -d .flash flash-attn==2.8.3.post2`)
# Unpacks the source to /tmp, narrows it with benchmarks/flash_attn_forward_only.py (which checks every edit and
# then that only compiled kernels are referenced), builds with MAX_JOBS=16 under a hard limit (BUILD_LIMIT_S,
# 510 s), checks that the extension loads, computes and refuses what it lacks, and puts the wheel in $OUT when it
# is under 16 MiB (stripped if needed; else in 15 MiB parts: `cat NAME.part* > NAME`). Log: $OUT/flash_build.log.
set -u -o pipefail
root=$PWD
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
version=2.8.3.post2
archive=$root/.flash/flash_attn-$version.tar.gz
work=/tmp/flash_build
src=$work/flash_attn-$version
limit_bytes=$((16 * 1024 * 1024))
BUILD_LIMIT_S=${BUILD_LIMIT_S:-510}
MAX_JOBS=${MAX_JOBS:-16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
phases=()
t0=$(date +%s)
mark() { local now; now=$(date +%s); phases+=("$(printf '%-10s %5d s' "$1" $((now - t0)))"); t0=$now; }
finish() {
    echo "=== phases"; printf '%s\n' "${phases[@]}"
    echo "=== result: $1"; exit "$2"
}

build() {
echo "=== environment ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvcc --version | tail -2
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
echo "cores $(nproc), memory $(free -g | awk '/Mem/ {print $2}') GiB"
[ -f "$archive" ] || { echo "missing $archive: carry .flash"; finish "no source archive" 2; }

echo "=== unpack"
rm -rf "$work" && mkdir -p "$work" && tar xzf "$archive" -C "$work" || finish "unpack failed" 3
mark unpack

echo "=== patch"
python3 "$root/benchmarks/flash_attn_forward_only.py" "$src" || finish "patch failed" 4
mark patch

echo "=== build (limit ${BUILD_LIMIT_S} s, $MAX_JOBS jobs)"
cd "$src" || finish "no source folder" 5
# FORCE_BUILD: setup.py would otherwise try to download a prebuilt wheel; with an explicit -gencode flag torch's
# cpp_extension adds no arch flags of its own, and TORCH_CUDA_ARCH_LIST says sm90 as well.
FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$MAX_JOBS NVCC_THREADS=1 \
    timeout -k 10 "$BUILD_LIMIT_S" python3 -m pip wheel . --no-deps --no-build-isolation --no-index -v -w "$work/dist"
status=$?
mark build
[ $status -eq 124 ] && finish "build exceeded ${BUILD_LIMIT_S} s (see the compile lines above for the files still running)" 6
[ $status -ne 0 ] && finish "build failed with status $status" 7
wheel=$(ls "$work"/dist/flash_attn-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || finish "no wheel in $work/dist" 8
name=$(basename "$wheel")

echo "=== check the wheel"
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" \
    || finish "wheel does not install" 9
so=$(ls /tmp/site/flash_attn_2_cuda*.so)
ls -l "$wheel" "$so"
if command -v nm >/dev/null && command -v c++filt >/dev/null; then
    undefined=$(nm -D --undefined-only "$so" | c++filt | grep -E 'flash::|run_mha' || true)
    [ -z "$undefined" ] || { echo "$undefined"; finish "the extension references flash-attn symbols it does not define" 10; }
    echo "no undefined flash-attn symbol in $(basename "$so")"
else
    echo "nm or c++filt missing: the import below checks the symbols instead"
fi
cd /tmp && PYTHONPATH=/tmp/site python3 - <<'EOF' || finish "the built extension does not work" 11
import torch
import torch.nn.functional as F
from flash_attn import flash_attn_func, flash_attn_with_kvcache

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    q, k, v = (torch.randn(2, 300, h, 128, dtype=dtype, device="cuda") for h in (16, 8, 8))
    out = flash_attn_func(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    err = (out.float() - ref.float()).abs().max().item()
    assert err < 4e-2, f"{dtype}: max error {err} against torch SDPA"
    print(f"forward {dtype}: max error {err:.1e} against torch SDPA")
    cache = torch.randn(4, 256, 8, 128, dtype=dtype, device="cuda")
    out = flash_attn_with_kvcache(q[:, :1], cache, cache, cache_seqlens=torch.tensor([300, 5], dtype=torch.int32,
                                  device="cuda"), block_table=torch.arange(4, dtype=torch.int32, device="cuda").view(2, 2))
    assert out.isfinite().all(), "paged decode gave non-finite values"
for what, call, expected in [
    ("head_dim 64", lambda: flash_attn_func(*(torch.randn(1, 8, 2, 64, dtype=torch.bfloat16, device="cuda"),) * 3),
     "head_dim 128 only"),
    ("backward", lambda: flash_attn_func(*(torch.randn(1, 8, 2, 128, dtype=torch.bfloat16, device="cuda",
                                                       requires_grad=True),) * 3).sum().backward(), "does not support backward"),
    ("dropout", lambda: flash_attn_func(*(torch.randn(1, 8, 2, 128, dtype=torch.bfloat16, device="cuda"),) * 3,
                                        dropout_p=0.1), "does not support dropout"),
]:
    try:
        call()
    except RuntimeError as error:
        assert expected in str(error), f"{what}: unexpected error {error}"
        print(f"{what}: refused: {str(error).splitlines()[0][:120]}")
    else:
        raise AssertionError(f"{what} ran on a build without its kernels")
EOF
mark check

echo "=== copy to \$OUT"
size=$(stat -c %s "$wheel")
if [ "$size" -gt $limit_bytes ]; then
    echo "wheel is $size bytes, over 16 MiB: stripping the extension's host symbols"
    rm -rf "$work/unpacked" && mkdir -p "$work/unpacked" && python3 -m wheel unpack -d "$work/unpacked" "$wheel" \
        && strip --strip-unneeded "$work"/unpacked/*/flash_attn_2_cuda*.so \
        && mkdir -p "$work/stripped" && python3 -m wheel pack -d "$work/stripped" "$work"/unpacked/* \
        && wheel=$(ls "$work"/stripped/*.whl) && size=$(stat -c %s "$wheel")
fi
if [ "$size" -le $limit_bytes ]; then
    cp "$wheel" "$OUT/$name"
    echo "wheel: $name, $size bytes ($((size / 1024)) KiB), in \$OUT"
else
    split -b 15M -d "$wheel" "$OUT/$name.part"
    echo "wheel: $name, $size bytes, in 15 MiB parts: cat $name.part* > $name"
fi
mark copy
finish "built $name ($size bytes)" 0
}

build 2>&1 | tee "$OUT/flash_build.log"
exit "${PIPESTATUS[0]}"
