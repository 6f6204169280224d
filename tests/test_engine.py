"""Property tests: the engine over random workloads with a paged echo executor."""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.sequence import RequestStatus
from engine.stats import summarize_batch
from tests.fake_executor import PagedEchoExecutor, assert_output_as_recorded, reference_outputs


def check_invariants(engine: Engine) -> None:
    """No block leaked or shared wrongly, and reference counts match the holders."""
    manager = engine.block_manager
    holders = collections.Counter()
    for seq in engine.scheduler.running:
        assert seq.status is RequestStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table), "a sequence holds a block twice"
        holders.update(seq.block_table)
    for seq in engine.scheduler.waiting:
        assert not seq.block_table, "a waiting sequence holds blocks"
    for block in manager.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == holders[block.block_id], f"block {block.block_id} refcount is off"
        assert (block.ref_count == 0) == (block.block_id in manager.free_queue)
    for digest, block_id in manager.hash_to_block.items():
        assert manager.blocks[block_id].block_hash == digest


workloads = st.fixed_dictionaries(
    {
        "block_size": st.sampled_from([1, 2, 4, 16]),
        "num_kv_blocks": st.integers(4, 64),
        "max_num_batched_tokens": st.integers(1, 64),
        "max_num_seqs": st.integers(1, 8),
        "prefix_caching": st.booleans(),
        "prefix_len": st.integers(0, 40),
        "requests": st.lists(
            st.tuples(
                st.integers(1, 40),  # prompt suffix length
                st.integers(1, 12),  # max_tokens
                st.floats(0, 2, allow_nan=False),  # arrival time
                st.booleans(),  # shares the common prefix
            ),
            min_size=1,
            max_size=12,
        ),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.parametrize("async_scheduling", [False, True])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads)
def test_random_workloads_finish_exactly_once_with_correct_outputs(async_scheduling, workload):
    import random

    rng = random.Random(workload["seed"])
    block_size = workload["block_size"]
    config = EngineConfig(
        block_size=block_size,
        max_model_len=200,
        max_num_seqs=workload["max_num_seqs"],
        max_num_batched_tokens=workload["max_num_batched_tokens"],
        enable_prefix_caching=workload["prefix_caching"],
        num_kv_blocks=workload["num_kv_blocks"],
        async_scheduling=async_scheduling,
    )
    executor = PagedEchoExecutor(workload["num_kv_blocks"], block_size, step_duration=0.05)
    engine = Engine(config, executor)
    prefix = [rng.randrange(1000) for _ in range(workload["prefix_len"])]
    prompts = {}
    for suffix_len, max_tokens, arrival, shared in workload["requests"]:
        prompt = (prefix if shared else []) + [rng.randrange(1000) for _ in range(suffix_len)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        request_id = engine.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=arrival)
        prompts[request_id] = prompt

    while engine.step():
        check_invariants(engine)
        output = executor.steps[-1] if executor.steps else None
        if output is not None:
            assert output.num_batched_tokens <= config.max_num_batched_tokens
            assert len(output.sequences) <= config.max_num_seqs
            assert len({seq.seq_id for seq in output.sequences}) == len(output.sequences)
            # What the step log and cost models read: the scheduler sums it while building the step.
            assert output.features == summarize_batch(output.sequences)

    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks, "blocks leaked after every request finished"
    records = engine.request_records
    assert set(records) == set(prompts)
    for request_id, prompt in prompts.items():
        record = records[request_id]
        if record.status == "rejected":
            assert record.reason
            blocks = -(-(len(prompt) + record.max_tokens) // block_size)
            assert blocks > manager.num_blocks
            continue
        assert record.status == "finished"
        assert record.reason == "length"
        assert record.output_len == record.max_tokens
        assert len(record.token_times) == record.max_tokens
        # Preempted or not, from the cache or recomputed, the outputs are what an undisturbed run gives.
        assert engine.output_token_ids(request_id) == reference_outputs(prompt, record.max_tokens)
        assert record.arrival_time <= record.first_scheduled_time < record.first_token_time <= record.finish_time


def _shared_prefix_run(prefix_caching: bool) -> tuple[Engine, PagedEchoExecutor]:
    config = EngineConfig(block_size=4, max_model_len=256, num_kv_blocks=200, enable_prefix_caching=prefix_caching)
    executor = PagedEchoExecutor(200, 4)
    engine = Engine(config, executor)
    prefix = list(range(100, 164))
    for index in range(6):
        engine.add_request(
            prompt_token_ids=prefix + [index, index + 1],
            sampling_params=SamplingParams(max_tokens=4, ignore_eos=True),
            arrival_time=index * 1.0,
        )
    engine.run()
    return engine, executor


def test_shared_prefixes_hit_the_cache_and_cut_the_tokens_computed():
    cached, cached_executor = _shared_prefix_run(True)
    uncached, uncached_executor = _shared_prefix_run(False)
    computed_with_cache = sum(out.num_batched_tokens for out in cached_executor.steps)
    computed_without = sum(out.num_batched_tokens for out in uncached_executor.steps)
    assert computed_with_cache < computed_without - 4 * 60
    records = cached.request_records
    assert records["0"].cached_tokens == 0
    assert all(records[str(i)].cached_tokens == 64 for i in range(1, 6))
    assert cached.block_manager.hit_rate > 0.7
    for request_id in records:
        assert cached.output_token_ids(request_id) == uncached.output_token_ids(request_id)


def test_a_whole_prompt_cache_hit_still_computes_the_last_token():
    config = EngineConfig(block_size=4, max_model_len=64, num_kv_blocks=50)
    engine = Engine(config, PagedEchoExecutor(50, 4))
    prompt = list(range(16))
    engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request(
        prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=2, ignore_eos=True), arrival_time=5.0
    )
    engine.run()
    assert engine.request_records["1"].cached_tokens == 12  # three of four blocks: the last token is computed
    assert engine.output_token_ids("0") == engine.output_token_ids("1")


def test_preemption_happens_and_resumes_to_the_same_outputs():
    config = EngineConfig(block_size=2, max_model_len=64, num_kv_blocks=12, max_num_batched_tokens=64)
    executor = PagedEchoExecutor(12, 2)
    engine = Engine(config, executor)
    prompts = [[i * 10 + j for j in range(6)] for i in range(4)]
    for prompt in prompts:
        engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=12, ignore_eos=True))
    engine.run()
    assert sum(record.num_preempted for record in engine.step_records) > 0
    records = engine.request_records
    assert sum(record.num_preemptions for record in records.values()) > 0
    # The most recently arrived request is the one preempted.
    assert records["3"].num_preemptions >= 1 and records["0"].num_preemptions == 0
    for request_id, prompt in zip(records, prompts):
        assert engine.output_token_ids(request_id) == reference_outputs(prompt, 12)


def test_no_admission_in_a_step_that_preempted():
    config = EngineConfig(block_size=2, max_model_len=64, num_kv_blocks=12, max_num_batched_tokens=64)
    executor = PagedEchoExecutor(12, 2)
    engine = Engine(config, executor)
    for i in range(5):
        engine.add_request(
            prompt_token_ids=[i] * 5, sampling_params=SamplingParams(max_tokens=10, ignore_eos=True), arrival_time=0
        )
    running_before = set()
    while engine.step():
        record = engine.step_records[-1]
        step = executor.steps[-1]
        if record.num_preempted:
            admitted = {seq.seq_id for seq in step.sequences} - running_before
            assert not admitted
        running_before = {seq.seq_id for seq in engine.scheduler.running}


def test_stop_tokens_and_eos_end_requests_unless_eos_is_ignored():
    vocab = 3  # the echo executor then returns tokens in 0..2: eos appears quickly
    config = EngineConfig(block_size=4, max_model_len=64, num_kv_blocks=40, eos_token_ids=(0,))
    engine = Engine(config, PagedEchoExecutor(40, 4, vocab_size=vocab))
    prompt = [5, 6, 7]
    expected = reference_outputs(prompt, 30, vocab)
    engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=30), request_id="eos")
    engine.add_request(
        prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=30, ignore_eos=True), request_id="ignore"
    )
    engine.add_request(
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(2,)),
        request_id="stop",
    )
    engine.run()
    records = engine.request_records
    assert engine.output_token_ids("eos") == expected[: expected.index(0) + 1]
    assert records["eos"].reason == "stop"
    assert engine.output_token_ids("ignore") == expected and records["ignore"].reason == "length"
    assert engine.output_token_ids("stop") == expected[: expected.index(2) + 1]


def test_requests_that_can_never_fit_are_rejected_with_a_reason():
    config = EngineConfig(block_size=4, max_model_len=32, num_kv_blocks=5)
    engine = Engine(config, PagedEchoExecutor(5, 4))
    engine.add_request(prompt_token_ids=list(range(30)), sampling_params=SamplingParams(max_tokens=8), request_id="long")
    engine.add_request(prompt_token_ids=list(range(20)), sampling_params=SamplingParams(max_tokens=4), request_id="big")
    engine.add_request(prompt_token_ids=[], sampling_params=SamplingParams(max_tokens=4), request_id="empty")
    engine.add_request(prompt_token_ids=[1, 2], sampling_params=SamplingParams(max_tokens=2), request_id="ok")
    engine.run()
    records = engine.request_records
    assert records["long"].status == "rejected" and "max_model_len (32)" in records["long"].reason
    assert records["big"].status == "rejected" and "6 KV blocks" in records["big"].reason
    assert records["empty"].status == "rejected" and "empty" in records["empty"].reason
    assert records["ok"].status == "finished" and records["ok"].output_len == 2
    assert engine.num_rejected == 3


def test_idle_engine_jumps_to_the_next_arrival_on_a_virtual_clock():
    config = EngineConfig(block_size=4, num_kv_blocks=20)
    engine = Engine(config, PagedEchoExecutor(20, 4, step_duration=0.5))
    engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=2), arrival_time=10.0)
    engine.run()
    record = engine.request_records["0"]
    assert record.first_scheduled_time == 10.0
    assert record.token_times == [10.5, 11.0]


def test_abort_keeps_finished_requests_and_marks_the_rest():
    config = EngineConfig(block_size=4, num_kv_blocks=20)
    engine = Engine(config, PagedEchoExecutor(20, 4))
    engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=1), request_id="done")
    engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=50), request_id="busy")
    engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=5), request_id="later", arrival_time=99)
    for _ in range(3):
        engine.step()
    engine.abort_all("interrupted")
    records = engine.request_records
    assert records["done"].status == "finished"
    assert records["busy"].status == "aborted" and "interrupted" in records["busy"].reason
    assert records["later"].status == "aborted"
    assert engine.block_manager.num_free_blocks == 20
    assert not engine.has_unfinished()


def test_abort_of_rejected_and_not_yet_arrived_requests():
    config = EngineConfig(block_size=4, max_model_len=16, num_kv_blocks=20)
    engine = Engine(config, PagedEchoExecutor(20, 4))
    engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=2), request_id="a", arrival_time=0)
    engine.add_request(prompt_len=30, sampling_params=SamplingParams(max_tokens=2), request_id="too-long")
    engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=2), request_id="late", arrival_time=50)
    engine.step()
    engine.abort("too-long")  # already rejected: nothing to do, no error
    engine.abort_all("interrupted")
    records = engine.request_records
    assert list(records) == ["a", "too-long", "late"]  # the order they were added, rejected ones included
    assert records["too-long"].status == "rejected"
    late = records["late"]
    assert late.status == "aborted" and late.finish_time >= late.arrival_time


# ---------------------------------------------------------------- asynchronous scheduling


def _batches_and_outputs(async_scheduling: bool, num_kv_blocks: int, max_tokens: list[int], stop: int | None = None):
    config = EngineConfig(block_size=2, max_model_len=64, num_kv_blocks=num_kv_blocks, max_num_batched_tokens=16,
                          max_num_seqs=4, async_scheduling=async_scheduling, eos_token_ids=() if stop is None else (stop,))
    executor = PagedEchoExecutor(num_kv_blocks, 2, vocab_size=1000 if stop is None else 5)
    engine = Engine(config, executor)
    prompts = [[i * 10 + j for j in range(3 + i)] for i in range(len(max_tokens))]
    for prompt, n in zip(prompts, max_tokens):
        engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=n, ignore_eos=stop is None))
    while engine.step():
        check_invariants(engine)
    batches = [[(seq.seq_id, len(seq.token_ids)) for seq in step.sequences] for step in executor.steps]
    outputs = [engine.output_token_ids(request_id) for request_id in engine.request_records]
    return engine, batches, outputs, prompts


@pytest.mark.parametrize("num_kv_blocks", [200, 11])
def test_async_scheduling_runs_the_same_batches_as_sync_when_requests_stop_by_length(num_kv_blocks):
    """All arriving at once and stopping by length, overlapping the host changes nothing the scheduler
    decides: the same batches, outputs, token times and step records, preempting or not (11 blocks preempt)."""
    lengths = [9, 3, 12, 5, 7, 1]
    sync_engine, sync_batches, sync_outputs, prompts = _batches_and_outputs(False, num_kv_blocks, lengths)
    async_engine, async_batches, async_outputs, _ = _batches_and_outputs(True, num_kv_blocks, lengths)
    assert async_batches == sync_batches
    assert async_outputs == sync_outputs == [reference_outputs(p, n) for p, n in zip(prompts, lengths)]
    sync_records, async_records = sync_engine.request_records, async_engine.request_records
    assert [r.token_times for r in async_records.values()] == [r.token_times for r in sync_records.values()]
    assert [r.num_preemptions for r in async_records.values()] == [r.num_preemptions for r in sync_records.values()]
    assert (sum(r.num_preemptions for r in sync_records.values()) > 0) == (num_kv_blocks == 11)
    # Step records too, the state each step left (running, waiting, KV blocks used) included.
    assert list(async_engine.step_records) == list(sync_engine.step_records)


def test_async_scheduling_stop_token_costs_one_dropped_step():
    """A stop token is seen a step late: the request was scheduled once more, its extra sample dropped."""
    lengths = [30, 30]
    sync_engine, sync_batches, sync_outputs, prompts = _batches_and_outputs(False, 200, lengths, stop=0)
    async_engine, async_batches, async_outputs, _ = _batches_and_outputs(True, 200, lengths, stop=0)
    assert async_outputs == sync_outputs
    for prompt, output in zip(prompts, async_outputs):
        expected = reference_outputs(prompt, 30, 5)
        assert output == expected[: expected.index(0) + 1] and len(output) < 30
    extra = sum(len(b) for b in async_batches) - sum(len(b) for b in sync_batches)
    assert extra == len(lengths)
    assert all(r.reason == "stop" for r in async_engine.request_records.values())
    manager = async_engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


class _Pending:
    def __init__(self, result, interrupt: bool) -> None:
        self._result, self._interrupt = result, interrupt

    def result(self):
        if self._interrupt:
            raise KeyboardInterrupt
        return self._result


class InterruptedExecutor(PagedEchoExecutor):
    """Ctrl-C while the engine waits for one step's samples, with the next step already launched."""

    def __init__(self, *args, interrupt_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.interrupt_at = interrupt_at

    def execute_async(self, scheduler_output):
        result = self.execute(scheduler_output)
        return _Pending(result, scheduler_output.step == self.interrupt_at)


@pytest.mark.parametrize("interrupt_at", range(8))
def test_async_scheduling_abort_all_while_a_step_is_in_flight(interrupt_at):
    """An interrupted run keeps what finished: a request whose last token was in flight is either finished
    with all its tokens or aborted, never 'finished' without a finish time; nothing is left running."""
    config = EngineConfig(block_size=2, num_kv_blocks=40, async_scheduling=True)
    engine = Engine(config, InterruptedExecutor(40, 2, interrupt_at=interrupt_at))
    for max_tokens in (1, 2, 3, 4, 6, 40):
        engine.add_request(prompt_len=3, sampling_params=SamplingParams(max_tokens=max_tokens))
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    engine.abort_all("interrupted")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == 40
    records = engine.request_records
    assert engine.num_finished == len(records)
    for record in records.values():
        assert record.finish_time is not None
        if record.status == "finished":
            assert record.output_len == record.max_tokens == len(record.token_times)
        else:
            assert record.status == "aborted" and record.reason == "aborted: interrupted"
    check_invariants(engine)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12), st.floats(0, 1)), min_size=1, max_size=10),
    aborts=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 9)), max_size=4),
    num_kv_blocks=st.integers(8, 40),
    max_num_batched_tokens=st.integers(1, 32),
    prefix_caching=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_async_scheduling_with_stop_tokens_and_aborts_finishes_each_request_once(
    requests, aborts, num_kv_blocks, max_num_batched_tokens, prefix_caching, seed
):
    """Stop tokens seen a step late (also by preempted requests) and aborts while a step is in flight:
    every request ends once, its outputs those of an undisturbed run up to its end, and no block leaks."""
    import random

    rng = random.Random(seed)
    config = EngineConfig(block_size=2, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=prefix_caching, num_kv_blocks=num_kv_blocks, async_scheduling=True,
                          eos_token_ids=(0,))
    engine = Engine(config, PagedEchoExecutor(num_kv_blocks, 2, vocab_size=4))
    prefix = [rng.randrange(1000) for _ in range(6)]
    prompts = {}
    for suffix_len, max_tokens, arrival in requests:
        prompt = prefix + [rng.randrange(1000) for _ in range(suffix_len)]
        request_id = engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=max_tokens),
                                        arrival_time=arrival)
        prompts[request_id] = prompt
    abort_at = collections.defaultdict(list)
    for step, index in aborts:
        abort_at[step].append(str(index % len(prompts)))
    step = 0
    while engine.step():
        for request_id in abort_at[step]:
            engine.abort(request_id)
        check_invariants(engine)
        step += 1
    assert engine.block_manager.num_free_blocks == num_kv_blocks
    records = engine.request_records
    assert engine.num_finished == sum(record.status != "rejected" for record in records.values())
    for request_id, record in records.items():
        if record.status == "rejected":
            continue
        expected = reference_outputs(prompts[request_id], record.max_tokens, 4)
        if 0 in expected:
            expected = expected[: expected.index(0) + 1]
        assert_output_as_recorded(engine, request_id, record, expected)


class FailingOnceExecutor(PagedEchoExecutor):
    """Raises at its n-th step only, as a transient device error would."""

    def __init__(self, *args, fail_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at
        self.calls = 0

    def execute(self, scheduler_output):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("device lost")
        return super().execute(scheduler_output)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failed_step_aborts_its_requests_and_the_engine_serves_the_rest(asynchronous):
    config = EngineConfig(block_size=2, num_kv_blocks=40, async_scheduling=asynchronous)
    engine = Engine(config, FailingOnceExecutor(40, 2, fail_at=3))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    engine.add_request(prompt_token_ids=[1, 2, 3], sampling_params=params, request_id="early", arrival_time=0.0)
    engine.add_request(prompt_token_ids=[4, 5, 6], sampling_params=params, request_id="late", arrival_time=1.0)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.run()
    engine.run()  # the engine goes on
    records = engine.request_records
    assert records["early"].status == "aborted" and records["early"].reason == "aborted: error: RuntimeError: device lost"
    assert records["late"].status == "finished"
    assert engine.output_token_ids("late") == reference_outputs([4, 5, 6], 5)
    assert engine.block_manager.holds_nothing() and engine.num_finished == 2


def test_abort_takes_one_id_or_several_and_ignores_unknown_ones():
    engine = Engine(EngineConfig(block_size=2, num_kv_blocks=40), PagedEchoExecutor(40, 2))
    for request_id in ("a", "b", "c"):
        engine.add_request(prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=4), request_id=request_id)
    engine.step()
    engine.abort("a")
    engine.abort(["b", "missing"])
    engine.run()
    assert [record.status for record in engine.request_records.values()] == ["aborted", "aborted", "finished"]
