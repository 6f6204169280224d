"""GPU profiling: time the real executor over a grid of batch shapes and store each step like steps.parquet.

The grid covers prefills (with and without cached context, one or several prompts), pure decodes at every
CUDA-graph size and in between, times context lengths, eager decodes past the ladder, mixed steps (decodes
plus a prefill chunk) and random scheduler-like batches. Shapes run in a shuffled order until the time
budget ends, so a cut-short run is still an even sample. Each step is timed around execute() on the wall
clock, as a real run sees it (the executor's own figure is kept too). The engine's own per-step CPU time
(scheduling and bookkeeping, which a real run's step durations include) is measured on the same host and
stored in the metadata; calibration adds it. With mixed-step CUDA graphs on (the engine's default at TP 1),
each shape with a prompt chunk is timed twice, as a graph and eagerly, so one fit predicts either engine.

With serving_seconds, the profile ends with a serving phase: the real engine replays a Poisson workload
through the same executor and its steps are kept as rows of grid "serving", durations as the engine records
them. An eager step inside a serving loop takes longer than the same shape timed on its own; calibration
fits that difference (the cost model's serving_eager_step) from these rows, as it does from real runs.

Runs on the GPU machines: numpy, pyarrow and torch only (no plotly, no pandas needed).
"""

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.run_schema import STEPS_SCHEMA
from engine.config import EngineConfig, default_max_model_len
from engine.graph_dispatch import decode_graph_sizes, one_token_per_row
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput
from engine.stats import batch_features

PROFILE_SCHEMA = pa.schema(
    list(STEPS_SCHEMA)
    + [pa.field("executor_duration", pa.float64()), pa.field("repeat", pa.int64()), pa.field("grid", pa.string())]
)
GRID_VERSION = "1"

PREFILL_LENGTHS = (1, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
CACHED_CONTEXTS = (0, 256, 1024, 4096, 12288, 24576)
DECODE_CONTEXTS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768)
EAGER_DECODE_SIZES = (520, 576, 640, 768, 896, 1024)
MIXED_DECODES = (1, 4, 16, 64, 128, 256, 512)
MIXED_CONTEXTS = (256, 1024, 4096)
MIXED_CHUNKS = (16, 128, 512, 1024, 2048, 4096)


GRID_SEQ_IDS_FROM = 1 << 40
"""Grid sequences take ids from here up, apart from an engine's (the serving phase shares the executor)."""


@dataclass(frozen=True, slots=True)
class Shape:
    """One batch to time: per sequence (cached tokens, new tokens, is_decode, samples)."""

    grid: str
    rows: tuple[tuple[int, int, bool, bool], ...]


def _decode_rows(rng: random.Random, num_seqs: int, mean_context: int, max_model_len: int):
    high = max(1, min(max_model_len - 1, mean_context * 3 // 2))
    low = max(1, min(mean_context // 2, high))
    return tuple((rng.randint(low, high), 1, True, True) for _ in range(num_seqs))


def build_grid(
    *,
    cuda_graph_sizes,
    max_model_len: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    num_kv_blocks: int,
    block_size: int,
    seed: int = 0,
    num_random: int = 600,
) -> list[Shape]:
    """Every shape of the grid that fits the engine limits and the KV cache, in a seeded random order."""
    rng = random.Random(seed)
    shapes: list[Shape] = []
    budget = max_num_batched_tokens
    # Prefill: one prompt, with and without cached context, and several prompts sharing the budget.
    for length in PREFILL_LENGTHS:
        if length > budget:
            continue
        for cached in CACHED_CONTEXTS:
            if cached + length <= max_model_len:
                shapes.append(Shape("prefill", ((cached, length, False, True),)))
        for count in (2, 4, 8, 16):
            if count * length <= budget and count <= max_num_seqs and length >= 16:
                shapes.append(Shape("prefill", tuple((0, length, False, True) for _ in range(count))))
    # Pure decode: each graph size and a size padded up to it, times context lengths; eager past the ladder.
    # Without graphs (enforce_eager) the same ladder still spaces the decode sizes well.
    sizes = sorted(set(cuda_graph_sizes)) or list(decode_graph_sizes())
    decode_sizes = set(sizes)
    previous = 0
    for size in sizes:
        if size - previous > 1:
            decode_sizes.add(rng.randint(previous + 1, size - 1))
        previous = size
    decode_sizes.update(s for s in EAGER_DECODE_SIZES if s > previous)
    for num_seqs in sorted(decode_sizes):
        if num_seqs > min(max_num_seqs, budget):
            continue
        for context in DECODE_CONTEXTS:
            if context < max_model_len:
                shapes.append(Shape("decode", _decode_rows(rng, num_seqs, context, max_model_len)))
    # Mixed: decodes plus one prefill chunk, sometimes over cached context.
    for num_decodes in MIXED_DECODES:
        for context in MIXED_CONTEXTS:
            for chunk in MIXED_CHUNKS:
                if num_decodes + chunk > budget or num_decodes + 1 > max_num_seqs or context >= max_model_len:
                    continue
                cached = rng.choice((0, 0, 2048))
                if cached + chunk > max_model_len:
                    cached = 0
                samples = rng.random() < 0.7
                rows = _decode_rows(rng, num_decodes, context, max_model_len) + ((cached, chunk, False, samples),)
                shapes.append(Shape("mixed", rows))
    # Random batches like a chunked-prefill scheduler makes: decodes first, then chunks filling the budget.
    for _ in range(num_random):
        most_decodes = min(512, max_num_seqs, budget)
        num_decodes = rng.choice((0, rng.randint(1, min(32, most_decodes)), rng.randint(1, most_decodes)))
        rows = list(_decode_rows(rng, num_decodes, rng.choice((128, 512, 1024, 2048, 4096)), max_model_len))
        left = rng.randint(0, budget - num_decodes) if num_decodes else rng.randint(1, budget)
        while left > 0 and len(rows) < max_num_seqs:
            chunk = min(left, rng.choice((32, 128, 512, 1024, 2048, 4096)))
            cached = min(rng.choice((0, 0, 0, 512, 2048)), max_model_len - 1)
            chunk = min(chunk, max_model_len - cached)
            rows.append((cached, chunk, False, chunk == left or rng.random() < 0.8))
            left -= chunk
        if rows:
            shapes.append(Shape("random", tuple(rows)))
    fitting = [shape for shape in shapes if _blocks_needed(shape, block_size) <= num_kv_blocks]
    rng.shuffle(fitting)
    return fitting


def _blocks_needed(shape: Shape, block_size: int) -> int:
    return sum(-(-(cached + new) // block_size) for cached, new, _, _ in shape.rows)


class ShapeBuilder:
    """Turns a Shape into a SchedulerOutput with fresh sequence ids, random tokens and distinct blocks."""

    def __init__(self, *, num_kv_blocks: int, block_size: int, vocab_size: int, seed: int = 0) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1 << 20)
        self._next_seq_id = GRID_SEQ_IDS_FROM
        self._next_block = 0
        self._last_seq_ids: list[int] = []
        self._step = 0

    def build(self, shape: Shape) -> SchedulerOutput:
        """The next step's SchedulerOutput for this shape; the previous step's sequences are finished."""
        sequences = []
        for cached, new, is_decode, samples in shape.rows:
            num_blocks = -(-(cached + new) // self.block_size)
            # Consecutive ids from a rotating cursor: distinct within the step as long as the shape fits.
            start = self._next_block
            blocks = [(start + i) % self.num_kv_blocks for i in range(num_blocks)]
            self._next_block = (start + num_blocks) % self.num_kv_blocks
            sequences.append(
                ScheduledSequence(
                    seq_id=self._next_seq_id,
                    token_ids=self.rng.integers(0, self.vocab_size, new).tolist(),
                    num_computed_tokens=cached,
                    block_table=blocks,
                    is_decode=is_decode,
                    samples=samples,
                    num_output_tokens=1 if is_decode else 0,
                    sampling_params=self.params,
                )
            )
            self._next_seq_id += 1
        output = SchedulerOutput(step=self._step, sequences=sequences, finished_seq_ids=self._last_seq_ids)
        self._last_seq_ids = [seq.seq_id for seq in sequences]
        self._step += 1
        return output


def _row(
    output: SchedulerOutput, result, *, step: int, start: float, duration: float, num_kv_blocks: int, repeat: int, grid: str
) -> dict:
    features = batch_features(output)
    blocks_used = sum(len(seq.block_table) for seq in output.sequences)
    return {
        "step": step,
        "start_time": start,
        "duration": duration,
        "num_prefill_seqs": features.num_prefill_seqs,
        "num_prefill_tokens": features.num_prefill_tokens,
        "num_decode_seqs": features.num_decode_seqs,
        "num_decode_tokens": features.num_decode_tokens,
        "decode_context_tokens": features.decode_context_tokens,
        "prefill_context_tokens": features.prefill_context_tokens,
        "prefill_attention_work": features.prefill_attention_work,
        "num_running": len(output.sequences),
        "num_waiting": 0,
        "kv_blocks_used": blocks_used,
        "kv_blocks_total": num_kv_blocks,
        "num_preempted": 0,
        "prefix_cache_hit_tokens": features.prefill_context_tokens,
        "cuda_graph_batch_size": int(result.cuda_graph_batch_size),
        "num_batched_tokens": features.num_batched_tokens,
        "executor_duration": float(result.duration),
        "repeat": repeat,
        "grid": grid,
    }


def write_profile(rows: list[dict], metadata: dict, out_path: Path) -> pa.Table:
    """Write the rows (atomically) with the metadata in the Parquet schema; returns the table."""
    schema = PROFILE_SCHEMA.with_metadata({key: str(value) for key, value in metadata.items()})
    table = pa.Table.from_pylist(rows, schema=schema)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(table, temporary)
    temporary.replace(out_path)
    return table


def serving_steps(executor, config: EngineConfig, *, seconds: float, rate: float, seed: int = 0,
                  start_step: int = 0, started: float | None = None) -> list[dict]:
    """Rows of grid "serving": the real engine on this executor, serving Poisson arrivals for `seconds`.

    Prompts of 64..1024 tokens and outputs of 32..256 (less when max_model_len is small) keep prompt chunks
    arriving among running decodes; whatever is still running when the time is up is aborted (the steps run
    are kept).
    """
    from engine.clock import WallClock
    from engine.engine import Engine
    from traces.arrivals import Poisson
    from simulator.trace_requests import add_trace_requests
    from traces.synthetic import random_workload

    # Room for twice the expected arrivals; those arriving after the deadline are never admitted.
    input_len = max(8, min(544, config.max_model_len // 4))
    output_len = max(4, min(144, config.max_model_len // 8))
    workload = random_workload(num_prompts=max(1, int(rate * seconds * 2)), input_len=input_len,
                               output_len=output_len, range_ratio=0.88, arrivals=Poisson(rate), seed=seed)
    clock = WallClock()
    engine = Engine(dataclasses.replace(config, num_kv_blocks=executor.num_kv_blocks), executor, clock=clock)
    add_trace_requests(engine, workload, vocab_size=config.vocab_size, seed=seed)
    offset = (time.perf_counter() - started) if started is not None else 0.0
    clock.restart()
    engine.run_until(seconds)
    engine.abort_all("profile serving phase over")
    # Aborting tells the executor nothing, and the next engine on it numbers its sequences from 0 again:
    # release this one's sequences, or the runner's per-sequence state (block tables) would serve the next.
    executor.execute(SchedulerOutput(step=len(engine.step_records), sequences=[],
                                     finished_seq_ids=[seq.seq_id for seq in engine.sequences.values()]))
    columns = engine.step_records.numpy_columns()
    rows = []
    for index in range(len(columns["step"])):
        row = {name: values[index].item() for name, values in columns.items()}
        row["step"] = start_step + index
        row["start_time"] += offset
        row.update(executor_duration=row["duration"], repeat=0, grid="serving")
        rows.append(row)
    return rows


class _InstantExecutor:
    """Returns at once, so the engine's wall-clock step durations are its own CPU time."""

    token_id = 0

    def __init__(self, num_kv_blocks: int) -> None:
        self.num_kv_blocks = num_kv_blocks

    def execute(self, scheduler_output):
        from engine.scheduler_output import StepResult

        sampled = {seq.seq_id: 0 for seq in scheduler_output.sequences if seq.samples}
        return StepResult(sampled_token_ids=sampled, duration=0.0)


def measure_engine_overhead(
    batch_sizes=(1, 16, 64, 256, 512), prompt_lengths=(256, 1024, 4096), *, steps_per_size: int = 40
) -> dict:
    """The engine's CPU seconds per step beyond the executor's: step_s + per_seq_s * seqs + per_prefill_token_s * tokens.

    Measured with an executor that returns at once, on a wall clock, so each recorded step duration
    (start to the next step's start) is scheduling, block allocation, prefix hashing and bookkeeping.
    """
    from engine.clock import WallClock
    from engine.engine import Engine

    samples = []  # (num_seqs, num_prefill_tokens, seconds)
    config = EngineConfig(max_num_seqs=max(batch_sizes), max_model_len=8192, vocab_size=32000)
    for num_seqs in batch_sizes:
        engine = Engine(config, _InstantExecutor(num_seqs * 8 + 64), WallClock(), fast_forward=False)
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps_per_size + 20)
        for _ in range(num_seqs):
            engine.add_request(prompt_len=16, sampling_params=params, arrival_time=0.0)
        for _ in range(steps_per_size + 10):
            engine.step()
        # The last record's duration is not yet extended to the next step's start; drop it.
        for record in engine.step_records[5:-1]:
            if record.num_prefill_seqs == 0 and record.num_decode_seqs == num_seqs:
                samples.append((num_seqs, 0, record.duration))
    for prompt_len in prompt_lengths:
        engine = Engine(config, _InstantExecutor(4 * prompt_len), WallClock(), fast_forward=False)
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=2)
        for _ in range(12):
            engine.add_request(prompt_len=prompt_len, sampling_params=params, arrival_time=engine.clock.now())
            while engine.step():
                pass
        records = engine.step_records
        for record, following in zip(records[2:], records[3:]):
            # Only prefill steps directly followed by a busy step have their bookkeeping in the duration.
            if record.num_prefill_seqs == 1 and record.num_decode_seqs == 0 and following.num_decode_seqs:
                samples.append((1, record.num_prefill_tokens, record.duration))
    data = np.asarray(samples, dtype=np.float64)
    from simulator.nonnegative_least_squares import nonnegative_least_squares

    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    step_s, per_seq_s, per_token_s = nonnegative_least_squares(design / data[:, 2:3], np.ones(len(data)))
    return {"step_s": float(step_s), "per_seq_s": float(per_seq_s), "per_prefill_token_s": float(per_token_s)}


def profile(
    model: str,
    out_path: str | Path,
    *,
    tp: int = 1,
    dtype: str = "bfloat16",
    max_seconds: float = 480,
    repeats: int = 3,
    max_model_len: int | None = None,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 1024,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
    device: str = "cuda",
    executor=None,
    gpu_name: str | None = None,
    seed: int = 0,
    measure_engine: bool = True,
    timing: str = "wall",
    max_shapes: int | None = None,
    serving_seconds: float = 0.0,
    serving_rate: float = 20.0,
    mixed_cuda_graphs: bool | None = None,
    log=print,
) -> Path:
    """Time the real executor (or the given one) over the grid within max_seconds; write the Parquet, return its path.

    serving_seconds (taken from max_seconds) ends the profile with a serving phase at serving_rate requests/s.
    mixed_cuda_graphs None: the engine's default. With mixed-step graphs on and an executor that can turn them off
    for a while (eager_prompt_steps, TP 1), every shape with a prompt chunk is timed both as a graph and eagerly,
    and the first half of the serving phase runs eagerly: one cost model then predicts the engine either way.
    """
    if timing not in ("wall", "executor"):
        raise ValueError(f"timing must be 'wall' (around execute(), as a real run sees it) or 'executor', got {timing!r}")
    started = time.perf_counter()
    deadline = started + max_seconds
    out_path = Path(out_path)
    from simulator.model_shape import ModelShape

    shape = ModelShape.load(model)
    if max_model_len is None:
        max_model_len = default_max_model_len(shape.max_position_embeddings)  # as `twinfer replay` picks it
    config = EngineConfig(
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        vocab_size=shape.vocab_size,
    )
    import torch

    own_executor = executor is None
    if own_executor:
        from engine.model_executor import ModelExecutor

        executor = ModelExecutor(
            model,
            config,
            dtype=dtype,
            device=device,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tp,
            load_format="dummy",
            seed=seed,
            mixed_cuda_graphs=mixed_cuda_graphs,
        )
    if gpu_name is None:
        gpu_name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device
    from simulator.gpu_specs import gpu_key

    num_kv_blocks = executor.num_kv_blocks
    graph_sizes = tuple(getattr(executor, "cuda_graph_batch_sizes", ()) or ())
    metadata = {
        "kind": "twinfer-profile",
        "grid_version": GRID_VERSION,
        "gpu": gpu_key(gpu_name),
        "gpu_name": gpu_name,
        "model": Path(model).name,
        "tp": tp,
        "dtype": dtype,
        "torch_version": torch.__version__,
        "num_kv_blocks": num_kv_blocks,
        "block_size": block_size,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_num_batched_tokens,
        "enforce_eager": enforce_eager,
        "mixed_cuda_graphs": bool(getattr(executor, "mixed_cuda_graphs", mixed_cuda_graphs)),
        "eager_twins": False,
        "cuda_graph_sizes": json.dumps(list(graph_sizes)),
        "timing": timing,
        "setup_seconds": round(time.perf_counter() - started, 2),
        "serving_seconds": serving_seconds,
    }
    log(f"profile: {metadata['gpu_name']} {model} tp{tp} {dtype}: {num_kv_blocks} KV blocks, setup {metadata['setup_seconds']} s")
    if measure_engine:
        overhead = measure_engine_overhead()
        metadata["engine_step_s"] = overhead["step_s"]
        metadata["engine_per_seq_s"] = overhead["per_seq_s"]
        metadata["engine_per_prefill_token_s"] = overhead["per_prefill_token_s"]
        log(
            f"profile: engine CPU per step {overhead['step_s'] * 1e6:.0f} us + {overhead['per_seq_s'] * 1e6:.2f} us/seq"
            f" + {overhead['per_prefill_token_s'] * 1e9:.0f} ns/prefill token"
        )

    grid = build_grid(
        cuda_graph_sizes=graph_sizes,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        num_kv_blocks=num_kv_blocks,
        block_size=block_size,
        seed=seed,
    )
    if max_shapes is not None:
        grid = grid[:max_shapes]  # the grid is shuffled, so any prefix is an even sample
    twins = (metadata["mixed_cuda_graphs"] and getattr(executor, "tensor_parallel_size", tp) == 1
             and hasattr(executor, "eager_prompt_steps"))
    metadata["eager_twins"] = twins
    builder = ShapeBuilder(num_kv_blocks=num_kv_blocks, block_size=block_size, vocab_size=shape.vocab_size, seed=seed)
    # Warm-up: one step of each kind compiles kernels and fills allocator caches before anything is timed.
    for warm in [s for s in grid if s.grid != "random"][:8]:
        executor.execute(builder.build(warm))

    def time_step(output: SchedulerOutput, step: int, repeat: int, grid_name: str) -> dict:
        before = time.perf_counter()
        result = executor.execute(output)
        wall = time.perf_counter() - before
        return _row(output, result, step=step, start=before - started,
                    duration=wall if timing == "wall" else float(result.duration), num_kv_blocks=num_kv_blocks,
                    repeat=repeat, grid=grid_name)

    rows: list[dict] = []
    last_write = last_log = time.perf_counter()
    step = 0
    done_shapes = 0
    grid_deadline = deadline - serving_seconds
    try:
        for shape_index, batch in enumerate(grid):
            # Leave time to write the file (and for a caller's own time limit to not cut it off).
            if time.perf_counter() > grid_deadline - min(10.0, 0.05 * max_seconds):
                break
            # A step of one-token rows only (a one-token prompt among decodes) takes the decode graphs either way.
            has_prompt = not one_token_per_row(sum(new for _, new, _, _ in batch.rows), len(batch.rows))
            for eager in (False, True) if twins and has_prompt else (False,):
                with _prompt_steps(executor, eager):
                    # The first run of a shape is discarded: first calls can pick kernels or grow buffers.
                    for repeat in range(-1, repeats):
                        row = time_step(builder.build(batch), step, repeat, batch.grid)
                        if repeat >= 0:
                            rows.append(row)
                        step += 1
            done_shapes = shape_index + 1
            now = time.perf_counter()
            if now - last_log > 15:
                log(f"profile: {done_shapes}/{len(grid)} shapes, {len(rows)} steps, {now - started:.0f} s")
                last_log = now
            if now - last_write > 60:
                # Checkpoint: a call killed at its time limit still leaves most of the data.
                write_profile(rows, {**metadata, "complete": False}, out_path)
                last_write = now
        if serving_seconds > 0:
            write_profile(rows, {**metadata, "complete": False}, out_path)
            serving = []
            # With twins, the first half serves with eager prompt steps: both kinds of step inside a serving loop.
            halves = ((True, serving_seconds / 2), (False, serving_seconds / 2)) if twins else ((False, serving_seconds),)
            for eager, seconds in halves:
                with _prompt_steps(executor, eager):
                    serving += serving_steps(executor, config, seconds=seconds, rate=serving_rate, seed=seed + eager,
                                             start_step=step + len(serving), started=started)
            rows += serving
            log(f"profile: serving phase, {len(serving)} steps at {serving_rate:g} requests/s")
    finally:
        metadata["complete"] = done_shapes == len(grid)
        metadata["num_shapes"] = f"{done_shapes}/{len(grid)}"
        metadata["seconds"] = round(time.perf_counter() - started, 1)
        write_profile(rows, metadata, out_path)
        if own_executor:  # at TP > 1 its worker processes and process group go with it
            executor.shutdown()
    log(f"profile: wrote {len(rows)} steps ({done_shapes}/{len(grid)} shapes) to {out_path} in {metadata['seconds']} s")
    return out_path


def _prompt_steps(executor, eager: bool):
    """A context in which steps with prompt chunks run eagerly (eager) or as the executor runs them."""
    return executor.eager_prompt_steps() if eager else contextlib.nullcontext()
