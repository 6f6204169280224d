"""Calibration recovers known costs from synthetic steps, from profiles and from run folders alike."""

import contextlib
import json
import random
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine.clock
import engine.model_executor
import simulator.profile
from analysis.run_schema import STEPS_SCHEMA
from engine.graph_dispatch import GraphDispatch, decode_graph_sizes
from engine.scheduler_output import StepResult
from simulator.calibrate import fit, fit_profile_table, mape, read_steps
from simulator.cost_model import CostModel
from simulator.executor import CostModelExecutor
from simulator.model_shape import PRESETS_DIR
from simulator.profile import build_grid, profile
from simulator.profile_library import cost_model_for, load_profile, profile_filename
from simulator.roofline import Roofline
from tests.fake_time import FakeTime, timed

TRUTH = CostModel(
    "h100",
    "qwen3-0.6b",
    1,
    "bfloat16",
    {
        "step": 2e-3,
        "eager_step": 3e-3,
        "mixed_step": 1.5e-3,
        "decode_seq": 5e-6,
        "prefill_seq": 2e-5,
        "token": 1e-7,
        "token_over_128": 1.5e-6,
        "token_over_1024": 2e-7,
        "prefill_attention_pair": 1e-11,
        "decode_context_token": 4e-8,
        "mixed_decode_context_token": 6e-8,
        "prefill_context_token": 2e-8,
    },
)
MAIN_TERMS = ("eager_step", "mixed_step", "decode_context_token", "mixed_decode_context_token")
ENGINE_OVERHEAD = {"step_s": 3e-4, "per_seq_s": 2e-6, "per_prefill_token_s": 5e-8}
"""The engine's CPU time per step as a profile records it: given, since measuring it depends on the machine
(test_engine_overhead_is_read_from_the_engines_own_steps tests the measurement)."""


class FakeGpuExecutor:
    """Stands in for ModelExecutor: checks block tables and answers with TRUTH's durations plus 1% noise,
    each step taking that long on fake_time."""

    cuda_graph_batch_sizes = decode_graph_sizes()

    def __init__(self, fake_time: FakeTime, num_kv_blocks: int = 20_000, noise: float = 0.01) -> None:
        self.fake_time = fake_time
        self.num_kv_blocks = num_kv_blocks
        self.inner = CostModelExecutor(TRUTH, num_kv_blocks)
        self.rng = random.Random(0)
        self.noise = noise
        self.steps = 0

    def execute(self, output):
        blocks = [block for seq in output.sequences for block in seq.block_table]
        assert len(blocks) == len(set(blocks)) and all(0 <= b < self.num_kv_blocks for b in blocks)
        for seq in output.sequences:
            assert len(seq.block_table) * 16 >= seq.num_computed_tokens + len(seq.token_ids)
        self.steps += 1
        result = self.inner.execute(output)
        duration = result.duration * (1 + self.rng.gauss(0, self.noise))
        self.fake_time.advance(duration)
        return StepResult(result.sampled_token_ids, duration, result.cuda_graph_batch_size)


def run_on_fake_time(monkeypatch) -> FakeTime:
    """The profile's clock (its time budget, its steps' wall time) made a FakeTime, and the engine's CPU time
    per step ENGINE_OVERHEAD, so that profiles do not depend on the machine's speed."""
    clock = FakeTime()
    monkeypatch.setattr(simulator.profile, "time", clock)
    monkeypatch.setattr(simulator.profile, "measure_engine_overhead", lambda: ENGINE_OVERHEAD)
    return clock


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    return run_on_fake_time(monkeypatch)


def engine_wall_clock_on(clock: FakeTime, monkeypatch) -> None:
    """Make the engine's WallClock read clock, and check that it does (a real clock would make the test slow
    and machine-dependent again without failing)."""
    monkeypatch.setattr(engine.clock, "time", clock)
    wall_clock = engine.clock.WallClock()
    clock.advance(0.5)
    assert wall_clock.now() == 0.5, "engine.clock no longer reads time.perf_counter: patch what it reads"


@pytest.fixture(scope="module")
def profile_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "grid.parquet"
    with pytest.MonkeyPatch.context() as monkeypatch:
        clock = run_on_fake_time(monkeypatch)
        path = profile(
            "qwen3-0.6b",
            out,
            executor=FakeGpuExecutor(clock),
            gpu_name="NVIDIA H100 80GB HBM3",
            max_model_len=4096,
            max_num_batched_tokens=2048,
            max_num_seqs=512,
            repeats=1,
            max_seconds=60,
            timing="executor",  # the fake's durations, not the microseconds it takes to compute them
            log=lambda message: None,
        )
    return out, pq.read_table(path)


def test_profile_writes_steps_columns_and_metadata(profile_table):
    out, table = profile_table
    stored = pq.read_table(out)
    assert stored.num_rows == table.num_rows > 500
    assert set(STEPS_SCHEMA.names) <= set(stored.column_names)
    metadata = {k.decode(): v.decode() for k, v in stored.schema.metadata.items()}
    assert metadata["gpu"] == "h100" and metadata["model"] == "qwen3-0.6b" and metadata["complete"] == "True"
    assert float(metadata["engine_step_s"]) == ENGINE_OVERHEAD["step_s"] and "torch_version" in metadata
    grids = set(stored.column("grid").to_pylist())
    assert grids == {"prefill", "decode", "mixed", "random"}
    graph_sizes = set(stored.column("cuda_graph_batch_size").to_pylist())
    assert {1, 2, 4, 8, 512} <= graph_sizes and 0 in graph_sizes
    cached = np.asarray(stored.column("prefill_context_tokens"))
    assert (cached > 0).any()
    assert max(stored.column("num_batched_tokens").to_pylist()) <= 2048


class FakeMixedGraphExecutor(FakeGpuExecutor):
    """FakeGpuExecutor whose steps with prompt chunks run as graphs, eagerly inside eager_prompt_steps()."""

    mixed_cuda_graphs = True

    def __init__(self, fake_time: FakeTime) -> None:
        super().__init__(fake_time, noise=0.0)
        graphs = GraphDispatch(decode_graph_sizes(), (64, 128, 256, 512, 1024, 2048), max_mixed_seqs=512)
        self.graph_executor = CostModelExecutor(TRUTH, self.num_kv_blocks, graphs=graphs)
        self.inner = self.graph_executor

    @contextlib.contextmanager
    def eager_prompt_steps(self):
        self.inner = CostModelExecutor(TRUTH, self.num_kv_blocks)
        try:
            yield
        finally:
            self.inner = self.graph_executor


@pytest.mark.slow
def test_profile_with_mixed_graphs_times_prompt_shapes_both_ways_and_the_fit_predicts_both(tmp_path, fake_time):
    path = profile("qwen3-0.6b", tmp_path / "twins.parquet", executor=FakeMixedGraphExecutor(fake_time), gpu_name="h100",
                   max_model_len=4096, max_num_batched_tokens=2048, max_num_seqs=512, repeats=1, max_seconds=60,
                   timing="executor", measure_engine=False, log=lambda message: None)
    table = pq.read_table(path)
    assert table.schema.metadata[b"eager_twins"] == b"True" and table.schema.metadata[b"mixed_cuda_graphs"] == b"True"
    num_seqs = np.asarray(table.column("num_prefill_seqs")) + np.asarray(table.column("num_decode_seqs"))
    graph = np.asarray(table.column("cuda_graph_batch_size"))
    tokens = np.asarray(table.column("num_batched_tokens"))
    # Every shape with a prompt chunk (of more than one token: a one-token row goes to the decode graphs)
    # appears once as a padded mixed-step graph and once eagerly.
    prefill = (np.asarray(table.column("num_prefill_seqs")) > 0) & (tokens > num_seqs)
    assert (graph[prefill] > 0).sum() == (graph[prefill] == 0).sum() > 100
    assert (graph[prefill & (graph > 0)] >= tokens[prefill & (graph > 0)]).all()
    assert (graph[~prefill] == 0).sum() < (~prefill).sum()  # decode-only shapes: once, on the decode graphs
    model = fit_profile_table(table).cost_model
    columns, _ = read_steps([path])
    for kind in (graph > 0, graph == 0):
        rows = prefill & kind
        part = {name: values[rows] for name, values in columns.items()}
        assert mape(model.predict_columns(part), part["duration"]) < 0.02


def test_profile_stops_at_its_time_budget(tmp_path, fake_time):
    executor = FakeGpuExecutor(fake_time)
    path = profile("qwen3-0.6b", tmp_path / "short.parquet", executor=executor, gpu_name="h100", max_seconds=2,
                   measure_engine=False, log=lambda message: None)
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert metadata["complete"] == "False" and float(metadata["seconds"]) <= 2
    assert table.num_rows > 0
    # Stopped a little before the budget, to leave time for writing the file.
    end = max(np.asarray(table.column("start_time")) + np.asarray(table.column("duration")))
    assert 1.5 < end <= 2


def _tiny_model_folder(tmp_path):
    """A two-layer Qwen3 config.json (random weights are made from it) in tmp_path/tiny."""
    config = json.loads((PRESETS_DIR / "qwen3-0.6b.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=512, torch_dtype="float32")
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_profile_runs_the_real_executor_on_cpu(tmp_path, fake_time, monkeypatch):
    # The path `twinfer profile` takes on a GPU, here on a tiny random model on the CPU, each of whose steps
    # takes 10 ms on the profile's clock.
    monkeypatch.setattr(engine.model_executor, "ModelExecutor", timed(engine.model_executor.ModelExecutor, fake_time, 0.01))
    model = _tiny_model_folder(tmp_path)
    path = profile(str(model), tmp_path / "cpu.parquet", device="cpu", dtype="float32", max_seconds=120,
                   max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4, measure_engine=False,
                   max_shapes=12, log=lambda message: None)
    table = pq.read_table(path)
    assert table.num_rows == 12 * 3  # three timed repeats of each shape
    metadata = table.schema.metadata
    assert metadata[b"gpu"] == b"cpu" and metadata[b"model"] == b"tiny" and metadata[b"timing"] == b"wall"
    # Timed by the wall clock around execute(); the executor's own figure is kept beside it.
    duration, executor_duration = (np.asarray(table.column(name)) for name in ("duration", "executor_duration"))
    assert duration == pytest.approx(np.full(12 * 3, 0.01))
    assert (executor_duration > 0).all()
    assert set(table.column("cuda_graph_batch_size").to_pylist()) == {0}  # no CUDA graphs on the CPU


def test_fit_from_profile_recovers_the_costs(profile_table):
    _, table = profile_table
    calibration = fit_profile_table(table)
    assert calibration.heldout_mape < 0.02  # the noise is 1%
    fitted = calibration.cost_model
    for term in MAIN_TERMS:
        assert fitted.coefficients[term] == pytest.approx(TRUTH.coefficients[term], rel=0.1), term
    # Up to 2048 tokens attention is <1% of a step, so 1% noise leaves its weight less certain.
    assert fitted.coefficients["prefill_attention_pair"] == pytest.approx(1e-11, rel=0.25)
    # The profile's executor times plus the engine's own CPU time: what a real run's steps would record.
    engine_step_s = float(table.schema.metadata[b"engine_step_s"])
    assert fitted.coefficients["step"] == pytest.approx(TRUTH.coefficients["step"] + engine_step_s, rel=0.05)
    assert set(calibration.heldout_mape_by_kind) == {"decode", "prefill", "mixed"}


def test_fit_detects_launches_overlapping_gpu_work(profile_table):
    # A small model in eager mode: kernel launches (3 ms) hide short GPU work and are hidden by long work.
    _, table = profile_table
    truth = CostModel("h100", "qwen3-0.6b", 1, "bfloat16", TRUTH.coefficients, eager_overlap=True)
    columns = {name: table.column(name).to_numpy().astype(float) for name in table.column_names if name != "grid"}
    noise = np.random.default_rng(0).normal(1.0, 0.01, table.num_rows)
    columns["duration"] = truth.predict_columns(columns) * noise
    calibration = fit(columns, gpu="h100", model="qwen3-0.6b")
    assert calibration.cost_model.eager_overlap
    assert calibration.heldout_mape < 0.02
    assert calibration.cost_model.coefficients["eager_step"] == pytest.approx(3e-3, rel=0.05)
    additive = fit_profile_table(table).cost_model
    assert not additive.eager_overlap  # TRUTH itself adds its launches


def test_slow_steps_count_in_the_average_and_stalls_do_not_drag_the_fit(profile_table):
    """A serving run's time is the sum of its steps: the fit's predictions are right on average, the
    occasional slow step (a garbage collection) included, rather than on the typical step only. A stall of
    many times the step (a kernel compiled) is left out."""
    _, table = profile_table
    columns = {name: table.column(name).to_numpy().astype(float) for name in table.column_names if name != "grid"}
    clean = TRUTH.predict_columns(columns)
    rng = np.random.default_rng(1)
    columns["duration"] = clean * rng.normal(1.0, 0.01, table.num_rows)
    hiccups = rng.random(table.num_rows) < 0.03  # 3% of the steps take 2-4x as long
    columns["duration"][hiccups] *= rng.uniform(2, 4, hiccups.sum())
    stalls = rng.choice(np.flatnonzero(~hiccups), 5, replace=False)
    columns["duration"][stalls] *= 50
    fitted = fit(columns, gpu="h100", model="qwen3-0.6b").cost_model
    predicted = fitted.predict_columns(columns)
    normal = np.ones(table.num_rows, dtype=bool)
    normal[stalls] = False
    # Without the stalls the total is right within 1%; a fit of the typical step would be ~6% short.
    assert abs(predicted[normal].sum() / columns["duration"][normal].sum() - 1) < 0.01
    assert abs(predicted[normal].sum() / clean[normal].sum() - 1) > 0.03


def test_fit_from_a_run_folder_and_the_cli(tmp_path, profile_table):
    _, table = profile_table
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(table.select(STEPS_SCHEMA.names).cast(STEPS_SCHEMA).replace_schema_metadata(None), run / "steps.parquet")
    columns, metadata = read_steps([run])
    assert metadata == {} and len(columns["duration"]) == table.num_rows
    out = tmp_path / "fitted.json"
    from twinfer.cli import main

    assert main(["calibrate", str(run), "--gpu", "h100", "--model", "qwen3-0.6b", "--out", str(out)]) == 0
    fitted = CostModel.load(out)
    # A run folder's durations already include the engine's time: nothing is added, so "step" is lower.
    from_profile = fit_profile_table(table).cost_model
    assert fitted.coefficients["step"] < from_profile.coefficients["step"]
    assert fitted.fit_report["heldout_mape"] < 0.02


@pytest.mark.slow
def test_profile_serving_phase_runs_the_real_engine_and_calibration_reads_it_as_serving(tmp_path, fake_time,
                                                                                      monkeypatch):
    # The serving engine's wall clock is the fake one too, and each step takes 50 ms on it.
    engine_wall_clock_on(fake_time, monkeypatch)
    monkeypatch.setattr(engine.model_executor, "ModelExecutor", timed(engine.model_executor.ModelExecutor, fake_time, 0.05))
    model = _tiny_model_folder(tmp_path)
    path = profile(str(model), tmp_path / "cpu.parquet", device="cpu", dtype="float32", max_seconds=60,
                   max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4, max_shapes=6, serving_seconds=3,
                   serving_rate=10, log=lambda message: None)
    table = pq.read_table(path)
    grid = np.array(table.column("grid").to_pylist())
    serving = grid == "serving"
    assert (~serving).sum() == 6 * 3 and serving.sum() >= 10
    # The serving steps are the engine's own: prompt chunks among decodes, durations read on the wall clock,
    # step numbers following the grid's.
    prefill, decode = (np.asarray(table.column(name)) for name in ("num_prefill_seqs", "num_decode_seqs"))
    assert ((prefill > 0) & (decode > 0) & serving).any() and ((prefill == 0) & serving).any()
    duration = np.asarray(table.column("duration"))
    assert duration[serving] == pytest.approx(np.full(serving.sum(), 0.05))
    steps = np.asarray(table.column("step"))
    assert steps[serving].min() > steps[~serving].max()
    columns, _ = read_steps([path])
    assert columns["serving"].tolist() == serving.astype(float).tolist()
    # The engine's own time is added to the grid rows only: serving rows already include it.
    np.testing.assert_array_equal(columns["duration"][serving], duration[serving])
    engine_s = (ENGINE_OVERHEAD["step_s"] + ENGINE_OVERHEAD["per_seq_s"] * (prefill + decode)
                + ENGINE_OVERHEAD["per_prefill_token_s"] * np.asarray(table.column("num_prefill_tokens")))
    assert columns["duration"][~serving] == pytest.approx((duration + engine_s)[~serving])


@pytest.mark.slow
def test_a_serving_phase_releases_its_sequences_so_the_next_engine_on_the_executor_starts_clean(tmp_path, fake_time,
                                                                                                monkeypatch):
    """With twins the serving phase runs two engines on one executor, each numbering sequences from 0: the
    first one's sequences must be released, or the runner would give the second one's their block tables."""
    from engine.config import EngineConfig
    from engine.model_executor import ModelExecutor
    from simulator.profile import serving_steps

    engine_wall_clock_on(fake_time, monkeypatch)  # each step takes 50 ms on it
    model = _tiny_model_folder(tmp_path)
    config = EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, vocab_size=1000)
    executor = timed(ModelExecutor, fake_time, 0.05)(str(model), config, device="cpu", dtype="float32",
                                                     load_format="dummy")
    for half in range(2):
        rows = serving_steps(executor, config, seconds=1.5, rate=10, seed=half)
        assert any(row["num_decode_seqs"] for row in rows)
        assert executor.runner._block_table_rows == {}  # nothing of this engine's sequences is left


def test_eager_steps_of_real_runs_teach_the_serving_overhead_a_profile_cannot_see(tmp_path, profile_table):
    """A profile times each batch shape on its own; in a serving loop the same eager step takes longer. Given
    both, calibration fits that difference as serving_eager_step, and simulation (always serving) adds it."""
    profile_path, table = profile_table
    run = tmp_path / "run"
    run.mkdir()
    steps = table.select(STEPS_SCHEMA.names).cast(STEPS_SCHEMA).replace_schema_metadata(None)
    columns = {name: steps.column(name).to_numpy().astype(float) for name in steps.column_names if name != "grid"}
    eager = columns["cuda_graph_batch_size"] <= 0
    # As the real engine would record these batches in a run: engine time included, eager ones 4 ms slower.
    engine_s = [float(table.schema.metadata[key.encode()]) for key in ("engine_step_s", "engine_per_seq_s",
                                                                     "engine_per_prefill_token_s")]
    seqs = columns["num_prefill_seqs"] + columns["num_decode_seqs"]
    serving_duration = (TRUTH.predict_columns(columns) + engine_s[0] + engine_s[1] * seqs
                        + engine_s[2] * columns["num_prefill_tokens"] + 4e-3 * eager)
    pq.write_table(steps.set_column(steps.schema.get_field_index("duration"), "duration",
                                    pa.array(serving_duration)), run / "steps.parquet")
    merged, _ = read_steps([profile_path, run])
    assert merged["serving"].tolist() == [0.0] * table.num_rows + [1.0] * table.num_rows
    fitted = fit(merged, gpu="h100", model="qwen3-0.6b").cost_model
    assert fitted.coefficients["serving_eager_step"] == pytest.approx(4e-3, rel=0.1)
    # Simulated steps are serving steps: eager ones get the overhead, CUDA-graph ones do not.
    assert mape(fitted.predict_columns(columns)[eager], serving_duration[eager]) < 0.02
    assert mape(fitted.predict_columns(columns)[~eager], serving_duration[~eager]) < 0.02


def test_engine_overhead_is_read_from_the_engines_own_steps(monkeypatch):
    """measure_engine_overhead times engine steps on the wall clock with an executor that returns at once; on
    a fake clock where each step costs known amounts it finds them."""
    clock = FakeTime()
    engine_wall_clock_on(clock, monkeypatch)

    class CostedInstantExecutor(simulator.profile._InstantExecutor):
        def execute(self, scheduler_output):
            sequences = scheduler_output.sequences
            prefill_tokens = sum(len(seq.token_ids) for seq in sequences if not seq.is_decode)
            clock.advance(3e-4 + 2e-6 * len(sequences) + 5e-8 * prefill_tokens)
            return super().execute(scheduler_output)

    monkeypatch.setattr(simulator.profile, "_InstantExecutor", CostedInstantExecutor)
    overhead = simulator.profile.measure_engine_overhead(batch_sizes=(1, 16, 64), prompt_lengths=(256, 1024),
                                                         steps_per_size=10)
    assert overhead == pytest.approx(ENGINE_OVERHEAD, rel=1e-3)


def test_too_little_data_is_refused():
    columns = {name: np.ones(5) for name in ("num_prefill_seqs", "num_prefill_tokens", "num_decode_seqs",
               "decode_context_tokens", "prefill_context_tokens", "prefill_attention_work", "num_batched_tokens",
               "cuda_graph_batch_size", "duration")}
    with pytest.raises(ValueError, match="only 5 usable steps"):
        fit(columns, gpu="h100", model="m", source="tiny.parquet")


def test_missing_profile_errors_clearly_and_roofline_is_the_labelled_fallback(tmp_path):
    TRUTH.save(tmp_path / profile_filename("h100", "qwen3-0.6b", 1, "bfloat16"))
    assert load_profile("NVIDIA H100 80GB HBM3", "qwen3-0.6b", directory=tmp_path).coefficients == TRUTH.coefficients
    with pytest.raises(FileNotFoundError, match=r"gpu=a100-80g model=qwen3-8b tp=2.*available: h100_qwen3-0.6b_tp1_bfloat16"):
        load_profile("a100-80g", "qwen3-8b", 2, directory=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = cost_model_for("a100-80g", "qwen3-8b", 2)
    assert isinstance(fallback, Roofline) and not fallback.calibrated
    assert any("uncalibrated roofline" in str(w.message) for w in caught)


@pytest.mark.parametrize("seed", range(6))
def test_grid_respects_every_engine_limit(seed):
    rng = random.Random(seed)
    limits = dict(
        max_model_len=rng.choice((256, 1024, 4096, 32768)),
        max_num_batched_tokens=rng.choice((64, 512, 2048, 8192)),
        max_num_seqs=rng.choice((8, 128, 1024)),
        num_kv_blocks=rng.choice((200, 5000, 100_000)),
    )
    grid = build_grid(cuda_graph_sizes=decode_graph_sizes(), block_size=16, seed=seed, num_random=100, **limits)
    assert grid
    for shape in grid:
        assert 1 <= len(shape.rows) <= limits["max_num_seqs"]
        assert sum(new for _, new, _, _ in shape.rows) <= limits["max_num_batched_tokens"]
        assert all(new >= 1 and cached + new <= limits["max_model_len"] for cached, new, _, _ in shape.rows)
        assert sum(-(-(cached + new) // 16) for cached, new, _, _ in shape.rows) <= limits["num_kv_blocks"]
