"""Paged KV blocks: a free list with reference counts, and a prefix cache over chained block hashes."""

from array import array
from collections import OrderedDict

import xxhash

from engine.sequence import Sequence


def block_hash(parent_hash: int, token_ids: list[int]) -> int:
    """xxhash64 of the parent block's hash followed by this block's token ids (int64, little-endian)."""
    return xxhash.xxh64_intdigest(parent_hash.to_bytes(8, "little") + array("q", token_ids).tobytes())


class Block:
    """One KV block: who holds it, and which tokens it caches once computed."""

    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Hands out KV blocks to sequences and keeps computed full blocks findable by their prefix hash.

    A block with no holder sits in the free queue; if it carries a hash it is still findable there
    until it is reused, least recently freed first. Blocks without a hash are reused before any cached one.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_query_tokens = 0
        """Prompt tokens looked up in the prefix cache (statistics)."""
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # ---- statistics

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        """Share of blocks held by running sequences."""
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were found in the prefix cache."""
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        hashes = seq.block_hashes
        first = len(hashes)
        if first >= num_full_blocks:
            return
        size = self.block_size
        # One conversion to bytes for all new blocks; each block then hashes its slice after its parent.
        data = array("q", seq.token_ids[first * size : num_full_blocks * size]).tobytes()
        stride = 8 * size
        parent = hashes[-1] if hashes else 0
        digest = xxhash.xxh64_intdigest
        for offset in range(0, len(data), stride):
            parent = digest(parent.to_bytes(8, "little") + data[offset : offset + stride])
            hashes.append(parent)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq, leaving at least its last token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        size = self.block_size
        found: list[int] = []
        for index in range(max_blocks):
            block_id = self.hash_to_block.get(seq.block_hashes[index])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[index * size : (index + 1) * size]):
                break  # a hash collision: the tokens differ
            found.append(block_id)
        return found

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def commit_computed(self, seq: Sequence) -> None:
        """Make seq's newly computed full blocks findable (call after the step that computed their KV)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        self._ensure_hashes(seq, num_full)
        size = self.block_size
        for index in range(seq.num_committed_blocks, num_full):
            block = self.blocks[seq.block_table[index]]
            digest = seq.block_hashes[index]
            block.block_hash = digest
            block.token_ids = tuple(seq.token_ids[index * size : (index + 1) * size])
            # A twin computed in the same step by another sequence keeps the existing entry.
            self.hash_to_block.setdefault(digest, block.block_id)
        seq.num_committed_blocks = num_full

    # ---- allocation

    def can_allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> bool:
        """Whether seq can take cached_block_ids and room for num_new_tokens more tokens."""
        total_tokens = len(cached_block_ids) * self.block_size + num_new_tokens
        num_fresh = self.blocks_needed(total_tokens) - len(cached_block_ids) - len(seq.block_table)
        num_cached_idle = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return num_fresh + num_cached_idle <= len(self.free_queue)

    def allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> None:
        """Give a newly admitted seq its cached prefix blocks plus fresh blocks for num_new_tokens."""
        assert not seq.block_table, "allocate() is for a sequence holding no blocks"
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_committed_blocks = len(cached_block_ids)
        self._grow(seq, len(cached_block_ids) * self.block_size + num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= len(self.free_queue)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow a running seq's block table to cover num_new_tokens more tokens."""
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > len(self.free_queue):
            raise RuntimeError(f"out of KV blocks: need {needed}, {len(self.free_queue)} free")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = None
            self.num_evictions += 1
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; cached ones stay findable until evicted, the tail of seq evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_committed_blocks = 0
