"""Narrow flash-attn 2.8.3.post2's source to what engine/kernels/flash_attn_backend.py calls, then check the result.

    python benchmarks/flash_attn_forward_only.py SOURCE_DIR            # patch, then verify
    python benchmarks/flash_attn_forward_only.py SOURCE_DIR --verify   # verify an already patched tree

The backend (and nano-vLLM) call flash_attn_varlen_func and flash_attn_with_kvcache forward, causal, with
head_dim 128 (Qwen3, Qwen2.5 and Llama-3, see engine/presets), fp16 or bf16, without dropout, ALiBi,
softcapping, sliding windows or keys appended to the cache. The full package compiles 73 CUDA files for four
architectures; this keeps the 8 forward files of head_dim 128 for sm90, switches off the variants that
flash-attn's own FLASHATTENTION_DISABLE_* macros switch off, and turns every entry point that would need a
dropped kernel into a clear error at call time (the extension then has no undefined kernel symbol to trip
over when it loads). Every edit fails loudly if its target text is not where flash-attn 2.8.3.post2 has it.
"""

import argparse
import re
import sys
from pathlib import Path

VERSION = "2.8.3.post2"
HEAD_DIM = 128
DTYPES = ("fp16", "bf16")
CUTLASS_TYPES = {"fp16": "cutlass::half_t", "bf16": "cutlass::bfloat16_t"}
BUILD_NOTE = "twinfer's forward-only build of flash-attn (benchmarks/build_flash_attn.sh)"

# flash-attn's own switches (csrc/flash_attn/src/static_switch.h, flash_api.cpp): each one compiles a
# variant out and makes flash_api.cpp refuse the feature at call time.
DISABLE_MACROS = ("BACKWARD", "DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K", "LOCAL")


def kept_sources() -> list[str]:
    """flash_api.cpp and the forward kernels of head_dim 128: plain and split-KV, each dtype, causal or not."""
    files = ["csrc/flash_attn/flash_api.cpp"]
    for kind in ("fwd", "fwd_split"):
        for dtype in DTYPES:
            for causal in ("", "_causal"):
                files.append(f"csrc/flash_attn/src/flash_{kind}_hdim{HEAD_DIM}_{dtype}{causal}_sm80.cu")
    return files


class Patch:
    """One text replacement in one file of the source tree; refuses to apply unless its target occurs once."""

    def __init__(self, path: str, old: str, new: str, why: str):
        self.path, self.old, self.new, self.why = path, old, new, why

    def apply(self, root: Path) -> None:
        """Replace the target text, or exit naming the file and the edit whose target was not found once."""
        file = root / self.path
        text = file.read_text()
        count = text.count(self.old)
        if count != 1:
            sys.exit(f"patch failed: {self.path}: target of '{self.why}' found {count} times (expected once); "
                     f"is this flash-attn {VERSION}?")
        file.write_text(text.replace(self.old, self.new))
        print(f"patched {self.path}: {self.why}")


def setup_sources_block(text: str) -> str:
    """The CUDA extension's `sources=[...]` list in setup.py, exactly as written there."""
    match = re.search(r'\n( *)sources=\[\n *"csrc/flash_attn/flash_api\.cpp",\n.*?\n\1\],', text, re.S)
    if match is None:
        sys.exit("patch failed: setup.py: the CUDA extension's sources list starting with flash_api.cpp is missing")
    return match.group(0)


def patches(root: Path) -> list[Patch]:
    """The edits, in order; the sources edit reads setup.py to take its list verbatim."""
    setup_text = (root / "setup.py").read_text()
    old_sources = setup_sources_block(setup_text)
    indent = re.match(r"\n( *)sources", old_sources).group(1)
    new_sources = f"\n{indent}sources=[\n" + "".join(
        f'{indent}    "{name}",\n' for name in kept_sources()) + f"{indent}],"
    flags = ", ".join(f'"-DFLASHATTENTION_DISABLE_{name}"' for name in DISABLE_MACROS)
    off_switch = (
        "\n// twinfer: a switch whose condition this build never meets (its callers refuse it first).\n"
        "#define TWINFER_FALSE_SWITCH(COND, CONST_NAME, ...) \\\n"
        "  [&] {                                         \\\n"
        "    constexpr static bool CONST_NAME = false;   \\\n"
        "    return __VA_ARGS__();                       \\\n"
        "  }()\n"
    )
    return [
        Patch("setup.py", 'os.getenv("FLASH_ATTN_CUDA_ARCHS", "80;90;100;120")',
              'os.getenv("FLASH_ATTN_CUDA_ARCHS", "90")', "sm90 only unless FLASH_ATTN_CUDA_ARCHS says otherwise"),
        Patch("setup.py", "from wheel.bdist_wheel import bdist_wheel as _bdist_wheel",
              "try:  # setuptools has carried bdist_wheel since 70.1; wheel's own module is a shim or gone\n"
              "    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel\n"
              "except ImportError:\n"
              "    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel",
              "bdist_wheel from setuptools where it has one"),
        Patch("setup.py", old_sources, new_sources, "compile only the head_dim 128 forward kernels"),
        # flash_api.cpp is compiled by the host compiler: its checks need the macros as much as the kernels do.
        Patch("setup.py", '    compiler_c17_flag=["-O3", "-std=c++17"]\n',
              '    compiler_c17_flag=["-O3", "-std=c++17"]\n'
              f"    twinfer_forward_only = [{flags}]\n"
              "    nvcc_flags += twinfer_forward_only\n"
              "    compiler_c17_flag += twinfer_forward_only\n",
              "FLASHATTENTION_DISABLE_* for the host and device compilers"),
        Patch("csrc/flash_attn/src/static_switch.h",
              "    if (HEADDIM <= 32) {                   \\\n"
              "      constexpr static int kHeadDim = 32;  \\\n"
              "      return __VA_ARGS__();                \\\n"
              "    } else if (HEADDIM <= 64) {            \\\n"
              "      constexpr static int kHeadDim = 64;  \\\n"
              "      return __VA_ARGS__();                \\\n"
              "    } else if (HEADDIM <= 96) {            \\\n"
              "      constexpr static int kHeadDim = 96;  \\\n"
              "      return __VA_ARGS__();                \\\n"
              "    } else if (HEADDIM <= 128) {           \\\n"
              "      constexpr static int kHeadDim = 128; \\\n"
              "      return __VA_ARGS__();                \\\n"
              "    } else if (HEADDIM <= 192) {           \\\n"
              "      constexpr static int kHeadDim = 192; \\\n"
              "      return __VA_ARGS__();                \\\n"
              "    } else if (HEADDIM <= 256) {           \\\n"
              "      constexpr static int kHeadDim = 256; \\\n"
              "      return __VA_ARGS__();                \\\n"
              "    }                                      \\\n",
              f'    TORCH_CHECK(HEADDIM == {HEAD_DIM}, "{BUILD_NOTE} has kernels for head_dim {HEAD_DIM} only, "  \\\n'
              '                "not ", HEADDIM);          \\\n'
              f"    constexpr static int kHeadDim = {HEAD_DIM};  \\\n"
              "    return __VA_ARGS__();                \\\n",
              f"HEADDIM_SWITCH: head_dim {HEAD_DIM} only, any other is a clear error"),
        Patch("csrc/flash_attn/src/static_switch.h", "\n#define FP16_SWITCH(COND, ...)",
              off_switch + "\n#define FP16_SWITCH(COND, ...)", "TWINFER_FALSE_SWITCH for appended keys"),
        Patch("csrc/flash_attn/flash_api.cpp",
              "void run_mha_bwd(Flash_bwd_params &params, cudaStream_t stream) {\n"
              "    FP16_SWITCH(!params.is_bf16, [&] {\n"
              "        HEADDIM_SWITCH(params.d, [&] {\n"
              "            BOOL_SWITCH(params.is_causal, Is_causal, [&] {\n"
              "                run_mha_bwd_<elem_type, kHeadDim, Is_causal>(params, stream);\n"
              "            });\n"
              "        });\n"
              "    });\n"
              "}\n",
              "void run_mha_bwd(Flash_bwd_params &params, cudaStream_t stream) {\n"
              f'    TORCH_CHECK(false, "{BUILD_NOTE} is built forward-only: it has no backward kernels");\n'
              "}\n",
              "run_mha_bwd: an error, referencing no backward kernel"),
        Patch("csrc/flash_attn/flash_api.cpp",
              "    if (k_.has_value()) {\n"
              '        TORCH_CHECK(v_.has_value(), "If key is supplied, value must also be passed in");\n',
              "    if (k_.has_value()) {\n"
              f'        TORCH_CHECK(false, "{BUILD_NOTE} cannot append new keys/values (k, v) to the cache; "\n'
              '                    "write the cache first and call flash_attn_with_kvcache without k and v");\n'
              '        TORCH_CHECK(v_.has_value(), "If key is supplied, value must also be passed in");\n',
              "mha_fwd_kvcache: appending k/v is an error"),
        Patch("csrc/flash_attn/src/flash_fwd_launch_template.h",
              "                    BOOL_SWITCH(params.knew_ptr != nullptr, Append_KV, [&] {\n",
              "                    TWINFER_FALSE_SWITCH(params.knew_ptr != nullptr, Append_KV, [&] {\n",
              "split-KV kernels without the Append_KV variant"),
        Patch("csrc/flash_attn/src/flash_fwd_launch_template.h",
              "    constexpr static int Headdim = 128;\n"
              "    auto [cc_major, cc_minor] = get_compute_capability(get_current_device());\n"
              "    bool is_sm8x = cc_major == 8 && cc_minor > 0;\n"
              "    DROPOUT_SWITCH(params.p_dropout < 1.f, Is_dropout, [&] {\n"
              "        if constexpr(!Is_dropout) {\n"
              "            // For sm86 or sm89, 64 x 64 is the fastest for causal (because it's square),\n"
              "            // and 128 x 32 (48 KB smem) is the fastest for non-causal since we get 2 CTAs per SM.\n"
              "            if (is_sm8x) {\n",
              "    constexpr static int Headdim = 128;\n"
              "    constexpr static bool is_sm8x = false;  // twinfer: built for sm90, which takes the 128 x 64 tiles\n"
              "    DROPOUT_SWITCH(params.p_dropout < 1.f, Is_dropout, [&] {\n"
              "        if constexpr(!Is_dropout) {\n"
              "            // For sm86 or sm89, 64 x 64 is the fastest for causal (because it's square),\n"
              "            // and 128 x 32 (48 KB smem) is the fastest for non-causal since we get 2 CTAs per SM.\n"
              "            if constexpr (is_sm8x) {\n",
              "head_dim 128 forward without the sm86/sm89 tile shapes"),
        # The H200 check of session 10 found a head_dim-64 call not refused by the switch's TORCH_CHECK (the build's
        # self-check crashed there): the package says what it holds, and twinfer's backend refuses other head dims
        # before any call (engine/kernels/flash_attn_backend.py).
        Patch("flash_attn/__init__.py", f'__version__ = "{VERSION}"\n',
              f'__version__ = "{VERSION}"\n'
              f"# {BUILD_NOTE}: forward kernels of these head dims only.\n"
              f"TWINFER_HEAD_DIMS = ({HEAD_DIM},)\n",
              "the package names the head dims it has kernels for"),
    ]


def fail(message: str) -> None:
    """Exit with a verification error."""
    sys.exit(f"verify failed: {message}")


def verify(root: Path) -> None:
    """Check that the patched tree compiles just the kept files and references only kernels they define."""
    setup_text = (root / "setup.py").read_text()
    listed = re.findall(r'"(csrc/[^"]+)"', setup_sources_block(setup_text))
    if listed != kept_sources():
        fail(f"setup.py's CUDA sources are {listed}, not the kept {kept_sources()}")
    for name in listed:
        if not (root / name).is_file():
            fail(f"{name} is listed in setup.py but missing")
    if '"FLASH_ATTN_CUDA_ARCHS", "90"' not in setup_text:
        fail("setup.py does not default to sm90 only")
    for name in DISABLE_MACROS:
        if f"-DFLASHATTENTION_DISABLE_{name}" not in setup_text:
            fail(f"setup.py does not pass -DFLASHATTENTION_DISABLE_{name}")
    print("kept sources (setup.py's CUDA extension):")
    for name in listed:
        print(f"  {name}")

    # What the kept .cu files define: explicit specialisations and instantiations of the two dispatchers.
    defined = set()
    for name in listed[1:]:
        text = (root / name).read_text()
        if "flash_bwd_launch_template.h" in text:
            fail(f"{name} includes the backward launch template")
        for kind, dtype, dim, causal in re.findall(
                r"(run_mha_fwd_|run_mha_fwd_splitkv_dispatch)<(cutlass::\w+), (\d+), (true|false)>", text):
            defined.add((kind, dtype, int(dim), causal == "true"))
    needed = {(kind, CUTLASS_TYPES[dtype], HEAD_DIM, causal) for kind in ("run_mha_fwd_", "run_mha_fwd_splitkv_dispatch")
              for dtype in DTYPES for causal in (False, True)}
    if defined != needed:
        fail(f"the kept files define {sorted(defined)}, the dispatch needs {sorted(needed)}")

    # What the switches let flash_api.cpp reference: every (dtype, head dim, causal) the macros can produce.
    switch = (root / "csrc/flash_attn/src/static_switch.h").read_text()
    head_dims = {int(d) for d in re.findall(r"constexpr static int kHeadDim = (\d+);", switch)}
    if head_dims != {HEAD_DIM}:
        fail(f"HEADDIM_SWITCH can still produce head dims {sorted(head_dims)}")
    fp16_block = switch[switch.index("#define FP16_SWITCH"):switch.index("#define HEADDIM_SWITCH")]
    if set(re.findall(r"using elem_type = (cutlass::\w+);", fp16_block)) != set(CUTLASS_TYPES.values()):
        fail("FP16_SWITCH does not produce exactly fp16 and bf16")
    for name in DISABLE_MACROS[1:]:  # BACKWARD is checked in flash_api.cpp, the others switch kernels off
        if f"#ifdef FLASHATTENTION_DISABLE_{name}" not in switch:
            fail(f"static_switch.h has no FLASHATTENTION_DISABLE_{name} branch")

    api = (root / "csrc/flash_attn/flash_api.cpp").read_text()
    uses = sorted(set(re.findall(r"\brun_mha_\w+(?:<[^>]*>)?", api)))
    print("run_mha_* uses in the patched flash_api.cpp:")
    for use in uses:
        print(f"  {use}")
    templated = {u for u in uses if "<" in u}
    if templated != {"run_mha_fwd_<elem_type, kHeadDim, Is_causal>",
                     "run_mha_fwd_splitkv_dispatch<elem_type, kHeadDim, Is_causal>"}:
        fail(f"flash_api.cpp references kernel templates {sorted(templated)}")
    body = api[api.index("void run_mha_bwd("):]
    body = body[:body.index("\n}\n")]
    if "run_mha_bwd_" in body or "TORCH_CHECK(false" not in body:
        fail("run_mha_bwd still dispatches to backward kernels")
    launch = (root / "csrc/flash_attn/src/flash_fwd_launch_template.h").read_text()
    if "BOOL_SWITCH(params.knew_ptr" in launch or "if constexpr (is_sm8x)" not in launch:
        fail("flash_fwd_launch_template.h still compiles the Append_KV or sm86/sm89 variants")
    print(f"verified: {len(listed) - 1} CUDA files define the {len(needed)} kernel entry points the switches reach")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help=f"flash-attn {VERSION}'s unpacked source folder")
    parser.add_argument("--verify", action="store_true", help="only verify an already patched tree")
    args = parser.parse_args()
    if not (args.source / "setup.py").is_file():
        sys.exit(f"{args.source}: no setup.py here; give the unpacked flash_attn-{VERSION} folder")
    if not args.verify:
        for patch in patches(args.source):
            patch.apply(args.source)
    verify(args.source)


if __name__ == "__main__":
    main()
