"""The server with its engine in a process of its own (twinfer serve's default): the same answers as LLM.generate,
streamed or whole, 64 concurrent streams, a disconnect freeing its blocks there, /metrics read from the child, the
request log written by the child, and a clear error when the child cannot start or dies."""

import asyncio
import os
import signal
import threading

import httpx
import pytest

from analysis.run_store import read_run
from engine import LLM, SamplingParams
from engine.engine_args import EngineArgs
from tests.http_server import ServerThread
from tests.test_llm import model_folder  # noqa: F401 (the tiny model fixture)
from tests.test_serving import async_client, client, wait_for
from twinfer.serving.app import create_app
from twinfer.serving.engine_process import EngineProcess, RequestLogSpec

MODEL = "tiny"


def engine_process(folder: str, log_dir=None) -> EngineProcess:
    args = EngineArgs(model=folder, device="cpu", max_num_batched_tokens=64)
    log = RequestLogSpec(str(log_dir), "cpu", {"model": folder}) if log_dir is not None else None
    return EngineProcess(args, tokenizer=folder, request_log=log, start_timeout=300)


def metric(server, name: str) -> float:
    """A metric's value from /metrics, summed over its labels."""
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_an_engine_process_serves_what_llm_generate_gives(model_folder, tmp_path):  # noqa: F811
    reference = LLM(model_folder, device="cpu", max_num_batched_tokens=64)
    prompts = [[5 + i, 6, 7 + i % 5] * (1 + i % 4) for i in range(64)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [output.outputs[0].token_ids for output in reference.generate(prompts, params, use_tqdm=False)]
    process = engine_process(model_folder, tmp_path / "log")
    with ServerThread(create_app(process, model_name=MODEL)) as server:
        whole = client(server).completions.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0,
                                                  extra_body={"ignore_eos": True, "return_token_ids": True})
        assert whole.choices[0].token_ids == expected[0]
        assert whole.usage.completion_tokens == 12

        async def stream(prompt) -> list[int]:
            tokens = []
            chunks = await async_client(server).completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            async for chunk in chunks:
                for choice in chunk.choices:
                    tokens += getattr(choice, "token_ids", None) or []
            return tokens

        async def all_streams():
            return await asyncio.gather(*(stream(prompt) for prompt in prompts))

        assert asyncio.run(all_streams()) == expected
        # The child's engine, read through /metrics: nothing running or held once every stream has ended.
        wait_for(lambda: metric(server, "vllm:num_requests_running") == 0, "idle")
        assert metric(server, "vllm:kv_cache_usage_perc") == 0.0
        assert metric(server, "vllm:request_success_total") == 65  # counted here, from what the child sent
        logged = httpx.post(f"{server.base_url}/request_log").json()
        assert logged["num_requests"] == 65 and logged["complete"] is True
    run = read_run(tmp_path / "log")  # written again by the child when the server stopped
    assert run.requests.num_rows == 65 and set(run.requests.column("status").to_pylist()) == {"finished"}
    assert run.metadata["clock_origin"] == process.clock_origin


def test_a_disconnected_stream_is_aborted_in_the_engine_process(model_folder, tmp_path):  # noqa: F811
    process = engine_process(model_folder, tmp_path / "log")
    with ServerThread(create_app(process, model_name=MODEL)) as server:
        body = {"model": MODEL, "prompt": list(range(2, 40)), "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
            next(response.iter_lines())  # the first token is out: the request runs in the child
        wait_for(lambda: metric(server, "vllm:num_requests_running") == 0, "aborted")
        assert metric(server, "vllm:kv_cache_usage_perc") == 0.0
        httpx.post(f"{server.base_url}/request_log")
        request = read_run(tmp_path / "log").requests.to_pylist()[0]
        assert request["status"] == "aborted" and "client disconnected" in request["reason"]
        assert request["output_len"] < 200


def test_a_dead_engine_process_answers_503_and_ends_open_streams(model_folder):  # noqa: F811
    process = engine_process(model_folder)
    with ServerThread(create_app(process, model_name=MODEL)) as server:
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        body = {"model": MODEL, "prompt": list(range(2, 40)), "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(process._process.pid, signal.SIGKILL)
            rest = "\n".join(lines)  # the stream ends, saying why
        assert "engine process exited unexpectedly" in rest
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and "exited unexpectedly" in health.text
        late = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": [5], "max_tokens": 2})
        assert late.status_code == 503


def test_an_engine_process_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="engine process failed to start"):
        EngineProcess(EngineArgs(model=str(tmp_path / "no-such-model"), device="cpu"), start_timeout=300)


def start_twinfer_serve(model_folder: str, log_dir, **popen) -> tuple:
    """`twinfer serve` of the tiny model on a free port, its engine in a process: (the server process, its URL)."""
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-m", "twinfer", "serve", model_folder, "--device", "cpu", "--port", "0",
                               "--served-model-name", MODEL, "--request-log", str(log_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines = []
    for line in server.stdout:
        lines.append(line)
        if " on http://" in line:
            break
    assert " on http://" in lines[-1], "".join(lines)
    return server, lines[-1].split(" on ", 1)[1].split("/v1", 1)[0]


def answer_three_tokens(base_url: str) -> None:
    answer = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 3,
                                                            "ignore_eos": True}, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_twinfer_serve_runs_its_engine_in_a_process_and_stops_on_ctrl_c(model_folder, tmp_path):  # noqa: F811
    import subprocess

    server, base_url = start_twinfer_serve(model_folder, tmp_path / "log")
    try:
        children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        commands = [open(f"/proc/{child}/cmdline", "rb").read() for child in children]
        assert any(b"spawn_main" in command for command in commands)  # the engine's process
        answer_three_tokens(base_url)
    finally:
        server.send_signal(signal.SIGINT)  # as Ctrl-C: the child ignores it and is told to stop
        rest = server.communicate(timeout=120)[0]
    assert server.returncode == 0, rest
    assert "request log written" in rest and "stopped" in rest
    assert read_run(tmp_path / "log").requests.num_rows == 1


def test_twinfer_serve_stopped_by_sigterm_to_its_process_group_writes_its_request_log(model_folder, tmp_path):  # noqa: F811
    """systemd's default stop (and `kill -- -PGID`) sends SIGTERM to every process of the group at once: the engine
    process too must stop cleanly and write the request log, not die with it."""
    server, base_url = start_twinfer_serve(model_folder, tmp_path / "log", start_new_session=True)
    try:
        answer_three_tokens(base_url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        rest = server.communicate(timeout=120)[0]
    assert "request log written" in rest, rest
    assert read_run(tmp_path / "log").requests.num_rows == 1
    wait_for(lambda: not _group_alive(server.pid), "every process of the server's group to end")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_engine_process_interrupted_while_starting_leaves_no_child(model_folder, monkeypatch):  # noqa: F811
    import multiprocessing.connection

    started = []
    real_poll = multiprocessing.connection.Connection.poll

    def interrupted_poll(self, timeout=0.0):
        started.append(True)
        raise KeyboardInterrupt  # Ctrl-C while the child builds its engine

    monkeypatch.setattr(multiprocessing.connection.Connection, "poll", interrupted_poll)
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt):
        engine_process(model_folder)
    monkeypatch.setattr(multiprocessing.connection.Connection, "poll", real_poll)
    assert started and set(multiprocessing.active_children()) == before


def test_metrics_and_the_request_log_answer_when_the_engine_process_dies_while_asked(model_folder, tmp_path):  # noqa: F811
    """A scrape waiting on the child when it dies still gets the metrics (the engine's state as last read), and a
    request log asked of a dead child is a 503 saying why, not an internal error."""
    import concurrent.futures

    process = engine_process(model_folder, tmp_path / "log")
    with ServerThread(create_app(process, model_name=MODEL)) as server:
        assert metric(server, "vllm:num_requests_running") == 0
        os.kill(process._process.pid, signal.SIGSTOP)  # the child cannot answer the next scrape
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            scrape = pool.submit(httpx.get, f"{server.base_url}/metrics", timeout=60)
            threading.Event().wait(0.5)
            assert not scrape.done()
            os.kill(process._process.pid, signal.SIGKILL)
            response = scrape.result()
        assert response.status_code == 200 and "vllm:kv_cache_usage_perc" in response.text
        logged = httpx.post(f"{server.base_url}/request_log")
        assert logged.status_code == 503 and "exited unexpectedly" in logged.json()["error"]["message"]
