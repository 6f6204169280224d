"""How fast does a compute-bound GEMM slow down as the card reaches its power cap? (issue 15: composed mixed steps,
GEMM-bound, come out 4-8% short on 8B models and 9-11% on Qwen3-32B, whose mixed steps last 50-300 ms; the operator
profile times each shape in bursts of about a millisecond).

For a few prefill GEMM shapes, after an idle pause, this runs the GEMM back to back for a chain of T milliseconds
(a CUDA graph of 10 calls replayed) and times the whole chain with CUDA events: the chain's mean seconds per call
against a short burst's, per T, with the SM clock read after the chain.

    python3 benchmarks/power_ramp.py [--json OUT]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_gap import sm_clock_mhz  # noqa: E402
from simulator.operator_timing import OperatorTimer  # noqa: E402

# (m, n, k): gate_up at 2,048 prompt tokens of Qwen3-0.6B, Qwen3-8B, Qwen3-32B; Qwen3-32B's down.
SHAPES = [(2048, 6144, 1024), (2048, 24576, 4096), (2048, 51200, 5120), (2048, 5120, 25600)]
CHAIN_MS = (1, 3, 10, 30, 100, 300)
PAUSE_S = 0.3


def measure(shape, calls_per_graph: int = 10) -> list[dict]:
    m, n, k = shape
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(4)]
    torch.nn.functional.linear(a, weights[0])
    torch.cuda.synchronize()
    chain = OperatorTimer(on_cuda=True).chain(lambda i: torch.nn.functional.linear(a, weights[i % len(weights)]),
                                              calls_per_graph)
    time.sleep(PAUSE_S)
    burst = statistics.median(chain(1) for _ in range(5)) / calls_per_graph
    rows = []
    for chain_ms in CHAIN_MS:
        replays = max(1, round(chain_ms / 1e3 / (burst * calls_per_graph)))
        samples, clocks = [], []
        for _ in range(3):
            time.sleep(PAUSE_S)
            samples.append(chain(replays) / (replays * calls_per_graph))
            clocks.append(sm_clock_mhz())
        per_call = statistics.median(samples)
        rows.append({"m": m, "n": n, "k": k, "chain_ms": 1e3 * per_call * replays * calls_per_graph,
                     "burst_s": burst, "per_call_s": per_call, "ratio": per_call / burst,
                     "tflops": 2 * m * n * k / per_call / 1e12, "sm_clock_mhz": clocks[-1]})
        print(f"m={m} n={n} k={k} chain {rows[-1]['chain_ms']:7.1f} ms: {per_call * 1e6:8.1f} us/call "
              f"= {rows[-1]['ratio']:.3f} x burst ({burst * 1e6:.1f} us), {rows[-1]['tflops']:.0f} TFLOP/s, "
              f"SM {clocks[-1]} MHz", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        rows += measure(shape)
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
