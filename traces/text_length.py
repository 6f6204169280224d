"""Token counts of a trace's texts: exact with a tokenizer, else approximated from the characters."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

CHARS_PER_TOKEN = 4
"""About four characters of English text per token for the BPE tokenizers of today's LLMs (OpenAI's rule of
thumb); the approximation used when no tokenizer is given."""

APPROXIMATION_NOTE = (f"token lengths approximated as characters / {CHARS_PER_TOKEN} (no tokenizer given; "
                      "--tokenizer counts them exactly)")


def load_tokenizer(tokenizer):
    """A Hugging Face tokenizer from a folder or Hub id in the local cache, or the tokenizer object given."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the tokenizer {tokenizer!r}: {error}") from None


def approximate_token_count(text: str) -> int:
    """The length of a text in tokens, approximately: characters / CHARS_PER_TOKEN, at least 1 for any text."""
    return 0 if not text else max(1, round(len(text) / CHARS_PER_TOKEN))


def token_ids_of(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Each text's token ids as vLLM's benchmark datasets count them: tokenizer(text).input_ids."""
    return [list(tokenizer(text).input_ids) for text in texts]


def token_lengths(texts: Sequence[str], tokenizer=None) -> np.ndarray:
    """Each text's length in tokens (int64): exact with the tokenizer, else approximate_token_count."""
    if tokenizer is None:
        return np.array([approximate_token_count(text) for text in texts], dtype=np.int64)
    return np.array([len(ids) for ids in token_ids_of(texts, tokenizer)], dtype=np.int64)


def prompt_lengths(prompts: Sequence[str], tokenizer) -> tuple[np.ndarray, pa.Array | None, list[str]]:
    """(lengths, token ids or None, notes) of a trace's prompt texts: with a tokenizer the ids are kept and the
    lengths exact, else the lengths are approximated and a note says so."""
    if tokenizer is None:
        return token_lengths(prompts), None, [APPROXIMATION_NOTE]
    ids = token_ids_of(prompts, tokenizer)
    return (np.array([len(row) for row in ids], dtype=np.int64), pa.array(ids, pa.list_(pa.int32())), [])
