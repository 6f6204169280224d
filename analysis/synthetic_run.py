"""A synthetic run with realistic tables, for report benchmarks, tests and demos without an engine.

A small continuous-batching model (whole-prompt prefill, one token per decode, a linear step-time law)
produces requests and steps tables that agree with each other, in the schemas of a real run. It is not
the engine's scheduler: it exists so analysis can be exercised at any size in a fraction of a second.
"""

from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from analysis.run_schema import REQUESTS_SCHEMA, STEPS_SCHEMA


@dataclass(frozen=True)
class StepTimeLaw:
    """Step duration = base + per_prefill_token * prefill tokens + per_decode_seq * decodes + per_context_token * context."""

    base: float = 0.004
    per_prefill_token: float = 6e-5
    per_decode_seq: float = 4e-5
    per_context_token: float = 2e-8

    def duration(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Predicted seconds for one step of this shape."""
        return (
            self.base
            + self.per_prefill_token * prefill_tokens
            + self.per_decode_seq * decode_seqs
            + self.per_context_token * context_tokens
        )


def synthetic_run(
    num_requests: int,
    *,
    request_rate: float = 8.0,
    seed: int = 0,
    law: StepTimeLaw = StepTimeLaw(),
    duration_noise: float = 0.0,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    max_model_len: int = 8192,
    num_kv_blocks: int = 20000,
    block_size: int = 16,
    mean_prompt_len: float = 600.0,
    mean_output_len: float = 120.0,
) -> tuple[pa.Table, pa.Table]:
    """(requests, steps) tables of a Poisson-arrival run; duration_noise multiplies step times by lognormal noise."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / request_rate, num_requests))
    arrivals -= arrivals[0]
    prompt_lens = np.maximum(1, rng.lognormal(np.log(mean_prompt_len) - 0.5, 1.0, num_requests)).astype(np.int64)
    output_lens = np.maximum(1, rng.lognormal(np.log(mean_output_len) - 0.5, 1.0, num_requests)).astype(np.int64)
    rejected = prompt_lens + output_lens > max_model_len
    # Its own generator, so runs with the same seed share the workload whatever the noise.
    noise_rng = np.random.default_rng(seed + 1)

    first_scheduled = np.full(num_requests, np.nan)
    first_token = np.full(num_requests, np.nan)
    finish = np.full(num_requests, np.nan)
    finish[rejected] = arrivals[rejected]
    step_rows: list[tuple] = []
    token_owner: list[np.ndarray] = []
    token_time: list[np.ndarray] = []

    waiting: deque[int] = deque()
    running = np.empty(0, dtype=np.int64)
    generated = np.zeros(num_requests, dtype=np.int64)
    next_arrival = 0
    now = 0.0
    step = 0
    while next_arrival < num_requests or waiting or running.size:
        while next_arrival < num_requests and arrivals[next_arrival] <= now:
            if not rejected[next_arrival]:
                waiting.append(next_arrival)
            next_arrival += 1
        if not waiting and not running.size:
            now = float(arrivals[next_arrival])
            continue
        context = int((prompt_lens[running] + generated[running]).sum())
        blocks_used = int(np.ceil((prompt_lens[running] + generated[running]) / block_size).sum())
        budget = max_num_batched_tokens - running.size
        admitted = []
        while waiting and running.size + len(admitted) < max_num_seqs:
            candidate = waiting[0]
            blocks = int(np.ceil((prompt_lens[candidate] + 1) / block_size))
            if prompt_lens[candidate] > budget or blocks_used + blocks > num_kv_blocks:
                break
            waiting.popleft()
            admitted.append(candidate)
            budget -= int(prompt_lens[candidate])
            blocks_used += blocks
        admitted = np.asarray(admitted, dtype=np.int64)
        prefill_tokens = int(prompt_lens[admitted].sum())
        duration = law.duration(prefill_tokens, running.size, context)
        if duration_noise > 0:
            duration *= float(noise_rng.lognormal(0.0, duration_noise))
        end = now + duration
        step_rows.append(
            (step, now, duration, admitted.size, prefill_tokens, running.size, running.size, context,
             0, float((prompt_lens[admitted] * (prompt_lens[admitted] + 1) / 2).sum()),
             running.size + admitted.size, len(waiting), blocks_used, num_kv_blocks, 0, 0,
             0, prefill_tokens + running.size)
        )
        first_scheduled[admitted] = now
        first_token[admitted] = end
        batch = np.concatenate([running, admitted])
        generated[batch] += 1
        token_owner.append(batch)
        token_time.append(np.full(batch.size, end))
        done = generated[batch] >= output_lens[batch]
        finish[batch[done]] = end
        running = batch[~done]
        now = end
        step += 1

    owners = np.concatenate(token_owner) if token_owner else np.empty(0, np.int64)
    times = np.concatenate(token_time) if token_time else np.empty(0)
    order = np.argsort(owners, kind="stable")
    counts = np.bincount(owners, minlength=num_requests)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    token_times = pa.ListArray.from_arrays(pa.array(offsets), pa.array(times[order]))

    served = ~rejected
    ttft = np.where(served, first_token - arrivals, np.nan)
    e2e = np.where(served, finish - arrivals, np.nan)
    tpot = np.where(served & (output_lens > 1), (e2e - ttft) / np.maximum(output_lens - 1, 1), np.nan)

    def nullable(values: np.ndarray) -> pa.Array:
        return pa.array(values, mask=np.isnan(values))

    requests = pa.table(
        {
            "request_id": pa.array([f"req-{i}" for i in range(num_requests)]),
            "arrival_time": pa.array(arrivals),
            "first_scheduled_time": nullable(first_scheduled),
            "first_token_time": nullable(first_token),
            "finish_time": nullable(finish),
            "prompt_len": pa.array(prompt_lens),
            "output_len": pa.array(np.where(served, output_lens, 0)),
            "max_tokens": pa.array(output_lens),
            "cached_tokens": pa.array(np.zeros(num_requests, np.int64)),
            "num_preemptions": pa.array(np.zeros(num_requests, np.int64)),
            "ttft": nullable(ttft),
            "tpot": nullable(tpot),
            "e2e": nullable(e2e),
            "status": pa.array(np.where(served, "finished", "rejected")),
            "reason": pa.array(np.where(served, "length", "prompt_len + max_tokens exceeds max_model_len")),
            "token_times": token_times,
        },
        schema=REQUESTS_SCHEMA,
    )
    columns = list(zip(*step_rows)) if step_rows else [[] for _ in STEPS_SCHEMA.names]
    steps = pa.table(
        [pa.array(column, type=f.type) for column, f in zip(columns, STEPS_SCHEMA)], schema=STEPS_SCHEMA
    )
    return requests, steps
