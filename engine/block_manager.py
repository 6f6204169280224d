"""Paged KV blocks: a free list with reference counts, and a prefix cache over chained block hashes."""

from array import array
from dataclasses import dataclass

import xxhash

from engine.sequence import Sequence


def block_hash(parent_hash: int, token_ids) -> int:
    """xxhash64 of a block's token ids (int64, little-endian), seeded with its parent block's hash (0 for the first)."""
    return xxhash.xxh64_intdigest(array("q", token_ids).tobytes(), parent_hash)


@dataclass(frozen=True, slots=True)
class BlockView:
    """A snapshot of one KV block's state (for tests and debugging; the manager keeps parallel lists)."""

    block_id: int
    ref_count: int
    block_hash: int | None


class BlockManager:
    """Hands out KV blocks to sequences and keeps computed full blocks findable by their prefix hash.

    A block with no holder is free; if it carries a hash it is still findable until it is reused, least
    recently freed first. Blocks without a hash are reused before any cached one.

    Block state lives in parallel lists rather than one object per block, and the free blocks in two
    queues (a stack of uncached blocks, a FIFO of cached ones), so that the hundreds of blocks of a prompt
    are taken and given back with slices: a simulated trace moves millions of blocks.
    """

    # Compact the cached FIFO once this many consumed entries sit at its head.
    _COMPACT_AT = 4096

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        # A cached block's tokens, to verify a hit: the token array of the sequence that computed it and
        # the block's first position there (those positions never change once computed).
        self._block_sources: list = [None] * num_blocks
        self._block_starts = [0] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks without a hash, next to reuse at the end (a freed sequence's head reused first).
        self._uncached_free = list(range(num_blocks - 1, -1, -1))
        # Free blocks with a hash, least recently freed first from _cached_head on. A cached block taken
        # back by a prefix hit leaves a dead entry behind, counted per block in _dead_entries and skipped.
        self._cached_queue: list[int] = []
        self._cached_head = 0
        self._dead_entries: dict[int, int] = {}
        self._num_cached_free = 0
        self.num_query_tokens = 0
        """Prompt tokens looked up in the prefix cache (statistics)."""
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # ---- statistics

    @property
    def num_free_blocks(self) -> int:
        return len(self._uncached_free) + self._num_cached_free

    @property
    def num_uncached_free_blocks(self) -> int:
        """Free blocks that carry no hash: reused before any cached block is evicted."""
        return len(self._uncached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

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

    @property
    def blocks(self) -> list[BlockView]:
        """Every block's state, by block id (a snapshot)."""
        return [
            BlockView(block_id, ref_count, block_hash)
            for block_id, (ref_count, block_hash) in enumerate(zip(self._ref_counts, self._block_hashes))
        ]

    @property
    def free_queue(self) -> list[int]:
        """Free block ids in the order they will be reused (a snapshot)."""
        order = self._uncached_free[::-1]
        dead = dict(self._dead_entries)
        for block_id in self._cached_queue[self._cached_head :]:
            if dead.get(block_id):
                dead[block_id] -= 1
            else:
                order.append(block_id)
        return order

    # ---- prefix cache

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        hashes = seq.block_hashes
        first = len(hashes)
        if first >= num_full_blocks:
            return
        size = self.block_size
        parent = hashes[-1] if hashes else 0
        digest = xxhash.xxh64_intdigest
        append = hashes.append
        # Slices of a memoryview of the int64 token array hash their bytes without copying them.
        with memoryview(seq.token_ids) as tokens:
            for start in range(first * size, num_full_blocks * size, size):
                parent = digest(tokens[start : start + size], parent)
                append(parent)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq, leaving at least its last token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        size = self.block_size
        found: list[int] = []
        lookup = self.hash_to_block.get
        sources, starts = self._block_sources, self._block_starts
        tokens = seq.token_ids
        for index, digest in enumerate(seq.block_hashes[:max_blocks]):
            block_id = lookup(digest)
            if block_id is None:
                break
            start = starts[block_id]
            if sources[block_id][start : start + size] != tokens[index * size : (index + 1) * size]:
                break  # a hash collision: the tokens differ
            found.append(block_id)
        return found

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def commit_computed(self, seq: Sequence) -> None:
        """Make seq's newly computed full blocks findable (call after the step that computed their KV)."""
        if self.enable_prefix_caching:
            self.commit_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens) // self.block_size)

    def commit_blocks(self, seq: Sequence, num_full_blocks: int) -> None:
        """Make seq's leading num_full_blocks blocks findable (their KV must be computed)."""
        first = seq.num_committed_blocks
        if num_full_blocks <= first:
            return
        self._ensure_hashes(seq, num_full_blocks)
        size = self.block_size
        block_hashes, sources, starts = self._block_hashes, self._block_sources, self._block_starts
        register = self.hash_to_block.setdefault
        tokens = seq.token_ids
        table, hashes = seq.block_table, seq.block_hashes
        for index in range(first, num_full_blocks):
            block_id = table[index]
            digest = hashes[index]
            block_hashes[block_id] = digest
            sources[block_id] = tokens
            starts[block_id] = index * size
            # A twin computed earlier by another sequence keeps the existing entry.
            register(digest, block_id)
        seq.num_committed_blocks = num_full_blocks

    def holds_free_cached_block(self, digest: int) -> bool:
        """Whether digest is registered to a free block (one a later allocation may evict)."""
        block_id = self.hash_to_block.get(digest)
        return block_id is not None and self._ref_counts[block_id] == 0

    # ---- allocation

    def can_allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> bool:
        """Whether seq can take cached_block_ids and room for num_new_tokens more tokens."""
        total_tokens = len(cached_block_ids) * self.block_size + num_new_tokens
        num_fresh = self.blocks_needed(total_tokens) - len(cached_block_ids) - len(seq.block_table)
        ref_counts = self._ref_counts
        num_cached_idle = sum(1 for b in cached_block_ids if ref_counts[b] == 0)
        return num_fresh + num_cached_idle <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> None:
        """Give a newly admitted seq its cached prefix blocks plus fresh blocks for num_new_tokens."""
        assert not seq.block_table, "allocate() is for a sequence holding no blocks"
        ref_counts = self._ref_counts
        for block_id in cached_block_ids:
            if ref_counts[block_id] == 0:
                # Taken back from the cached queue: its entry there is now dead.
                self._dead_entries[block_id] = self._dead_entries.get(block_id, 0) + 1
                self._num_cached_free -= 1
            ref_counts[block_id] += 1
        seq.block_table = list(cached_block_ids)
        seq.num_committed_blocks = len(cached_block_ids)
        self._grow(seq, len(cached_block_ids) * self.block_size + num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow a running seq's block table to cover num_new_tokens more tokens."""
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > 0:
            seq.block_table += self.take(needed)

    def take(self, count: int) -> list[int]:
        """Hold count free blocks (uncached ones first, then evicting the least recently freed cached ones)."""
        free = self._uncached_free
        num_uncached = len(free)
        if count > num_uncached + self._num_cached_free:
            raise RuntimeError(f"out of KV blocks: need {count}, {self.num_free_blocks} free")
        if count <= num_uncached:
            taken = free[num_uncached - count :]
            del free[num_uncached - count :]
            taken.reverse()
        else:
            taken = free[::-1]
            free.clear()
            taken += self._evict(count - num_uncached)
        ref_counts = self._ref_counts
        for block_id in taken:
            ref_counts[block_id] = 1
        return taken

    def _evict(self, count: int) -> list[int]:
        """Take the count least recently freed cached blocks, dropping them from the prefix cache."""
        queue, head = self._cached_queue, self._cached_head
        if not self._dead_entries:
            victims = queue[head : head + count]
            head += count
        else:
            victims = []
            dead = self._dead_entries
            while len(victims) < count:
                block_id = queue[head]
                head += 1
                num_dead = dead.get(block_id)
                if num_dead:
                    if num_dead == 1:
                        del dead[block_id]
                    else:
                        dead[block_id] = num_dead - 1
                else:
                    victims.append(block_id)
        if head >= self._COMPACT_AT and 2 * head >= len(queue):
            del queue[:head]
            head = 0
        self._cached_head = head
        self._num_cached_free -= count
        self.num_evictions += count
        block_hashes = self._block_hashes
        hash_to_block = self.hash_to_block
        for block_id in victims:
            digest = block_hashes[block_id]
            block_hashes[block_id] = None
            # A twin (registered while another block held the hash) owns no entry to remove.
            if hash_to_block.get(digest) == block_id:
                del hash_to_block[digest]
        return victims

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; cached ones stay findable until evicted, the tail of seq evicted first."""
        table = seq.block_table
        num_committed = seq.num_committed_blocks
        ref_counts = self._ref_counts
        # Blocks past the committed ones carry no hash: they go on the uncached stack, head of seq on top.
        push = self._uncached_free.append
        for index in range(len(table) - 1, num_committed - 1, -1):
            block_id = table[index]
            count = ref_counts[block_id] - 1
            ref_counts[block_id] = count
            if count == 0:
                push(block_id)
            elif count < 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
        queue = self._cached_queue
        num_cached_free = len(queue)
        for index in range(num_committed - 1, -1, -1):
            block_id = table[index]
            count = ref_counts[block_id] - 1
            ref_counts[block_id] = count
            if count == 0:
                queue.append(block_id)
            elif count < 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
        self._num_cached_free += len(queue) - num_cached_free
        seq.block_table = []
        seq.num_committed_blocks = 0
