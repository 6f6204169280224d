"""Each reader on the real traces and on small hand-written files in every supported variant."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from traces import TRACE_SCHEMA, TraceError, TraceWarning, read_trace, write_trace
from traces.formats import detect_format

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/traces not present")


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def assert_valid(trace) -> None:
    table = trace.table
    assert table.schema.equals(TRACE_SCHEMA)
    arrivals = table.column("arrival_time").to_numpy()
    assert np.all(np.diff(arrivals) >= 0)
    assert arrivals[0] >= 0
    assert table.column("prompt_len").to_numpy().min() >= 1
    assert table.column("output_len").to_numpy().min() >= 1
    assert len(set(table.column("request_id").to_pylist())) == len(trace)


@needs_shared
@pytest.mark.parametrize(
    "file, rows, span, prompt_mean, output_max",
    [
        ("AzureLLMInferenceTrace_conv.csv", 19366, 3501.72, 1155, 1000),
        ("AzureLLMInferenceTrace_code.csv", 8819, 3435.95, 2048, 1899),
    ],
)
def test_azure_2023_matches_published_statistics(file, rows, span, prompt_mean, output_max):
    trace = read_trace(SHARED / file)
    assert trace.source_format == "azure"
    assert len(trace) == rows and trace.notes == []
    assert trace.duration == pytest.approx(span, abs=0.01)
    assert trace.table.column("prompt_len").to_numpy().mean() == pytest.approx(prompt_mean, abs=1)
    assert trace.table.column("output_len").to_numpy().max() == output_max
    assert_valid(trace)


def test_azure_2024_timestamps_with_zone_and_optional_fraction(tmp_path):
    path = write(
        tmp_path,
        "azure2024.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00+00:00,10,2\n"
        "2024-05-10 00:00:00.009930+00:00,20,3\n"
        "2024-05-10 00:00:01.5+00:00,30,4\n",
    )
    trace = read_trace(path)
    assert trace.source_format == "azure"
    assert trace.table.column("arrival_time").to_pylist() == pytest.approx([0.0, 0.00993, 1.5])


def test_azure_seven_digit_fractions_keep_microseconds(tmp_path):
    path = write(
        tmp_path,
        "azure2023.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 23:59:59.9999990,374,44\r\n"
        "2023-11-17 00:00:00.0000010,396,109",  # crosses midnight; no final newline, as in the real files
    )
    assert read_trace(path).table.column("arrival_time").to_pylist() == pytest.approx([0.0, 2e-6], abs=1e-9)


def test_azure_mixed_zone_and_naive_rows_are_all_utc(tmp_path):
    path = write(
        tmp_path,
        "mixed.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00,1,1\n2024-05-10 02:00:03+02:00,1,1\n",
    )
    assert read_trace(path).table.column("arrival_time").to_pylist() == [0.0, 3.0]


@needs_shared
def test_mooncake_conversation_keeps_hash_ids_as_prefix_blocks():
    trace = read_trace(SHARED / "mooncake_fast25_conversation_trace.jsonl")
    assert trace.source_format == "mooncake" and trace.hash_block_size == 512
    assert len(trace) == 12031
    assert trace.duration == pytest.approx(3536.999)
    first = trace.table.slice(0, 1).to_pylist()[0]
    assert first["prompt_len"] == 6758 and first["output_len"] == 500
    assert first["prefix_block_ids"] == list(range(14))
    total_blocks = sum(len(ids) for ids in trace.table.column("prefix_block_ids").to_pylist())
    assert total_blocks == 288500
    assert_valid(trace)


def test_mooncake_block_size_is_configurable_and_checked(tmp_path):
    path = write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 40, "output_length": 2, "hash_ids": [0, 1, 2]}\n')
    assert read_trace(path, hash_block_size=16).hash_block_size == 16
    with pytest.raises(ValueError, match=r"m.jsonl:1: 3 prefix block ids \(hash_ids\) .* at most 1 blocks of 512"):
        read_trace(path)


def test_mooncake_milliseconds_become_seconds_without_hash_ids(tmp_path):
    path = write(
        tmp_path,
        "m.jsonl",
        '{"timestamp": 1500, "input_length": 4, "output_length": 2}\n\n{"timestamp": 4000, "input_length": 5, "output_length": 1}\n',
    )
    trace = read_trace(path)
    assert trace.table.column("arrival_time").to_pylist() == [0.0, 2.5]
    assert trace.table.column("prefix_block_ids").null_count == 2


@needs_shared
def test_burstgpt_leaves_out_failed_requests_and_says_so():
    with pytest.warns(TraceWarning, match="left out 3 of 54 rows with zero output tokens"):
        trace = read_trace(SHARED / "unverified" / "burstgpt_1_head54_thirdparty.csv")
    assert trace.source_format == "burstgpt"
    assert len(trace) == 51
    assert trace.notes == ["left out 3 of 54 rows with zero output tokens (lines 22, 37, 50)"]
    assert trace.duration == 3293.0
    assert_valid(trace)


def test_burstgpt_third_release_columns_found_by_name(tmp_path):
    path = write(
        tmp_path,
        "burst3.csv",
        "Timestamp,Session ID,Elapsed time,Model,request tokens,Response Tokens,Total tokens,Log Type\n"
        "10,s1,0.5,ChatGPT,100,20,120,Conversation log\n"
        "12,s1,0.7,ChatGPT,150,0,150,Conversation log\n"
        "15,s2,1.0,GPT-4,200,30,230,API log\n",
    )
    with pytest.warns(TraceWarning, match="line 3"):
        trace = read_trace(path)
    assert trace.source_format == "burstgpt"
    rows = trace.table.to_pylist()
    assert [(r["arrival_time"], r["prompt_len"], r["output_len"], r["session_id"]) for r in rows] == [
        (0.0, 100, 20, "s1"),
        (5.0, 200, 30, "s2"),
    ]


def test_blank_session_ids_are_no_session(tmp_path):
    # API-log rows of BurstGPT's third release carry no session; a CSV writes a missing session as ''.
    path = write(
        tmp_path,
        "burst3_blank.csv",
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "10,s1,0.5,ChatGPT,100,20,120,Conversation log\n"
        "11,,0.7,GPT-4,150,10,160,API log\n"
        "12, ,0.7,GPT-4,150,10,160,API log\n",
    )
    assert read_trace(path).table.column("session_id").to_pylist() == ["s1", None, None]
    native = read_trace(write(tmp_path, "n.csv", "arrival_time,prompt_len,output_len,session_id\n0,5,2,a\n1,5,2,\n"))
    assert native.table.column("session_id").to_pylist() == ["a", None]


def test_native_csv_round_trip_keeps_requests_without_a_session(tmp_path):
    import dataclasses

    import pyarrow as pa

    from traces import random_workload

    trace = random_workload(num_prompts=3, input_len=20, output_len=4)
    sessions = pa.array(["a", None, "b"], pa.string())
    column = trace.table.schema.get_field_index("session_id")
    trace = dataclasses.replace(trace, table=trace.table.set_column(column, TRACE_SCHEMA.field("session_id"), sessions))
    back = read_trace(write_trace(trace, tmp_path / "s.csv"))
    assert back.table.column("session_id").to_pylist() == ["a", None, "b"]


@needs_shared
def test_length_table_takes_arrivals_from_a_process():
    from traces import Poisson

    path = SHARED / "vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
    trace = read_trace(path, arrivals=Poisson(rate=5.0), seed=1)
    assert trace.source_format == "length_table" and len(trace) == 28257
    assert (len(trace) - 1) / trace.duration == pytest.approx(5.0, rel=0.03)
    again = read_trace(path, arrivals=Poisson(rate=5.0), seed=1)
    assert again.table.equals(trace.table)
    assert_valid(trace)


def test_length_table_without_process_arrives_at_once_with_a_warning(tmp_path):
    path = write(tmp_path, "lengths.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n5,2,7,2.5\n9,3,12,3\n")
    with pytest.warns(TraceWarning, match="every request arrives at 0"):
        trace = read_trace(path)
    assert trace.table.column("arrival_time").to_pylist() == [0.0, 0.0]
    assert trace.table.column("prompt_len").to_pylist() == [5, 9]


def test_length_table_rows_left_out_leave_no_hole_in_the_arrivals(tmp_path):
    from traces import ConstantRate

    path = write(tmp_path, "lengths0.csv", "num_prefill_tokens,num_decode_tokens\n5,2\n7,0\n9,3\n4,4\n")
    with pytest.warns(TraceWarning, match="left out 1 of 4 rows with zero output tokens"):
        trace = read_trace(path, arrivals=ConstantRate(2.0))
    assert trace.table.column("prompt_len").to_pylist() == [5, 9, 4]
    assert trace.table.column("arrival_time").to_pylist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_native_round_trip_keeps_everything_parquet_keeps_notes(tmp_path, suffix):
    from traces import shared_prefix_workload

    trace = shared_prefix_workload(num_groups=2, prompts_per_group=3, system_prompt_len=40, question_len=5, output_len=3)
    path = write_trace(trace, tmp_path / f"t{suffix}")
    back = read_trace(path)
    assert back.source_format == "native"
    assert back.table.equals(trace.table)
    assert back.hash_block_size == trace.hash_block_size
    if suffix == ".parquet":
        assert back.notes == trace.notes and back.name == trace.name


def test_native_csv_by_hand_with_token_ids(tmp_path):
    path = write(tmp_path, "hand.csv", 'arrival_time,prompt_len,output_len,prompt_token_ids\n0.5,3,2,"[5, 6, 7]"\n1.0,2,1,\n')
    trace = read_trace(path)
    assert trace.table.column("prompt_token_ids").to_pylist() == [[5, 6, 7], None]
    assert trace.table.column("arrival_time").to_pylist() == [0.5, 1.0]  # native keeps times as written


@pytest.mark.parametrize("name, expected", [("azure-conv", 2000), ("mooncake-conv", 500), ("demo", 24)])
def test_bundled_samples_read_by_name(name, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = read_trace(name)
    assert len(trace) == expected
    assert_valid(trace)


def test_bundled_samples_are_small():
    samples = Path(__file__).resolve().parents[1] / "traces" / "samples"
    assert sum(path.stat().st_size for path in samples.iterdir()) < 1_000_000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "azure"),
        ("timestamp,contexttokens,generatedtokens\n", "azure"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1}\n', "mooncake"),
        ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n", "burstgpt"),
        ("num_prefill_tokens,num_decode_tokens\n", "length_table"),
        ("request_id,arrival_time,prompt_len,output_len\n", "native"),
    ],
)
def test_format_detected_from_columns(tmp_path, text, expected):
    assert detect_format(write(tmp_path, "t.txt", text)) == expected


@needs_shared
@pytest.mark.parametrize(
    "file, rows, span",
    [
        ("mooncake_fast25_synthetic_trace.jsonl", 3993, 1022.025),
        ("sharegpt_8k_filtered_stats_llama2_tokenizer.csv", 30731, None),
    ],
)
def test_other_shared_traces_read_whole(file, rows, span):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        trace = read_trace(SHARED / file)
    assert len(trace) == rows
    if span is not None:
        assert trace.duration == pytest.approx(span)
    assert_valid(trace)


def test_parquet_with_another_formats_columns_says_what_is_read_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "azure.parquet"
    pq.write_table(pa.table({"TIMESTAMP": ["2023-11-16 18:15:46.6805900"], "ContextTokens": [3], "GeneratedTokens": [4]}), path)
    with pytest.raises(TraceError, match="Parquet file is read only in twinfer's native format .* not as azure"):
        read_trace(path)
