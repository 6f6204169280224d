"""Operator profile: the operators an engine step is made of, timed on one GPU over shape grids that cover every
supported model family at any size and TP, written as one Parquet table (simulator/operator_profile_schema.py)
from which the composed cost model predicts models that were never profiled.

Every operator runs through the engine's own code: F.linear as its linear layers call it, the attention
backend the engine picks (on a GPU the Triton paged prefill and decode kernels, with the decode work map and
prefill tile map that mixed-step CUDA graphs use), the fusable norm, rotary and SwiGLU functions, the embedding
module and the sampler. On a GPU each shape is timed inside a CUDA graph of many calls, replayed, divided by
the calls: what a step in a graph pays. Weights and KV caches rotate over enough copies to overflow L2, so each
call reads them from HBM as layer after layer does. The sampler, which the engine runs outside its graphs, is
timed eagerly.

Tables run in order of importance, each until its share of the time budget is spent (a cut table keeps what
it has, and the metadata names it): gemm of the presets' linear layers, decode and prefill attention of their
head layouts, the elementwise operators, graph-replay and launch overheads, the engine's host time per step
(the real engine serving a Poisson load on a probe model no profile is validated on), all-reduce where several
GPUs are lent, then a general gemm grid for unseen sizes. On the CPU, --quick runs tiny grids end to end.

    python -m simulator.operator_profile --out FILE.parquet [--max-seconds 300] [--quick]
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.operator_profile_schema import FORMAT, OPERATOR_PROFILE_SCHEMA, VERSION

BLOCK_SIZE = 16
MAX_FILE_BYTES = 16 << 20
"""The device machine returns files up to 16 MiB."""


# ---- which models, at which TP


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The sizes of a model that decide the shapes of its operators."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool
    """Qwen3's per-head q/k norms inside the rotary kernel."""

    def tp_degrees(self, candidates) -> list[int]:
        """The TP degrees the engine can split this model at (heads, KV heads and the MLP divide)."""
        return [tp for tp in candidates
                if self.heads % tp == 0 and self.kv_heads % tp == 0 and self.intermediate % tp == 0]

    def linear_shapes(self, tp: int) -> dict[str, tuple[int, int]]:
        """(n, k) per rank of each linear layer: F.linear(x[m, k], w[n, k])."""
        heads, kv_heads, head_dim = self.heads // tp, self.kv_heads // tp, self.head_dim
        return {
            "qkv": ((heads + 2 * kv_heads) * head_dim, self.hidden),
            "o": (self.hidden, heads * head_dim),
            "gate_up": (2 * self.intermediate // tp, self.hidden),
            "down": (self.hidden, self.intermediate // tp),
            "lm_head": (-(-self.vocab // tp), self.hidden),
        }


# From the models' public config.json, for the presets another engineer is adding to engine/presets: used
# only while a preset of that name is missing.
EXTRA_MODELS = (
    ModelDims("qwen3-1.7b", 2048, 6144, 16, 8, 128, 151936, True),
    ModelDims("qwen3-4b", 2560, 9728, 32, 8, 128, 151936, True),
    ModelDims("qwen3-14b", 5120, 17408, 40, 8, 128, 151936, True),
    ModelDims("llama-3-70b", 8192, 28672, 64, 8, 128, 128256, False),
    ModelDims("qwen2.5-7b", 3584, 18944, 28, 4, 128, 152064, False),
    ModelDims("qwen2.5-72b", 8192, 29568, 64, 8, 128, 152064, False),
)

# Qwen3-1.7B's config.json: the host-step probe when no preset of it is there yet (never a validated model).
PROBE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936,
}
VALIDATED_MODELS = ("qwen3-0.6b", "qwen3-8b", "qwen3-32b", "llama-3-8b")


def dims_of(name: str) -> ModelDims:
    """A preset's (or model folder's) dimensions, as the engine reads its config.json."""
    from engine.model_config import load_model_config
    from engine.models import attention_features

    config = load_model_config(name)
    _, qk_norm = attention_features(config.architecture, config.attention_bias)
    return ModelDims(Path(name).name, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim, config.vocab_size, qk_norm)


def supported_models() -> tuple[ModelDims, ...]:
    """Every bundled preset (the validated ones first, the tiny test model left out), then EXTRA_MODELS not yet there."""
    from engine.model_config import preset_names

    names = [name for name in preset_names() if name != "tiny-qwen3"]
    names.sort(key=lambda name: (name not in VALIDATED_MODELS, name))
    models = [dims_of(name) for name in names]
    return tuple(models + [dims for dims in EXTRA_MODELS if dims.name not in names])


# ---- the grids


@dataclass(frozen=True)
class OperatorGrid:
    """The shapes each table covers: FULL_GRID on a GPU; quick_grid() for a check that every operator runs."""

    models: tuple[ModelDims, ...] = ()
    """Empty: supported_models()."""
    tp_candidates: tuple[int, ...] = (1, 2, 4, 8)
    gemm_m: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768,
                               1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
    lm_head_max_m: int = 2048
    """The LM head runs on sampled rows only: at most max_num_seqs (1024 on an H200)."""
    general_sizes: tuple[int, ...] = (512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768,
                                      49152, 65536)
    general_m: tuple[int, ...] = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    general_max_weight: int = 1 << 30
    """Elements of the largest general weight (n * k): about the largest LM head's."""
    decode_seqs: tuple[int, ...] = (1, 8, 32, 128, 512, 1024)
    decode_contexts: tuple[int, ...] = (128, 1024, 4096, 32768)
    decode_max_tokens: int = 1 << 21
    decode_table_tokens: int = 32768
    """Block tables as wide as decode CUDA graphs make them at the default max_model_len (32768)."""
    prefill_seqs: tuple[int, ...] = (1, 16)
    prefill_query_lens: tuple[int, ...] = (16, 128, 512, 2048, 8192)
    prefill_contexts: tuple[int, ...] = (0, 2048, 16384)
    prefill_max_tokens: int = 8192
    mixed_graph_seqs: int = 1024
    """Sequence rows of the mixed-step CUDA graphs (max_num_seqs, vLLM's default on an H200)."""
    mixed_graph_tokens: int = 2048
    """Padded tokens of the mixed-step graph whose fixed layout the work_map and tile_map variants time."""
    elementwise_m: tuple[int, ...] = (1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
    sampler_rows: tuple[int, ...] = (1, 4, 16, 64, 128, 256, 512, 1024)
    replay_nodes: tuple[int, ...] = (1, 16, 128, 512, 2048)
    launch_counts: tuple[int, ...] = (1, 16, 128, 512)
    all_reduce_bytes: tuple[int, ...] = tuple(1 << power for power in range(10, 29, 2))
    probe: str = "qwen3-1.7b"
    """The host-step probe: a preset or folder name, or qwen3-1.7b (PROBE_CONFIG) when no such preset exists."""
    probe_engine: dict | None = None
    """EngineConfig fields for the probe; None: vLLM's defaults for this GPU, as `twinfer replay` picks them."""
    serving_seconds: float = 30.0
    serving_rate: float = 24.0
    attention_backend: str = "auto"
    """The engine's choice: Triton on a GPU, torch on the CPU ("triton" on the CPU needs TRITON_INTERPRET=1)."""


FULL_GRID = OperatorGrid()


def quick_grid() -> OperatorGrid:
    """Tiny shapes of the same structure, for a CPU run of seconds (the tiny test model is the probe)."""
    tiny = ModelDims("tiny-qwen3", 128, 384, 4, 2, 32, 4096, True)
    tiny_llama = ModelDims("tiny-llama", 256, 512, 8, 2, 32, 4096, False)
    return OperatorGrid(
        models=(tiny, tiny_llama), tp_candidates=(1, 2), gemm_m=(1, 16, 128, 512), lm_head_max_m=128,
        general_sizes=(256, 512), general_m=(1, 64, 512), general_max_weight=1 << 18,
        decode_seqs=(1, 3), decode_contexts=(40,), decode_max_tokens=1 << 10, decode_table_tokens=256,
        prefill_seqs=(1, 2), prefill_query_lens=(8, 33), prefill_contexts=(40,), prefill_max_tokens=64,
        mixed_graph_seqs=8, mixed_graph_tokens=64, elementwise_m=(1, 64), sampler_rows=(1, 8), replay_nodes=(1, 8),
        launch_counts=(1, 8), all_reduce_bytes=(1024, 65536), probe="tiny-qwen3",
        probe_engine={"max_model_len": 128, "max_num_seqs": 16, "max_num_batched_tokens": 64},
        serving_seconds=2.0, serving_rate=20.0,
    )


def preset_gemm_shapes(models, tp_candidates, lm_head_max_m: int) -> list[tuple[int, int, int]]:
    """(n, k, largest m) of every linear layer of every model at every TP, TP 1 of all models first; each (n, k) once."""
    largest: dict[tuple[int, int], int] = {}
    for tp in tp_candidates:
        for dims in models:
            if tp not in dims.tp_degrees(tp_candidates):
                continue
            for role, shape in dims.linear_shapes(tp).items():
                limit = lm_head_max_m if role == "lm_head" else 1 << 62
                largest[shape] = max(largest.get(shape, 0), limit)
    return [(n, k, limit) for (n, k), limit in largest.items()]


def general_gemm_shapes(grid: OperatorGrid, exclude) -> list[tuple[int, int, int]]:
    """(n, k, largest m) over the general sizes not already among `exclude`, in a seeded random order: a run cut
    short keeps an even sample of the grid."""
    excluded = {(n, k) for n, k, _ in exclude}
    shapes = [(n, k, 1 << 62) for n in grid.general_sizes for k in grid.general_sizes
              if n * k <= grid.general_max_weight and (n, k) not in excluded]
    random.Random(0).shuffle(shapes)
    return shapes


def attention_layouts(models, tp_candidates, with_qk_norm: bool = False) -> list[tuple]:
    """(heads, KV heads, head_dim) per rank of every model at every TP, TP 1 first, each once; with_qk_norm: also
    whether the model has Qwen3's q/k norms (a layout of both kinds of model then comes twice)."""
    layouts: dict[tuple[int, int, int, bool], None] = {}
    for tp in tp_candidates:
        for dims in models:
            if tp in dims.tp_degrees(tp_candidates):
                layout = (dims.heads // tp, dims.kv_heads // tp, dims.head_dim)
                layouts[layout + (dims.qk_norm,) if with_qk_norm else layout] = None
    return list(layouts)


def distinct(values) -> list:
    """The values in first-seen order, each once."""
    return list(dict.fromkeys(values))


def coarse_first(values) -> tuple[list, list]:
    """(every other value, both ends included; the rest): a first pass over the first leaves an even grid if cut."""
    values = list(values)
    coarse = values[::2] + ([values[-1]] if len(values) % 2 == 0 else [])
    return coarse, [value for value in values if value not in coarse]


# ---- timing


@dataclass(frozen=True, slots=True)
class Ceilings:
    """The device's measured matmul rate and copy bandwidth, and its L2: to size how many calls a graph holds
    and how many input copies overflow the cache."""

    flops: float
    bandwidth: float
    l2_bytes: int

    def estimate(self, flops: float, bytes_moved: float) -> float:
        """Roofline seconds of one call, plus a few microseconds a kernel costs however small."""
        return max(flops / self.flops, bytes_moved / self.bandwidth) + 3e-6


ROTATION_L2_MULTIPLE = 3
"""Inputs that rotate (weights, KV caches) span this many times the L2, so no call finds them there."""


def measure_ceilings(device, dtype) -> Ceilings:
    """A device-to-device copy of 1 GiB and an 8192^3 matmul, median of 5 (on the CPU: nominal figures)."""
    import torch

    if device.type != "cuda":
        return Ceilings(flops=2e10, bandwidth=5e9, l2_bytes=0)
    source = torch.randn(1 << 29, dtype=dtype, device=device)
    target = torch.empty_like(source)
    copy_s = _median_event_seconds(lambda: target.copy_(source), 5)
    del source, target
    a, b = torch.randn(8192, 8192, dtype=dtype, device=device), torch.randn(8192, 8192, dtype=dtype, device=device)
    matmul_s = _median_event_seconds(lambda: a @ b, 5)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return Ceilings(flops=2 * 8192**3 / matmul_s, bandwidth=2 * (1 << 30) / copy_s, l2_bytes=int(l2_bytes))


def _median_event_seconds(run, repeats: int, count: int = 1) -> float:
    """Median over repeats of run() called count times between two CUDA events, per call."""
    import torch

    run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(count):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / count)
    return float(np.median(samples))


@dataclass(frozen=True)
class OperatorTimer:
    """Seconds per call of an operator as a step pays it: on a GPU inside a replayed CUDA graph of many calls (or
    eagerly, one launch after another, for what the engine runs outside its graphs); on the CPU eagerly."""

    on_cuda: bool
    repeats: int = 5
    sample_seconds: float = 3e-4
    """A timed sample replays the graph until it spans about this long (so a replay's own gap is noise)."""

    def seconds(self, call, *, calls: int, graph: bool = True) -> tuple[float, int, bool]:
        """(median seconds of one call(i), samples taken, whether it ran in a graph); call(i) runs call number i."""
        call(0)  # warm-up: compiles kernels, picks cuBLAS algorithms, settles allocations
        if not self.on_cuda:
            return self._host_clock(call, calls) + (False,)
        import torch

        torch.cuda.synchronize()
        run = capture_graph(call, calls) if graph else (lambda: [call(i) for i in range(calls)])
        one = _median_event_seconds(run, 1)
        inner = min(32, max(1, math.ceil(self.sample_seconds / one)))
        repeats = self.repeats if one < 0.02 else 3
        return _median_event_seconds(run, repeats, inner) / calls, repeats, graph

    def _host_clock(self, call, calls: int) -> tuple[float, int]:
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            for index in range(calls):
                call(index)
            samples.append((time.perf_counter() - start) / calls)
        return float(np.median(samples)), self.repeats


def capture_graph(call, calls: int):
    """A CUDA graph of call(0) .. call(calls - 1), captured as the engine captures its steps; its replay."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(calls):
            call(index)
    return graph.replay


@dataclass
class ProfileContext:
    """What every table needs: the device and dtype, random inputs, the timer, the ceilings, the attention kernels."""

    device: object
    dtype: object
    grid: OperatorGrid
    timer: OperatorTimer
    ceilings: Ceilings
    backend: object
    models: tuple[ModelDims, ...]
    host_report: dict | None = None
    """The host-step fit's report (steps, error, the probe), once that table ran."""
    all_reduce_note: str = "not measured"
    mixed_graph_cache: dict = dataclasses.field(default_factory=dict)

    def mixed_graphs(self, layout):
        """The engine's MixedStepGraphs for a head layout (its buffers only, nothing captured): its work-map and
        tile-map capacities are the rules the fixed-layout variants follow."""
        if layout not in self.mixed_graph_cache:
            from engine.cuda_graphs import MixedStepGraphs
            from engine.kernels.prefill_attention import prefill_query_tile

            grid = self.grid
            block_q = prefill_query_tile(*layout)
            self.mixed_graph_cache[layout] = MixedStepGraphs(None, [grid.mixed_graph_tokens], grid.mixed_graph_seqs,
                                                         grid.decode_table_tokens // BLOCK_SIZE, block_q, self.device)
        return self.mixed_graph_cache[layout]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def random(self, *shape, dtype=None):
        """Normal random values (never zeros: they can run faster than real data)."""
        import torch

        return torch.randn(shape, dtype=dtype or self.dtype, device=self.device)

    def copies(self, bytes_per_call: int, most: int = 256) -> int:
        """Copies of an input that, used in turn, overflow the L2 (1 where there is no L2 to overflow)."""
        if self.ceilings.l2_bytes == 0:
            return 1
        return min(most, max(1, math.ceil(ROTATION_L2_MULTIPLE * self.ceilings.l2_bytes / max(1, bytes_per_call))))

    def calls(self, estimate_s: float, copies: int = 1, most: int = 256) -> int:
        """Calls one graph holds: enough to span a replay well past its fixed cost, and every input copy once."""
        if not self.timer.on_cuda:
            return 1
        return max(copies, min(most, math.ceil(self.timer.sample_seconds / estimate_s)))


# ---- a table's run


class TableRun:
    """One table's rows until its deadline; a shape that fails is logged and counted, never the end of the profile."""

    def __init__(self, name: str, deadline: float, context: ProfileContext, log) -> None:
        self.name, self.deadline, self.context, self.log = name, deadline, context, log
        self.rows: list[dict] = []
        self.errors = 0
        self.cut = False
        self.started = time.perf_counter()
        self._last_log = self.started

    def open(self) -> bool:
        """Whether there is time left for another shape (False marks the table cut)."""
        if time.perf_counter() < self.deadline:
            return True
        self.cut = True
        return False

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    @contextlib.contextmanager
    def guard(self, label: str):
        """Run a shape; an error is logged (the first few with their traceback) and counted, and the table goes on."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one bad shape must not cost the rest of the GPU time
            self.errors += 1
            if self.errors <= 3:
                self.log(f"{self.name}: {label} failed: {error!r}\n{traceback.format_exc(limit=4)}")
            elif self.errors in (4, 20, 100):
                self.log(f"{self.name}: {self.errors} failures so far (latest: {label}: {error!r})")
            _release_memory(self.context.device, collect=True)

    def time(self, op: str, call, *, calls: int, variant: str = "", graph: bool = True, **shape) -> None:
        """Time call(i) and keep its row."""
        with self.guard(f"{op} {variant} {shape}"):
            seconds, repeats, in_graph = self.context.timer.seconds(call, calls=calls, graph=graph)
            self.add(op, seconds, repeats, variant=variant, graph=in_graph, **shape)

    def add(self, op: str, seconds: float, repeats: int, *, variant: str = "", graph: bool, **shape) -> None:
        self.rows.append(operator_row(op, seconds, repeats, variant=variant, graph=graph,
                                      dtype=self.context.dtype_name, **shape))
        now = time.perf_counter()
        if now - self._last_log > 15:
            self.log(f"{self.name}: {len(self.rows)} rows, {now - self.started:.0f} s")
            self._last_log = now


def operator_row(op: str, seconds: float, repeats: int, *, variant: str, graph: bool, dtype: str, **shape) -> dict:
    """One row of the schema; the columns an operator does not use hold 0."""
    row = {field.name: 0 for field in OPERATOR_PROFILE_SCHEMA}
    unknown = set(shape) - set(row)
    if unknown:
        raise ValueError(f"operator_row: {sorted(unknown)} are not columns of the operator profile")
    row.update(shape, op=op, variant=variant, dtype=dtype, graph=bool(graph), seconds=float(seconds),
               repeats=int(repeats))
    return row


def _release_memory(device, collect: bool = False) -> None:
    """Give the allocator's cached blocks back (collect: after dropping objects that may sit in reference cycles)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---- gemm


def gemm_table(run: TableRun, context: ProfileContext) -> None:
    """The presets' linear layers at every TP, over the m grid: a coarse pass over every shape, then the rest."""
    grid = context.grid
    shapes = preset_gemm_shapes(context.models, grid.tp_candidates, grid.lm_head_max_m)
    for ms in coarse_first(grid.gemm_m):
        _gemm_shapes(run, context, shapes, ms)


def general_gemm_table(run: TableRun, context: ProfileContext) -> None:
    """Powers of two and 1.5x steps of n and k, for sizes no preset has."""
    grid = context.grid
    exclude = preset_gemm_shapes(context.models, grid.tp_candidates, grid.lm_head_max_m)
    _gemm_shapes(run, context, general_gemm_shapes(grid, exclude), grid.general_m)


def _gemm_shapes(run: TableRun, context: ProfileContext, shapes, ms) -> None:
    """F.linear(x[m, k], w[n, k]) as the engine's linear layers call it, the weight rotated over copies."""
    import torch.nn.functional as F

    for n, k, largest_m in shapes:
        if not run.open():
            return
        with run.guard(f"gemm n={n} k={k}"):
            copies = context.copies(n * k * context.itemsize)
            weights = context.random(copies, n, k)
            for m in [m for m in ms if m <= largest_m]:
                if not run.open():
                    return
                x = context.random(m, k)
                estimate = context.ceilings.estimate(2 * m * n * k, context.itemsize * (n * k + m * k + m * n))
                run.time("gemm", lambda i: F.linear(x, weights[i % copies]), calls=context.calls(estimate, copies),
                         m=m, n=n, k=k)
            del weights


# ---- attention


@dataclass
class PagedCase:
    """Sequences laid out in a paged KV cache as the engine lays them out, in `copies` disjoint sets of random
    blocks (call i reads set i % copies, as layer after layer reads its own cache)."""

    k_cache: object
    v_cache: object
    blocks: object
    """[copies, num_seqs, blocks per sequence] int64 on the device."""
    copies: int

    def tables(self, rows: int, width: int):
        """[copies, rows, width] int32 block tables: each sequence's blocks first, padding rows and columns 0. The
        width is rounded up to 16 entries: every copy then starts 64-byte aligned, as the engine's buffers do, so
        Triton (which specializes on pointer alignment) runs one compiled variant for all of them."""
        import torch

        copies, num_seqs, needed = self.blocks.shape
        width = -(-max(width, needed) // 16) * 16
        tables = torch.zeros(copies, rows, width, dtype=torch.int32, device=self.blocks.device)
        tables[:, :num_seqs, :needed] = self.blocks
        return tables


def paged_case(context: ProfileContext, num_seqs: int, tokens: int, kv_heads: int, head_dim: int,
               bytes_per_call: int) -> PagedCase:
    """A cache holding num_seqs sequences of `tokens` tokens each, random values, enough copies to overflow L2."""
    import torch

    copies = context.copies(bytes_per_call, most=64)
    needed = -(-tokens // BLOCK_SIZE)
    num_blocks = copies * num_seqs * needed
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = context.random(*shape), context.random(*shape)
    order = torch.randperm(num_blocks, device=context.device).view(copies, num_seqs, needed)
    return PagedCase(k_cache, v_cache, order, copies)


def decode_attention_table(run: TableRun, context: ProfileContext) -> None:
    """The paged decode kernel over sequences x contexts for every head layout: variant "" with tables as wide as
    decode CUDA graphs make them, "exact_table" as wide as the context (eager steps), "work_map" as mixed-step
    graphs call it."""
    grid = context.grid
    for layout in attention_layouts(context.models, grid.tp_candidates):
        for num_seqs in grid.decode_seqs:
            for context_len in grid.decode_contexts:
                if num_seqs * context_len > grid.decode_max_tokens:
                    continue
                if not run.open():
                    return
                with run.guard(f"decode {layout} seqs={num_seqs} context={context_len}"):
                    _decode_shape(run, context, layout, num_seqs, context_len)


def _decode_shape(run: TableRun, context: ProfileContext, layout, num_seqs: int, context_len: int) -> None:
    import torch

    heads, kv_heads, head_dim = layout
    grid, backend, size = context.grid, context.backend, context.itemsize
    kv_bytes = 2 * num_seqs * context_len * kv_heads * head_dim * size
    case = paged_case(context, num_seqs, context_len, kv_heads, head_dim, kv_bytes)
    calls = context.calls(context.ceilings.estimate(0, kv_bytes) + 5e-6, case.copies, most=64)
    scale = head_dim**-0.5
    shape = dict(num_seqs=num_seqs, context_len=context_len, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    q = context.random(num_seqs, heads, head_dim)
    seq_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=context.device)
    for variant, width in (("", grid.decode_table_tokens // BLOCK_SIZE), ("exact_table", 0)):
        tables = case.tables(num_seqs, width)
        run.time("decode_attention", lambda i: backend.paged_decode_attention(
            q, case.k_cache, case.v_cache, seq_lens, tables[i % case.copies], scale), calls=calls, variant=variant,
            **shape)
    if backend.name == "triton":
        call = _work_map_call(context, layout, case, num_seqs, context_len, scale)
        run.time("decode_attention", call, calls=calls, variant="work_map", **shape)


def _work_map_call(context: ProfileContext, layout, case: PagedCase, num_seqs: int, context_len: int, scale: float):
    """The decode kernel as a mixed-step graph runs it: over the graph's sequence rows (the decodes first, padding
    after), its work map, and tables as wide as the graph's."""
    import torch
    from engine.kernels.decode_attention import decode_work_map

    heads, _, head_dim = layout
    grid = context.grid
    rows = max(num_seqs, min(grid.mixed_graph_tokens, grid.mixed_graph_seqs))
    work_capacity = context.mixed_graphs(layout).work_capacity(grid.mixed_graph_tokens)
    lens = np.zeros(rows, np.int32)
    lens[:num_seqs] = context_len
    work, starts, partition_size = decode_work_map(lens, work_capacity)
    device = context.device
    work_tensors = (torch.from_numpy(work).to(device), torch.from_numpy(starts).to(device),
                    torch.tensor([partition_size], dtype=torch.int32, device=device))
    seq_lens = torch.from_numpy(lens).to(device)
    q = context.random(rows, heads, head_dim)
    out = torch.empty_like(q)
    tables = case.tables(rows, grid.decode_table_tokens // BLOCK_SIZE)
    return lambda i: context.backend.paged_decode_attention(
        q, case.k_cache, case.v_cache, seq_lens, tables[i % case.copies], scale, out=out, work=work_tensors)


def prefill_attention_table(run: TableRun, context: ProfileContext) -> None:
    """The paged prefill kernel over sequences x new tokens x cached context for every head layout: variant "" as
    eager steps call it (grid bounded by the longest chunk), "tile_map" as mixed-step graphs do."""
    grid = context.grid
    for layout in attention_layouts(context.models, grid.tp_candidates):
        for num_seqs in grid.prefill_seqs:
            for query_len in grid.prefill_query_lens:
                if num_seqs * query_len > grid.prefill_max_tokens:
                    continue
                for context_len in grid.prefill_contexts:
                    if not run.open():
                        return
                    with run.guard(f"prefill {layout} seqs={num_seqs} new={query_len} cached={context_len}"):
                        _prefill_shape(run, context, layout, num_seqs, query_len, context_len)


def _prefill_shape(run: TableRun, context: ProfileContext, layout, num_seqs: int, query_len: int,
                   context_len: int) -> None:
    import torch

    heads, kv_heads, head_dim = layout
    backend, size, device = context.backend, context.itemsize, context.device
    seq_len = context_len + query_len
    bytes_per_call = 2 * num_seqs * (seq_len * kv_heads + query_len * heads) * head_dim * size
    flops = 4 * heads * head_dim * num_seqs * query_len * (context_len + (query_len + 1) / 2)
    case = paged_case(context, num_seqs, seq_len, kv_heads, head_dim, bytes_per_call)
    calls = context.calls(context.ceilings.estimate(flops / 0.4, bytes_per_call) + 5e-6, case.copies, most=64)
    scale = head_dim**-0.5
    shape = dict(num_seqs=num_seqs, query_len=query_len, context_len=context_len, num_heads=heads,
                 num_kv_heads=kv_heads, head_dim=head_dim)
    q = context.random(num_seqs * query_len, heads, head_dim)
    cu_seqlens = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * query_len
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    tables = case.tables(num_seqs, 0)
    bound = {"max_query_len": query_len} if backend.name == "triton" else {}
    run.time("prefill_attention", lambda i: backend.paged_prefill_attention(
        q, case.k_cache, case.v_cache, cu_seqlens, seq_lens, tables[i % case.copies], scale, **bound), calls=calls,
        **shape)
    if backend.name == "triton":
        call = _tile_map_call(context, layout, case, q, num_seqs, query_len, seq_len, scale)
        run.time("prefill_attention", call, calls=calls, variant="tile_map", **shape)


def _tile_map_call(context: ProfileContext, layout, case: PagedCase, q, num_seqs: int, query_len: int, seq_len: int,
                   scale: float):
    """The prefill kernel as a mixed-step graph runs it: sequence arrays padded to the graph's rows, its tile map."""
    import torch
    from engine.kernels.prefill_attention import prefill_tile_map

    grid, device = context.grid, context.device
    rows = max(num_seqs, grid.mixed_graph_seqs)
    graphs = context.mixed_graphs(layout)
    query_lens = np.zeros(rows, np.int64)
    query_lens[:num_seqs] = query_len
    tile_map = prefill_tile_map(query_lens, graphs.block_q, graphs.tile_capacity(num_seqs * query_len))
    tiles = torch.from_numpy(tile_map).to(device)
    cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)).to(device)
    seq_lens = torch.from_numpy(np.where(query_lens > 0, seq_len, 0).astype(np.int32)).to(device)
    tables = case.tables(rows, grid.decode_table_tokens // BLOCK_SIZE)
    out = torch.empty_like(q)
    return lambda i: context.backend.paged_prefill_attention(
        q, case.k_cache, case.v_cache, cu_seqlens, seq_lens, tables[i % case.copies], scale, out=out,
        tile_map=(tiles[0], tiles[1]))


# ---- elementwise operators


def _elementwise_calls(context: ProfileContext, bytes_per_call: int) -> int:
    return context.calls(context.ceilings.estimate(0, bytes_per_call), most=128)


def kv_store_table(run: TableRun, context: ProfileContext) -> None:
    """Writing m tokens' K and V into random slots of a layer's paged cache, V read from the packed qkv as the
    engine's attention layer passes it."""
    import torch

    layouts = attention_layouts(context.models, context.grid.tp_candidates)
    for kv_heads, head_dim in distinct((kv, dim) for _, kv, dim in layouts):
        for m in context.grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"kv_store kv_heads={kv_heads} m={m}"):
                num_blocks = 2 * -(-m // BLOCK_SIZE)
                k_cache = context.random(num_blocks, BLOCK_SIZE, kv_heads, head_dim)
                v_cache = context.random(num_blocks, BLOCK_SIZE, kv_heads, head_dim)
                slots = torch.randperm(num_blocks * BLOCK_SIZE, device=context.device)[:m].to(torch.int32)
                key = context.random(m, kv_heads, head_dim)
                value = context.random(m, 3 * kv_heads * head_dim)[:, :kv_heads * head_dim].view(m, kv_heads, head_dim)
                calls = _elementwise_calls(context, 4 * m * kv_heads * head_dim * context.itemsize)
                run.time("kv_store", lambda i: context.backend.store_kvcache(key, value, k_cache, v_cache, slots),
                         calls=calls, m=m, num_kv_heads=kv_heads, head_dim=head_dim)


def rms_norm_table(run: TableRun, context: ProfileContext) -> None:
    """The fused residual-add RMSNorm over m tokens of each hidden size."""
    from engine.layers.norm import add_rms_norm

    for width in distinct(dims.hidden for dims in context.models):
        for m in context.grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"rms_norm width={width} m={m}"):
                x, residual, weight = context.random(m, width), context.random(m, width), context.random(width)
                calls = _elementwise_calls(context, 4 * m * width * context.itemsize)
                run.time("rms_norm", lambda i: add_rms_norm(x, residual, weight, 1e-6), calls=calls, m=m, width=width)


def rotary_table(run: TableRun, context: ProfileContext) -> None:
    """Rotary embedding of q and k read from the packed qkv, with Qwen3's per-head q/k norms (variant "qk_norm")
    for the layouts of Qwen3 models, without ("") for the others, as engine/layers/rotary.py runs them."""
    import torch
    from engine.layers.rotary import RotaryEmbedding, apply_rotary, norm_and_rotate
    from engine.model_config import RopeConfig

    max_positions = 32768
    tables = {}
    for heads, kv_heads, head_dim, qk_norm in attention_layouts(context.models, context.grid.tp_candidates, True):
        if head_dim not in tables:
            with torch.device(context.device):
                tables[head_dim] = RotaryEmbedding(head_dim, max_positions, RopeConfig(theta=1e6)).cos_sin
        cos_sin = tables[head_dim]
        for m in context.grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"rotary {heads}/{kv_heads} m={m}"):
                q_size, kv_size = heads * head_dim, kv_heads * head_dim
                q, k, _ = context.random(m, q_size + 2 * kv_size).split([q_size, kv_size, kv_size], dim=-1)
                q, k = q.view(m, heads, head_dim), k.view(m, kv_heads, head_dim)
                positions = torch.randint(0, max_positions, (m,), dtype=torch.int32, device=context.device)
                if qk_norm:
                    q_weight, k_weight = context.random(head_dim), context.random(head_dim)
                    call = lambda i: norm_and_rotate(positions, q, k, cos_sin, q_weight, k_weight, 1e-6)  # noqa: E731
                else:
                    call = lambda i: apply_rotary(positions, q, k, cos_sin)  # noqa: E731
                calls = _elementwise_calls(context, 2 * m * (q_size + kv_size) * context.itemsize)
                run.time("rotary", call, calls=calls, variant="qk_norm" if qk_norm else "", m=m, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim)


def silu_and_mul_table(run: TableRun, context: ProfileContext) -> None:
    """SwiGLU's gate over m tokens of each intermediate size per rank."""
    from engine.layers.activation import silu_and_mul

    grid = context.grid
    widths = distinct(dims.intermediate // tp for tp in grid.tp_candidates for dims in context.models
                      if tp in dims.tp_degrees(grid.tp_candidates))
    for width in widths:
        for m in grid.elementwise_m:
            if not run.open():
                return
            with run.guard(f"silu_and_mul width={width} m={m}"):
                x = context.random(m, 2 * width)
                calls = _elementwise_calls(context, 3 * m * width * context.itemsize)
                run.time("silu_and_mul", lambda i: silu_and_mul(x), calls=calls, m=m, width=width)


def embedding_table(run: TableRun, context: ProfileContext) -> None:
    """The token embedding (the engine's module, at TP 1) over m tokens of each hidden size."""
    import torch
    from engine.layers.embedding import VocabParallelEmbedding

    for width, vocab in distinct((dims.hidden, dims.vocab) for dims in context.models):
        if not run.open():
            return
        with run.guard(f"embedding width={width}"):
            with _default_dtype(context.dtype), torch.device(context.device):
                module = VocabParallelEmbedding(vocab, width)
            module.weight.normal_()
            for m in context.grid.elementwise_m:
                if not run.open():
                    return
                ids = torch.randint(0, vocab, (m,), dtype=torch.int32, device=context.device)
                calls = _elementwise_calls(context, 2 * m * width * context.itemsize)
                run.time("embedding", lambda i: module(ids), calls=calls, m=m, width=width)


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sampler_table(run: TableRun, context: ProfileContext) -> None:
    """The engine's sampler over rows of logits of each vocabulary, greedy and random (temperature 0.8), timed
    eagerly as the engine runs it, after its graphs."""
    import torch
    from engine.sampler import Sampler, SamplingTensors

    sampler = Sampler(0, context.device)
    for vocab in distinct(dims.vocab for dims in context.models):
        for rows in context.grid.sampler_rows:
            if not run.open():
                return
            with run.guard(f"sampler vocab={vocab} rows={rows}"):
                logits = context.random(rows, vocab)
                temperatures = torch.full((rows,), 0.8, dtype=torch.float32, device=context.device)
                for variant, params in (("greedy", SamplingTensors()), ("random", SamplingTensors(temperatures))):
                    run.time("sampler", lambda i: sampler(logits, params), calls=1, graph=False, variant=variant,
                             m=rows, width=vocab)


# ---- graph replay and launch overheads


def graph_replay_table(run: TableRun, context: ProfileContext) -> None:
    """A CUDA graph of m one-element kernels, replayed and waited for on the host clock: the seconds a step pays
    for its graph beyond the kernels' work (on the CPU, the m kernels run eagerly)."""
    import torch

    x = context.random(1)
    for nodes in context.grid.replay_nodes:
        if not run.open():
            return
        with run.guard(f"graph_replay m={nodes}"):
            def burst():
                for _ in range(nodes):
                    x.neg_()

            replay, graph = burst, False
            if context.timer.on_cuda:
                replay, graph = capture_graph(lambda i: burst(), 1), True
            seconds, repeats = _host_seconds(replay, context)
            run.add("graph_replay", seconds, repeats, graph=graph, m=nodes)


def launch_table(run: TableRun, context: ProfileContext) -> None:
    """m kernels launched eagerly one after another and waited for on the host clock: a torch one ("torch") and
    one of the engine's Triton kernels through its Python launcher ("triton", the SwiGLU gate of one token)."""
    from engine.layers.activation import silu_and_mul

    x, gate_up = context.random(1), context.random(1, 128)
    kernels = {"torch": lambda: x.neg_(), "triton": lambda: silu_and_mul(gate_up)}
    for count in context.grid.launch_counts:
        for variant, kernel in kernels.items():
            if not run.open():
                return
            with run.guard(f"launch {variant} m={count}"):
                def burst():
                    for _ in range(count):
                        kernel()

                seconds, repeats = _host_seconds(burst, context)
                run.add("launch", seconds, repeats, variant=variant, graph=False, m=count)


def _host_seconds(run, context: ProfileContext, repeats: int = 20) -> tuple[float, int]:
    """Median host-clock seconds of run() up to the device being done with it."""
    import torch

    def wait():
        if context.timer.on_cuda:
            torch.cuda.synchronize()

    run()
    wait()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        wait()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)), repeats


# ---- host time per step, from the real engine serving on a probe model

HOST_TERMS = ("step", "decode_seq", "prefill_seq", "prefill_token", "mixed_step", "eager_step")


class _DeviceWaitTimer:
    """An executor over a ModelExecutor that keeps, per step, how long the host waited for the device after
    launching the step's work: the step's duration less that wait is the host's time (an eager step's launches
    included, since they overlap the device's work)."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.num_kv_blocks = executor.num_kv_blocks
        self.device_waits: list[float] = []

    def execute(self, scheduler_output):
        from engine.scheduler_output import StepResult

        start = time.perf_counter()
        pending = self.executor.execute_async(scheduler_output)
        launched = time.perf_counter()
        result = pending.result()
        end = time.perf_counter()
        self.device_waits.append(end - launched)
        return StepResult(sampled_token_ids=result.sampled_token_ids, duration=end - start,
                          cuda_graph_batch_size=result.cuda_graph_batch_size)


def probe_model_path(probe: str, folder: Path) -> str:
    """The probe as the engine loads it: a preset or folder name, or PROBE_CONFIG written into `folder`."""
    from engine.model_config import resolve_model_path

    try:
        resolve_model_path(probe)
        return probe
    except FileNotFoundError:
        if probe != "qwen3-1.7b":
            raise
    (folder / "config.json").write_text(json.dumps(PROBE_CONFIG))
    return str(folder)


def _probe_executor(context: ProfileContext, model: str):
    """The real executor on the probe (dummy weights, CUDA graphs as the engine's defaults make them)."""
    import torch
    from engine.config import EngineConfig, default_max_model_len, engine_config_for
    from engine.model_config import load_model_config
    from engine.model_executor import ModelExecutor

    model_config = load_model_config(model)
    if context.grid.probe_engine:
        config = EngineConfig(vocab_size=model_config.vocab_size, **context.grid.probe_engine)
    else:
        memory_gib = torch.cuda.get_device_properties(context.device).total_memory / 2**30
        config = engine_config_for(model_config, gpu_memory_gib=memory_gib,
                                   max_model_len=default_max_model_len(model_config.max_position_embeddings))
    # Less than the engine's 0.9 of the memory: whatever the executor leaves behind, the tables after it still fit.
    executor = ModelExecutor(model, config, dtype=context.dtype_name, device=str(context.device),
                             gpu_memory_utilization=0.6, load_format="dummy", seed=0)
    return executor, config


def host_step_table(run: TableRun, context: ProfileContext) -> None:
    """Serve a Poisson load on the probe with the real engine, take each step's duration less its wait for the
    device, and fit HOST_TERMS to it."""
    grid = context.grid
    if not run.open():
        return
    _release_memory(context.device, collect=True)
    with tempfile.TemporaryDirectory() as folder:
        executor, config = _probe_executor(context, probe_model_path(grid.probe, Path(folder)))
    try:
        steps = _serve_probe(run, executor, config, grid)
        coefficients, report = fit_host_terms(steps)
        run.log(f"host_step: {len(steps)} serving steps, fit {report}")
        for term, seconds_per_unit in coefficients.items():
            run.add("host_step", seconds_per_unit, report["steps"], variant=term, graph=False, tp=1)
        context.host_report = dict(report, probe=grid.probe, probe_layers=executor.model_config.num_hidden_layers)
    finally:
        _release_executor(executor)
        del executor
        _release_memory(context.device, collect=True)


MIN_HOST_STEPS = 40


def _serve_probe(run: TableRun, executor, config, grid: OperatorGrid) -> list[dict]:
    """Serving steps with their device waits, in rounds (each an eager-prompt half and a graph half when mixed-step
    graphs are on) until there are enough for the fit or the table's time is spent."""
    from simulator.profile import serving_steps

    halves = (True, False) if executor.mixed_cuda_graphs else (False,)
    steps: list[dict] = []
    while len(steps) < MIN_HOST_STEPS:
        seconds = min(grid.serving_seconds, run.seconds_left() - 5)
        if seconds < min(grid.serving_seconds, 6.0) / 2:
            run.log(f"host_step: {run.seconds_left():.0f} s left: serving stops at {len(steps)} steps")
            run.cut = True
            break
        for eager in halves:
            timer = _DeviceWaitTimer(executor)
            with executor.eager_prompt_steps() if eager else contextlib.nullcontext():
                rows = serving_steps(timer, config, seconds=seconds / len(halves), rate=grid.serving_rate,
                                     seed=len(steps) + eager)
            # The first steps warm up; the last one's duration never reached the next step's start.
            steps += [dict(row, device_wait=wait) for row, wait in zip(rows[3:-1], timer.device_waits[3:])]
    return steps


def _release_executor(executor) -> None:
    executor.runner.release_graphs()
    executor.shutdown()


def fit_host_terms(steps: list[dict]) -> tuple[dict[str, float], dict]:
    """Host seconds per step (duration less the device wait) as HOST_TERMS' sum, each weight >= 0, fitted to
    relative error; terms no step exercises are left out. Also a report: steps used, median relative error."""
    from simulator.nonnegative_least_squares import nonnegative_least_squares

    host = np.array([step["duration"] - step["device_wait"] for step in steps], dtype=np.float64)
    decode = np.array([step["num_decode_seqs"] for step in steps], dtype=np.float64)
    prefill = np.array([step["num_prefill_seqs"] for step in steps], dtype=np.float64)
    tokens = np.array([step["num_prefill_tokens"] for step in steps], dtype=np.float64)
    eager = np.array([step["cuda_graph_batch_size"] == 0 for step in steps], dtype=np.float64)
    mixed = ((decode > 0) & (prefill > 0)).astype(np.float64)
    design = np.column_stack([np.ones_like(host), decode, prefill, tokens, mixed, eager])
    # Pauses (the collector, the OS) are not the engine's cost per step: the slowest 2% are left out.
    keep = (host > 0) & (host <= np.percentile(host, 98)) if len(host) else host > 0
    used = [term for term, column in zip(HOST_TERMS, design[keep].T) if np.any(column > 0)]
    if keep.sum() < len(used) + 2:
        return {}, {"steps": int(keep.sum()), "error": "too few serving steps to fit"}
    columns = [HOST_TERMS.index(term) for term in used]
    matrix = design[keep][:, columns] / host[keep, None]
    solution = nonnegative_least_squares(matrix, np.ones(int(keep.sum())))
    relative = matrix @ solution - 1.0
    report = {"steps": int(keep.sum()), "median_relative_error": round(float(np.median(np.abs(relative))), 4),
              "unmeasured": [term for term in HOST_TERMS if term not in used]}
    return dict(zip(used, (float(value) for value in solution))), report


# ---- all-reduce across GPUs


def all_reduce_table(run: TableRun, context: ProfileContext) -> None:
    """NCCL all-reduce by message size at every TP up to the GPUs lent (nothing with one GPU)."""
    import torch

    count = torch.cuda.device_count() if context.timer.on_cuda else 0
    if count < 2:
        context.all_reduce_note = f"not measured ({count} GPU{'s' if count != 1 else ''})"
        return
    for tp in [tp for tp in (2, 4, 8) if tp <= count]:
        if not run.open():
            return
        with run.guard(f"all_reduce tp={tp}"):
            for message_bytes, seconds in time_all_reduce(tp, context.grid.all_reduce_bytes, context.dtype_name,
                                                          timeout=max(30.0, run.seconds_left())):
                run.add("all_reduce", seconds, 10, graph=False, bytes=message_bytes, tp=tp)
    context.all_reduce_note = f"measured on {count} GPUs"


def time_all_reduce(world: int, sizes, dtype: str, timeout: float = 120.0) -> list[tuple[int, float]]:
    """(bytes, median seconds) of an all-reduce over `world` processes, one GPU each (NCCL), or on the CPU (gloo)."""
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the shared GPU machines
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = _free_port()
    processes = [spawn.Process(target=_all_reduce_worker, args=(rank, world, port, list(sizes), dtype, results),
                               daemon=True) for rank in range(world)]
    for process in processes:
        process.start()
    try:
        status, payload = results.get(timeout=timeout)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    if status != "ok":
        raise RuntimeError(f"all-reduce worker failed:\n{payload}")
    return payload


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce_worker(rank: int, world: int, port: int, sizes, dtype: str, results) -> None:
    """One rank: join the group, time each message size (rank 0 reports); any error is reported, not raised."""
    import torch
    import torch.distributed as dist

    try:
        on_cuda = torch.cuda.is_available()
        device = torch.device("cuda", rank) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        timings = [(size, _time_one_all_reduce(size, getattr(torch, dtype), device)) for size in sizes]
        if rank == 0:
            results.put(("ok", timings))
    except Exception:  # noqa: BLE001 - the parent raises it with the traceback
        results.put(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _time_one_all_reduce(size: int, dtype, device) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.randn(max(1, size // dtype.itemsize), dtype=dtype, device=device)
    if device.type == "cuda":
        return _median_event_seconds(lambda: dist.all_reduce(tensor), 5, 2)
    samples = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


# ---- the profile


# Tables in order of importance, with their share of the time budget; a table may use what earlier ones left.
TABLES = (
    ("gemm", 0.20, gemm_table),
    ("decode_attention", 0.10, decode_attention_table),
    ("prefill_attention", 0.10, prefill_attention_table),
    ("kv_store", 0.015, kv_store_table),
    ("rms_norm", 0.02, rms_norm_table),
    ("rotary", 0.04, rotary_table),
    ("silu_and_mul", 0.04, silu_and_mul_table),
    ("embedding", 0.015, embedding_table),
    ("sampler", 0.02, sampler_table),
    ("graph_replay", 0.01, graph_replay_table),
    ("launch", 0.01, launch_table),
    ("host_step", 0.21, host_step_table),
    ("all_reduce", 0.04, all_reduce_table),
    ("gemm_general", 0.18, general_gemm_table),
)


def profile_operators(out_path, *, device: str = "cuda", dtype: str = "bfloat16", max_seconds: float = 300.0,
                      grid: OperatorGrid | None = None, log=print) -> Path:
    """Time every table within max_seconds (setup and writing included) and write the Parquet file; its path."""
    import torch

    started = time.perf_counter()
    out_path = Path(out_path)
    with _one_thread_on_cpu(torch.device(device)), torch.inference_mode():
        context = _context(torch.device(device), getattr(torch, dtype), grid)
        metadata = _metadata(context, max_seconds)
        log(f"operator profile: {metadata['gpu_name']}, {context.dtype_name}, {len(context.models)} models, "
            f"budget {max_seconds:.0f} s; ceilings {context.ceilings.flops / 1e12:.0f} TFLOP/s, "
            f"{context.ceilings.bandwidth / 1e12:.2f} TB/s, L2 {context.ceilings.l2_bytes >> 20} MiB")
        usable = max_seconds - min(10.0, 0.03 * max_seconds)  # time to write the file and exit
        rows, summary = [], []
        for name, deadline, table in _schedule(context, started, usable):
            run = TableRun(name, deadline, context, log)
            try:
                with run.guard(f"the {name} table"):
                    table(run, context)
            finally:
                rows += run.rows
                summary.append((name, len(run.rows), time.perf_counter() - run.started, run.errors, run.cut))
                log(f"{name}: {len(run.rows)} rows in {summary[-1][2]:.1f} s"
                    f"{', cut at its deadline' if run.cut else ''}{f', {run.errors} errors' if run.errors else ''}")
                context.mixed_graph_cache.clear()
                _release_memory(context.device)
                _finish_metadata(metadata, context, summary, started)
                write_operator_profile(rows, metadata, out_path)
    _print_summary(summary, rows, out_path, metadata, log)
    return out_path


@contextlib.contextmanager
def _one_thread_on_cpu(device):
    """On the CPU (a check that every operator runs, whose times mean nothing) one thread: a busy machine's
    oversubscribed threads would make it many times slower."""
    import torch

    if device.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _context(device, dtype, grid: OperatorGrid | None) -> ProfileContext:
    import torch
    from engine.attention import load_backend, resolve_backend_name

    on_cuda = device.type == "cuda"
    if on_cuda:
        from engine.layers.fusion import enable_fusion

        if device.index is None:  # set_device (and MixedStepGraphs) want the index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        enable_fusion()  # the norms, rotary, SwiGLU gate and sampler run as the engine runs them on a GPU
    grid = grid or (FULL_GRID if on_cuda else quick_grid())
    torch.manual_seed(0)
    name = grid.attention_backend
    backend = load_backend(name if name == "triton" else resolve_backend_name(name, device, BLOCK_SIZE))
    models = grid.models or supported_models()
    return ProfileContext(device, dtype, grid, OperatorTimer(on_cuda, repeats=5 if on_cuda else 3),
                          measure_ceilings(device, dtype), backend,
                          models)


def _schedule(context: ProfileContext, started: float, usable: float):
    """(name, deadline, table) in order: each table's deadline ends its cumulative share of the usable time."""
    import torch

    several_gpus = context.timer.on_cuda and torch.cuda.device_count() > 1
    shares = [(name, share if name != "all_reduce" or several_gpus else 0.0, table) for name, share, table in TABLES]
    total = sum(share for _, share, _ in shares)
    elapsed = time.perf_counter() - started
    cumulative = 0.0
    for name, share, table in shares:
        cumulative += share / total
        yield name, started + elapsed + (usable - elapsed) * cumulative, table


def _metadata(context: ProfileContext, max_seconds: float) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_cuda = context.timer.on_cuda
    gpu_name = torch.cuda.get_device_name(context.device) if on_cuda else f"cpu ({os.cpu_count()} cores)"
    from simulator.gpu_specs import gpu_key

    grid = context.grid
    return {
        "format": FORMAT, "version": VERSION, "gpu": gpu_key(gpu_name) if on_cuda else "cpu", "gpu_name": gpu_name,
        "device_count": torch.cuda.device_count() if on_cuda else 0, "dtype": context.dtype_name,
        "torch_version": torch.__version__, "triton_version": triton_version, "cuda_version": torch.version.cuda or "",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "max_seconds": max_seconds, "attention_backend": context.backend.name,
        "models": json.dumps([dims.name for dims in context.models]), "tp_candidates": json.dumps(grid.tp_candidates),
        "block_size": BLOCK_SIZE, "l2_bytes": context.ceilings.l2_bytes,
        "matmul_flops_per_s": round(context.ceilings.flops), "copy_bytes_per_s": round(context.ceilings.bandwidth),
        "decode_table_tokens": grid.decode_table_tokens, "mixed_graph_seqs": grid.mixed_graph_seqs,
        "mixed_graph_tokens": grid.mixed_graph_tokens,
        "timing": "median seconds per call; graph rows: a replayed CUDA graph of many calls over their count; "
                  "graph_replay: host clock per replay of a graph of m kernels, until done; launch: host clock of m "
                  "eager launches, until done; host_step: fitted seconds per unit of the term",
    }


def _finish_metadata(metadata: dict, context: ProfileContext, summary, started: float) -> None:
    """The metadata as it stands after a table: tables cut, errors, seconds so far, the host fit, all-reduce."""
    metadata["tables"] = json.dumps({name: {"rows": rows, "seconds": round(seconds, 1), "errors": errors, "cut": cut}
                                     for name, rows, seconds, errors, cut in summary})
    metadata["complete"] = len(summary) == len(TABLES) and not any(cut for *_, cut in summary)
    metadata["errors"] = sum(errors for _, _, _, errors, _ in summary)
    metadata["seconds"] = round(time.perf_counter() - started, 1)
    metadata["all_reduce"] = getattr(context, "all_reduce_note", "not measured")
    report = getattr(context, "host_report", None)
    metadata["host_step"] = json.dumps(report) if report else "not measured"


def write_operator_profile(rows: list[dict], metadata: dict, out_path: Path) -> pa.Table:
    """Write the rows with the metadata in the schema, atomically; the table."""
    schema = OPERATOR_PROFILE_SCHEMA.with_metadata({key: str(value) for key, value in metadata.items()})
    table = pa.Table.from_pylist(rows, schema=schema)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(table, temporary, compression="zstd")
    temporary.replace(out_path)
    return table


def read_operator_profile(path) -> pa.Table:
    """Read a profile, checking its format, version and columns."""
    table = pq.read_table(path)
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} file")
    if not table.schema.remove_metadata().equals(OPERATOR_PROFILE_SCHEMA):
        raise ValueError(f"{path}: columns differ from OPERATOR_PROFILE_SCHEMA")
    return table


def _print_summary(summary, rows: list[dict], out_path: Path, metadata: dict, log) -> None:
    log(f"{'table':<18} {'rows':>6} {'seconds':>8} {'errors':>6}  status")
    for name, count, seconds, errors, cut in summary:
        log(f"{name:<18} {count:>6} {seconds:>8.1f} {errors:>6}  {'cut' if cut else 'done'}")
    size = out_path.stat().st_size
    warning = " (over the device's 16 MiB file limit!)" if size > MAX_FILE_BYTES else ""
    log(f"wrote {len(rows)} rows to {out_path} ({size / 1024:.0f} KiB{warning}) in {metadata['seconds']} s; "
        f"complete: {metadata['complete']}; all_reduce: {metadata['all_reduce']}")


def add_operator_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator profile's options, for `python -m simulator.operator_profile` (and the twinfer CLI)."""
    parser.add_argument("--out", required=True, help="Parquet file to write")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="total time budget, setup included")
    parser.add_argument("--quick", action="store_true", help="tiny grids: a check that every operator runs")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")


def operator_profile_from_args(args: argparse.Namespace) -> Path:
    """Run profile_operators() with add_operator_profile_arguments' options."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    grid = quick_grid() if args.quick else None
    return profile_operators(args.out, device=device, dtype=dtype, max_seconds=args.max_seconds, grid=grid)


def main(argv=None) -> int:
    """CLI: python -m simulator.operator_profile --out FILE.parquet [--max-seconds S] [--quick]."""
    parser = argparse.ArgumentParser(prog="python -m simulator.operator_profile", description=__doc__.split("\n")[0])
    add_operator_profile_arguments(parser)
    operator_profile_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
