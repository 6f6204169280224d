"""Deterministic prompt token ids: equal prefix block ids give equal tokens in every run and on every executor."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import xxhash

from traces.schema import Trace

_BLOCK_DOMAIN = np.uint64(0x5B10C)
_REQUEST_DOMAIN = np.uint64(0x4E0E57)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# Rows are synthesized a batch at a time, so numpy works on arrays of this many tokens at most (plus
# one row): far fewer calls than one per row, and buffers small enough to stay in cache.
_BATCH_TOKENS = 1 << 16


def prompt_token_ids_for(
    prompt_len: int,
    prefix_block_ids: Sequence[int] | None = None,
    *,
    request_id: str,
    vocab_size: int,
    hash_block_size: int = 512,
    seed: int = 0,
) -> np.ndarray:
    """Token ids (int32) for one request: shared per full prefix block, unique to the request elsewhere."""
    if prompt_len < 0:
        raise ValueError(f"prompt_len must be non-negative, got {prompt_len}")
    if hash_block_size < 1:
        raise ValueError(f"hash_block_size must be positive, got {hash_block_size}")
    # Only whole blocks are shared: the last partial block's tokens belong to this request alone,
    # as the trace cannot say whether another request's partial block of the same id matches.
    num_ids = 0 if prefix_block_ids is None else len(prefix_block_ids)
    num_shared = min(num_ids, prompt_len // hash_block_size)
    block_ids = np.asarray(prefix_block_ids[:num_shared] if num_shared else [], dtype=np.int64)
    return _synthesize(
        np.array([prompt_len], dtype=np.int64),
        np.array([num_shared], dtype=np.int64),
        block_ids,
        [request_id],
        vocab_size=vocab_size,
        hash_block_size=hash_block_size,
        seed=seed,
    )


def trace_prompt_token_ids(
    trace: Trace, *, vocab_size: int, seed: int = 0, max_prompt_len: int | None = None
) -> Iterator[np.ndarray | None]:
    """Prompt token ids of every trace row, in order; rows that carry prompt_token_ids keep them.

    A row longer than max_prompt_len yields None: its length is checked before anything is made for it, so a
    trace claiming billions of tokens is rejected row by row instead of exhausting memory.
    """
    table = trace.table
    hash_block_size = trace.hash_block_size
    if hash_block_size < 1:
        raise ValueError(f"hash_block_size must be positive, got {hash_block_size}")
    _token_range(vocab_size)
    id_column = table.column("request_id")
    prompt_lens = table.column("prompt_len").to_numpy().astype(np.int64)
    if len(prompt_lens) and prompt_lens.min() < 0:
        row = int(np.argmax(prompt_lens < 0))
        raise ValueError(f"trace {trace.name!r} request {id_column[row].as_py()}: prompt_len must be non-negative")
    too_long = prompt_lens > max_prompt_len if max_prompt_len is not None else np.zeros(len(prompt_lens), bool)
    # Prefix block ids as one flat array plus each row's count (a null list counts as empty).
    prefix = table.column("prefix_block_ids").combine_chunks()
    num_ids = pc.fill_null(pc.list_value_length(prefix), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_ids = prefix.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    id_offsets = np.concatenate(([0], np.cumsum(num_ids)))
    num_shared = np.minimum(num_ids, prompt_lens // hash_block_size)
    given = table.column("prompt_token_ids")
    has_given = given.null_count < len(given)
    given_ids = given.to_pylist() if has_given else None
    # Rows that carry their tokens, and rows too long, are synthesized as empty and replaced below.
    synthesized_lens = np.where(too_long, 0, prompt_lens)
    num_shared[too_long] = 0
    if has_given:
        for row, ids in enumerate(given_ids):
            if ids is not None:
                synthesized_lens[row] = 0
                num_shared[row] = 0

    num_rows = len(prompt_lens)
    ends = np.cumsum(synthesized_lens)
    batch_start = 0
    while batch_start < num_rows:
        tokens_before = int(ends[batch_start - 1]) if batch_start else 0
        batch_end = max(int(np.searchsorted(ends, tokens_before + _BATCH_TOKENS, side="right")), batch_start + 1)
        rows = slice(batch_start, batch_end)
        shared = num_shared[rows]
        # The shared ids of each row: its first num_shared ids.
        firsts = id_offsets[batch_start:batch_end]
        id_index = np.repeat(firsts - np.concatenate(([0], np.cumsum(shared)[:-1])), shared) + np.arange(shared.sum())
        tokens = _synthesize(
            synthesized_lens[rows],
            shared,
            flat_ids[id_index],
            id_column.slice(batch_start, batch_end - batch_start).to_pylist(),
            vocab_size=vocab_size,
            hash_block_size=hash_block_size,
            seed=seed,
        )
        row_ends = np.cumsum(synthesized_lens[rows]).tolist()
        start = 0
        for row, end in zip(range(batch_start, batch_end), row_ends):
            if too_long[row]:
                yield None
            elif has_given and given_ids[row] is not None:
                row_tokens = np.asarray(given_ids[row], dtype=np.int32)
                if row_tokens.size and (row_tokens.min() < 0 or row_tokens.max() >= vocab_size):
                    raise ValueError(
                        f"trace {trace.name!r} request {id_column[row].as_py()}: prompt_token_ids outside the "
                        f"vocabulary of {vocab_size}"
                    )
                yield row_tokens
            else:
                yield tokens[start:end]
            start = end
        batch_start = batch_end


def _synthesize(
    prompt_lens: np.ndarray,
    num_shared: np.ndarray,
    block_ids: np.ndarray,
    request_ids: list,
    *,
    vocab_size: int,
    hash_block_size: int,
    seed: int,
) -> np.ndarray:
    """The tokens of consecutive rows, concatenated (int32).

    Row i starts with num_shared[i] whole blocks (its next num_shared[i] entries of block_ids), each
    token mix(mix(block id ^ seed) + offset in block * golden), then its own tokens
    mix(mix(hash(request id) ^ seed) + position * golden). Both are mix(key + p * golden) over segments
    of equal key, so the whole batch is one vectorized pass.
    """
    low, span = _token_range(vocab_size)
    seed_state = _mix(np.array([int(seed) % 2**64], dtype=np.uint64) * _GOLDEN)[0]
    num_rows = len(prompt_lens)
    starts = num_shared * hash_block_size
    # Segments in token order: each row's shared blocks, then its own tokens (maybe none).
    segments_per_row = num_shared + 1
    num_segments = int(segments_per_row.sum())
    own_segment = np.cumsum(segments_per_row) - 1
    is_own = np.zeros(num_segments, dtype=bool)
    is_own[own_segment] = True
    lengths = np.full(num_segments, hash_block_size, dtype=np.int64)
    lengths[own_segment] = prompt_lens - starts
    # First position within the row of each segment's first token: 0 in a block, the block tokens before own tokens.
    bases = np.zeros(num_segments, dtype=np.int64)
    bases[own_segment] = starts
    keys = np.empty(num_segments, dtype=np.uint64)
    request_keys = np.fromiter(
        (xxhash.xxh64_intdigest(str(request_id).encode()) for request_id in request_ids), dtype=np.uint64, count=num_rows
    )
    keys[own_segment] = _mix(request_keys ^ seed_state ^ _REQUEST_DOMAIN)
    keys[~is_own] = _mix(block_ids.view(np.uint64) ^ (seed_state ^ _BLOCK_DOMAIN))
    segment_starts = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    positions = np.arange(total, dtype=np.int64) - np.repeat(segment_starts - bases, lengths)
    with np.errstate(over="ignore"):
        values = positions.view(np.uint64) * _GOLDEN
        values += np.repeat(keys, lengths)
    _mix_in_place(values)
    values %= np.uint64(span)
    values += np.uint64(low)
    return values.astype(np.int32)


def _token_range(vocab_size: int) -> tuple[int, int]:
    """Ids drawn from [margin, vocab_size - margin): the ends of a vocabulary hold the special tokens."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    margin = min(100, int(vocab_size) // 4)
    return margin, int(vocab_size) - 2 * margin


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that scatters nearby inputs."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def _mix_in_place(values: np.ndarray) -> None:
    """_mix, overwriting values (uint64) with one scratch array: no fresh array per operation."""
    scratch = np.empty_like(values)
    with np.errstate(over="ignore"):
        np.right_shift(values, np.uint64(30), out=scratch)
        values ^= scratch
        values *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(values, np.uint64(27), out=scratch)
        values ^= scratch
        values *= np.uint64(0x94D049BB133111EB)
        np.right_shift(values, np.uint64(31), out=scratch)
        values ^= scratch
