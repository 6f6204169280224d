"""Runs made by the real engine for the analysis tests: a random Poisson workload on a test executor.

The engine schedules (chunked prefill, preemption when its KV cache runs short, rejection of requests
too long for max_model_len), PredictingExecutor answers with durations that depend on the batch, and a
virtual clock keeps it deterministic and fast. The tables are those a replay stores.
"""

import numpy as np
import pyarrow as pa

from analysis.run_schema import requests_table, steps_table
from engine.clock import VirtualClock
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from tests.fake_executor import PredictingExecutor


def engine_run(
    num_requests: int,
    *,
    request_rate: float = 20.0,
    seed: int = 0,
    mean_prompt_len: float = 600.0,
    mean_output_len: float = 120.0,
    max_model_len: int = 4096,
    num_kv_blocks: int = 1024,
    block_size: int = 16,
) -> tuple[pa.Table, pa.Table]:
    """(requests, steps) of the engine serving num_requests Poisson arrivals with lognormal lengths.

    Half the prompts start with one of four shared 128-token prefixes (prefix-cache hits). The lengths'
    long tails make a few requests too long for max_model_len (rejected), and at the defaults bursts of
    long prompts fill the KV cache (preemptions).
    """
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / request_rate, num_requests))
    arrivals -= arrivals[0]
    prompt_lens = np.maximum(1, rng.lognormal(np.log(mean_prompt_len) - 0.5, 1.0, num_requests)).astype(int)
    output_lens = np.maximum(1, rng.lognormal(np.log(mean_output_len) - 0.5, 1.0, num_requests)).astype(int)
    prefixes = rng.integers(0, 32000, (4, 128))
    shared = rng.random(num_requests) < 0.5
    config = EngineConfig(block_size=block_size, max_model_len=max_model_len, num_kv_blocks=num_kv_blocks,
                          max_num_seqs=256, max_num_batched_tokens=2048)
    engine = Engine(config, PredictingExecutor(num_kv_blocks, block_size), VirtualClock())
    for index in range(num_requests):
        prompt = rng.integers(0, 32000, prompt_lens[index])
        if shared[index]:
            prompt[:128] = prefixes[index % 4][: prompt_lens[index]]
        engine.add_request(
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=int(output_lens[index]), ignore_eos=True),
            arrival_time=float(arrivals[index]),
            request_id=f"req-{index}",
        )
    engine.run()
    return requests_table(list(engine.request_records.values())), steps_table(engine.step_records)
