"""The engine process's share of a request's way out, on a CPU: from the engine's first token (its clock's stamp,
the server's request log's first_token_time) to that token's delta reaching the server's event loop (the request's
queue, where its stream's chunk is made), through twinfer serve's EngineProcess (the tiny model on the CPU
executor, asynchronous scheduling), while --streams other streams run and send a delta every step. New requests
(--prompt-tokens token ids, two output tokens) come every --every-ms; prints p50, p90 and the minimum in ms. The
rest of the way out (the chunk, the socket, the client) is benchmarks/serve_chunk_cost.py's; the whole of it is
benchmarks/serve_overhead.py's, on a GPU.

    python benchmarks/serve_way_out.py [--requests 60] [--streams 16] [--every-ms 25] [--prompt-tokens 200]
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # serve_way_in's tiny model


class FirstTokenSink:
    """A request's queue that notes when its first delta with tokens reached the event loop, and its end."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.ended = None
        self.done = asyncio.Event()

    def put_nowait(self, delta) -> None:
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if delta.ended is not None or delta.error is not None:
            self.ended = delta.ended
            self.done.set()


async def measure(engine, args) -> list[float]:
    """ms from each new request's first token in the engine to its delta on this loop."""
    from engine.sampling_params import SamplingParams

    engine.start()
    background = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for index in range(args.streams):
        engine.add(f"stream-{index}", [5 + (index + token) % 100 for token in range(64)], background,
                   FirstTokenSink())
    await asyncio.sleep(1.0)  # every stream running
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    sinks = []
    for index in range(args.requests):
        sink = FirstTokenSink()
        engine.add(f"new-{index}", [5 + (index + token) % 100 for token in range(args.prompt_tokens)], params, sink)
        sinks.append(sink)
        await asyncio.sleep(args.every_ms / 1000)
    await asyncio.wait_for(asyncio.gather(*(sink.done.wait() for sink in sinks)), 120)
    for index in range(args.streams):
        engine.abort(f"stream-{index}", "done")
    return [1000 * (sink.first_token_at - (engine.clock_origin + sink.ended.first_token_time)) for sink in sinks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--every-ms", type=float, default=25.0)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    args = parser.parse_args()
    from engine.engine_args import EngineArgs
    from serve_way_in import tiny_model
    from twinfer.serving.engine_process import EngineProcess

    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(Path(folder))
        engine = EngineProcess(EngineArgs(model=model, device="cpu", max_num_batched_tokens=2048, max_model_len=4096,
                                          async_scheduling=True), tokenizer=model, start_timeout=300)
        try:
            times = asyncio.run(measure(engine, args))
        finally:
            engine.close()
    times.sort()
    print(f"engine's first token -> the server's event loop: p50 {statistics.median(times):.3f} ms, "
          f"p90 {times[int(0.9 * (len(times) - 1))]:.3f} ms, min {times[0]:.3f} ms "
          f"({args.requests} requests beside {args.streams} streams)")


if __name__ == "__main__":
    main()
