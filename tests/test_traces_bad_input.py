"""Every kind of bad trace input gets a TraceError naming the file and, for a row, its line."""

import pytest

from traces import TraceError, TraceWarning, read_trace

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def error_of(path, **options) -> TraceError:
    with pytest.raises(TraceError) as caught:
        read_trace(path, **options)
    assert caught.value.path == str(path)
    return caught.value


@pytest.mark.parametrize(
    "rows, line, message",
    [
        ("2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.0,abc,3\n", 3, "'ContextTokens' is not a whole number: 'abc'"),
        ("2023-11-16 18:15:46.6805900,374,-4\n", 2, "'GeneratedTokens' is negative: -4"),
        ("2023-11-16 18:15:46.6805900,374,4.5\n", 2, "'GeneratedTokens' is not a whole number: '4.5'"),
        ("2023-11-16 18:15:46,1,1\nyesterday,1,1\n", 3, "'TIMESTAMP' is not a date and time: 'yesterday'"),
        ("2023-11-16 18:15:46,1,1\n2023-11-16 18:15:47,1\n", 3, "expected 3 comma-separated fields as in the header, found 2"),
        ("2023-11-16 18:15:46,1,1\n\n\n2023-11-16 18:15:47,1,\n", 5, "'GeneratedTokens' is not a whole number: ''"),
        ("2023-11-16 18:15:46,1,1\n2023-11-16 18:15:47,99999999999999999999,1\n", 3, "not a whole number"),
    ],
)
def test_malformed_azure_rows_name_their_line(tmp_path, rows, line, message):
    error = error_of(write(tmp_path, "azure.csv", AZURE_HEADER + rows))
    assert error.line == line
    assert message in str(error)
    assert str(error).startswith(f"{tmp_path / 'azure.csv'}:{line}: ")


def test_lines_counted_as_an_editor_does_with_quoted_newlines(tmp_path):
    text = 'Timestamp,Model,Request tokens,Response tokens\n1,"Chat\nGPT",5,6\n2,GPT-4,-5,6\n'
    assert error_of(write(tmp_path, "b.csv", text)).line == 4


@pytest.mark.parametrize(
    "lines, line, message",
    [
        ('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1, "input_length": 5,\n', 2, "not a JSON object"),
        ('{"timestamp": 0, "input_length": "5", "output_length": 1}\n', 1, "input_length is not a whole number: '5'"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1}\n\n[1, 2]\n', 3, "expected a JSON object, found list"),
        ('{"timestamp": 0, "input_length": 5}\n', 1, "'output_length' is missing"),
        ('{"timestamp": 0, "input_length": 5, "output_length": -1}\n', 1, "'output_length' is negative"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["a"]}\n', 1, "hash_ids is not a list"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1}{"timestamp": 0, "input_length": 5, "output_length": 1}\n', 1, "not a JSON object"),
        ('{"timestamp": 1e400, "input_length": 5, "output_length": 1}\n', 1, "timestamp is out of range"),
    ],
)
def test_malformed_mooncake_lines_name_their_line(tmp_path, lines, line, message):
    error = error_of(write(tmp_path, "m.jsonl", lines), format="mooncake")
    assert error.line == line
    assert message in str(error)


def test_unsorted_timestamps_are_sorted_with_a_warning(tmp_path):
    path = write(tmp_path, "azure.csv", AZURE_HEADER + "2023-11-16 18:00:05,5,1\n2023-11-16 18:00:01,6,1\n2023-11-16 18:00:03,7,1\n")
    with pytest.warns(TraceWarning, match="not in order .* line 3"):
        trace = read_trace(path)
    assert trace.table.column("prompt_len").to_pylist() == [6, 7, 5]
    assert trace.table.column("request_id").to_pylist() == ["1", "2", "0"]
    assert trace.table.column("arrival_time").to_pylist() == [0.0, 2.0, 4.0]
    assert any("sorted" in note for note in trace.notes)


@pytest.mark.parametrize(
    "name, text",
    [
        ("empty.csv", ""),
        ("blank.csv", "\n\n  \n"),
        ("header_only.csv", AZURE_HEADER),
        ("empty.jsonl", ""),
    ],
)
def test_empty_trace(tmp_path, name, text):
    fmt = "mooncake" if name.endswith("jsonl") else "azure"
    assert "empty trace" in str(error_of(write(tmp_path, name, text), format=fmt))


def test_trace_whose_every_row_is_left_out_is_empty(tmp_path):
    path = write(tmp_path, "b.csv", "Timestamp,Request tokens,Response tokens\n1,0,0\n2,5,0\n")
    with pytest.warns(TraceWarning):
        assert "all 2 rows were left out" in str(error_of(path))


def test_zero_prompt_rows_left_out_and_counted(tmp_path):
    path = write(tmp_path, "azure.csv", AZURE_HEADER + "2023-11-16 18:00:00,0,5\n2023-11-16 18:00:01,3,5\n")
    with pytest.warns(TraceWarning, match="left out 1 of 2 rows with zero prompt tokens \\(line 2\\)"):
        trace = read_trace(path)
    assert len(trace) == 1


def test_unknown_format_names_columns_found_and_formats_known(tmp_path):
    error = error_of(write(tmp_path, "mystery.csv", "when,input,output\n1,2,3\n"))
    assert "columns found: when, input, output" in str(error)
    for known in ("azure", "mooncake", "burstgpt", "length_table", "native"):
        assert known in str(error)


def test_unknown_format_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown trace format 'splitwise'; known formats: azure, mooncake"):
        read_trace(write(tmp_path, "x.csv", AZURE_HEADER), format="splitwise")


def test_option_that_does_not_apply_to_the_format(tmp_path):
    with pytest.raises(ValueError, match="option arrivals does not apply to the azure format"):
        read_trace(write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:00:00,1,1\n"), arrivals=None)


def test_wrong_format_forced_says_what_is_missing(tmp_path):
    error = error_of(write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:00:00,1,1\n"), format="burstgpt")
    assert "not a BurstGPT trace: no column Request tokens, Response tokens" in str(error)


def test_missing_file_and_non_utf8(tmp_path):
    assert "no such file" in str(error_of(tmp_path / "nope.csv"))
    error = error_of(write(tmp_path, "bin.csv", AZURE_HEADER.encode() + b"2023-11-16 18:00:00,1,1\n\xff\xfe,1,1\n"))
    assert error.line == 3 and "not UTF-8" in str(error)


def test_duplicate_header_column(tmp_path):
    error = error_of(write(tmp_path, "d.csv", "TIMESTAMP,ContextTokens,GeneratedTokens,contexttokens\n"), format="azure")
    assert error.line == 1 and "appears twice" in str(error)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("arrival_time,prompt_len,output_len\n-1,5,5\n", 2, "arrival_time is negative"),
        ("arrival_time,prompt_len,output_len\nnan,5,5\n", 2, "not a number"),
        ("arrival_time,prompt_len,output_len\ninf,5,5\n", 2, "not a number"),
        ("request_id,arrival_time,prompt_len,output_len\na,0,5,5\nb,1,5,5\na,2,5,5\n", 4, "request_id 'a' also appears at line 2"),
        ("arrival_time,prompt_len,output_len,prompt_token_ids\n0,5,5,1 2 3\n", 2, "prompt_len 5 differs from the 3 prompt_token_ids"),
        ("arrival_time,prompt_len,output_len,prefix_block_ids\n0,5,5,1 x 3\n", 2, "holds 'x', not a non-negative id"),
        ("arrival_time,prompt_len,output_len,prefix_block_ids\n0,5,5,1 -2\n", 2, "holds '-2', not a non-negative id"),
    ],
)
def test_bad_native_rows(tmp_path, text, line, message):
    error = error_of(write(tmp_path, "n.csv", text))
    assert error.line == line and message in str(error)


def test_corrupt_parquet(tmp_path):
    assert "unreadable Parquet" in str(error_of(write(tmp_path, "t.parquet", b"PAR1 this is not parquet")))


def test_traces_built_by_code_are_checked_too():
    import numpy as np

    from traces.trace_builder import build_trace

    def build(arrivals, prompts, outputs):
        return build_trace(
            source=None, arrival_time=np.array(arrivals), prompt_len=np.array(prompts), output_len=np.array(outputs),
            name="code", source_format="synthetic",
        )

    with pytest.raises(TraceError, match="prompt_len is negative: -3"):
        build([0.0], [-3], [1])
    with pytest.raises(TraceError, match="arrival_time is not finite"):
        build([float("nan")], [3], [1])
    with pytest.raises(ValueError, match="columns differ in length"):
        build([0.0, 1.0], [3], [1])
    with pytest.raises(TypeError, match="output_len must be integers"):
        build([0.0], [3], [1.5])


def test_parquet_with_wrong_column_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"arrival_time": [0.0], "prompt_len": [2.5], "output_len": [1]}), path)
    assert "column 'prompt_len' holds double, expected whole numbers" in str(error_of(path))
    pq.write_table(pa.table({"arrival_time": [0.0], "prompt_len": pa.array([2**64 - 1], pa.uint64()), "output_len": [1]}), path)
    assert "too large for int64" in str(error_of(path))
