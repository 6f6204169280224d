"""A plain block manager, the oracle of the differential test: lists, dicts and linear scans, nothing deferred.

It implements the policy engine/block_manager.py documents, the way one would first write it down:
- a block is free (no holder) or held, with one reference per holder;
- a sequence's first num_committed_blocks blocks have their KV computed and carry the chained hash of the
  tokens up to their end; every committed block is registered under its hash at once;
- the first block registered under a hash is the one a lookup finds; a later one (a twin) waits in line and
  is found once every block registered before it has been evicted;
- a freed block without a hash is reused first: the last ones freed first, a sequence's head before its tail;
- a freed block with a hash stays findable until it is reused, least recently freed first and a sequence's
  tail before its head; reusing it (an eviction) drops its hash; a prefix hit takes it back instead.
"""

from array import array

import xxhash

from engine.block_manager import BlockView


def chained_hashes(token_ids, block_size: int, num_blocks: int) -> list[int]:
    """The prefix-cache hash of each of the first num_blocks full blocks: xxhash64 of the block's int32
    tokens, seeded with the hash of the block before (0 for the first)."""
    hashes = []
    parent = 0
    for index in range(num_blocks):
        block = array("i", token_ids[index * block_size : (index + 1) * block_size])
        parent = xxhash.xxh64_intdigest(block.tobytes(), parent)
        hashes.append(parent)
    return hashes


class ReferenceBlockManager:
    """The block manager's public behaviour, written for obviousness rather than speed."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.carried: dict[int, tuple[int, tuple[int, ...]]] = {}
        """Block id -> (hash, every token up to the block's end) of each committed block not yet evicted."""
        self.registered: dict[int, list[int]] = {}
        """Hash -> the blocks carrying it, in registration order: the first one is the one found."""
        self.free_without_hash = list(range(num_blocks))
        """Free blocks carrying no hash, the next one to reuse first."""
        self.free_with_hash: list[int] = []
        """Free blocks carrying a hash, the next one to evict first."""
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # ---- what the scheduler and engine read

    @property
    def num_free_blocks(self) -> int:
        return self.ref_counts.count(0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def holds_nothing(self) -> bool:
        return not any(self.ref_counts)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def hash_to_block(self) -> dict[int, int]:
        return {digest: blocks[0] for digest, blocks in self.registered.items()}

    @property
    def blocks(self) -> list[BlockView]:
        findable = {block_id: digest for digest, block_id in self.hash_to_block.items()}
        return [BlockView(b, self.ref_counts[b], findable.get(b)) for b in range(self.num_blocks)]

    @property
    def free_queue(self) -> list[int]:
        return self.free_without_hash + self.free_with_hash

    # ---- prefix cache

    def find_cached_prefix(self, seq) -> list[int]:
        """The blocks found for seq's leading full blocks, stopping at the first miss; its last token is
        always left to compute."""
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        max_blocks = (seq.num_tokens - 1) // size
        found = []
        for index, digest in enumerate(chained_hashes(seq.token_ids, size, max_blocks)):
            if digest not in self.registered:
                break
            block_id = self.registered[digest][0]
            if self.carried[block_id][1] != tuple(seq.token_ids[: (index + 1) * size]):
                break  # a hash collision
            found.append(block_id)
        return found

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def commit_computed(self, seq) -> None:
        if self.enable_prefix_caching:
            self.commit_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens) // self.block_size)

    def commit_blocks(self, seq, num_full_blocks: int) -> None:
        size = self.block_size
        hashes = chained_hashes(seq.token_ids, size, num_full_blocks)
        for index in range(seq.num_committed_blocks, num_full_blocks):
            block_id = seq.block_table[index]
            assert block_id not in self.carried, f"block {block_id} is committed twice"
            self.carried[block_id] = (hashes[index], tuple(seq.token_ids[: (index + 1) * size]))
            self.registered.setdefault(hashes[index], []).append(block_id)
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full_blocks)

    # ---- allocation

    def can_allocate(self, seq, cached_block_ids: list[int], num_new_tokens: int) -> bool:
        total_tokens = len(cached_block_ids) * self.block_size + num_new_tokens
        num_fresh = self.blocks_needed(total_tokens) - len(cached_block_ids) - len(seq.block_table)
        num_cached_free = sum(1 for block_id in cached_block_ids if self.ref_counts[block_id] == 0)
        return num_fresh + num_cached_free <= self.num_free_blocks

    def allocate(self, seq, cached_block_ids: list[int], num_new_tokens: int) -> None:
        assert not seq.block_table
        for block_id in cached_block_ids:
            if self.ref_counts[block_id] == 0:
                self.free_with_hash.remove(block_id)
            self.ref_counts[block_id] += 1
        seq.block_table = list(cached_block_ids)
        seq.num_committed_blocks = len(cached_block_ids)
        self._grow(seq, len(cached_block_ids) * self.block_size + num_new_tokens)

    def can_append(self, seq, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq, num_new_tokens: int) -> None:
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq, num_tokens: int) -> None:
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > 0:
            seq.block_table += self.take(needed)

    def take(self, count: int) -> list[int]:
        if count > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {count}, {self.num_free_blocks} free")
        taken = []
        for _ in range(count):
            if self.free_without_hash:
                block_id = self.free_without_hash.pop(0)
            else:
                block_id = self.free_with_hash.pop(0)
                digest, _ = self.carried.pop(block_id)
                self.registered[digest].remove(block_id)
                if not self.registered[digest]:
                    del self.registered[digest]
                self.num_evictions += 1
            self.ref_counts[block_id] = 1
            taken.append(block_id)
        return taken

    def free(self, seq) -> None:
        released_without_hash, released_with_hash = [], []
        for index, block_id in enumerate(seq.block_table):
            if self.ref_counts[block_id] == 0:
                raise RuntimeError(f"blocks of sequence {seq.seq_id} freed more often than they were allocated")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if index < seq.num_committed_blocks:
                    released_with_hash.append(block_id)
                else:
                    released_without_hash.append(block_id)
        self.free_without_hash = released_without_hash + self.free_without_hash
        self.free_with_hash += reversed(released_with_hash)
        seq.block_table = []
        seq.num_committed_blocks = 0
