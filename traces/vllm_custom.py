"""vLLM's custom dataset (`--dataset-name custom`): JSON lines {"prompt": TEXT, "output_tokens": N}; read and written.

vLLM tokenizes each prompt (through the chat template unless --skip-chat-template) and shuffles the rows unless
--disable-shuffle; "output_tokens" is optional there when --custom-output-len is given, here every row needs it
unless output_len is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from traces.arrivals import AllAtOnce, ArrivalProcess
from traces.errors import TraceError
from traces.schema import Trace
from traces.source import TraceSource
from traces.text_length import load_tokenizer, prompt_lengths
from traces.tokens import trace_prompt_token_ids
from traces.trace_builder import build_trace

COLUMNS = ("prompt",)


def read_vllm_custom(path: str | Path, *, tokenizer=None, output_len: int | None = None,
                     arrivals: ArrivalProcess | None = None, seed: int = 0, name: str | None = None) -> Trace:
    """Read a custom-dataset JSONL file; prompt lengths exact with a tokenizer, else approximated from the
    characters; output lengths from "output_tokens" (or output_len for every row)."""
    source = TraceSource.open(path, kind="lines")
    prompts, outputs = [], []
    for line_number, row in source.json_objects():
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise TraceError("no \"prompt\" text", source.path, line_number)
        tokens = row.get("output_tokens", output_len)
        if tokens is None:
            raise TraceError("no \"output_tokens\" (every row needs one unless an output length is given)",
                             source.path, line_number)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise TraceError(f"output_tokens is not a non-negative whole number: {tokens!r}", source.path,
                             line_number)
        prompts.append(prompt)
        outputs.append(tokens)
    if not prompts:
        raise TraceError("empty trace: the file has no request rows", source.path)
    tokenizer = load_tokenizer(tokenizer)
    prompt_len, prompt_token_ids, notes = prompt_lengths(prompts, tokenizer)
    output = np.array(outputs, dtype=np.int64)
    process = arrivals or AllAtOnce()
    notes.append("the dataset has no timestamps and no arrival process was given: every request arrives at 0"
                 if arrivals is None else f"arrival times drawn from {arrivals} with seed {seed}")
    kept = (output > 0) & (prompt_len > 0)
    arrival_time = np.zeros(len(prompts), dtype=np.float64)
    arrival_time[kept] = process.arrival_times(int(kept.sum()), seed)
    return build_trace(source=source, arrival_time=arrival_time, prompt_len=prompt_len, output_len=output,
                       prompt_token_ids=prompt_token_ids, name=name or source.path.stem,
                       source_format="vllm_custom", notes=notes)


def write_vllm_custom(trace: Trace, path: str | Path, tokenizer, *, seed: int = 0) -> dict:
    """Write the trace as vLLM's custom dataset, in arrival order: each prompt is its token ids (the trace's, else
    twinfer's deterministic ones, so shared prefixes stay shared) decoded by the tokenizer. Returns how many
    prompts re-tokenize to a different length, since decoded text need not round-trip exactly."""
    tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None:
        raise ValueError("exporting to vLLM's custom dataset needs a tokenizer (--tokenizer FOLDER_OR_HUB_ID): its "
                         "prompts are text, decoded from token ids")
    output_lens = trace.table.column("output_len").to_pylist()
    lines, mismatched, worst = [], 0, 0
    for ids, output_len in zip(trace_prompt_token_ids(trace, vocab_size=len(tokenizer), seed=seed), output_lens):
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        difference = abs(len(tokenizer(text).input_ids) - len(ids))
        mismatched += difference > 0
        worst = max(worst, difference)
        lines.append(json.dumps({"prompt": text, "output_tokens": int(output_len)}, ensure_ascii=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".writing")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return {"rows": len(lines), "length_mismatches": int(mismatched), "max_length_difference": int(worst)}
