"""Deterministic prompt token ids: equal prefix block ids give equal tokens in every run and on every executor."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import xxhash

from traces.schema import Trace

_BLOCK_DOMAIN = np.uint64(0x5B10C)
_REQUEST_DOMAIN = np.uint64(0x4E0E57)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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
    low, span = _token_range(vocab_size)
    seed_state = _mix(np.array([int(seed) % 2**64], dtype=np.uint64) * _GOLDEN)[0]
    # Only whole blocks are shared: the last partial block's tokens belong to this request alone,
    # as the trace cannot say whether another request's partial block of the same id matches.
    num_ids = 0 if prefix_block_ids is None else len(prefix_block_ids)
    num_shared = min(num_ids, prompt_len // hash_block_size)
    tokens = np.empty(prompt_len, dtype=np.int32)
    if num_shared:
        block_ids = np.asarray(prefix_block_ids[:num_shared], dtype=np.int64).view(np.uint64)
        block_keys = _mix(block_ids ^ (seed_state ^ _BLOCK_DOMAIN))
        positions = np.arange(hash_block_size, dtype=np.uint64) * _GOLDEN
        shared = _mix(block_keys[:, None] + positions[None, :])
        tokens[: num_shared * hash_block_size] = (shared % np.uint64(span)).ravel() + low
    start = num_shared * hash_block_size
    if start < prompt_len:
        request_key = np.uint64(xxhash.xxh64_intdigest(str(request_id).encode())) ^ seed_state ^ _REQUEST_DOMAIN
        positions = np.arange(start, prompt_len, dtype=np.uint64) * _GOLDEN
        own = _mix(_mix(np.array([request_key], dtype=np.uint64)) + positions)
        tokens[start:] = own % np.uint64(span) + low
    return tokens


def trace_prompt_token_ids(trace: Trace, *, vocab_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Prompt token ids of every trace row, in order; rows that carry prompt_token_ids keep them."""
    table = trace.table
    request_ids = table.column("request_id").to_pylist()
    prompt_lens = table.column("prompt_len").to_numpy()
    prefix_ids = table.column("prefix_block_ids").to_pylist()
    given = table.column("prompt_token_ids")
    has_given = given.null_count < len(given)
    given_ids = given.to_pylist() if has_given else None
    for row, request_id in enumerate(request_ids):
        if has_given and given_ids[row] is not None:
            tokens = np.asarray(given_ids[row], dtype=np.int32)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
                raise ValueError(
                    f"trace {trace.name!r} request {request_id}: prompt_token_ids outside the vocabulary of {vocab_size}"
                )
            yield tokens
            continue
        yield prompt_token_ids_for(
            int(prompt_lens[row]),
            prefix_ids[row],
            request_id=request_id,
            vocab_size=vocab_size,
            hash_block_size=trace.hash_block_size,
            seed=seed,
        )


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
