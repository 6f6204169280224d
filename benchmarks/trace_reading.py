"""Time reading the Azure conversation and Mooncake conversation traces (median of several runs, and cold).

Target: under 1 s each. Usage: python benchmarks/trace_reading.py [--runs N] [--traces DIR]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from traces import read_trace, trace_prompt_token_ids

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces"
FILES = {
    "azure conversation (19,366 rows)": "AzureLLMInferenceTrace_conv.csv",
    "azure code (8,819 rows)": "AzureLLMInferenceTrace_code.csv",
    "mooncake conversation (12,031 rows)": "mooncake_fast25_conversation_trace.jsonl",
    "mooncake synthetic (3,993 rows)": "mooncake_fast25_synthetic_trace.jsonl",
}


def median_seconds(action, runs: int) -> float:
    """Median wall time of `action` over `runs` runs, after one warm-up run."""
    action()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold_seconds(path: Path) -> float:
    """A first read in a fresh interpreter, importing twinfer's traces package included."""
    code = (
        "import time; start = time.perf_counter(); from traces import read_trace; "
        f"read_trace({str(path)!r}); print(time.perf_counter() - start)"
    )
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--traces", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    print(f"{'trace':37s} {'rows':>6s} {'median read':>12s} {'cold read':>10s} {'tokens for all':>15s}")
    for label, file in FILES.items():
        path = args.traces / file
        if not path.exists():
            print(f"{label:37s} missing: {path}")
            continue
        trace = read_trace(path)
        read = median_seconds(lambda: read_trace(path), args.runs)
        # Token synthesis for every prompt, as a replay does before it starts (once: it is the slow part).
        start = time.perf_counter()
        num_tokens = sum(len(ids) for ids in trace_prompt_token_ids(trace, vocab_size=151936))
        tokens = time.perf_counter() - start
        cold = cold_seconds(path)
        print(
            f"{label:37s} {len(trace):6d} {read * 1e3:9.1f} ms {cold * 1e3:7.0f} ms "
            f"{tokens:6.2f} s ({num_tokens / 1e6:.0f}M tokens)"
        )


if __name__ == "__main__":
    main()
