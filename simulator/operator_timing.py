"""How an operator profile times an operator: inside a replayed CUDA graph of many calls on a GPU (eagerly for what
the engine runs outside its graphs, on the host clock on the CPU), with inputs rotated past the L2; and the context
and per-table bookkeeping every table of the profile shares."""

import contextlib
import dataclasses
import gc
import math
import time
import traceback
from dataclasses import dataclass

import numpy as np

from simulator.operator_profile_schema import OPERATOR_PROFILE_SCHEMA
from simulator.operator_shapes import BLOCK_SIZE, ModelDims, OperatorGrid


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
    copy_s = median_event_seconds(lambda: target.copy_(source), 5)
    del source, target
    a, b = torch.randn(8192, 8192, dtype=dtype, device=device), torch.randn(8192, 8192, dtype=dtype, device=device)
    matmul_s = median_event_seconds(lambda: a @ b, 5)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return Ceilings(flops=2 * 8192**3 / matmul_s, bandwidth=2 * (1 << 30) / copy_s, l2_bytes=int(l2_bytes))


def median_event_seconds(run, repeats: int, count: int = 1, warm: bool = True) -> float:
    """Median over repeats of run() called count times between two CUDA events, per call (warm: after one
    untimed call)."""
    import torch

    if warm:
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
        run = self.capture(call, calls) if graph else (lambda: [call(i) for i in range(calls)])
        one = median_event_seconds(run, 1)  # a warm replay, then one timed: how many make a sample
        inner = min(32, max(1, math.ceil(self.sample_seconds / one)))
        repeats = self.repeats if one < 0.02 else 3
        return median_event_seconds(run, repeats, inner, warm=False) / calls, repeats, graph

    def chain(self, call, calls: int):
        """replays -> seconds of that many back-to-back runs of call(0) .. call(calls - 1) (a CUDA graph on a GPU,
        timed with events; on the CPU eagerly on the host clock)."""
        if not self.on_cuda:
            def run_eagerly(replays: int) -> float:
                start = time.perf_counter()
                for _ in range(replays):
                    for index in range(calls):
                        call(index)
                return time.perf_counter() - start

            return run_eagerly
        replay = self.capture(call, calls)
        replay()
        # One event-timed sample of `replays` replays back to back.
        return lambda replays: median_event_seconds(replay, 1, replays, warm=False) * replays

    @staticmethod
    def capture(call, calls: int):
        """A CUDA graph of call(0) .. call(calls - 1), captured as the engine captures its steps; its replay."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for index in range(calls):
                call(index)
        return graph.replay

    def _host_clock(self, call, calls: int) -> tuple[float, int]:
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            for index in range(calls):
                call(index)
            samples.append((time.perf_counter() - start) / calls)
        return float(np.median(samples)), self.repeats


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
    measured_rows: list = dataclasses.field(default_factory=list)
    """Rows of the tables this run has finished (the profiler appends them)."""
    base_table: object = None
    """With --update, the profile whose other tables this run's are merged into (a pyarrow Table), else None."""

    def profile_so_far(self, rows: list[dict]):
        """An OperatorProfile of what the finished profile will hold, as far as timed now: the base's rows of the
        operators this run does not time (with --update), the finished tables' rows and these."""
        import pyarrow as pa

        from simulator.operator_tables import OperatorProfile

        timed = self.measured_rows + rows
        table = pa.Table.from_pylist(timed, schema=OPERATOR_PROFILE_SCHEMA)
        if self.base_table is not None:
            import pyarrow.compute as pc

            ops = pa.array(sorted({row["op"] for row in timed}), pa.string())
            kept = self.base_table.filter(pc.invert(pc.is_in(self.base_table.column("op"), value_set=ops)))
            table = pa.concat_tables([kept.select(table.column_names).cast(table.schema), table])
        return OperatorProfile.from_table(table, source="this profile run")

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
            release_memory(self.context.device, collect=True)

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


def release_memory(device, collect: bool = False) -> None:
    """Give the allocator's cached blocks back (collect: after dropping objects that may sit in reference cycles)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
