# Sourced by the GPU scripts that need flash-attn: installs the wheel that benchmarks/build_flash_attn.sh built,
# carried in .flash/wheel/ (as one file or as its 15 MiB parts), into /tmp/site and puts that on PYTHONPATH
# after the repo root. The machine has no flash-attn of its own and cannot download one.
install_flash_attn_wheel() {
    local folder=${FLASH_WHEEL_DIR:-$PWD/.flash/wheel} wheel first
    wheel=$(ls "$folder"/flash_attn-*.whl 2>/dev/null | head -1)
    if [ -z "$wheel" ]; then
        first=$(ls "$folder"/flash_attn-*.whl.part* 2>/dev/null | head -1)
        [ -n "$first" ] || { echo "no flash_attn wheel (or its parts) in $folder: carry .flash/wheel"; return 1; }
        wheel=/tmp/$(basename "${first%.part*}")
        cat "${first%.part*}".part* > "$wheel" || return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheel" || return 1
    export PYTHONPATH=$PWD:/tmp/site
    python3 -c 'import flash_attn, flash_attn_2_cuda; print("flash_attn", flash_attn.__version__, "at", flash_attn.__file__)'
}
