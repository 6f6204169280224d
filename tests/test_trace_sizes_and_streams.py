"""A trace's sizes are checked before anything is allocated for them; traces read from streams (a FIFO,
/dev/stdin) are read whole, not emptied by format detection."""

import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

from analysis.run_store import read_run
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from simulator.trace_requests import TraceRequests
from tests.fake_executor import PredictingExecutor
from traces import read_trace
from traces.trace_options import load_trace
from twinfer.replay import replay

ROOT = Path(__file__).resolve().parent.parent
AZURE = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
         "2023-11-16 18:15:46.6805900,374,44\n"
         "2023-11-16 18:15:47.0000000,2147483648,100\n"
         "2023-11-16 18:15:48.0000000,999999999999999999,100\n"
         "2023-11-16 18:15:49.0000000,396,109\n")


def test_prompt_lengths_beyond_max_model_len_are_rejected_without_allocating_them(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text(AZURE)
    trace = read_trace(path)
    engine = Engine(EngineConfig(max_model_len=4096, num_kv_blocks=1024, vocab_size=1000),
                    PredictingExecutor(1024, 16))
    tracemalloc.start()
    try:
        result = replay(trace, engine, tmp_path / "run", executor_kind="sim", show_progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # the two huge prompts would take 8 GiB and 4 EiB of token ids
    records = read_run(result.path).requests.to_pylist()
    assert [r["status"] for r in records] == ["finished", "rejected", "rejected", "finished"]
    assert records[1]["reason"] == ("prompt (2147483648 tokens) + max_tokens (100) = 2147483748 exceeds "
                                    "max_model_len (4096)")
    assert records[2]["prompt_len"] == 999999999999999999


def test_an_engine_given_only_a_huge_prompt_length_rejects_it_without_making_tokens():
    engine = Engine(EngineConfig(max_model_len=4096, num_kv_blocks=64), PredictingExecutor(64, 16))
    tracemalloc.start()
    try:
        engine.add_request(prompt_len=10**15, sampling_params=SamplingParams(max_tokens=4), request_id="huge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert engine.request_records["huge"].status == "rejected"


def test_lazy_trace_requests_make_no_tokens_for_prompts_too_long(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text(AZURE)
    requests = TraceRequests.from_trace(read_trace(path), vocab_size=1000, max_prompt_len=4096, lazy=True)
    lengths = [None if tokens is None else len(tokens) for tokens in (requests.prompt_token_ids[i] for i in range(4))]
    assert lengths == [374, None, None, 396]
    assert requests.prompt_len(2) == 999999999999999999


def test_a_fifo_trace_is_read_whole(tmp_path):
    fifo = tmp_path / "trace.csv"
    os.mkfifo(fifo)
    text = AZURE.replace("2147483648", "20").replace("999999999999999999", "30")

    def feed():
        with open(fifo, "w") as stream:
            stream.write(text)

    writer = threading.Thread(target=feed)
    writer.start()
    trace = load_trace(fifo)
    writer.join()
    assert trace.name == "trace" and trace.table.column("prompt_len").to_pylist() == [374, 20, 30, 396]


def test_a_trace_on_standard_input_is_simulated(tmp_path):
    out = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "twinfer", "simulate", "/dev/stdin", "--model", "qwen3-0.6b", "--no-progress",
         "--out", str(out)],
        cwd=ROOT, input=(ROOT / "traces/samples/demo_shared_prefix.csv").read_bytes(), capture_output=True)
    assert completed.returncode == 0, completed.stderr.decode()
    run = read_run(out)
    assert run.requests.num_rows == 24 and run.metadata["trace_name"] == "stdin"


def test_a_bad_trace_on_standard_input_names_standard_input(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "twinfer", "simulate", "/dev/stdin", "--model", "qwen3-0.6b", "--no-progress",
         "--out", str(tmp_path / "run")],
        cwd=ROOT, input=b"garbage,columns\n1,2\n", capture_output=True)
    assert completed.returncode == 2
    assert completed.stderr.decode().startswith("twinfer simulate: error: /dev/stdin: unknown trace format")


def test_a_trace_built_by_code_with_a_repeated_request_id_is_refused_before_the_run():
    import numpy as np
    import pyarrow as pa
    import pytest

    from traces.trace_builder import build_trace

    trace = build_trace(source=None, arrival_time=np.array([0.0, 1.0, 2.0]), prompt_len=np.array([5, 6, 7]),
                        output_len=np.array([2, 2, 2]), name="twice", source_format="synthetic",
                        request_id=pa.array(["a", "b", "a"]))
    with pytest.raises(ValueError, match="trace 'twice': request id 'a' appears more than once"):
        TraceRequests.from_trace(trace, vocab_size=1000)
