"""The block allocator and prefix cache on their own."""

import pytest

from engine.block_manager import BlockManager, block_hash
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, str(seq_id), tokens, SamplingParams(), 0.0)


def compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    seq.num_computed_tokens = num_tokens
    manager.commit_computed(seq)


def test_hash_chains_over_the_parent():
    assert block_hash(0, [1, 2]) != block_hash(1, [1, 2])
    assert block_hash(0, [1, 2]) == block_hash(0, [1, 2])


def test_blocks_are_findable_only_after_they_are_computed():
    manager = BlockManager(10, 4)
    first = make_seq(0, list(range(9)))
    manager.allocate(first, [], 9)
    assert manager.find_cached_prefix(make_seq(1, list(range(9)))) == []
    compute(manager, first, 4)
    assert manager.find_cached_prefix(make_seq(2, list(range(9)))) == first.block_table[:1]
    compute(manager, first, 9)
    assert manager.find_cached_prefix(make_seq(3, list(range(9)))) == first.block_table[:2]


def test_shared_blocks_are_reference_counted_and_freed_blocks_stay_findable_until_evicted():
    manager = BlockManager(6, 4)
    first = make_seq(0, list(range(8)) + [50])
    manager.allocate(first, [], 9)
    compute(manager, first, 9)
    second = make_seq(1, list(range(8)) + [60])
    cached = manager.find_cached_prefix(second)
    assert cached == first.block_table[:2]
    manager.allocate(second, cached, 1)
    assert [manager.blocks[b].ref_count for b in cached] == [2, 2]
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 6
    # Still findable while free...
    assert manager.find_cached_prefix(make_seq(2, list(range(8)) + [70])) == cached
    # ...until reuse evicts them, uncached blocks going first and then the least recently freed.
    hog = make_seq(3, [999] * 24)
    manager.allocate(hog, [], 24)
    assert manager.find_cached_prefix(make_seq(4, list(range(8)) + [70])) == []
    assert manager.num_evictions >= 2


def test_a_hit_verifies_the_tokens():
    manager = BlockManager(4, 2)
    seq = make_seq(0, [1, 2, 3])
    manager.allocate(seq, [], 3)
    compute(manager, seq, 3)
    # Forge a collision: the table maps the other sequence's hash to a block holding different tokens.
    other = make_seq(1, [7, 8, 9])
    manager.find_cached_prefix(other)
    manager.hash_to_block[other.block_hashes[0]] = seq.block_table[0]
    assert manager.find_cached_prefix(other) == []


def test_freeing_twice_is_caught():
    manager = BlockManager(4, 2)
    seq = make_seq(0, [1, 2, 3])
    manager.allocate(seq, [], 3)
    table = list(seq.block_table)
    manager.free(seq)
    seq.block_table = table
    with pytest.raises(RuntimeError, match="freed more often"):
        manager.free(seq)


def test_hit_rate_statistics():
    manager = BlockManager(8, 2)
    manager.record_lookup(10, 4)
    assert manager.hit_rate == pytest.approx(0.4)
    assert manager.usage == 0.0


def test_bad_engine_config_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        EngineConfig(num_kv_blocks=0)
    with pytest.raises(ValueError, match="chunked prefill"):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=512, max_model_len=4096)
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 16)


def test_an_unshared_prefix_is_findable_once_another_sequence_shares_its_first_block():
    manager = BlockManager(8, 2)
    first = make_seq(0, [1, 2, 3, 4, 5, 6, 7])
    manager.allocate(first, [], 7)
    compute(manager, first, 7)
    # No other sequence starts like it: only its first block is registered so far.
    assert list(manager.hash_to_block.values()) == first.block_table[:1]
    table = list(first.block_table)
    manager.free(first)
    # Reuse takes the 5 uncached blocks, then evicts first's tail block.
    hog = make_seq(1, [99] * 12)
    manager.allocate(hog, [], 12)
    assert manager.find_cached_prefix(make_seq(2, [1, 2, 3, 4, 5, 6, 9])) == table[:2]
    assert sorted(manager.hash_to_block.values()) == sorted(table[:2])


def test_a_twin_keeps_the_prefix_findable_after_the_first_copy_is_evicted():
    # Two requests compute the same blocks in the same step: the second copy is a twin. As in vLLM, the hash
    # stays findable while any copy of the block remains cached.
    manager = BlockManager(8, 2)
    first, second = make_seq(0, [1, 2, 3, 4, 5]), make_seq(1, [1, 2, 3, 4, 5])
    for seq in (first, second):
        manager.allocate(seq, [], 5)
    for seq in (first, second):
        compute(manager, seq, 5)
    twin_blocks = second.block_table[:2]
    manager.free(first)
    manager.free(second)
    manager.take(6)  # the 4 uncached blocks, then the two least recently freed cached ones: the first copy
    assert manager.find_cached_prefix(make_seq(2, [1, 2, 3, 4, 5])) == twin_blocks
