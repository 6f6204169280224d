"""The block manager against a plain reference of the same policy, both driving the real scheduler and engine.

Two engines run the same random workload in lockstep, one with the real BlockManager and one with
ReferenceBlockManager swapped in. After every step, everything a user could tell them apart by must agree:
the schedules, each sequence's block table and what its blocks hold, the free blocks and their reuse order,
prefix-cache hits, and the step records. Small caches force preemption; prompts built from a few shared
prefixes (from a vocabulary of two tokens, at times) make prefix hits, twins and evictions of cached blocks.
"""

import random
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.engine as engine_module
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from tests.fake_executor import PagedEchoExecutor
from tests.reference_block_manager import ReferenceBlockManager, chained_hashes

MAX_MODEL_LEN = 128
STEP_DURATION = 0.01
EXECUTOR_VOCAB = 20
"""The echo executor's tokens are in 0..19, so a stop token ends a request after a few tokens."""


class SnapshotExecutor(PagedEchoExecutor):
    """The echo executor, keeping a copy of each step's schedule (the outputs share lists that grow later)."""

    def __init__(self, num_kv_blocks: int, block_size: int) -> None:
        super().__init__(num_kv_blocks, block_size, vocab_size=EXECUTOR_VOCAB, step_duration=STEP_DURATION)
        self.schedules: list[tuple] = []

    def execute(self, scheduler_output):
        self.schedules.append((
            scheduler_output.step,
            tuple(
                (seq.seq_id, tuple(seq.token_ids), seq.num_computed_tokens, tuple(seq.block_table), seq.is_decode,
                 seq.samples, seq.num_output_tokens)
                for seq in scheduler_output.sequences
            ),
            tuple(scheduler_output.finished_seq_ids),
        ))
        return super().execute(scheduler_output)


workloads = st.fixed_dictionaries(
    {
        "block_size": st.sampled_from([1, 2, 3, 4, 8]),
        "cache_tokens": st.integers(16, 128),  # KV cache size: small, so requests preempt
        "max_num_batched_tokens": st.integers(1, 48),
        "max_num_seqs": st.integers(1, 8),
        "prefix_caching": st.sampled_from([True, True, True, False]),
        "chunked_prefill": st.booleans(),
        "vocab": st.sampled_from([2, 1000]),  # of prompt tokens: with 2, unrelated prompts share blocks
        "prefix_lengths": st.lists(st.integers(0, 32), min_size=1, max_size=3),
        "requests": st.lists(
            st.tuples(
                st.integers(-1, 2),  # the shared prefix the prompt starts with (-1: none)
                st.integers(0, 16),  # tokens after it
                st.integers(1, 12),  # max_tokens
                st.one_of(st.just(0), st.integers(0, 30)),  # arrival, in step durations: often together
                st.booleans(),  # ends at a stop token too
            ),
            min_size=2,
            max_size=16,
        ),
        "aborts": st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15)), max_size=2),  # (step, request)
        "probe_every_step": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def prompts_of(workload) -> list[tuple[list[int], SamplingParams, float]]:
    rng = random.Random(workload["seed"])
    vocab = workload["vocab"]
    prefixes = [[rng.randrange(vocab) for _ in range(length)] for length in workload["prefix_lengths"]]
    requests = []
    for prefix_index, suffix_len, max_tokens, arrival, stops in workload["requests"]:
        prefix = prefixes[prefix_index % len(prefixes)] if prefix_index >= 0 else []
        prompt = prefix + [rng.randrange(vocab) for _ in range(suffix_len)]
        stop = (rng.randrange(EXECUTOR_VOCAB),) if stops else ()
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop_token_ids=stop)
        requests.append((prompt, params, arrival * STEP_DURATION))
    return requests


def build_engine(workload, async_scheduling: bool, manager_class) -> tuple[Engine, SnapshotExecutor]:
    """An engine over the workload's requests whose block manager is made by manager_class."""
    budget = workload["max_num_batched_tokens"]
    num_kv_blocks = max(1, workload["cache_tokens"] // workload["block_size"])
    config = EngineConfig(
        block_size=workload["block_size"],
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=workload["max_num_seqs"],
        max_num_batched_tokens=budget if workload["chunked_prefill"] else max(budget, MAX_MODEL_LEN),
        enable_prefix_caching=workload["prefix_caching"],
        enable_chunked_prefill=workload["chunked_prefill"],
        num_kv_blocks=num_kv_blocks,
        async_scheduling=async_scheduling,
    )
    executor = SnapshotExecutor(num_kv_blocks, workload["block_size"])
    with mock.patch.object(engine_module, "BlockManager", manager_class):
        engine = Engine(config, executor)
    assert type(engine.block_manager) is manager_class and engine.scheduler.block_manager is engine.block_manager
    for prompt, params, arrival in prompts_of(workload):
        engine.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=arrival)
    return engine, executor


def probe_sequences(engine: Engine) -> list[Sequence]:
    """Lookups a newcomer could make: every request's tokens so far, and each shorter by one token."""
    probes = []
    for seq in engine.sequences.values():
        tokens = list(seq.token_ids)
        for prompt in (tokens, tokens[:-1]):
            if prompt:
                probes.append(Sequence(-1 - len(probes), "probe", prompt, SamplingParams(), 0.0))
    return probes


def assert_same_lookups(real: Engine, reference: Engine) -> None:
    for real_probe, reference_probe in zip(probe_sequences(real), probe_sequences(reference), strict=True):
        assert list(real_probe.token_ids) == list(reference_probe.token_ids)
        assert real.block_manager.find_cached_prefix(real_probe) == \
            reference.block_manager.find_cached_prefix(reference_probe), f"lookup of {list(real_probe.token_ids)}"


def assert_blocks_hold_their_tokens(engine: Engine, executor: SnapshotExecutor) -> None:
    """The KV a running sequence's block table points at is its own tokens (as far as they are known)."""
    size = engine.block_manager.block_size
    for seq in engine.scheduler.running:
        for position in range(min(seq.num_computed_tokens, seq.num_tokens)):
            block_id = seq.block_table[position // size]
            assert executor.kv[block_id][position % size] == seq.token_ids[position], (seq, position)


def assert_agree(real: Engine, real_executor, reference: Engine, reference_executor) -> None:
    assert real_executor.schedules == reference_executor.schedules
    assert list(real.step_records) == list(reference.step_records)
    size = real.block_manager.block_size
    for request_id, seq in real.sequences.items():
        twin = reference.sequences[request_id]
        assert list(seq.token_ids) == list(twin.token_ids), request_id
        assert seq.block_table == twin.block_table, request_id
        assert (seq.status, seq.num_computed_tokens, seq.num_committed_blocks, seq.num_cached_tokens,
                seq.num_preemptions) == (twin.status, twin.num_computed_tokens, twin.num_committed_blocks,
                                         twin.num_cached_tokens, twin.num_preemptions), request_id
        # The hashes the real manager has computed so far are the chained hashes of the tokens.
        assert seq.block_hashes == chained_hashes(seq.token_ids, size, len(seq.block_hashes)), request_id
    manager, oracle = real.block_manager, reference.block_manager
    assert manager.num_free_blocks == oracle.num_free_blocks
    assert manager.num_used_blocks == oracle.num_used_blocks
    assert manager.free_queue == oracle.free_queue
    assert (manager.num_hit_tokens, manager.num_query_tokens, manager.num_evictions) == \
        (oracle.num_hit_tokens, oracle.num_query_tokens, oracle.num_evictions)
    for block, expected in zip(manager.blocks, oracle.blocks, strict=True):
        assert block.ref_count == expected.ref_count, block
        # Registration of an unshared prefix is deferred: a hash may be missing, never different.
        assert block.block_hash in (None, expected.block_hash), block
    assert manager.hash_to_block.items() <= oracle.hash_to_block.items()
    assert_blocks_hold_their_tokens(real, real_executor)
    assert_blocks_hold_their_tokens(reference, reference_executor)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads)
def test_the_block_manager_behaves_as_the_reference(async_scheduling, workload):
    real, real_executor = build_engine(workload, async_scheduling, engine_module.BlockManager)
    reference, reference_executor = build_engine(workload, async_scheduling, ReferenceBlockManager)
    request_ids = list(real.requests)
    aborts = {}
    for step, index in workload["aborts"]:
        aborts.setdefault(step, []).append(request_ids[index % len(request_ids)])
    step = 0
    while True:
        more = real.step()
        assert reference.step() == more, f"step {step}: one engine stopped"
        for request_id in aborts.get(step, []):
            real.abort(request_id)
            reference.abort(request_id)
        assert_agree(real, real_executor, reference, reference_executor)
        if workload["probe_every_step"]:
            assert_same_lookups(real, reference)
        if not more:
            break
        step += 1
    assert real.block_manager.num_free_blocks == real.block_manager.num_blocks
    assert real.request_records == reference.request_records
    assert_same_lookups(real, reference)


def test_the_reference_follows_the_documented_reuse_order():
    """The oracle itself on a hand-made case: blocks without a hash first, then the least recently freed."""
    manager = ReferenceBlockManager(6, 2)
    first = Sequence(0, "0", [1, 2, 3, 4, 5], SamplingParams(), 0.0)
    manager.allocate(first, [], 5)
    first.num_computed_tokens = 5
    manager.commit_computed(first)
    assert first.block_table == [0, 1, 2] and first.num_committed_blocks == 2
    manager.free(first)
    assert manager.free_queue == [2, 3, 4, 5, 1, 0]  # the uncommitted tail block is reused first
    again = Sequence(1, "1", [1, 2, 3, 4, 9], SamplingParams(), 0.0)
    assert manager.find_cached_prefix(again) == [0, 1]
    assert manager.take(5) == [2, 3, 4, 5, 1]  # evicts block 1, the prefix's tail
    assert manager.find_cached_prefix(again) == [0]
