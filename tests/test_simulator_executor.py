"""The cost-model executor: tokens for exactly the sampling sequences, CUDA-graph padding, and fast-forward
durations identical to stepping one by one, alone and inside the engine."""

import random

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.graph_dispatch import GraphDispatch, decode_graph_sizes
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput
from engine.stats import batch_features
from simulator.cost_model import CostModel
from simulator.executor import CostModelExecutor
from simulator.gpu_specs import gpu_spec
from simulator.model_shape import ModelShape
from simulator.roofline import Roofline

PARAMS = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=64)

CALIBRATED = CostModel(
    "h100",
    "qwen3-0.6b",
    1,
    "bfloat16",
    {
        "step": 1.7e-3,
        "eager_step": 2.9e-3,
        "decode_seq": 4.3e-6,
        "prefill_seq": 2.1e-5,
        "prefill_token": 7e-8,
        "token": 1.3e-7,
        "token_over_64": 7e-7,
        "token_over_512": 3e-7,
        "prefill_attention_pair": 1.1e-11,
        "decode_context_token": 3.7e-8,
        "mixed_decode_context_token": 5.3e-8,
        "prefill_context_token": 1.9e-8,
    },
)
OVERLAPPING = CostModel("h100", "qwen3-0.6b", 1, "bfloat16", CALIBRATED.coefficients, eager_overlap=True)
ROOFLINE = Roofline(gpu_spec("h100"), ModelShape.load("qwen3-8b"))
ROOFLINE_TP2 = Roofline(gpu_spec("a100-80g"), ModelShape.load("qwen3-0.6b"), tp=2)


def sequence(seq_id, *, new, computed, decode, samples) -> ScheduledSequence:
    blocks = list(range(-(-(computed + new) // 16)))
    return ScheduledSequence(seq_id, [7] * new, computed, blocks, decode, samples, 1 if decode else 0, PARAMS)


def decode_output(num_seqs: int, context: int) -> SchedulerOutput:
    return SchedulerOutput(0, [sequence(i, new=1, computed=context - 1, decode=True, samples=True) for i in range(num_seqs)])


def test_tokens_exactly_for_sampling_sequences():
    executor = CostModelExecutor(CALIBRATED, 1000, token_id=42)
    output = SchedulerOutput(
        3,
        [
            sequence(0, new=1, computed=99, decode=True, samples=True),
            sequence(5, new=64, computed=0, decode=False, samples=False),  # a chunk mid-prompt
            sequence(9, new=30, computed=64, decode=False, samples=True),  # the prompt's last chunk
        ],
    )
    result = executor.execute(output)
    assert result.sampled_token_ids == {0: 42, 9: 42}
    assert result.cuda_graph_batch_size == 0  # mixed steps run eagerly
    assert result.duration > 0


@pytest.mark.parametrize("num_seqs, expected", [(1, 1), (3, 4), (5, 8), (9, 16), (511, 512), (512, 512), (513, 0)])
def test_pure_decode_steps_replay_the_padded_graph(num_seqs, expected):
    executor = CostModelExecutor(CALIBRATED, 100_000)
    assert executor.execute(decode_output(num_seqs, 100)).cuda_graph_batch_size == expected
    eager = CostModelExecutor(CALIBRATED, 100_000, graphs=GraphDispatch())
    assert eager.execute(decode_output(num_seqs, 100)).cuda_graph_batch_size == 0


def test_steps_with_prompt_chunks_replay_a_graph_when_the_engine_captures_them():
    sizes = (16, 32, 64, 96, 128)
    graphs = GraphDispatch(decode_graph_sizes(), sizes, max_mixed_seqs=4)
    executor = CostModelExecutor(CALIBRATED, 100_000, graphs=graphs)
    mixed = SchedulerOutput(0, [sequence(0, new=1, computed=99, decode=True, samples=True),
                                sequence(1, new=70, computed=0, decode=False, samples=True)])
    result = executor.execute(mixed)
    assert result.cuda_graph_batch_size == 96  # 71 tokens padded to the next graph
    # A graph step costs the padded tokens and no eager launch.
    assert result.duration == CALIBRATED.predict(batch_features(mixed), 96)
    too_long = SchedulerOutput(0, [sequence(0, new=129, computed=0, decode=False, samples=True)])
    too_many = SchedulerOutput(0, [sequence(i, new=3, computed=0, decode=False, samples=True) for i in range(5)])
    assert executor.execute(too_long).cuda_graph_batch_size == 0
    assert executor.execute(too_many).cuda_graph_batch_size == 0
    assert CostModelExecutor(CALIBRATED, 100_000).execute(mixed).cuda_graph_batch_size == 0
    eager_graphs = GraphDispatch.for_engine(4, 128, cuda_graphs=False, mixed=True)  # --enforce-eager wins
    eager = CostModelExecutor(CALIBRATED, 100_000, graphs=eager_graphs)
    assert eager.execute(mixed).cuda_graph_batch_size == 0
    # Every row one token (a one-token prompt chunk among decodes): the runner replays a decode graph.
    one_token_rows = SchedulerOutput(0, [sequence(0, new=1, computed=99, decode=True, samples=True),
                                         sequence(1, new=1, computed=16, decode=False, samples=True),
                                         sequence(2, new=1, computed=40, decode=True, samples=True)])
    assert executor.execute(one_token_rows).cuda_graph_batch_size == 4
    # So does the engine without mixed-step graphs (a whole-prompt cache hit leaves one token to compute).
    assert CostModelExecutor(CALIBRATED, 100_000).execute(one_token_rows).cuda_graph_batch_size == 4


@pytest.mark.parametrize(
    "cost_model",
    [CALIBRATED, OVERLAPPING, ROOFLINE, ROOFLINE_TP2],
    ids=["calibrated", "overlapping", "roofline", "roofline-tp2"],
)
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_decode_run_is_bitwise_stepwise(cost_model, enforce_eager):
    graphs = GraphDispatch.for_engine(1024, 8192, cuda_graphs=not enforce_eager, mixed=True)
    executor = CostModelExecutor(cost_model, 100_000, graphs=graphs)
    rng = random.Random(0)
    for _ in range(20):
        num_seqs, context = rng.randint(1, 700), rng.randint(1, 3000)
        run = executor.predict_decode_run(num_seqs, num_seqs * context, 25)
        stepwise = [executor.execute(decode_output(num_seqs, context + step)).duration for step in range(25)]
        assert run == stepwise  # exact float equality, not approx


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        CostModelExecutor(CALIBRATED, 0)
    with pytest.raises(ValueError, match="decode_sizes"):
        CostModelExecutor(CALIBRATED, 10, graphs=GraphDispatch((1, -2)))


def run_engine(fast_forward: bool, cost_model, seed: int = 0):
    rng = random.Random(seed)
    config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=2048, vocab_size=1000)
    engine = Engine(config, CostModelExecutor(cost_model, 400), fast_forward=fast_forward)
    arrival = 0.0
    for index in range(60):
        arrival += rng.expovariate(20.0)
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=rng.randint(1, 300))
        engine.add_request(prompt_len=rng.randint(1, 700), sampling_params=params, arrival_time=arrival, request_id=str(index))
    engine.run()
    return engine


@pytest.mark.parametrize("cost_model", [CALIBRATED, OVERLAPPING, ROOFLINE], ids=["calibrated", "overlapping", "roofline"])
def test_engine_fast_forward_matches_stepping(cost_model):
    stepped, skipped = run_engine(False, cost_model), run_engine(True, cost_model)
    assert len(stepped.step_records) == len(skipped.step_records)
    for one, other in zip(stepped.step_records, skipped.step_records):
        assert one == other
    for request_id, record in stepped.request_records.items():
        assert record.status == "finished" and record.output_len == record.max_tokens
        assert skipped.request_records[request_id] == record


class RecordedDurations(CostModelExecutor):
    """Answers each step with the next duration of a recorded run (what a real run measured)."""

    def __init__(self, durations, num_kv_blocks: int) -> None:
        super().__init__(CALIBRATED, num_kv_blocks)
        self.durations = iter(durations)

    def execute(self, scheduler_output):
        result = super().execute(scheduler_output)
        return type(result)(result.sampled_token_ids, next(self.durations), result.cuda_graph_batch_size)


class NoisyGpu(CostModelExecutor):
    """Stands in for a real GPU: durations jitter by 20% around the cost model, as measurements do."""

    def __init__(self, num_kv_blocks: int) -> None:
        super().__init__(CALIBRATED, num_kv_blocks)
        self.rng = random.Random(7)

    def execute(self, scheduler_output):
        result = super().execute(scheduler_output)
        return type(result)(result.sampled_token_ids, result.duration * self.rng.uniform(0.8, 1.2), result.cuda_graph_batch_size)


def test_fed_a_real_runs_durations_the_simulator_makes_the_same_batches():
    def run(executor):
        rng = random.Random(3)
        config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=256, max_model_len=1024, vocab_size=1000)
        engine = Engine(config, executor, fast_forward=False)
        arrival = 0.0
        for index in range(80):
            arrival += rng.expovariate(50.0)
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=rng.randint(1, 100))
            engine.add_request(prompt_len=rng.randint(1, 400), sampling_params=params, arrival_time=arrival, request_id=str(index))
        engine.run()
        return engine

    real = run(NoisyGpu(150))  # a small cache: preemptions happen too
    simulated = run(RecordedDurations([record.duration for record in real.step_records], 150))
    assert sum(record.num_preempted for record in real.step_records) > 0
    assert list(real.step_records) == list(simulated.step_records)
