"""Fast-forwarding runs of decode steps gives exactly what stepping one by one gives."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.run_schema import requests_table, steps_table
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from tests.fake_executor import PredictingExecutor


def run(workload, fast_forward: bool) -> Engine:
    rng = random.Random(workload["seed"])
    config = EngineConfig(
        block_size=workload["block_size"],
        max_model_len=400,
        max_num_seqs=workload["max_num_seqs"],
        max_num_batched_tokens=workload["budget"],
        num_kv_blocks=workload["num_kv_blocks"],
        enable_prefix_caching=workload["prefix_caching"],
    )
    engine = Engine(config, PredictingExecutor(workload["num_kv_blocks"], workload["block_size"]), fast_forward=fast_forward)
    prefix = [rng.randrange(1000) for _ in range(24)]
    for index in range(workload["num_requests"]):
        prompt = (prefix if rng.random() < 0.5 else []) + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
        engine.add_request(
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=rng.randrange(1, 120), ignore_eos=True),
            arrival_time=rng.random() * workload["span"],
        )
    engine.run()
    return engine


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {
            "seed": st.integers(0, 10_000),
            "block_size": st.sampled_from([1, 4, 16]),
            "max_num_seqs": st.integers(1, 10),
            "budget": st.integers(4, 128),
            "num_kv_blocks": st.integers(30, 300),
            "prefix_caching": st.booleans(),
            "num_requests": st.integers(1, 14),
            "span": st.sampled_from([0.0, 0.2, 2.0]),
        }
    )
)
def test_fast_forward_equals_stepping(workload):
    stepped = run(workload, fast_forward=False)
    skipped = run(workload, fast_forward=True)
    assert requests_table(list(skipped.request_records.values())).equals(
        requests_table(list(stepped.request_records.values()))
    )
    assert steps_table(skipped.step_records).equals(steps_table(stepped.step_records))
    assert list(skipped.step_records) == list(stepped.step_records)  # read back row by row too
    assert skipped.clock.now() == stepped.clock.now()
    for request_id in stepped.sequences:
        assert skipped.output_token_ids(request_id) == stepped.output_token_ids(request_id)
    manager_a, manager_b = stepped.block_manager, skipped.block_manager
    assert list(manager_a.free_queue) == list(manager_b.free_queue)
    assert manager_a.hash_to_block == manager_b.hash_to_block


def test_fast_forward_skips_most_decode_steps():
    workload = dict(seed=1, block_size=16, max_num_seqs=4, budget=128, num_kv_blocks=300,
                    prefix_caching=True, num_requests=4, span=0.0)
    engine = run(workload, fast_forward=True)
    calls = len(engine.executor.steps)
    assert calls < len(engine.step_records) / 3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.booleans())
def test_adding_requests_as_they_arrive_equals_adding_them_up_front(seed, fast_forward):
    """What a router does: run each replica up to the next arrival, then hand it the request."""
    rng = random.Random(seed)
    requests = sorted(
        (rng.random() * 3.0, [rng.randrange(1000) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 80))
        for _ in range(rng.randrange(1, 12))
    )
    config = EngineConfig(block_size=4, max_model_len=400, max_num_batched_tokens=32, num_kv_blocks=120)

    def engine():
        return Engine(config, PredictingExecutor(120, 4), fast_forward=fast_forward)

    upfront, incremental = engine(), engine()
    for index, (arrival, prompt, max_tokens) in enumerate(requests):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        upfront.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=arrival, request_id=str(index))
        incremental.run_until(arrival)
        incremental.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=arrival, request_id=str(index))
    upfront.run()
    incremental.run()
    assert requests_table(list(incremental.request_records.values())).equals(
        requests_table(list(upfront.request_records.values()))
    )
    assert steps_table(incremental.step_records).equals(steps_table(upfront.step_records))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from([1, 2, 4]), st.integers(20, 120))
def test_fast_forward_equals_stepping_when_identical_prompts_reuse_cached_decode_blocks(seed, block_size, num_kv_blocks):
    """Identical prompts decode identical blocks: a run's registrations then meet cached twins and evictions."""
    rng = random.Random(seed)
    pool = [[rng.randrange(1000) for _ in range(rng.randrange(1, 30))] for _ in range(3)]
    requests = [
        (rng.choice(pool), rng.randrange(1, 90), rng.random() * rng.choice([0.0, 0.3, 3.0]))
        for _ in range(rng.randrange(2, 16))
    ]
    config = EngineConfig(
        block_size=block_size, max_model_len=400, max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(4, 64), num_kv_blocks=num_kv_blocks,
    )  # fmt: skip

    def run_engine(fast_forward: bool) -> Engine:
        engine = Engine(config, PredictingExecutor(num_kv_blocks, block_size), fast_forward=fast_forward)
        for prompt, max_tokens, arrival in requests:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(prompt_token_ids=list(prompt), sampling_params=params, arrival_time=arrival)
        engine.run()
        return engine

    stepped, skipped = run_engine(False), run_engine(True)
    assert steps_table(skipped.step_records).equals(steps_table(stepped.step_records))
    assert requests_table(list(skipped.request_records.values())).equals(
        requests_table(list(stepped.request_records.values()))
    )
    assert stepped.block_manager.free_queue == skipped.block_manager.free_queue
    assert stepped.block_manager.hash_to_block == skipped.block_manager.hash_to_block


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.5, 3.0]))
def test_fast_forward_stops_on_stop_tokens_and_eos_as_stepping_does(seed, span):
    """Some requests stop on the token every step samples (as a stop token, or as EOS they do not ignore):
    they end after max(1, min_tokens) tokens with reason stop (vLLM's check_stop: length first); the others run
    to max_tokens; nothing differs from stepping."""
    rng = random.Random(seed)
    token = PredictingExecutor.token_id
    requests = []
    for _ in range(rng.randrange(2, 12)):
        kind = rng.choice(["stop token", "eos", "ignore eos"])
        max_tokens = rng.randrange(1, 80)
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=rng.choice([0, 0, rng.randrange(0, max_tokens + 1)]),
            stop_token_ids=(token,) if kind == "stop token" else (),
            ignore_eos=kind == "ignore eos",
        )
        requests.append(([rng.randrange(1000) for _ in range(rng.randrange(1, 30))], params, rng.random() * span))
    config = EngineConfig(block_size=4, max_model_len=400, max_num_batched_tokens=32, num_kv_blocks=200,
                          eos_token_ids=(token,) if rng.random() < 0.5 else ())

    def run_engine(fast_forward: bool) -> Engine:
        engine = Engine(config, PredictingExecutor(200, 4), fast_forward=fast_forward)
        for prompt, params, arrival in requests:
            engine.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=arrival)
        engine.run()
        return engine

    stepped, skipped = run_engine(False), run_engine(True)
    assert requests_table(list(skipped.request_records.values())).equals(
        requests_table(list(stepped.request_records.values()))
    )
    assert steps_table(skipped.step_records).equals(steps_table(stepped.step_records))
    for (_, params, _), record in zip(requests, skipped.request_records.values()):
        stops = token in params.stop_token_ids or (not params.ignore_eos and token in config.eos_token_ids)
        if stops and max(1, params.min_tokens) < params.max_tokens:
            assert (record.reason, record.output_len) == ("stop", max(1, params.min_tokens))
        else:
            assert (record.reason, record.output_len) == ("length", params.max_tokens)


def test_a_batch_draining_before_the_next_arrival_takes_one_engine_step():
    """Sequences finishing one after another, with no arrival in between, are fast-forwarded run after run within
    one engine step (each run still recorded as the steps stepping gives)."""
    workload = dict(seed=5, block_size=4, max_num_seqs=8, budget=400, num_kv_blocks=300, prefix_caching=False,
                    num_requests=6, span=0.0)
    stepped, skipped = run(workload, fast_forward=False), run(workload, fast_forward=True)
    assert steps_table(skipped.step_records).equals(steps_table(stepped.step_records))
    engine = Engine(skipped.config, PredictingExecutor(300, 4))
    for index, max_tokens in enumerate((10, 25, 40, 70)):
        engine.add_request(prompt_token_ids=[index + 1] * 8, arrival_time=0.0,
                           sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    calls = 0
    while engine.step():
        calls += 1
    assert calls == 2  # the prefill step, then the four runs of the drain
    assert len(engine.step_records) == 70
    assert engine.num_finished == 4


def test_a_full_batch_with_a_queue_is_fast_forwarded_as_stepping_gives():
    """max_num_seqs sequences running and more waiting: nothing can be admitted until one finishes, so the
    steps between are skipped through, each recorded with the queue it had (as stepping records it)."""
    workload = dict(seed=7, block_size=4, max_num_seqs=2, budget=400, num_kv_blocks=300, prefix_caching=True,
                    num_requests=8, span=0.0)
    stepped, skipped = run(workload, fast_forward=False), run(workload, fast_forward=True)
    assert steps_table(skipped.step_records).equals(steps_table(stepped.step_records))
    assert requests_table(list(skipped.request_records.values())).equals(
        requests_table(list(stepped.request_records.values())))
    waiting = steps_table(stepped.step_records).column("num_waiting").to_pylist()
    assert max(waiting) >= 5
    assert len(skipped.executor.steps) < len(stepped.step_records) / 3


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("budget", [128, 16])
def test_a_step_beside_running_decodes_applies_them_in_bulk_as_stepping_does(budget, prefix_caching):
    """A step where others decode beside a prompt (admitted now, or its next chunk under a small budget) has its
    decodes applied by the engine: the executor is handed the prompt alone, and every table, and the prefix cache,
    is as stepping's."""
    workload = dict(seed=11, block_size=4, max_num_seqs=8, budget=budget, num_kv_blocks=300,
                    prefix_caching=prefix_caching, num_requests=12, span=2.0)
    stepped, skipped = run(workload, fast_forward=False), run(workload, fast_forward=True)
    assert requests_table(list(skipped.request_records.values())).equals(
        requests_table(list(stepped.request_records.values())))
    assert steps_table(skipped.step_records).equals(steps_table(stepped.step_records))
    beside = [output for output in skipped.executor.steps
              if output.features.num_decode_seqs and not any(seq.is_decode for seq in output.sequences)]
    assert beside, "no step ran a prompt beside decodes applied in bulk"
    assert all(output.features.num_prefill_seqs == len(output.sequences) for output in beside)
    if budget == 16:  # prompts longer than the budget: later chunks of a running prompt go this way too
        assert any(seq.num_computed_tokens > 0 for output in beside for seq in output.sequences)
    assert list(skipped.block_manager.free_queue) == list(stepped.block_manager.free_queue)
    assert skipped.block_manager.hash_to_block == stepped.block_manager.hash_to_block
