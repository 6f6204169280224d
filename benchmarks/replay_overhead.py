"""What replay adds per request and per step, next to an engine step (issue 4: negligible).

Queues the whole Azure conversation trace on an engine (token synthesis included) and times it per request;
then times the progress hook that replay calls after every step.

    python benchmarks/replay_overhead.py [--trace PATH]
"""

import argparse
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.engine import Engine
from traces.formats import read_trace
from simulator.trace_requests import add_trace_requests
from twinfer.replay import ReplayProgress

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


class NoExecutor:
    """Nothing runs here: only queueing and the progress hook are timed."""

    num_kv_blocks = 100_000

    def execute(self, scheduler_output):
        raise AssertionError("not called")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    args = parser.parse_args()
    trace = read_trace(args.trace)
    engine = Engine(EngineConfig(max_model_len=32768, num_kv_blocks=100_000), NoExecutor())
    start = time.perf_counter()
    count = add_trace_requests(engine, trace, vocab_size=151936)
    queue_seconds = time.perf_counter() - start
    progress = ReplayProgress(count, enabled=True, description="bench")
    calls = 20_000
    start = time.perf_counter()
    for _ in range(calls):
        progress(engine)
    hook_seconds = (time.perf_counter() - start) / calls
    progress.close(engine)
    print(f"queue {count} requests (tokens included): {queue_seconds:.2f} s, {queue_seconds / count * 1e6:.0f} us per request")
    print(f"progress hook per engine step: {hook_seconds * 1e6:.2f} us (an engine step: 0.3 ms of CPU, several ms of GPU)")


if __name__ == "__main__":
    main()
