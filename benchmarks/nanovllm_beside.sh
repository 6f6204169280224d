#!/usr/bin/env bash
# On the GPU machine: nano-vLLM's own bench.py beside twinfer's benchmarks/throughput.py in one call, each as a
# ratio to the roofline that throughput.py measures in that call (issue 19). Needs flash-attn's wheel from
# benchmarks/build_flash_attn.sh in .flash/wheel/ and nano-vLLM's source in .nanovllm/ (`git archive` of
# github.com/GeeeekExplorer/nano-vllm; .nanovllm/SOURCE names the commit).
#   bash benchmarks/nanovllm_beside.sh         (from the repo root; carry .flash/wheel and .nanovllm; about 4 minutes)
# bench.py runs unmodified but for its model path (one checked sed); its workload (256 sequences, lengths 100..1024,
# seed 0) is the one throughput.py draws. The model folder holds random weights (benchmarks/nanovllm_model_folder.py)
# since the machine has no Hugging Face download. twinfer runs twice: as it is (Triton attention, blocks of 16) and
# with the flash-attn backend (blocks of 256, nano-vLLM's own block size).
# Writes $OUT/nanovllm.txt, $OUT/throughput.json, $OUT/throughput_flash.json and the table, $OUT/beside.txt.
set -u -o pipefail
root=$PWD
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
model=/tmp/nanovllm_model/Qwen3-0.6B
[ -f .nanovllm/bench.py ] || { echo "no .nanovllm/bench.py: carry .nanovllm"; exit 2; }
source benchmarks/flash_attn_wheel.sh
install_flash_attn_wheel || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv

echo "=== model folder ($(date +%T))"
timeout 120 python3 benchmarks/nanovllm_model_folder.py "$model" 2>&1 | grep -v Warn || exit 3

echo "=== nano-vLLM bench.py ($(date +%T))"
old='os.path.expanduser("~/huggingface/Qwen3-0.6B/")'
new="os.path.expanduser(\"$model/\")"
[ "$(grep -cF "$old" .nanovllm/bench.py)" = 1 ] || { echo "bench.py: model path $old not found once"; exit 4; }
cp .nanovllm/bench.py /tmp/nanovllm_bench.py
sed -i "s|~/huggingface/Qwen3-0.6B/|$model/|" /tmp/nanovllm_bench.py
[ "$(grep -cF "$new" /tmp/nanovllm_bench.py)" = 1 ] || { echo "bench.py: the model path edit did not apply"; exit 4; }
{
    echo "nano-vLLM: $(cat .nanovllm/SOURCE 2>/dev/null || echo 'source commit not recorded')"
    echo "bench.py as run, against the original:"
    diff .nanovllm/bench.py /tmp/nanovllm_bench.py
    (cd /tmp && PYTHONPATH="$root/.nanovllm:/tmp/site" timeout 300 python3 /tmp/nanovllm_bench.py 2>&1 | grep -v Warn)
} 2>&1 | tee "$OUT/nanovllm.txt"

echo "=== twinfer throughput.py ($(date +%T))"
timeout 200 python3 benchmarks/throughput.py --no-transformers --out "$OUT/throughput.json" 2>&1 | grep -v Warn | tail -5
echo "=== twinfer, flash-attn backend ($(date +%T))"
timeout 150 python3 -c "from twinfer.throughput_benchmark import run_throughput
run_throughput(with_transformers=False, attention_backend='flash-attn', block_size=256, out='$OUT/throughput_flash.json')" \
    2>&1 | grep -v Warn | tail -5

echo "=== table ($(date +%T))"
python3 - "$OUT" <<'EOF' | tee "$OUT/beside.txt"
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
main = json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").exists() else None
if main is None:
    sys.exit("no throughput.json: throughput.py failed, so there is no roofline to set the engines against")
roofline = main["roofline"]
roof = roofline["tokens_per_second"]
print(f"GPU: {main['gpu']}; Qwen3-0.6B, dummy weights, bf16; nano-vLLM's workload ({main['num_seqs']} sequences, "
      f"{main['output_tokens']:,} output tokens)")
print(f"roofline measured in this call: copy {roofline['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
      f"matmul {roofline['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s -> {roof:,.0f} tok/s")
rows = []
found = re.search(r"Total: (\d+)tok, Time: ([\d.]+)s, Throughput: ([\d.]+)tok/s", (out / "nanovllm.txt").read_text())
rows.append(("nano-vLLM bench.py (flash-attn)", float(found.group(3)) if found else None))
rows.append((f"twinfer ({main['twinfer']['attention_backend']})", main["twinfer"]["tokens_per_second"]))
flash = out / "throughput_flash.json"
flash_result = json.loads(flash.read_text()) if flash.exists() else None
rows.append(("twinfer (flash-attn, blocks of 256)", flash_result["twinfer"]["tokens_per_second"] if flash_result else None))
print(f"{'engine':<38}{'output tok/s':>14}{'% of roofline':>16}")
for name, rate in rows:
    print(f"{name:<38}" + (f"{rate:>14,.0f}{100 * rate / roof:>15.1f}%" if rate else f"{'failed':>14}{'':>16}"))
print(f"{'roofline':<38}{roof:>14,.0f}{100.0:>15.1f}%")
if found and int(found.group(1)) != main["output_tokens"]:
    print(f"note: nano-vLLM's workload has {int(found.group(1)):,} output tokens, throughput.py's {main['output_tokens']:,}")
if flash_result:
    print(f"(the flash-attn row's own call measured a roofline of {flash_result['roofline']['tokens_per_second']:,.0f} tok/s)")
EOF
echo "=== done ($(date +%T))"
