"""Synthetic workloads with vLLM's random-dataset knobs and SGLang's generated-shared-prefix knobs."""

from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa

from traces.arrivals import AllAtOnce, ArrivalProcess
from traces.schema import Trace
from traces.trace_builder import build_trace

DEFAULT_HASH_BLOCK_SIZE = 16
"""Shared prefixes are described in blocks of vLLM's default KV block size, so every shareable KV block is."""


def random_workload(
    *,
    num_prompts: int,
    input_len: int = 1024,
    output_len: int = 128,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    arrivals: ArrivalProcess | None = None,
    seed: int = 0,
    hash_block_size: int = DEFAULT_HASH_BLOCK_SIZE,
) -> Trace:
    """vLLM's random dataset: lengths uniform in [len*(1-range_ratio), len*(1+range_ratio)], after a shared prefix."""
    _positive(num_prompts=num_prompts, input_len=input_len, output_len=output_len, hash_block_size=hash_block_size)
    _non_negative(prefix_len=prefix_len)
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio!r}")
    arrivals = arrivals or AllAtOnce()
    rng = np.random.default_rng(seed)
    prompt_len = prefix_len + _uniform_lengths(rng, input_len, range_ratio, num_prompts)
    output = _uniform_lengths(rng, output_len, range_ratio, num_prompts)
    prefix_blocks = list(range(prefix_len // hash_block_size))
    prefix_ids = pa.array([prefix_blocks or None] * num_prompts, pa.list_(pa.int64()))
    return build_trace(
        source=None,
        arrival_time=arrivals.arrival_times(num_prompts, seed),
        prompt_len=prompt_len,
        output_len=output,
        prefix_block_ids=prefix_ids,
        name=f"random-{num_prompts}x{input_len}-{output_len}",
        source_format="synthetic",
        hash_block_size=hash_block_size,
        notes=[
            f"random workload: input_len={input_len} output_len={output_len} range_ratio={range_ratio} "
            f"prefix_len={prefix_len} arrivals={arrivals} seed={seed}"
        ],
    )


def shared_prefix_workload(
    *,
    num_groups: int = 64,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
    arrivals: ArrivalProcess | None = None,
    seed: int = 0,
    hash_block_size: int = DEFAULT_HASH_BLOCK_SIZE,
) -> Trace:
    """SGLang's generated-shared-prefix: groups sharing a system prompt, each prompt adding its own question."""
    _positive(
        num_groups=num_groups,
        prompts_per_group=prompts_per_group,
        question_len=question_len,
        output_len=output_len,
        hash_block_size=hash_block_size,
    )
    _non_negative(system_prompt_len=system_prompt_len)
    arrivals = arrivals or AllAtOnce()
    count = num_groups * prompts_per_group
    blocks_per_group = system_prompt_len // hash_block_size
    group = np.repeat(np.arange(num_groups), prompts_per_group)
    member = np.tile(np.arange(prompts_per_group), num_groups)
    # Interleave the groups as SGLang's benchmark shuffles its requests, so sharing spans time, not a burst.
    order = np.random.default_rng(seed).permutation(count)
    group, member = group[order], member[order]
    prefix_ids = pa.array(
        [list(range(g * blocks_per_group, (g + 1) * blocks_per_group)) or None for g in group],
        pa.list_(pa.int64()),
    )
    return build_trace(
        source=None,
        arrival_time=arrivals.arrival_times(count, seed),
        prompt_len=np.full(count, system_prompt_len + question_len, dtype=np.int64),
        output_len=np.full(count, output_len, dtype=np.int64),
        prefix_block_ids=prefix_ids,
        session_id=pa.array([f"group-{g}" for g in group], pa.string()),
        request_id=pa.array([f"{g}-{m}" for g, m in zip(group, member)], pa.string()),
        name=f"shared-prefix-{num_groups}x{prompts_per_group}",
        source_format="synthetic",
        hash_block_size=hash_block_size,
        notes=[
            f"shared-prefix workload: num_groups={num_groups} prompts_per_group={prompts_per_group} "
            f"system_prompt_len={system_prompt_len} question_len={question_len} output_len={output_len} "
            f"arrivals={arrivals} seed={seed}"
        ],
    )


SPEC_FORMS = (
    "random:num_prompts=N[,input_len=N,output_len=N,range_ratio=F,prefix_len=N] or "
    "shared-prefix:[num_groups=N,prompts_per_group=N,system_prompt_len=N,question_len=N,output_len=N]"
)


def is_workload_spec(text: str) -> bool:
    """Whether a trace argument names a synthetic workload rather than a file."""
    return isinstance(text, str) and text.split(":", 1)[0] in ("random", "shared-prefix")


def workload_from_spec(spec: str, *, arrivals: ArrivalProcess | None = None, seed: int = 0) -> Trace:
    """The workload a command-line spec describes, e.g. random:num_prompts=100,input_len=512,range_ratio=0.5."""
    kind, _, body = spec.partition(":")
    builders = {"random": random_workload, "shared-prefix": shared_prefix_workload}
    if kind not in builders:
        raise ValueError(f"unknown workload {spec!r}; forms: {SPEC_FORMS}")
    knobs: dict[str, float | int] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise ValueError(f"workload {spec!r}: expected key=value, got {item!r}; forms: {SPEC_FORMS}")
        try:
            knobs[key] = float(value) if key == "range_ratio" else int(value)
        except ValueError:
            raise ValueError(f"workload {spec!r}: {key} must be a number, got {value!r}") from None
    try:
        return builders[kind](**knobs, arrivals=arrivals, seed=seed)
    except TypeError as error:
        allowed = sorted(set(inspect.signature(builders[kind]).parameters) - {"arrivals", "seed"})
        problem = str(error).split("() ", 1)[-1]
        raise ValueError(f"workload {spec!r}: {problem}; {kind} takes {', '.join(allowed)}") from None


def _uniform_lengths(rng: np.random.Generator, length: int, range_ratio: float, count: int) -> np.ndarray:
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=count, dtype=np.int64)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
