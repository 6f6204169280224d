"""Fuzzing every reader: random bytes and mutated real rows give a TraceError or a valid trace, never
another exception, and every input row is either in the trace or reported as left out."""

import csv
import io
import math
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces import TRACE_SCHEMA, AllAtOnce, TraceError, TraceWarning, read_trace, write_trace
from traces.bundled import SAMPLES_DIR

SETTINGS = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

BURSTGPT_ROWS = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,230,1317,Conversation log\n"
    "118,GPT-4,417,276,693,Conversation log\n1106,ChatGPT,0,0,0,Conversation log\n"
    "2401,GPT-4,35,0,35,API log\n"
)
LENGTH_ROWS = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n3772,54,3826,69.85\n2015,156,2171,12.9\n1,5,6,0.2\n"


def _head(file: str, lines: int) -> bytes:
    return b"".join((SAMPLES_DIR / file).read_bytes().splitlines(keepends=True)[:lines])


SEEDS = {
    "azure": (_head("azure_conv_2023_head2000.csv", 12), ".csv", {}),
    "mooncake": (_head("mooncake_conversation_head500.jsonl", 6), ".jsonl", {}),
    "burstgpt": (BURSTGPT_ROWS.encode(), ".csv", {}),
    "length_table": (LENGTH_ROWS.encode(), ".csv", {"arrivals": AllAtOnce()}),
    "native": (_head("demo_shared_prefix.csv", 8), ".csv", {}),
}
MUTATION_ALPHABET = list(b"0123456789-+.,:eE\"{}[] \n\r\tax\x00") + [0xFF]


def rows_in(data: bytes, kind: str) -> int:
    """Data rows in the file, counted independently of the readers."""
    text = data.decode("utf-8-sig")
    if kind == ".jsonl":
        return sum(1 for line in text.splitlines() if line.strip())
    records = [record for record in csv.reader(io.StringIO(text, newline="")) if record]
    return max(len(records) - 1, 0)


def check(data: bytes, fmt: str) -> None:
    _, suffix, options = SEEDS[fmt]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"trace{suffix}"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", TraceWarning)
            try:
                trace = read_trace(path, format=fmt, **options)
            except TraceError as error:
                assert error.path == str(path)
                assert error.line is None or error.line >= 1
                return
    table = trace.table
    assert table.schema.equals(TRACE_SCHEMA)
    arrivals = table.column("arrival_time").to_numpy()
    assert np.all(np.isfinite(arrivals)) and arrivals.min() >= 0 and np.all(np.diff(arrivals) >= 0)
    assert table.column("prompt_len").to_numpy().min() >= 1
    assert table.column("output_len").to_numpy().min() >= 1
    assert len(set(table.column("request_id").to_pylist())) == len(trace)
    for prompt_len, ids in zip(table.column("prompt_len").to_pylist(), table.column("prefix_block_ids").to_pylist()):
        assert ids is None or len(ids) <= math.ceil(prompt_len / trace.hash_block_size)
    left_out = [tuple(map(int, m)) for note in trace.notes for m in re.findall(r"left out (\d+) of (\d+) rows", note)]
    expected_rows = rows_in(data, suffix)
    assert all(total == expected_rows for _, total in left_out)
    assert len(trace) + sum(count for count, _ in left_out) == expected_rows


def mutate(data: bytes, edits) -> bytes:
    buffer = bytearray(data)
    for kind, where, value in edits:
        if not buffer:
            break
        position = where % len(buffer)
        if kind == "replace":
            buffer[position] = value
        elif kind == "insert":
            buffer.insert(position, value)
        elif kind == "delete":
            del buffer[position]
        else:  # copy a line elsewhere: duplicates and reorders rows
            lines = bytes(buffer).splitlines(keepends=True)
            line = lines[position % len(lines)]
            lines.insert(value % (len(lines) + 1), line if line.endswith(b"\n") else line + b"\n")
            buffer = bytearray(b"".join(lines))
    return bytes(buffer)


EDITS = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "move"]),
        st.integers(0, 10**6),
        st.sampled_from(MUTATION_ALPHABET),
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(fmt=st.sampled_from(sorted(SEEDS)), edits=EDITS)
def test_mutated_real_rows(fmt, edits):
    check(mutate(SEEDS[fmt][0], edits), fmt)


@SETTINGS
@given(fmt=st.sampled_from(sorted(SEEDS)), data=st.binary(max_size=300))
def test_random_bytes(fmt, data):
    check(data, fmt)


@SETTINGS
@given(fmt=st.sampled_from(sorted(SEEDS)), body=st.text(alphabet="0123456789,-. \n:", max_size=200))
def test_random_rows_under_a_real_header(fmt, body):
    header = SEEDS[fmt][0].splitlines(keepends=True)[0] if fmt != "mooncake" else b""
    check(header + body.encode(), fmt)


def test_unchanged_seeds_are_valid_traces():
    for fmt, (data, _, _) in SEEDS.items():
        check(data, fmt)


@settings(max_examples=60, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3))
def test_corrupted_parquet(flips):
    from traces import shared_prefix_workload

    with tempfile.TemporaryDirectory() as folder:
        path = write_trace(shared_prefix_workload(num_groups=2, prompts_per_group=2), Path(folder) / "t.parquet")
        data = bytearray(path.read_bytes())
        for where, value in flips:
            data[where % len(data)] = value
        path.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TraceWarning)
            try:
                trace = read_trace(path)
            except TraceError:
                return
        assert trace.table.schema.equals(TRACE_SCHEMA)
        assert trace.table.column("prompt_len").to_numpy().min() >= 1


@SETTINGS
@given(fmt=st.sampled_from(sorted(SEEDS)), edits=EDITS)
def test_detection_of_mutated_files(fmt, edits):
    """Without --format, a mangled header gets a TraceError naming the columns, never a crash."""
    data = mutate(SEEDS[fmt][0], edits)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.dat"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TraceWarning)
            try:
                trace = read_trace(path)
            except TraceError as error:
                assert error.path == str(path)
                return
    assert trace.table.schema.equals(TRACE_SCHEMA) and len(trace) >= 1
