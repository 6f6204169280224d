# Sourced by the GPU scripts that need flash-attn: installs the wheel that benchmarks/build_flash_attn.sh built into
# /tmp/site and puts that on PYTHONPATH after the repo root. The wheel is looked for in .flash/wheel/ (carried; as
# one file or as its 15 MiB parts), then in /tmp/flash_build/dist/ (left by a build on this machine while it stays
# warm). The machine has no flash-attn of its own and cannot download one.
install_flash_attn_wheel() {
    local folder wheel="" first
    for folder in "${FLASH_WHEEL_DIR:-$PWD/.flash/wheel}" /tmp/flash_build/dist; do
        wheel=$(ls "$folder"/flash_attn-*.whl 2>/dev/null | head -1)
        [ -n "$wheel" ] && break
        first=$(ls "$folder"/flash_attn-*.whl.part* 2>/dev/null | head -1)
        if [ -n "$first" ]; then
            wheel=/tmp/$(basename "${first%.part*}")
            cat "${first%.part*}".part* > "$wheel" || return 1
            break
        fi
    done
    [ -n "$wheel" ] || { echo "no flash_attn wheel in .flash/wheel or /tmp/flash_build/dist: carry .flash/wheel"; return 1; }
    echo "installing $wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheel" || return 1
    export PYTHONPATH=$PWD:/tmp/site
    python3 -c 'import flash_attn, flash_attn_2_cuda; print("flash_attn", flash_attn.__version__, "at", flash_attn.__file__)'
}
