"""Paged KV blocks: a free list with reference counts, and a prefix cache over chained block hashes."""

import struct
from array import array
from collections import deque
from dataclasses import dataclass
from itertools import repeat

import xxhash

from engine.sequence import Sequence


def block_hash(parent_hash: int, token_ids) -> int:
    """xxhash64 of a block's token ids (int32, native order), seeded with its parent block's hash (0 for the first)."""
    return xxhash.xxh64_intdigest(array("i", token_ids).tobytes(), parent_hash)


@dataclass(frozen=True, slots=True)
class BlockView:
    """A snapshot of one KV block (for tests and debugging; the manager keeps no object per block)."""

    block_id: int
    ref_count: int
    block_hash: int | None
    """The hash the prefix cache finds this block by, None when it is not findable (or not yet registered)."""


class BlockManager:
    """Hands out KV blocks to sequences and keeps computed full blocks findable by their prefix hash.

    A block with no holder is free; if it carries a hash it is still findable until it is reused, least
    recently freed first. Blocks without a hash are reused before any cached one.

    A simulated trace moves millions of blocks, and a prompt's blocks come and go together, so the
    bookkeeping works on whole block lists (slices, set and dict updates) rather than block by block:
    - a free block has `_free[b]` set (a byte per block: a set of tens of thousands of ids, churned by every
      request, costs a cache miss per id); a held one has one holder plus `_extra_holders[b]` (prefix hits);
    - free blocks without a hash wait on a stack, the next one to reuse at its end;
    - free blocks with a hash wait in a FIFO with their hashes. A cached block taken back by a prefix hit
      leaves a dead entry there, counted in `_dead_entries` and skipped when the FIFO is consumed;
    - a sequence's first num_committed_blocks blocks are the ones with a hash (freed into the FIFO);
    - a committed block whose hash another block already owns (a twin) is in `_twins`: it carries the
      hash but is not findable while the owner is cached, and reusing it must leave the owner's entry
      alone; when the owner is evicted, the oldest remaining twin becomes findable in its place.

    Registration is deferred for prefixes no other sequence shares. Blocks can only meet in the cache
    (equal chained hashes) when their sequences start with the same first block. So the first sequence
    with a given first-block ("root") hash registers only that root; its deeper blocks stay out of
    hash_to_block, unhashed, until another sequence with the same root looks it up or registers it
    (then they are registered, those not evicted since, and the root counts as shared from then on).
    hash_to_block then holds what registering every block would have left in it for every key a lookup
    can reach: most traces share no prefix, and most blocks are then never hashed nor registered.
    """

    # Compact the cached FIFO once this many consumed entries sit at its head.
    _COMPACT_AT = 4096

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_to_block: dict[int, int] = {}
        self._free = bytearray(b"\x01") * num_blocks
        self._extra_holders: dict[int, int] = {}
        self._uncached_free = list(range(num_blocks - 1, -1, -1))
        self._cached_queue: list[int] = []
        self._cached_queue_hashes: list[int] = []
        self._cached_head = 0
        self._dead_entries: dict[int, int] = {}
        self._num_cached_free = 0
        self._twins: set[int] = set()
        # The twins of each hash in registration order: when the block owning a hash is evicted, the
        # oldest remaining twin takes the hash over (as vLLM keeps a hash while any block with it remains).
        self._twins_of: dict[int, list[int]] = {}
        # Deferred registration (see the class docstring): the one sequence of each unshared root, the
        # sequences deferring, the committed blocks of those freed since (and their count), roots shared,
        # and the hashes of blocks registered late while free (their FIFO entries have no hash).
        self._root_owners: dict[int, Sequence] = {}
        self._deferring: set[int] = set()
        self._freed_tables: dict[int, tuple[list[int], int]] = {}
        self._shared_roots: set[int] = set()
        self._late_hashes: dict[int, int] = {}
        # The sequence that committed each block, to verify a hit: at the depth looked up, its chain hash
        # must be the one found and its tokens those of the sequence looking (computed tokens never change).
        self._block_sources: list[Sequence | None] = [None] * num_blocks
        # Splits a block-aligned run of int32 tokens into one bytes object per block, in C.
        self._split_blocks = struct.Struct(f"{4 * block_size}s").iter_unpack
        self.num_query_tokens = 0
        """Prompt tokens looked up in the prefix cache (statistics)."""
        self.num_hit_tokens = 0
        self.num_evictions = 0
        self.peak_num_used_blocks = 0
        """The most blocks ever held at once (statistics)."""

    # ---- statistics

    @property
    def num_free_blocks(self) -> int:
        return len(self._uncached_free) + self._num_cached_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._uncached_free) - self._num_cached_free

    @property
    def usage(self) -> float:
        """Share of blocks held by running sequences."""
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were found in the prefix cache."""
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def holds_nothing(self) -> bool:
        """Whether every block is free and has no holder (what an engine with no request left must see)."""
        return (0 not in self._free and not self._extra_holders
                and self.num_free_blocks == self.num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def blocks(self) -> list[BlockView]:
        """Every block's state, by block id (a snapshot)."""
        registered = {block_id: digest for digest, block_id in self.hash_to_block.items()}
        return [
            BlockView(
                block_id,
                0 if self._free[block_id] else 1 + self._extra_holders.get(block_id, 0),
                registered.get(block_id),
            )
            for block_id in range(self.num_blocks)
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

    def ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Compute the chained hashes of seq's first num_full_blocks blocks, those it lacks."""
        hashes = seq.block_hashes
        first = len(hashes)
        if first >= num_full_blocks:
            return
        size = self.block_size
        parent = hashes[-1] if hashes else 0
        digest = xxhash.xxh64_intdigest
        append = hashes.append
        for (block,) in self._split_blocks(seq.token_ids[first * size : num_full_blocks * size]):
            parent = digest(block, parent)
            append(parent)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq, leaving at least its last token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if max_blocks == 0:
            return []
        self.ensure_hashes(seq, 1)
        root = seq.block_hashes[0]
        owner = self._root_owners.get(root)
        if owner is not None:
            self._register_deferred(owner)
        if root not in self.hash_to_block:
            return []
        self.ensure_hashes(seq, max_blocks)
        size = self.block_size
        found: list[int] = []
        lookup = self.hash_to_block.get
        sources = self._block_sources
        tokens = seq.token_ids
        for index, digest in enumerate(seq.block_hashes[:max_blocks]):
            block_id = lookup(digest)
            if block_id is None:
                break
            source = sources[block_id]
            start = index * size
            if (
                source is None
                or index >= len(source.block_hashes)
                or source.block_hashes[index] != digest
                or source.token_ids[start : start + size] != tokens[start : start + size]
            ):
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
        blocks = seq.block_table[first:num_full_blocks]
        sources = self._block_sources
        for block_id in blocks:
            sources[block_id] = seq
        if first == 0:
            self.ensure_hashes(seq, 1)
            root = seq.block_hashes[0]
            owner = self._root_owners.get(root)
            if owner is not None and owner is not seq:
                self._register_deferred(owner)
            elif owner is None and root not in self._shared_roots:
                self._root_owners[root] = seq
                self._deferring.add(seq.seq_id)
        if seq.seq_id in self._deferring:
            if first == 0:
                self._register([seq.block_hashes[0]], blocks[:1])
            seq.num_committed_blocks = num_full_blocks
            return
        self.ensure_hashes(seq, num_full_blocks)
        self._register(seq.block_hashes[first:num_full_blocks], blocks)
        seq.num_committed_blocks = num_full_blocks

    def _register(self, digests: list[int], blocks: list[int]) -> None:
        # The first block to register a hash keeps it: a later one with the same hash is a twin.
        hash_to_block = self.hash_to_block
        if list(map(hash_to_block.setdefault, digests, blocks)) != blocks:
            for digest, block_id in zip(digests, blocks):
                if hash_to_block[digest] != block_id:
                    self._add_twin(digest, block_id)

    def defers(self, seq: Sequence) -> bool:
        """Whether seq's deeper blocks are registered later (its prefix is shared by no other sequence)."""
        return seq.seq_id in self._deferring

    def _register_deferred(self, owner: Sequence) -> None:
        """Register the deferred blocks of owner not evicted since; its root is shared from now on."""
        root = owner.block_hashes[0]
        del self._root_owners[root]
        self._deferring.discard(owner.seq_id)
        self._shared_roots.add(root)
        table, num_committed = self._freed_tables.pop(owner.seq_id, (owner.block_table, owner.num_committed_blocks))
        self.ensure_hashes(owner, num_committed)
        sources, free, hash_to_block = self._block_sources, self._free, self.hash_to_block
        for index in range(1, num_committed):
            block_id = table[index]
            if sources[block_id] is not owner:
                continue  # evicted since (eviction clears the source)
            digest = owner.block_hashes[index]
            if hash_to_block.setdefault(digest, block_id) != block_id:
                self._add_twin(digest, block_id)
            elif free[block_id]:
                self._late_hashes[block_id] = digest  # its FIFO entry has no hash to evict it by

    def registers_independently(self, digests: list[int]) -> bool:
        """Whether registering digests commutes with allocations: none repeats, none is owned by a free
        block (which an allocation may evict)."""
        free = self._free
        return len(set(digests)) == len(digests) and not any(
            free[block_id] for block_id in map(self.hash_to_block.get, digests) if block_id is not None)

    # ---- allocation

    def can_allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> bool:
        """Whether seq can take cached_block_ids and room for num_new_tokens more tokens."""
        total_tokens = len(cached_block_ids) * self.block_size + num_new_tokens
        num_fresh = self.blocks_needed(total_tokens) - len(cached_block_ids) - len(seq.block_table)
        num_cached_idle = sum(map(self._free.__getitem__, cached_block_ids)) if cached_block_ids else 0
        return num_fresh + num_cached_idle <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> None:
        """Give a newly admitted seq its cached prefix blocks plus fresh blocks for num_new_tokens."""
        assert not seq.block_table, "allocate() is for a sequence holding no blocks"
        free, extra = self._free, self._extra_holders
        for block_id in cached_block_ids:
            if free[block_id]:
                # Taken back from the cached FIFO: its entry there is now dead.
                free[block_id] = 0
                self._dead_entries[block_id] = self._dead_entries.get(block_id, 0) + 1
                self._num_cached_free -= 1
            else:
                extra[block_id] = extra.get(block_id, 0) + 1
        seq.block_table = list(cached_block_ids)
        seq.num_committed_blocks = len(cached_block_ids)
        self._grow(seq, len(cached_block_ids) * self.block_size + num_new_tokens)
        if cached_block_ids:
            self._note_used()  # blocks taken back from the cache count as held too

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow a running seq's block table to cover num_new_tokens more tokens."""
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > 0:
            seq.block_table += self.take(needed)

    def take(self, count: int) -> list[int]:
        """Hold count free blocks (uncached ones first, then evicting the least recently freed cached ones)."""
        stack = self._uncached_free
        num_uncached = len(stack)
        if count > num_uncached + self._num_cached_free:
            raise RuntimeError(f"out of KV blocks: need {count}, {self.num_free_blocks} free")
        if count <= num_uncached:
            taken = stack[num_uncached - count :]
            del stack[num_uncached - count :]
            taken.reverse()
        else:
            taken = stack[::-1]
            stack.clear()
            taken += self._evict(count - num_uncached)
        free = self._free
        for block_id in taken:
            free[block_id] = 0
        self._note_used()
        return taken

    def _note_used(self) -> None:
        used = self.num_blocks - len(self._uncached_free) - self._num_cached_free
        if used > self.peak_num_used_blocks:
            self.peak_num_used_blocks = used

    def _evict(self, count: int) -> list[int]:
        """Take the count least recently freed cached blocks, dropping them from the prefix cache."""
        queue, queue_hashes, head = self._cached_queue, self._cached_queue_hashes, self._cached_head
        if not self._dead_entries:
            victims = queue[head : head + count]
            digests = queue_hashes[head : head + count]
            head += count
        else:
            victims, digests = [], []
            dead = self._dead_entries
            while len(victims) < count:
                block_id = queue[head]
                num_dead = dead.get(block_id)
                if num_dead:
                    if num_dead == 1:
                        del dead[block_id]
                    else:
                        dead[block_id] = num_dead - 1
                else:
                    victims.append(block_id)
                    digests.append(queue_hashes[head])
                head += 1
        if head >= self._COMPACT_AT and 2 * head >= len(queue):
            del queue[:head]
            del queue_hashes[:head]
            head = 0
        self._cached_head = head
        self._num_cached_free -= count
        self.num_evictions += count
        sources = self._block_sources
        for block_id in victims:
            sources[block_id] = None
        if self._freed_tables:
            self._forget_evicted_owners(victims, digests)
        if self._late_hashes:
            late = self._late_hashes
            for index, block_id in enumerate(victims):
                digest = late.pop(block_id, None)
                if digests[index] is None:
                    digests[index] = digest
        hash_to_block = self.hash_to_block
        twins = self._twins
        if not twins:
            deque(map(hash_to_block.pop, digests, repeat(None)), maxlen=0)
        else:
            for digest, block_id in zip(digests, victims):
                if block_id in twins:
                    self._drop_twin(digest, block_id)  # the hash belongs to another block
                elif hash_to_block.get(digest) == block_id:
                    successors = self._twins_of.get(digest)
                    if successors:
                        successor = successors[0]
                        self._drop_twin(digest, successor)
                        hash_to_block[digest] = successor
                    else:
                        del hash_to_block[digest]
        return victims

    def _forget_evicted_owners(self, victims: list[int], digests: list) -> None:
        """Forget the deferring sequences whose root block is among the victims: a sequence's blocks are freed
        together, root last, so all its committed blocks are evicted by then and registering them later would
        register nothing. Without this every unshared prompt of a trace would be kept to the end."""
        root_owners, freed_tables = self._root_owners, self._freed_tables
        for block_id, digest in zip(victims, digests):
            if digest is None:
                continue
            owner = root_owners.get(digest)
            if owner is None:
                continue
            freed = freed_tables.get(owner.seq_id)
            if freed is not None and freed[0] and freed[0][0] == block_id:
                del root_owners[digest]
                del freed_tables[owner.seq_id]
                self._deferring.discard(owner.seq_id)

    def _add_twin(self, digest: int, block_id: int) -> None:
        self._twins.add(block_id)
        self._twins_of.setdefault(digest, []).append(block_id)

    def _drop_twin(self, digest: int, block_id: int) -> None:
        self._twins.discard(block_id)
        successors = self._twins_of[digest]
        successors.remove(block_id)
        if not successors:
            del self._twins_of[digest]

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; cached ones stay findable until evicted, the tail of seq evicted first."""
        table = seq.block_table
        num_committed = seq.num_committed_blocks
        free, extra = self._free, self._extra_holders
        if extra and not extra.keys().isdisjoint(table):
            # Blocks another sequence also holds stay held: release only this sequence's share of them.
            released = []
            for block_id in table:
                holders = extra.get(block_id)
                if holders is None:
                    released.append(block_id)
                elif holders == 1:
                    del extra[block_id]
                else:
                    extra[block_id] = holders - 1
            released_set = set(released)
            uncached = [b for b in table[num_committed:] if b in released_set]
            cached = [(b, d) for b, d in zip(table[:num_committed], seq.block_hashes) if b in released_set]
        else:
            released = table
            uncached = table[num_committed:]
            cached = None
        for block_id in released:
            if free[block_id]:
                raise RuntimeError(f"blocks of sequence {seq.seq_id} freed more often than they were allocated")
            free[block_id] = 1
        # The head of seq is reused first among uncached blocks; its tail is evicted first among cached ones.
        self._uncached_free += reversed(uncached)
        if cached is None:
            self._cached_queue += reversed(table[:num_committed])
            if seq.seq_id in self._deferring:
                # Only the root is registered: deeper entries carry no hash (see _register_deferred).
                self._freed_tables[seq.seq_id] = (table, num_committed)
                if num_committed:
                    self._cached_queue_hashes += repeat(None, num_committed - 1)
                    self._cached_queue_hashes.append(seq.block_hashes[0])
            else:
                self._cached_queue_hashes += reversed(seq.block_hashes[:num_committed])
            self._num_cached_free += num_committed
        else:
            self._cached_queue += (block_id for block_id, _ in reversed(cached))
            self._cached_queue_hashes += (digest for _, digest in reversed(cached))
            self._num_cached_free += len(cached)
        seq.block_table = []
        seq.num_committed_blocks = 0
