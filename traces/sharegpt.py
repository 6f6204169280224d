"""ShareGPT JSON (vLLM's `--dataset-name sharegpt`): an array of {"conversations": [{"from", "value"}, ...]}.

As vLLM's ShareGPTDataset: the first turn is the prompt, the second the completion whose length is the output
length; entries with fewer than two turns are left out. Unlike vLLM's, no entry is dropped for being short or
long (`--max-prompt-len`/`--max-output-len` clip, and say so), and the file's order is kept (vLLM shuffles).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from traces.arrivals import AllAtOnce, ArrivalProcess
from traces.errors import TraceError, TraceWarning
from traces.schema import Trace
from traces.source import TraceSource
from traces.text_length import load_tokenizer, prompt_lengths, token_lengths
from traces.trace_builder import build_trace

COLUMNS = ("conversations",)
_SPACE = re.compile(r"\s*")


def read_sharegpt(path: str | Path, *, tokenizer=None, arrivals: ArrivalProcess | None = None, seed: int = 0,
                  name: str | None = None) -> Trace:
    """Read a ShareGPT file; with a tokenizer (folder, cached Hub id or object) the prompts' token ids are kept and
    lengths are exact, else lengths are approximated from the characters. Arrivals come from `arrivals`."""
    source = TraceSource.open(path, kind="lines")
    prompts, completions, lines, notes = _conversations(source)
    tokenizer = load_tokenizer(tokenizer)
    prompt_len, prompt_token_ids, length_notes = prompt_lengths(prompts, tokenizer)
    notes += length_notes
    output_len = token_lengths(completions, tokenizer)
    process = arrivals or AllAtOnce()
    if arrivals is None:
        notes.append("ShareGPT has no timestamps and no arrival process was given: every request arrives at 0")
    else:
        notes.append(f"arrival times drawn from {arrivals} with seed {seed}")
    source._row_lines = lines  # rows are array entries, each named by the line it starts on
    kept = (output_len > 0) & (prompt_len > 0)
    arrival_time = np.zeros(len(prompts), dtype=np.float64)
    arrival_time[kept] = process.arrival_times(int(kept.sum()), seed)
    return build_trace(source=source, arrival_time=arrival_time, prompt_len=prompt_len, output_len=output_len,
                       prompt_token_ids=prompt_token_ids, name=name or source.path.stem, source_format="sharegpt",
                       notes=notes)


def _conversations(source: TraceSource) -> tuple[list[str], list[str], list[int], list[str]]:
    """(prompts, completions, the line each entry starts on, notes) of the file's array of entries."""
    text = source.data.decode("utf-8")
    decoder = json.JSONDecoder()
    position = _SPACE.match(text, 0).end()
    if position == len(text):
        raise TraceError("empty trace: the file has no request rows", source.path)
    if text[position] != "[":
        raise TraceError("not ShareGPT JSON: expected an array of conversations ([{\"conversations\": ...}, ...])",
                         source.path, text.count("\n", 0, position) + 1)
    position += 1
    line, counted_to = 1, 0
    prompts, completions, lines, short = [], [], [], []
    while True:
        position = _SPACE.match(text, position).end()
        if position < len(text) and text[position] == "]":
            break
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            entry, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise TraceError(f"not valid JSON: {error.msg}", source.path, error.lineno) from None
        turns = _turns(entry, source, line)
        if len(turns) < 2:
            short.append(line)
        else:
            prompts.append(turns[0])
            completions.append(turns[1])
            lines.append(line)
        position = _SPACE.match(text, position).end()
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            raise TraceError("not valid JSON: expected ',' or ']' after an entry", source.path,
                             text.count("\n", 0, min(position, len(text))) + 1)
    notes = []
    if short:
        shown = ", ".join(map(str, short[:10])) + (f" and {len(short) - 10} more" if len(short) > 10 else "")
        note = (f"left out {len(short)} of {len(short) + len(prompts)} conversations with fewer than two turns "
                f"(line{'s' if len(short) > 1 else ''} {shown})")
        notes.append(note)
        warnings.warn(f"{source.path}: {note}", TraceWarning, stacklevel=4)
    if not prompts:
        raise TraceError(f"empty trace: no conversation has two turns ({'; '.join(notes)})", source.path)
    return prompts, completions, lines, notes


def _turns(entry, source: TraceSource, line: int) -> list[str]:
    if not isinstance(entry, dict):
        raise TraceError(f"expected a conversation object, found {type(entry).__name__}", source.path, line)
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise TraceError("the entry has no \"conversations\" list", source.path, line)
    values = []
    for number, turn in enumerate(turns[:2], 1):
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise TraceError(f"turn {number} of the conversation has no text \"value\"", source.path, line)
        values.append(value)
    return values
