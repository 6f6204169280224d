"""The composed cost model on a synthetic operator profile: interchangeable with the calibrated one (decode runs bit
for bit, vectorized columns), sensible in tokens, context and TP, stored and rebuilt exactly, and clear about what
a partial profile lacks."""

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.graph_dispatch import GraphDispatch, decode_graph_sizes
from engine.sampling_params import SamplingParams
from engine.stats import BatchFeatures
from simulator.composed import ComposedCostModel
from simulator.executor import DECODE_GRAPHS_ONLY, CostModelExecutor
from simulator.host_step_profile import fit_graph_gaps
from simulator.model_operators import kernel_counts, power_cap_factor
from simulator.model_shape import ModelShape
from simulator.operator_tables import Grid, OperatorProfile, choose_shape, grid_of
from simulator.operator_timing import operator_row
from tests.synthetic_operators import NVLINK, synthetic_operator_profile

GEMMS = ("qkv", "o", "gate_up", "down")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> OperatorProfile:
    path = synthetic_operator_profile(tmp_path_factory.mktemp("ops") / "h200_operators.parquet")
    return OperatorProfile.read(path)


@pytest.fixture(scope="module")
def qwen3_8b(profile) -> ComposedCostModel:
    return ComposedCostModel(ModelShape.load("qwen3-8b"), profile)


@pytest.fixture(scope="module")
def qwen3_8b_tp2(profile) -> ComposedCostModel:
    return ComposedCostModel(ModelShape.load("qwen3-8b"), profile, tp=2)


def decode(num_seqs: int, context: int) -> BatchFeatures:
    return BatchFeatures(0, 0, num_seqs, num_seqs, num_seqs * context, 0, 0.0, num_seqs)


def prefill(tokens: int, context: int = 0) -> BatchFeatures:
    return BatchFeatures(1, tokens, 0, 0, 0, context, tokens * (context + (tokens + 1) / 2), tokens)


def random_step(rng: random.Random) -> tuple[BatchFeatures, int]:
    """A step of any kind the executor produces: decode (graph or eager), prefill, mixed (graph or eager)."""
    num_decode = rng.choice([0, rng.randint(1, 300)])
    chunks = [rng.randint(1, 900) for _ in range(rng.choice([0, 1, 1, 2, 5]))] if num_decode else \
        [rng.randint(2, 2000) for _ in range(rng.randint(1, 4))]
    contexts = [rng.choice([0, rng.randint(1, 5000)]) for _ in chunks]
    decode_context = sum(rng.randint(1, 8000) for _ in range(num_decode))
    tokens = sum(chunks) + num_decode
    features = BatchFeatures(len(chunks), sum(chunks), num_decode, num_decode, decode_context, sum(contexts),
                             sum(n * (c + (n + 1) / 2) for n, c in zip(chunks, contexts)), tokens)
    graph = 0
    if rng.random() < 0.6:
        rows = len(chunks) + num_decode
        graph = next(size for size in (1, 2, 4, *range(8, 4097, 8), 8192) if size >= (rows if tokens == rows else tokens))
    return features, graph


# (tp, async scheduling, max_model_len): 8,192 brings the decode graphs' tables in from the profile's 32,768.
ENGINES = [(1, False, None), (2, False, None), (1, True, None), (1, False, 8192)]


@pytest.mark.parametrize("tp,overlap,width", ENGINES)
@pytest.mark.parametrize("graph", [True, False])
def test_decode_runs_are_bit_for_bit_predict(profile, tp, overlap, width, graph):
    model = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, tp=tp, async_scheduling=overlap,
                              max_model_len=width)
    executor = CostModelExecutor(model, 100_000, graphs=DECODE_GRAPHS_ONLY if graph else GraphDispatch())
    rng = random.Random(tp)
    # Runs that start below the first measured context, cross measured contexts (16, 64) and pass the last (32768).
    crossing = [(3, 1), (64, 10), (7, 60), (100, 32_760)]
    for num_seqs, context in crossing + [(rng.randint(1, 700), rng.randint(1, 40_000)) for _ in range(30)]:
        run = executor.predict_decode_run(num_seqs, num_seqs * context, 25)
        graph_size = executor.cuda_graph_batch_size(num_seqs)
        stepwise = [model.predict(decode(num_seqs, context + step), graph_size) for step in range(25)]
        assert run == stepwise  # exact float equality


def test_engine_fast_forward_matches_stepping(qwen3_8b):
    def run(fast_forward: bool) -> Engine:
        rng = random.Random(3)
        config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=4096, vocab_size=1000)
        engine = Engine(config, CostModelExecutor(qwen3_8b, 2000, graphs=GraphDispatch(
            decode_graph_sizes(64), mixed_sizes=(64, 128, 256, 512), max_mixed_seqs=64)), fast_forward=fast_forward)
        arrival = 0.0
        for index in range(60):
            arrival += rng.expovariate(10.0)
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=rng.randint(1, 300))
            engine.add_request(prompt_len=rng.randint(1, 1500), sampling_params=params, arrival_time=arrival,
                               request_id=str(index))
        engine.run()
        return engine

    stepped, skipped = run(False), run(True)
    assert len(stepped.step_records) == len(skipped.step_records) > 300
    assert list(stepped.step_records) == list(skipped.step_records)
    assert stepped.clock.now() == skipped.clock.now()
    assert {record.status for record in stepped.request_records.values()} == {"finished"}


@pytest.mark.parametrize("tp,overlap,width", ENGINES)
def test_vectorized_columns_equal_predict(profile, tp, overlap, width):
    model = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, tp=tp, async_scheduling=overlap,
                              max_model_len=width)
    rng = random.Random(11)
    steps = [random_step(rng) for _ in range(400)]
    columns = {name: np.array([getattr(features, name) for features, _ in steps])
               for name in BatchFeatures._fields}
    columns["cuda_graph_batch_size"] = np.array([graph for _, graph in steps])
    expected = [model.predict(features, graph) for features, graph in steps]
    np.testing.assert_allclose(model.predict_columns(columns), expected, rtol=1e-9)


def test_time_grows_with_tokens_and_context(qwen3_8b):
    prefills = [qwen3_8b.predict(prefill(tokens), 0) for tokens in (16, 100, 500, 1000, 2000, 4000, 8192)]
    assert prefills == sorted(prefills) and prefills[-1] > 4 * prefills[0]
    cached = [qwen3_8b.predict(prefill(512, context), 0) for context in (0, 1000, 8000, 30_000)]
    assert cached == sorted(cached) and cached[-1] > cached[0]
    for graph in (0, 64):
        contexts = [qwen3_8b.predict(decode(64, context), graph) for context in (10, 500, 5000, 30_000)]
        assert contexts == sorted(contexts) and contexts[-1] > 1.5 * contexts[0]
    batches = [qwen3_8b.predict(decode(num_seqs, 1000), num_seqs) for num_seqs in (1, 8, 64, 256, 512)]
    assert batches == sorted(batches)
    # Past the largest measured point, the last segment goes on: no cliff, no plateau.
    assert qwen3_8b.predict(prefill(20_000), 0) > qwen3_8b.predict(prefill(16_384), 0)


def test_the_composition_adds_up(qwen3_8b):
    step = BatchFeatures(1, 700, 120, 120, 120 * 900, 300, 700 * (300 + 350.5), 820)
    for graph in (0, 1024):
        parts = qwen3_8b.step_breakdown(step, graph)
        device = sum(value for name, value in parts.items() if name not in ("host", "graph_replay")
                     and not name.startswith("launch"))
        if graph:
            expected = parts["host"] + device + parts["graph_replay"]
        else:
            expected = parts["host"] + max(parts["launch (overlaps the GPU)"], device)
        assert qwen3_8b.predict(step, graph) == pytest.approx(expected, rel=1e-9)
    # A decode step of an 8B model on an H200-like GPU: weights read in a few milliseconds, plus host time.
    assert 3e-3 < qwen3_8b.predict(decode(1, 100), 1) < 8e-3


def test_a_graph_costs_its_fixed_replay_once_not_its_kernels_again(qwen3_8b):
    # The synthetic graph_replay is 8 us + 0.9 us a kernel; every operator was "timed in a graph", so a step pays the
    # 8 us only, whatever its kernel count (a 64-layer model's graph has twice the 8B's kernels).
    step = decode(16, 1000)
    assert qwen3_8b.step_breakdown(step, 16)["graph_replay"] == pytest.approx(8e-6, rel=1e-6)
    deeper = ComposedCostModel(ModelShape.load("qwen3-32b"), qwen3_8b.profile)
    assert deeper.step_breakdown(step, 16)["graph_replay"] == pytest.approx(8e-6, rel=1e-6)


def test_tensor_parallelism_halves_the_gemms_and_adds_all_reduces(qwen3_8b, qwen3_8b_tp2):
    step = prefill(4096)
    one, two = qwen3_8b.step_breakdown(step), qwen3_8b_tp2.step_breakdown(step)
    assert sum(two[name] for name in GEMMS) / sum(one[name] for name in GEMMS) == pytest.approx(0.5, abs=0.05)
    assert "all_reduce" not in one and two["all_reduce"] > 0
    assert qwen3_8b_tp2.all_reduce_source == "measured" and "all-reduce measured" in qwen3_8b_tp2.label
    assert qwen3_8b_tp2.predict(step) < qwen3_8b.predict(step)


def test_unmeasured_tp_uses_the_ring_formula_and_says_so(profile):
    # The profile holds all-reduces at tp 2 only (and no tp-4 shapes: those come from the nearest ones).
    shape = ModelShape.load("qwen3-8b")
    model = ComposedCostModel(shape, profile, tp=4, interconnect_bandwidth=NVLINK)
    assert model.all_reduce_source == "nccl-ring-formula"
    assert "all-reduce nccl-ring-formula" in model.label and model.to_json()["all_reduce_source"] == "nccl-ring-formula"
    parts = model.step_breakdown(prefill(1024))
    message = 1024 * shape.hidden_size * 2
    ring = 10e-6 + 2 * 3 / 4 * message / NVLINK
    assert parts["all_reduce"] == pytest.approx((2 * shape.num_layers + 1) * ring)
    with pytest.raises(ValueError, match="no all_reduce rows at tp 4, and no interconnect bandwidth"):
        ComposedCostModel(shape, profile, tp=4)


@pytest.mark.parametrize("tp, bandwidth", [(1, None), (2, None), (4, NVLINK)])
def test_json_round_trip_predicts_identically(profile, tp, bandwidth):
    model = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, tp=tp, interconnect_bandwidth=bandwidth)
    data = json.loads(json.dumps(model.to_json()))
    rebuilt = ComposedCostModel.from_json(data)
    assert len(data["operator_profile"]["rows"]["op"]) < profile.num_rows  # only the rows it used
    assert rebuilt.label == model.label and rebuilt.provenance == "composed" and not rebuilt.calibrated
    rng = random.Random(5)
    for _ in range(200):
        features, graph = random_step(rng)
        assert rebuilt.predict(features, graph) == model.predict(features, graph)


def test_an_unprofiled_model_composes_from_the_nearest_shapes(profile):
    """Qwen3-4B's and Llama-3-8B's gemm shapes are not in the profile; nearest measured shapes scaled by n*k."""
    for name in ("qwen3-4b", "llama-3-8b", "qwen2.5-7b"):
        model = ComposedCostModel(ModelShape.load(name), profile)
        assert 1e-3 < model.predict(decode(8, 500), 8) < model.predict(prefill(2048), 0)
    small, big = ComposedCostModel(ModelShape.load("qwen3-1.7b"), profile), ComposedCostModel(
        ModelShape.load("qwen3-14b"), profile)
    assert small.predict(decode(32, 1000), 32) < big.predict(decode(32, 1000), 32)


def test_nearest_shape_is_scaled_by_its_size(profile):
    rows = profile.rows_of("gemm", dtype="bfloat16")
    exact = choose_shape(profile, rows, ("n", "k"), (4096, 4096), lambda key: key[0] * key[1])
    assert exact.scale == 1.0 and exact.shape == (4096, 4096)
    near = choose_shape(profile, rows, ("n", "k"), (4096, 8192), lambda key: key[0] * key[1])
    assert near.shape != (4096, 8192) and near.scale == pytest.approx(4096 * 8192 / (near.shape[0] * near.shape[1]))


def test_interpolation_rules():
    table = OperatorProfile.from_json({"source": "t", "rows": {
        "op": ["gemm"] * 4, "variant": [""] * 4, "dtype": ["bfloat16"] * 4, "graph": [True] * 4,
        "m": [8, 16, 32, 16], "n": [1] * 4, "k": [1] * 4, "seconds": [1.0, 2.0, 3.0, 4.0]}})
    curve = grid_of(table, np.arange(4), ("m",))
    # Repeats averaged (16: 3.0), then non-decreasing; flat below the first point; last segment continued.
    assert curve.at([1, 8, 12, 16, 24, 32, 48]).tolist() == [1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    # A slow first sample is pooled with the faster ones after it, not carried up the line.
    slow_first = OperatorProfile.from_json({"source": "t", "rows": {
        "op": ["gemm"] * 4, "variant": [""] * 4, "dtype": ["bfloat16"] * 4, "graph": [True] * 4,
        "m": [1, 2, 4, 8], "n": [1] * 4, "k": [1] * 4, "seconds": [13.0, 6.0, 6.0, 7.0]}})
    assert grid_of(slow_first, np.arange(4), ("m",)).at([1, 2, 4, 8, 16]).tolist() == [8.0, 8.0, 8.0, 8.0, 8.0]
    two_axes = Grid((np.array([1.0, 2.0]), np.array([10.0, 20.0])), np.array([[1.0, 2.0], [3.0, 5.0]]))
    assert float(two_axes.at(1.5, 15)) == pytest.approx(2.75)
    assert float(two_axes.at(3, 30)) == pytest.approx(11.0)  # both last segments continued


def test_partial_profiles_name_what_is_missing(tmp_path):
    no_head_dim_64 = OperatorProfile.read(synthetic_operator_profile(tmp_path / "a.parquet", head_dims=(128,)))
    tiny = ModelShape("hd64", 2, 256, 4, 2, 64, 512, 1000, True)
    with pytest.raises(ValueError, match=r"a\.parquet cannot compose hd64.*no decode_attention rows for head_dim 64 "
                                         r"\(measured: 128\).*no prefill_attention rows for head_dim 64"):
        ComposedCostModel(tiny, no_head_dim_64)
    partial = OperatorProfile.read(synthetic_operator_profile(tmp_path / "b.parquet", drop_ops=("rms_norm", "host_step")))
    with pytest.raises(ValueError, match="no rms_norm rows in bfloat16; no host_step rows"):
        ComposedCostModel(ModelShape.load("qwen3-8b"), partial)
    with pytest.raises(ValueError, match=r"no gemm rows in float16 \(it has variant '' in bfloat16\)"):
        ComposedCostModel(ModelShape.load("qwen3-8b"), no_head_dim_64, dtype="float16")
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        ComposedCostModel(ModelShape.load("qwen3-8b"), no_head_dim_64, tp=3)


def test_variants_beyond_the_schema_are_used_where_timed(tmp_path, qwen3_8b):
    """The profiler's extra variants (eager decode tables as wide as the context, the prefill kernel's tile map,
    launches by launcher) refine eager and mixed-graph steps; a profile with only the schema's still composes."""
    schema_only = ComposedCostModel(ModelShape.load("qwen3-8b"), OperatorProfile.read(
        synthetic_operator_profile(tmp_path / "schema.parquet", extra_variants=False)))
    assert schema_only.predict(decode(64, 1000), 64) == qwen3_8b.predict(decode(64, 1000), 64)
    assert qwen3_8b.step_breakdown(decode(64, 1000))["attention"] < schema_only.step_breakdown(decode(64, 1000))[
        "attention"]  # exact_table is the cheaper eager table here
    mixed = BatchFeatures(1, 300, 20, 20, 20 * 800, 0, 300 * 150.5, 320)
    assert qwen3_8b.step_breakdown(mixed, 384)["attention"] > schema_only.step_breakdown(mixed, 384)["attention"]
    # Eager launches: torch's cheaper than Triton's, counted apart.
    assert set(qwen3_8b.operators.launch) == {"torch", "triton"} and set(schema_only.operators.launch) == {"all"}


def test_the_probes_launches_leave_the_eager_host_terms(tmp_path, qwen3_8b):
    """The profiler's host terms of an eager step include launching its probe's kernels; this model's launches
    replace them (metadata naming the probe's layers), where a profile that does not say keeps its terms whole."""
    unsaid = ComposedCostModel(ModelShape.load("qwen3-8b"), OperatorProfile.read(
        synthetic_operator_profile(tmp_path / "unsaid.parquet", probe=None)))
    assert unsaid.probe_launches == 0.0 and 3e-3 < qwen3_8b.probe_launches < 3.8e-3
    for step in (decode(64, 1000), prefill(2048), BatchFeatures(1, 300, 20, 20, 20 * 800, 0, 300 * 150.5, 320)):
        assert unsaid.predict(step, 0) - qwen3_8b.predict(step, 0) == pytest.approx(qwen3_8b.probe_launches)
        assert unsaid.predict(step, 512) == qwen3_8b.predict(step, 512)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="x.parquet: not a Parquet operator profile"):
        OperatorProfile.read(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a composed cost model"):
        ComposedCostModel.from_json({"format": "twinfer-cost-model"})


def test_decode_graphs_are_as_wide_as_the_engines_max_model_len(profile, qwen3_8b):
    """The profile's decode-graph kernel ran on tables 32,768 tokens wide; an engine of max_model_len 8,192 makes
    narrower ones, whose empty partitions cost that share of the difference to an exact-width table."""
    step = decode(40, 1000)
    same = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, max_model_len=32768)
    narrow = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, max_model_len=8192)
    exact = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, max_model_len=1000)
    wide = qwen3_8b.step_breakdown(step, 40)["attention"]
    assert same.step_breakdown(step, 40)["attention"] == wide
    floor = qwen3_8b.step_breakdown(step, 0)["attention"]  # eager steps: the exact-width table
    assert exact.step_breakdown(step, 40)["attention"] == pytest.approx(floor, rel=1e-4)  # tables of whole blocks
    # 36 layers, each 1 us over its exact table at full width: (8192 - 1000) / (32768 - 1000) of it.
    assert narrow.step_breakdown(step, 40)["attention"] - floor == pytest.approx(36e-6 * 7192 / 31768, rel=1e-3)
    assert narrow.predict(step, 0) == qwen3_8b.predict(step, 0)  # eager steps never used the graph's tables


def test_decode_graphs_wider_than_the_profiles_pay_for_their_empty_programs_only(profile):
    """An engine may be wider than the profile's 32,768-token tables (Qwen3's max_position_embeddings is 40,960,
    Qwen2.5's 131,072). At the profile's own width no empty program was timed: a context there costs what an
    empty program cost at the context below, never the whole difference once per token past the profile's width;
    past 65,536 tokens the kernel's partitions double, so its programs stop growing with the table."""
    qwen3 = ModelShape.load("qwen3-8b")
    wide = ComposedCostModel(qwen3, profile, max_model_len=40960)
    floor = ComposedCostModel(qwen3, profile).step_breakdown(decode(64, 32768), 0)["attention"]
    # The synthetic graph kernel is 1 us a layer over its exact table at every context: 32 empty programs at 16,384
    # tokens, so 1/32 us each; at 32,768 the 40,960-wide table has 16 of them.
    assert wide.step_breakdown(decode(64, 32768), 64)["attention"] - floor == pytest.approx(36 * 16e-6 / 32, rel=1e-6)
    qwen25 = ModelShape.load("qwen2.5-7b")
    longest = ComposedCostModel(qwen25, profile, max_model_len=131072)
    floor = ComposedCostModel(qwen25, profile).step_breakdown(decode(40, 1024), 0)["attention"]
    # 62 empty programs of 512 tokens timed at 1,024 tokens; 127 of 1,024 tokens in a 131,072-wide table.
    extra = longest.step_breakdown(decode(40, 1024), 40)["attention"] - floor
    assert extra == pytest.approx(qwen25.num_layers * 1e-6 * 127 / 62, rel=1e-6)


def test_asynchronous_scheduling_overlaps_host_and_device(profile, qwen3_8b):
    """With the host preparing each step while the device runs the one before, a step lasts the longer of the
    two: a large model's decode step its GPU part, a tiny model's mostly host; the stored model keeps the mode."""
    overlapped = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, async_scheduling=True)
    for step, graph in ((decode(32, 1500), 32), (decode(32, 1500), 0), (prefill(2048), 0),
                        (BatchFeatures(1, 300, 20, 20, 20 * 800, 0, 300 * 150.5, 320), 384)):
        parts = qwen3_8b.step_breakdown(step, graph)
        host = parts.pop("host")
        launches = parts.pop("launch (overlaps the GPU)", 0.0)
        device = sum(parts.values())
        expected = max(host + launches, device) if not graph else max(host, device)
        assert overlapped.predict(step, graph) == pytest.approx(expected, rel=1e-9)
        assert overlapped.predict(step, graph) < qwen3_8b.predict(step, graph)
    assert "async" in overlapped.label and "async" not in qwen3_8b.label
    rebuilt = ComposedCostModel.from_json(json.loads(json.dumps(overlapped.to_json())))
    assert rebuilt.predict(decode(32, 1500), 32) == overlapped.predict(decode(32, 1500), 32)


def test_a_slow_sample_is_averaged_into_its_line_not_carried_to_every_larger_shape():
    """Qwen3-0.6B's o GEMM on the H200: 12.9 us at 1 row, 8.4 at 2, 13.1 at 4, then 6.1-6.5 from 8 rows on. The
    line stays non-decreasing, but the larger shapes keep their own times, and a monotone line is left as it is."""
    from simulator.operator_tables import non_decreasing

    measured = np.array([12.9, 8.4, 13.1, 6.1, 6.2, 6.2, 6.3, 6.5, 9.0, 14.0, 25.0])  # to 2,048 rows
    fitted = non_decreasing(measured, np.ones(len(measured)))
    assert np.all(np.diff(fitted) >= 0)
    assert np.all(fitted[:8] < 8.5)  # a running maximum would hold 13.1 up to 1,024 rows
    np.testing.assert_array_equal(fitted[-3:], measured[-3:])
    assert fitted.mean() == pytest.approx(measured.mean())  # least squares keeps the line's total
    monotone = np.array([1.0, 2.0, 2.0, 5.0])
    np.testing.assert_array_equal(non_decreasing(monotone, np.ones(4)), monotone)


def _with_rows(source: Path, target: Path, rows: list[dict]) -> Path:
    table = pq.read_table(source)
    extra = pa.Table.from_pylist(rows, schema=table.schema.remove_metadata())
    pq.write_table(pa.concat_tables([table.replace_schema_metadata(None), extra])
                   .replace_schema_metadata(table.schema.metadata), target)
    return target


def _with_graph_gaps(source: Path, target: Path, gaps: dict[str, float]) -> Path:
    """source's profile with graph_gap rows added (seconds per kernel by kind of graph)."""
    return _with_rows(source, target, [operator_row("graph_gap", seconds, 100, variant=kind, graph=True,
                                                    dtype="bfloat16", m=300) for kind, seconds in gaps.items()])


def test_graph_gaps_lengthen_graph_steps_by_their_kernels(tmp_path, qwen3_8b):
    """A profile's graph_gap rows add seconds per kernel to steps run as CUDA graphs, each kind its own; eager steps
    (launch-bound or not) keep their time."""
    source = synthetic_operator_profile(tmp_path / "plain.parquet")
    gapped = ComposedCostModel(ModelShape.load("qwen3-8b"), OperatorProfile.read(
        _with_graph_gaps(source, tmp_path / "gapped.parquet", {"decode": 1e-6, "mixed": 0.5e-6})))
    decode_kernels = kernel_counts(36, False, "decode", True, row_gather=False)["all"]
    mixed_kernels = kernel_counts(36, False, "mixed", False, row_gather=False)["all"]
    assert gapped.predict(decode(64, 1000), 64) - qwen3_8b.predict(decode(64, 1000), 64) == pytest.approx(
        decode_kernels * 1e-6)
    mixed = BatchFeatures(1, 300, 20, 20, 20 * 800, 0, 300 * 150.5, 320)
    assert gapped.predict(mixed, 384) - qwen3_8b.predict(mixed, 384) == pytest.approx(mixed_kernels * 0.5e-6)
    assert gapped.predict(mixed, 0) == qwen3_8b.predict(mixed, 0)
    assert gapped.predict(decode(64, 1000), 0) == qwen3_8b.predict(decode(64, 1000), 0)


def test_graph_gaps_are_fitted_per_kernel_on_the_probes_device_time(tmp_path):
    """fit_graph_gaps recovers a per-kernel excess planted in a probe's graph steps over the profile's own
    composition of them, and leaves eager steps out."""
    profile = OperatorProfile.read(synthetic_operator_profile(tmp_path / "plain.parquet"))
    probe = ComposedCostModel(ModelShape.load("qwen3-8b"), profile, max_model_len=4096)
    rng = random.Random(3)
    steps = []
    for _ in range(1200):
        features, graph = random_step(rng)
        parts = probe.step_breakdown(features, graph)
        kind = "decode" if features.num_prefill_seqs == 0 else "mixed"
        kernels = kernel_counts(36, False, kind, kind == "decode", row_gather=False)["all"]
        device = sum(parts.values()) - parts["host"] + (kernels * (0.7e-6 if kind == "decode" else 0.3e-6)
                                                        if graph else 0.05)
        steps.append(dict(features._asdict(), cuda_graph_batch_size=graph, device_seconds=device))
    gaps, report = fit_graph_gaps(steps, profile, "qwen3-8b", 4096)
    assert gaps["decode"][0] == pytest.approx(0.7e-6, rel=1e-6) and gaps["mixed"][0] == pytest.approx(0.3e-6, rel=1e-6)
    assert report["decode"]["steps"] + report["mixed"]["steps"] == sum(1 for step in steps if step["cuda_graph_batch_size"])


def test_long_compute_bound_steps_pay_the_power_cap_that_short_ones_do_not(tmp_path, qwen3_8b):
    """With power_ramp rows (a GEMM 1.00x its burst time after 3 and 30 ms back to back, 1.08x after 100 ms, 1.12x
    after 300 ms) a step's GEMMs are lengthened by the factor of their own duration: a decode step's few
    milliseconds not at all, a prefill of 16k tokens (about 140 ms of GEMMs here) by 8-12%."""
    source = synthetic_operator_profile(tmp_path / "plain.parquet")
    ramp = [operator_row("power_ramp", seconds, 1, variant="", graph=True, dtype="bfloat16", m=2048, n=n, k=4096,
                         width=width)
            for n in (12288, 24576) for width, seconds in ((3000, 1e-4), (30000, 1e-4), (100000, 1.08e-4),
                                                           (300000, 1.12e-4))]
    ramped = ComposedCostModel(ModelShape.load("qwen3-8b"), OperatorProfile.read(
        _with_rows(source, tmp_path / "ramped.parquet", ramp)))
    assert ramped.predict(decode(64, 1000), 64) == qwen3_8b.predict(decode(64, 1000), 64)
    long = prefill(16384)
    parts = qwen3_8b.step_breakdown(long, 0)
    gemm = sum(parts[name] for name in ("qkv", "o", "gate_up", "down"))
    assert 0.1 < gemm < 0.3
    added = ramped.predict(long, 0) - qwen3_8b.predict(long, 0)
    assert 0.08 * gemm < added < 0.12 * gemm
    assert ramped.step_breakdown(long, 0)["power_cap"] == pytest.approx(added)
    # The factor is 1 up to the shortest run, grows in log time, holds past the longest.
    factor = power_cap_factor(ramped.operators.power_ramp, [1e-3, 0.03, 0.1, 0.3, 3.0])
    assert factor.tolist() == pytest.approx([1.0, 1.0, 1.08, 1.12, 1.12])
