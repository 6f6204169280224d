"""`twinfer bench serve` against `twinfer serve`'s app on a loopback port: every request of the trace is
accounted for, on both sides, and the run is read by summary, compare and report beside a simulated one."""

import json

import pytest

from analysis.run_store import read_run
from engine import LLM
from tests.http_server import ServerThread
from tests.test_llm import model_folder  # noqa: F401 (the tiny model fixture)
from twinfer.cli import main
from twinfer.cli.bench_serve import arrival_spec
from twinfer.serving.app import create_app
from twinfer.serving.request_log import RequestLog

WORKLOAD = "random:num_prompts=40,input_len=24,output_len=8,range_ratio=0.5"


def test_arrival_spec_is_vllms_gamma_process():
    assert arrival_spec(None, 1.0) is None
    assert arrival_spec(float("inf"), 1.0) == "all-at-once"
    assert arrival_spec(4.0, 1.0) == "poisson:4.0"
    assert arrival_spec(4.0, 0.25) == "gamma:4.0:2.0"  # shape 0.25: coefficient of variation 2
    with pytest.raises(ValueError, match="give a request rate"):
        arrival_spec(None, 0.5)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_spec(4.0, 0.0)


def test_bench_serve_accounts_for_every_request(model_folder, tmp_path, capsys):  # noqa: F811
    llm = LLM(model_folder, device="cpu", max_num_batched_tokens=64)
    app = create_app(llm.engine, model_name="tiny",
                     request_log=RequestLog(tmp_path / "server", "cpu", {"model": model_folder}))
    with ServerThread(app) as server:
        code = main(["bench", "serve", WORKLOAD, "--base-url", server.base_url, "--model", "tiny", "--tokenizer",
                     model_folder, "--request-rate", "400", "--burstiness", "0.5", "--max-concurrency", "8",
                     "--out", str(tmp_path / "http"), "--no-progress", "--save-result", str(tmp_path / "r.json")])
    assert code == 0
    client = read_run(tmp_path / "http")
    served = read_run(tmp_path / "server")
    requests = client.requests
    assert requests.num_rows == 40 and set(requests.column("status").to_pylist()) == {"finished"}
    assert client.metadata["executor_kind"] == "http" and client.steps.num_rows == 0
    # Each request got exactly the trace's output length, and the server saw the same prompts.
    assert requests.column("output_len").to_pylist() == requests.column("max_tokens").to_pylist()
    assert sorted(served.requests.column("prompt_len").to_pylist()) == sorted(requests.column("prompt_len").to_pylist())
    assert [len(times) for times in requests.column("token_times").to_pylist()] == requests.column("output_len").to_pylist()
    # Sent at their arrival times, never before (the client's timers count whole milliseconds).
    sent, arrivals = requests.column("first_scheduled_time").to_pylist(), requests.column("arrival_time").to_pylist()
    assert all(at_send >= arrival for at_send, arrival in zip(sent, arrivals))
    output = capsys.readouterr().out
    assert "Successful requests:" in output and "40" in output
    assert json.loads((tmp_path / "r.json").read_text())["completed"] == 40

    # The same trace simulated: compare and report take the http run as the real one.
    assert main(["replay", WORKLOAD, "--arrivals", arrival_spec(400.0, 0.5), "--executor", "sim", "--model", model_folder,
                 "--cost-model", "roofline", "--out", str(tmp_path / "sim"), "--no-progress"]) == 0
    sim = read_run(tmp_path / "sim")
    assert sim.trace_fingerprint == client.trace_fingerprint
    assert main(["compare", str(tmp_path / "http"), str(tmp_path / "sim")]) == 0
    assert main(["report", str(tmp_path / "http"), str(tmp_path / "sim"), "-o", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 0


def test_bench_serve_records_refused_requests(model_folder, tmp_path):  # noqa: F811
    llm = LLM(model_folder, device="cpu", max_num_batched_tokens=64, max_model_len=32)
    with ServerThread(create_app(llm.engine, model_name="tiny")) as server:
        main(["bench", "serve", WORKLOAD, "--base-url", server.base_url, "--model", "tiny", "--vocab-size", "128",
              "--request-rate", "inf", "--out", str(tmp_path / "http"), "--no-progress"])
    requests = read_run(tmp_path / "http").requests
    statuses = requests.column("status").to_pylist()
    assert len(statuses) == 40 and "rejected" in statuses
    rejected = [reason for reason, status in zip(requests.column("reason").to_pylist(), statuses) if status == "rejected"]
    assert all(reason.startswith("HTTP 400: This model's maximum context length is 32") for reason in rejected)


def test_requests_wait_for_their_time_and_never_go_early():
    import time

    import uvloop

    from twinfer.serving.bench_serve import _sleep_until

    async def early_by() -> list[float]:
        result = []
        for index in range(40):
            when = time.perf_counter() + 0.0003 + 0.00037 * index  # fractions of a millisecond
            await _sleep_until(when)
            result.append(when - time.perf_counter())
        return result

    # uvloop's timers count whole milliseconds: a plain sleep there returns up to ~1 ms early.
    assert max(uvloop.run(early_by())) <= 0


def _by_request(run) -> dict:
    table = run.requests
    columns = ["status", "reason", "prompt_len", "output_len", "max_tokens"]
    return {request_id: tuple(table.column(name)[row].as_py() for name in columns)
            for row, request_id in enumerate(table.column("request_id").to_pylist())}


def test_bench_serve_in_two_workers_accounts_for_every_request_as_one_process_does(model_folder, tmp_path):  # noqa: F811
    # max_model_len 40: the workload's longer prompts (up to 36 tokens, 8 more to make) are refused, so failures
    # are merged too.
    llm = LLM(model_folder, device="cpu", max_num_batched_tokens=64, max_model_len=40)
    runs = {}
    with ServerThread(create_app(llm.engine, model_name="tiny")) as server:
        for num_workers in (1, 2):
            out = tmp_path / f"w{num_workers}"
            assert main(["bench", "serve", WORKLOAD, "--base-url", server.base_url, "--model", "tiny", "--tokenizer",
                         model_folder, "--request-rate", "200", "--max-concurrency", "6", "--num-workers",
                         str(num_workers), "--out", str(out), "--no-progress"]) == 0
            runs[num_workers] = read_run(out)
    one, two = _by_request(runs[1]), _by_request(runs[2])
    assert len(two) == 40 and two == one  # every request, with the same answer (length, or why it was refused)
    statuses = [status for status, *_ in two.values()]
    assert "finished" in statuses and "rejected" in statuses
    assert runs[2].metadata["num_workers"] == 2 and runs[2].metadata["complete"]
    # One clock for both workers: each request sent at its arrival time, never before, and not long after.
    requests = runs[2].requests
    sent, arrivals = requests.column("first_scheduled_time").to_pylist(), requests.column("arrival_time").to_pylist()
    assert all(at_send >= arrival for at_send, arrival in zip(sent, arrivals))
    assert max(at_send - arrival for at_send, arrival in zip(sent, arrivals)) < 1.0


def test_max_concurrency_is_shared_out_over_the_workers(tmp_path, capsys):
    from twinfer.serving.bench_workers import concurrency_shares

    assert concurrency_shares(8, 3) == [3, 3, 2]
    assert concurrency_shares(None, 2) == [None, None]
    flags = [WORKLOAD, "--base-url", "http://127.0.0.1:9", "--model", "tiny", "--vocab-size", "128", "--no-progress"]
    assert main(["bench", "serve", *flags, "--max-concurrency", "1", "--num-workers", "2", "--out", str(tmp_path / "x")])
    assert "--max-concurrency 1 is split over --num-workers 2" in capsys.readouterr().err
    assert main(["bench", "serve", *flags, "--num-workers", "0", "--out", str(tmp_path / "y")])
    assert "--num-workers must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_stream_is_read_however_its_bytes_are_split():
    import asyncio

    from twinfer.serving.http_request import _Progress, read_stream

    events = [b'data: {"choices": [{"index": 0, "text": "a", "token_ids": [5, 6], "finish_reason": null}]}',
              b": a comment the server sends to keep the connection",
              b'data: {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}',
              b'data: {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 16}}}',
              b"data: [DONE]",
              b'data: {"choices": [{"index": 0, "text": "after the end", "finish_reason": null}]}']

    async def read(pieces: list[bytes]) -> _Progress:
        async def received():
            for piece in pieces:
                yield piece

        progress = _Progress()
        await read_stream(received(), 0.0, progress)
        return progress

    for line_end in (b"\n", b"\r\n"):
        body = b"".join(event + line_end * 2 for event in events)
        for pieces in ([body], [body[index:index + 1] for index in range(len(body))],
                       [body[:7], body[7:100], body[100:]]):
            progress = asyncio.run(read(pieces))
            assert (len(progress.token_times), progress.finish_reason, progress.completion_tokens,
                    progress.cached_tokens) == (3, "length", 3, 16), (line_end, len(pieces))
