"""CPU time per engine step with a trivial executor: 256 decoding sequences, and a mixed step with a
2048-token prefill chunk. Target: <= 0.5 ms per decode step at 256 sequences (issue 2)."""

import argparse
import json
import statistics
import time

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.scheduler_output import SchedulerOutput, StepResult


class ConstantTokenExecutor:
    """Returns token 1 for every sampling sequence, instantly: all that is left is the engine's own time."""

    def __init__(self, num_kv_blocks: int) -> None:
        self.num_kv_blocks = num_kv_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        sampled = {seq.seq_id: 1 for seq in scheduler_output.sequences if seq.samples}
        return StepResult(sampled_token_ids=sampled, duration=0.001)


def _finish_prefills(engine: Engine) -> None:
    """Step until every prompt is computed, so that what is timed next is decoding."""
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.sequences.values()):
        engine.step()


def _timed_step(engine: Engine) -> float:
    """The CPU time of one engine step, in ms."""
    start = time.process_time_ns()
    engine.step()
    return (time.process_time_ns() - start) / 1e6


def decode_steps(num_seqs: int, prompt_len: int, num_steps: int) -> list[float]:
    config = EngineConfig(max_model_len=8192, max_num_seqs=num_seqs, max_num_batched_tokens=8192, num_kv_blocks=40000)
    engine = Engine(config, ConstantTokenExecutor(40000))
    params = SamplingParams(max_tokens=num_steps + 1000, ignore_eos=True)
    for _ in range(num_seqs):
        engine.add_request(prompt_len=prompt_len, sampling_params=params, arrival_time=0.0)
    _finish_prefills(engine)
    times = [_timed_step(engine) for _ in range(num_steps)]
    assert all(rec.num_decode_seqs == num_seqs for rec in engine.step_records[-num_steps:])
    return times


def mixed_steps(num_decodes: int, chunk: int, num_steps: int) -> list[float]:
    config = EngineConfig(max_model_len=32768, max_num_seqs=num_decodes + 1,
                          max_num_batched_tokens=num_decodes + chunk, num_kv_blocks=60000)
    engine = Engine(config, ConstantTokenExecutor(60000))
    params = SamplingParams(max_tokens=20000, ignore_eos=True)
    for _ in range(num_decodes):
        engine.add_request(prompt_len=512, sampling_params=params, arrival_time=0.0)
    _finish_prefills(engine)
    # A long prompt keeps arriving chunk by chunk beside the decodes.
    engine.add_request(prompt_len=chunk * (num_steps + 2), sampling_params=SamplingParams(max_tokens=1000, ignore_eos=True))
    engine.step()
    times = []
    for _ in range(num_steps):
        times.append(_timed_step(engine))
        record = engine.step_records[-1]
        assert record.num_prefill_tokens == chunk and record.num_decode_seqs == num_decodes, record
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    decode = decode_steps(256, 1024, args.steps)
    mixed = mixed_steps(255, 2048, min(args.steps, 10))
    result = {
        "decode_256_median_ms": statistics.median(decode),
        "decode_256_p90_ms": statistics.quantiles(decode, n=10)[-1],
        "mixed_255_decodes_plus_2048_prefill_median_ms": statistics.median(mixed),
    }
    for name, value in result.items():
        print(f"{name:50s} {value:8.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
