"""The operator profiler run end to end on the CPU with its tiny grid: the file the composed cost model reads.

The GPU-only parts (CUDA graphs, events, NCCL) cannot run here; the Triton kernels' variants run under Triton's
interpreter, which must be switched on before triton is first imported (another module may have imported it
first: those tests then rerun this file in a fresh interpreter process).
"""

import dataclasses
import json
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

# First: it switches Triton's interpreter on before any kernel module imports triton.
from tests.triton_interpreter import needs_triton, rerun_in_fresh_process, runs_elsewhere  # noqa: I001

from simulator import operator_profile as profiler
from simulator.all_reduce_profile import time_all_reduce
from simulator.host_step_profile import HOST_TERMS, fit_host_terms
from simulator.operator_profile_schema import FORMAT, OPERATORS, VERSION
from simulator.operator_shapes import (FULL_GRID, attention_layouts, coarse_first, general_gemm_shapes,
                                       preset_gemm_shapes, quick_grid, supported_models)
from simulator.operator_timing import Ceilings, OperatorTimer, ProfileContext, TableRun, operator_row

EXPECTED_OPERATORS = set(OPERATORS) - {"all_reduce", "graph_gap"}  # several GPUs; device times (a GPU)


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    """(rows as a dict of columns, metadata, log lines) of one quick profile on the CPU."""
    path = tmp_path_factory.mktemp("operators") / "cpu_operators.parquet"
    lines = []
    profiler.profile_operators(path, device="cpu", dtype="float32", max_seconds=120,
                               grid=quick_grid(), log=lines.append)
    table = profiler.read_operator_profile(path)
    metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    return table.to_pydict(), metadata, lines


def _rows(columns: dict, **where) -> list[dict]:
    names = list(columns)
    rows = [dict(zip(names, values)) for values in zip(*columns.values())]
    return [row for row in rows if all(row[key] == value for key, value in where.items())]


def test_file_reads_with_the_schema_and_names_the_machine(quick_profile):
    columns, metadata, lines = quick_profile
    assert metadata["format"] == FORMAT and metadata["version"] == VERSION
    assert metadata["gpu"] == "cpu" and metadata["gpu_name"].startswith("cpu")
    assert metadata["torch_version"] == torch.__version__ and metadata["date"].startswith("20")
    assert metadata["complete"] == "True" and metadata["errors"] == "0"
    assert metadata["all_reduce"].startswith("not measured")
    assert 0 < float(metadata["seconds"]) < 120
    assert any(line.startswith("wrote ") for line in lines)  # the summary the GPU log ends with


def test_every_operator_the_composer_needs_is_there_with_positive_times(quick_profile):
    columns, _, _ = quick_profile
    assert set(columns["op"]) == EXPECTED_OPERATORS
    timed = [row for row in _rows(columns) if row["op"] != "host_step"]
    assert all(row["seconds"] > 0 and row["repeats"] > 0 for row in timed)
    assert not any(row["graph"] for row in timed)  # no CUDA graphs on the CPU, and the rows say so
    variants = {(row["op"], row["variant"]) for row in _rows(columns)}
    assert {("decode_attention", ""), ("decode_attention", "exact_table"), ("rotary", ""), ("rotary", "qk_norm"),
            ("sampler", "greedy"), ("sampler", "random"), ("launch", "torch"), ("launch", "triton")} <= variants


def test_gemm_covers_every_linear_layer_of_every_model_at_every_tp(quick_profile):
    columns, _, _ = quick_profile
    timed = {(row["n"], row["k"]) for row in _rows(columns, op="gemm")}
    grid = quick_grid()
    for dims in grid.models:
        for tp in dims.tp_degrees(grid.tp_candidates):
            assert set(dims.linear_shapes(tp).values()) <= timed, (dims.name, tp)


def test_gemm_time_grows_with_m(quick_profile):
    columns, _, _ = quick_profile
    n, k = 384 * 2, 128  # tiny-qwen3's gate_up at TP 1
    seconds = {row["m"]: row["seconds"] for row in _rows(columns, op="gemm", n=n, k=k)}
    assert sorted(seconds) == [1, 16, 128, 512]
    assert seconds[512] > 4 * seconds[1]
    assert seconds[512] > seconds[128] > seconds[1]


def test_attention_rows_carry_their_shapes(quick_profile):
    columns, _, _ = quick_profile
    decode = _rows(columns, op="decode_attention", variant="")
    assert {(row["num_heads"], row["num_kv_heads"], row["head_dim"]) for row in decode} == {
        (4, 2, 32), (8, 2, 32), (2, 1, 32), (4, 1, 32)}
    assert {(row["num_seqs"], row["context_len"]) for row in decode} == {(1, 40), (3, 40)}
    prefill = _rows(columns, op="prefill_attention")
    assert {(row["num_seqs"], row["query_len"], row["context_len"]) for row in prefill} == {
        (1, 8, 40), (2, 8, 40), (1, 33, 40)}  # 2 x 33 new tokens exceed the grid's 64-token budget


def test_host_step_is_fitted_from_the_probe_serving(quick_profile):
    columns, metadata, _ = quick_profile
    host = {row["variant"]: row["seconds"] for row in _rows(columns, op="host_step")}
    assert set(host) <= set(HOST_TERMS) and {"step", "decode_seq", "prefill_token"} <= set(host)
    assert all(value >= 0 for value in host.values()) and sum(host.values()) > 0
    assert '"probe": "tiny-qwen3"' in metadata["host_step"]


def test_re_measured_tables_replace_their_rows_and_are_named(quick_profile, tmp_path):
    columns, metadata, _ = quick_profile
    base = pa.Table.from_pydict(columns, schema=profiler.OPERATOR_PROFILE_SCHEMA.with_metadata(metadata))
    base_path, update_path, out = tmp_path / "base.parquet", tmp_path / "norms.parquet", tmp_path / "out.parquet"
    profiler.write_operator_profile(base.to_pylist(), metadata, base_path)
    norms = [dict(row, seconds=row["seconds"] / 10) for row in _rows(columns, op="rms_norm")]
    profiler.write_operator_profile(norms, {**metadata, "date": "2026-12-03T13:07:37+00:00"}, update_path)
    merged = profiler.update_operator_profile(base_path, update_path, out)
    read = profiler.read_operator_profile(out).to_pydict()
    assert sorted(row["seconds"] for row in _rows(read, op="rms_norm")) == sorted(row["seconds"] for row in norms)
    assert len(_rows(read, op="gemm")) == len(_rows(columns, op="gemm"))
    assert merged.num_rows == len(columns["op"])
    remeasured = json.loads(dict(merged.schema.metadata)[b"remeasured"])
    assert list(remeasured) == ["rms_norm"] and remeasured["rms_norm"]["date"] == "2026-12-03T13:07:37+00:00"
    assert dict(merged.schema.metadata)[b"host_step"].decode() == metadata["host_step"]
    # A re-measured host-step table brings its own report (fit, probe) with it; the others keep the base's.
    host = [dict(row, seconds=row["seconds"] * 2) for row in _rows(columns, op="host_step")]
    profiler.write_operator_profile(host, {**metadata, "host_step": '{"probe": "other", "probe_layers": 3}'},
                                    update_path)
    merged = profiler.update_operator_profile(out, update_path, out)
    assert json.loads(dict(merged.schema.metadata)[b"host_step"]) == {"probe": "other", "probe_layers": 3}
    assert set(json.loads(dict(merged.schema.metadata)[b"remeasured"])) == {"rms_norm", "host_step"}
    profiler.write_operator_profile(norms, {**metadata, "dtype": "float16"}, update_path)
    with pytest.raises(ValueError, match="dtype"):
        profiler.update_operator_profile(base_path, update_path, out)


def test_a_short_budget_stops_cleanly_and_says_so(tmp_path):
    path = tmp_path / "short.parquet"
    lines = []
    profiler.profile_operators(path, device="cpu", dtype="float32", max_seconds=0.5, grid=quick_grid(),
                               log=lines.append)
    table = profiler.read_operator_profile(path)
    metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    assert metadata["complete"] == "False"
    assert '"cut": true' in metadata["tables"]
    assert "host_step" not in set(table.column("op").to_pylist())  # no probe built once its time is gone


def test_shapes_of_the_full_grid():
    models = {dims.name: dims for dims in supported_models()}
    assert {"qwen3-0.6b", "qwen3-8b", "qwen3-32b", "llama-3-8b", "qwen3-1.7b", "qwen3-4b", "qwen3-14b",
            "llama-3-70b", "qwen2.5-7b", "qwen2.5-72b"} <= set(models)
    assert "tiny-qwen3" not in models
    assert models["qwen2.5-7b"].tp_degrees((1, 2, 4, 8)) == [1, 2, 4]  # 28 heads and 4 KV heads
    assert models["qwen3-8b"].linear_shapes(2) == {
        "qkv": ((16 + 2 * 4) * 128, 4096), "o": (4096, 16 * 128), "gate_up": (12288, 4096), "down": (4096, 6144),
        "lm_head": (151936 // 2, 4096)}
    grid = FULL_GRID
    shapes = preset_gemm_shapes(tuple(models.values()), grid.tp_candidates, grid.lm_head_max_m)
    assert len({(n, k) for n, k, _ in shapes}) == len(shapes)
    largest_m = {(n, k): limit for n, k, limit in shapes}
    assert largest_m[(151936, 4096)] == grid.lm_head_max_m  # an LM head runs on sampled rows only
    assert largest_m[(12288 * 2, 4096)] > max(grid.gemm_m)  # qwen3-8b's gate_up: the whole m grid
    general = general_gemm_shapes(grid, shapes)
    assert not {(n, k) for n, k, _ in general} & set(largest_m)
    assert all(n * k <= grid.general_max_weight for n, k, _ in general)
    with pytest.raises(ValueError, match="validated"):
        dataclasses.replace(grid, probe="qwen3-8b")
    coarse, rest = coarse_first(grid.gemm_m)
    assert coarse[0] == 1 and coarse[-1] == 16384 and sorted(coarse + rest) == sorted(grid.gemm_m)


def test_fit_host_terms_recovers_known_costs():
    rng = np.random.default_rng(0)
    truth = {"step": 200e-6, "decode_seq": 3e-6, "prefill_seq": 40e-6, "prefill_token": 50e-9, "mixed_step": 30e-6,
             "eager_step": 2e-3}
    steps = []
    for _ in range(400):
        decodes, prefills = int(rng.integers(0, 200)), int(rng.integers(0, 3))
        tokens = int(rng.integers(1, 2000)) * prefills
        eager = bool(prefills and rng.random() < 0.5)
        host = (truth["step"] + truth["decode_seq"] * decodes + truth["prefill_seq"] * prefills
                + truth["prefill_token"] * tokens + truth["mixed_step"] * (decodes > 0 and prefills > 0)
                + truth["eager_step"] * eager) * rng.normal(1.0, 0.01)
        wait = float(rng.uniform(1e-3, 2e-2))
        steps.append({"duration": host + wait, "device_wait": wait, "num_decode_seqs": decodes,
                      "num_prefill_seqs": prefills, "num_prefill_tokens": tokens,
                      "cuda_graph_batch_size": 0 if eager else 8})
    fitted, report = fit_host_terms(steps)
    assert report["median_relative_error"] < 0.02 and report["unmeasured"] == []
    for term, value in truth.items():
        assert fitted[term] == pytest.approx(value, rel=0.15), term


def test_fit_host_terms_takes_a_graph_steps_device_work_where_it_was_timed():
    """With CUDA-event device times a graph step's host is its duration less the device's work, not less the host's
    wait after the launch (which misses the device work done while the launch was returning); an eager step's
    host stays its duration less that wait (its launches are the host's)."""
    rng = np.random.default_rng(1)
    steps = []
    for index in range(300):
        decodes, eager = int(rng.integers(1, 200)), index % 3 == 0
        host = (300e-6 + 4e-6 * decodes + 5e-3 * eager) * rng.normal(1.0, 0.01)
        device = float(rng.uniform(2e-3, 2e-2))
        overlap = 0.0 if eager else 7e-6 * decodes  # device work done before the launch returned
        steps.append({"duration": host + device, "device_seconds": device if not eager else device + 5e-3,
                      "device_wait": device - overlap, "num_decode_seqs": decodes, "num_prefill_seqs": 0,
                      "num_prefill_tokens": 0, "cuda_graph_batch_size": 0 if eager else 8})
    fitted, report = fit_host_terms(steps)
    assert report["measure"] == "graph_device_work"
    assert fitted["step"] == pytest.approx(300e-6, rel=0.1) and fitted["decode_seq"] == pytest.approx(4e-6, rel=0.1)
    assert fitted["eager_step"] == pytest.approx(5e-3, rel=0.05)
    waited, report = fit_host_terms([dict(step, device_seconds=None) for step in steps])
    assert report["measure"] == "device_wait" and waited["decode_seq"] > 8e-6


class _HostClockEvent:
    """torch.cuda.Event on the host clock, so the GPU timing path runs here."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.seconds = None

    def record(self) -> None:
        self.seconds = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostClockEvent") -> float:
        return (end.seconds - self.seconds) * 1e3


def test_the_gpu_timing_path_with_cuda_stood_in_for(monkeypatch):
    """What the GPU run does (graphs of many calls sized by the roofline, inputs rotated past the L2, replays timed by
    events), with CUDA's graph capture and events replaced by plain calls and the host clock."""
    from engine.attention import load_backend

    captured = []

    def capture(call, calls):
        captured.append(calls)
        return lambda: [call(index) for index in range(calls)]

    monkeypatch.setattr(torch.cuda, "Event", _HostClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(OperatorTimer, "capture", staticmethod(capture))
    grid = quick_grid()
    ceilings = Ceilings(flops=2e10, bandwidth=5e9, l2_bytes=256 << 10)
    timer = OperatorTimer(on_cuda=True, sample_seconds=2e-5)
    context = ProfileContext(torch.device("cpu"), torch.float32, grid, timer, ceilings, load_backend("torch"),
                                      grid.models)
    rows, errors = [], []
    with profiler.one_thread_on_cpu(context.device), torch.inference_mode():
        for name, _, table in profiler.TABLES:
            if name not in ("host_step", "all_reduce"):
                run = TableRun(name, time.perf_counter() + 60, context, errors.append)
                table(run, context)
                rows += run.rows
    assert not errors, errors
    eager = {"sampler", "launch"}  # the engine runs these outside its graphs
    assert all(row["graph"] == (row["op"] not in eager) and row["seconds"] > 0 for row in rows)
    # The smallest weight (128 x 64 floats, 32 KiB) takes 24 copies to span three times the 256 KiB L2, each
    # called once a replay; a KV cache's copies stop at 64.
    assert 24 in captured and max(captured) == 64


class _CountingTimer(OperatorTimer):
    """Runs nothing: every call is 10 us (for walking the full grid on the meta device)."""

    def seconds(self, call, *, calls, graph=True):
        return 1e-5, 5, graph


@pytest.mark.slow
def test_the_full_grid_builds_every_shape_and_composes_every_preset(tmp_path):
    """The GPU run's tables walked on the meta device (every weight, cache, block table, work map and tile map at
    its real size, nothing computed), then the composed cost model built from such a file for every preset at
    every TP it splits at."""
    from engine.attention import load_backend
    from simulator.composed import ComposedCostModel
    from simulator.model_shape import ModelShape
    from simulator.operator_tables import OperatorProfile

    models = supported_models()
    ceilings = Ceilings(flops=7.8e14, bandwidth=4.3e12, l2_bytes=60 << 20)
    context = ProfileContext(torch.device("meta"), torch.bfloat16, FULL_GRID, _CountingTimer(on_cuda=True), ceilings,
                             load_backend("triton"), models)
    rows, errors, counts = [], [], {}
    timed_here = ("gemm", "decode_attention", "prefill_attention", "kv_store", "rms_norm", "rotary", "silu_and_mul",
                  "embedding", "gemm_general")
    with torch.inference_mode():
        for name, _, table in profiler.TABLES:
            if name in timed_here:
                run = TableRun(name, time.perf_counter() + 120, context, errors.append)
                table(run, context)
                rows += run.rows
                counts[name] = len(run.rows)
    assert not errors, errors[:3]
    assert counts["gemm"] == sum(sum(m <= largest for m in FULL_GRID.gemm_m)
                                 for _, _, largest in preset_gemm_shapes(models, FULL_GRID.tp_candidates,
                                                                         FULL_GRID.lm_head_max_m))
    decode_shapes = sum(seqs * context <= FULL_GRID.decode_max_tokens for seqs in FULL_GRID.decode_seqs
                        for context in FULL_GRID.decode_contexts)
    layouts = len(attention_layouts(models, FULL_GRID))
    assert decode_shapes == 83 and layouts == 21
    assert counts["decode_attention"] == decode_shapes * layouts * 3 and counts["prefill_attention"] == 21 * 24 * 2
    rows += [operator_row(op, 1e-5 * max(1, m), 5, variant=variant, graph=op == "graph_replay",
                                   dtype="bfloat16", m=m, width=width)
             for op, variant, m, width in [("sampler", "greedy", 1, 151936), ("sampler", "greedy", 1024, 151936),
                                           ("graph_replay", "", 1, 0), ("graph_replay", "", 2048, 0),
                                           ("launch", "torch", 1, 0), ("launch", "torch", 512, 0),
                                           ("launch", "triton", 1, 0), ("launch", "triton", 512, 0)]]
    rows += [operator_row("host_step", 1e-5, 100, variant=term, graph=False, dtype="bfloat16", tp=1)
             for term in HOST_TERMS]
    path = tmp_path / "walked.parquet"
    profiler.write_operator_profile(rows, {"format": FORMAT, "version": VERSION, "gpu": "h200"}, path)
    profile = OperatorProfile.read(path)
    for dims in models:
        for tp in dims.tp_degrees(FULL_GRID.tp_candidates):
            model = ComposedCostModel(ModelShape.load(dims.name), profile, tp=tp, interconnect_bandwidth=4.5e11)
            assert model.predict(_mixed_step()) > 0, (dims.name, tp)


def _mixed_step():
    from engine.stats import BatchFeatures

    return BatchFeatures(num_prefill_seqs=1, num_prefill_tokens=512, num_decode_seqs=32, num_decode_tokens=32,
                         decode_context_tokens=32 * 2000, prefill_context_tokens=1024,
                         prefill_attention_work=512 * (1024 + 256.5), num_batched_tokens=544)


@pytest.mark.slow
def test_all_reduce_workers_report_each_message_size():
    timings = time_all_reduce(2, (1024, 1 << 16), "float32", timeout=120)
    assert [size for size, _ in timings] == [1024, 1 << 16]
    assert all(seconds > 0 for _, seconds in timings)


@runs_elsewhere
def test_triton_variants_in_fresh_process():
    rerun_in_fresh_process(__file__)


@pytest.mark.slow
@needs_triton
def test_triton_variants_run_under_the_interpreter():
    """The Triton backend's variants (decode work map, prefill tile map) and the fused kernels, on tiny shapes."""
    from engine.layers.fusion import disable_fusion, enable_fusion

    tiny = quick_grid().models[0]
    grid = dataclasses.replace(quick_grid(), models=(tiny,), tp_candidates=(1,), attention_backend="triton",
                               decode_seqs=(2,), prefill_seqs=(2,), prefill_query_lens=(17,), elementwise_m=(5,),
                               sampler_rows=(3,))
    enable_fusion(cpu_too=True)
    try:
        with torch.inference_mode():
            context = profiler.profile_context(torch.device("cpu"), torch.float32, grid)
            rows, errors = [], []
            for name, _, table in profiler.TABLES[:9]:
                run = TableRun(name, float("inf"), context, errors.append)
                table(run, context)
                rows += run.rows
    finally:
        disable_fusion()
    assert not errors, errors
    variants = {(row["op"], row["variant"]) for row in rows}
    assert {("decode_attention", ""), ("decode_attention", "exact_table"), ("decode_attention", "work_map"),
            ("prefill_attention", ""), ("prefill_attention", "tile_map"), ("kv_store", ""), ("rms_norm", ""),
            ("rotary", "qk_norm"), ("silu_and_mul", ""), ("sampler", "random")} <= variants


def test_the_profile_so_far_holds_the_bases_other_tables_and_this_runs(quick_profile):
    """What the host-step table composes its probe from in an --update run: the base profile's rows of the tables
    this run does not time, and this run's rows in their place."""
    columns, metadata, _ = quick_profile
    base = pa.Table.from_pydict(columns, schema=profiler.OPERATOR_PROFILE_SCHEMA.with_metadata(metadata))
    context = ProfileContext(torch.device("cpu"), torch.float32, FULL_GRID, OperatorTimer(False), Ceilings(1, 1, 0),
                             None, ())
    context.base_table = base
    context.measured_rows += [dict(row, seconds=1.0) for row in _rows(columns, op="rms_norm")]
    host = [operator_row("host_step", 2.0, 1, variant="step", graph=False, dtype="float32", tp=1)]
    profile = context.profile_so_far(host)
    ops = profile.columns["op"]
    assert (profile.columns["seconds"][ops == "rms_norm"] == 1.0).all()
    assert (ops == "rms_norm").sum() == len(_rows(columns, op="rms_norm"))
    assert profile.columns["seconds"][ops == "host_step"].tolist() == [2.0]
    assert (ops == "gemm").sum() == len(_rows(columns, op="gemm"))
