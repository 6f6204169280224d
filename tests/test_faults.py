"""Faults over random workloads: interrupts in the executor, between steps and at any line of a step, errors and
aborts. After each, every request is accounted for exactly once, nothing holds a KV block, and the next batch
gets the outputs a fresh engine gives (the paged echo executor's tokens hash their whole context, read back
through the block tables, so a stale block or prefix-cache entry would change them)."""

import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

import engine as engine_package
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from tests.fake_executor import PagedEchoExecutor, assert_output_as_recorded, reference_outputs

BLOCK_SIZE = 2
ENGINE_FOLDER = os.path.dirname(engine_package.__file__)


class FaultyExecutor(PagedEchoExecutor):
    """Raises the fault given at the n-th call to execute (counting from 1), else echoes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.fault_at: tuple[int, BaseException] | None = None

    def execute(self, scheduler_output):
        self.calls += 1
        if self.fault_at is not None and self.calls == self.fault_at[0]:
            raise self.fault_at[1]
        return super().execute(scheduler_output)


class LineInterrupt:
    """Raises KeyboardInterrupt at the n-th line the engine's code runs, as a signal may strike anywhere."""

    def __init__(self, at_line: int) -> None:
        self.remaining = at_line

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(ENGINE_FOLDER) else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.remaining -= 1
            if self.remaining == 0:
                raise KeyboardInterrupt
        return self._local


faults = st.one_of(
    st.none(),
    st.tuples(st.just("executor"), st.integers(1, 40)),
    st.tuples(st.just("error"), st.integers(1, 40)),
    st.tuples(st.just("between"), st.integers(0, 40)),
    st.tuples(st.just("line"), st.integers(1, 4000)),
)
rounds = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(1, 10)), min_size=1, max_size=6),
        faults,
        st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5)), max_size=2),  # aborts: (step, request)
    ),
    min_size=1,
    max_size=4,
)


def _run_round(engine: Engine, executor: FaultyExecutor, round_ids: list[str], fault, aborts) -> bool:
    """Run the engine with this round's fault and aborts; on any exception abort the round's requests, as
    LLM.generate does. Returns whether the round was interrupted."""
    executor.fault_at = None
    kind = fault[0] if fault else None
    if kind == "executor":
        executor.fault_at = (executor.calls + fault[1], KeyboardInterrupt())
    elif kind == "error":
        executor.fault_at = (executor.calls + fault[1], RuntimeError("device lost"))
    step = 0

    def on_step(_engine: Engine) -> None:
        nonlocal step
        for at, index in aborts:
            if at == step:
                engine.abort(round_ids[index % len(round_ids)])
        if kind == "between" and step == fault[1]:
            raise KeyboardInterrupt
        step += 1

    try:
        if kind == "line":
            with LineInterrupt(fault[1]):
                engine.run(on_step=on_step)
        else:
            engine.run(on_step=on_step)
    except (KeyboardInterrupt, RuntimeError):
        engine.abort(round_ids)
        return True
    return False


@settings(max_examples=200)
@given(rounds=rounds, num_kv_blocks=st.integers(6, 40), asynchronous=st.booleans(), prefix_caching=st.booleans(),
       max_num_batched_tokens=st.integers(2, 24))
def test_after_any_fault_every_request_is_accounted_for_once_and_the_next_batch_is_served_as_fresh(
    rounds, num_kv_blocks, asynchronous, prefix_caching, max_num_batched_tokens
):
    config = EngineConfig(block_size=BLOCK_SIZE, max_model_len=64, max_num_seqs=4,
                          max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=prefix_caching,
                          num_kv_blocks=num_kv_blocks, async_scheduling=asynchronous)
    executor = FaultyExecutor(num_kv_blocks, BLOCK_SIZE)
    engine = Engine(config, executor)
    # Prompts of every round share prefixes, so a prefix-cache entry left by an interrupted round is looked up.
    prefixes = [[11, 12, 13, 14], [21, 22, 23, 24, 25, 26], [31, 32], []]
    prompts: dict[str, list[int]] = {}
    final_round = [(0, 6, 5), (1, 3, 7), (2, 9, 2)]
    for round_index, (requests, fault, aborts) in enumerate([*rounds, (final_round, None, [])]):
        round_ids = []
        for prefix, suffix_len, max_tokens in requests:
            prompt = prefixes[prefix] + [100 + round_index * 10 + i for i in range(suffix_len)]
            request_id = engine.add_request(prompt_token_ids=prompt, request_id=f"r{round_index}-{len(round_ids)}",
                                            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            prompts[request_id] = prompt
            round_ids.append(request_id)
        interrupted = _run_round(engine, executor, round_ids, fault, aborts)

        assert not engine.has_unfinished()
        assert engine.block_manager.holds_nothing(), "a KV block is still held with no request left"
        records = engine.request_records
        # Each request ended exactly once: finished or aborted once each, or rejected when added.
        assert engine.num_finished + engine.num_rejected == len(records)
        for request_id in round_ids:
            record = records[request_id]
            if record.status == "rejected":
                assert "KV blocks" in record.reason
                continue
            assert_output_as_recorded(engine, request_id, record,
                                      reference_outputs(prompts[request_id], record.max_tokens))
        if fault is None and not aborts:
            assert not interrupted
            assert all(records[request_id].status in ("finished", "rejected") for request_id in round_ids)

    # The last round, served after every fault, is what a fresh engine serves.
    fresh = Engine(config, PagedEchoExecutor(num_kv_blocks, BLOCK_SIZE))
    for request_id in round_ids:
        fresh.add_request(prompt_token_ids=prompts[request_id], request_id=request_id,
                          sampling_params=SamplingParams(max_tokens=records[request_id].max_tokens, ignore_eos=True))
    fresh.run()
    fresh_records = fresh.request_records
    for request_id in round_ids:
        assert records[request_id].status == fresh_records[request_id].status
        if fresh_records[request_id].status == "finished":
            assert engine.output_token_ids(request_id) == fresh.output_token_ids(request_id)
