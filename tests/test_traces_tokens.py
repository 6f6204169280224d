"""Token synthesis: shared prefix blocks give shared tokens, everything else is unique and reproducible."""

import numpy as np
import pytest

from traces import prompt_token_ids_for, read_trace, shared_prefix_workload, trace_prompt_token_ids


def test_equal_block_ids_give_equal_tokens_whole_blocks_only():
    a = prompt_token_ids_for(1100, [0, 1, 2], request_id="a", vocab_size=32000)
    b = prompt_token_ids_for(1100, [0, 1, 5], request_id="b", vocab_size=32000)
    assert np.array_equal(a[:1024], b[:1024])  # blocks 0 and 1; block 2 is partial (76 of 512 tokens)
    assert np.mean(a[1024:] == b[1024:]) < 0.05
    c = prompt_token_ids_for(1100, [7, 1, 2], request_id="a", vocab_size=32000)
    assert np.mean(a[:512] == c[:512]) < 0.05


def test_tokens_are_reproducible_and_depend_on_the_seed():
    first = prompt_token_ids_for(300, [3], request_id="r1", vocab_size=1000, hash_block_size=64, seed=5)
    again = prompt_token_ids_for(300, [3], request_id="r1", vocab_size=1000, hash_block_size=64, seed=5)
    other = prompt_token_ids_for(300, [3], request_id="r1", vocab_size=1000, hash_block_size=64, seed=6)
    assert np.array_equal(first, again) and first.dtype == np.int32
    assert np.mean(first == other) < 0.05


@pytest.mark.parametrize("vocab_size", [151936, 1000, 50])
def test_special_token_ids_avoided(vocab_size):
    tokens = prompt_token_ids_for(5000, list(range(9)), request_id="x", vocab_size=vocab_size, hash_block_size=512)
    margin = min(100, vocab_size // 4)
    assert tokens.min() >= margin and tokens.max() < vocab_size - margin
    assert len(np.unique(tokens)) > min(0.5 * (vocab_size - 2 * margin), 1000)


def test_requests_without_ids_get_their_own_tokens():
    a = prompt_token_ids_for(64, None, request_id="1", vocab_size=32000)
    b = prompt_token_ids_for(64, None, request_id="2", vocab_size=32000)
    assert len(a) == 64 and np.mean(a == b) < 0.05


def test_trace_rows_share_tokens_exactly_as_their_groups():
    trace = shared_prefix_workload(num_groups=2, prompts_per_group=3, system_prompt_len=40, question_len=8, output_len=2)
    tokens = list(trace_prompt_token_ids(trace, vocab_size=32000))
    groups = trace.table.column("session_id").to_pylist()
    for i in range(len(tokens)):
        for j in range(len(tokens)):
            shared = np.array_equal(tokens[i][:32], tokens[j][:32])  # 40 // 16 = 2 whole blocks
            assert shared == (groups[i] == groups[j])
            if i != j:
                assert not np.array_equal(tokens[i][32:], tokens[j][32:])


def test_mooncake_sample_first_block_shared_by_every_request():
    trace = read_trace("mooncake-conv")
    tokens = [t[:512] for _, t in zip(range(50), trace_prompt_token_ids(trace, vocab_size=151936))]
    assert all(np.array_equal(tokens[0], t) for t in tokens)


def test_given_token_ids_are_kept_and_checked(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_time,prompt_len,output_len,prompt_token_ids\n0,3,1,5 6 7\n")
    trace = read_trace(path)
    assert list(next(trace_prompt_token_ids(trace, vocab_size=100))) == [5, 6, 7]
    with pytest.raises(ValueError, match="outside the vocabulary of 6"):
        next(trace_prompt_token_ids(trace, vocab_size=6))


def test_any_int64_block_id_works():
    tokens = prompt_token_ids_for(32, [-5, 2**63 - 1], request_id="r", vocab_size=1000, hash_block_size=16)
    again = prompt_token_ids_for(16, [-5], request_id="other", vocab_size=1000, hash_block_size=16)
    assert np.array_equal(tokens[:16], again)
    from_array = prompt_token_ids_for(16, np.array([-5]), request_id="third", vocab_size=1000, hash_block_size=16, seed=-1)
    assert len(from_array) == 16


def test_shared_hash_ids_hit_the_engine_prefix_cache():
    """What the tokens are for: a replay of a shared-prefix trace reuses KV blocks, a unique one does not."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from tests.fake_executor import PagedEchoExecutor
    from traces import ConstantRate, random_workload
    from simulator.trace_requests import add_trace_requests

    def cached_tokens(trace):
        config = EngineConfig(block_size=16, max_model_len=512, vocab_size=1000)
        engine = Engine(config, PagedEchoExecutor(num_kv_blocks=256, block_size=16, vocab_size=1000))
        add_trace_requests(engine, trace, vocab_size=1000)
        engine.run()
        return sum(record.cached_tokens for record in engine.request_records.values())

    spaced = ConstantRate(1.0)  # each request arrives after the previous one's blocks are computed
    shared = shared_prefix_workload(
        num_groups=2, prompts_per_group=4, system_prompt_len=64, question_len=8, output_len=2, arrivals=spaced
    )
    # Every request after the first of its group finds the 64-token system prompt (4 blocks) cached.
    assert cached_tokens(shared) == 2 * 3 * 64
    assert cached_tokens(random_workload(num_prompts=8, input_len=72, output_len=2, arrivals=spaced)) == 0
